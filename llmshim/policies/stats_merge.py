"""The stats file of a program of many processes, in pure code: sections, their merge, the file's
document.

Every process that counts calls (gunicorn/uvicorn workers, celery children, multiprocessing
workers, ``llmshim run`` subprocesses) writes its own *section* of ``LLMSHIM_STATS_FILE``: its
``llmshim.stats()`` counters plus the two latency sums an average needs. A section is keyed by
``"<pid>:<process start>"``, so a pid the system reuses for another process is another key. The
document a writer leaves holds every section, one ``exited`` section (the sections of processes
that are gone, folded together so that days of worker recycling do not grow the file), and the
totals over all of them at the top level, where a single-process snapshot had its numbers: readers
of the old format read the program's totals.

``merge`` is a sum (counts, tokens, costs, latency sums, per model; the earliest ``since``), so it is
associative and commutative and folding sections never changes the totals. Costs stay None until
some call was priced, as in ``stats()``. Nothing here touches a file or the clock: ``stats.py``
writes, ``llmshim stats`` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["FIELDS", "FORMAT", "MODEL_FIELDS", "MONEY", "Document", "NotStats", "Section", "derive", "document",
           "empty", "fold_exited", "merge", "parse", "pid_of", "section_key", "totals"]

FORMAT = "llmshim-stats/2"
FIELDS = ("total_calls", "completed", "failed", "aborted", "cache_hits", "cache_misses", "cache_errors",
          "throttled_calls", "retries", "store_errors", "input_tokens", "output_tokens", "tokens_saved",
          "estimated_input_tokens", "estimated_output_tokens")
MONEY = ("cost_usd", "saved_cost_usd", "estimated_cost_usd")
MODEL_FIELDS = ("calls", "input_tokens", "output_tokens", "tokens_saved", "estimated_tokens")
MODEL_MONEY = ("cost_usd", "saved_cost_usd")
_LATENCY = ("latency_count", "latency_total_s")

Section = dict[str, Any]
Document = dict[str, Any]


class NotStats(ValueError):
    """The file holds JSON, but not an llmshim stats snapshot (or a damaged one)."""


def section_key(pid: int, started: float) -> str:
    return f"{pid}:{started!r}"


def pid_of(key: str) -> int | None:
    head = key.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def _money(a: object, b: object) -> float | None:
    """None + None is None (nothing priced), otherwise the sum of what was priced."""
    if a is None and b is None:
        return None
    return (a if isinstance(a, (int, float)) else 0.0) + (b if isinstance(b, (int, float)) else 0.0)


def _add_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return {**{f: a.get(f, 0) + b.get(f, 0) for f in MODEL_FIELDS},
            **{f: _money(a.get(f), b.get(f)) for f in MODEL_MONEY}}


def empty() -> Section:
    return {**dict.fromkeys(FIELDS, 0), **dict.fromkeys(MONEY), "latency_count": 0, "latency_total_s": 0.0,
            "by_model": {}, "since": None, "processes": 0}


def _add(a: Section, b: Section) -> Section:
    models = dict(a["by_model"])
    for name, counts in b["by_model"].items():
        models[name] = _add_model(models.get(name, {}), counts)
    starts = [s for s in (a["since"], b["since"]) if s is not None]
    return {**{f: a[f] + b[f] for f in (*FIELDS, *_LATENCY, "processes")},
            **{f: _money(a[f], b[f]) for f in MONEY},
            "by_model": dict(sorted(models.items())), "since": min(starts) if starts else None}


def merge(sections: Iterable[Section]) -> Section:
    """The sum of ``sections`` (of normalised sections: ``parse`` and ``Stats.section`` make them)."""
    total = empty()
    for section in sections:
        total = _add(total, section)
    return total


def derive(section: Section) -> dict[str, Any]:
    """A section as ``stats()`` shows numbers: the latency sums become an average weighted by the
    calls timed, the hit rate comes from the summed hits and misses."""
    looked_up = section["cache_hits"] + section["cache_misses"]
    count = section["latency_count"]
    return {**{f: section[f] for f in (*FIELDS, *MONEY)},
            "average_latency_s": section["latency_total_s"] / count if count else None,
            "cache_hit_rate": section["cache_hits"] / looked_up if looked_up else None,
            "by_model": section["by_model"], "since": section["since"]}


def fold_exited(sections: Mapping[str, Section], exited: Section,
                alive: Callable[[int], bool]) -> tuple[dict[str, Section], Section]:
    """Sections of processes still alive, and ``exited`` with the others added. A key without a
    pid (not written by llmshim) counts as exited: its numbers are kept, its key is not."""
    kept: dict[str, Section] = {}
    gone = [exited]
    for key, section in sections.items():
        pid = pid_of(key)
        if pid is not None and alive(pid):
            kept[key] = section
        else:
            gone.append(section)
    return kept, merge(gone)


def totals(sections: Mapping[str, Section], exited: Section) -> Section:
    return merge([exited, *sections.values()])


def document(sections: Mapping[str, Section], exited: Section, writer: int) -> Document:
    """What a writer leaves in the file: the totals at the top (as a single-process snapshot had
    them), ``pid`` the process that wrote last, the sections and the exited aggregate."""
    total = totals(sections, exited)
    return {**derive(total), "pid": writer, "format": FORMAT, "process_count": total["processes"],
            "processes": {key: sections[key] for key in sorted(sections)}, "exited": exited}


# -- reading: anything the file may hold, checked ---------------------------------------------------
def _number(value: object, name: str, integral: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
        raise NotStats(f"{name} is {value!r}, not a number")
    return value


def _section(raw: object, legacy: bool = False) -> Section:
    """A section read from the file, checked field by field (a damaged file is refused, not summed).
    A ``legacy`` single-process snapshot (llmshim before sections) has an average, no sums: the
    calls that ended stand for the calls timed."""
    if not isinstance(raw, dict):
        raise NotStats("a section is not an object")
    section = empty()
    for field in FIELDS:
        section[field] = _number(raw.get(field, 0), field, True)
    for field in MONEY:
        section[field] = None if raw.get(field) is None else float(_number(raw[field], field, False))
    if legacy:
        ended = section["completed"] + section["failed"] + section["aborted"]
        average = raw.get("average_latency_s")
        section["latency_count"] = ended if average is not None else 0
        section["latency_total_s"] = float(_number(average, "average_latency_s", False)) * ended if average else 0.0
        section["processes"] = 1
    else:
        section["latency_count"] = _number(raw.get("latency_count", 0), "latency_count", True)
        section["latency_total_s"] = float(_number(raw.get("latency_total_s", 0.0), "latency_total_s", False))
        section["processes"] = _number(raw.get("processes", 1), "processes", True)
    models = raw.get("by_model") or {}
    if not isinstance(models, dict):
        raise NotStats("by_model is not an object")
    for name, counts in sorted(models.items()):
        if not isinstance(counts, dict):
            raise NotStats(f"by_model[{name!r}] is not an object")
        section["by_model"][name] = {
            **{f: _number(counts.get(f, 0), f, True) for f in MODEL_FIELDS},
            **{f: None if counts.get(f) is None else float(_number(counts[f], f, False)) for f in MODEL_MONEY}}
    since = raw.get("since")
    section["since"] = None if since is None else float(_number(since, "since", False))
    return section


def parse(raw: object) -> tuple[dict[str, Section], Section, bool]:
    """The sections, the exited aggregate, and whether the file was a legacy single-process
    snapshot (then it is one section, in ``exited``: its process wrote it whole, as a process of
    an older llmshim does). Raises ``NotStats`` for JSON that is not ours or is damaged."""
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        sections = raw.get("processes")
        if not isinstance(sections, dict):
            raise NotStats("processes is not an object")
        exited = raw.get("exited")
        return ({str(k): _section(v) for k, v in sections.items()},
                empty() if exited is None else _section(exited), False)
    if isinstance(raw, dict) and "total_calls" in raw and "format" not in raw:
        return {}, _section(raw, legacy=True), True
    raise NotStats("not an llmshim stats snapshot")
