"""Redis Cluster: every command goes to the primary serving its keys' hash slot.

Every script the cache runs reads and writes the keys of one hash slot: an entity and its
bucket's generation key share a hash tag (:mod:`.keys`). A call that names keys of several
buckets (a commit's locks, its publish, a whole-model invalidation) is split by the backend into
one script call per hash tag (:func:`.protocol.split_by_hash_tag`, because
:attr:`ClusterTransport.clustered`); here an ``MGET`` of many rows becomes one per slot, and a
batch of calls is sent as **one pipeline per node**, the replies put back in the order of the
calls: a commit costs one round trip per node it touches, whatever the number of rows.

:class:`ClusterTransport` is the :class:`~.transport.Transport`; :class:`ClusterRouter` does its
work. Routing uses redis-py's own slot map and each node's own connection pool (the internals
are in :mod:`._redis_compat`); the commands themselves are sent here, not through
``RedisCluster``, so that
every connection is checked against its node's epoch before its first command (as on a
standalone Redis) and so that a failing node costs one timeout, never redis-py's retries with
back-off:

* ``MOVED`` (the slot has another owner: a resharding, a failover): the slot map learns the new
  owner and the call is sent there, up to :data:`MAX_REDIRECTS` times;
* ``ASK`` (the slot is being migrated and the key has already left): the call is sent to the
  importing node, preceded by ``ASKING``;
* ``TRYAGAIN`` (a migrating slot holds some of a call's keys and not the others): sent again,
  for up to :data:`TRYAGAIN_PATIENCE`; still refused then, the call fails like any Redis error
  (a read goes to the database) but does not count towards the circuit breaker: the node is
  well, one slot is moving;
* ``NOSCRIPT`` (a restarted, promoted or flushed node): the script is loaded on that node and the
  call sent again;
* a connection error, a timeout or ``CLUSTERDOWN``: the call fails, and the slot map is asked
  for again (``CLUSTER SLOTS``) before the next call, at most every :data:`REFRESH_EVERY`.

Epochs (:class:`ClusterEpochGuard`): each primary is its own Redis, with its own run id and
replication history, so each keeps its own epoch key, in a slot it serves; a node that restarts
or fails over invalidates the buckets of the slots it serves, and only those.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import _redis_compat as compat
from . import forks
from .backend import ScriptBackend
from .breaker import CircuitBreaker
from .diagnostics import explain
from .epoch import EpochGuard, _text, same_server, scan_generations
from .keys import (
    REGISTRY_WHOLE,
    generation_keys_of,
    registry_key,
    registry_recovery_key,
    registry_version_key,
)
from .protocol import Epoch, Script, Scripts
from .stats import Counters

log = logging.getLogger("sqlalchemy_writethrough")

#: rounds of MOVED or ASK redirections one batch may follow before its calls fail
MAX_REDIRECTS = 5
#: seconds a call refused with TRYAGAIN (its keys are half migrated) is sent again for, first
#: after TRYAGAIN_FIRST_PAUSE, then after twice as long each time, up to TRYAGAIN_LAST_PAUSE: a
#: migration moves a slot's keys in batches of milliseconds, and a lock refused meanwhile is a
#: lock failure (journaled in degrade mode, a refused flush in strict mode)
TRYAGAIN_PATIENCE = 0.5
TRYAGAIN_FIRST_PAUSE = 0.005
TRYAGAIN_LAST_PAUSE = 0.05
#: seconds between two refreshes of the slot map after errors
REFRESH_EVERY = 0.25
#: seconds a node that failed to answer is not tried again, doubling up to NODE_MAX_COOLDOWN
NODE_COOLDOWN = 0.25
NODE_MAX_COOLDOWN = 1.0


class NodeDownError(RedisConnectionError):
    """A call not sent: its node failed to answer moments ago (see ClusterRouter)."""


def slot_of(key: str | bytes) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def first_key(args: Sequence[Any]) -> Any:
    """The first key a command names (EVALSHA: after the key count)."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3]
    return args[1]


