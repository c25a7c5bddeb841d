"""Which Redis a URL names: one server, a Cluster or a Sentinel-managed master (pure parsing).

URL forms (the first two are redis-py's own; the others the conventions its ecosystem uses —
redis+sentinel:// as in RedisVL, LangChain and Prefect; redis+cluster:// as in Renovate):

    redis://[user:pass@]host[:port][/db]                       one server (rediss:// TLS, unix:// socket)
    redis+cluster://[user:pass@]host[:port][,host2[:port2]...]    a Redis Cluster (rediss+cluster:// TLS)
    redis+sentinel://[user:pass@]host[:port][,host2...]/service[/db]   the master Sentinel names
                                                               (rediss+sentinel:// TLS; port 26379)

Query options (``?socket_keepalive=true``...) are redis-py's, for the data nodes; on a Sentinel URL
``sentinel_username`` / ``sentinel_password`` authenticate to the Sentinels themselves.

:func:`parse_redis_url` checks the form and returns a :class:`RedisTarget`; configuration calls it,
so a bad URL is a ConfigError at install, and its message never repeats the URL (it may hold a
password). How a target is reached is ``redis_client.py``.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, unquote

__all__ = ["RedisTarget", "join_host", "parse_redis_url"]

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_FORMS = ("redis://host:port/db, rediss://..., unix:///path/redis.sock, redis+cluster://host:port[,host:port...], "
          "or redis+sentinel://host:port[,host:port...]/service[/db]")


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    kind: str  # "single", "cluster" or "sentinel"
    url: str = dataclasses.field(repr=False)  # as given: it may hold a password, never shown
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seeds, or the Sentinels
    service: str | None = None  # the Sentinel service (master) name
    db: int = 0
    username: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)
    query: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)

    def describe(self) -> str:
        """Where, without credentials: for stats, warnings and doctor."""
        if not self.nodes:  # redis://, rediss://, unix:// (also when found to be a Cluster node)
            return _without_credentials(self.url)
        hosts = ",".join(join_host(host, port) for host, port in self.nodes)
        scheme = self.url.split("://", 1)[0]
        return f"{scheme}://{hosts}" + (f"/{self.service}/{self.db}" if self.kind == "sentinel" else "")


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path.partition("?")[0]


def join_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("a host as [v6-address]:port")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("a host name in every host:port")
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("a port number from 1 to 65535")
        return host, int(port_text)
    return host, default_port


def parse_redis_url(text: str) -> RedisTarget:
    """The target a URL names. Raises ValueError (whose message never repeats the URL) when malformed."""
    lowered = text[:20].lower()
    if lowered.startswith(SINGLE_SCHEMES):
        if len(text.split("://", 1)[1]) == 0:
            raise ValueError(_FORMS)
        return RedisTarget("single", text, tls=lowered.startswith("rediss://"))
    if not lowered.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        raise ValueError(_FORMS)
    kind = "cluster" if lowered.startswith(CLUSTER_SCHEMES) else "sentinel"
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    default_port = 6379 if kind == "cluster" else 26379
    nodes = tuple(_split_host(part, default_port) for part in hosts.split(",") if part)
    if not nodes:
        raise ValueError(f"at least one host:port ({_FORMS})")
    segments = [unquote(s) for s in path.split("/") if s]
    service, db = None, 0
    if kind == "sentinel":
        if not segments:
            raise ValueError("the Sentinel service name: redis+sentinel://host:26379/SERVICE[/db]")
        service, segments = segments[0], segments[1:]
    if len(segments) > 1 or (segments and (not segments[0].isascii() or not segments[0].isdigit())):
        raise ValueError("a database number after the last /")
    db = int(segments[0]) if segments else 0
    if kind == "cluster" and db:
        raise ValueError("database 0: a Redis Cluster has no other")
    return RedisTarget(kind, text, lowered.startswith("rediss+"), nodes, service, db, username, password,
                       tuple(parse_qsl(query, keep_blank_values=True)))
