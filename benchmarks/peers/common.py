"""Helpers the peer modules share."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import redis


def new_keys_size(
    client: redis.Redis, pattern: str, fn: Callable[[], Any]
) -> dict[str, Any] | None:
    """Run ``fn`` and measure the keys matching ``pattern`` it created.

    Returns ``strlen`` (value bytes of the new string keys), ``memory_usage`` (MEMORY USAGE of
    every new key, sets included) and ``keys`` (how many keys one cached row costs).
    """
    before = set(client.scan_iter(match=pattern, count=1000))
    fn()
    new = set(client.scan_iter(match=pattern, count=1000)) - before
    if not new:
        return None
    strlen = 0
    usage = 0
    for key in new:
        if client.type(key) == b"string":
            strlen += int(client.strlen(key))
        usage += int(client.memory_usage(key, samples=0) or 0)
    return {"strlen": strlen, "memory_usage": usage, "keys": len(new)}


def combine_checks(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    """One check that runs several and joins their notes."""

    def check() -> str | None:
        notes = [n for n in (c() for c in checks) if n]
        return "; ".join(notes) or None

    return check


def timed_read(
    maker: Callable[[], Any], key_of: Callable[[int], Any], read: Callable[[Any, Any], Any]
) -> Callable[[int], int]:
    """A benchmark operation: ``read(session, key_of(i))`` in a new session, timed with the
    session's creation and close (how every single-row row of the suite is measured)."""

    def op(i: int) -> int:
        key = key_of(i)
        t0 = perf_counter_ns()
        with maker() as s:
            read(s, key)
        return perf_counter_ns() - t0

    return op


def detached_loader(
    maker: Callable[[], Any], read: Callable[[Any, Any], Any]
) -> Callable[[Any], Any]:
    """``read(session, pk)`` in a new session, the result detached (for the value checks)."""

    def load(pk: Any) -> Any:
        with maker() as s:
            obj = read(s, pk)
            s.expunge_all()
            return obj

    return load
