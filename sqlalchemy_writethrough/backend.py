"""The protocol's operations, written once, over a transport, behind the circuit breaker.

:class:`Backend` declares the few operations the session hooks call. :class:`ScriptBackend`
implements them for every kind of client: it builds each script call, parses its reply, loads a
script again after ``NOSCRIPT``, counts and logs failures and tells the circuit breaker; the
:class:`~.transport.Transport` underneath only moves commands (sync redis-py, asyncio, Cluster).

Every operation returns ``None`` (or False) instead of raising when Redis is unwell: the caller
decides what a failure means (a read falls back to the database; a lock failure is journaled or,
in strict mode, raised).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from redis.exceptions import NoScriptError, RedisError, ResponseError

from . import _redis_compat as compat
from .breaker import CircuitBreaker, weakly
from .diagnostics import explain, is_cluster_reply, is_configuration_error, redis_address
from .epoch import EpochGuard, scan_generations
from .keys import (
    epoch_key,
    registry_key,
    version_key_of,
)
from .protocol import (
    Fetch,
    Script,
    Scripts,
    current_payload,
    generations_made,
    locked_count,
    payloads_after,
    split_by_hash_tag,
    value_prefix,
)
from .redis_async import AsyncTransport, ClosedCacheError, OtherEventLoopError, wire_prober
from .redis_sync import SyncTransport
from .stats import Counters
from .transport import HoldingTransport, Transport

if TYPE_CHECKING:
    from .near import NearCache

log = logging.getLogger("sqlalchemy_writethrough")

_FAILURES = (RedisError, OSError)

#: How far apart two Cluster nodes' clocks may be (microseconds): a generation made less than
#: this before a registration on another node may have been made after it
#: (:meth:`ScriptBackend._register_behind`)
CLOCK_SKEW_US = 100_000


class Registration:
    """Keyspaces recorded in the registry in the round trip of a lease's fetch or of a
    commit's lock (``lua/register.lua``; see :mod:`.siblings`): acknowledged before the
    reader reads the database or the writer commits, every time. Pipelined behind the fetch
    or lock, not ahead of it: a registry Redis forgot and another process made again between
    the two commands (a pipeline that reached Redis in two reads) then lists the keyspace,
    and a generation made before it by that fetch or lock is older than the registry and
    replaced when it is made whole. Ahead, the registration would land in the registry Redis
    forgot, and the generation would be newer than the registry that does not list it. On
    a Cluster, where the two run on different nodes in either order, it runs again behind
    them when their generation may be newer than it (:meth:`ScriptBackend._register_behind`).
    ``reply`` the script's reply, or ``error`` the error reply Redis gave instead (``reply``
    stays None when the round trip failed)."""

    __slots__ = ("ahead", "args", "error", "fields", "keys", "lead", "reply")

    def __init__(
        self,
        keys: tuple[str, ...],
        args: tuple[Any, ...],
        fields: tuple[str, ...],
        ahead: bool = False,
        lead: bool = False,
    ) -> None:
        self.keys = keys
        self.args = args
        #: the registry fields recorded (the tail of ``args``)
        self.fields = fields
        #: on a Cluster, sent in a round trip of its own, before the calls it goes with (a
        #: process's first: the registry may not exist yet). Pipelined to other nodes, their
        #: scripts may run first, and a registry made after a generation counts it as older
        #: than itself: making it whole replaces it (see .siblings), a cold bucket where a
        #: new prefix's first commit has just published
        self.ahead = ahead
        #: on one server, sent ahead of the calls as well as behind them (in the same
        #: pipeline), while the process has not seen the registry whole: for the same reason
        #: (a registry made behind the lock would replace what a new prefix's first commit
        #: publishes)
        self.lead = lead
        self.reply: Any = None
        self.error: BaseException | None = None

    def heard(self, reply: Any) -> None:
        if isinstance(reply, BaseException):
            # a reply heard before (one that ran ahead) says nothing of this one: a refused
            # registration behind the calls is a refusal (review finding: CLUSTERDOWN there
            # let the fill through on the reply ahead)
            self.reply, self.error = None, reply
        else:
            self.reply, self.error = reply, None

    @property
    def ran_us(self) -> int | None:
        """The server time (microseconds) the registration last ran at, from its reply."""
        reply = self.reply
        if type(reply) is int:
            return reply
        if type(reply) is list and len(reply) > 2:
            return int(reply[2])
        return None


class PendingReply:
    """A lock script sent by :meth:`Backend.send_lock` whose reply is not read yet."""

    __slots__ = ("args", "handle", "held", "keys", "register", "script")

    def __init__(
        self,
        handle: Any,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        register: Registration | None = None,
    ):
        self.handle = handle
        self.script = script
        self.keys = keys
        self.args = args
        #: the registration sent behind the lock, if any
        self.register = register
        #: after ``finish(hold=True)``: the handle holding the connection for the publish
        self.held: Any = None


class VersionProbe:
    """The registry's version, read in the same round trip as a publish (see
    :mod:`.siblings`): ``read`` stays False when it could not be read."""

    __slots__ = ("error", "key", "read", "value")

    def __init__(self, key: str) -> None:
        self.key = key
        self.read = False
        self.value: Any = None
        #: the error reply Redis gave instead (an ACL without the key, say), if any
        self.error: BaseException | None = None

    def heard(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 1:
            self.value, self.read = reply[0], True
        elif isinstance(reply, BaseException):
            self.error = reply


class Backend(Protocol):
    """What the read and write paths ask of Redis."""

    #: for log lines: which Redis, never its password
    address: str
    #: the latest failure, said by errors that must name one (strict mode's)
    last_error: str
    breaker: CircuitBreaker
    transport: Transport

    def peek(self, key: str, gen_key: str) -> memoryview | Literal[False] | None: ...

    def peek_many(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[memoryview | bytes | Literal[False]] | None: ...

    def fetch(
        self,
        key: str,
        gen_key: str,
        lease: str,
        lease_ms: int,
        register: Registration | None = None,
    ) -> tuple[Fetch, bytes | None] | None: ...

    def fetch_many(
        self,
        items: Sequence[tuple[str, str, str]],
        lease_ms: int,
        register: Registration | None = None,
    ) -> list[tuple[Fetch, bytes | None]] | None: ...

    def wait_for_fill(
        self,
        key: str,
        gen_key: str,
        lease: str,
        lease_ms: int,
        budget: float,
        register: Registration | None = None,
    ) -> tuple[Fetch, bytes | None] | None: ...

    def fill(
        self, key: str, gen_key: str, lease: str, gen: bytes, payload: bytes, ttl_ms: int
    ) -> bool | None: ...

    def fill_many(self, items: Sequence[tuple[str, str, str, bytes, bytes, int]]) -> list[Any]: ...

    def send_lock(
        self,
        pairs: Sequence[str],
        owner: str,
        ttl_ms: int,
        expected: Sequence[bytes] | None = None,
        register: Registration | None = None,
    ) -> PendingReply | None: ...

    def finish(self, pending: PendingReply, hold: bool = False) -> Any: ...

    def leave(self) -> None: ...

    def let_go(self, held: Any) -> None: ...

    def lock(
        self,
        pairs: Sequence[str],
        owner: str,
        ttl_ms: int,
        expected: Sequence[bytes] | None = None,
        register: Registration | None = None,
    ) -> bool: ...

    def publish(
        self,
        pairs: Sequence[str],
        owner: str,
        items: Sequence[Any],
        held: Any = None,
        version: VersionProbe | None = None,
    ) -> int | None: ...

    def release(self, pairs: Sequence[str], owner: str) -> int | None: ...

    def invalidate(self, pairs: Sequence[str], ended_owners: Sequence[str] = ()) -> bool: ...

    def lock_generations(self, gen_keys: Sequence[str], owner: str, ttl_ms: int) -> bool: ...

    def release_generations(self, gen_keys: Sequence[str], owner: str, committed: bool) -> bool: ...

    def bump_generations(self, gen_keys: Sequence[str]) -> bool: ...

    def replace_generations_before(self, gen_keys: Sequence[str], before: str) -> int | None: ...

    def write_batch(
        self,
        calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
        version: VersionProbe | None = None,
    ) -> list[int] | None: ...

    def read_registry(self, registry_key: str) -> list[str] | None: ...

    def read_registry_version(self, registry_key: str) -> tuple[list[str], Any] | None: ...

    def probe_version(self, probe: VersionProbe) -> None: ...

    def registry_whole(
        self, keys: Sequence[str], step: str, token: str, lease_ms: int, attempt: str = ""
    ) -> tuple[int, Any]: ...

    def generation_keys(
        self, prefix: str, renew: Callable[[], bool] | None = None, every: float = 2.0
    ) -> list[str] | Literal[False] | None: ...

    def delete_matching(self, patterns: Sequence[str]) -> int: ...


class ScriptBackend:
    """:class:`Backend` over any :class:`~.transport.Transport`."""

    def __init__(
        self,
        transport: Transport,
        breaker: CircuitBreaker,
        counters: Counters,
        scripts: Scripts | None = None,
        epoch: EpochGuard | None = None,
    ) -> None:
        self.transport = transport
        self.breaker = breaker
        breaker.probe = transport.ping
        #: called when Redis answers again after the breaker was open (journal replay)
        self.on_recovery: Callable[[], object] | None = None
        breaker.on_close = weakly(self._recovered)  # see weakly()
        self._counters = counters
        self.address = transport.address
        self._refusals_logged: set[tuple[type, str]] = set()
        self.last_error = ""
        #: called (with this backend) when the server refuses as a Redis Cluster node does
        self.on_cluster_node: Callable[[ScriptBackend], None] | None = None
        self._scripts = scripts or Scripts()
        #: the epoch check of the transport's connections, if any (see :mod:`.epoch`)
        self.epoch = epoch
        #: the cache's near cache, told of every write script this process runs
        self.near: NearCache | None = None
        #: the transport, when it can keep a lock's connection for the publish
        self._holding: HoldingTransport | None = (
            cast("HoldingTransport", transport) if getattr(transport, "holds", False) else None
        )
        #: on a Cluster, the generations (made-at times) a registration of these keyspaces
        #: ran behind: made before it, so older than any registry made since
        #: (:meth:`_register_behind`); bounded, forgotten as a whole when full
        self._behind: dict[tuple[str, ...], set[int]] = {}

    @property
    def near_channel(self) -> str:
        """The channel the write scripts publish their changes on ('' for none)."""
        return self._scripts.channel

    @near_channel.setter
    def near_channel(self, channel: str) -> None:
        self._scripts.channel = channel

    @property
    def overlaps_locks(self) -> bool:
        """Whether a flush's locks travel during its SQL (see :meth:`send_lock`)."""
        return self.transport.overlaps

    # -- running scripts ---------------------------------------------------------------------

    def _eval(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], held: Any = None
    ) -> Any:
        """One script call (on the connection ``held`` holds, if any); a server that lost its
        scripts (restarted, flushed) gets it loaded once and runs it again."""
        transport = self.transport
        command = self._scripts.call(script, keys, args)
        try:
            if held is not None and self._holding is not None:
                return self._holding.command_on(held, *command)
            return transport.command(*command)
        except NoScriptError:
            transport.load_script(self._scripts.source[script])
            return transport.command(*command)

    def _run(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        held: Any = None,
        near_after: bool = True,
    ) -> Any:
        """``near_after=False``: the caller tells the near cache itself (or not at all)."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        try:
            if self.transport.clustered:
                reply = self._eval_split(script, keys, args)
            else:
                reply = self._eval(script, keys, args, held)
        except _FAILURES as exc:
            self._failed(script.value, exc)
            return None
        finally:
            if near_after and self.near is not None:
                self.near.wrote(script, keys)
        self._succeeded()
        return reply

    def _run_registered(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], register: Registration
    ) -> list[Any] | None:
        """:meth:`_run` with a registration (one batch; split per hash tag on a Cluster,
        where the registration goes to the registry's node): the script's replies, one per
        call, or None when Redis failed."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        calls = split_by_hash_tag(script, keys, args) if self.transport.clustered else None
        try:
            if calls is None:
                replies = self._eval_batch([(script, keys, args)], register=register)
            else:
                replies = self._eval_batch([(script, k, a) for k, a in calls], register=register)
        except _FAILURES as exc:
            self._failed(script.value, exc)
            return None
        finally:
            if self.near is not None:
                self.near.wrote(script, keys)
        self._succeeded()
        return replies

    def _eval_split(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A multi-key script on a Cluster: one call per hash tag, sent as one batch (the
        transport pipelines per node); the counts they reply add up."""
        calls = split_by_hash_tag(script, keys, args)
        if len(calls) == 1:
            return self._eval(script, *calls[0])
        replies = self._eval_batch([(script, k, a) for k, a in calls])
        return sum(map(locked_count, replies))

    def _eval_batch(
        self,
        calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
        version: VersionProbe | None = None,
        held: Any = None,
        register: Registration | None = None,
    ) -> list[Any]:
        """Several script calls in one batch; raises the first error reply. ``version``: the
        registry's version is read in the same batch, after the scripts (an error reply to
        it leaves it unread); ``held``: as for :meth:`_eval`; ``register``: a registration
        sent behind the scripts (see :class:`Registration`; its error reply is its own,
        raised by none)."""
        scripts = self._scripts
        led = False  # a registration ahead of the calls too, its reply dropped
        apart = None  # on a Cluster: the registration, which ran on another node
        if register is not None:
            registering = (Script.REGISTER, register.keys, register.args)
            if not self.transport.clustered:
                led = register.lead
                calls = [registering, *calls, registering] if led else [*calls, registering]
            elif register.ahead:
                register.ahead = False
                self._eval_batch((), register=register)  # a round trip of its own, ahead
                apart, register = register, None
            else:
                calls = [*calls, registering]
                apart = register
        commands = [scripts.call(script, keys, args) for script, keys, args in calls]
        if version is not None:
            commands.append(("MGET", version.key))
        if held is not None and self._holding is not None:
            replies = self._holding.batch_on(held, commands)
        else:
            replies = self.transport.batch(commands)
        if version is not None:
            version.heard(replies.pop())
            commands.pop()
        unknown = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if unknown and register is not None and unknown[-1] != len(replies) - 1:
            # the registration goes behind them again (see Registration: a registry made
            # again while the script was loaded would not list what they fill or publish)
            unknown.append(len(replies) - 1)
        if unknown:  # a restarted or flushed server: load what is missing, run those again
            for script in {calls[i][0] for i in unknown}:
                self.transport.load_script(scripts.source[script])
            again = self.transport.batch([commands[i] for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        if register is not None:
            register.heard(replies.pop())
            if led:
                replies.pop(0)  # the one behind says the same, later
        if apart is not None and replies:
            self._register_behind(apart, calls, replies)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    def _register_behind(
        self,
        register: Registration,
        calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
        replies: Sequence[Any],
    ) -> None:
        """On a Cluster the registration runs on the registry's node, the fetches and locks on
        theirs, in no order between nodes: a registry Redis forgot and another process made
        again between the two would not list the keyspace, while a generation the fetch or
        lock made (or found made) after it is not replaced when that registry is made whole.
        So when a generation they replied with is not clearly older than the registration,
        it runs again, now behind them, before the reader reads the database or the writer
        commits: a round trip in the rare case (a bucket's first use or new generation, up
        to :data:`CLOCK_SKEW_US` before), once per generation and keyspaces, none
        otherwise."""
        ran = register.ran_us
        if ran is None:
            return  # failed or refused: registered() says so
        young = {made for made in generations_made(calls, replies) if made > ran - CLOCK_SKEW_US}
        behind = self._behind.get(register.fields)
        if not young or (behind is not None and young <= behind):
            return
        self._eval_batch((), register=register)
        if register.ran_us is not None:
            if behind is None or len(behind) > 4096:
                if len(self._behind) > 64:
                    self._behind.clear()
                behind = self._behind[register.fields] = set()
            behind |= young

    def _pipelined(
        self,
        calls: Sequence[tuple[Script, Any, Any]],
        convert: Any,
        register: Registration | None = None,
    ) -> Any:
        """Several single-slot script calls in one round trip (redis-py's pipeline asks SCRIPT
        EXISTS first on every execute: a second round trip); ``register``: as for
        :meth:`_eval_batch`."""
        if not calls:
            return []
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        try:
            replies = self._eval_batch(calls, register=register)
        except _FAILURES as exc:
            self._failed("pipeline", exc)
            return None
        self._succeeded()
        return [convert(r) for r in replies]

    # -- the breaker and failures --------------------------------------------------------------

    def _recovered(self) -> None:
        log.warning(
            "writethrough: Redis at %s answers again; the cache is back in use", self.address
        )
        if self.on_recovery is not None:
            self.on_recovery()

    def _succeeded(self) -> None:
        if self.breaker.success():
            self._recovered()

    def _failed(self, what: str, exc: BaseException) -> None:
        """A call failed: the breaker hears of it, it is counted, and logged: a warning when
        it opens the breaker, or the first time the server refuses in a new way (a wrong
        password, a replica, a Cluster node: that does not pass by itself); debug otherwise.
        A call refused because the client belongs to another event loop is kept from the
        breaker: it says nothing of Redis (nothing was sent), and the breaker is every loop's:
        refusals on one loop would send the client's own loop to the database too; so is one
        refused because the cache was closed (nothing was sent either)."""
        was_open = self.breaker.is_open
        if not isinstance(exc, (OtherEventLoopError, ClosedCacheError)):
            self.breaker.failure()
        self._counters.error(type(exc).__name__)
        self.log_failure(what, exc, opened=self.breaker.is_open != was_open)

    def log_failure(self, what: str, exc: BaseException, *, opened: bool = False) -> None:
        if self.on_cluster_node is not None and is_cluster_reply(exc):
            self.on_cluster_node(self)
        why = explain(exc)
        self.last_error = f"Redis at {self.address}: {what} failed: {why}"
        level = logging.DEBUG
        if opened:
            level = logging.WARNING
        elif is_configuration_error(exc):
            kind = (type(exc), str(exc).split(" ", 1)[0])
            if kind not in self._refusals_logged:
                self._refusals_logged.add(kind)
                level = logging.WARNING
        log.log(
            level,
            "writethrough: Redis at %s: %s failed: %s%s",
            self.address,
            what,
            why,
            "; reads go to the database until it answers again" if opened else "",
        )

    # -- reads ---------------------------------------------------------------------------------

    def peek(self, key: str, gen_key: str) -> memoryview | Literal[False] | None:
        """The row payload if the entry is a VALUE of the current generation (one MGET, no
        script: both keys share a hash slot); False when it is anything else; None when Redis
        failed."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        try:
            replies: list[Any] = self.transport.command("MGET", key, gen_key)
        except _FAILURES as exc:
            self._failed("read", exc)
            return None
        self._succeeded()
        return current_payload(replies[0], replies[1])

    def peek_many(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[memoryview | bytes | Literal[False]] | None:
        """:meth:`peek` for many entries in one MGET (standalone Redis: any slots); each
        bucket's generation key is sent once."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        # the keys and the generation keys in two tuples, in C (no Python loop per pair)
        keys, gen_of = zip(*pairs, strict=True) if pairs else ((), ())
        gen_keys = list(dict.fromkeys(gen_of))
        try:
            replies: list[Any] = self.transport.command("MGET", *keys, *gen_keys)
        except _FAILURES as exc:
            self._failed("read", exc)
            return None
        self._succeeded()
        # what a current VALUE starts with, once per bucket
        prefixes = {
            gen_key: value_prefix(gen)
            for gen_key, gen in zip(gen_keys, replies[len(pairs) :], strict=True)
        }
        return payloads_after(replies, list(map(prefixes.get, gen_of)))  # every one is there

    def fetch(
        self,
        key: str,
        gen_key: str,
        lease: str,
        lease_ms: int,
        register: Registration | None = None,
    ) -> tuple[Fetch, bytes | None] | None:
        """The entry, or a lease on it (``lease``, '' for none); ``register``: keyspaces
        recorded in the registry with it, in the same round trip (see :class:`Registration`)."""
        if register is None:
            reply = self._run(Script.FETCH, (key, gen_key), (lease, lease_ms))
        else:
            replies = self._pipelined(
                [(Script.FETCH, (key, gen_key), (lease, lease_ms))], _same, register
            )
            reply = None if replies is None else replies[0]
        if reply is None:
            return None
        status = Fetch(int(reply[0]))
        return status, (reply[1] if len(reply) > 1 else None)

    def fetch_many(
        self,
        items: Sequence[tuple[str, str, str]],
        lease_ms: int,
        register: Registration | None = None,
    ) -> list[tuple[Fetch, bytes | None]] | None:
        """:meth:`fetch` for many entries (key, generation key, lease) in one round trip
        (``register``: as for :meth:`fetch`)."""
        replies: list[tuple[Fetch, bytes | None]] | None = self._pipelined(
            [(Script.FETCH, (k, g), (lease, lease_ms)) for k, g, lease in items],
            lambda r: (Fetch(int(r[0])), r[1] if len(r) > 1 else None),
            register,
        )
        return replies

    def wait_for_fill(
        self,
        key: str,
        gen_key: str,
        lease: str,
        lease_ms: int,
        budget: float,
        register: Registration | None = None,
    ) -> tuple[Fetch, bytes | None] | None:
        """Another reader holds the lease and is loading the row: poll briefly (up to
        ``budget`` seconds) for its fill rather than load the same row too (a thundering herd
        on a cold key). The last FETCH reply, or None when Redis failed. ``register``: as
        for :meth:`fetch`, with every poll (a poll may be granted the lease)."""
        deadline = time.monotonic() + budget
        pause = 0.001
        reply = None
        while time.monotonic() + pause < deadline:
            self.transport.sleep(pause)
            pause = min(pause * 2, 0.016)
            reply = self.fetch(key, gen_key, lease, lease_ms, register)
            if reply is None or reply[0] is not Fetch.BUSY or reply[1] != b"E":
                return reply
        return reply

    def fill(
        self, key: str, gen_key: str, lease: str, gen: bytes, payload: bytes, ttl_ms: int
    ) -> bool | None:
        reply = self._run(Script.FILL, (key, gen_key), (lease, gen, payload, ttl_ms))
        return None if reply is None else bool(reply)

    def fill_many(self, items: Sequence[tuple[str, str, str, bytes, bytes, int]]) -> list[Any]:
        """:meth:`fill` for many entries (key, gen key, lease, gen, payload, ttl) at once."""
        return (
            self._pipelined(
                [(Script.FILL, (k, g), (lease, gen, p, ttl)) for k, g, lease, gen, p, ttl in items],
                bool,
            )
            or []
        )

    # -- writes --------------------------------------------------------------------------------

    def send_lock(
        self,
        pairs: Sequence[str],
        owner: str,
        ttl_ms: int,
        expected: Sequence[bytes] | None = None,
        register: Registration | None = None,
    ) -> PendingReply | None:
        """Send the lock script now and read its reply later (:meth:`finish`), so that its
        round trip overlaps the flush's SQL. None when it was not sent (the caller takes the
        locks synchronously, with the usual failure handling). ``expected``: as for
        :meth:`lock`; ``register``: keyspaces recorded in the registry behind the locks (and
        ahead of them too, see :class:`Registration`), in the same write."""
        transport = self.transport
        if not transport.overlaps or not self.breaker.allow() or transport.clustered:
            return None
        args: tuple[Any, ...] = (owner, ttl_ms) if expected is None else (owner, ttl_ms, *expected)
        scripts = self._scripts
        registering = None
        if register is not None:
            registering = scripts.call(Script.REGISTER, register.keys, register.args)
        try:
            handle = transport.begin(
                scripts.call(Script.LOCK, pairs, args),
                registering,
                registering if register is not None and register.lead else None,
            )
        except Exception as exc:  # not counted as a failure: the synchronous lock decides
            log.debug("writethrough: Redis at %s: lock not sent: %s", self.address, explain(exc))
            return None
        return PendingReply(handle, Script.LOCK, pairs, args, register)

    def finish(self, pending: PendingReply, hold: bool = False) -> Any:
        """The reply of a command :meth:`send_lock` sent, or None when it failed. When the
        reply cannot be read (a broken connection, an unknown script), the script runs again
        synchronously, with the client's retry policy: a lock is idempotent for its owner.

        ``hold``: where the transport can, the connection stays checked out for the commit's
        publish (``pending.held``, for :meth:`publish`; :meth:`let_go` gives it back)."""
        handle, pending.handle = pending.handle, None
        if handle is None:
            return None
        register = pending.register
        try:
            holding = self._holding
            if hold and holding is not None:
                reply = holding.complete(handle, True)
                pending.held = handle
            else:
                reply = self.transport.complete(handle)
        except _FAILURES as exc:
            if register is not None and handle.after is not None:
                register.heard(handle.after)
            if self.near is not None:
                self.near.wrote(pending.script, pending.keys)
            if isinstance(exc, ResponseError) and not isinstance(exc, NoScriptError):
                self._failed(pending.script.value, exc)
                return None
            if register is not None and (register.reply is None or isinstance(exc, NoScriptError)):
                # sent again with the locks, behind them (see Registration)
                replies = self._run_registered(pending.script, pending.keys, pending.args, register)
                return None if replies is None else replies[0]
            return self._run(pending.script, pending.keys, pending.args)
        if register is not None:
            register.heard(handle.after)
            if isinstance(register.error, NoScriptError):  # a server that lost its scripts
                again = self._run(Script.REGISTER, register.keys, register.args)
                if again is not None:
                    register.heard(again)
        if self.near is not None:
            self.near.wrote(pending.script, pending.keys)
        self._succeeded()
        return reply

    def leave(self) -> None:
        """Before the process stops using Redis (``close()``, interpreter exit), on a
        Sentinel-managed pool: one ``PING`` on a connection checked against a fresh answer
        from the sentinels. After a promotion the old primary takes writes until Sentinel
        demotes it; a process that committed there arrives at the new primary at its next
        check, which replaces the generations another process's fills there may predate
        (:mod:`.epoch`). One that stops first would leave those fills served until their
        TTL: leaving, it arrives now. Never raises; nothing while the breaker is open."""
        client = getattr(self, "client", None)
        if self.epoch is None or self.epoch.epoch is None:
            return  # never used
        if not compat.follows_sentinel_primary(client):
            return
        if not self.breaker.allow():
            return
        self.epoch.expire()
        try:
            self.transport.command("PING")
        except Exception as exc:
            log.warning(
                "writethrough: Redis at %s: the last epoch check before leaving failed: %s; "
                "if the primary moved, entries this process's last commits changed may be "
                "served as they were until their TTL",
                self.address,
                explain(exc),
            )

    def let_go(self, held: Any) -> None:
        """Give back the connection :meth:`finish` held, unless a publish took it already."""
        if held is not None and self._holding is not None:
            self._holding.let_go(held)

    def lock(
        self,
        pairs: Sequence[str],
        owner: str,
        ttl_ms: int,
        expected: Sequence[bytes] | None = None,
        register: Registration | None = None,
    ) -> bool:
        """Lock the pairs' entries. ``expected``: one payload a pair (``b""``: none), the row
        as the writer loaded it; a new lock is contended unless it replaces exactly that.
        ``register``: keyspaces recorded in the registry with the locks, in the same round
        trip (see :class:`Registration`)."""
        args: tuple[Any, ...] = (owner, ttl_ms) if expected is None else (owner, ttl_ms, *expected)
        if register is None:
            return self._run(Script.LOCK, pairs, args) is not None
        return self._run_registered(Script.LOCK, pairs, args, register) is not None

    def publish(
        self,
        pairs: Sequence[str],
        owner: str,
        items: Sequence[Any],
        held: Any = None,
        version: VersionProbe | None = None,
    ) -> int | None:
        """The publish script; on the connection ``held`` holds (a lock's, see :meth:`finish`),
        which goes back to the pool with it, when given and still held. ``version``: the
        keyspace registry's version is read in the same round trip, after the publish."""
        if version is None:
            reply = self._run(Script.PUBLISH, pairs, (owner, *items), held)
            return None if reply is None else int(reply)
        counts = self._write_batch([(Script.PUBLISH, pairs, (owner, *items))], version, held)
        return None if counts is None else counts[0]

    def release(self, pairs: Sequence[str], owner: str) -> int | None:
        reply = self._run(Script.RELEASE, pairs, (owner,))
        return None if reply is None else int(reply)

    def invalidate(self, pairs: Sequence[str], ended_owners: Sequence[str] = ()) -> bool:
        """Drop the entries (a lock is marked contended); the locks of ``ended_owners``,
        transactions that have ended, are dropped with them."""
        return self._run(Script.INVALIDATE, pairs, ended_owners) is not None

    def bump_generations(self, gen_keys: Sequence[str]) -> bool:
        """Invalidate whole buckets now (a locked bucket is bumped when its lock ends)."""
        return self._run(Script.BUMP_GENS, gen_keys, (secrets.token_hex(4),)) is not None

    def replace_generations_before(self, gen_keys: Sequence[str], before: str) -> int | None:
        """:meth:`bump_generations` of the buckets whose generation the server made before
        ``before`` (microseconds), absent ones left absent: how many, None when Redis failed."""
        args = (secrets.token_hex(4), before)
        reply = self._run(Script.BUMP_GENS, gen_keys, args, near_after=False)
        if self.near is not None and (reply is None or int(reply)):
            self.near.wrote(Script.BUMP_GENS, gen_keys)  # buckets this process may hold
        return None if reply is None else int(reply)

    def lock_generations(self, gen_keys: Sequence[str], owner: str, ttl_ms: int) -> bool:
        return self._run(Script.LOCK_GENS, gen_keys, (owner, ttl_ms)) is not None

    def release_generations(self, gen_keys: Sequence[str], owner: str, committed: bool) -> bool:
        args = (owner, "1" if committed else "0", secrets.token_hex(4))
        return self._run(Script.RELEASE_GENS, gen_keys, args) is not None

    def write_batch(
        self,
        calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
        version: VersionProbe | None = None,
    ) -> list[int] | None:
        """Several multi-key write scripts (publishes, restores, bucket releases) in one round
        trip, run in order (on a Cluster, one call per hash tag, pipelined per node, which
        keeps the order of the calls on each key); each call's count, or None when Redis
        failed (the breaker and the counters hear of it, as for one call). ``version``: as
        for :meth:`publish`."""
        return self._write_batch(calls, version)

    def _write_batch(
        self,
        calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
        version: VersionProbe | None = None,
        held: Any = None,
    ) -> list[int] | None:
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        clustered = self.transport.clustered
        expanded: list[tuple[Script, Sequence[str], Sequence[Any]]] = []
        spans: list[int] = []
        for script, keys, args in calls:
            parts = split_by_hash_tag(script, keys, args) if clustered else [(keys, args)]
            spans.append(len(parts))
            expanded += [(script, k, a) for k, a in parts]
        try:
            replies = self._eval_batch(expanded, version, None if clustered else held)
        except _FAILURES as exc:
            self._failed("publish", exc)
            return None
        finally:
            if self.near is not None:
                for script, keys, _ in calls:
                    self.near.wrote(script, keys)
        self._succeeded()
        counts: list[int] = []
        i = 0
        for n in spans:
            counts.append(sum(int(reply) for reply in replies[i : i + n]))
            i += n
        return counts

    # -- the keyspace registry, and clear() ----------------------------------------------------

    def probe_version(self, probe: VersionProbe) -> None:
        """Fill ``probe`` with the registry's version, in a round trip of its own (a
        background commit's check before ``commit()`` returns); left unread when Redis
        failed, which the breaker hears of."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return
        try:
            reply = self.transport.command("MGET", probe.key)
        except _FAILURES as exc:
            self._failed("registry version read", exc)
            return
        self._succeeded()
        probe.heard(reply)

    def read_registry_version(self, registry_key: str) -> tuple[list[str], Any] | None:
        """The registry's version and fields, read together (the version first: fields
        registered in between make the next publish read them again); None when Redis
        failed (logged by the caller, once)."""
        if not self.breaker.allow():
            return None
        try:
            replies = self.transport.batch(
                [("MGET", version_key_of(registry_key)), ("HKEYS", registry_key)]
            )
        except _FAILURES as exc:
            log.debug(
                "writethrough: Redis at %s: reading the keyspace registry failed: %s",
                self.address,
                explain(exc),
            )
            return None
        for reply in replies:
            if isinstance(reply, BaseException):
                log.debug(
                    "writethrough: Redis at %s: reading the keyspace registry failed: %s",
                    self.address,
                    explain(reply),
                )
                return None
        fields = [f.decode() if isinstance(f, bytes) else str(f) for f in replies[1]]
        return fields, replies[0][0]

    def read_registry(self, registry_key: str) -> list[str] | None:
        """The registry's fields; None when Redis failed. A plain client's Cluster refusal
        (MOVED...) switches the cache to the cluster, as any other command's does: the
        caller asks the runtime's new backend again (:meth:`.WriteThroughCache._read_registry`)."""
        try:
            fields: Iterable[Any] = self.transport.command("HKEYS", registry_key)
        except _FAILURES as exc:
            seen = self.on_cluster_node
            if seen is not None and is_cluster_reply(exc):
                seen(self)  # the switch says so itself, with a warning
                log.debug(
                    "writethrough: Redis at %s: reading the keyspace registry: %s",
                    self.address,
                    explain(exc),
                )
                return None
            log.warning(
                "writethrough: Redis at %s: reading the keyspace registry failed: %s",
                self.address,
                explain(exc),
            )
            return None
        return [f.decode() if isinstance(f, bytes) else str(f) for f in fields]

    def registry_whole(
        self, keys: Sequence[str], step: str, token: str, lease_ms: int, attempt: str = ""
    ) -> tuple[int, Any]:
        """A step of making a forgotten registry whole (``lua/registry_whole.lua``): its
        status, and with 2 the registry's birth (microseconds, text), with 1 the registry's
        (version, fields) when the reply has them, else None; (-1, None) when Redis failed.
        ``attempt``: which of the process's recoveries (one per call that begins one) takes
        the step."""
        reply = self._run(Script.REGISTRY_WHOLE, keys, (step, token, lease_ms, attempt))
        if reply is None:
            return -1, None
        if not isinstance(reply, list):
            return int(reply), None
        status = int(reply[0])
        if status == 2:
            since = reply[1]
            return status, since.decode() if isinstance(since, bytes) else str(since)
        fields = [f.decode() if isinstance(f, bytes) else str(f) for f in reply[2]]
        return status, (reply[1], fields)

    def generation_keys(
        self, prefix: str, renew: Callable[[], bool] | None = None, every: float = 2.0
    ) -> list[str] | Literal[False] | None:
        """Every generation key of ``prefix`` on the server (``SCAN``, on every primary of a
        Cluster, one after the other), or None when Redis failed; ``renew`` and ``every``: as
        for :func:`.epoch.scan_generations`."""
        if not self.breaker.allow():
            self._counters.error("breaker")
            return None
        try:
            found = scan_generations(self.transport.servers(), prefix, renew, every)
        except _FAILURES as exc:
            self._failed("SCAN", exc)
            return None
        self._succeeded()
        return found

    def delete_matching(self, patterns: Sequence[str]) -> int:
        """Delete every key matching one of the glob ``patterns`` (SCAN and UNLINK in batches,
        never KEYS); the number deleted. Raises what the client raises: this is an operator's
        call, who must hear that it failed."""
        transport = self.transport
        deleted = 0
        for pattern in patterns:
            batch: list[Any] = []
            for key in transport.scan(pattern, 1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += transport.unlink(batch)
                    batch.clear()
            if batch:
                deleted += transport.unlink(batch)
        return deleted


def _same(reply: Any) -> Any:
    return reply


class RedisBackend(ScriptBackend):
    """:class:`ScriptBackend` over a synchronous ``redis.Redis`` client (standalone, or a
    Sentinel ``master_for()`` client)."""

    def __init__(
        self,
        client: Any,
        breaker: CircuitBreaker,
        counters: Counters,
        *,
        prefix: str | None = None,
        epoch_interval: float = 1.0,
        on_new_epoch: Callable[[int], None] | None = None,
        known_keyspaces: Callable[[], Iterable[str]] = tuple,
        keep_connections: bool = True,
    ) -> None:
        """``prefix`` turns on the epoch check (see :mod:`.epoch`) of every connection the
        cache uses; ``on_new_epoch`` hears of each new epoch; ``known_keyspaces()`` gives the
        registry fields of the cache's own keyspaces, which a new epoch invalidates too;
        ``keep_connections``: whether threads may keep a pooled connection between commands
        (:class:`.redis_sync.SyncTransport`)."""
        scripts = Scripts()
        address = redis_address(client)
        epoch = _epoch_guard(
            scripts, address, prefix, epoch_interval, on_new_epoch, known_keyspaces
        )
        self.client = client
        transport = SyncTransport(client, address, epoch, keep=keep_connections)
        super().__init__(transport, breaker, counters, scripts, epoch)


class AsyncRedisBackend(ScriptBackend):
    """:class:`ScriptBackend` over a ``redis.asyncio.Redis`` client, for sessions made by an
    ``AsyncSession``: its operations are called from SQLAlchemy's greenlet and await Redis on
    the event loop; the breaker's prober is a task on that loop."""

    def __init__(
        self,
        client: Any,
        breaker: CircuitBreaker,
        counters: Counters,
        *,
        prefix: str | None = None,
        epoch_interval: float = 1.0,
        on_new_epoch: Callable[[int], None] | None = None,
        known_keyspaces: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        scripts = Scripts()
        address = redis_address(client)
        epoch = _epoch_guard(
            scripts, address, prefix, epoch_interval, on_new_epoch, known_keyspaces
        )
        self.client = client
        transport = AsyncTransport(client, address, epoch)
        wire_prober(breaker, transport)
        super().__init__(transport, breaker, counters, scripts, epoch)


def _epoch_guard(
    scripts: Scripts,
    address: str,
    prefix: str | None,
    interval: float,
    on_new_epoch: Callable[[int], None] | None,
    known_keyspaces: Callable[[], Iterable[str]],
) -> EpochGuard | None:
    """The epoch check of a backend's connections; none without a prefix (a bare backend)."""
    if prefix is None:
        return None
    return EpochGuard(
        scripts,
        prefix,
        epoch_key(prefix),
        registry_key(prefix),
        interval,
        address,
        on_new_epoch or (lambda replaced: None),
        known_keyspaces,
    )
