"""Closing a cache with a near cache is quiet and leaves no thread behind, whatever the
heartbeat interval (a quarter of ``staleness``): ``close()`` / ``aclose()`` return once the
subscriber thread has ended, and closing the client afterwards (the caller's, whose pool the
subscription's connection came from) logs nothing.

Before the fix the thread waited for its next heartbeat before it saw the stop: ``close()``
gave up joining it after 2 s and returned with the thread still reading, ``aclose()`` did not
wait at all; the caller then closed the client, and the thread logged "near cache
subscription ... failed: ValueError: I/O operation on closed file"."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio

from sqlalchemy_writethrough import NearCacheOptions, WriteThroughCache

#: a heartbeat every 5 s: longer than close() waits for the thread
SLOW_HEARTBEAT = NearCacheOptions(staleness=20.0)
NAME = "writethrough-near-cache"


def _subscribed(cache: WriteThroughCache) -> None:
    """Wait until the subscriber confirmed its subscription (it is then in its read loop)."""
    near = cache._near
    assert near is not None
    deadline = time.monotonic() + 10
    while not near.serving():
        assert time.monotonic() < deadline, "the near cache never subscribed"
        time.sleep(0.01)


def _near_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == NAME and t.is_alive()]


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sqlalchemy_writethrough" and r.levelno >= logging.WARNING
    ]


def test_close_ends_the_subscriber_then_closing_the_client_is_quiet(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = _near_threads()
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_writethrough"):
        cache = WriteThroughCache(
            client, prefix=prefix, stats_interval=None, near_cache=SLOW_HEARTBEAT
        )
        _subscribed(cache)
        cache.close()
        left = [t for t in _near_threads() if t not in before]
        client.close()  # the caller's client, the subscription's connection among its pool's
        for thread in left:  # (before the fix) what the thread logs when it wakes
            thread.join(10)
    assert left == []
    assert _loud(caplog) == []


def test_aclose_ends_the_subscriber_and_its_twin_client(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``redis.asyncio`` client's subscriber runs on a sync twin of its own: ``aclose()``
    returns once the thread has ended and closed the twin."""
    before = _near_threads()

    async def main() -> tuple[list[threading.Thread], Any]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=1)
        cache = WriteThroughCache(
            client, prefix=prefix, stats_interval=None, near_cache=SLOW_HEARTBEAT
        )
        await asyncio.to_thread(_subscribed, cache)
        await cache.aclose()
        left = [t for t in _near_threads() if t not in before]
        await client.aclose()
        near = cache._near
        assert near is not None
        return left, near.source.client

    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_writethrough"):
        left, twin = asyncio.run(main())
    assert left == []
    assert twin is None  # the twin the thread built was closed with it
    assert _loud(caplog) == []


def test_close_with_a_stalled_redis_is_quiet_and_leaves_no_thread(
    server: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops answering (SIGSTOP) while the subscriber waits for its heartbeat's reply:
    close() still ends the thread, the client closed after it, and nothing is logged."""
    before = _near_threads()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_writethrough"):
        cache = WriteThroughCache(
            client, prefix=prefix, stats_interval=None, near_cache=SLOW_HEARTBEAT
        )
        _subscribed(cache)
        server.freeze()
        try:
            cache.close()
            left = [t for t in _near_threads() if t not in before]
            client.close()
            for thread in left:
                thread.join(10)
        finally:
            server.thaw()
    assert left == []
    assert _loud(caplog) == []
