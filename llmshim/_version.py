"""The installed distribution's version, in a module of its own so that anything may import it
without importing the package root.

Read on first use (``from llmshim._version import __version__`` and ``llmshim.__version__`` go
through the module ``__getattr__``), not at import: ``importlib.metadata`` costs a process that
installs llmshim as it starts (``llmshim run``, a ``.pth``) more than the rest of ``install()``."""

from __future__ import annotations

__all__ = ["__version__"]

__version__: str  # set by __getattr__ on first read


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib.metadata

    try:
        version = importlib.metadata.version("llmshim")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        version = "0.0.0+local"
    globals()["__version__"] = version  # read once: later reads find the module attribute
    return version
