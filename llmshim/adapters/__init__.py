"""Adapters: HOW each client library is patched. ``PATCHES`` lists every attribute llmshim touches.

Seams were chosen one level above the attributes vcrpy patches (it replaces the httpx/httpx2
transports and ``aiohttp.ClientSession._request`` with ``mock.patch``, restoring on exit whatever
it found on entry), so llmshim and vcrpy never fight over one attribute, in either install order:

| library  | owner                             | attribute              | why this seam                        |
|----------|-----------------------------------|------------------------|--------------------------------------|
| httpx    | httpx.Client / AsyncClient        | _send_single_request   | one wire request, after auth, above  |
| httpx2   | httpx2.Client / AsyncClient       | _send_single_request   |   any transport (OpenAI SDK 3.x)     |
| requests | requests.adapters.HTTPAdapter     | send                   | PreparedRequest in, Response out     |
| aiohttp  | aiohttp.ClientSession             | _middlewares           | adds one innermost client middleware |

Patching happens in wrapt post-import hooks, so ``install()`` works before or after the library
is imported; methods are patched on the classes, so objects made before ``install()`` are covered.
wrapt itself (and the ``importlib.metadata`` and ``inspect`` it imports, most of what ``install()``
would cost a process) is imported only when one of these libraries is: until then a small finder
(``_Watch``) waits for their names, and hands the first one's import to wrapt's hooks.
Only what llmshim put there is ever removed: ``remove_all`` restores an attribute only while our
replacement is still the outermost one. A replacement left under another tool's wrapper is
remembered (``_left``): once that tool is gone and has put it back (a mock's stop()), the next
install() wraps what it replaced and the next uninstall() restores that, so none stays for good.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..state import STATE

if TYPE_CHECKING:
    import importlib.machinery

__all__ = ["PATCHES", "Patch", "apply_all", "ensure_hooks", "patched", "remove_all"]

log = logging.getLogger("llmshim")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Patch:
    """One attribute llmshim replaces. ``factory(module, original)`` builds the replacement."""

    library: str
    module: str
    owner: str
    attribute: str
    factory: str  # "llmshim.adapters.X:function", imported only when the library is

    def build(self, module: Any, original: Any) -> Any:
        path, _, name = self.factory.partition(":")
        maker: Callable[[Any, Any], Any] = getattr(importlib.import_module(path), name)
        return maker(module, original)


PATCHES: tuple[Patch, ...] = (
    Patch("httpx", "httpx", "Client", "_send_single_request", "llmshim.adapters.httpx:sync_wrapper"),
    Patch("httpx", "httpx", "AsyncClient", "_send_single_request", "llmshim.adapters.httpx:async_wrapper"),
    Patch("httpx2", "httpx2", "Client", "_send_single_request", "llmshim.adapters.httpx:sync_wrapper"),
    Patch("httpx2", "httpx2", "AsyncClient", "_send_single_request", "llmshim.adapters.httpx:async_wrapper"),
    Patch("requests", "requests.adapters", "HTTPAdapter", "send", "llmshim.adapters.requests:send_wrapper"),
    Patch("aiohttp", "aiohttp.client", "ClientSession", "_middlewares", "llmshim.adapters.aiohttp:middlewares"),
)

_lock = threading.RLock()
_applied: dict[Patch, tuple[Any, Any]] = {}  # patch -> (original or _MISSING, replacement)
_left: dict[Patch, list[tuple[Any, Any]]] = {}  # uninstalled under another tool's wrapper: (original, replacement)
_hooked: set[str] = set()
_wanted = False  # install() called and not uninstalled: hooks patch modules as they are imported


def _owner(patch: Patch, module: Any) -> Any:
    owner = module
    for part in patch.owner.split("."):
        owner = getattr(owner, part)
    return owner


def _apply(patch: Patch, module: Any) -> None:
    """Patch one attribute, or patch it again when what llmshim put there is gone: a mock started
    before install() and stopped after it restores the genuine method under llmshim's feet. The
    previous replacement, wherever it still sits, is a pass-through inside a call (``in_call``)."""
    if patch.library not in STATE.settings.libraries:
        return
    owner = _owner(patch, module)
    applied = _applied.get(patch)
    if applied is not None and vars(owner).get(patch.attribute, _MISSING) is applied[1]:
        return
    original = _peel(patch, vars(owner).get(patch.attribute, _MISSING))
    current = getattr(owner, patch.attribute, None) if original is _MISSING else original
    replacement = patch.build(module, current)
    setattr(owner, patch.attribute, replacement)
    _applied[patch] = (original, replacement)


def _initializing(module: Any) -> bool:
    """The module's import has not returned yet. Inside wrapt's post-import hook that is so though
    its code has run; in another thread's import in progress its classes may not exist yet: only a
    missing attribute tells the two apart (``_on_import``)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _patch_when_imported(module: Any) -> None:
    """Patch ``module`` once the thread importing it is done (polled: the import system has no
    public "imported" event for a module already in ``sys.modules``)."""
    def wait() -> None:
        for _ in range(6000):  # at most a minute
            if not _initializing(module):
                _on_import(module)
                return
            threading.Event().wait(0.01)

    threading.Thread(target=wait, name="llmshim-patch-after-import", daemon=True).start()


