"""``llmshim.stats()``: in-process counters, the numbers the seed projects' users read.

total calls, completed, failed, aborted, cache hits/misses, throttled calls, retries, average
latency, tokens in and out, tokens saved by the cache, per provider and model too. Cheap enough to
be always on: one lock-protected update when a call ends, from the call's outcome and its facts (the observer
calls ``call_started``/``call_ended``). With ``LLMSHIM_STATS_FILE`` set, a JSON
snapshot is written there (atomically, mode 0600, at most once a second, and at exit) for
``llmshim stats``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from contextlib import suppress
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: writes are atomic, but concurrent writers may drop a section
    fcntl = None  # type: ignore[assignment]

from .. import redact
from ..call import Call
from ..clocks import monotonic, wall
from . import stats_merge
from .stats_merge import FIELDS as _FIELDS
from .stats_merge import MODEL_FIELDS as _MODEL_FIELDS

__all__ = ["STATS", "Stats"]

log = logging.getLogger("llmshim")

_OUTCOME_FIELDS: dict[str | None, str] = {"ok": "completed", "aborted": "aborted"}  # any other outcome counts as failed


class Stats:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a reply collected inside ends its call here too
        self._writing = threading.Lock()
        self._at_exit = False
        self._path: str | None = None
        self._written = 0.0
        self._flush_at_exit_of_child = False
        self._lock_fd: int | None = None  # the lock file's descriptor while this process writes
        self.reset()
        self._process_started = self._started  # this process's section key, with its pid (reset keeps it)
        self._written_counts = dict(self._counts)  # what this process last wrote (nothing yet: zeros)

    def reset(self) -> None:
        with self._lock:
            self._counts: dict[str, int] = dict.fromkeys(_FIELDS, 0)
            self._latency_total = 0.0
            self._latency_count = 0
            self._models: dict[str, dict[str, Any]] = {}
            self._money: dict[str, float | None] = {"cost_usd": None, "saved_cost_usd": None,
                                                    "estimated_cost_usd": None}
            self._started = wall()

    def add(self, **increments: int) -> None:
        """Count incidents outside any call (store_errors=1, cache_errors=1)."""
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def call_started(self) -> None:
        with self._lock:
            self._counts["total_calls"] += 1

    def call_ended(self, call: Call) -> None:
        """Count the call. Tokens are *spent* only when the provider produced them: a cache hit's
        tokens go to ``tokens_saved`` (in total and for its model), never to input/output tokens.
        Spent tokens the provider did not report but llmshim estimated count too, and again under
        ``estimated_*``, as does their cost: the totals answer "what did we spend", the estimated
        part says how much of that is an estimate."""
        outcome = _OUTCOME_FIELDS.get(call.outcome, "failed")
        facts, response, info = call.facts, call.response, call.info
        usage = response.tokens if response is not None and not facts.cache_hit else None
        estimated = usage is not None and facts.estimator is not None
        key = f"{info.provider}/{info.model or '-'}"
        duration = call.duration
        with self._lock:
            counts = self._counts
            counts[outcome] += 1
            if facts.cache_hit is not None:
                counts["cache_hits" if facts.cache_hit else "cache_misses"] += 1
            if facts.retries:
                counts["retries"] += facts.retries
            if facts.ratelimit_wait_s is not None and facts.throttled:
                counts["throttled_calls"] += 1
            if duration is not None:
                self._latency_total += duration
                self._latency_count += 1
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = {**dict.fromkeys(_MODEL_FIELDS, 0), "cost_usd": None,
                                             "saved_cost_usd": None}
            model["calls"] += 1
            if facts.saved_input_tokens is not None or facts.saved_output_tokens is not None:
                saved = facts.tokens_saved
                counts["tokens_saved"] += saved
                model["tokens_saved"] += saved
            if usage is not None:
                spent_in, spent_out = usage.input_tokens or 0, usage.output_tokens or 0
                counts["input_tokens"] += spent_in
                counts["output_tokens"] += spent_out
                model["input_tokens"] += spent_in
                model["output_tokens"] += spent_out
                if estimated:
                    counts["estimated_input_tokens"] += spent_in
                    counts["estimated_output_tokens"] += spent_out
                    model["estimated_tokens"] += spent_in + spent_out
            if facts.cost_usd is not None or facts.saved_cost_usd is not None:
                for field, amount in (("cost_usd", facts.cost_usd), ("saved_cost_usd", facts.saved_cost_usd),
                                      ("estimated_cost_usd", facts.cost_usd if estimated else None)):
                    if amount is not None:  # a sum of honest prices; None until one call was priced
                        self._money[field] = (self._money[field] or 0.0) + amount
                        model[field] = (model.get(field) or 0.0) + amount
        if self._path is not None and monotonic() - self._written >= 1.0:
            self.write()


    def section(self) -> stats_merge.Section:
        """This process's section of the stats file: its counters with the latency sums (a program's
        average is weighted by the calls each process timed)."""
        with self._lock:
            return {**self._counts, **self._money, "latency_count": self._latency_count,
                    "latency_total_s": self._latency_total,
                    "by_model": {redact.scrub_text(k): dict(v) for k, v in sorted(self._models.items())},
                    "since": self._started, "processes": 1}

    def snapshot(self) -> dict[str, Any]:
        return {**stats_merge.derive(self.section()), "pid": os.getpid()}

    def write_to(self, path: str | None) -> None:
        self._path = path
        if path is not None and not self._at_exit:
            self._at_exit = True  # once per process: every install() calls this
            atexit.register(self.write_if_changed)

    def write_if_changed(self) -> None:
        """The write at exit, only when this process counted something since its last write: the
        master of a pre-fork server (gunicorn, celery, uvicorn --workers) makes no call, or made them
        before forking and wrote them then, and ends after its workers; rewriting its unchanged
        section would only cost a lock. At exit the lock is waited for longer: it is the last write."""
        with self._lock:
            changed = self._counts != self._written_counts
        if changed:
            self.write(lock_wait_s=EXIT_LOCK_WAIT_S)

    def write(self, lock_wait_s: float | None = None) -> None:
        """This process's section into the file, the other processes' sections kept: read, merge and
        replace under an exclusive lock on ``<file>.lock``, atomically (a temporary file renamed),
        readable by this user only (the file names the models and the volumes). Bounded: a writer
        that does not get the lock within ``CALL_LOCK_WAIT_S`` skips (the next call end or the exit
        writes); a thread that finds another of its process writing skips at once. Fails open."""
        path = self._path
        if path is None or not self._writing.acquire(blocking=False):
            return
        try:
            self._written = monotonic()
            mine = self.section()
            self._flush_child_at_exit()
            self._lock_fd = lock = _open_lock(path)
            try:
                if _write_section(path, lock, stats_merge.section_key(os.getpid(), self._process_started), mine,
                                  CALL_LOCK_WAIT_S if lock_wait_s is None else lock_wait_s):
                    self._written_counts = {name: mine[name] for name in _FIELDS}
            finally:
                if fcntl is not None:
                    with suppress(OSError):
                        fcntl.flock(lock, fcntl.LOCK_UN)  # before forgetting it: a fork now leaves no held lock
                self._lock_fd = None
                os.close(lock)
        except Exception:  # a stats file we cannot write never affects a call
            log.debug("llmshim: could not write the stats file %s", path, exc_info=True)
        finally:
            self._writing.release()

    def _flush_child_at_exit(self) -> None:
        """A ``multiprocessing`` child started by fork ends with ``os._exit``: no ``atexit`` there, but
        multiprocessing's own finalizers run (they are cleared as the child starts, so this is
        registered by the child's first write)."""
        if self._flush_at_exit_of_child:
            return
        self._flush_at_exit_of_child = True
        multiprocessing = sys.modules.get("multiprocessing")
        if multiprocessing is not None and multiprocessing.parent_process() is not None:
            import multiprocessing.util

            multiprocessing.util.Finalize(None, self.write_if_changed, exitpriority=0)

    def after_fork_in_child(self) -> None:
        """A forked child is another process: its own locks (another thread may have held the
        parent's), its own section counting only its own calls (the parent's are in the parent's
        section: inherited counters would be counted twice), its own exit flush."""
        if self._lock_fd is not None:  # forked while another thread wrote: the flock is on the open file
            with suppress(OSError):   # the child shares; its copy would hold it for the child's lifetime
                os.close(self._lock_fd)
            self._lock_fd = None
        self._lock = threading.RLock()
        self._writing = threading.Lock()
        self.reset()
        self._process_started = self._started
        self._written = 0.0
        self._written_counts = dict(self._counts)
        self._flush_at_exit_of_child = False


