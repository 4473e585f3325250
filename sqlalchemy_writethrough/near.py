"""The near cache: copies of entries in process memory, in front of Redis (opt-in).

A hit from memory costs no round trip, so it may be older than Redis: by at most the
staleness bound (``NearCacheOptions.staleness``), never uncommitted. How that holds:

* every script that changes an entry or a generation publishes the keys it changed on
  :func:`channel_of` the prefix (see ``lua/_common.lua``); this process's subscriber thread
  drops them, a generation's whole bucket, or everything (a new epoch, ``clear()``);
* a copy is taken only from a read that saw a VALUE of the current generation, and only when
  no invalidation of its key (its bucket, everything) was processed since that read began
  (a sequence number taken before it: a value read before an invalidation is never stored
  after it);
* this process's own writes drop their keys as soon as their script returns, so it reads its
  own commits at once;
* the subscription is trusted only while a heartbeat (a ``PING`` on the subscribed connection,
  whose reply comes after every message published before it) came back within the bound: a
  subscription not confirmed yet, lost, or lagging serves nothing, and each (re)subscription
  starts from an empty cache;
* whatever happens, a copy expires ``staleness`` seconds after the read that took it began.

Where it subscribes (a :class:`Subscriptions`): through the client itself for a
``redis.Redis`` (standalone, or a Sentinel one, which follows the primary); through a
synchronous twin of a ``redis.asyncio`` client, built from its options and owned by the
subscriber thread (so the event loop never waits for it, whichever loop runs, and closing the
asyncio client does not end it); on Redis Cluster, through a plain connection to one node,
which hears every node's ``PUBLISH`` over the cluster bus: the heartbeat goes to that node, and
when it fails or leaves the slot map the next subscription goes to another node, empty.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _rng as random
from .config import NearCacheOptions
from .diagnostics import explain
from .protocol import GENERATION_SCRIPTS, PAIR_SCRIPTS, Script

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger("sqlalchemy_writethrough")

_NEVER = float("-inf")
#: keys (and buckets) whose last invalidation is remembered at most; beyond, they are
#: forgotten together, as if everything had been invalidated (reads in flight store nothing)
_MARKS = 10_000
#: seconds the subscriber waits for a message at most before it looks whether it was stopped
#: (or renewed): a heartbeat is ``staleness / 4`` apart, up to 15 minutes, and a stop that
#: waited for it would leave the thread behind, reading a connection its owner then closes
_WAKE = 0.1


class Subscriptions:
    """Where the subscriber subscribes: the ``pubsub()`` of a synchronous ``redis.Redis``
    (standalone, or a Sentinel ``master_for()`` one)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def open(self) -> Any:
        """A new ``PubSub``, on a connection of its own (made at its first command)."""
        return self.client.pubsub()

    #: whether a subscription whose heartbeats stopped coming back within the bound is left
    #: for another server (only where another server hears the same messages: a Cluster)
    leave_when_late = False

    def current(self) -> bool:
        """Whether the server of the open subscription still hears every message."""
        return True

    def close(self) -> None:
        """Release what :meth:`open` built (not the client given: the caller's)."""


class TwinSubscriptions(Subscriptions):
    """For a ``redis.asyncio`` client: a synchronous client of the thread's own, built (at
    the first subscription) from the asyncio client's options, closed with the near cache."""

    def __init__(self, build: Callable[[], Any]) -> None:
        super().__init__(None)
        self._build = build

    def open(self) -> Any:
        if self.client is None:
            self.client = self._build()
        return self.client.pubsub()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


