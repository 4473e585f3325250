"""The transport of a synchronous ``redis.Redis`` client (standalone or Sentinel).

A plain client's commands go straight to a pooled connection (``send_command`` /
``read_response``, below ``Redis.execute_command``: see :mod:`._redis_compat`), under the
connection's retry policy, and every connection is checked against the prefix's epoch before its
first use and at every reconnection (:mod:`.epoch`). On a plain ``ConnectionPool``, each thread
keeps its connection checked out between commands (:class:`HeldConnection`): redis-py 8.1's
``get_connection`` and ``release`` are about 70k instructions, a quarter of a cached get's. A
single-connection client, client-side caching or a subclass's ``execute_command`` keep
redis-py's own path, checked every interval.
"""

from __future__ import annotations

import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from . import _redis_compat as compat
from . import forks
from .epoch import EpochGuard


class PendingConnection:
    """A command sent on a pooled connection whose reply is not read yet (the connection stays
    checked out until :meth:`SyncTransport.complete`), or, once its reply is read with
    ``hold=True``, a connection kept checked out for one more command
    (:meth:`SyncTransport.command_on`: a commit's publish after its flush's lock).

    Should it never be completed or used (a session dropped mid-transaction), the connection
    goes back to its pool when the handle is collected (at the transport's next checkout:
    never from inside the garbage collector, which may run while the pool's lock is held);
    its socket is closed first unless the reply was read. A handle made before a ``fork()``
    is never used nor released in the child (its socket is the parent's)."""

    __slots__ = ("after", "ahead", "behind", "connection", "fork", "orphans", "read")

    def __init__(
        self, connection: Any, orphans: list[Any], behind: bool = False, ahead: bool = False
    ) -> None:
        #: the connection (None once taken)
        self.connection = connection
        #: a command went behind the one whose reply is awaited (:meth:`SyncTransport.begin`)
        self.behind = behind
        #: a command went ahead of it (its reply is dropped)
        self.ahead = ahead
        #: its reply, once read (an error reply as its exception)
        self.after: Any = None
        #: its reply was read: it can go back to the pool as it is
        self.read = False
        self.fork = _forks[0]
        self.orphans = orphans

    def take(self) -> Any:
        """The connection, now the caller's to read from and return to the pool; None when
        taken already or when it is a parent process's (after a fork)."""
        conn = self.connection
        self.connection = None
        if conn is not None and self.fork != _forks[0]:
            return None  # the parent's socket: not ours to use or to release
        return conn

    def __del__(self) -> None:
        # a __del__, not a weakref.finalize: nothing to register and unregister per lock
        conn = self.connection
        if conn is None:
            return
        self.connection = None
        try:
            if self.fork != _forks[0]:
                return  # the parent's socket
        except TypeError:  # at interpreter exit, this module torn down: nothing to give back
            return
        if not self.read:
            compat.disconnect(conn)  # a reply may still be on its way: never reuse it
        self.orphans.append(conn)  # atomic; the pool's lock is never taken from here


class HeldConnection:
    """The connection a thread keeps checked out between its commands on one transport
    (:class:`SyncTransport`), so that a command skips the pool's checkout and release (a
    quarter of a cached get's instructions with redis-py 8.1). The connection is in a clean
    state (its last reply read) whenever it is here. Taking it is one atomic ``list.pop()``:
    :meth:`SyncTransport.close` may take it from another thread.

    When the thread ends (its ``threading.local`` dropped), the connection goes back to the
    pool at the transport's next checkout, as a collected :class:`PendingConnection`'s does; a
    holder made before a ``fork()`` is never used nor released in the child."""

    __slots__ = ("__weakref__", "fork", "orphans", "poller", "slot", "sock")

    def __init__(self, orphans: list[Any]) -> None:
        #: the connection, when the thread holds one (at most one element)
        self.slot: list[Any] = []
        self.fork = _forks[0]
        self.orphans = orphans
        #: the socket ``poller`` polls (a reconnected connection has a new one)
        self.sock: Any = None
        self.poller: Any = None

    def take(self) -> Any:
        """The connection (None when there is none), now the caller's."""
        try:
            return self.slot.pop()
        except IndexError:
            return None

    def quiet(self, conn: Any) -> bool:
        """Whether ``conn`` can take a command as it is: connected, and nothing to read on its
        socket (a server that closed an idle connection, ``timeout`` or a restart, makes it
        readable). The check ``get_connection`` makes with ``can_read()``, for a poll's price.
        A socket another thread's ``pool.disconnect()`` closes under this check is not quiet:
        registering it raises ``ValueError`` (its descriptor is -1 by then), polling it
        answers ``POLLNVAL``."""
        sock = compat.socket_of(conn)
        if sock is None or sock.fileno() < 0:  # closed: its old descriptor may be reused
            return False
        if sock is not self.sock:
            poller = select.poll()
            try:
                poller.register(sock, select.POLLIN | select.POLLPRI)
            except (ValueError, OSError):
                return False
            self.sock, self.poller = sock, poller
        return not self.poller.poll(0)

    def __del__(self) -> None:
        slot = self.slot
        if not slot:
            return
        try:
            if self.fork != _forks[0]:
                slot.clear()
                return  # the parent's socket
        except TypeError:  # at interpreter exit, this module torn down: nothing to give back
            return
        try:
            self.orphans.append(slot.pop())  # atomic; the pool's lock is never taken from here
        except IndexError:
            pass


