"""Watch every LLM call an unmodified OpenAI SDK program makes: one install line and a hook.

    python examples/call_hooks.py                      # against the bundled local LLM server
    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... python examples/call_hooks.py

The same hook sees calls made through requests, aiohttp, httpx or the ollama client, to Ollama,
llama.cpp or any OpenAI-compatible server.
"""

from __future__ import annotations

import contextlib
import os

import llmshim


@llmshim.on("call_completed")
def show(record: llmshim.CallRecord) -> None:
    print(f"[llmshim] {record.provider} {record.operation} {record.response_model or record.model}: "
          f"{record.input_tokens} in / {record.output_tokens} out tokens, {record.duration * 1000:.0f} ms"
          + (f", first chunk after {record.time_to_first_chunk * 1000:.0f} ms" if record.stream else ""))


def main(base_url: str) -> None:
    import openai  # imported after install() on purpose: the order does not matter

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-local"))
    model = os.environ.get("MODEL", "gpt-4o-mini")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}])
    print("reply:", reply.choices[0].message.content)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to 3"}],
                                            stream=True, stream_options={"include_usage": True})
    print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))


if __name__ == "__main__":
    llmshim.install()
    with contextlib.ExitStack() as stack:
        url = os.environ.get("OPENAI_BASE_URL")
        if url is None:
            from llmshim.testing import FakeLLMServer

            url = stack.enter_context(FakeLLMServer(chunk_delay=0.02)).openai_base_url
        main(url)
