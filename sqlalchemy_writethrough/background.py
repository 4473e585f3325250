"""Background publish (``publish="background"``): a commit's Redis writes after ``commit()``.

A transaction whose cached models all say ``publish="background"`` takes its locks as always,
before COMMIT; what comes after the database's answer (the publish of a commit, the restore of
a rollback) is a :class:`Job` handed to the cache's :class:`Publisher`, and ``commit()`` returns
without waiting for Redis. Until the job lands, the entries hold the transaction's locks, so
readers miss (and may not fill): never a stale value.

One worker per cache flavour runs the jobs in the order they were queued, several queued jobs
in one round trip: a daemon thread for a synchronous client, a task on the event loop (in a
greenlet of its own, awaiting Redis like the hooks do) for a ``redis.asyncio`` one. The queue is
bounded: a job that finds it full is run by the committing caller itself, synchronously.

At shutdown :meth:`WriteThroughCache.close` (``aclose()``) and an ``atexit`` hook wait for the
pending jobs, up to a timeout. A process that dies first leaves their locks in Redis, which
expire after ``lock_timeout`` into misses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._sa_compat import await_, greenlet_spawn

log = logging.getLogger("sqlalchemy_writethrough")

#: seconds the ``atexit`` hook waits for each cache's pending publishes
SHUTDOWN_TIMEOUT = 5.0
#: most jobs sent in one round trip
BATCH = 64


class Job:
    """What one ended transaction still has to write: a commit's publish (``committed``) or a
    rollback's restore, of its locked entries (``pairs``) and locked buckets (``gen_keys``).

    A job is queued as the transaction left it (its ``locked`` entries and their ``changes``,
    dictionaries the ended transaction no longer touches): whoever runs it builds the script
    arguments (:meth:`.WritePath.build`), so that a background commit does not build them
    before ``commit()`` returns."""

    __slots__ = (
        "changes",
        "checked",
        "committed",
        "counted",
        "covered",
        "gen_keys",
        "intents",
        "items",
        "known",
        "locked",
        "owner",
        "pairs",
    )

    def __init__(
        self,
        committed: bool,
        owner: str,
        locked: dict[str, str],
        changes: dict[str, Any] | None,
        gen_keys: list[str],
    ) -> None:
        self.committed = committed
        self.owner = owner
        #: entity key -> generation key of every entry the transaction locked, and what its
        #: commit wrote to each (a :class:`~.tracking.Change` by entity key); None once built
        self.locked: dict[str, str] | None = locked
        self.changes = changes
        #: (entity key, generation key) pairs, flattened, once built
        self.pairs: list[str] = []
        #: a publish's (payload, ttl) per pair, once built
        self.items: list[Any] = []
        #: what the stats count once the reply is in (see :mod:`.writing`), once built
        self.intents: Any = {}
        self.gen_keys = gen_keys
        #: the keyspace registry as the transaction's locks saw it (see :mod:`.siblings`; a
        #: list never read when none did), and the fields all their lists named
        #: (``SessionTracker.siblings_covered``); set for a commit's job
        self.known: Any = None
        self.covered: frozenset[str] | None = None
        #: the sibling check ran before ``commit()`` returned (see
        #: ``WritePath._check_siblings_now``): the worker's publish skips it
        self.checked = False
        #: the transaction was already counted in ``cache_write_failures``
        self.counted = False


Runner = Callable[[list[Job]], object]


class Publisher:
    """The queue of one cache flavour's background jobs and its worker (see the module doc).

    ``run(jobs)`` writes a batch and does the accounting; it must not raise (what it raises is
    logged). ``asynchronous``: the worker is a task on the running event loop, and
    :meth:`submit` must be called from SQLAlchemy's greenlet on that loop."""

    def __init__(self, run: Runner, limit: int, *, asynchronous: bool = False) -> None:
        self._run = run
        self.limit = limit
        self.asynchronous = asynchronous
        self._queue: collections.deque[Job] = collections.deque()
        #: jobs taken by the worker and not finished yet
        self._running = 0
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[Any] | None = None
        #: a test's hold on the worker: it takes no job while this is clear
        self._go = threading.Event()
        self._go.set()
        self._closed = False
        _publishers.add(self)

    @property
    def pending(self) -> int:
        """Jobs queued or being written."""
        return len(self._queue) + self._running

    def submit(self, job: Job) -> bool:
        """Queue ``job`` for the worker; False when the queue is full (or the publisher is
        closed): the caller then runs it itself."""
        with self._cond:
            if self._closed or len(self._queue) >= self.limit:
                return False
            self._queue.append(job)
            # the thread, if it waits (not notify(): a flush() may be waiting too)
            self._cond.notify_all()
        if self.asynchronous:
            self._ensure_task()
        elif self._thread is None:  # never started, or ended (it clears this as it ends)
            self._start_thread()
        return True

    # -- the worker ---------------------------------------------------------------------------

    def _ensure_task(self) -> asyncio.Task[Any]:
        """The asyncio worker on the running loop: a new one unless one is running there (a
        task left on a loop that has stopped, say a test's, is not waited for)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._task = loop.create_task(greenlet_spawn(self._drain))
        return task

    def _take(self) -> list[Job]:
        """The next batch (under the condition's lock)."""
        n = min(len(self._queue), BATCH)
        batch = [self._queue.popleft() for _ in range(n)]
        self._running = n
        return batch

    def _done(self) -> None:
        with self._cond:
            self._running = 0
            self._cond.notify_all()

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            self._run(batch)
        except Exception:  # the locks expire into misses
            log.exception("writethrough: background publish failed")
        finally:
            self._done()

    def _start_thread(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=_thread_main, args=(weakref.ref(self),), name="writethrough-publish",
                daemon=True,
            )  # fmt: skip
            self._thread.start()

    def _ready_batch(self) -> list[Job] | None:
        """The thread's next batch, if one is queued (and no test holds the worker)."""
        if not self._go.is_set():
            return None
        with self._cond:
            return self._take() if self._queue else None

    def _drain(self) -> None:
        """The asyncio worker, in a greenlet on the loop: runs until the queue is empty."""
        while True:
            if not self._go.is_set():
                await_(asyncio.sleep(0.005))
                continue
            with self._cond:
                if not self._queue:
                    return
                batch = self._take()
            self._run_batch(batch)

    # -- shutdown -----------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait (a thread) until nothing is pending, up to ``timeout`` seconds; True when
        nothing is. An asyncio publisher's jobs run only on their loop: see :meth:`aflush`."""
        if self.asynchronous:
            return self.pending == 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                if self._queue and (self._thread is None or not self._thread.is_alive()):
                    break  # a forked child's copy of its parent's queue: nobody to run it
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            return not (self._queue or self._running)

    async def aflush(self, timeout: float) -> bool:
        """:meth:`flush` on the event loop: lets the worker task run until nothing is
        pending, up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            if not self._queue and (self._task is None or self._task.done()):
                break
            task = self._ensure_task()
            # never raises (a cancelled or failed task is just done): _run_batch logs failures
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                break
        return self.pending == 0

    def close(self) -> None:
        """Queue nothing more (a later commit publishes synchronously)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _forked(self) -> None:
        """In a forked child: the parent's jobs are the parent's to run."""
        self._queue.clear()
        self._running = 0
        self._cond = threading.Condition(threading.Lock())
        held = not self._go.is_set()
        self._go = threading.Event()  # its lock may have been held by a thread at the fork
        if not held:
            self._go.set()
        self._thread = None
        self._task = None


def _thread_main(ref: weakref.ref[Publisher]) -> None:
    """The sync worker: holds its publisher only while there is work, so a dropped cache's
    publisher (and thread) can go: it waits for jobs on the queue and its condition, which
    hold nothing of the cache. As it ends, it says so (``_thread``), so that a submit starts
    another without asking each time whether this one is alive."""
    me = threading.current_thread()
    try:
        while True:
            waited_on = _work(ref)
            if waited_on is None:
                return
            queue, cond, go = waited_on
            if not go.wait(1.0):
                continue
            with cond:
                if not queue:
                    cond.wait(1.0)  # a submit, or close(), notifies
    finally:
        publisher = ref()
        if publisher is not None and publisher._thread is me:
            with publisher._cond:
                if publisher._thread is me:
                    publisher._thread = None


def _work(
    ref: weakref.ref[Publisher],
) -> tuple[collections.deque[Job], threading.Condition, threading.Event] | None:
    """Run the queued batches of the publisher, if it still exists; what to wait on for the
    next ones (its queue, condition and hold), or None when the worker should end. The
    publisher and its jobs are this function's locals: they are let go before the wait."""
    while True:
        publisher = ref()
        if publisher is None or (publisher._closed and not publisher._queue):
            return None
        batch = publisher._ready_batch()
        if batch is None:
            return publisher._queue, publisher._cond, publisher._go
        publisher._run_batch(batch)


_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


def wait_at_exit() -> None:
    """Wait for every cache's pending background publishes, a bounded time each (the cache
    module's ``atexit`` hook)."""
    for publisher in list(_publishers):
        if (
            publisher.pending
            and not publisher.asynchronous
            and not publisher.flush(SHUTDOWN_TIMEOUT)
        ):
            log.warning(
                "writethrough: %d background publishes still pending at exit; their "
                "entries stay locked (misses) until lock_timeout",
                publisher.pending,
            )


def _after_fork() -> None:
    for publisher in list(_publishers):
        publisher._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