class ClusterSubscriptions(Subscriptions):
    """On Redis Cluster: a plain connection to one node (a ``PUBLISH`` on any node reaches
    every node's subscribers over the cluster bus), each subscription on the next node of
    the client's slot map; the one open stays trusted while its node is in that map, and is
    left for another when its heartbeats stop coming back within the bound (a stalled node)."""

    leave_when_late = True

    def __init__(self, nodes: Callable[[], list[tuple[str, int]]], options: dict[str, Any]) -> None:
        super().__init__(None)
        self._nodes = nodes
        self._options = options
        #: a random first node, so that the processes' subscriptions spread over the nodes
        self._turn = random.randrange(1 << 16)
        #: (host, port) of the node subscribed to, None before
        self.node: tuple[str, int] | None = None

    def open(self) -> Any:
        nodes = self._nodes()
        self._turn += 1
        host, port = nodes[self._turn % len(nodes)]
        self.close()
        self.node = (host, port)
        # no retry of its own: a node that fails is left for the next one at once
        self.client = redis.Redis(
            host=host, port=port, retry=Retry(NoBackoff(), 0), **self._options
        )
        return self.client.pubsub()

    def current(self) -> bool:
        return self.node in self._nodes()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


class Copy(bytes):
    """An entry's payload as the near cache keeps it: bytes of its own (not a view of the
    reply it came in), and ``decoded``, where the read path keeps what it decoded from it
    (see ``ReadPath._decoded``): a copy never changes, so neither does its decoding. A copy
    that is invalidated is dropped with its decoding."""

    #: (dialect, layout, primary key, (class layout, values)) once decoded, else None
    decoded: Any = None


def channel_of(prefix: str) -> str:
    """The pub/sub channel of a prefix's near-cache invalidations."""
    return f"{prefix}:near"


