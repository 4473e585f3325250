"""The I/O seam under the backend: how commands reach one kind of Redis client.

:class:`~.backend.ScriptBackend` writes the protocol once (script calls, reply parsing, the
``NOSCRIPT`` reload, the circuit breaker's accounting, failure logging) over a
:class:`Transport`, which only moves commands and replies. A transport exists per client kind:
:class:`~.redis_sync.SyncTransport` for a ``redis.Redis`` client (standalone or Sentinel); an
asyncio transport awaits ``redis.asyncio`` from inside SQLAlchemy's greenlet; a Cluster transport
routes each command to the node of its keys' slot and sets :attr:`Transport.clustered`, which
makes the backend split every multi-key script call into one call per hash tag
(:func:`.protocol.split_by_hash_tag`) and send them as one batch.

Every method raises what the client raises (``redis.exceptions.RedisError``, ``OSError``); the
backend decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol


class Transport(Protocol):
    #: for log lines: which Redis, never its password
    address: str
    #: True when every script call must touch keys of one hash slot (Redis Cluster)
    clustered: bool
    #: True when :meth:`begin` can send a command now and leave its reply for later, on a
    #: connection of its own (a flush's locks travel while the database runs its SQL)
    overlaps: bool

    def command(self, *args: Any) -> Any:
        """One command; its reply (an error reply raises its ``ResponseError``)."""
        ...

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Commands sent together, in one round trip per connection involved; their replies in
        order, an error reply returned as its ``ResponseError`` rather than raised."""
        ...

    def load_script(self, source: str) -> None:
        """``SCRIPT LOAD`` on every server a later ``EVALSHA`` of it may reach."""
        ...

    def begin(
        self,
        command: Sequence[Any],
        after: Sequence[Any] | None = None,
        before: Sequence[Any] | None = None,
    ) -> Any:
        """Send ``command`` now on a connection of its own (``after``, when given, behind
        it in the same write: :meth:`complete` reads its reply too and keeps it in the
        handle's ``after``, an error reply as its exception; ``before`` ahead of it, its
        reply read and dropped); a handle for :meth:`complete`.
        Raises when it could not be sent (nothing is left checked out then)."""
        ...

    def complete(self, handle: Any) -> Any:
        """The reply of a command :meth:`begin` sent; the connection goes back to the pool
        (closed first unless the reply was read or was an error reply). A handle dropped
        without this closes its connection when collected."""
        ...

    def ping(self) -> bool:
        """A cheap health check for the circuit breaker's probe (no epoch check)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait without holding anything (a thread sleeps; an event loop runs other tasks)."""
        ...

    def servers(self) -> list[Callable[..., Any]]:
        """One ``send(*args)`` per server the keys live on (the server itself; every primary
        of a Cluster): it runs one command there and returns the reply (an error reply
        raised). For a walk of every server's keys that acts between two ``SCAN`` replies."""
        ...

    def scan(self, pattern: str, count: int) -> Iterable[Any]:
        """Every key matching the glob ``pattern`` (``SCAN``, never ``KEYS``; every primary on
        a Cluster)."""
        ...

    def unlink(self, keys: Sequence[Any]) -> int:
        """``UNLINK`` these keys (any slots); how many existed."""
        ...


class HoldingTransport(Transport, Protocol):
    """A transport whose :meth:`complete` can keep the connection checked out for one more
    command (``holds`` True): a commit's publish goes on its flush's lock connection, one
    pool checkout and release fewer (:class:`~.redis_sync.SyncTransport`)."""

    holds: bool

    def complete(self, handle: Any, hold: bool = False) -> Any:
        """:meth:`Transport.complete`; with ``hold``, the connection stays in ``handle``."""
        ...

    def command_on(self, handle: Any, *args: Any) -> Any:
        """:meth:`Transport.command` on the connection ``handle`` holds, which then goes back
        to the pool (a new checkout when it holds none any more)."""
        ...

    def batch_on(self, handle: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """:meth:`Transport.batch` on the connection ``handle`` holds, as :meth:`command_on`."""
        ...

    def let_go(self, handle: Any) -> None:
        """Give back the connection ``handle`` holds, if any."""
        ...
