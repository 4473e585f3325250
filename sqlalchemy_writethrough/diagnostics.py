"""What to say when Redis fails: which server, what it answered, and what to do about it.

A log line that says only ``AuthenticationError`` sends its reader to the source; one that says
which Redis answered what, and the likely remedy, does not. Passwords never appear: the address
is built from the host, port, database or socket path alone.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ConnectionError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

#: remedies for error replies, by the first word of the server's message
_HINTS = {
    "MOVED": "a Redis Cluster slot is served by another node (a resharding or a failover); "
    "given a plain client, the cache switches to the cluster once INFO confirms it",
    "ASK": "a Redis Cluster slot is being migrated to another node",
    "CROSSSLOT": "this Redis is a Cluster node: pass a redis.cluster.RedisCluster client",
    "CLUSTERDOWN": "the Redis Cluster serves no slot here until a failed primary's replica "
    "is promoted (cluster-node-timeout)",
    "TRYAGAIN": "a Redis Cluster slot is being migrated; the call is retried a few times",
    "READONLY": "this Redis is a replica: point the cache at the primary",
    "OOM": "Redis reached maxmemory under a noeviction policy: use volatile-lru or allkeys-lru "
    "(an evicted entry is a miss), or give it more memory",
    "NOPERM": "the ACL user lacks a command or key permission the cache needs: "
    "EVALSHA, SCRIPT|LOAD, MGET, HSET, HKEYS, SCAN, UNLINK, PING, INFO, and inside its scripts "
    "GET, SET, DEL, PTTL, TIME, HGET, HGETALL, HDEL, INFO, on the keys of its prefix; with the "
    "near cache, "
    "SUBSCRIBE and PUBLISH on the channel <prefix>:near (docs/running-redis.md)",
    "NOAUTH": "Redis requires a password: put it in the URL (redis://user:password@host/0)",
    "WRONGPASS": "the username or password in the URL is wrong",
    "BUSY": "a script or command is blocking Redis",
    "LOADING": "Redis is loading its data set after a restart",
    "MASTERDOWN": "the replica lost its primary",
    "NOREPLICAS": "the primary has fewer in-sync replicas than its min-replicas-to-write: "
    "it refuses every write until they catch up (docs/running-redis.md)",
}


def redis_address(client: Any) -> str:
    """``host:port/db`` (or the socket path) of a client's server, never its credentials."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    service = getattr(pool, "service_name", None)
    if service:
        return f"sentinel service {service!r}"
    path = kwargs.get("path")
    if path:
        where = str(path)
    else:
        host = kwargs.get("host", "localhost")
        host = f"[{host}]" if ":" in str(host) else str(host)
        where = f"{host}:{kwargs.get('port', 6379)}"
    db = kwargs.get("db", 0)
    return f"{where}/{db}" if db else where


def explain(exc: BaseException) -> str:
    """The error's kind and the server's own message, with a remedy when one is known."""
    message = str(exc).strip()
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    hint = hint_for(exc)
    return f"{text} ({hint})" if hint else text


def hint_for(exc: BaseException) -> str | None:
    """A remedy for errors that are configuration, not weather (None for those that pass)."""
    word = str(exc).strip().split(" ", 1)[0].upper() if str(exc).strip() else ""
    if word in _HINTS:
        return _HINTS[word]
    if "can't run this command" in str(exc) or "no permissions" in str(exc):
        return _HINTS["NOPERM"]  # a refusal inside a script carries no error code
    # redis-py strips the error code of the replies it has a class for
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return _HINTS[code]
    return None


_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (AskError, "MOVED"),  # MovedError too
    (ClusterDownError, "CLUSTERDOWN"),
    (ClusterCrossSlotError, "CROSSSLOT"),
    (AuthenticationError, "WRONGPASS"),
    (NoPermissionError, "NOPERM"),
    (AuthorizationError, "NOPERM"),
    (ReadOnlyError, "READONLY"),
    (OutOfMemoryError, "OOM"),
    (BusyLoadingError, "LOADING"),
)


def is_configuration_error(exc: BaseException) -> bool:
    """True for errors that will not pass by themselves: the server answered, with a refusal
    (as opposed to a timeout or a lost connection)."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return False  # weather: BusyLoadingError too
    return isinstance(exc, ResponseError)


def is_cluster_reply(exc: BaseException) -> bool:
    """True for the refusals only a Redis Cluster node gives."""
    if isinstance(exc, (AskError, ClusterDownError, ClusterCrossSlotError)):  # MovedError too
        return True
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return text.split(" ", 1)[0] in ("MOVED", "ASK", "CROSSSLOT", "CLUSTERDOWN") or (
        "cluster mode" in text or "the same slot" in text
    )
