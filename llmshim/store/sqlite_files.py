"""SQLite files llmshim owns: the one way they are opened, private on disk, one connection per
thread that any thread may close.

Shared by the cache (``cache_sqlite.py``) and the rate-limit store (``limits_sqlite.py``), so that a
fix lands in both:

**Private files.** Before a file is opened, ``plan_private`` (pure) says what to tighten: the
database and its ``-wal``/``-shm``/``-journal`` companions lose every group and other bit (0644
becomes 0600), and the directory does too (0700) when it is llmshim's own (the default cache
folder, or one llmshim just created). A directory the user chose is never changed: if other users
can write into it, they could swap the file or plant a companion, so llmshim warns once. SQLite
creates ``-wal`` and ``-shm`` with the database file's own mode whatever the umask, which is why
the database is tightened *before* the first connection. A file that cannot be tightened (another
user owns it) is used as it is, with one clear warning; on a read-only medium nothing is written,
so nothing is said.

**Connections.** Each thread gets its own connection (SQLite connections must not be shared
while in use) and uses it inside ``use()``, which counts the uses in progress. ``close()`` may be
called from any thread at any time: an idle connection is closed at once; one in use is marked and
closed by its own thread the moment its use ends. Closing another thread's connection under its
feet is what crashed the interpreter (SIGSEGV) when ``uninstall()`` raced calls in flight. After
``close()`` the store stays usable: the next use opens a fresh connection. A connection inherited
across ``fork()`` is never used or closed in the child (closing it there could delete the parent's
WAL); the child opens its own. Connections of threads that have ended are closed as new ones open.

**Opening.** Every connection is opened the same way (``Connections._connect``): the busy timeout
(as ``timeout`` and ``PRAGMA busy_timeout``), then, for a writable file, ``journal_mode=WAL`` and
``synchronous=NORMAL``, then the store's own ``set_up`` (schema). The switch to WAL can answer
"database is locked" *without* waiting for the busy timeout while another process switches the
same file or holds it locked, so it is retried for about half a second; first-time set-up is
serialised between the threads of this process. A store that needs to write refuses a read-only
file in its ``set_up``.

**Read-only.** A cache the process cannot write (a file baked into an image, a read-only mount)
is opened with ``mode=ro``; when its ``-shm`` neither exists nor can be created there, also with
``immutable=1`` (SQLite cannot otherwise read a WAL database on read-only media). Immutable means
SQLite takes no locks: nothing may write that file meanwhile, which holds on a read-only medium.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

__all__ = ["COMPANIONS", "Connections", "FileState", "Tighten", "plan_private", "prepare_private", "read_only_uri",
           "warn_once"]

log = logging.getLogger("llmshim")

COMPANIONS = ("-wal", "-shm", "-journal")
_OTHERS = 0o077  # every group and other permission bit
_WARNED: set[tuple[str, str]] = set()
_INHERITED: list[sqlite3.Connection] = []  # connections from before a fork: kept, never closed in the child
WAL_ATTEMPTS = 50  # tries of the switch to WAL, 10 ms apart
_pid = os.getpid()  # this process's, kept by the fork hook below: ``os.getpid()`` is a system call per use


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


# -- private files: the decision (pure) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileState:
    """What ``os.stat`` said about one path (None: it does not exist)."""

    path: str
    mode: int | None


@dataclasses.dataclass(frozen=True)
class Tighten:
    path: str
    mode: int


def plan_private(database: FileState, companions: list[FileState], directory: FileState,
                 own_directory: bool) -> tuple[list[Tighten], list[str]]:
    """The chmods that make these files private, and the warnings to give. Pure.

    Files lose their group/other bits; the directory too when it is llmshim's own; a user's
    directory that others may write into earns a warning instead."""
    changes = [Tighten(f.path, stat.S_IMODE(f.mode) & ~_OTHERS)
               for f in (database, *companions) if f.mode is not None and stat.S_IMODE(f.mode) & _OTHERS]
    warnings: list[str] = []
    if directory.mode is not None and stat.S_IMODE(directory.mode) & _OTHERS:
        if own_directory:
            changes.append(Tighten(directory.path, stat.S_IMODE(directory.mode) & ~_OTHERS))
        elif stat.S_IMODE(directory.mode) & 0o022:
            warnings.append(f"llmshim: the folder {directory.path} of {database.path} is writable by other users: "
                            "they could replace the file or plant its -wal/-shm; choose a private folder")
    return changes, warnings


# -- private files: acting on the decision -----------------------------------------------------------
def _state(path: str) -> FileState:
    try:
        return FileState(path, os.stat(path).st_mode)
    except OSError:
        return FileState(path, None)


def warn_once(key: str, message: str) -> None:
    if (key, message) not in _WARNED:
        _WARNED.add((key, message))
        log.warning("%s", message)


def prepare_private(path: str, *, own_directory: bool, create: bool = True) -> None:
    """Create the folder (0700) and the file (0600) if missing, then tighten what exists.

    Raises ``OSError`` only when the file is missing and cannot be created."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        own_directory = True  # llmshim made it: it is llmshim's to keep private
    if create and not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    changes, warnings = plan_private(_state(path), [_state(path + suffix) for suffix in COMPANIONS],
                                     _state(directory), own_directory)
    for change in changes:
        try:
            os.chmod(change.path, change.mode)
        except OSError as exc:
            if not _read_only_medium(change.path):
                warn_once(change.path, f"llmshim: cannot make {change.path} private ({exc.strerror}); other users "
                                       "may read it: chown it to this user or delete it")
    for message in warnings:
        warn_once(directory, message)


