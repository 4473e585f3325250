"""Epochs: noticing a Redis that may have forgotten acknowledged writes, before reading from it.

Locks, leases and generations protect against everything but a Redis that goes back in time: a
restart from an older snapshot (or an AOF that lost its last second, or a restore), a failover to
a replica that had not received the latest writes, a ``REPLICAOF`` or a different server behind
the same address. Such a Redis holds old values under current-looking generations, and none of
the locks. Each of these changes the server's run id or replication id, so the cache checks that
identity against the one recorded in the prefix's epoch key:

* on every connection the cache uses, when it is first used and again at every reconnection (a
  restart or a failover breaks every connection, so no connection serves a read from the new
  server before the check), and at most ``interval`` seconds after its last check while it stays
  open (a ``REPLICAOF`` or ``FLUSHALL`` leaves connections open);
* when the identity differs, the first process to see it replaces every bucket generation of
  every keyspace in the registry, and of every keyspace it knows itself, and records the new
  identity, in one script: no entry written before the new epoch is served again, by any
  process. (Its own keyspaces count because the registry can be missing one: a ``FLUSHALL``
  empties it, and a process fills again before its next check notices the flush; a snapshot
  taken in that moment holds entries but no registry.)
* a process that finds an epoch another process started, after using an older one, replaces
  them again: it was writing elsewhere meanwhile (a Sentinel failover's old primary takes
  writes until it is demoted), so entries filled here since may predate its last commits;
* a Sentinel-managed connection is also compared, at each check, with the primary the
  sentinels name (asked at most every ``interval``), and moved there when they differ.

A connection whose check fails is not used (its operation fails like any Redis error: reads go to
the database, ``strict`` flushes are refused). A server that is not a primary is refused.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from redis.exceptions import ConnectionError, NoScriptError, ReadOnlyError

from . import _redis_compat as compat
from . import _sa_compat, forks
from .keys import (
    REGISTRY_WHOLE,
    generation_key_pattern,
    generation_keys_of,
    is_generation_key,
)
from .protocol import Epoch, Script, Scripts

log = logging.getLogger("sqlalchemy_writethrough")

#: a command sender: (*args) -> reply
Send = Callable[..., Any]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def same_server(epoch: str, other: str) -> bool:
    """Whether two epochs name the same server identity (run id and replication id): a
    process that last saw ``epoch`` has used the server of ``other`` all along, and a new
    token there only means that another process replaced the generations once more (a
    process that arrived late from another server). Comparing whole epochs would have each
    such process replace them again at every check, forever."""
    return epoch.split("|", 1)[0] == other.split("|", 1)[0]


#: keys a SCAN call looks at (a hint): few round trips over a large data set, each short
SCAN_COUNT = 5000


def scan_generations(
    sends: Iterable[Send],
    prefix: str,
    renew: Callable[[], bool] | None = None,
    every: float = 2.0,
) -> list[str] | Literal[False]:
    """Every generation key of ``prefix`` on the servers the ``sends`` talk to (one, or each
    primary of a Cluster, one after the other): what a new epoch replaces besides the
    registry's keyspaces when the registry is not whole (Redis forgot it, and a snapshot may
    hold entries of keyspaces it no longer lists: see :mod:`.siblings`), and what making it
    whole looks at. ``renew`` is called every ``every`` seconds of the SCAN, between two of
    its replies; False from it stops the SCAN, which then returns False."""
    pattern = generation_key_pattern(prefix)
    found: list[str] = []
    due = time.monotonic() + every
    for send in sends:
        cursor: Any = 0
        while True:
            cursor, keys = send("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
            found += [k for k in map(_text, keys) if is_generation_key(prefix, k)]
            if renew is not None and time.monotonic() >= due:  # between nodes too
                if not renew():
                    return False
                due = time.monotonic() + every
            if int(cursor) == 0:
                break
    return found


class EpochGuard:
    """Checks connections against the prefix's epoch; calls ``on_new_epoch(replaced)`` when
    the epoch changed since this process last looked (``replaced`` is the number of bucket
    generations this process replaced, or -1 when another process started the epoch);
    ``known_fields()`` lists the registry fields of the keyspaces this process knows."""

    def __init__(
        self,
        scripts: Scripts,
        prefix: str,
        epoch_key: str,
        registry_key: str,
        interval: float,
        address: str,
        on_new_epoch: Callable[[int], None],
        known_fields: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._scripts = scripts
        self._prefix = prefix
        self._epoch_key = epoch_key
        self._registry_key = registry_key
        self._interval = interval
        self._address = address
        self._on_new_epoch = on_new_epoch
        self._known_fields = known_fields
        #: connection -> time.monotonic() after which it is checked again
        self._due: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._client_due = 0.0
        #: the primary the sentinels named last (Sentinel-managed pools only), and until when
        self._primary: tuple[Any, ...] = ()
        self._primary_due = 0.0
        self._lock = threading.Lock()
        #: the epoch key's value this process saw last (None: not looked yet)
        self.epoch: str | None = None
        forks.renew_in_child(self, "_lock")

    def check_connection(self, conn: Any) -> None:
        """Before a pooled connection is used: checked when new, and every ``interval``."""
        due = self._due.get(conn)
        if due is not None and due > time.monotonic():
            return
        try:
            if self._primary_moved(conn):
                # the sentinels name another primary: connect() asks them again (sending on a
                # closed connection would reconnect to the same address)
                compat.disconnect(conn)
                compat.connect(conn)
            where = _where(self._address, conn)
            # under the client's retry policy, as a command: a pooled connection the server
            # closed (a restart) is reconnected, which checks it (see _reconnected)
            compat.with_retry(conn, lambda c, _: self._check(_sender(c), where), None)
        except BaseException:
            compat.disconnect(conn)  # never leave it connected and unchecked
            raise
        self._due[conn] = self._next_check(conn)
        if due is None:
            compat.on_connect(conn, self._reconnected)

    def _primary_moved(self, conn: Any) -> bool:
        """True for a Sentinel-managed connection to a server the sentinels (asked at most
        every ``interval``) no longer name as the primary: after a promotion the old primary
        takes writes, unseen by the new one, until Sentinel demotes it about 10 s later."""
        if not compat.follows_sentinel_primary(conn):
            return False
        now = time.monotonic()
        if self._primary_due <= now:
            self._primary = compat.sentinel_primary(conn)
            self._primary_due = now + self._interval
        return compat.peer(conn) != self._primary

    def _next_check(self, conn: Any) -> float:
        """When ``conn``, just checked, is checked again: after ``interval``, and for a
        Sentinel-managed connection no later than the sentinels' answer it was compared with
        expires. That answer is shared by the process's connections: one checked with an answer
        asked before a promotion, and due a whole interval later, would stay on the old primary
        up to twice the interval after the promotion
        (``test_each_connection_leaves_the_old_primary_within_the_check_interval``)."""
        due = time.monotonic() + self._interval
        if compat.follows_sentinel_primary(conn) and self._primary_due < due:
            return self._primary_due
        return due

    def _reconnected(self, conn: Any) -> None:
        """redis-py calls this inside ``connect()``: a reconnection is checked before the
        command that caused it is sent (an error here fails that command)."""
        try:
            self._check(_sender(conn), _where(self._address, conn))
        except BaseException:
            compat.disconnect(conn)
            raise
        self._due[conn] = time.monotonic() + self._interval

    def check_client(self, send: Send) -> None:
        """For clients used through ``execute_command`` (``send``; no access to their
        connections): checked every ``interval``; a reconnection in between is seen at the
        next check."""
        if self._client_due > time.monotonic():
            return
        self._check(send, self._address)
        self._client_due = time.monotonic() + self._interval

    def expire(self) -> None:
        """Every connection due for a check at its next use, against a fresh answer from the
        sentinels: see :meth:`.ScriptBackend.leave`."""
        with self._lock:
            self._primary_due = 0.0
            self._client_due = 0.0
            for conn in list(self._due.keys()):
                self._due[conn] = 0.0

    def due(self, conn: Any) -> bool:
        """Whether ``conn`` must be checked before its next use (asyncio transports ask
        first: the check itself is a coroutine)."""
        due = self._due.get(conn)
        return due is None or due <= time.monotonic()

    # -- redis.asyncio connections: the same checks, awaited (see .redis_async) ----------

    async def check_connection_async(self, conn: Any) -> None:
        """:meth:`check_connection` of a ``redis.asyncio`` connection, on its event loop;
        the check itself (:meth:`_check`) runs in a greenlet that awaits each reply."""
        due = self._due.get(conn)
        if due is not None and due > time.monotonic():
            return
        try:
            if await self._primary_moved_async(conn):
                await compat.adisconnect(conn)
                await compat.aconnect(conn)
            where = _where(self._address, conn)
            # as check_connection: a connection the server closed is reconnected; asyncio
            # sees the close only once its loop has run since (a blocking restart: not yet)
            await compat.awith_retry(
                conn,
                lambda c, _: _sa_compat.greenlet_spawn(self._check, _async_sender(c), where),
                None,
            )
        except BaseException:
            await compat.adisconnect(conn)
            raise
        self._due[conn] = self._next_check(conn)
        if due is None:
            compat.on_connect(conn, self._reconnected_async)

    async def _primary_moved_async(self, conn: Any) -> bool:
        if not compat.follows_sentinel_primary(conn):
            return False
        now = time.monotonic()
        if self._primary_due <= now:
            self._primary = await compat.async_sentinel_primary(conn)
            self._primary_due = now + self._interval
        return compat.peer(conn) != self._primary

    async def _reconnected_async(self, conn: Any) -> None:
        """redis.asyncio awaits this inside ``connect()``, as :meth:`_reconnected`."""
        try:
            await _sa_compat.greenlet_spawn(
                self._check, _async_sender(conn), _where(self._address, conn)
            )
        except BaseException:
            await compat.adisconnect(conn)
            raise
        self._due[conn] = time.monotonic() + self._interval

    def _check(self, send: Send, where: str) -> None:
        moved = False  # the epoch moved while this ran: everything was replaced since
        for _ in range(3):
            reply = self._script(send, Script.EPOCH_CHECK, [self._epoch_key], [])
            status = Epoch(int(reply[0]))
            force = False
            if status is Epoch.VALID:
                if self.epoch is None or same_server(self.epoch, _text(reply[1])) or moved:
                    self._saw(_text(reply[1]), -1, where)
                    return
                # another process started this epoch while this one was still writing to the
                # server before it (a failover's old primary): those writes are missing here,
                # and entries may have been filled over them meanwhile
                seen, force = reply[1], True
            elif status is Epoch.NOT_PRIMARY:
                raise ReadOnlyError(
                    f"Redis at {where} is a {_text(reply[1])}, not a primary: the "
                    "cache writes on every commit and must talk to the primary"
                )
            else:
                seen = reply[2]
            registered = [_text(f) for f in send("HKEYS", self._registry_key)]
            fields = registered + sorted(set(self._known_fields()) - set(registered))
            gen_keys = [k for f in fields for k in generation_keys_of(self._prefix, f)[1]]
            if REGISTRY_WHOLE not in registered:
                found = scan_generations([send], self._prefix)
                assert found is not False  # no renew: never stopped
                gen_keys = list(dict.fromkeys(gen_keys + found))
            nonce = secrets.token_hex(4)
            reply = self._script(
                send,
                Script.EPOCH_BUMP,
                [self._epoch_key, *gen_keys],
                [seen, nonce, "1" if force else "0"],
            )
            status = Epoch(int(reply[0]))
            if status is Epoch.VALID:
                # a prefix never used on this Redis (no epoch, no keyspace) starts quietly
                # the first look at a prefix with no epoch key yet (a new prefix, or data from
                # before epochs) starts its epoch quietly
                fresh = not seen and self.epoch is None
                self._saw(_text(reply[1]), -1 if fresh else int(reply[2]), where, force)
                return
            if status is Epoch.NOT_PRIMARY:
                continue  # demoted between the two scripts: the check says so
            moved = True
        raise ConnectionError(f"Redis at {where}: its epoch kept changing; not used")

    def _saw(self, epoch: str, replaced: int, where: str, late: bool = False) -> None:
        with self._lock:
            changed = self.epoch != epoch
            first = self.epoch is None
            self.epoch = epoch
        if replaced >= 0:
            what = (
                "another process started this epoch while this one used the server before it "
                "(a failover's old primary?)"
                if late
                else "new epoch (the server restarted, failed over, was flushed or replaced)"
            )
            log.warning(
                "writethrough: Redis at %s: %s: %s; every entry written before it was "
                "invalidated (%d bucket generations replaced)",
                where,
                what,
                epoch.split("|", 1)[0],
                replaced,
            )
        if replaced >= 0 or (changed and not first):
            self._on_new_epoch(replaced)

    def _script(self, send: Send, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        command = self._scripts.call(script, keys, args)
        try:
            return send(*command)
        except NoScriptError:
            send("SCRIPT", "LOAD", self._scripts.source[script])
            return send(*command)


def _sender(conn: Any) -> Send:
    """A command sender over a ``redis-py`` connection."""
    return lambda *args: compat.call(conn, args)


def _async_sender(conn: Any) -> Send:
    """A command sender over a ``redis.asyncio`` connection, for code in a greenlet."""
    return lambda *args: _sa_compat.await_(compat.acall(conn, args))


def _where(address: str, conn: Any) -> str:
    """For messages: a Sentinel service's address names the server the connection reached."""
    if not compat.is_sentinel_managed(conn):
        return address
    host, port = compat.peer(conn)
    return f"{address} at {host}:{port}"
