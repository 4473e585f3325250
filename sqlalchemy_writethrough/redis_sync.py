"""The transport of a synchronous ``redis.Redis`` client (standalone or Sentinel).

A plain client's commands go straight to a pooled connection (``send_command`` /
``read_response``, below ``Redis.execute_command``: see :mod:`._redis_compat`), under the
connection's retry policy, and every connection is checked against the prefix's epoch before its
first use and at every reconnection (:mod:`.epoch`). A single-connection client, client-side
caching or a subclass's ``execute_command`` keep redis-py's own path, checked every interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from . import _redis_compat as compat
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

    __slots__ = ("connection", "fork", "orphans", "read")

    def __init__(self, connection: Any, orphans: list[Any]) -> None:
        #: the connection (None once taken)
        self.connection = connection
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


#: how many times this process was forked from its parent (a handle made in another
#: generation holds the parent's connection)
_forks = [0]


def _after_fork() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class SyncTransport:
    """:class:`~.transport.Transport` of a ``redis.Redis`` client."""

    clustered = False

    def __init__(self, client: Any, address: str, epoch: EpochGuard | None = None) -> None:
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

    def command(self, *args: Any) -> Any:
        if not self._direct:
            if self._epoch is not None:
                self._epoch.check_client(self.client.execute_command)
            return self.client.execute_command(*args)
        return self._on_connection(compat.call, args)

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """On one pooled connection; the connection's retry policy applies to the whole batch,
        as it does to a redis-py pipeline."""
        if not self._direct:
            if self._epoch is not None:
                self._epoch.check_client(self.client.execute_command)
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
        replies: list[Any] = self._on_connection(compat.call_many, commands)
        return replies

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

    def begin(self, command: Sequence[Any]) -> PendingConnection:
        if self._orphans:
            self._release_orphans()
        conn = self._checkout()
        try:
            compat.send(conn, command)
        except BaseException:
            compat.disconnect(conn)
            compat.release(self._pool, conn)
            raise
        return PendingConnection(conn, self._orphans)

    def complete(self, handle: PendingConnection, hold: bool = False) -> Any:
        """The reply of :meth:`begin`'s command; with ``hold``, the connection stays checked
        out in ``handle`` for :meth:`command_on` (or :meth:`let_go`) instead of going back
        to the pool now."""
        conn = handle.take()
        if conn is None:  # a parent process's handle, in a forked child
            raise RedisConnectionError("the connection was opened before a fork")
        try:
            reply = compat.read(conn)
        except BaseException as exc:
            self._abandon(conn, exc)
            raise
        if hold:
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
        conn = handle.take()
        if conn is None:
            return self.command(*args)
        if self._epoch is not None:
            try:
                self._epoch.check_connection(conn)
            except BaseException:
                compat.release(self._pool, conn)
                raise
        return self._on_connection(compat.call, args, conn)

    def let_go(self, handle: PendingConnection) -> None:
        """Give back the connection ``handle`` holds, if it still holds one."""
        conn = handle.take()
        if conn is not None:
            compat.release(self._pool, conn)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def scan(self, pattern: str, count: int) -> Iterator[Any]:
        keys: Iterator[Any] = self.client.scan_iter(match=pattern, count=count)
        return keys

    def unlink(self, keys: Sequence[Any]) -> int:
        return int(self.client.unlink(*keys))