#: how many times this process was forked from its parent (a handle made in another
#: generation holds the parent's connection)
_forks = [0]


def _after_fork() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class SyncTransport:
    """:class:`~.transport.Transport` of a ``redis.Redis`` client.

    Where the pool allows it (:func:`._redis_compat.lendable_connections`), a thread's command
    runs on the connection the thread kept from its last one, when that connection is quiet
    (:meth:`HeldConnection.quiet`; else it goes back to the pool, whose checkout reconnects
    it) and passes the epoch check a checkout makes; the command keeps it after succeeding,
    and abandons it after failing, as before. A commit's lock connection goes back to the
    thread's holder, where the publish finds it (no per-handle hold: :attr:`holds` is
    False)."""

    clustered = False

    def __init__(
        self, client: Any, address: str, epoch: EpochGuard | None = None, keep: bool = True
    ) -> None:
        """``keep``: whether threads may keep a connection between commands at all (see
        :meth:`.WriteThroughCache.__init__`'s ``keep_connections``)."""
        self.client = client
        self.address = address
        self._epoch = epoch
        self._pool = client.connection_pool
        self._direct = compat.is_plain_client(client)
        checkout = compat.checkout_of(self._pool)
        if self._direct and epoch is not None:
            checkout = self._checked(checkout, epoch)
        self._checkout: Callable[[], Any] = checkout
        # a flush's locks travel during its SQL on a connection of their own; a bounded,
        # blocking pool could run dry while writers wait on database row locks
        self.overlaps = self._direct and not compat.pool_blocks(self._pool)
        #: :meth:`complete` can keep the connection for one more command (:meth:`command_on`)
        self.holds = self.overlaps
        #: connections of handles collected while checked out: back to the pool at the next
        #: checkout (see :class:`PendingConnection`)
        self._orphans: list[Any] = []
        #: how many threads may keep a connection between commands (:class:`HeldConnection`;
        #: 0: every command checks one out and releases it)
        self._lendable = (
            compat.lendable_connections(self._pool)
            if keep and self._direct and hasattr(select, "poll")
            else 0
        )
        self._local = threading.local()
        #: every thread's holder, weakly: a tuple replaced (under ``_holders_lock``), never
        #: changed, so that :meth:`release_held` iterates it while threads add theirs (a
        #: ``WeakSet`` iterated as a thread added to it raised "Set changed size during
        #: iteration" out of ``uninstall()``)
        self._holders: tuple[weakref.ref[HeldConnection], ...] = ()
        self._holders_lock = threading.Lock()
        self._closed = False
        forks.renew_in_child(self, "_holders_lock")
        if self._lendable:
            self.holds = False  # a lock's connection goes back to the thread's holder

    def _checked(self, checkout: Callable[[], Any], guard: EpochGuard) -> Callable[[], Any]:
        pool = self._pool

        def checked() -> Any:
            conn = checkout()
            try:
                guard.check_connection(conn)
            except BaseException:
                compat.release(pool, conn)
                raise
            return conn

        return checked

    def _via_client(self, commands: Sequence[Sequence[Any]], single: bool) -> Any:
        """A client that keeps redis-py's own path (a subclass, a single connection,
        client-side caching), checked against the epoch every interval; closed by its owner
        under this call, it fails as a lost connection (see
        :func:`._redis_compat.raise_if_closed_under_us`)."""
        try:
            if self._epoch is not None:
                self._epoch.check_client(self.client.execute_command)
            if single:
                return self.client.execute_command(*commands[0])
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
        except (AttributeError, TypeError, ValueError) as exc:
            compat.raise_if_closed_under_us(exc)
            raise

    def command(self, *args: Any) -> Any:
        if not self._direct:
            return self._via_client([args], True)
        if self._lendable:
            return self._on_held(compat.call, args)
        return self._on_connection(compat.call, args)

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """On one pooled connection; the connection's retry policy applies to the whole batch,
        as it does to a redis-py pipeline."""
        if not self._direct:
            via: list[Any] = self._via_client(commands, False)
            return via
        if self._lendable:
            held: list[Any] = self._on_held(compat.call_many, commands)
            return held
        replies: list[Any] = self._on_connection(compat.call_many, commands)
        return replies

    def _holder(self) -> HeldConnection | None:
        """This thread's :class:`HeldConnection` (None: this thread does not keep one)."""
        try:
            held: HeldConnection | None = self._local.held
        except AttributeError:
            held = None
            with self._holders_lock:  # once per thread: the cap holds with threads racing
                # the holders of the threads still alive (a dead thread's is collected)
                alive = tuple(ref for ref in self._holders if ref() is not None)
                if not self._closed and len(alive) < self._lendable:
                    held = HeldConnection(self._orphans)
                    alive += (weakref.ref(held),)
                self._holders = alive
            self._local.held = held
            return held
        if held is not None and held.fork != _forks[0]:
            held.slot.clear()  # the parent's connection: neither used nor released here
            self._local.held = held = HeldConnection(self._orphans)
            self._holders = (weakref.ref(held),)
        return held

    def _take_held(self, held: HeldConnection | None) -> Any:
        """A connection for one command: the thread's kept one when it is quiet (and checked
        against the epoch as a checkout's is), else one checked out now."""
        if self._orphans:  # a dead thread's: back to the pool (it may be the one taken now)
            self._release_orphans()
        conn = held.take() if held is not None else None
        if conn is not None:
            if held.quiet(conn):  # type: ignore[union-attr]
                if self._epoch is not None:
                    try:
                        self._epoch.check_connection(conn)
                    except BaseException:
                        compat.release(self._pool, conn)
                        raise
                return conn
            # closed by the server or by pool.disconnect(): the pool's checkout looks at it
            # (can_read) and reconnects it, as it does for any idle connection
            compat.release(self._pool, conn)
        return self._checkout()

    def _keep(self, held: HeldConnection | None, conn: Any) -> None:
        """After a command that succeeded: the connection stays the thread's, or goes back to
        the pool (the thread keeps one already, or keeps none, or the transport is closed)."""
        if held is None or held.slot:
            compat.release(self._pool, conn)
            return
        held.slot.append(conn)
        if self._closed:
            conn = held.take()
            if conn is not None:
                compat.release(self._pool, conn)

    def _on_held(self, call: Callable[[Any, Any], Any], what: Any) -> Any:
        """:meth:`_on_connection` on the thread's kept connection, which it keeps after."""
        held = self._holder()
        conn = self._take_held(held)
        try:
            result = compat.with_retry(conn, call, what)
        except BaseException as exc:
            self._abandon(conn, exc)  # never kept: closed first unless Redis answered
            raise
        self._keep(held, conn)
        return result

    def close(self) -> None:
        """Give back every connection kept between commands (each thread's idle one), and keep
        none from now on: ``cache.close()``."""
        self._closed = True
        self.release_held()

    def release_held(self) -> None:
        """Give back the connections threads keep between commands and that are idle now (a
        thread amid a command gives its own back after it, or keeps it when not closed)."""
        for ref in self._holders:  # a tuple: threads adding theirs replace it
            held = ref()
            if held is None:
                continue
            conn = held.take()
            if conn is not None and held.fork == _forks[0]:
                compat.release(self._pool, conn)
        if self._orphans:
            self._release_orphans()

    def _on_connection(self, call: Callable[[Any, Any], Any], what: Any, conn: Any = None) -> Any:
        """``call(connection, what)`` on a pooled connection (``conn``, checked out already,
        else one checked out now), under the connection's retry policy (reconnecting between
        attempts, as redis-py does); the connection goes back to the pool afterwards, closed
        first if the call failed with anything but an error reply."""
        if conn is None:
            if self._orphans:
                self._release_orphans()
            conn = self._checkout()
        try:
            result = compat.with_retry(conn, call, what)
        except BaseException as exc:
            self._abandon(conn, exc)  # a reply may still be on its way: never reuse that socket
            raise
        compat.release(self._pool, conn)
        return result

    def _abandon(self, conn: Any, exc: BaseException) -> None:
        """Return the connection of a failed command to the pool, closed first unless Redis
        answered with an error (then it is in a clean state)."""
        if not isinstance(exc, ResponseError):
            compat.disconnect(conn)
        compat.release(self._pool, conn)

    def load_script(self, source: str) -> None:
        self.command("SCRIPT", "LOAD", source)

    def _release_orphans(self) -> None:
        orphans = self._orphans
        while orphans:
            try:
                conn = orphans.pop()  # atomic: another thread may have taken the last one
            except IndexError:
                return
            compat.release(self._pool, conn)

    def begin(
        self,
        command: Sequence[Any],
        after: Sequence[Any] | None = None,
        before: Sequence[Any] | None = None,
    ) -> PendingConnection:
        if self._lendable:
            conn = self._take_held(self._holder())
        else:
            if self._orphans:
                self._release_orphans()
            conn = self._checkout()
        try:
            compat.send(conn, command, after, before)
        except BaseException:
            compat.disconnect(conn)
            compat.release(self._pool, conn)
            raise
        return PendingConnection(conn, self._orphans, after is not None, before is not None)

    def complete(self, handle: PendingConnection, hold: bool = False) -> Any:
        """The reply of :meth:`begin`'s command; with ``hold``, the connection stays checked
        out in ``handle`` for :meth:`command_on` (or :meth:`let_go`) instead of going back
        to the pool now."""
        conn = handle.take()
        if conn is None:  # a parent process's handle, in a forked child
            raise RedisConnectionError("the connection was opened before a fork")
        try:
            if handle.ahead:
                compat.read_or_error(conn)
            try:
                reply = compat.read(conn)
            except ResponseError as exc:
                if handle.behind:
                    handle.after = compat.read_or_error(conn)  # the connection's clean
                raise exc from None
            if handle.behind:
                handle.after = compat.read_or_error(conn)
        except BaseException as exc:
            self._abandon(conn, exc)
            raise
        if self._lendable:
            self._keep(self._holder(), conn)  # the thread's again: the publish runs on it
        elif hold:
            handle.connection = conn
            handle.read = True  # in a clean state: the pool may have it back as it is
        else:
            compat.release(self._pool, conn)
        return reply

    def command_on(self, handle: PendingConnection, *args: Any) -> Any:
        """:meth:`command` on the connection ``handle`` holds (checked against the epoch as a
        checkout would), which then goes back to the pool; on a new checkout when the handle
        holds none any more.

        The check is for Sentinel: a promotion while the connection was held (the flush's
        SQL, the COMMIT) leaves it open to the old primary, which takes writes until it is
        demoted; the publish must go where the sentinels point, or a lagging new primary
        keeps a value filled there before the COMMIT
        (``test_a_commit_locked_on_the_old_primary_publishes_on_the_new_one``). A restart or
        another server breaks the connection, and redis-py's reconnection is checked anyway;
        after a ``FLUSHALL`` or a ``REPLICAOF`` that keeps it open, the publish writes only
        over this commit's own lock at its generation and deletes anything else, and the
        check only narrows the documented ``epoch_check_interval`` window."""
        conn = self._checked_take(handle)
        if conn is None:
            return self.command(*args)
        return self._on_connection(compat.call, args, conn)

    def batch_on(self, handle: PendingConnection, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """:meth:`batch` on the connection ``handle`` holds, as :meth:`command_on` (the same
        epoch check)."""
        conn = self._checked_take(handle)
        if conn is None:
            return self.batch(commands)
        replies: list[Any] = self._on_connection(compat.call_many, commands, conn)
        return replies

    def _checked_take(self, handle: PendingConnection) -> Any:
        """The connection ``handle`` holds (None when it holds none any more), checked
        against the epoch; back to the pool when the check raises."""
        conn = handle.take()
        if conn is not None and self._epoch is not None:
            try:
                self._epoch.check_connection(conn)
            except BaseException:
                compat.release(self._pool, conn)
                raise
        return conn

    def let_go(self, handle: PendingConnection) -> None:
        """Give back the connection ``handle`` holds, if it still holds one."""
        conn = handle.take()
        if conn is not None:
            compat.release(self._pool, conn)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def servers(self) -> list[Callable[..., Any]]:
        return [self.command]

    def scan(self, pattern: str, count: int) -> Iterator[Any]:
        keys: Iterator[Any] = self.client.scan_iter(match=pattern, count=count)
        return keys

    def unlink(self, keys: Sequence[Any]) -> int:
        return int(self.client.unlink(*keys))
