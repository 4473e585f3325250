"""Tell "the event loop was blocked" from "the machine was busy" in the asyncio tests.

A ticker task measures how late a 5 ms sleep wakes up (the loop's lag). A late tick has two
causes: the loop thread itself held on (a blocking socket read, ``time.sleep``, a long CPU
loop: what the asyncio tests guard against), or the machine (the process not scheduled, the
other core busy with the servers the test started): only the first is a bug. While a tick is
late, a watchdog thread samples the loop thread's innermost Python frame every 2 ms. A loop
that blocks stays on one line outside the selector for many samples in a row; a socket read
that waits for a frozen Redis releases the GIL, so the watchdog sees all of it. A process the
machine does not run takes no samples at all.

The lateness the tests budget (``stalled``) leaves out what the kernel says the threads of the
process spent waiting for a CPU while runnable (their run-queue delays,
``/proc/self/task/TID/schedstat``, field 2, summed): a loaded machine that does not run the loop
thread does not count, nor one that does not run another thread of the process while it holds
the GIL the loop thread waits for (asleep on the GIL, the loop thread itself is not runnable:
seen in CI, a 10 ms call judged a block of 0.6 s; the watchdog's own waits count too, since it
saw nothing meanwhile). A thread blocked in a socket read or ``time.sleep`` is asleep, not
runnable, and counts in full (so does CPU work on the loop). Where the kernel does not say (not
Linux), nothing is left out.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType


class LoopWatch:
    """Lag per window (``window`` names the phase the test is in), the time ticks spent late
    beyond ``blocked``, and every place where the loop thread stayed on one line for
    ``blocked`` seconds or more while a tick was late."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, blocked: float) -> None:
        self.loop = loop
        self.window = "healthy"
        self.lag: dict[str, float] = {}
        #: per window, the sum of every tick's lateness beyond ``blocked``, less the time the
        #: process's threads waited for a CPU meanwhile (what the machine explains)
        self.stalled: dict[str, float] = {}
        #: per window, the time the process's threads waited for a CPU during the ticks
        #: (run-queue delays; 0 where the kernel does not say)
        self.queued: dict[str, float] = {}
        #: a formatted stack for each block found (the loop thread's, at the moment found)
        self.blocks: list[str] = []
        self._blocked = blocked
        self._late = min(0.02, blocked / 2)
        self._beat = time.monotonic()
        self._loop_thread: int | None = None
        #: the process's run-queue clock (see _RunQueueClock), read by the watchdog too
        self._queued: Callable[[], float] = _RunQueueClock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)

    def __enter__(self) -> LoopWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)

    async def tick(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: the ticker."""
        self._loop_thread = threading.get_ident()
        queued = self._queued
        try:
            while not stop.is_set():
                q0 = queued()
                t0 = self.loop.time()
                self._beat = time.monotonic()
                await asyncio.sleep(0.005)
                late = self.loop.time() - t0 - 0.005
                waited = queued() - q0
                window = self.window
                self.lag[window] = max(self.lag.get(window, 0.0), late)
                self.queued[window] = self.queued.get(window, 0.0) + waited
                own = late - waited  # the lateness the machine does not explain
                if own > self._blocked:
                    beyond = own - self._blocked
                    self.stalled[window] = self.stalled.get(window, 0.0) + beyond
        finally:
            self._loop_thread = None

    def _watch(self) -> None:
        """A block: the loop thread on one line for ``blocked`` seconds or more, less the
        time it waited for a CPU meanwhile (a loaded machine that does not run it holds it on
        its line too: a socket send stretched to 50 ms is not the loop's doing). The kernel
        adds a wait to the thread's run-queue clock only once the thread runs again, so a
        line held that long is judged when the thread has left it (or when the watch stops),
        with its stack taken while it was there."""
        where: tuple[str, int] | None = None
        since = last = 0.0
        queued_since = 0.0
        held: str | None = None  # the stack of the line held ``blocked`` seconds, to judge

        def judge(until: float) -> None:
            nonlocal held
            if held is not None:
                on_line = until - since
                if on_line - (self._queued() - queued_since) >= self._blocked:
                    self.blocks.append(f"{held}: {on_line:.3f} s on one line\n{stack}")
                held = None

        stack = ""
        while not self._stop.wait(0.002):
            tid = self._loop_thread
            now = time.monotonic()
            frame = sys._current_frames().get(tid) if tid is not None else None
            if frame is None or now - self._beat < self._late:
                judge(last)
                where = None
                continue
            if frame.f_code.co_filename.endswith("selectors.py"):  # idle: waiting for events
                judge(last)
                where = None
                continue
            here = (frame.f_code.co_filename, frame.f_lineno)
            if here != where:
                judge(last)
                where, since = here, now
                queued_since = self._queued()
            elif held is None and now - since >= self._blocked:
                held = self.window
                stack = "".join(traceback.format_stack(frame))
            last = now
        judge(last)


class _RunQueueClock:
    """Seconds the threads of this process have waited for a CPU while runnable since the
    clock was made (their run-queue delays, read from Linux's schedstat, summed; a thread
    gone keeps what it added), from any thread; a clock that stays at 0 where the kernel
    does not say."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._total = 0
        self._primed = False
        self()
        self._primed = True

    def __call__(self) -> float:
        with self._lock:
            try:
                threads = os.listdir("/proc/self/task")
            except OSError:
                return 0.0
            for tid in threads:
                try:
                    with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                        delay = int(f.read().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile, or no schedstat
                # a thread born since the clock was made waited within its time
                before = self._seen.get(tid, 0 if self._primed else delay)
                self._seen[tid] = delay
                if delay > before:
                    self._total += delay - before
            return self._total / 1e9
