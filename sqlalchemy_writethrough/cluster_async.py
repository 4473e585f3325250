"""Redis Cluster for sessions made by an ``AsyncSession``: a ``redis.asyncio.cluster.RedisCluster``.

The protocol is :mod:`.cluster`'s, not a copy: the same router (scripts split by hash tag, one
pipeline per node, ``MOVED``/``ASK``/``TRYAGAIN``/``NOSCRIPT`` followed, a breaker per node), the
same epoch per primary, the same transport. Only the I/O differs, and it runs as
:mod:`.redis_async`'s does: every method is sync code called from SQLAlchemy's greenlet (an
``AsyncSession``'s hooks, or :func:`._sa_compat.greenlet_spawn`) that awaits one coroutine at a
time through :func:`._sa_compat.await_`, so the event loop runs other tasks while a node answers.
No thread, no sync client: a node's connections come from its ``ClusterNode`` (redis.asyncio
has no pool per node), the ``TRYAGAIN`` pauses and the breaker's probe wait with
``asyncio.sleep``, and the probe is a task on the loop. The client's slot map is read with its
own coroutine (``initialize()``) at first use and after a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import MovedError, RedisError

from . import _redis_compat as compat
from ._sa_compat import await_, greenlet_spawn
from .breaker import CircuitBreaker
from .cluster import (
    ClusterBackend,
    ClusterEpochGuard,
    ClusterRouter,
    ClusterTransport,
)
from .protocol import Script, Scripts
from .redis_async import (
    _PROBER_LOOPS,
    ClosedCacheError,
    LoopGuard,
    await_io,
    claim,
    wire_prober,
)


class AsyncClusterRouter(ClusterRouter):
    """:class:`.ClusterRouter` over a ``redis.asyncio`` cluster client; called from
    SQLAlchemy's greenlet. Used on another event loop than its connections' (see
    :class:`.LoopGuard`), every call fails as an unreachable node's would."""

    _loop_guard: LoopGuard | None = None
    #: set by :meth:`WriteThroughCache.aclose` of a cache installed nowhere, cleared by its
    #: next ``install()``: a call in flight then opens no node's connection again (see
    #: :class:`.ClosedCacheError`)
    closed = False

    def _on_this_loop(self) -> None:
        """Before anything that may connect (a node's connection, the slot map)."""
        if self.closed:
            raise ClosedCacheError("the cache was closed")
        guard = self._loop_guard
        if guard is None:
            client = self.client
            guard = self._loop_guard = LoopGuard(
                client, lambda: compat.async_cluster_connections(client)
            )
        guard.check()

    def _ready(self) -> None:
        """The client's first slot map (an asyncio ``RedisCluster`` reads it when first
        awaited, not when built)."""
        self._on_this_loop()
        if not compat.async_cluster_ready(self.client):
            await_io(compat.async_cluster_initialize(self.client))

    def node_of(self, slot: int) -> Any:
        self._ready()
        return super().node_of(slot)

    def owner_name(self, slot: int) -> str | None:
        self._ready()
        return super().owner_name(slot)

    def primaries(self) -> list[Any]:
        self._ready()
        return super().primaries()

    def _read_slot_map(self) -> None:
        self._on_this_loop()
        await_io(compat.async_cluster_refresh(self.client))

    def _learn_moved(self, error: MovedError) -> bool:
        learnt: bool = await_io(compat.async_cluster_moved(self.client, error))
        return learnt

    def sleep(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    def _acquire(self, node: Any) -> tuple[Any, Any]:
        """A connection of the asyncio ``node`` (redis.asyncio keeps them per node)."""
        self._on_this_loop()
        conn = compat.async_cluster_acquire(node)
        if not claim(conn, asyncio.get_running_loop()):
            compat.async_cluster_release(node, conn)
            assert self._loop_guard is not None
            self._loop_guard.refuse()
        return conn, node

    def _release(self, home: Any, conn: Any) -> None:
        """Give a connection back to its node, closed if the cache was closed meanwhile (the
        node's own ``disconnect()`` has run, or will not run again)."""
        if self.closed:
            _close(conn)
        compat.async_cluster_release(home, conn)

    def _discard(self, conn: Any) -> None:
        _close(conn)

    def _call_many(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies: list[Any] = await_io(compat.acluster_call_many(conn, commands))
        return replies


def _close(conn: Any) -> None:
    """Close a failed connection; closing one whose node does not answer may time out too
    (redis.asyncio waits for the socket to close), which must not hide the first failure."""
    try:
        await_io(compat.adisconnect(conn))
    except (RedisError, OSError, asyncio.TimeoutError):
        try:
            compat.close_now(conn)
        except RuntimeError:  # its loop is closed: nothing can close it on that loop now
            pass


class AsyncClusterEpochGuard(ClusterEpochGuard):
    """:class:`.ClusterEpochGuard` on ``redis.asyncio`` connections: the same checks, each
    reply awaited; a reconnection is checked inside redis.asyncio's ``connect()``, in a
    greenlet of its own."""

    def _call(self, conn: Any, args: Sequence[Any]) -> Any:
        return await_io(compat.acall(conn, args))

    def _exchange(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies: list[Any] = await_io(compat.acall_many(conn, commands))
        return replies

    def _disconnect(self, conn: Any) -> None:
        _close(conn)

    def _on_connect(self, conn: Any) -> None:
        compat.on_connect(conn, self._reconnected_async)

    async def _reconnected_async(self, conn: Any) -> None:
        await greenlet_spawn(self._reconnected, conn)


class AsyncClusterTransport(ClusterTransport):
    """:class:`.ClusterTransport` of a ``redis.asyncio.cluster.RedisCluster`` client."""

    router: AsyncClusterRouter

    def __init__(
        self, client: Any, address: str, scripts: Scripts, check: Callable[[Any], None] | None
    ) -> None:
        self.client = client
        self.address = address
        self.router = AsyncClusterRouter(
            client, {scripts.sha[s]: scripts.source[s] for s in Script}, check
        )

    def sleep(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    @property
    def closed(self) -> bool:
        """See :attr:`AsyncClusterRouter.closed`."""
        return self.router.closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self.router.closed = value

    def client_here(self) -> Any:
        """The client, the running loop made its home if its own is closed (see
        :class:`.LoopGuard`); :class:`.OtherEventLoopError` on a loop open beside its own."""
        self.router._on_this_loop()
        return self.client

    def launch(self, probe: Callable[[], None]) -> None:
        """The breaker's prober, as a task on the running loop (see
        :meth:`.AsyncTransport.launch`)."""
        _PROBER_LOOPS.launch(probe)

    def pause(self, seconds: float) -> bool:
        return _PROBER_LOOPS.pause(seconds)


class AsyncClusterBackend(ClusterBackend):
    """:class:`.ClusterBackend` over a ``redis.asyncio.cluster.RedisCluster`` client, for
    sessions made by an ``AsyncSession``."""

    guard_class = AsyncClusterEpochGuard
    transport_class = AsyncClusterTransport

    def _wire(self, transport: ClusterTransport, breaker: CircuitBreaker) -> None:
        assert isinstance(transport, AsyncClusterTransport)
        wire_prober(breaker, transport)  # the probe: a task on the loop, never a thread


__all__ = ["AsyncClusterBackend", "AsyncClusterEpochGuard", "AsyncClusterRouter"]
