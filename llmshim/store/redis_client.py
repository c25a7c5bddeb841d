"""How to reach a Redis, and how not to wait for one that does not answer.

``connect`` builds the redis-py client for a :class:`~.redis_url.RedisTarget` (one server, a
Cluster or a Sentinel-managed master; the URL forms are ``redis_url.py``'s). ``Guarded`` runs every
operation through a circuit breaker (``breaker.py``) and builds the client lazily, so install()
never waits for Redis. A ``redis://`` URL that turns out to point at a Cluster node (it answers
``MOVED``) is switched to the Cluster client, as redis-py's ``RedisCluster.from_url`` would take it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from ..clocks import monotonic
from .breaker import LEASE, Breaker
from .redis_url import RedisTarget, join_host, parse_redis_url

__all__ = ["Guarded", "RedisUnavailable", "connect", "is_outage"]

log = logging.getLogger("llmshim")
T = TypeVar("T")

def _node_kwargs(target: RedisTarget, host: str, port: int) -> dict[str, Any]:
    """redis-py's own parsing of the query options (types, TLS), for one data node."""
    from redis.connection import parse_url

    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in target.query if not k.startswith("sentinel_"))
    url = f"{'rediss' if target.tls else 'redis'}://{join_host(host, port)}/0" + (f"?{query}" if query else "")
    parsed: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "db"):
        parsed.pop(name, None)
    if target.username is not None:
        parsed["username"] = target.username
    if target.password is not None:
        parsed["password"] = target.password
    return parsed


def connect(target: RedisTarget, timeout: float) -> Any:
    """A redis-py client for the target: short timeouts, at most one retry (a stale pooled
    connection after a restart or failover; timeouts are not retried), no health-check round trips."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeouts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if target.kind == "single":
        return redis.Redis.from_url(target.url, health_check_interval=0, **timeouts,
                                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
    if target.kind == "cluster":
        from redis.cluster import ClusterNode

        RedisCluster, retry = _cluster_client(), _one_timeout_retry()
        if not target.nodes:  # a redis:// URL whose server answered MOVED: redis-py's own reading of it
            return RedisCluster(url=target.url, require_full_coverage=False, retry=retry, **timeouts)
        first, *others = target.nodes
        kwargs = _node_kwargs(target, *first)
        if kwargs.pop("connection_class", None) is not None:
            kwargs["ssl"] = True
        seeds = [ClusterNode(h, p) for h, p in others]  # type: ignore[no-untyped-call]
        return RedisCluster(host=first[0], port=first[1], startup_nodes=seeds, require_full_coverage=False,
                            retry=retry, **{**kwargs, **timeouts})
    from redis.sentinel import Sentinel

    options = dict(target.query)
    sentinel_auth = {k[len("sentinel_"):]: options[k] for k in ("sentinel_username", "sentinel_password")
                     if k in options}
    sentinel_kwargs = {**timeouts, **sentinel_auth, **({"ssl": True} if target.tls else {})}
    kwargs = _node_kwargs(target, *target.nodes[0])
    kwargs.pop("connection_class", None)
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service or "mymaster", db=target.db, health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        **({"ssl": True} if target.tls else {}), **{**kwargs, **timeouts})


_CLUSTER_CLIENT: Any = None


def _cluster_client() -> Any:
    """redis-py's ``RedisCluster``, except that a timed-out command is not sent again. Its own
    retry loop (``retry``'s count, for any error in ``ERRORS_ALLOW_RETRY``, whatever the
    ``Retry``'s ``supported_errors`` say) would send a command to a node that did not answer in
    ``LLMSHIM_REDIS_TIMEOUT`` a second time: two timeouts for one operation. A connection error
    (a master gone in a failover) is still retried once, on the refreshed slot map."""
    global _CLUSTER_CLIENT
    if _CLUSTER_CLIENT is None:
        from redis.cluster import RedisCluster
        from redis.exceptions import TimeoutError

        class OneTimeoutCluster(RedisCluster):
            ERRORS_ALLOW_RETRY = tuple(  # type: ignore[assignment]
                error for error in RedisCluster.ERRORS_ALLOW_RETRY if error is not TimeoutError)

        _CLUSTER_CLIENT = OneTimeoutCluster
    return _CLUSTER_CLIENT


def _one_timeout_retry() -> Any:
    """The Cluster client's ``Retry``: one more try after a connection error, none after a timeout.
    redis-py's Cluster transactions (the MULTI the cache writes fall back to when scripts are
    refused) retry with a copy of it, to which they add ``RedisCluster.ERRORS_ALLOW_RETRY`` by
    name, TimeoutError included: a MULTI sent to a master that did not answer went again."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    class OneTimeoutRetry(Retry):
        def update_supported_errors(self, specified_errors: Any) -> None:
            super().update_supported_errors(
                [error for error in specified_errors if not issubclass(error, redis.TimeoutError)])

    return OneTimeoutRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def is_outage(exc: BaseException) -> bool:
    """Did the store fail to answer (count it against the breaker), or did it answer with an error?
    Connection trouble, timeouts, a Cluster without a master for the slot, no Sentinel master: outage.
    A reply such as WRONGTYPE or OOM, or bad data, came from a live server: not an outage."""
    import redis.exceptions as e

    return isinstance(exc, (e.ConnectionError, e.TimeoutError, OSError, e.RedisClusterException,
                            e.ClusterDownError, e.TryAgainError))


def _is_redirect(exc: BaseException) -> bool:
    import redis.exceptions as e

    return isinstance(exc, e.AskError) or (isinstance(exc, e.ResponseError) and str(exc).startswith(("MOVED", "ASK")))


