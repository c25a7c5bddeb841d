"""Entries decoded lately (``store/decoded.py``): a hot key's hit skips the decoding, never the truth.

The oracle is a store that keeps nothing decoded, on the same file: whatever this process and
another one (a second store on the file) do to a key (store it again with another answer, the
same size or not, with or without a TTL; delete it, clear the file, purge, expire it), the store
that keeps decoded entries answers exactly as the oracle does.
"""

from __future__ import annotations

import threading
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.decoded import Decoded, held

KEYS = ["a" * 64, "b" * 64]
BODIES = st.sampled_from([b'{"answer": "red"}', b'{"answer": "blu"}', b'{"answer": "green, longer"}', b""])
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), BODIES, st.sampled_from([None, 5.0, 50.0]),
              st.booleans()),  # by this process or by the other one
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("clear"), st.booleans()),
    st.tuples(st.just("purge"), st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 10.0, 100.0])),
), max_size=25)


def _oracle(path: str) -> SQLiteStore:
    store = SQLiteStore(path)
    store._decoded = Decoded(max_entries=0)  # keeps nothing: every get reads and decodes the row
    return store


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ACTIONS)
@example([("put", KEYS[0], b'{"answer": "red"}', None, False), ("get", KEYS[0]),
          ("put", KEYS[0], b'{"answer": "blu"}', None, False), ("get", KEYS[0])])  # same size, same instant
@example([("put", KEYS[0], b'{"answer": "red"}', 5.0, True), ("get", KEYS[0]), ("tick", 10.0),
          ("get", KEYS[0])])  # expired while kept
def test_a_store_keeping_decoded_entries_answers_as_one_that_keeps_none(tmp_path: Path, actions: list) -> None:
    path = str(tmp_path / f"c{abs(hash(tuple(map(str, actions))))}.sqlite3")
    ours, other, oracle = SQLiteStore(path), SQLiteStore(path), _oracle(path)
    now, created = 1000.0, 0.0
    try:
        for action in actions:
            kind = action[0]
            if kind == "put":
                _, key, body, ttl, by_other = action
                created += 1.0 if by_other else 0.0  # the other process may write in the same instant
                entry = Entry(key, 200, [("content-type", "application/json"), ("x-n", str(len(body)))], body,
                              now + created * 1e-9, now + ttl if ttl else None, {"status": 200, "usage": {}})
                (other if by_other else ours).put(entry, now)
            elif kind == "get":
                got, truth = ours.get(action[1], now), oracle.get(action[1], now)
                assert (got is None) == (truth is None)
                if got is not None and truth is not None:
                    assert got == truth and got.outcome == truth.outcome
            elif kind == "delete":
                with other._write() as conn:
                    conn.execute("DELETE FROM entries WHERE key = ?", (action[1],))
            elif kind == "clear":
                (other if action[1] else ours).clear()
            elif kind == "purge":
                (other if action[1] else ours).purge_expired(now)
            else:
                now += action[1]
        for key in KEYS:
            assert ours.get(key, now) == oracle.get(key, now)
    finally:
        for store in (ours, other, oracle):
            store.close()


def test_the_same_size_written_again_in_the_same_instant_by_another_process_is_not_mistaken(tmp_path: Path) -> None:
    """The stamp is (created_at, size): another answer of the same size written at another time
    is read whole again."""
    path = str(tmp_path / "c.sqlite3")
    ours, other = SQLiteStore(path), SQLiteStore(path)
    key = "c" * 64
    ours.put(Entry(key, 200, [], b'{"a": "red"}', 1.0, None, {"status": 200}), 1.0)
    assert ours.get(key, 2.0).body == b'{"a": "red"}'  # type: ignore[union-attr]
    other.put(Entry(key, 200, [], b'{"a": "blu"}', 1.5, None, {"status": 200}), 1.5)
    assert ours.get(key, 2.0).body == b'{"a": "blu"}'  # type: ignore[union-attr]
    ours.close(), other.close()


def test_decoded_entries_are_bounded_by_count_bytes_and_entry_size() -> None:
    decoded = Decoded(max_entries=3, max_bytes=100, max_entry_bytes=60)

    def entry(key: str, size: int) -> Entry:
        return Entry(key, 200, [], b"x" * size, 1.0, None, {})

    decoded.keep((1.0, 10), entry("big", 61))
    assert decoded.get("big") is None  # above the per-entry bound: not kept
    for key in "abcd":
        decoded.keep((1.0, 10), entry(key, 10))
    assert [k for k in "abcd" if decoded.get(k)] == ["b", "c", "d"]  # the oldest dropped first
    decoded.keep((1.0, 60), entry("e", 60))
    decoded.keep((1.0, 50), entry("f", 50))
    assert decoded._bytes <= 100 and len(decoded._entries) <= 3
    assert decoded._bytes == sum(held(*kept) for kept in decoded._entries.values())
    decoded.keep((2.0, 50), entry("f", 40))  # kept again: counted once
    assert decoded._bytes == sum(held(*kept) for kept in decoded._entries.values())


def test_threads_keeping_and_reading_at_once_keep_the_byte_count_true(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite3")
    store = SQLiteStore(path)
    store._decoded = Decoded(max_entries=16, max_bytes=2000)
    keys = [f"{i:064x}" for i in range(40)]
    for i, key in enumerate(keys):
        store.put(Entry(key, 200, [("n", str(i))], b"y" * (i * 7), 1.0 + i, None, {"status": 200}), 1.0)
    errors: list[BaseException] = []

    def read(offset: int) -> None:
        try:
            for n in range(400):
                key = keys[(n * 7 + offset) % len(keys)]
                found = store.get(key, 2.0)
                assert found is not None and found.headers == [("n", str(keys.index(key)))]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    decoded = store._decoded
    assert decoded._bytes == sum(held(*kept) for kept in decoded._entries.values()) <= 2000
    store.close()
