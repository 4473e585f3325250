"""A throwaway Redis Sentinel group on loopback: a primary, replicas and sentinels, as real
``redis-server`` processes (``redis-server <file> --sentinel``: there may be no redis-sentinel
binary), each on a free port, in a temporary directory, killed with their parent.

Timings are short (``down-after-milliseconds`` 1000, ``failover-timeout`` 3000), so that a
``SENTINEL FAILOVER`` promotes the replica within a second or two. The demoted primary is
reconfigured later, by Sentinel's own clock (about 8 to 10 s after the promotion).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from .redis_server import (
    RedisServer,
    admin_client,
    die_with_parent,
    free_port,
    server_binary,
    wait_for,
)

SERVICE = "wtmaster"


def _admin(port: int, timeout: float = 0.5) -> redis.Redis:
    return admin_client(port, timeout)


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel`` monitoring ``service`` at ``primary_port``."""

    def __init__(self, directory: Path, primary_port: int, quorum: int) -> None:
        self.port = free_port()
        self._dir = directory / f"sentinel-{self.port}"
        self._dir.mkdir()
        self.config = self._dir / "sentinel.conf"  # Sentinel rewrites it: it must be its own
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f'dir "{self._dir}"\n'
            "loglevel warning\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 3000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> None:
        self._proc = subprocess.Popen(
            [binary, str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def admin(self) -> redis.Redis:
        return _admin(self.port)

    def stop(self, timeout: float = 3.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class SentinelGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority).

    ``start()`` returns once every sentinel knows the primary, every replica and every other
    sentinel; ``close()`` stops everything within a few seconds, whatever state it is in.
    """

    def __init__(self, replicas: int = 1, sentinels: int = 3) -> None:
        binary = server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self._dir = Path(tempfile.mkdtemp(prefix="stress-sentinel-"))
        self.servers = [RedisServer() for _ in range(1 + replicas)]
        self.sentinels = [
            SentinelProcess(self._dir, self.servers[0].port, sentinels // 2 + 1)
            for _ in range(sentinels)
        ]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels' addresses, for ``redis.sentinel.Sentinel(...)``."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self, timeout: float = 20.0) -> None:
        for server in self.servers:
            server.start()
            # a replica's first sync would otherwise wait 5 s for more replicas to join
            with server.admin() as client:
                client.config_set("repl-diskless-sync-delay", 0)
        primary = self.servers[0]
        for replica in self.servers[1:]:
            with replica.admin() as client:
                client.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: self.replicas_of(primary.port) == len(self.servers) - 1, timeout, "sync")
        for sentinel in self.sentinels:
            sentinel.start(self.binary)
        wait_for(self.agreed, timeout, "the sentinels to agree")

    def agreed(self) -> bool:
        """Every sentinel names the same primary and sees every replica and sentinel."""
        seen = set()
        for sentinel in self.sentinels:
            with sentinel.admin() as client:
                state = client.sentinel_master(SERVICE)
            if (
                int(state["num-slaves"]) != len(self.servers) - 1
                or int(state["num-other-sentinels"]) != len(self.sentinels) - 1
                or "master" not in state["flags"].split(",")
                or {"s_down", "o_down", "failover_in_progress"} & set(state["flags"].split(","))
            ):
                return False
            seen.add((state["ip"], int(state["port"])))
        return len(seen) == 1

    def primary_port(self) -> int | None:
        """The primary's port, if a majority of the sentinels name the same one."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError), sentinel.admin() as client:
                addr = client.sentinel_get_master_addr_by_name(SERVICE)
                if addr:
                    votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
        for port, n in votes.items():
            if n > len(self.sentinels) // 2:
                return port
        return None

    def role(self, port: int) -> str:
        """``master`` or ``slave`` (INFO replication), ``down`` when it does not answer."""
        try:
            with _admin(port) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return "down"

    def replicas_of(self, port: int) -> int:
        """How many replicas are in sync with the server at ``port``."""
        with _admin(port) as client:
            info = client.info("replication")
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"
        )

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: a replica is promoted now, without waiting for agreement."""
        with self.sentinels[0].admin() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def pause(self, port: int) -> None:
        """SIGSTOP the server at ``port``: it keeps its connections and answers nothing."""
        self._signal(port, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self._signal(port, signal.SIGCONT)

    def _signal(self, port: int, sig: signal.Signals) -> None:
        proc = self.server(port)._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def close(self) -> None:
        for server in self.servers:  # a stopped server would wait out its shutdown timeout
            self.resume(server.port)
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