#: How long a write inside a call waits for another process's write to end: not at all. The write
#: runs in the caller's thread, an event loop's thread in an asyncio program, which must never sleep
#: for a stats file; a write that finds the lock taken skips (a rewrite holds it about a millisecond,
#: so it is rare), and the next call end a second later, or the exit, writes.
CALL_LOCK_WAIT_S = 0.0
#: How long the write at exit waits: the last chance to count the process's calls.
EXIT_LOCK_WAIT_S = 2.0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie not yet reaped does). On Windows ``os.kill`` would
    end it: every process counts as alive there, nothing is folded."""
    if os.name == "nt":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True


def _locked(fd: int, wait_s: float) -> bool:
    """An exclusive ``flock`` on ``fd`` within ``wait_s``, polled (a blocking flock has no timeout)."""
    deadline = monotonic() + wait_s
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.01)


def _read_sections(path: str) -> tuple[dict[str, stats_merge.Section], stats_merge.Section]:
    """What the file holds. Missing: nothing yet. Unreadable, corrupt, truncated or not ours: a
    warning, and the file starts afresh (this process's write replaces it)."""
    try:
        with open(path, "rb") as handle:
            raw = json.loads(handle.read())
        sections, exited, _ = stats_merge.parse(raw)
        return sections, exited
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("llmshim: the stats file %s is not a readable llmshim stats file (%s); starting it afresh",
                    path, redact.scrub_text(str(exc))[:200])
    return {}, stats_merge.empty()


def _open_lock(path: str) -> int:
    """``<file>.lock``, the file writers ``flock`` (the stats file itself is replaced by each write:
    a lock on it would lock a file that is gone). Private, like the stats file."""
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    with suppress(OSError):
        if os.fstat(lock).st_mode & 0o077:
            os.fchmod(lock, 0o600)
    return lock


def _write_section(path: str, lock: int, key: str, section: stats_merge.Section, lock_wait_s: float) -> bool:
    """Read, merge (sections of processes that are gone fold into ``exited``), replace. False when
    the lock was not had in time."""
    if fcntl is not None and not _locked(lock, lock_wait_s):
        return False
    sections, exited = _read_sections(path)
    sections, exited = stats_merge.fold_exited({**sections, key: section}, exited, alive)
    document = stats_merge.document(sections, exited, os.getpid())
    tmp = f"{path}.{os.getpid()}.tmp"
    with suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash may have another mode: start afresh at 0600
    with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as handle:
        json.dump(document, handle)
    os.replace(tmp, path)
    return True


STATS = Stats()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=STATS.after_fork_in_child)
