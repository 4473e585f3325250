"""The transport of a ``redis.asyncio`` client, for sessions made by an ``AsyncSession``.

An ``AsyncSession`` runs its sync ``Session`` in a greenlet that SQLAlchemy spawned on the event
loop, and that is where the cache's hooks run. Each method of this transport is sync code that
awaits one coroutine through SQLAlchemy's bridge (:func:`._sa_compat.await_`): while Redis
answers, the event loop runs other tasks. No thread, no sync client, no ``time.sleep``: the fill
wait and the circuit breaker's probe wait with ``asyncio.sleep``, and the probe runs as a task on
the loop (see :meth:`AsyncTransport.launch`).

As :class:`~.redis_sync.SyncTransport` does, a plain client's commands go straight to a pooled
connection (``redis.asyncio`` internals: :mod:`._redis_compat`), each connection checked
against the prefix's epoch before its first use and at every reconnection.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from . import _redis_compat as compat
from ._sa_compat import await_, greenlet_spawn
from .epoch import EpochGuard


class PendingAsyncConnection:
    """A command sent on a pooled ``redis.asyncio`` connection whose reply is not read yet;
    its socket is closed if it is collected unread."""

    __slots__ = ("__weakref__", "connection", "finalizer")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.finalizer = weakref.finalize(self, compat.close_now, connection)

    def take(self) -> Any:
        conn, self.connection = self.connection, None
        self.finalizer.detach()
        return conn


class AsyncTransport:
    """:class:`~.transport.Transport` of a ``redis.asyncio.Redis`` client; every method must
    be called from SQLAlchemy's greenlet (an ``AsyncSession``'s hooks, or
    :func:`._sa_compat.greenlet_spawn`)."""

    clustered = False

    def __init__(self, client: Any, address: str, epoch: EpochGuard | None = None) -> None:
        self.client = client
        self.address = address
        self._epoch = epoch
        self._pool = client.connection_pool
        self._direct = compat.is_plain_async_client(client)
        self._get = compat.async_checkout_of(self._pool)
        self.overlaps = self._direct and not compat.async_pool_blocks(self._pool)

    async def _checkout(self) -> Any:
        conn = await self._get()
        epoch = self._epoch
        if epoch is not None and epoch.due(conn):
            try:
                await epoch.check_connection_async(conn)
            except BaseException:
                await compat.arelease(self._pool, conn)
                raise
        return conn

    async def _on_connection(self, call: Callable[[Any, Any], Any], what: Any) -> Any:
        conn = await self._checkout()
        try:
            result = await compat.awith_retry(conn, call, what)
        except BaseException as exc:
            await self._abandon(conn, exc)
            raise
        await compat.arelease(self._pool, conn)
        return result

    async def _abandon(self, conn: Any, exc: BaseException) -> None:
        if not isinstance(exc, ResponseError):
            await compat.adisconnect(conn)
        await compat.arelease(self._pool, conn)

    async def _via_client(self, commands: Sequence[Sequence[Any]], single: bool) -> Any:
        """A client that keeps redis-py's own path (a subclass, a single connection,
        client-side caching), checked against the epoch every interval."""
        client = self.client
        if self._epoch is not None:
            await greenlet_spawn(
                self._epoch.check_client, lambda *args: await_(client.execute_command(*args))
            )
        if single:
            return await client.execute_command(*commands[0])
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    def command(self, *args: Any) -> Any:
        if not self._direct:
            return await_(self._via_client([args], True))
        return await_(self._on_connection(compat.acall, args))

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if not self._direct:
            replies: list[Any] = await_(self._via_client(commands, False))
            return replies
        replies = await_(self._on_connection(compat.acall_many, commands))
        return replies

    def load_script(self, source: str) -> None:
        self.command("SCRIPT", "LOAD", source)

    async def _begin(self, command: Sequence[Any]) -> PendingAsyncConnection:
        conn = await self._checkout()
        try:
            await compat.asend(conn, command)
        except BaseException:
            await compat.adisconnect(conn)
            await compat.arelease(self._pool, conn)
            raise
        return PendingAsyncConnection(conn)

    def begin(self, command: Sequence[Any]) -> PendingAsyncConnection:
        return await_(self._begin(command))

    async def _complete(self, handle: PendingAsyncConnection) -> Any:
        conn = handle.take()
        try:
            reply = await compat.aread(conn)
        except BaseException as exc:
            await self._abandon(conn, exc)
            raise
        await compat.arelease(self._pool, conn)
        return reply

    def complete(self, handle: PendingAsyncConnection) -> Any:
        return await_(self._complete(handle))

    def ping(self) -> bool:
        return bool(await_(self.client.ping()))

    def sleep(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    async def _scan(self, pattern: str, count: int) -> list[Any]:
        return [key async for key in self.client.scan_iter(match=pattern, count=count)]

    def scan(self, pattern: str, count: int) -> list[Any]:
        keys: list[Any] = await_(self._scan(pattern, count))
        return keys

    def unlink(self, keys: Sequence[Any]) -> int:
        return int(await_(self.client.unlink(*keys)))

    # -- the circuit breaker's prober, as a task on the loop --------------------------------

    def launch(self, probe: Callable[[], None]) -> None:
        """Start the breaker's prober as a task on the running loop, in a greenlet of its
        own (it awaits Redis, and :meth:`sleep`, like the hooks do)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(greenlet_spawn(probe))
        _PROBERS.add(task)  # a task nobody references may be collected mid-run
        task.add_done_callback(_PROBERS.discard)

    def pause(self, seconds: float) -> bool:
        """The prober's wait between two probes; never stopped from outside."""
        self.sleep(seconds)
        return False


_PROBERS: set[asyncio.Task[Any]] = set()
