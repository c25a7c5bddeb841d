"""Is what answers this request the real network? Test doubles and recorders must bypass the cache.

A test suite that mocks its LLM (respx, pytest-httpx, ``httpx.MockTransport``, ASGI/WSGI
transports, responses, requests-mock, httpretty, ``unittest.mock.patch`` of a transport or an
adapter, ...) must get each test's own mocked answer: a mocked answer stored in the persistent cache
would answer the next test, and a cached answer would hide the mock. And a recorder (a vcrpy or
pytest-recording cassette, betamax) must see every request, or the cassette is written without it.

The question is asked at the root, not per tool: for each library, are the layers *below* llmshim's
seam, down to the socket, the library's own? A function is genuine when it is defined in its
library's own source file (see :func:`genuine`): a mock, an autospec stand-in or a mocking
library's replacement is not, whatever it is named. What cannot be verified counts as a double:
the cost of a wrong "real" is a wrong answer; the cost of a wrong "double" is one uncached call.

The answer is a reason string for ``call.cache_bypass`` (``"mocked (respx)"``, ``"test double
(MockTransport)"``, ``"recording (vcrpy cassette)"``) or None for the real network. The checks run
only for recognised LLM calls with the cache on; each costs a few attribute lookups, and the
identity of every function found genuine is remembered.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..call import Call
from ..runtime import STATE

__all__ = ["aiohttp_double", "bypass_reason", "genuine", "httpx_double", "mark_bypass", "requests_double"]

log = logging.getLogger("llmshim")

#: id -> (the function found genuine, its code then): kept, so the id stays its own.
_GENUINE: dict[int, tuple[Any, Any]] = {}
#: Replacements of the socket module that still reach the real network.
_REAL_SOCKET_MODULES = ("socket", "_socket", "gevent", "eventlet")
#: Attributes under which transport wrappers (instrumentation, retries, caches) keep the transport.
_WRAPPED_TRANSPORT = ("_transport", "transport", "_wrapped", "wrapped", "_inner", "inner", "_wrapped_transport")


def mark_bypass(call: Call, check: Callable[[], str | None]) -> None:
    """Sets ``call.cache_bypass`` from one adapter's check, when a policy that answers without the
    upstream is in the pipeline (the cache, the pytest plugin's cassettes): otherwise nothing
    could hide a test double, and the check is skipped."""
    if not STATE.pipeline.serves_answers:
        return
    reason = bypass_reason(check)
    if reason:
        call.cache_bypass = reason


def bypass_reason(check: Callable[[], str | None]) -> str | None:
    """Runs one adapter's check, failing closed: a check that breaks means "not verified"."""
    try:
        return check()
    except Exception:
        log.debug("llmshim: could not tell whether a request goes to the network", exc_info=True)
        return "unverified transport"


def _unwrap(function: Any) -> Any:
    """Through wrappers that call what they wrap: llmshim's own adapters' (a wrapper left in place by
    an uninstall under someone else's, then wrapped again) and wrapt's (OpenTelemetry's)."""
    for _ in range(8):
        inner = getattr(function, "__wrapped__", None)
        if inner is None or not (_is_wrapt(function) or _defined_in(function, "llmshim.adapters")):
            break
        function = inner
    return getattr(function, "__func__", function)  # a bound method: its function


def _is_wrapt(function: Any) -> bool:
    wrapt = sys.modules.get("wrapt")
    proxy = getattr(wrapt, "BaseObjectProxy", None) or getattr(wrapt, "ObjectProxy", None)  # wrapt 2 / wrapt 1
    return proxy is not None and isinstance(function, proxy)


def _defined_in(function: Any, package: str) -> bool:
    """Whether ``function``'s code is in ``package``'s own source files."""
    module = getattr(function, "__module__", None)
    code = getattr(function, "__code__", None)
    if not isinstance(module, str) or code is None or not (module == package or module.startswith(package + ".")):
        return False
    return bool(getattr(sys.modules.get(module), "__file__", None) == code.co_filename)


def genuine(function: Any, package: str) -> bool:
    """Whether ``function`` is ``package``'s own code: defined in that package's source file.

    A mock is not a function; an autospec stand-in copies ``__module__`` but its code comes from
    ``<string>``; a replacement from a test file or a mocking library lives in another module.
    Remembered by identity together with the code found in it: a function whose ``__code__`` is
    swapped in place (or a proxy re-pointed, whose ``__code__`` is its target's) is looked at again."""
    seen = _GENUINE.get(id(function))
    if seen is not None and seen[0] is function and seen[1] is getattr(function, "__code__", None):
        return True  # as found: the same object, with the same code, as a call before
    function = _unwrap(function)
    if len(_GENUINE) >= 4096:  # bounded (functions redefined at run time): begin again
        _GENUINE.clear()
    code = getattr(function, "__code__", None)
    seen = _GENUINE.get(id(function))
    if seen is None or seen[0] is not function or seen[1] is not code:
        if not _defined_in(function, package):
            return False
        _GENUINE[id(function)] = (function, code)
    # A wrapper found around it is not remembered: wrapt binds a new proxy at every attribute access,
    # so remembering each would only fill the memo; it is looked through again next time.
    return True


def _origin(function: Any) -> str:
    """Who put ``function`` there, for the reason string: a mocking library's top-level name."""
    function = _unwrap(function)
    if type(function).__module__ == "unittest.mock" or hasattr(function, "mock") \
            or getattr(getattr(function, "__code__", None), "co_filename", "") == "<string>":
        return "unittest.mock"
    return str(getattr(function, "__module__", None) or type(function).__module__).split(".")[0]


def _mocked(function: Any, package: str) -> str | None:
    return None if genuine(function, package) else f"mocked ({_origin(function)})"


# -- below every library: the socket, and recorders --------------------------------------------------

def _socket_replaced() -> str | None:
    import socket

    for replaced in (socket.socket, socket.create_connection):
        module = str(getattr(replaced, "__module__", "socket"))
        if not module.startswith(_REAL_SOCKET_MODULES):
            return f"mocked ({module.split('.')[0]}: socket replaced)"
    return None


def _recording() -> str | None:
    """An open vcrpy cassette (any record mode) replaces the HTTP connection classes with
    subclasses that carry it; betamax answers through its own requests adapter."""
    if "vcr" in sys.modules:
        import http.client

        classes = [http.client.HTTPConnection]
        pools = sys.modules.get("urllib3.connectionpool")
        if pools is not None:
            classes.append(pools.HTTPConnectionPool.ConnectionCls)
        if any(getattr(cls, "cassette", None) is not None for cls in classes):
            return "recording (vcrpy cassette)"
    if "betamax" in sys.modules:
        frame: FrameType | None = sys._getframe(1)
        for _ in range(16):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if owner is not None and type(owner).__module__.startswith("betamax"):
                return "recording (betamax)"
            frame = frame.f_back
    return None


def _below_everything() -> str | None:
    return _recording() or _socket_replaced()


# -- per library -----------------------------------------------------------------------------------------

def httpx_double(module: Any, client: Any, request: Any) -> str | None:
    """httpx/httpx2: the transport chosen for the URL must be the library's own HTTP transport over
    its own connection pool (httpcore/httpcore2), unpatched; transport wrappers are looked through."""
    found = _below_everything() or _mocked(type(client)._transport_for_url, module.__name__)
    if found:
        return found
    return _httpx_transport(module, client._transport_for_url(request.url))


def _httpx_transport(module: Any, transport: Any, depth: int = 0) -> str | None:
    core = sys.modules.get("httpcore2" if module.__name__ == "httpx2" else "httpcore")
    for real, method, connection in ((module.HTTPTransport, "handle_request", "HTTPConnection"),
                                     (module.AsyncHTTPTransport, "handle_async_request", "AsyncHTTPConnection")):
        if isinstance(transport, real):
            if core is None:
                return "unverified transport"
            pool = getattr(transport, "_pool", None)
            return (_mocked(getattr(type(transport), method), module.__name__)
                    or _mocked(getattr(type(pool), method, None), core.__name__)
                    or _mocked(getattr(getattr(core, connection), method), core.__name__))
    doubles = tuple(getattr(module, name) for name in ("MockTransport", "ASGITransport", "WSGITransport")
                    if hasattr(module, name))
    if isinstance(transport, doubles):
        return f"test double ({type(transport).__name__})"
    if depth < 4:
        bases = (module.BaseTransport, module.AsyncBaseTransport)
        for name in _WRAPPED_TRANSPORT:
            inner = vars(transport).get(name) if hasattr(transport, "__dict__") else None
            if isinstance(inner, bases):
                return _httpx_transport(module, inner, depth + 1)
    return f"test double ({type(transport).__module__}.{type(transport).__qualname__})"


def requests_double(adapter: Any, original: Any) -> str | None:
    """requests: the ``HTTPAdapter.send`` llmshim wraps must be requests' own (``responses`` and
    ``mock.patch`` replace it), the adapter's helpers too, and urllib3's pools and connection
    classes below it (vcrpy swaps those)."""
    found = _below_everything() or _mocked(original, "requests")
    if found:
        return found
    for name in ("build_response", "get_connection_with_tls_context", "get_connection"):
        method = getattr(type(adapter), name, None)
        if method is not None and (found := _mocked(method, "requests")):
            return found
    pools = sys.modules.get("urllib3.connectionpool")
    if pools is None:
        return "unverified transport"
    for pool in (pools.HTTPConnectionPool, pools.HTTPSConnectionPool):
        found = _mocked(pool.urlopen, "urllib3") or _mocked(pool.ConnectionCls.request, "urllib3") \
            or _mocked(pool.ConnectionCls.getresponse, "urllib3")
        if found:
            return found
    return None


def aiohttp_double(request: Any) -> str | None:
    """aiohttp: below the middleware, the session's connector, the request's ``send`` and the
    response's ``start`` must be aiohttp's own (aioresponses and vcrpy patch ``_request``, above:
    a mocked answer there never reaches llmshim, a passed-through one is checked here)."""
    found = _below_everything()
    if found:
        return found
    session = getattr(request, "_session", None)
    if session is not None:
        found = _mocked(type(session)._request, "aiohttp")
        connector = getattr(session, "connector", None)
        if not found and connector is not None:
            found = _mocked(type(connector).connect, "aiohttp") \
                or _mocked(getattr(type(connector), "_create_connection", None), "aiohttp")
    return found or _mocked(type(request).send, "aiohttp") \
        or _mocked(getattr(request.response_class, "start", None), "aiohttp")
