"""A loopback TCP proxy in front of Redis that misbehaves on purpose.

Modes (``proxy.mode``, switchable at any time from another thread):

``pass``       forward everything untouched;
``faulty``     every connection draws its own fault rate (up to ``max_rate``); each chunk it
               forwards, in either direction, then suffers with that probability one of: a delay
               (5-50 ms), a stall (0.3-1.5 s, longer than the client's socket timeout, after
               which the chunk is still delivered: a command arrives late, after its caller gave
               up), or a drop (part of the chunk, or nothing, is forwarded, then both sides are
               reset: a half-done pipeline or a truncated reply);
``blackhole``  accept, read and discard, never forward nor answer (a hung server); connections
               that were open stop forwarding too.

The proxy runs an asyncio loop in a daemon thread; ``close()`` stops it and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter


class FaultyProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        mode: str = "pass",
        max_rate: float = 0.03,
        seed: int | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.max_rate = max_rate
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, name="stress-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- thread and server ---------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=2)

    def close(self) -> None:
        if self._thread.is_alive() and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(5)

    def kill_connections(self) -> None:
        """Reset every open connection (both sides)."""

        done = threading.Event()

        def _abort() -> None:
            try:
                for w in list(self._writers):
                    w.transport.abort()
            finally:
                # abort() closes each socket in a callback it schedules: set after those.
                self._loop.call_soon(done.set)

        # Wait until the sockets are closed: a command sent right after this returns must not
        # slip through to the former upstream before the reset.
        self._loop.call_soon_threadsafe(_abort)
        done.wait(5)

    # -- one connection ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.counts["connections"] += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self.mode == "blackhole":
                await self._discard(reader)
                return
            try:
                up_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.upstream_port), 1.0
                )
            except (OSError, asyncio.TimeoutError):
                self.counts["upstream_refused"] += 1
                writer.transport.abort()
                return
            self._writers.add(upstream_writer)
            rate = self._rng.uniform(0, self.max_rate)
            state = {"dead": False}
            await asyncio.gather(
                self._pump(reader, upstream_writer, rate, state, writer),
                self._pump(up_reader, writer, rate, state, upstream_writer),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    with contextlib.suppress(Exception):
                        w.transport.abort()
            self._tasks.discard(task)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        rate: float,
        state: dict[str, bool],
        src_writer: asyncio.StreamWriter,
    ) -> None:
        rng = self._rng
        try:
            while not state["dead"]:
                data = await src.read(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    self.counts["blackholed"] += 1
                    await self._discard(src)
                    break
                if self.mode == "faulty" and rng.random() < rate:
                    roll = rng.random()
                    if roll < 0.5:
                        self.counts["delays"] += 1
                        await asyncio.sleep(rng.uniform(0.005, 0.05))
                    elif roll < 0.75:
                        self.counts["stalls"] += 1
                        await asyncio.sleep(rng.uniform(0.3, 1.5))
                    else:
                        self.counts["drops"] += 1
                        cut = rng.randrange(len(data) + 1)
                        if cut:
                            dst.write(data[:cut])
                            with contextlib.suppress(Exception):
                                await asyncio.wait_for(dst.drain(), 1.0)
                        state["dead"] = True
                        dst.transport.abort()
                        src_writer.transport.abort()
                        return
                if dst.transport.is_closing():
                    break
                dst.write(data)
                await asyncio.wait_for(dst.drain(), 5.0)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            state["dead"] = True
            dst.transport.abort()
            src_writer.transport.abort()
