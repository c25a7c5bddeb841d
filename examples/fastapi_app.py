"""A FastAPI app whose endpoint calls an LLM; llmshim is added from outside, workers included:

    llmshim serve --port 11434 &
    llmshim run -- uvicorn examples.fastapi_app:app --workers 2 --port 8000
    curl 'http://127.0.0.1:8000/ask?q=hello'

Against a real Ollama, unchanged (its default port), or `LLM_HOST=...` for another server.
"""

import os

import requests
from fastapi import FastAPI

app = FastAPI()
HOST = os.environ.get("LLM_HOST", "http://127.0.0.1:11434").rstrip("/")


@app.get("/ask")
def ask(q: str) -> dict[str, object]:
    body = {"model": os.environ.get("MODEL", "llama3.2"), "messages": [{"role": "user", "content": q}],
            "stream": False}
    response = requests.post(f"{HOST}/api/chat", json=body, timeout=120)
    import llmshim  # only to show, in this example, that the worker has it: the app does not need it

    return {"answer": response.json()["message"]["content"], "cached": response.headers.get("x-llmshim-cache"),
            "llmshim_active_in_worker": llmshim.is_installed(), "worker_pid": os.getpid()}