def _on_import(module: Any) -> None:
    """wrapt post-import hook. Never raises: a raising hook would break the user's import."""
    try:
        with _lock:
            if not _wanted:
                return
            for patch in PATCHES:
                if patch.module == module.__name__:
                    try:
                        _apply(patch, module)
                    except AttributeError:
                        if not _initializing(module):
                            raise
                        _patch_when_imported(module)  # its code is still running in another thread
                        return
    except Exception:
        log.warning("llmshim: could not patch %s; it is left untouched", module.__name__, exc_info=True)


def ensure_hooks() -> None:
    """Register the post-import hooks once per module (wrapt has no way to unregister them)."""
    import wrapt

    with _lock:
        for name in {patch.module for patch in PATCHES} - _hooked:
            _hooked.add(name)
            wrapt.register_post_import_hook(_on_import, name)


class _Watch:
    """A finder first on ``sys.meta_path`` that waits for a patched library's import and lets
    wrapt's import hook finder load it, so its hooks run; every other import it leaves alone.

    It stays in place once wrapt's finder is in (ahead of it): an import that was already past
    wrapt's place in ``sys.meta_path`` when it came in still meets this one, and is handed over.
    Finders are called under the global import lock, so ``_busy`` needs no lock of its own."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._busy: set[str] = set()

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self._names or name in self._busy:
            return None
        self._busy.add(name)  # wrapt's finder asks the import system again: not us, this time
        try:
            ensure_hooks()
            import wrapt.importer

            finder: Any = next((f for f in sys.meta_path if isinstance(f, wrapt.importer.ImportHookFinder)), None)
            if finder is None:
                return None
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(name, path, target)
            return spec
        except Exception:  # never break the program's import
            log.warning("llmshim: could not watch the import of %s", name, exc_info=True)
            return None
        finally:
            self._busy.discard(name)


_watch: _Watch | None = None


def _watch_imports() -> None:
    """Hooks for the patched libraries: wrapt's now if it is imported already, else ``_Watch``'s."""
    global _watch
    if "wrapt" in sys.modules:
        ensure_hooks()
    elif _watch is None:
        _watch = _Watch(frozenset(patch.module for patch in PATCHES))
        sys.meta_path.insert(0, _watch)


def apply_all() -> None:
    """Patch every enabled library that is already imported; hooks take the rest as they arrive."""
    global _wanted
    with _lock:
        _wanted = True
        _watch_imports()
        for name in {patch.module for patch in PATCHES}:
            module = sys.modules.get(name)
            if module is not None:
                _on_import(module)


def _peel(patch: Patch, value: Any) -> Any:
    """``value`` without the replacements of ours that were left under another tool's wrapper and
    are outermost again (that tool is gone): what each of them had replaced, in their stead."""
    left = _left.get(patch, [])
    while (found := next((entry for entry in left if entry[1] is value), None)) is not None:
        left.remove(found)
        value = found[0]
    return value


def _restore(patch: Patch, owner: Any, value: Any) -> None:
    if value is _MISSING:
        delattr(owner, patch.attribute)
    else:
        setattr(owner, patch.attribute, value)


def remove_all() -> list[str]:
    """Undo every patch whose replacement is still outermost; report the ones left in place.
    Replacements left in place by an earlier call that are outermost again go too."""
    global _wanted
    left: list[str] = []
    with _lock:
        _wanted = False
        for patch, (original, replacement) in list(_applied.items()):
            owner = _owner(patch, sys.modules[patch.module])
            if vars(owner).get(patch.attribute, _MISSING) is replacement:
                _restore(patch, owner, _peel(patch, original))
            else:  # wrapped again by someone else: stays, as a pass-through (STATE.active is off)
                left.append(f"{patch.module}.{patch.owner}.{patch.attribute}")
                _left.setdefault(patch, []).append((original, replacement))
            del _applied[patch]
        for patch in list(_left):
            owner = _owner(patch, sys.modules[patch.module])
            current = vars(owner).get(patch.attribute, _MISSING)
            if (peeled := _peel(patch, current)) is not current:
                _restore(patch, owner, peeled)
    return left


def patched() -> list[Patch]:
    with _lock:
        return list(_applied)
