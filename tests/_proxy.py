"""A loopback TCP proxy in front of Redis that can misbehave the way a server or network does.

``LoopbackProxy(upstream)`` listens on 127.0.0.1 and forwards each connection to ``upstream``;
``LoopbackProxy(None)`` accepts connections and never answers (a stalled server). Switches, all
of them observable by a client only as what it receives:

* ``blackhole()``: requests are read and dropped, nothing answers (``forward()`` ends it);
* ``deafen()``: requests reach Redis, its replies are dropped (``forward()`` ends it);
* ``chunk=n``: replies are passed on ``n`` bytes per ``send`` (``TCP_NODELAY``);
* ``stall_after=n``: once ``n`` bytes of replies have passed on a connection, no more (a reply
  cut off half-way); read at each connection's start;
* ``split_once(between, *needles)``: the next write holding two commands or more and every
  needle is cut after its first command: once Redis has answered that one, ``between()``
  runs (another client's commands land there), then the rest goes on: a pipeline that
  reached Redis in two reads, as a large one does.

``fast_client(proxy.url)`` is a client whose timeouts make such a failure cost 0.2 s.

Threads only (daemons), loopback only. ``close()`` (or leaving the ``with`` block) shuts every
socket down, which ends every thread, and joins them with a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Upper bound for anything that waits for Redis to come back (breaker cooldown, lock expiry).
RECOVERY_DEADLINE_S = 5.0


def fast_client(url: str) -> redis.Redis:
    """A client as a careful user builds it: 0.2 s timeouts and no retries.

    (redis-py's default retry policy, 10 retries with backoff, would turn one timeout into
    several seconds; the breaker would still bound the outage, but not the first calls.)
    """
    return redis.Redis.from_url(
        url, socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )


def upstream_of(redis_url: str) -> tuple[str, int]:
    """The (host, port) a Redis URL connects to; skips the test unless it is plain TCP."""
    if not redis_url.startswith("redis://"):
        import pytest

        pytest.skip(
            f"the loopback proxy forwards plain TCP, and REDIS_URL is {redis_url.split(':')[0]}"
        )
    kwargs = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    return str(kwargs.get("host", "127.0.0.1")), int(kwargs.get("port", 6379))


class LoopbackProxy:
    def __init__(
        self,
        upstream: tuple[str, int] | None,
        *,
        chunk: int | None = None,
        stall_after: int | None = None,
    ) -> None:
        self._upstream = upstream
        self.chunk = chunk
        #: bytes of replies a connection passes on before it stalls (None: never)
        self.stall_after = stall_after
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._deaf = threading.Event()
        #: (needles, between) of an armed :meth:`split_once`
        self._split: tuple[tuple[bytes, ...], Any] | None = None
        #: whether a split has run its ``between``
        self.split_done = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        """Stop forwarding: connections stay open (and new ones are accepted), nothing answers."""
        self._forwarding.clear()

    def deafen(self) -> None:
        """Forward requests but swallow the replies: Redis runs each command, the client
        never hears it did."""
        self._deaf.set()

    def split_once(self, between: Any, *needles: bytes) -> None:
        """Cut the next write that holds every needle and two commands or more (see the
        module's docstring); ``split_done`` is set once ``between`` has run."""
        self.split_done.clear()
        self._split = (needles, between)

    def forward(self) -> None:
        assert self._upstream is not None, "a stalling server has nothing to forward to"
        self._deaf.clear()
        self._forwarding.set()

    def close(self, timeout: float = 2.0) -> None:
        self._closed.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> LoopbackProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="loopback-proxy", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            if self._closed.is_set():
                _close(sock)
                raise OSError("proxy closed")
            self._sockets.append(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                client.settimeout(None)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._track(client)
                upstream = None
                if self._upstream is not None:
                    upstream = socket.create_connection(self._upstream, timeout=2)
                    upstream.settimeout(None)
                    self._track(upstream)
            except OSError:
                _close(client)
                continue
            if upstream is None:
                self._spawn(self._drain, client)
            else:
                answered = threading.Event()
                self._spawn(self._requests, client, upstream, answered)
                self._spawn(self._replies, upstream, client, self.stall_after, answered)

    def _drain(self, client: socket.socket) -> None:
        """Read and drop whatever the client sends, never answer."""
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass
        _close(client)

    def _requests(self, src: socket.socket, dst: socket.socket, answered: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self._forwarding.is_set():
                    continue  # black hole: the request is swallowed
                split = self._split
                cut = None
                if split is not None and all(n in data for n in split[0]):
                    cut = _first_command_end(data)
                if cut is not None and cut < len(data):
                    self._split = None
                    answered.clear()
                    dst.sendall(data[:cut])
                    answered.wait(5.0)  # Redis ran the first command
                    try:
                        split[1]()
                    finally:
                        self.split_done.set()
                        dst.sendall(data[cut:])
                else:
                    dst.sendall(data)
        _close(src)
        _close(dst)

    def _replies(
        self,
        src: socket.socket,
        dst: socket.socket,
        stall_after: int | None,
        answered: threading.Event,
    ) -> None:
        budget = stall_after
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                answered.set()
                if self._deaf.is_set():
                    continue  # deaf: the reply is swallowed
                if budget is not None:
                    # stalled past the budget: the rest is swallowed until the client hangs up
                    data, budget = data[:budget], max(budget - len(data), 0)
                step = self.chunk or len(data) or 1
                for i in range(0, len(data), step):
                    dst.sendall(data[i : i + step])
        _close(src)
        _close(dst)


def _first_command_end(data: bytes) -> int | None:
    """Where the first command of a RESP request (an array of bulk strings) ends in
    ``data``; None unless it is whole there."""
    if not data.startswith(b"*"):
        return None
    end = data.find(b"\r\n")
    if end < 0:
        return None
    at = end + 2
    for _ in range(int(data[1:end])):
        end = data.find(b"\r\n", at)
        if end < 0 or data[at : at + 1] != b"$":
            return None
        at = end + 2 + int(data[at + 1 : end]) + 2
        if at > len(data):
            return None
    return at


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
