"""install() while another thread is still importing a patched library (the module is in
sys.modules, its classes not yet defined): no warning, no half-patch, and the library is patched
the moment its import finishes. Found when a background import of httpx2 (the price list's
dependency) raced install churn. A fresh interpreter: the test swaps httpx2 in sys.modules."""

from __future__ import annotations

from conftest import run_python

SCRIPT = """
import importlib.machinery, logging, sys, threading, types
import llmshim
from llmshim import adapters

warned = []
logging.getLogger("llmshim").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warned.append(r)})())
import httpx2 as real
partial = types.ModuleType("httpx2")
partial.__spec__ = importlib.machinery.ModuleSpec("httpx2", None)
partial.__spec__._initializing = True
del sys.modules["httpx2"]
sys.modules["httpx2"] = partial  # another thread is importing httpx2 right now: no classes yet
llmshim.install(cache="off")
before = sorted(p.owner for p in adapters.patched() if p.library == "httpx2")
partial.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
partial.__spec__._initializing = False  # that import finishes
done = threading.Event()
for _ in range(1000):
    if [p for p in adapters.patched() if p.library == "httpx2"]:
        break
    done.wait(0.01)
after = sorted(p.owner for p in adapters.patched() if p.library == "httpx2")
print(before, after, [r.getMessage() for r in warned])
"""


def test_install_during_another_threads_import_patches_it_once_imported() -> None:
    out = run_python(SCRIPT)
    assert out.strip() == "[] ['AsyncClient', 'Client'] []"
