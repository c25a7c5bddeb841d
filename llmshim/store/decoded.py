"""Entries this process decoded lately, so that a hit on a hot key skips the decoding.

A hit on SQLite reads the whole row (status, headers, body, description) and decodes the headers
and the answer's outcome from JSON: two thirds of a lookup's cost. An entry decoded once is kept
here with its *stamp* (``created_at`` and ``size``, which every write of the row sets anew); the
next lookup of the key reads only the row's small columns, and when the stamp is unchanged the
entry kept here is the row's decoding. A row written again (by any process: ``refresh``, another
host's answer), deleted, evicted or expired is caught by that read: the row is read whole again.
(This process forgets a key it writes itself; another process writing an answer of the very same
size within the same tick of ``time.time()``, 100 ns or finer, is the one case not told apart.)

Bounded by entries and by bytes (oldest dropped first); an entry above ``max_entry_bytes`` is not
kept. An entry's bytes are its row's ``size`` (body, headers, description text and key: what the
entry holds), not its body alone: a short answer to a long prompt keeps the description (up to
64 KB of the request), and counted by bodies, 256 of them held twice the whole bound. Entries
are never changed after decoding, so one may serve many calls at once.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

from .base import Entry

__all__ = ["Decoded", "Stamp", "held"]

Stamp = tuple[float, int]  # (created_at, size) of the row the entry was decoded from


def held(stamp: Stamp, entry: Entry) -> int:
    """The bytes a kept entry counts for: its row's size, never less than its body."""
    return max(stamp[1], len(entry.body))


class Decoded:
    def __init__(self, max_entries: int = 2048, max_bytes: int = 8 * 2**20, max_entry_bytes: int = 2**20) -> None:
        self.max_entries, self.max_bytes, self.max_entry_bytes = max_entries, max_bytes, max_entry_bytes
        self._entries: OrderedDict[str, tuple[Stamp, Entry]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        _ALL.add(self)

    def get(self, key: str) -> tuple[Stamp, Entry] | None:
        return self._entries.get(key)

    def keep(self, stamp: Stamp, entry: Entry) -> None:
        size = held(stamp, entry)
        if size > self.max_entry_bytes:
            return
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                self._bytes -= held(*old)
            self._entries[entry.key] = (stamp, entry)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= held(*dropped)

    def forget(self, key: str) -> None:
        """This process writes the key's row anew (possibly within one tick of the clock)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= held(*old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_ALL: weakref.WeakSet[Decoded] = weakref.WeakSet()


def _reset_in_child() -> None:
    """A fork() child gets a lock of its own (one a parent's thread held at the fork would never
    be released there) and keeps nothing (a thread may have been halfway through a keep): it
    decodes again what it reads."""
    for decoded in list(_ALL):
        decoded._lock = threading.Lock()
        decoded._entries = OrderedDict()
        decoded._bytes = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
