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
import os
import threading
from contextlib import suppress
from typing import Any

from .. import redact
from ..call import Call
from ..clocks import monotonic, wall

__all__ = ["STATS", "Stats"]

_FIELDS = ("total_calls", "completed", "failed", "aborted", "cache_hits", "cache_misses", "cache_errors",
           "throttled_calls", "retries", "store_errors", "input_tokens", "output_tokens", "tokens_saved",
           "estimated_input_tokens", "estimated_output_tokens")


_OUTCOME_FIELDS: dict[str | None, str] = {"ok": "completed", "aborted": "aborted"}  # any other outcome counts as failed
_MODEL_FIELDS = ("calls", "input_tokens", "output_tokens", "tokens_saved", "estimated_tokens")


class Stats:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a reply collected inside ends its call here too
        self._writing = threading.Lock()
        self._at_exit = False
        self._path: str | None = None
        self._written = 0.0
        self.reset()
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

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            looked_up = counts["cache_hits"] + counts["cache_misses"]
            return {
                **counts,
                **self._money,
                "average_latency_s": self._latency_total / self._latency_count if self._latency_count else None,
                "cache_hit_rate": counts["cache_hits"] / looked_up if looked_up else None,
                "by_model": {redact.scrub_text(k): dict(v) for k, v in sorted(self._models.items())},
                "since": self._started,
                "pid": os.getpid(),
            }

    def write_to(self, path: str | None) -> None:
        self._path = path
        if path is not None and not self._at_exit:
            self._at_exit = True  # once per process: every install() calls this
            atexit.register(self.write_if_changed)

    def write_if_changed(self) -> None:
        """The write at exit, only when this process counted something since its last write: the
        master of a pre-fork server (gunicorn, celery, uvicorn --workers) makes no call, or made them
        before forking and wrote them then, and ends after its workers; its unchanged counters
        written last would replace the snapshot a worker wrote."""
        with self._lock:
            changed = self._counts != self._written_counts
        if changed:
            self.write()

    def write(self) -> None:
        """Atomically, readable by this user only (the file names the models and the volumes);
        one writer at a time: a thread that finds another writing skips, the next end writes."""
        path = self._path
        if path is None or not self._writing.acquire(blocking=False):
            return
        try:
            self._written = monotonic()
            snapshot = self.snapshot()
            tmp = f"{path}.{os.getpid()}.tmp"
            with suppress(FileNotFoundError):
                os.unlink(tmp)  # a leftover of a crash may have another mode: start afresh at 0600
            with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as handle:
                json.dump(snapshot, handle)
            os.replace(tmp, path)
            self._written_counts = {name: snapshot[name] for name in _FIELDS}
        except OSError:
            pass  # a stats file we cannot write never affects a call
        finally:
            self._writing.release()


STATS = Stats()