class NearCache:
    """One cache's in-process entries and the subscription that keeps them correct."""

    def __init__(self, source: Subscriptions, prefix: str, options: NearCacheOptions) -> None:
        #: where it subscribes (replaced when a plain client turns out to reach a Cluster)
        self.source = source
        self.channel = channel_of(prefix)
        self.max_entries = options.max_entries
        self.staleness = options.staleness
        #: key -> (payload, generation key, monotonic time after which it is not served)
        self._entries: dict[str, tuple[Copy, str, float]] = {}
        self._lock = threading.Lock()
        #: bumped by every invalidation processed; a read takes it before asking Redis, and
        #: stores only if its key (its bucket, everything) was not invalidated since
        self._seq = 0
        self._key_at: dict[str, int] = {}
        self._bucket_at: dict[str, int] = {}
        self._all_at = 0
        #: when the latest heartbeat that came back was sent (-inf: not subscribed)
        self._heard = _NEVER
        self._stop = threading.Event()
        #: set to make the subscriber subscribe again (a new epoch: maybe another server)
        self._renew = threading.Event()
        self._thread: threading.Thread | None = None
        #: what it did, for tests and diagnosis
        self.hits = 0
        self.stores = 0
        self.refused = 0
        self.resets = 0
        self.messages = 0
        _nears.add(self)

    # -- reading -------------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether the subscription is confirmed and its last heartbeat is within the bound."""
        return monotonic() - self._heard <= self.staleness

    def get(self, key: str) -> Copy | None:
        """The payload of a fresh copy, when the subscription is healthy; else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = monotonic()
        if now - self._heard > self.staleness:
            return None
        if now < entry[2]:
            self.hits += 1
            return entry[0]
        self._discard(key, entry)
        return None

    def read_through(
        self, backend: Backend, key: str, gen_key: str
    ) -> memoryview | Copy | Literal[False] | None:
        """:meth:`Backend.peek`, whose VALUE is kept for the next reads (when the
        subscription is healthy and nothing invalidated the key meanwhile)."""
        seq = self._seq
        now = monotonic()
        found = backend.peek(key, gen_key)
        if found and now - self._heard <= self.staleness:
            self._store(key, gen_key, found, seq, now + self.staleness)
        return found

    def read_many(
        self, backend: Backend, pairs: Sequence[tuple[str, str]]
    ) -> tuple[list[memoryview | bytes | Literal[False]], int] | None:
        """:meth:`Backend.peek_many` served from memory first: only the keys without a fresh
        copy go to Redis (in one MGET, none when every key is in memory), and the VALUEs it
        finds are kept as :meth:`read_through` keeps one. The entries in the order of
        ``pairs``, and how many came from memory; None when Redis failed (then nothing is
        counted as served from memory: the caller reads the database)."""
        entries = self._entries
        now = monotonic()
        serving = now - self._heard <= self.staleness
        found: list[memoryview | bytes | Literal[False]] = []
        todo: list[int] = []  # positions of the keys Redis is asked for
        if serving and entries:
            for at, (key, _) in enumerate(pairs):
                entry = entries.get(key)
                if entry is not None:
                    if now < entry[2]:
                        found.append(entry[0])
                        continue
                    self._discard(key, entry)
                found.append(False)
                todo.append(at)
        else:
            found = [False] * len(pairs)
            todo = list(range(len(pairs)))
        hits = len(pairs) - len(todo)
        if todo:
            seq = self._seq  # before the read, as read_through takes it
            began = monotonic()
            asked = [pairs[at] for at in todo]
            read = backend.peek_many(asked)
            if read is None:
                return None
            for at, payload in zip(todo, read, strict=True):
                found[at] = payload
            if began - self._heard <= self.staleness:
                self._store_many(
                    [
                        (key, gen_key, payload)
                        for (key, gen_key), payload in zip(asked, read, strict=True)
                        if payload
                    ],
                    seq,
                    began + self.staleness,
                )
        self.hits += hits
        return found, hits

    def _store(self, key: str, gen_key: str, payload: memoryview, seq: int, expires: float) -> None:
        self._store_many(((key, gen_key, payload),), seq, expires)

    def _store_many(
        self, copies: Sequence[tuple[str, str, memoryview | bytes]], seq: int, expires: float
    ) -> None:
        """Keep copies of what a read that began at ``seq`` found, each only if no
        invalidation of its key, its bucket or everything was processed since (the fill
        race), and only while the subscription is trusted."""
        with self._lock:
            if self._all_at > seq or monotonic() - self._heard > self.staleness:
                self.refused += len(copies)
                return
            entries = self._entries
            key_at = self._key_at
            bucket_at = self._bucket_at
            for key, gen_key, payload in copies:
                if key_at.get(key, 0) > seq or bucket_at.get(gen_key, 0) > seq:
                    self.refused += 1
                    continue
                entries.pop(key, None)
                while len(entries) >= self.max_entries:
                    del entries[next(iter(entries))]  # the oldest copy first
                entries[key] = (Copy(payload), gen_key, expires)
                self.stores += 1

    def _discard(self, key: str, entry: tuple[Copy, str, float]) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    # -- invalidating --------------------------------------------------------------------

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these entries (and void the reads in flight)."""
        with self._lock:
            self._seq += 1
            seq, entries, marks = self._seq, self._entries, self._key_at
            for key in keys:
                entries.pop(key, None)
                marks[key] = seq
            if len(marks) > _MARKS:
                self._forget_marks()

    def drop_buckets(self, gen_keys: Iterable[str]) -> None:
        """Forget every entry of these buckets."""
        wanted = set(gen_keys)
        with self._lock:
            self._seq += 1
            self._entries = {k: e for k, e in self._entries.items() if e[1] not in wanted}
            for gen_key in wanted:
                self._bucket_at[gen_key] = self._seq
            if len(self._bucket_at) > _MARKS:
                self._forget_marks()

    def drop_all(self) -> None:
        with self._lock:
            self._entries = {}
            self._forget_marks()

    def _forget_marks(self) -> None:
        """Under the lock: every read in flight counts as invalidated."""
        self._seq += 1
        self._all_at = self._seq
        self._key_at = {}
        self._bucket_at = {}

    def wrote(self, script: Script, keys: Sequence[str]) -> None:
        """This process ran ``script`` over ``keys``: drop what it may have changed now,
        without waiting for its message (read your own writes)."""
        if script in PAIR_SCRIPTS:
            self.drop(keys[0::2])
        elif script in GENERATION_SCRIPTS:
            self.drop_buckets(keys)
        elif script is Script.EPOCH_BUMP:
            self.drop_all()

    def renew(self) -> None:
        """Forget everything and subscribe again: the server behind the address may have
        changed (a new epoch), and a subscription still open on the old one would hear
        heartbeats but none of the new server's invalidations."""
        self._renew.set()
        self._down()

    def switch(self, source: Subscriptions) -> None:
        """Subscribe from now on through ``source`` (a plain client found to reach a Redis
        Cluster node goes on through the cluster), starting empty."""
        self.source = source
        self.renew()

    def _down(self) -> None:
        """The subscription is lost (or not confirmed yet): serve nothing, keep nothing."""
        with self._lock:
            self._heard = _NEVER
            self._entries = {}
            self._forget_marks()

    # -- the subscription ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._listen, name="writethrough-near-cache", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop listening: the near cache serves nothing from now on."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._down()
        if thread is None or not thread.is_alive():
            self.source.close()

    def _forked(self) -> None:
        """In a forked child: the parent's thread is gone, and a lock it held stays held.
        Start over, empty, with a subscription of the child's own."""
        running = self._thread is not None and not self._stop.is_set()
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        self._renew = threading.Event()
        self._down()
        if running:
            self.start()

    def _listen(self) -> None:
        pause = 0.05
        warned = False
        while not self._stop.is_set():
            resets = self.resets
            try:
                self._subscribed()
            except Exception as exc:  # a lost connection, a Redis down: try again shortly
                if self._stop.is_set():
                    # stopped meanwhile: its connection may have been closed under it (the
                    # caller's client closed after the cache), which is no failure
                    log.debug("writethrough: near cache subscription ended: %s", explain(exc))
                    break
                if self.resets != resets:
                    warned = False  # it was subscribed meanwhile: a new outage
                    pause = 0.05
                log.log(
                    logging.DEBUG if warned else logging.WARNING,
                    "writethrough: near cache subscription on %s failed: %s; reads go to "
                    "Redis until it is back",
                    self.channel,
                    explain(exc),
                )
                warned = True
                pause = min(pause * 2, 1.0)
            self._down()
            self._stop.wait(pause)
        if self._thread is None:  # stopped (not restarted meanwhile): release its client
            self.source.close()

    def _subscribed(self) -> None:
        """Subscribe, then handle messages and send heartbeats until stopped or failed."""
        every = self.staleness / 4
        self._renew.clear()  # a renew() from now on ends this subscription
        source = self.source
        pubsub = source.open()
        try:
            pubsub.subscribe(self.channel)
            due = 0.0
            began = monotonic()
            while not self._stop.is_set() and not self._renew.is_set():
                now = monotonic()
                if now >= due:
                    if not source.current():
                        return  # its node left the cluster: subscribe elsewhere, empty
                    if source.leave_when_late and now - max(began, self._heard) > self.staleness:
                        return  # a stalled node: another node hears the same messages
                    pubsub.ping(repr(now))
                    due = now + every
                message = pubsub.get_message(timeout=max(0.0, min(due - now, _WAKE)))
                if message is not None:
                    self._handle(message)
        finally:
            try:
                pubsub.close()
            except Exception:  # a broken connection closes anyway
                pass
            if source is not self.source:  # replaced (see switch()): release its client
                source.close()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        data = message["data"]
        if kind == "message":
            self.messages += 1
            if data[:1] == b"k":
                self.drop(_names(data))
            elif data[:1] == b"g":
                self.drop_buckets(_names(data))
            else:
                self.drop_all()
        elif kind == "pong":
            if isinstance(data, bytes):
                data = data.decode()
            if data:  # sent when the PING was: every message published before has come
                with self._lock:
                    self._heard = max(self._heard, float(data))
        elif kind == "subscribe":
            # a (re)subscription: what was published while unsubscribed is lost
            self.resets += 1
            self._down()
        else:  # unsubscribed
            self._down()


_nears: weakref.WeakSet[NearCache] = weakref.WeakSet()


def _after_fork() -> None:
    for near in list(_nears):
        near._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _names(data: bytes) -> list[str]:
    names = msgpack.unpackb(data[1:], raw=True)
    return [n.decode("utf-8", "surrogateescape") for n in names]
