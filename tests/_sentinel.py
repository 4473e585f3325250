"""Redis Sentinel for tests: ``running_group()`` (what a ``sentinel_group`` fixture yields) is a
real primary, one replica and 3 sentinels on loopback (:mod:`stress.sentinel`);
``master_for()`` a client for it, configured as docs/running-redis.md advises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from stress.redis_server import server_binary
from stress.sentinel import SERVICE, SentinelGroup

from _servers import in_ci


def require_redis_server() -> None:
    """Skip the test (fail it on CI) without a redis-server binary."""
    if server_binary() is None:
        if in_ci():
            pytest.fail("[CI] no redis-server binary on PATH", pytrace=False)
        pytest.skip("no redis-server binary on PATH")


@contextlib.contextmanager
def running_group() -> Iterator[SentinelGroup]:
    """A started :class:`SentinelGroup`, closed (every process gone) afterwards. A group whose
    sentinels do not agree within 40 s is closed and another one started, once (on CI, with
    four test processes starting and failing over groups at once, a group's sentinels once
    never agreed in 60 s; what each said is printed)."""
    require_redis_server()
    for attempt in (1, 2):
        group = SentinelGroup(agree_timeout=40.0)
        try:
            group.__enter__()
        except RuntimeError as exc:
            if attempt == 2 or "sentinels to agree" not in str(exc):
                raise
            print(f"a Sentinel group did not start, starting another: {exc}")
            continue
        try:
            yield group
        finally:
            group.close()
        return


def master_for(group: SentinelGroup, **kwargs: Any) -> redis.Redis:
    """``Sentinel(...).master_for(...)`` as docs/running-redis.md configures it."""
    sentinel = Sentinel(group.addresses, socket_timeout=0.5, socket_connect_timeout=0.5)
    options: dict[str, Any] = {
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.5,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "retry_on_error": [RedisConnectionError],
        **kwargs,
    }
    client: redis.Redis = sentinel.master_for(SERVICE, **options)
    return client


def async_master_for(group: SentinelGroup, **kwargs: Any) -> Any:
    """``redis.asyncio.sentinel.Sentinel(...).master_for(...)``, configured as
    :func:`master_for` (its ``Retry`` is redis.asyncio's, whose attempts are awaited)."""
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    sentinel = AsyncSentinel(group.addresses, socket_timeout=0.5, socket_connect_timeout=0.5)
    options: dict[str, Any] = {
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.5,
        "retry": AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "retry_on_error": [RedisConnectionError],
        **kwargs,
    }
    return sentinel.master_for(SERVICE, **options)
