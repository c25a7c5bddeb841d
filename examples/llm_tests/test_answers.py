"""An LLM test suite that runs offline, deterministically, from cassettes this project recorded.

    pytest examples/llm_tests --llmshim-replay                   # offline, from cassettes/test_answers/
    llmshim serve --port 18080 &  pytest examples/llm_tests --llmshim-record   # re-record (bundled server)
    LLM_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... pytest examples/llm_tests --llmshim-record

The API key never reaches the cassette; matching ignores it, so a replay needs none.
"""

import os

import openai
import pytest

BASE_URL = os.environ.get("LLM_BASE_URL", "http://127.0.0.1:18080/v1")


@pytest.fixture
def client():
    with openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("OPENAI_API_KEY", "sk-local")) as c:
        yield c


def test_the_answer_names_the_question(client, llmshim_calls):
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "capital of France"}])
    assert "France" in reply.choices[0].message.content
    assert llmshim_calls[0].output_tokens > 0


def test_streamed_answer(client):
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "count to three"}],
                                            stream=True, stream_options={"include_usage": True})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "three" in text
