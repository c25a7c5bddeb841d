"""The shipped test seam: a local, protocol-faithful LLM server with fault injection.

    from llmshim.testing import FakeLLMServer, Fault

    with FakeLLMServer() as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="test")
        server.inject(Fault(status=429, headers={"retry-after-ms": "200"}))
        ...

Run it by hand with ``python -m llmshim.testing serve --port 8080``.
"""

from .responses import Answer
from .server import FakeLLMServer, Fault, Received

__all__ = ["Answer", "FakeLLMServer", "Fault", "Received"]