class RedisUnavailable(ConnectionError):
    """Refused without asking Redis: the breaker is open after failures in a row."""


_GUARDS: weakref.WeakSet[Guarded] = weakref.WeakSet()


def probe_lease(target: RedisTarget, timeout: float) -> float:
    """How long a probe is out before another may go: longer than one can take, so probes never
    overlap. A PING is a connect and a read (one timeout each); on Sentinel or a Cluster finding
    the node first asks each Sentinel or seed in turn (one timeout each at most); plus one spare."""
    return max(LEASE, (len(target.nodes) + 3) * timeout)


class Guarded:
    """One Redis target behind a circuit breaker: ``run(op)`` calls ``op(client)``, or raises
    RedisUnavailable at once while the breaker is open. The client is built on first use (and
    rebuilt as a Cluster client when a ``redis://`` server answers MOVED)."""

    def __init__(self, url: str, timeout: float = 0.05, clock: Callable[[], float] = monotonic,
                 breaker: Breaker | None = None) -> None:
        self.target = parse_redis_url(url)
        self.timeout, self.clock = timeout, clock
        self.breaker = breaker or Breaker(lease=probe_lease(self.target, timeout))
        self.attempts = 0  # operations that went to Redis (the breaker let them through)
        self.probe: threading.Thread | None = None  # the last background probe
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._closed = False  # close() retired it: an operation finishing late builds no client again
        self._lock = threading.Lock()
        self._warned_at: float | None = None
        _GUARDS.add(self)

    @property
    def client(self) -> Any:
        """The redis-py client (built now if need be): for tools and tests; calls go through run()."""
        if self._client is None:
            if self._closed:
                raise RedisUnavailable(f"Redis ({self.target.describe()}): the store was closed")
            self._client = connect(self.target, self.timeout)
            self._scripts = {}
        return self._client

    def script(self, source: str) -> Any:
        """The client's Script object for this Lua source (EVALSHA, loading it on NOSCRIPT)."""
        client = self.client
        if source not in self._scripts:
            self._scripts[source] = client.register_script(source)
        return self._scripts[source]

    def run(self, op: Callable[[Any], T]) -> T:
        """``op(client)``'s result; its exception, or RedisUnavailable at once while the breaker is open.
        When a probe is due it is a PING on a thread of its own, so no call waits for a Redis that
        may still not answer: this call falls back, and the calls after a good PING use Redis."""
        if self._closed:  # a read queued before uninstall() that runs after: no connection is opened
            raise RedisUnavailable(f"Redis ({self.target.describe()}): the store was closed")
        start = self.clock()
        with self._lock:
            allowed = self.breaker.allow(start)
            probe = allowed and self.breaker.probing_since is not None
            self.attempts += allowed
        if not allowed or (probe and self._probe_in_background()):
            raise RedisUnavailable(f"Redis ({self.target.describe()}) skipped after {self.breaker.threshold} "
                                   "slow failures in a row; probed again in the background")
        return self._call(op, start)

    def _call(self, op: Callable[[Any], T], start: float) -> T:
        try:
            try:
                result = op(self.client)
            except Exception as exc:
                if self.target.kind != "single" or self.target.url.startswith("unix") or not _is_redirect(exc):
                    raise
                self._become_cluster()  # a Cluster node behind a redis:// URL: follow the Cluster
                result = op(self.client)
        except Exception as exc:
            self._record(exc, start)
            raise
        with self._lock:
            recovered = self.breaker.succeeded()
        if recovered:
            log.warning("llmshim: Redis (%s) answers again; using it", self.target.describe())
        return result

    def _probe_in_background(self) -> bool:
        def probe() -> None:
            with contextlib.suppress(Exception):  # the outcome is recorded on the breaker
                self._call(lambda client: client.ping(), self.clock())

        thread = threading.Thread(target=probe, name="llmshim-redis-probe", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the interpreter is shutting down: this call is the probe
            return False
        self.probe = thread
        return True

    def _become_cluster(self) -> None:
        old, self._client = self._client, None
        self.target = dataclasses.replace(self.target, kind="cluster")
        if old is not None:
            old.close()

    def _record(self, exc: Exception, start: float) -> None:
        if self._closed:
            return  # an operation that outlived close(): nothing to learn about Redis from it
        if not is_outage(exc):
            with self._lock:
                self.breaker.succeeded()  # it answered: an error reply is not an outage
            return
        now = self.clock()
        with self._lock:
            opened = self.breaker.failed(now, now - start)
            cooldown = self.breaker.cooldown
        if opened and (self._warned_at is None or now - self._warned_at >= 60):
            self._warned_at = now
            log.warning("llmshim: Redis (%s) did not answer (%s: %s); not asking it for %.1f s, then one call "
                        "probes it (the calls go on with local fallbacks; warned once a minute)",
                        self.target.describe(), type(exc).__name__, exc, cooldown)

    def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _after_fork(self) -> None:
        """In a fork child: locks of its own, and a new client on first use. redis-py's pool, on
        its first use in a child, resets itself under a lock it inherited; when a parent's thread
        held that lock at the fork (in the middle of taking or returning a connection), every Redis
        operation of the child waited for ever. The parent's client is kept here, never used,
        closed or collected (closing it would wait for that same lock)."""
        self._lock = threading.Lock()
        if self._client is not None:
            _INHERITED.append(self._client)
            self._client, self._scripts = None, {}


_INHERITED: list[Any] = []  # a fork child's parent clients (see Guarded._after_fork)


def _reset_locks_in_child() -> None:
    for guard in list(_GUARDS):
        guard._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_in_child)