def _redirect(reply: Any) -> str | None:
    """What an error reply asks of the router (None: a plain reply or a real error)."""
    if not isinstance(reply, ResponseError):
        return None
    if isinstance(reply, MovedError):
        return "MOVED"
    if isinstance(reply, AskError):
        return "ASK"
    if isinstance(reply, TryAgainError):
        return "TRYAGAIN"
    if isinstance(reply, NoScriptError):
        return "NOSCRIPT"
    if isinstance(reply, ClusterDownError):
        return "CLUSTERDOWN"
    word = str(reply).split(" ", 1)[0]  # a parser that does not know Cluster's error codes
    if word in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
        return word
    return None


def _redirection(reply: ResponseError) -> MovedError:
    """MOVED/ASK as redis-py's class (``slot_id``, ``host``, ``port``), whichever parser
    read it."""
    if isinstance(reply, AskError):  # MovedError too
        return reply  # type: ignore[return-value]
    text = str(reply).split(" ", 1)[1]
    return MovedError(text)


class ClusterRouter:
    """Sends commands to the primaries serving their slots, one pipeline per node."""

    def __init__(
        self,
        client: Any,
        scripts: Mapping[str, str],
        check: Callable[[Any], None] | None = None,
    ) -> None:
        """``scripts``: SHA1 -> text, loaded on a node that answers NOSCRIPT; ``check``:
        called with each connection before it is used (the epoch check)."""
        self.client = client
        self._scripts = scripts
        self.check = check
        #: pool -> its checkout function
        self._checkouts: weakref.WeakKeyDictionary[Any, Callable[[], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._stale = False
        self._refresh_due = 0.0
        self._refreshing = threading.Lock()
        #: node name -> (not tried again before, cooldown): the nodes that failed to answer
        self._down: dict[str, tuple[float, float]] = {}
        # a refresh a parent's thread was making at a fork would hold it for good in the
        # child, whose slot map would then never be refreshed
        forks.renew_in_child(self, "_refreshing")

    # -- the slot map ----------------------------------------------------------------------

    def node_of(self, slot: int) -> Any:
        """The primary serving ``slot`` (redis-py's ClusterNode)."""
        if self._stale:
            self.refresh()
        return compat.cluster_node_of(self.client, slot)

    def owner_name(self, slot: int) -> str | None:
        """``host:port`` of the primary serving ``slot``, as the slot map has it now."""
        return compat.cluster_owner_name(self.client, slot)

    def primaries(self) -> list[Any]:
        if self._stale:
            self.refresh()
        return compat.cluster_primaries(self.client)

    def refresh(self, force: bool = False) -> None:
        """Ask the cluster for its slot map again (at most every REFRESH_EVERY, one thread
        at a time; the others go on with the map they have)."""
        now = time.monotonic()
        if (not force and now < self._refresh_due) or not self._refreshing.acquire(False):
            return
        try:
            self._stale = False
            self._refresh_due = now + REFRESH_EVERY
            self._read_slot_map()
        except Exception as exc:  # no node answers: try again later
            self._stale = True
            log.debug("writethrough: Redis Cluster: the slot map could not be read: %s", exc)
        finally:
            self._refreshing.release()

    def _moved(self, error: MovedError) -> None:
        """The slot map learns the slot's new owner."""
        if not self._learn_moved(error):
            self._stale = True

    # -- the I/O of the slot map and of the waits (awaited by AsyncClusterRouter) ------------

    def _read_slot_map(self) -> None:
        compat.cluster_refresh(self.client)

    def _learn_moved(self, error: MovedError) -> bool:
        return compat.cluster_moved(self.client, error)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _node_at(self, error: AskError) -> Any:
        node = compat.cluster_node_at(self.client, error.host, error.port)
        if node is None:
            self.refresh(force=True)
            node = compat.cluster_node_at(self.client, error.host, error.port)
        if node is None:
            raise RedisConnectionError(f"Redis Cluster node {error.host}:{error.port} unknown")
        return node

    # -- sending ---------------------------------------------------------------------------

    def execute(self, commands: Sequence[Sequence[Any]], *, checked: bool = True) -> list[Any]:
        """Each command sent to the primary serving its first key's slot, one pipeline per
        node; the replies in the order of ``commands``, an error (a reply, or the node's
        failure) as its exception instead of raised."""
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        slots = [slot_of(first_key(c)) for c in commands]
        ask: dict[int, Any] = {}
        redirects = 0
        pause = TRYAGAIN_FIRST_PAUSE
        deadline = 0.0
        while True:
            groups: dict[str, tuple[Any, list[int]]] = {}
            for i in todo:
                try:
                    node = ask.get(i) or self.node_of(slots[i])
                except Exception as exc:  # a slot no node serves
                    replies[i] = exc if isinstance(exc, RedisError) else RedisError(str(exc))
                    continue
                groups.setdefault(compat.cluster_node_name(node), (node, []))[1].append(i)
            again: list[int] = []
            refused = redirected = False
            for node, indexes in groups.values():
                asking = {k for k, i in enumerate(indexes) if i in ask}
                down = self._down_error(node)
                if down is not None:
                    for i in indexes:
                        replies[i] = down
                    continue
                try:
                    got = self.on_node(node, [commands[i] for i in indexes], asking, checked)
                except (RedisError, OSError) as exc:
                    self._failed(exc)
                    for i in indexes:
                        replies[i] = exc
                    continue
                unknown: set[str] = set()
                for i, reply in zip(indexes, got, strict=True):
                    asked = ask.pop(i, None)
                    replies[i] = reply
                    kind = _redirect(reply)
                    if kind is None:
                        continue
                    if kind == "MOVED":
                        self._moved(_redirection(reply))
                        redirected = True
                    elif kind == "ASK":
                        try:
                            ask[i] = self._node_at(_redirection(reply))
                        except RedisError:
                            continue
                        redirected = True
                    elif kind == "TRYAGAIN":
                        refused = True
                    elif kind == "NOSCRIPT":
                        unknown.add(str(commands[i][1]))
                        if asked is not None:
                            ask[i] = asked  # loaded there: asked again there
                    else:  # CLUSTERDOWN: a node failed, its replica is not promoted yet
                        self._stale = True
                        continue
                    again.append(i)
                if unknown:
                    self._load(node, unknown)
            if not again:
                break
            if redirected:
                redirects += 1
                if redirects >= MAX_REDIRECTS:
                    break
            if refused:
                now = time.monotonic()
                deadline = deadline or now + TRYAGAIN_PATIENCE
                if now + pause > deadline:
                    break
                self.sleep(pause)
                pause = min(pause * 2, TRYAGAIN_LAST_PAUSE)
            todo = sorted(again)
        return replies

    def _load(self, node: Any, shas: Iterable[str]) -> None:
        sources = [self._scripts[sha] for sha in shas if sha in self._scripts]
        try:
            self.on_node(node, [("SCRIPT", "LOAD", s) for s in sources], set(), False)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """A node failed, or the epoch check's own key has moved: read the slot map again."""
        if isinstance(
            exc, (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError)
        ) or _redirect(exc) in ("MOVED", "ASK"):
            self._stale = True

    # -- one circuit breaker per node ------------------------------------------------------

    def _down_error(self, node: Any) -> NodeDownError | None:
        """The error a call to ``node`` fails with at once, while it is considered down
        (None: it may be tried)."""
        state = self._down.get(compat.cluster_node_name(node))
        if state is None or state[0] <= time.monotonic():
            return None
        self._stale = True  # its replica may have taken over: the slot map may say so now
        name = compat.cluster_node_name(node)
        return NodeDownError(f"Redis Cluster node {name} did not answer; not tried again yet")

    def _node_failed(self, node: Any, exc: BaseException) -> None:
        """A node that fails to answer is not tried again for a cooldown (0.25 s, doubling to
        1 s while it keeps failing): one node's failure costs each call one timeout, and
        never stops the calls to the other nodes (redis-py's cluster client would retry)."""
        if isinstance(exc, ResponseError):
            return
        name = compat.cluster_node_name(node)
        previous = self._down.get(name)
        cooldown = min(previous[1] * 2, NODE_MAX_COOLDOWN) if previous else NODE_COOLDOWN
        self._down[name] = (time.monotonic() + cooldown, cooldown)
        self._stale = True
        if previous is None:
            log.warning(
                "writethrough: Redis Cluster node %s did not answer (%s): the calls to its "
                "slots go to the database until it, or the replica that takes over, answers",
                compat.cluster_node_name(node),
                explain(exc),
            )

    def _node_answered(self, node: Any) -> None:
        name = compat.cluster_node_name(node)
        if self._down.pop(name, None) is not None:
            log.warning("writethrough: Redis Cluster node %s answers again", name)

    def on_node(
        self,
        node: Any,
        commands: Sequence[Sequence[Any]],
        asking: set[int] | frozenset[int] = frozenset(),
        checked: bool = True,
    ) -> list[Any]:
        """``commands`` in one round trip on a connection of ``node``'s pool (checked first
        when ``checked``); ``asking``: the indexes of the commands to precede with ASKING.
        Error replies are returned as values; a connection that breaks is connected again
        and tried once more (a node restarted since the connection was pooled), as redis-py's
        retry does: not another pooled one, which the same restart closed too (an asyncio
        node hands out the longest idle first)."""
        sent, mine = with_asking(commands, asking)
        conn, home = self._acquire(node)
        for attempt in (0, 1):
            try:
                if checked and self.check is not None:
                    self.check(conn)
                replies = self._call_many(conn, sent)
            except BaseException as exc:
                if not isinstance(exc, ResponseError):
                    self._discard(conn)  # a reply may still be on its way: a new socket
                if attempt == 0 and type(exc) is RedisConnectionError:
                    continue
                self._release(home, conn)
                self._node_failed(node, exc)
                raise
            self._release(home, conn)
            if self._down:
                self._node_answered(node)
            return [replies[i] for i in mine]
        raise AssertionError("unreachable")

    # the connection I/O of on_node (the asyncio router awaits each)

    def _acquire(self, node: Any) -> tuple[Any, Any]:
        """A connection to ``node``, and what to give it back to (its pool)."""
        pool = compat.cluster_pool(self.client, node)
        checkout = self._checkouts.get(pool)
        if checkout is None:
            checkout = self._checkouts[pool] = compat.checkout_of(pool)
        return checkout(), pool

    def _release(self, home: Any, conn: Any) -> None:
        compat.release(home, conn)

    def _discard(self, conn: Any) -> None:
        compat.disconnect(conn)

    def _call_many(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """``commands`` in one round trip; error replies as values."""
        replies: list[Any] = compat.call_many(conn, commands)
        return replies


def with_asking(
    commands: Sequence[Sequence[Any]], asking: Iterable[int]
) -> tuple[Sequence[Sequence[Any]], range | list[int]]:
    """What to send for ``commands``, those at the ``asking`` indexes preceded by ASKING, and
    the indexes of their own replies among the replies to it."""
    asking = set(asking)
    if not asking:
        return commands, range(len(commands))
    sent: list[Sequence[Any]] = []
    mine: list[int] = []
    for i, command in enumerate(commands):
        if i in asking:
            sent.append(("ASKING",))
        mine.append(len(sent))
        sent.append(command)
    return sent, mine


class ClusterEpochGuard(EpochGuard):
    """:class:`.EpochGuard` for a Redis Cluster: one epoch per primary.

    A primary's epoch key is ``{prefix}:epoch:{<n>}`` for the smallest ``n`` whose hash slot
    the primary serves (by the slot map), so it lives on that primary and goes back in time
    with it. A new epoch there (a restart, a failover to its replica) replaces the generation
    keys of the buckets whose slots the primary serves: every generation key of every known
    keyspace is sent to it, one script call each, preceded by ``ASKING``; the slots it does not
    serve answer ``MOVED`` or ``ASK`` and are left alone (their nodes did not forget). Then the
    epoch is recorded. The epoch last seen is kept per epoch key: a failover keeps the slots,
    so the promoted replica has the same epoch key, and a process that was using the old
    primary while another started the new epoch replaces the generations again, as
    :class:`.EpochGuard` does for Sentinel.
    """

    def __init__(
        self,
        scripts: Scripts,
        prefix: str,
        interval: float,
        address: str,
        on_new_epoch: Callable[[int], None],
        known_fields: Callable[[], Iterable[str]],
        router: Callable[[], ClusterRouter],
    ) -> None:
        super().__init__(
            scripts,
            prefix,
            "",
            registry_key(prefix),
            interval,
            address,
            on_new_epoch,
            known_fields,
        )
        self._router = router
        self._whole_keys = (
            registry_key(prefix),
            registry_version_key(prefix),
            registry_recovery_key(prefix),
        )
        #: epoch key -> the epoch this process saw there last
        self._seen: dict[str, str] = {}
        self._tags: dict[int, int] = {}

    def epoch_key_of(self, node_name: str) -> str:
        """The epoch key of the primary ``host:port``, by the current slot map."""
        router = self._router()
        for n in range(1 << 16):
            if router.owner_name(self._slot_of_tag(n)) == node_name:
                return f"{self._prefix}:epoch:{{{n}}}"
        raise RedisConnectionError(f"Redis Cluster node {node_name} serves no slot")

    def _slot_of_tag(self, n: int) -> int:
        slot = self._tags.get(n)
        if slot is None:
            slot = self._tags[n] = slot_of(str(n))
        return slot

    def check_connection(self, conn: Any) -> None:
        due = self._due.get(conn)
        if due is not None and due > time.monotonic():
            return
        try:
            self._check_node(conn)
        except BaseException:
            self._disconnect(conn)
            raise
        self._due[conn] = time.monotonic() + self._interval
        if due is None:
            self._on_connect(conn)

    def _reconnected(self, conn: Any) -> None:
        try:
            self._check_node(conn)
        except BaseException:
            self._disconnect(conn)
            raise
        self._due[conn] = time.monotonic() + self._interval

    # -- the I/O on one connection (awaited by AsyncClusterEpochGuard) ---------------------

    def _call(self, conn: Any, args: Sequence[Any]) -> Any:
        return compat.call(conn, args)

    def _exchange(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies: list[Any] = compat.call_many(conn, commands)
        return replies

    def _disconnect(self, conn: Any) -> None:
        compat.disconnect(conn)

    def _on_connect(self, conn: Any) -> None:
        compat.on_connect(conn, self._reconnected)

    def _check_node(self, conn: Any) -> None:
        host, port = compat.peer(conn)
        name = f"{host}:{port}"
        where = f"{self._address} at {name}"
        epoch_key = self.epoch_key_of(name)

        def send(*args: Any) -> Any:
            return self._call(conn, args)

        moved = False
        for _ in range(3):
            last = self._seen.get(epoch_key)
            reply = self._script(send, Script.EPOCH_CHECK, [epoch_key], [])
            status = Epoch(int(reply[0]))
            force = False
            if status is Epoch.VALID:
                if last is None or same_server(last, _text(reply[1])) or moved:
                    self._saw_at(epoch_key, _text(reply[1]), -1, where)
                    return
                seen, force = reply[1], True
            elif status is Epoch.NOT_PRIMARY:
                raise ReadOnlyError(
                    f"Redis at {where} is a {_text(reply[1])}, not a primary: the "
                    "cache writes on every commit and must talk to the primary"
                )
            else:
                seen = reply[2]
            nonce = secrets.token_hex(4)
            replaced = self._replace_generations(conn, nonce)
            reply = self._script(
                send, Script.EPOCH_BUMP, [epoch_key], [seen, nonce, "1" if force else "0"]
            )
            status = Epoch(int(reply[0]))
            if status is Epoch.VALID:
                fresh = not seen and last is None
                self._saw_at(epoch_key, _text(reply[1]), -1 if fresh else replaced, where, force)
                return
            if status is Epoch.NOT_PRIMARY:
                continue
            moved = True
        raise RedisConnectionError(f"Redis at {where}: its epoch kept changing; not used")

    def _replace_generations(self, conn: Any, nonce: str) -> int:
        """Replace, on the node of ``conn``, the generation keys of the slots it serves."""
        router = self._router()
        registry = self._registry_key
        reply = router.execute([("HKEYS", registry)], checked=False)[0]
        if isinstance(reply, BaseException):
            raise reply
        self._forget_registry(conn, nonce)
        registered = [_text(f) for f in reply]
        fields = registered + sorted(set(self._known_fields()) - set(registered))
        gen_keys = [k for f in fields for k in generation_keys_of(self._prefix, f)[1]]
        if REGISTRY_WHOLE not in registered:  # this node's, found by SCAN (see .epoch)
            found = scan_generations([lambda *args: self._call(conn, args)], self._prefix)
            assert found is not False  # no renew: never stopped
            gen_keys = list(dict.fromkeys(gen_keys + found))
        if not gen_keys:
            return 0
        scripts = self._scripts
        commands = [scripts.call(Script.EPOCH_GENS, [key], [nonce]) for key in gen_keys]
        asked = [c for command in commands for c in (("ASKING",), command)]
        replies = self._exchange(conn, asked)[1::2]
        if any(isinstance(r, NoScriptError) for r in replies):
            self._call(conn, ("SCRIPT", "LOAD", scripts.source[Script.EPOCH_GENS]))
            replies = self._exchange(conn, asked)[1::2]
        replaced = 0
        for r in replies:
            if isinstance(r, BaseException):
                if _redirect(r) in ("MOVED", "ASK"):
                    continue  # a slot another node serves
                raise r
            replaced += int(r)
        return replaced

    def _forget_registry(self, conn: Any, nonce: str) -> None:
        """When the node of ``conn`` serves the keyspace registry: it is no longer known whole
        (``lua/registry_whole.lua``, ``forget``). A failover may have lost registrations its
        old primary acknowledged while the other nodes keep those keyspaces' entries, which
        the commits that go by the registry would not reach; the next such commit replaces
        every bucket made before now, on every node (see :mod:`.siblings`)."""
        scripts = self._scripts
        command = scripts.call(Script.REGISTRY_WHOLE, self._whole_keys, ["forget", nonce, 0])
        reply = self._exchange(conn, [command])[0]
        if isinstance(reply, NoScriptError):
            self._call(conn, ("SCRIPT", "LOAD", scripts.source[Script.REGISTRY_WHOLE]))
            reply = self._exchange(conn, [command])[0]
        if isinstance(reply, BaseException) and _redirect(reply) not in ("MOVED", "ASK"):
            raise reply  # MOVED: another node serves the registry

    def _saw_at(
        self, epoch_key: str, epoch: str, replaced: int, where: str, late: bool = False
    ) -> None:
        with self._lock:
            last = self._seen.get(epoch_key)
            self._seen[epoch_key] = epoch
        self.epoch = epoch
        if replaced >= 0:
            what = (
                "another process started this epoch while this one used the node before it "
                "(a failover's old primary?)"
                if late
                else "new epoch (the node restarted, failed over, was flushed or replaced)"
            )
            log.warning(
                "writethrough: Redis at %s: %s: %s; every entry of the slots it serves written "
                "before it was invalidated (%d bucket generations replaced)",
                where,
                what,
                epoch.split("|", 1)[0],
                replaced,
            )
        if replaced >= 0 or (last is not None and last != epoch):
            self._on_new_epoch(replaced)


def cluster_address(client: Any) -> str:
    """For log lines: the cluster's startup node (never a password)."""
    try:
        host, port = compat.cluster_default_address(client)
    except Exception:
        return "Redis Cluster"
    return f"Redis Cluster {host}:{port}"


class ClusterTransport:
    """:class:`~.transport.Transport` of a ``redis.cluster.RedisCluster`` client: each
    command to the primary of its keys' slot, a batch as one pipeline per node, an ``MGET``
    over several slots as one ``MGET`` per slot (:class:`ClusterRouter`)."""

    clustered = True
    #: the lock script is sent and read in one call per node, never overlapped with the SQL
    overlaps = False

    def __init__(
        self, client: Any, address: str, scripts: Scripts, check: Callable[[Any], None] | None
    ) -> None:
        self.client = client
        self.address = address
        self.router = ClusterRouter(
            client, {scripts.sha[s]: scripts.source[s] for s in Script}, check
        )

    def command(self, *args: Any) -> Any:
        if args[0] == "MGET" and len(args) > 3:  # (a row and its generation share a slot)
            return self._mget(args[1:])
        reply = self.router.execute([args])[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _mget(self, keys: Sequence[Any]) -> list[Any]:
        """One MGET per slot, one round trip per node; the values in the order of ``keys``."""
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(slot_of(key), []).append(i)
        if len(by_slot) == 1:
            reply = self.router.execute([("MGET", *keys)])[0]
            if isinstance(reply, BaseException):
                raise reply
            return list(reply)
        groups = list(by_slot.values())
        replies = self.router.execute([("MGET", *[keys[i] for i in group]) for group in groups])
        values: list[Any] = [None] * len(keys)
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for i, value in zip(group, reply, strict=True):
                values[i] = value
        return values

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Error replies as values; a node that failed fails the batch (its commands could not
        be sent), as a broken connection does on one server."""
        replies = self.router.execute(commands)
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, ResponseError):
                raise reply
        return replies

    def load_script(self, source: str) -> None:
        """On every primary (the router also loads a script on a node that answers
        NOSCRIPT, so this is seldom needed)."""
        for node in self.router.primaries():
            self.router.on_node(node, [("SCRIPT", "LOAD", source)], checked=False)

    def begin(
        self,
        command: Sequence[Any],
        after: Sequence[Any] | None = None,
        before: Sequence[Any] | None = None,
    ) -> Any:
        raise NotImplementedError("a Cluster transport does not overlap its locks")

    def complete(self, handle: Any) -> Any:
        raise NotImplementedError("a Cluster transport does not overlap its locks")

    def ping(self) -> bool:
        """Every primary answers."""
        router = self.router
        for node in router.primaries():
            try:
                router.on_node(node, [("PING",)], checked=False)
            except (RedisError, OSError) as exc:
                router._failed(exc)  # the slot map is read again before the next probe
                raise
        return True

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def servers(self) -> list[Callable[..., Any]]:
        """One ``send`` per primary."""

        def on(node: Any) -> Callable[..., Any]:
            def send(*args: Any) -> Any:
                reply = self.router.on_node(node, [args])[0]
                if isinstance(reply, BaseException):
                    raise reply
                return reply

            return send

        return [on(node) for node in self.router.primaries()]

    def scan(self, pattern: str, count: int) -> Iterator[Any]:
        """``SCAN`` on every primary."""
        for send in self.servers():
            cursor: Any = 0
            while True:
                cursor, keys = send("SCAN", cursor, "MATCH", pattern, "COUNT", count)
                yield from keys
                if int(cursor) == 0:
                    break

    def unlink(self, keys: Sequence[Any]) -> int:
        """One ``UNLINK`` per slot, one round trip per node."""
        by_slot: dict[int, list[Any]] = {}
        for key in keys:
            by_slot.setdefault(slot_of(key), []).append(key)
        deleted = 0
        for reply in self.router.execute([("UNLINK", *group) for group in by_slot.values()]):
            if isinstance(reply, BaseException):
                raise reply
            deleted += int(reply)
        return deleted


def _node_failure(exc: BaseException) -> bool:
    """A node that failed, or a slot that moved: the business of the router's per-node
    breaker and redirections, not of the cache's circuit breaker."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) or _redirect(
        exc
    ) in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


class ClusterBackend(ScriptBackend):
    """:class:`~.backend.ScriptBackend` over a ``redis.cluster.RedisCluster`` client: every
    multi-key script split by hash tag (``transport.clustered``), routed by
    :class:`ClusterTransport`, with one epoch per primary (:class:`ClusterEpochGuard`)."""

    #: the guard and transport this backend builds (the asyncio flavour's subclass swaps both)
    guard_class: type[ClusterEpochGuard] = ClusterEpochGuard
    transport_class: type[ClusterTransport] = ClusterTransport

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
        address = cluster_address(client)
        guard: ClusterEpochGuard | None = None
        holder: list[ClusterTransport] = []
        if prefix is not None:
            guard = self.guard_class(
                scripts,
                prefix,
                epoch_interval,
                address,
                on_new_epoch or (lambda replaced: None),
                known_keyspaces,
                lambda: holder[0].router,
            )
        transport = self.transport_class(
            client, address, scripts, guard.check_connection if guard is not None else None
        )
        holder.append(transport)
        self.client = client
        self._wire(transport, breaker)
        super().__init__(transport, breaker, counters, scripts, guard)

    def _wire(self, transport: ClusterTransport, breaker: CircuitBreaker) -> None:
        """Give the breaker what it needs of the transport (the asyncio flavour: its loop)."""

    def _failed(self, what: str, exc: BaseException) -> None:
        """One node failing is that node's business: the router stops trying it for a
        moment (its own breaker), and the cache goes on with the others. A slot moving
        (redirections, TRYAGAIN beyond patience) is no failure of a node at all. Both are
        counted and logged, but kept from the cache's circuit breaker, which would send every
        slot to the database."""
        if _node_failure(exc):
            self._counters.add("errors")
            self.log_failure(what, exc)
            return
        super()._failed(what, exc)


__all__ = ["ClusterBackend", "ClusterEpochGuard", "ClusterRouter", "ClusterTransport"]
