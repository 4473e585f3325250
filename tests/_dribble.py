"""A loopback proxy in front of Redis that hands the server's replies on slowly.

Commands go to Redis untouched; replies come back ``chunk`` bytes at a time (each its own
``send``, ``TCP_NODELAY``), and once ``stall_after`` bytes of replies have passed on a
connection, no more until that connection closes: a reply cut off half-way, as a server or a
network that stalls would leave it. Threads only, loopback only; every socket closes within
``linger`` seconds of being left, and at ``close()``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class DribblingProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        chunk: int = 1,
        pause: float = 0.0,
        stall_after: int | None = None,
        linger: float = 10.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.chunk = chunk
        self.pause = pause
        #: bytes of replies a connection passes on before it stalls (None: never), read at
        #: each connection's start
        self.stall_after = stall_after
        self.linger = linger
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="dribble-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            self._track(client)
            self._track(upstream)
            threading.Thread(
                target=self._forward, args=(client, upstream), name="dribble-up", daemon=True
            ).start()
            threading.Thread(
                target=self._replies,
                args=(upstream, client, self.stall_after),
                name="dribble-down",
                daemon=True,
            ).start()

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(self.linger)
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def _replies(self, src: socket.socket, dst: socket.socket, stall_after: int | None) -> None:
        src.settimeout(self.linger)
        passed = 0
        try:
            while data := src.recv(65536):
                for i in range(0, len(data), self.chunk):
                    piece = data[i : i + self.chunk]
                    if stall_after is not None and passed + len(piece) > stall_after:
                        dst.sendall(piece[: stall_after - passed])
                        # stall: hold the rest until the client hangs up (its reader closes
                        # both sockets), at most ``linger`` seconds
                        deadline = time.monotonic() + self.linger
                        while dst.fileno() != -1 and time.monotonic() < deadline:
                            if self._closed.wait(0.01):
                                break
                        return
                    dst.sendall(piece)
                    passed += len(piece)
                    if self.pause:
                        time.sleep(self.pause)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
