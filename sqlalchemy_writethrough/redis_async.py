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
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from . import _redis_compat as compat
from ._sa_compat import await_, greenlet_spawn
from .epoch import EpochGuard

log = logging.getLogger("sqlalchemy_writethrough")

#: pool settings a pool adds to its connections' for itself, never copied to another pool
_OWN_POOL_KWARGS = frozenset({"maint_notifications_pool_handler"})

_LOOP_HINT = (
    "a redis.asyncio client belongs to the event loop it first ran on; build the client (or "
    "the cache) inside the loop that uses it, one per loop (e.g. in FastAPI's lifespan, or in "
    "an async fixture of the loop's scope), or give the cache a URL (docs/asyncio.md)"
)


class OtherEventLoopError(RedisConnectionError):
    """The client cannot be used on the running event loop (its connections belong to
    another); a :class:`redis.exceptions.ConnectionError`, so that the cache treats it as
    Redis being unreachable: the read goes to the database, the write is journaled."""


class ClosedCacheError(RedisConnectionError):
    """The cache was uninstalled everywhere and closed (``aclose()``) while this call was on
    its way (a request in flight at shutdown): nothing is sent, as if Redis were unreachable.
    Its client would otherwise open a connection again after it was closed, one nobody
    closes (``ResourceWarning: unclosed transport`` once collected)."""


#: what asyncio says when an object of another event loop is awaited on this one (a future or
#: a task of it, a lock bound to it, or that loop closed); read only by :func:`await_io`'s
#: fallback
_ANOTHER_LOOP = (
    "attached to a different loop",
    "is bound to a different event loop",
    "Event loop is closed",
)


def await_io(awaitable: Awaitable[Any]) -> Any:
    """:func:`._sa_compat.await_` of Redis I/O.

    Whether a connection belongs to the running loop is decided before it is used (see
    :class:`_LoopPools`, :class:`LoopGuard`, :func:`claim`), by the loops redis.asyncio's
    objects are bound to. What cannot be told up front is caught here, by asyncio's words
    (:data:`_ANOTHER_LOOP`), as :class:`OtherEventLoopError` (Redis unreachable from here,
    never an error for the caller): the objects the cache does not hold (a Sentinel's own
    clients, to the sentinels; the connections of a custom pool class), and a pool's lock
    that the application's own use of the client on another loop bound there (asyncio
    raises only when a task must wait for it: refusing every call up front would refuse
    the ones that work)."""
    try:
        return await_(awaitable)
    except RuntimeError as exc:
        message = str(exc)
        if not any(words in message for words in _ANOTHER_LOOP):
            raise
        raise OtherEventLoopError(f"{exc}; {_LOOP_HINT}") from exc