def _read_only_medium(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_only_uri(path: str) -> str | None:
    """The URI to open ``path`` read-only with, or None when this process can write it.

    ``immutable=1`` when the WAL index (``-shm``) neither exists nor can be created: SQLite cannot
    read a WAL database on read-only media otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path) or (os.access(path, os.W_OK) and os.access(directory, os.W_OK)):
        return None
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    if not os.path.exists(path + "-shm") and not os.access(directory, os.W_OK):
        uri += "&immutable=1"
    return uri


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, retried: while another process switches the file or holds
    it locked, SQLite may answer "locked" at once instead of waiting for the busy timeout."""
    for attempt in range(WAL_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if attempt == WAL_ATTEMPTS - 1:
                raise
            time.sleep(0.01)


def _close_slots(slots: list[_Slot]) -> None:
    """Close these slots' connections: this process's; a fork parent's are kept (closing them in
    the child would end the parent's transactions). Used by ``close`` and when a ``Connections``
    nobody closed is collected."""
    for slot in slots:
        if slot.pid == os.getpid():
            with suppress(sqlite3.Error):
                slot.conn.close()
        else:
            _INHERITED.append(slot.conn)
    slots.clear()


# -- connections -----------------------------------------------------------------------------------
class _Slot:
    """One thread's connection and how many uses of it are in progress."""

    __slots__ = ("conn", "doomed", "pid", "thread", "uses")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.thread = threading.current_thread()
        self.uses = 0
        self.doomed = False  # closed by whoever ends the last use


class Connections:
    """Per-thread connections to one file, opened one way, safe to close from any thread (see the
    module doc).

    ``set_up`` readies a fresh connection after the shared pragmas (the schema; it may refuse a
    read-only file by raising); it is told whether the connection is read-only."""

    def __init__(self, path: str, set_up: Callable[[sqlite3.Connection, bool], sqlite3.Connection], *,
                 own_directory: bool, busy_timeout_ms: int) -> None:
        self.path = path
        self.own_directory = own_directory
        self.busy_timeout_ms = busy_timeout_ms
        self.read_only = False
        self._set_up = set_up
        self._local = threading.local()
        self._lock = threading.RLock()  # re-entrant: see Pipeline._lock (a collected reply may close us)
        self._set_up_lock = threading.RLock()  # first-time set-up, one thread of this process at a time
        self._slots: list[_Slot] = []  # changed in place: the finalizer below holds this list
        # A store dropped without close() (a script's own SQLiteStore) closes its connections when
        # it is collected: Python 3.13 warns (ResourceWarning) of a connection collected open, an
        # error under `-W error`. Not at exit: writes still queued then must find them open.
        weakref.finalize(self, _close_slots, self._slots).atexit = False

    @contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for the length of the block; no thread closes it meanwhile."""
        slot = self.enter()
        try:
            yield slot.conn
        finally:
            self.leave(slot)

    def leave(self, slot: _Slot) -> None:
        """Ends a use begun by ``enter`` (``use()`` without a generator: a cache hit's lookup is a
        few microseconds, and a generator context manager cost as much again)."""
        with self._lock:
            slot.uses -= 1
            close = slot.uses == 0 and slot.doomed
        if close:
            with suppress(sqlite3.Error):
                slot.conn.close()

    def enter(self) -> _Slot:
        """Begins a use of this thread's connection (``slot.conn``); ``leave(slot)`` must follow."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None:
            with self._lock:
                if not slot.doomed and slot.pid == _pid:
                    slot.uses += 1
                    return slot
        slot = _Slot(self._connect())
        slot.uses = 1
        with self._lock:
            ended = [s for s in self._slots if s.pid != slot.pid or (s.uses == 0 and not s.thread.is_alive())]
            self._slots[:] = [s for s in self._slots if s not in ended] + [slot]
        self._local.slot = slot
        for old in ended:
            if old.pid == slot.pid:
                with suppress(sqlite3.Error):
                    old.conn.close()
            else:
                _INHERITED.append(old.conn)
        return slot

    def _connect(self) -> sqlite3.Connection:
        uri = read_only_uri(self.path)
        if uri is None:
            prepare_private(self.path, own_directory=self.own_directory)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
        else:
            prepare_private(self.path, own_directory=self.own_directory, create=False)
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
        self.read_only = uri is not None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if uri is not None:
                return self._set_up(conn, True)
            with self._set_up_lock:
                _switch_to_wal(conn)
                conn.execute("PRAGMA synchronous = NORMAL")
                return self._set_up(conn, False)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close every connection of this process: idle ones now, busy ones when their use ends."""
        with self._lock:
            slots = list(self._slots)
            self._slots.clear()
            idle = []
            for slot in slots:
                slot.doomed = True
                if slot.uses == 0:
                    idle.append(slot)
        _close_slots(idle)
