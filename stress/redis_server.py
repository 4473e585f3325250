"""A throwaway ``redis-server`` on a free loopback port, which can be restarted with its data
lost, or from an older snapshot (its own or another server's).

Which server binary every fixture and stress run starts (standalone servers, Cluster nodes,
sentinels): ``$REDIS_SERVER_BINARY`` if set (a path, or a name looked up on PATH: a Valkey
build's ``valkey-server``, another Redis version), else ``redis-server`` on PATH; the cli
(``redis-cli --cluster create``): ``$REDIS_CLI_BINARY``, else the ``-cli`` next to a configured
server (``valkey-server`` -> ``valkey-cli`` in the same directory), else ``redis-cli`` on PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_PR_SET_PDEATHSIG = 1

#: Environment variable naming the server binary to start instead of ``redis-server``.
SERVER_BINARY_ENV = "REDIS_SERVER_BINARY"
#: Environment variable naming the cli binary to run instead of ``redis-cli``.
CLI_BINARY_ENV = "REDIS_CLI_BINARY"


def _configured(variable: str) -> str | None:
    """The executable ``$variable`` names; None when unset. A set variable naming nothing
    runnable is a broken setup: it raises rather than falling back to another server."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    found = shutil.which(value)
    if found is None:
        raise RuntimeError(f"${variable}={value!r} is not an executable file (nor on PATH)")
    return found


def server_binary() -> str | None:
    """The server to start: ``$REDIS_SERVER_BINARY``, else ``redis-server`` on PATH (None:
    neither)."""
    return _configured(SERVER_BINARY_ENV) or shutil.which("redis-server")


def cli_binary() -> str | None:
    """The cli to run: ``$REDIS_CLI_BINARY``; else, with ``$REDIS_SERVER_BINARY`` set, the
    ``-cli`` beside it (``valkey-server`` -> ``valkey-cli``), so that one variable picks a
    whole build; else ``redis-cli`` on PATH (None: none of them)."""
    configured = _configured(CLI_BINARY_ENV)
    if configured is not None:
        return configured
    server = _configured(SERVER_BINARY_ENV)
    if server is not None:
        path = Path(server)
        if path.name.endswith("-server"):
            sibling = path.with_name(path.name[: -len("server")] + "cli")
            if os.access(sibling, os.X_OK):
                return str(sibling)
    return shutil.which("redis-cli")


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def admin_client(port: int, timeout: float) -> redis.Redis:
    """A decoding client for a fixture's own server, with no retries: a fixture must see a
    failure as it happens."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``condition`` (Redis errors count as False) until it is true, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(bus: bool = False) -> int:
    """A loopback port nobody listens on, never the same twice in this process: the servers
    that get them may start only later (three sentinels once drew one port). ``bus``: port +
    10000 is free too, as a Redis Cluster node needs for its bus."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if bus and not _bindable(port + 10000):
            continue
        with _handed_out_lock:
            if port in _handed_out or (bus and port + 10000 in _handed_out):
                continue
            _handed_out.add(port)
            if bus:
                _handed_out.add(port + 10000)
            return port


def _bindable(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisServer:
    """``redis-server --save "" --appendonly no`` on 127.0.0.1; ``restart()`` loses every key
    (unless a ``SAVE`` sent to it left an RDB file), ``restart(from_rdb=snapshot())`` goes back
    to the moment of that snapshot."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        """``extra_args``: more ``redis-server`` options (a TLS port, say: the plain port
        stays, for :meth:`admin`)."""
        binary = server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="stress-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._extra = list(extra_args)
        self.restarts = 0
        self._snapshots = 0

    def admin(self, timeout: float = 0.5) -> redis.Redis:
        """A direct client that does not retry (redis-py's default retry backs off for seconds)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    @property
    def _rdb(self) -> Path:
        return Path(self._dir) / "dump.rdb"  # redis-server's default dbfilename, in --dir

    def snapshot(self) -> Path:
        """``SAVE`` now; returns a copy of the RDB file, which ``start(from_rdb=...)`` of this
        or another server loads. The server keeps running (and stops without saving)."""
        client = self.admin(5.0)
        try:
            client.save()
        finally:
            client.close()
        self._snapshots += 1
        copy = Path(self._dir) / f"snapshot-{self._snapshots}.rdb"
        self._rdb.replace(copy)  # a later start loads nothing unless asked to
        return copy

    def start(self, timeout: float = 10.0, from_rdb: Path | None = None) -> None:
        """Start holding what ``from_rdb`` (a :meth:`snapshot`) held; without it, what the
        last plain ``SAVE`` left in the RDB file, if any (nothing: the server never saves by
        itself, and :meth:`snapshot` and a start from a snapshot take the file away)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if from_rdb is not None:
            shutil.copyfile(from_rdb, self._rdb)
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
                *self._extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = self.admin()
                try:
                    client.ping()  # a server still loading its RDB file answers LOADING
                    if from_rdb is not None:
                        self._rdb.unlink()  # loaded: a later plain restart loses everything
                    return
                finally:
                    client.close()
            except redis.RedisError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.01)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets open and answers nothing (a stalled Redis:
        every call waits for its socket timeout) until :meth:`thaw`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN NOSAVE (or a kill, if it does not answer); the data is lost."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(redis.RedisError):
            client = self.admin()
            try:
                client.shutdown(nosave=True)
            finally:
                client.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash; the data is lost."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5)

    def restart(
        self, down_for: float = 0.0, from_rdb: Path | None = None, crash: bool = False
    ) -> None:
        """Stop (``SHUTDOWN NOSAVE``, or SIGKILL if ``crash``) and start again: empty, or
        back in time to the snapshot ``from_rdb``."""
        if crash:
            self.kill()
        else:
            self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start(from_rdb=from_rdb)
        self.restarts += 1

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