def claim(conn: Any, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``conn`` may be used on ``loop``: True if it is closed or belongs to ``loop``,
    or to a loop that is not running (closed, or idle between two runs): it is closed first,
    to connect again here, as redis-py's own error path would close it. False if it belongs
    to a loop running now (in another thread): not the cache's to touch."""
    bound = compat.connection_loop(conn)
    if bound is None or bound is loop:
        return True
    if bound.is_running():
        return False
    compat.close_elsewhere(conn)
    return True


def close_off_loop(conns: Sequence[Any]) -> None:
    """Close the connections of event loops that are not running, without awaiting: their
    loop is closed, or idle and perhaps never run again (a test's loop, ``asyncio.run()``
    over), and a socket left open would be collected with a ``ResourceWarning``. Those of a
    loop running in another thread are that loop's to close."""
    for conn in conns:
        bound = compat.connection_loop(conn)
        if bound is not None and not bound.is_running():
            compat.close_elsewhere(conn)


class _LoopPools:
    """Which pool each running event loop takes connections from: the client's own on its
    home loop (the first to use it, unless the client already has connections open on
    another), a copy of it with the same settings on any other. A copy whose loop is closed
    is dropped, its sockets closed. When the home loop is closed, the next loop becomes the
    home (see :class:`LoopGuard`). A client whose pool cannot be copied (a Sentinel or custom
    pool, a client that keeps redis-py's own path) fails as an unreachable Redis on a loop
    open alongside its own."""

    def __init__(self, client: Any, direct: bool) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.home: asyncio.AbstractEventLoop | None = None
        self.copyable = direct and type(self.pool) in (
            redis.asyncio.ConnectionPool,
            redis.asyncio.BlockingConnectionPool,
        )
        self.guard = LoopGuard(
            client,
            lambda: compat.async_client_connections(client),
            compat.async_pool_waits(self.pool),
        )
        self.others: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}
        self.told = False

    def here(self, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
        """(pool, client) to use on ``loop``, which is not the home loop (yet)."""
        if self.guard.settle(loop):
            self.home = loop
            return self.pool, self.client
        if not self.copyable:
            self.guard.refuse()
        found = self.others.get(loop)
        if found is None:
            found = self.others[loop] = self._copy()
        return found

    def _copy(self) -> tuple[Any, Any]:
        """A pool of the client's settings and a plain client over it, for one more loop."""
        self.drop_closed()
        pool = self.pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _OWN_POOL_KWARGS}
        if isinstance(pool, redis.asyncio.BlockingConnectionPool):
            kwargs["timeout"] = pool.timeout
        copy = type(pool)(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
        )
        if not self.told:
            self.told = True
            log.info(
                "writethrough: the redis.asyncio client is used on more than one event loop; "
                "the cache opens connections of its own on each other loop (the client itself "
                "raises RuntimeError there): %s",
                _LOOP_HINT,
            )
        return copy, redis.asyncio.Redis(connection_pool=copy)

    def drop_closed(self) -> None:
        """Forget the copies whose loop is closed, their sockets closed (nothing can be
        awaited on their loop any more)."""
        self._drop([loop for loop in self.others if loop.is_closed()])

    def close_off_loop(self) -> None:
        """Close the copies of loops that are not running (closed, or idle once their run is
        over), from outside them: :meth:`WriteThroughCache.close` after the loops it served."""
        self._drop([loop for loop in self.others if not loop.is_running()])

    def _drop(self, loops: list[asyncio.AbstractEventLoop]) -> None:
        for loop in loops:
            pool, _ = self.others.pop(loop)
            close_off_loop(compat.async_pool_connections(pool))

    async def aclose(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the copy made for ``loop`` (the running one) and drop those of closed loops;
        the client's own pool is the application's (or the cache's, for a URL) to close."""
        self.drop_closed()
        found = self.others.pop(loop, None)
        if found is not None:
            pool, client = found
            await client.aclose()
            await pool.disconnect()  # a client given its pool leaves it open


class LoopGuard:
    """The event loop a client's connections belong to (its home): the first loop that uses
    it, unless the client already has connections open on another. When that loop is closed
    (``asyncio.run()`` again, a test's loop), the next loop becomes the home, the client's
    connections (dead with their loop) closed first; not if the pool's own lock already
    belongs to the closed loop (redis.asyncio binds it there the first time two tasks
    wait for it: it would fail on any other)."""

    def __init__(
        self,
        client: Any,
        connections: Callable[[], Sequence[Any]],
        waits: Sequence[Any] = (),
    ) -> None:
        self.client = client
        self.connections = connections
        self.waits = waits
        self.home: asyncio.AbstractEventLoop | None = None
        self.warned = False

    def settle(self, loop: asyncio.AbstractEventLoop) -> bool:
        """True if ``loop`` is the home loop (now)."""
        home = self.home
        if home is loop:
            return True
        if home is None:
            bound = compat.bound_loops(self.client)
            home = next(iter(bound - {loop}), None) if bound else None
            if home is None:
                self.home = loop
                return True
        if not home.is_closed():
            return False
        if any(compat.wait_loop(wait) not in (None, loop) for wait in self.waits):
            return False
        for conn in self.connections():
            compat.close_elsewhere(conn)
        self.home = loop
        return True

    def check(self) -> None:
        """Make the running loop the home, or raise :class:`OtherEventLoopError`."""
        if not self.settle(asyncio.get_running_loop()):
            self.refuse()

    def refuse(self) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "writethrough: the redis.asyncio client is used on another event loop than the "
                "one its connections belong to, and the cache cannot open connections of its "
                "own there: every operation on that loop goes to the database. %s",
                _LOOP_HINT,
            )
        raise OtherEventLoopError(
            "the redis.asyncio client belongs to another event loop; " + _LOOP_HINT
        )


class PendingAsyncConnection:
    """A command sent on a pooled ``redis.asyncio`` connection whose reply is not read yet;
    its socket is closed if it is collected unread."""

    __slots__ = ("__weakref__", "after", "ahead", "behind", "connection", "finalizer", "pool")

    def __init__(self, connection: Any, pool: Any, behind: bool = False, ahead: bool = False):
        self.connection = connection
        self.pool = pool
        #: a command went behind the one whose reply is awaited; ``after``: its reply
        self.behind = behind
        #: a command went ahead of it (its reply is dropped)
        self.ahead = ahead
        self.after: Any = None
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
        self._loops = _LoopPools(client, self._direct)
        #: set by :meth:`WriteThroughCache.aclose` of a cache installed nowhere, cleared by
        #: its next ``install()`` (see :class:`ClosedCacheError`)
        self.closed = False

    def _here(self) -> tuple[Any, Any]:
        """(pool, client) to use on the running loop (see :class:`_LoopPools`)."""
        if self.closed:
            raise ClosedCacheError("the cache was closed")
        loop = asyncio.get_running_loop()
        loops = self._loops
        if loop is loops.home:
            return self._pool, self.client
        return loops.here(loop)

    async def _checkout(self, pool: Any) -> Any:
        conn = await (self._get() if pool is self._pool else compat.async_checkout_of(pool)())
        if not claim(conn, asyncio.get_running_loop()):
            await compat.arelease(pool, conn)
            self._loops.guard.refuse()
        epoch = self._epoch
        if epoch is not None and epoch.due(conn):
            try:
                await epoch.check_connection_async(conn)
            except BaseException:
                await self._release(pool, conn)
                raise
        return conn

    async def _on_connection(self, call: Callable[[Any, Any], Any], what: Any) -> Any:
        pool, _ = self._here()
        conn = await self._checkout(pool)
        try:
            result = await compat.awith_retry(conn, call, what)
        except BaseException as exc:
            await self._abandon(pool, conn, exc)
            raise
        await self._release(pool, conn)
        return result

    async def _release(self, pool: Any, conn: Any) -> None:
        """Give a connection back, closed if the cache was closed meanwhile: one checked out
        just before, connected after the pool was, would stay open (see
        :class:`ClosedCacheError`)."""
        if self.closed:
            await compat.adisconnect(conn)
        await compat.arelease(pool, conn)

    async def _abandon(self, pool: Any, conn: Any, exc: BaseException) -> None:
        """Give back the connection of a failed command, closed unless Redis answered with an
        error (it is then in a clean state) and the cache is still open (see
        :meth:`_release`)."""
        if self.closed or not isinstance(exc, ResponseError):
            await compat.adisconnect(conn)
        await compat.arelease(pool, conn)

    async def _via_client(self, commands: Sequence[Sequence[Any]], single: bool) -> Any:
        """A client that keeps redis-py's own path (a subclass, a single connection,
        client-side caching), checked against the epoch every interval."""
        _, client = self._here()
        loop = asyncio.get_running_loop()
        if not all([claim(conn, loop) for conn in compat.async_idle_connections(client)]):
            self._loops.guard.refuse()
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
            return await_io(self._via_client([args], True))
        return await_io(self._on_connection(compat.acall, args))

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if not self._direct:
            replies: list[Any] = await_io(self._via_client(commands, False))
            return replies
        replies = await_io(self._on_connection(compat.acall_many, commands))
        return replies

    def load_script(self, source: str) -> None:
        self.command("SCRIPT", "LOAD", source)

    async def _begin(
        self, command: Sequence[Any], after: Sequence[Any] | None, before: Sequence[Any] | None
    ) -> PendingAsyncConnection:
        pool, _ = self._here()
        conn = await self._checkout(pool)
        try:
            await compat.asend(conn, command, after, before)
        except BaseException:
            await compat.adisconnect(conn)
            await compat.arelease(pool, conn)
            raise
        return PendingAsyncConnection(conn, pool, after is not None, before is not None)

    def begin(
        self,
        command: Sequence[Any],
        after: Sequence[Any] | None = None,
        before: Sequence[Any] | None = None,
    ) -> PendingAsyncConnection:
        handle: PendingAsyncConnection = await_io(self._begin(command, after, before))
        return handle

    async def _complete(self, handle: PendingAsyncConnection) -> Any:
        pool = handle.pool
        conn = handle.take()
        try:
            if handle.ahead:
                await compat.aread_or_error(conn)
            try:
                reply = await compat.aread(conn)
            except ResponseError as exc:
                if handle.behind:
                    handle.after = await compat.aread_or_error(conn)  # the connection's clean
                raise exc from None
            if handle.behind:
                handle.after = await compat.aread_or_error(conn)
        except BaseException as exc:
            await self._abandon(pool, conn, exc)
            raise
        await self._release(pool, conn)
        return reply

    def complete(self, handle: PendingAsyncConnection) -> Any:
        return await_io(self._complete(handle))

    async def _ping(self) -> bool:
        _, client = self._here()
        return bool(await client.ping())

    def ping(self) -> bool:
        return bool(await_io(self._ping()))

    def sleep(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    def servers(self) -> list[Callable[..., Any]]:
        return [self.command]

    async def _scan(self, pattern: str, count: int) -> list[Any]:
        _, client = self._here()
        return [key async for key in client.scan_iter(match=pattern, count=count)]

    def scan(self, pattern: str, count: int) -> list[Any]:
        keys: list[Any] = await_io(self._scan(pattern, count))
        return keys

    async def _unlink(self, keys: Sequence[Any]) -> int:
        _, client = self._here()
        return int(await client.unlink(*keys))

    def unlink(self, keys: Sequence[Any]) -> int:
        return int(await_io(self._unlink(keys)))

    def client_here(self) -> Any:
        """The client the cache's calls use on the running loop (see :class:`_LoopPools`):
        the client itself on its home loop, which the running loop becomes once the client's
        own is closed, else the cache's copy for this loop; :class:`OtherEventLoopError`
        where there is none."""
        return self._here()[1]

    async def aclose(self) -> None:
        """Close the connections the cache opened for the running loop, and forget those of
        closed loops (see :class:`_LoopPools`); the client's own are not the cache's."""
        await self._loops.aclose(asyncio.get_running_loop())

    def close_off_loop(self) -> None:
        """:meth:`aclose` from sync code, once the loops are over: the connections the cache
        opened for other loops, closed without awaiting (see :func:`close_off_loop`)."""
        self._loops.close_off_loop()

    # -- the circuit breaker's prober, as a task on the loop --------------------------------

    def launch(self, probe: Callable[[], None]) -> None:
        """Start the breaker's prober as a task on the running loop, in a greenlet of its
        own (it awaits Redis, and :meth:`sleep`, like the hooks do)."""
        _PROBER_LOOPS.launch(probe)

    def pause(self, seconds: float) -> bool:
        """The prober's wait between two probes; never stopped from outside."""
        return _PROBER_LOOPS.pause(seconds)


class ProberLoops:
    """Starts the circuit breakers' probers as tasks on the running loop, and keeps a prober
    from outliving its loop: a prober cancelled while it waits (``asyncio.run()`` cancels
    the tasks left when its coroutine returns) is not started again on that loop (the breaker
    then starts one on the next loop that uses the cache, instead of waiting forever for a
    prober whose loop is closed)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.cancelled: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        #: each breaker's last prober (the breaker is the owner of the probe method)
        self.last: weakref.WeakKeyDictionary[Any, asyncio.Task[Any]] = weakref.WeakKeyDictionary()

    def launch(self, probe: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        if loop in self.cancelled:
            self.cancelled.discard(loop)
            raise RuntimeError("the event loop cancelled the prober: not started again on it")
        task = loop.create_task(greenlet_spawn(probe))
        self.tasks.add(task)  # a task nobody references may be collected mid-run
        task.add_done_callback(self.tasks.discard)
        owner = getattr(probe, "__self__", None)
        if owner is not None:
            self.last[owner] = task

    def stranded(self, owner: Any) -> bool:
        """Whether ``owner``'s prober is a task of a loop that does not run (idle between two
        runs, perhaps for good: several loops open, used in turn) while another loop runs,
        whose calls the breaker then sends to the database until that loop runs again: a
        prober is started on the running loop instead."""
        task = self.last.get(owner)
        if task is None or task.done():
            return False
        loop = task.get_loop()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return loop is not here and not loop.is_running()

    def pause(self, seconds: float) -> bool:
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        try:
            if cancelling is not None and cancelling():
                # cancelled during its probe, which swallowed the CancelledError (a client
                # that turns it into a timeout): stop now, or asyncio.run() would wait for a
                # prober that probes a dead Redis for ever
                raise asyncio.CancelledError
            await_(asyncio.sleep(seconds))
        except asyncio.CancelledError:
            self.cancelled.add(asyncio.get_running_loop())
            raise
        return False


_PROBER_LOOPS = ProberLoops()


def wire_prober(breaker: Any, transport: Any) -> None:
    """Make ``breaker``'s prober a task on the running loop, through the ``launch`` and
    ``pause`` of ``transport`` (:class:`AsyncTransport`, the asyncio Cluster's), started
    again on the running loop when the loop of the one started is left idle
    (:meth:`ProberLoops.stranded`)."""
    breaker.launch = transport.launch
    breaker.pause = transport.pause
    owner = weakref.ref(breaker)

    def stranded() -> bool:
        found = owner()
        return found is not None and _PROBER_LOOPS.stranded(found)

    breaker.stranded = stranded
