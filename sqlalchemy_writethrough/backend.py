"""Runs the protocol's scripts on a synchronous redis-py client, behind the circuit breaker.

Every method returns ``None`` (or False) instead of raising when Redis is unwell: the caller
decides what a failure means (a read falls back to the database; a lock failure is journaled or,
in strict mode, raised).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import weakref
from collections.abc import Sequence
from typing import Any, Literal, cast

import redis
from redis import BlockingConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .breaker import CircuitBreaker
from .protocol import Fetch, Script, current_payload
from .stats import Counters

log = logging.getLogger("sqlalchemy_writethrough")


class PendingReply:
    """A command sent on a pooled connection whose reply is not read yet (the connection
    stays checked out until :meth:`RedisBackend.finish`). Should it never be finished (a
    session dropped mid-flush, without rollback or close), its socket is closed when it is
    collected: never left open with a reply nobody reads."""

    __slots__ = ("__weakref__", "args", "connection", "finalizer", "keys", "script")

    def __init__(
        self, connection: Any, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        self.connection = connection
        self.script = script
        self.keys = keys
        self.args = args
        self.finalizer = weakref.finalize(self, connection.disconnect)

    def take(self) -> Any:
        """The connection, now the caller's to read from and return to the pool."""
        conn, self.connection = self.connection, None
        self.finalizer.detach()
        return conn


def _checkout_of(pool: Any) -> Any:
    """``pool.get_connection`` as a no-argument callable: redis-py before 5.3 requires a
    command name, 5.3 and later deprecate passing one."""
    try:
        inspect.signature(pool.get_connection).bind()
    except TypeError:
        return lambda: pool.get_connection("_")
    except ValueError:  # no signature (a C or wrapped pool): assume the current form
        pass
    return pool.get_connection


