"""Stores: WHERE llmshim keeps things, and how each is reached. No policy logic lives here.

- ``base``: the cache ``Entry`` and the two protocols the policies use (``CacheStore``, ``LimitStore``).
- ``cache_keys``: what is in a cache key (pure: a call in, an HMAC out).
- ``cache_sqlite``: the cache in one SQLite file (the default); ``cache_redis``: the cache on Redis,
  and ``TieredStore`` (a local SQLite front, Redis behind).
- ``limits_sqlite``: the rate-limit budget shared by the processes of one machine;
  ``limits_redis``: the budget shared by every machine.
- ``sqlite_files``: the one way llmshim opens a SQLite file (private modes, pragmas, WAL, fork
  safety, read-only media, per-thread connections closable from any thread).
- ``redis_url``: which Redis a URL names (single server, Cluster, Sentinel; pure);
  ``redis_client``: the guarded client that reaches it; ``breaker``: the circuit breaker in front of it.
- ``background``: store writes queued off event loops.
"""
