"""A seed-001-style local LLM client that knows nothing about llmshim. Run it under llmshim:

    llmshim serve --port 11434 &                         # the bundled server, on Ollama's port
    llmshim run -- python examples/unmodified_client.py

    # against a real Ollama (its default address), nothing to change:
    llmshim run -- python examples/unmodified_client.py
    LLM_HOST=http://gpu-box:11434 MODEL=llama3.2 llmshim run -- python examples/unmodified_client.py

Run it twice: the second run's answers come from llmshim's cache (`llmshim cache stats`).
"""

import json
import os

import requests

HOST = os.environ.get("LLM_HOST", "http://127.0.0.1:11434").rstrip("/")
MODEL = os.environ.get("MODEL", "llama3.2")


def chat(prompt: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": False}
    return str(requests.post(f"{HOST}/api/chat", json=body, timeout=120).json()["message"]["content"])


def generate_stream(prompt: str) -> str:
    parts = []
    with requests.post(f"{HOST}/api/generate", json={"model": MODEL, "prompt": prompt}, stream=True,
                       timeout=120) as response:
        for line in response.iter_lines():
            if line:
                parts.append(json.loads(line).get("response", ""))
    return "".join(parts)


if __name__ == "__main__":
    print("chat:", chat("Why is the sky blue? One sentence."))
    print("stream:", generate_stream("Name three primes."))