class RedisBackend:
    def __init__(self, client: redis.Redis, breaker: CircuitBreaker, counters: Counters) -> None:
        self.client = client
        self.breaker = breaker
        breaker.probe = self._ping
        #: called when Redis answers again after the breaker was open (journal replay)
        self.on_recovery: Any = None
        breaker.on_close = self._recovered
        self._counters = counters
        self._scripts = {s: client.register_script(s.source) for s in Script}
        pool = client.connection_pool
        self._direct = (
            getattr(client, "connection", None) is None
            and getattr(pool, "cache", None) is None
            and type(client).execute_command is redis.Redis.execute_command
        )
        self._checkout = _checkout_of(pool)
        # a flush's locks travel during its SQL on a connection of their own; a bounded,
        # blocking pool could run dry while writers wait on database row locks
        self.overlaps_locks = self._direct and not isinstance(pool, BlockingConnectionPool)

    def _command(self, *args: Any) -> Any:
        """One command and its reply on a pooled connection.

        ``Connection.send_command`` / ``read_response`` skip the per-command layers of
        ``Redis.execute_command`` (argument filtering, observability hooks): about 7 us of a
        65 us loopback round trip, on every cached read (``python -m benchmarks``). The
        connection's own retry policy (the client's ``retry``) still applies, as redis-py
        applies it. A single-connection client, client-side caching or a subclass's
        ``execute_command`` keep redis-py's own path.
        """
        if not self._direct:
            return cast(Any, self.client).execute_command(*args)

        def call(conn: Any) -> Any:
            conn.send_command(*args)
            return conn.read_response()

        return self._on_connection(call)

    def _on_connection(self, call: Any) -> Any:
        """``call(connection)`` on a pooled connection, under the connection's retry policy
        (reconnecting between attempts, as redis-py does); the connection goes back to the
        pool afterwards, closed first if the call failed with anything but an error reply."""
        conn = self._checkout()
        try:
            retry = getattr(conn, "retry", None)
            if retry is None:
                result = call(conn)
            else:
                result = retry.call_with_retry(lambda: call(conn), lambda error: conn.disconnect())
        except BaseException as exc:
            self._abandon(conn, exc)  # a reply may still be on its way: never reuse that socket
            raise
        self.client.connection_pool.release(conn)
        return result

    def _script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        registered = self._scripts[script]
        try:
            return self._command("EVALSHA", registered.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed server: load it once, run it again
            self._command("SCRIPT", "LOAD", registered.script)
            return self._command("EVALSHA", registered.sha, len(keys), *keys, *args)

    def _run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if not self.breaker.allow():
            self._counters.add("errors")
            return None
        try:
            reply = self._script(script, keys, args)
        except (RedisError, OSError) as exc:
            self._failed(script.value, exc)
            return None
        self._succeeded()
        return reply

    def send_lock(self, pairs: Sequence[str], owner: str, ttl_ms: int) -> PendingReply | None:
        """Send the lock script now and read its reply later (:meth:`finish`), so that its
        round trip overlaps the flush's SQL. None when it was not sent (the caller takes the
        locks synchronously, with the usual failure handling)."""
        if not self.overlaps_locks or not self.breaker.allow():
            return None
        registered = self._scripts[Script.LOCK]
        args = (owner, ttl_ms)
        try:
            conn: Any = self._checkout()
        except Exception as exc:
            log.debug("writethrough: Redis lock not sent: %r", exc)
            return None
        try:
            conn.send_command("EVALSHA", registered.sha, len(pairs), *pairs, *args)
        except Exception:
            conn.disconnect()
            self.client.connection_pool.release(conn)
            return None  # not counted as a failure: the synchronous lock decides
        return PendingReply(conn, Script.LOCK, pairs, args)

    def finish(self, pending: PendingReply) -> Any:
        """The reply of a command :meth:`send_lock` sent, or None when it failed. When the
        reply cannot be read (a broken connection, an unknown script), the script runs again
        synchronously, with the client's retry policy: a lock is idempotent for its owner."""
        conn = pending.take()
        if conn is None:
            return None
        try:
            reply = conn.read_response()
        except BaseException as exc:
            self._abandon(conn, exc)
            if not isinstance(exc, (RedisError, OSError)):
                raise
            if isinstance(exc, ResponseError) and not isinstance(exc, NoScriptError):
                self._failed(pending.script.value, exc)
                return None
            return self._run(pending.script, pending.keys, pending.args)
        self.client.connection_pool.release(conn)
        self._succeeded()
        return reply

    def _ping(self) -> bool:
        return bool(self.client.ping())

    def _recovered(self) -> None:
        log.warning("writethrough: Redis answers again; the cache is back in use")
        if self.on_recovery is not None:
            self.on_recovery()

    def _succeeded(self) -> None:
        if self.breaker.success():
            self._recovered()

    def _failed(self, what: str, exc: BaseException) -> None:
        """A call failed: the breaker hears of it, it is counted, and logged (a warning when
        it opens the breaker, debug otherwise)."""
        was_open = self.breaker.is_open
        self.breaker.failure()
        self._counters.add("errors")
        level = logging.WARNING if self.breaker.is_open != was_open else logging.DEBUG
        log.log(level, "writethrough: Redis %s failed: %r", what, exc)

    def _abandon(self, conn: Any, exc: BaseException) -> None:
        """Return the connection of a failed command to the pool, closed first unless Redis
        answered with an error (then it is in a clean state)."""
        if not isinstance(exc, ResponseError):
            conn.disconnect()
        self.client.connection_pool.release(conn)

    def peek(self, key: str, gen_key: str) -> memoryview | Literal[False] | None:
        """The row payload if the entry is a VALUE of the current generation (one MGET, no
        script: both keys share a hash slot); False when it is anything else; None when Redis
        failed."""
        if not self.breaker.allow():
            self._counters.add("errors")
            return None
        try:
            replies: list[Any] = self._command("MGET", key, gen_key)
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return None
        self._succeeded()
        return current_payload(replies[0], replies[1])

    def peek_many(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[memoryview | Literal[False]] | None:
        """:meth:`peek` for many entries in one MGET (standalone Redis: any slots); each
        bucket's generation key is sent once."""
        if not self.breaker.allow():
            self._counters.add("errors")
            return None
        gen_keys = list(dict.fromkeys(gen_key for _, gen_key in pairs))
        try:
            replies: list[Any] = self._command("MGET", *[key for key, _ in pairs], *gen_keys)
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return None
        self._succeeded()
        gens = dict(zip(gen_keys, replies[len(pairs) :], strict=True))
        return [
            current_payload(value, gens[gen_key])
            for (_, gen_key), value in zip(pairs, replies, strict=False)
        ]

    def fetch_many(
        self, items: Sequence[tuple[str, str, str]], lease_ms: int
    ) -> list[tuple[Fetch, bytes | None]] | None:
        """:meth:`fetch` for many entries (key, generation key, lease) in one round trip."""
        replies: list[tuple[Fetch, bytes | None]] | None = self._pipelined(
            [(Script.FETCH, (k, g), (lease, lease_ms)) for k, g, lease in items],
            lambda r: (Fetch(int(r[0])), r[1] if len(r) > 1 else None),
        )
        return replies

    def fill_many(self, items: Sequence[tuple[str, str, str, bytes, bytes, int]]) -> list[Any]:
        """:meth:`fill` for many entries (key, gen key, lease, gen, payload, ttl) at once."""
        return (
            self._pipelined(
                [(Script.FILL, (k, g), (lease, gen, p, ttl)) for k, g, lease, gen, p, ttl in items],
                bool,
            )
            or []
        )

    def _pipelined(self, calls: Sequence[tuple[Script, Any, Any]], convert: Any) -> Any:
        """Several script calls in one round trip (redis-py's pipeline asks SCRIPT EXISTS
        first on every execute: a second round trip)."""
        if not calls:
            return []
        if not self.breaker.allow():
            self._counters.add("errors")
            return None
        commands = [
            ("EVALSHA", self._scripts[script].sha, len(keys), *keys, *args)
            for script, keys, args in calls
        ]
        try:
            replies = self._commands(commands)
            unknown = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if unknown:  # a restarted or flushed server: load what is missing, run those again
                for script in {calls[i][0] for i in unknown}:
                    self._command("SCRIPT", "LOAD", self._scripts[script].script)
                again = self._commands([commands[i] for i in unknown])
                for i, reply in zip(unknown, again, strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        except (RedisError, OSError) as exc:
            self._failed("pipeline", exc)
            return None
        self._succeeded()
        return [convert(r) for r in replies]

    def _commands(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Commands sent together on one pooled connection, their replies in order (an error
        reply is returned as its ResponseError, not raised); the connection's retry policy
        applies to the whole batch, as it does to a redis-py pipeline."""
        client: Any = self.client
        if not self._direct:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))

        def call(conn: Any) -> list[Any]:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        replies: list[Any] = self._on_connection(call)
        return replies

    def fetch(
        self, key: str, gen_key: str, lease: str, lease_ms: int
    ) -> tuple[Fetch, bytes | None] | None:
        reply = self._run(Script.FETCH, (key, gen_key), (lease, lease_ms))
        if reply is None:
            return None
        status = Fetch(int(reply[0]))
        return status, (reply[1] if len(reply) > 1 else None)

    def fill(
        self, key: str, gen_key: str, lease: str, gen: bytes, payload: bytes, ttl_ms: int
    ) -> bool | None:
        reply = self._run(Script.FILL, (key, gen_key), (lease, gen, payload, ttl_ms))
        return None if reply is None else bool(reply)

    def lock(self, pairs: Sequence[str], owner: str, ttl_ms: int) -> bool:
        return self._run(Script.LOCK, pairs, (owner, ttl_ms)) is not None

    def publish(self, pairs: Sequence[str], owner: str, items: Sequence[Any]) -> int | None:
        reply = self._run(Script.PUBLISH, pairs, (owner, *items))
        return None if reply is None else int(reply)

    def release(self, pairs: Sequence[str], owner: str) -> int | None:
        reply = self._run(Script.RELEASE, pairs, (owner,))
        return None if reply is None else int(reply)

    def invalidate(self, pairs: Sequence[str]) -> bool:
        return self._run(Script.INVALIDATE, pairs, ()) is not None

    def register_keyspace(self, registry_key: str, field: str) -> bool:
        """Record that entries exist under a (table, digest, buckets) keyspace, so that a
        migration can find every keyspace of a table, whichever code version wrote it."""
        if not self.breaker.allow():
            return False
        try:
            self.client.hset(registry_key, field, 1)
        except (RedisError, OSError) as exc:
            self.breaker.failure()
            log.debug("writethrough: registering a keyspace failed: %r", exc)
            return False
        self._succeeded()
        return True

    def read_registry(self, registry_key: str) -> list[str] | None:
        try:
            fields = self.client.hkeys(registry_key)
        except (RedisError, OSError) as exc:
            log.warning("writethrough: reading the keyspace registry failed: %r", exc)
            return None
        return [f.decode() if isinstance(f, bytes) else str(f) for f in fields]

    def bump_generations(self, gen_keys: Sequence[str]) -> bool:
        """Invalidate whole buckets now (a locked bucket is bumped when its lock ends)."""
        return self._run(Script.BUMP_GENS, gen_keys, (secrets.token_hex(4),)) is not None

    def lock_generations(self, gen_keys: Sequence[str], owner: str, ttl_ms: int) -> bool:
        return self._run(Script.LOCK_GENS, gen_keys, (owner, ttl_ms)) is not None

    def release_generations(self, gen_keys: Sequence[str], owner: str, committed: bool) -> bool:
        args = (owner, "1" if committed else "0", secrets.token_hex(4))
        return self._run(Script.RELEASE_GENS, gen_keys, args) is not None
