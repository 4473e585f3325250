"""Every process's counters, added up in Redis: what ``sqlalchemy-writethrough stats`` shows.

A process's own counters (:mod:`.stats`) say nothing about the other workers of a service,
and a command-line tool has none of its own. So each cache sends what its counters gained
since the last time to one Redis hash, ``{prefix}:stats``, every ``interval`` seconds (5 by
default), from one background thread per process: one pipelined batch of ``HINCRBY`` (one
per counter that changed) and ``HINCRBYFLOAT`` (latency sums), never a command per event, and nothing at all on
the read or write paths. A batch that fails is sent again, added to the next one: counts are
not lost while Redis is away. What is left when the cache closes, or when the interpreter
exits (an ``atexit`` hook), is sent then (:meth:`SharedStats.final`); a process killed loses
its last interval.

The batch goes to the cache's current client (a plain client the cache switched to a Cluster
sends to the cluster). A ``redis.asyncio`` client (standalone, Sentinel-managed or a
``redis.asyncio.cluster.RedisCluster``) is never used from the thread: the thread schedules
the send as a task on the event loop the client's connections belong to.

Each process also records its current state (breaker open, journal size) under its host and
pid in ``{prefix}:stats:processes``, with the time, so the tool can list the live ones.
Both hashes expire a week after the last write (a retired prefix leaves nothing behind).

Fields: ``c|<model>|<name>`` counters, ``h|<histogram>|<bucket>`` latency buckets,
``s|<histogram>`` latency sums (seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _redis_compat
from .exc import ConfigurationError
from .stats import NBUCKETS, CacheStats, Counters, build_stats

log = logging.getLogger("sqlalchemy_writethrough")

#: seconds the stats hashes live after their last write
KEEP_FOR = 7 * 24 * 3600
#: a process that has not sent its state for this long is not listed as live
LIVE_FOR = 60.0

_senders: weakref.WeakSet[SharedStats] = weakref.WeakSet()
_thread_lock = threading.Lock()
_thread: threading.Thread | None = None
#: seconds a process with nothing new to send still says it is alive
HEARTBEAT = 20.0


def stats_key(prefix: str) -> str:
    return f"{prefix}:stats"


def processes_key(prefix: str) -> str:
    return f"{prefix}:stats:processes"


def _run() -> None:
    """One thread per process sends for every cache, each at its own interval."""
    while True:
        time.sleep(_tick())
        _send_due()


def _send_due() -> None:
    # a function of its own: no reference to a cache outlives one round
    now = time.monotonic()
    for sender in list(_senders):
        if now >= sender.due:
            try:
                sender.send()
            except Exception:  # never let the thread die: the next round tries again
                log.debug("writethrough: sending the stats failed", exc_info=True)


def _tick() -> float:
    intervals = [s.interval for s in list(_senders)]
    return min([*intervals, 1.0]) / 4 if intervals else 1.0


def _ensure_thread() -> None:
    global _thread
    with _thread_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="writethrough-stats", daemon=True)
            _thread.start()


class SharedStats:
    """Sends a cache's counters to Redis every ``interval`` seconds (see the module doc).

    ``client()`` gives the cache's current client: a ``redis.Redis`` or ``RedisCluster`` (the
    one a plain client was switched to, once it was), sent to from the calling thread; or a
    ``redis.asyncio`` one (``Redis`` or ``cluster.RedisCluster``), sent to on the event loop
    its connections belong to, as a task the background thread schedules there without
    waiting for it."""

    def __init__(
        self,
        counters: Counters,
        client: Callable[[], Any],
        prefix: str,
        interval: float,
        state: Callable[[], dict[str, Any]],
    ) -> None:
        self._counters = counters
        self._client = client
        self._prefix = prefix
        self.interval = interval
        self._state = state
        self._lock = threading.Lock()
        self._sent = counters.raw()
        self._sent_state: dict[str, Any] | None = None
        self._sent_at = 0.0
        self._warned = False
        #: an asyncio send is under way (its counts are not yet known sent)
        self._inflight = False
        #: the cache is closing or the process exiting: the last send says so, and the
        #: command-line tool lists the process as live no more
        self._exiting = False
        self.due = time.monotonic() + interval
        _senders.add(self)
        _ensure_thread()

    def stop(self) -> None:
        _senders.discard(self)

    def _forked(self) -> None:
        """In a forked child: the parent's counts are the parent's to send."""
        self._lock = threading.Lock()
        self._sent = self._counters.raw()
        self._sent_state = None
        self._inflight = False

    def _pending(self) -> tuple[list[tuple[Any, ...]], Any, dict[str, Any]] | None:
        """(the commands that send what the counters gained, the counters sent by them, the
        state recorded), or None when there is nothing to send; under ``_lock``."""
        self.due = time.monotonic() + self.interval
        now = self._counters.raw()
        counts, hist, sums = now
        sent_counts, sent_hist, sent_sums = self._sent
        key = stats_key(self._prefix)
        commands: list[tuple[Any, ...]] = []
        for (model, name), n in counts.items():
            delta = n - sent_counts.get((model, name), 0)
            if delta:
                commands.append(("HINCRBY", key, f"c|{model}|{name}", delta))
        for name, buckets in hist.items():
            before = sent_hist.get(name)
            for i, n in enumerate(buckets):
                delta = n - (before[i] if before else 0)
                if delta:
                    commands.append(("HINCRBY", key, f"h|{name}|{i}", delta))
            total = sums[name] - sent_sums.get(name, 0.0)
            if total:
                commands.append(("HINCRBYFLOAT", key, f"s|{name}", repr(total)))
        state = self._state()
        if self._exiting:
            state = {**state, "exited": True}
        heartbeat = self._sent_state is not None and time.monotonic() - self._sent_at >= HEARTBEAT
        if not (commands or heartbeat or state != (self._sent_state or state)):
            return None
        if commands:
            commands.append(("EXPIRE", key, KEEP_FOR))
        procs = processes_key(self._prefix)
        record = json.dumps({**state, "at": time.time()})
        commands.append(("HSET", procs, f"{socket.gethostname()}:{os.getpid()}", record))
        commands.append(("EXPIRE", procs, KEEP_FOR))
        return commands, now, state

    def _done(self, sent: Any, state: dict[str, Any]) -> None:
        self._sent = sent
        self._sent_state = state
        self._sent_at = time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        # a counts' flush is no cache operation: it never counts as one's failure
        if not self._warned:
            self._warned = True
            log.warning("writethrough: could not send the stats to Redis: %s", exc)
        else:
            log.debug("writethrough: could not send the stats to Redis: %s", exc)

    def send(self) -> bool:
        """Send what the counters gained since the last successful send (nothing when
        nothing changed, but for a heartbeat every 20 s once something was sent); False when
        Redis failed (it is sent with the next batch).

        With a ``redis.asyncio`` client: awaited in SQLAlchemy's greenlet, else scheduled on
        the running loop its connections belong to (True once scheduled; False when there is
        no such loop, and the counts wait for the next send)."""
        client = self._client()
        if client is None:  # the cache is gone
            return False
        if _redis_compat.uses_asyncio(client):
            from ._sa_compat import await_, in_greenlet

            if in_greenlet():
                return await_(self.asend())
            return self._schedule(client)
        with self._lock:
            pending = self._pending()
            if pending is None:
                return True
            commands, sent, state = pending
            try:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                pipe.execute()
            except Exception as exc:
                self._failed(exc)
                return False
            self._done(sent, state)
            return True

    async def asend(self, client: Any = None) -> bool:
        """:meth:`send`, awaited on the event loop: through a ``redis.asyncio`` client (
        ``client``, else the cache's), or a sync client's send in the loop's default executor
        (never blocking the loop)."""
        if client is None:
            client = self._client()
        if not _redis_compat.uses_asyncio(client):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.send)
        deadline = time.monotonic() + 30.0
        while True:  # one asyncio send at a time: each sends from what the last one sent
            with self._lock:
                if not self._inflight:
                    pending = self._pending()
                    if pending is None:
                        return True
                    self._inflight = True
                    break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        commands, sent, state = pending
        try:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()
        except Exception as exc:
            self._failed(exc)
            return False
        else:
            with self._lock:
                self._done(sent, state)
            return True
        finally:
            self._inflight = False

    def _schedule(self, client: Any) -> bool:
        """From a thread: :meth:`asend` as a task on the running loop the client's
        connections belong to, not waited for."""
        try:
            loops = [loop for loop in _redis_compat.bound_loops(client) if loop.is_running()]
        except RuntimeError:  # the pool changed while it was read: the next round
            return False
        if not loops:
            return False
        future = asyncio.run_coroutine_threadsafe(self.asend(), next(iter(loops)))
        future.add_done_callback(_consume)
        return True

    def final(self) -> bool:
        """The last send, when the cache closes or the process exits: never raises, and
        never waits longer than the client's socket timeout (nothing is tried while the
        cache's circuit breaker is open). A ``redis.asyncio`` client whose loop has ended is
        used on a loop of its own for this one send."""
        self.stop()
        self._exiting = True
        try:
            if self._state().get("breaker_open"):
                return False
            client = self._client()
            if not _redis_compat.uses_asyncio(client):
                return self.send()
            return self._send_on_new_loop(client)
        except Exception as exc:
            log.debug("writethrough: the last stats send failed: %s", exc)
            return False

    def _send_on_new_loop(self, client: Any) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigurationError(
                "this cache sends through redis.asyncio: await cache.aclose() in asyncio code"
            )
        if any(loop.is_running() for loop in _redis_compat.bound_loops(client)):
            # its loop runs on in another thread: the send is a task there, as the
            # background thread's are (its connections are not this thread's to close)
            return self._schedule(client)
        loop = asyncio.new_event_loop()
        try:
            if _redis_compat.is_async_cluster_client(client):
                kwargs = _redis_compat.cluster_connection_kwargs(client)
                timeout = kwargs.get("socket_timeout") or 1.0
                # the nodes' connections opened on a loop that has ended cannot be used on
                # another: closed here, each connects again on this loop
                for conn in _redis_compat.async_cluster_connections(client):
                    _redis_compat.close_elsewhere(conn)
                sent: bool = loop.run_until_complete(asyncio.wait_for(self.asend(), timeout))
                loop.run_until_complete(_disconnect_all(client))
                return sent
            timeout = _redis_compat.connection_kwargs(client).get("socket_timeout") or 1.0
            # the connections opened on a loop that has ended cannot be used on another: the
            # client's, and a Sentinel-managed client's sentinels' (asked where the primary is)
            pools = [client.connection_pool, *_redis_compat.async_sentinel_pools(client)]
            for pool in pools:
                for conn in _redis_compat.async_pool_connections(pool):
                    _redis_compat.close_elsewhere(conn)
                pool.reset()
            sent = loop.run_until_complete(asyncio.wait_for(self.asend(), timeout))
            for pool in pools:
                loop.run_until_complete(pool.disconnect())
            return sent
        finally:
            loop.close()


async def _disconnect_all(cluster: Any) -> None:
    """Close the connections an asyncio Cluster client's nodes opened on the running loop
    (the client stays usable: each connects again at its next use)."""
    for conn in _redis_compat.async_cluster_connections(cluster):
        await _redis_compat.adisconnect(conn)


def _consume(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("writethrough: sending the stats failed: %s", future.exception())


def send_at_exit() -> None:
    """What every cache's counters gained since their last send, at interpreter exit (the
    cache module's ``atexit`` hook)."""
    for sender in list(_senders):
        try:
            sender.final()
        except BaseException:  # never in the way of an exit
            pass


def _after_fork() -> None:
    global _thread, _thread_lock
    _thread = None
    # a thread of the parent starting the sender (a cache being built) held it at the fork
    _thread_lock = threading.Lock()
    senders = list(_senders)
    for sender in senders:
        sender._forked()
    if senders:
        _ensure_thread()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def read_shared(client: Any, prefix: str) -> tuple[CacheStats, list[dict[str, Any]]]:
    """Every process's counters under ``prefix``, added up, and the states of the processes
    that sent lately (``host``, ``pid``, ``breaker_open``, ``journal_size``, ``at``, and
    ``exited``: True once its cache closed or it exited), read with a sync client."""
    return parse_shared(client.hgetall(stats_key(prefix)), client.hgetall(processes_key(prefix)))


def _items(reply: Any) -> list[tuple[Any, Any]]:
    """An ``HGETALL`` reply as pairs: a dict (redis-py's reply callback), or the flat list
    a raw reply is."""
    if isinstance(reply, dict):
        return list(reply.items())
    flat = list(reply or ())
    return list(zip(flat[::2], flat[1::2], strict=True))


def parse_shared(raw_stats: Any, raw_processes: Any) -> tuple[CacheStats, list[dict[str, Any]]]:
    """:func:`read_shared` from the two ``HGETALL`` replies."""
    counts: dict[tuple[str, str], int] = {}
    hist: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    for field_b, value_b in _items(raw_stats):
        field = field_b.decode() if isinstance(field_b, bytes) else str(field_b)
        value = value_b.decode() if isinstance(value_b, bytes) else str(value_b)
        kind, _, rest = field.partition("|")
        if kind == "c":
            model, _, name = rest.rpartition("|")
            counts[(model, name)] = int(value)
        elif kind == "h":
            name, _, index = rest.rpartition("|")
            hist.setdefault(name, [0] * NBUCKETS)[int(index)] = int(value)
        elif kind == "s":
            sums[rest] = float(value)
    processes = []
    now = time.time()
    for field_b, value_b in _items(raw_processes):
        field = field_b.decode() if isinstance(field_b, bytes) else str(field_b)
        try:
            state = json.loads(value_b)
        except ValueError:
            continue
        if now - float(state.get("at", 0)) > LIVE_FOR:
            continue
        host, _, pid = field.rpartition(":")
        processes.append({"host": host, "pid": int(pid), **state})
    processes.sort(key=lambda p: (p["host"], p["pid"]))
    live = [p for p in processes if not p.get("exited")]  # an exited one holds nothing now
    stats = build_stats(
        counts.items(),
        hist,
        sums,
        breaker_open=any(p.get("breaker_open") for p in live),
        journal_size=sum(int(p.get("journal_size", 0)) for p in live),
        pending_publishes=sum(int(p.get("pending_publishes", 0)) for p in live),
    )
    return stats, processes


def reset_shared(client: Any, prefix: str) -> None:
    # one key at a time: on a Redis Cluster they are in different slots
    for key in (stats_key(prefix), processes_key(prefix)):
        client.delete(key)
