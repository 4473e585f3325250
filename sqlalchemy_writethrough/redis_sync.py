"""The transport of a synchronous ``redis.Redis`` client (standalone or Sentinel).

A plain client's commands go straight to a pooled connection (``send_command`` /
``read_response``, below ``Redis.execute_command``: see :mod:`._redis_compat`), under the
connection's retry policy, and every connection is checked against the prefix's epoch before its
first use and at every reconnection (:mod:`.epoch`). A single-connection client, client-side
caching or a subclass's ``execute_command`` keep redis-py's own path, checked every interval.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.exceptions import ResponseError

from . import _redis_compat as compat
from .epoch import EpochGuard


class PendingConnection:
    """A command sent on a pooled connection whose reply is not read yet (the connection stays
    checked out until :meth:`SyncTransport.complete`). Should it never be completed (a session
    dropped mid-flush, without rollback or close), its socket is closed when it is collected:
    never left open with a reply nobody reads."""

    __slots__ = ("__weakref__", "connection", "finalizer")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.finalizer = weakref.finalize(self, compat.disconnect, connection)

    def take(self) -> Any:
        """The connection, now the caller's to read from and return to the pool."""
        conn, self.connection = self.connection, None
        self.finalizer.detach()
        return conn


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

    def _on_connection(self, call: Callable[[Any, Any], Any], what: Any) -> Any:
        """``call(connection, what)`` on a pooled connection, under the connection's retry
        policy (reconnecting between attempts, as redis-py does); the connection goes back to
        the pool afterwards, closed first if the call failed with anything but an error
        reply."""
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

    def begin(self, command: Sequence[Any]) -> PendingConnection:
        conn = self._checkout()
        try:
            compat.send(conn, command)
        except BaseException:
            compat.disconnect(conn)
            compat.release(self._pool, conn)
            raise
        return PendingConnection(conn)

    def complete(self, handle: PendingConnection) -> Any:
        conn = handle.take()
        try:
            reply = compat.read(conn)
        except BaseException as exc:
            self._abandon(conn, exc)
            raise
        compat.release(self._pool, conn)
        return reply

    def ping(self) -> bool:
        return bool(self.client.ping())

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def scan(self, pattern: str, count: int) -> Iterator[Any]:
        keys: Iterator[Any] = self.client.scan_iter(match=pattern, count=count)
        return keys

    def unlink(self, keys: Sequence[Any]) -> int:
        return int(self.client.unlink(*keys))
