"""The installed distribution's version, in a module of its own so that anything may import it
without importing the package root (which imports everything)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["__version__"]

try:
    __version__ = importlib.metadata.version("llmshim")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
