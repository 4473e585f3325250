"""The loop watch of the asyncio tests (tests/_loop_watch.py) must see a blocked loop, or
the tests that rely on it prove nothing: a blocking socket read and ``time.sleep`` on the
loop are found, with their stack; a loop that only awaits is not blamed."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from _loop_watch import LoopWatch

pytestmark = pytest.mark.databases("sqlite")


def _watch(loop: asyncio.AbstractEventLoop, work: Callable[[], Awaitable[None]]) -> LoopWatch:
    async def scenario() -> None:
        stop = asyncio.Event()
        tick = asyncio.ensure_future(watch.tick(stop))
        await asyncio.sleep(0.05)
        watch.window = "work"
        await work()
        await asyncio.sleep(0.05)
        stop.set()
        await tick

    with LoopWatch(loop, blocked=0.05) as watch:
        loop.run_until_complete(scenario())
    return watch


def test_a_blocking_socket_read_on_the_loop_is_found(loop: asyncio.AbstractEventLoop) -> None:
    """A read from a peer that does not answer (as a sync Redis client waits for a frozen
    server) holds the loop for its whole timeout."""
    ours, theirs = socket.socketpair()
    ours.settimeout(0.3)

    async def blocking_read() -> None:
        with pytest.raises(TimeoutError):
            ours.recv(1)

    try:
        watch = _watch(loop, blocking_read)
    finally:
        ours.close()
        theirs.close()
    assert len(watch.blocks) == 1, watch.blocks
    assert "blocking_read" in watch.blocks[0]
    assert watch.stalled["work"] > 0.15


def test_sleeping_on_the_loop_is_found(loop: asyncio.AbstractEventLoop) -> None:
    async def sleeps() -> None:
        time.sleep(0.2)

    watch = _watch(loop, sleeps)
    assert len(watch.blocks) == 1 and "sleeps" in watch.blocks[0], watch.blocks


def test_a_loop_that_awaits_is_not_blamed(loop: asyncio.AbstractEventLoop) -> None:
    async def awaits() -> None:
        for _ in range(20):
            await asyncio.sleep(0.01)

    watch = _watch(loop, awaits)
    assert watch.blocks == []
