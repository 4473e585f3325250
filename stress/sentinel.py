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
from collections.abc import Sequence
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

    def __init__(
        self, directory: Path, primary_port: int, quorum: int, tls_args: Sequence[str] = ()
    ) -> None:
        """``tls_args``: the TLS options of :class:`SentinelGroup` (then ``tls_port`` is the
        port clients use, and the sentinel reaches the servers and the other sentinels over
        TLS)."""
        self.port = free_port()
        self.tls_port = free_port() if tls_args else None
        self._dir = directory / f"sentinel-{self.port}"
        self._dir.mkdir()
        self.config = self._dir / "sentinel.conf"  # Sentinel rewrites it: it must be its own
        tls = "".join(
            f"{name.lstrip('-')} {value}\n"
            for name, value in zip(*[iter(tls_args)] * 2, strict=True)
        )
        if self.tls_port is not None:
            tls += f"tls-port {self.tls_port}\ntls-replication yes\n"
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f'dir "{self._dir}"\n'
            "loglevel warning\n"
            f"{tls}"
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

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        tls_args: Sequence[str] = (),
        agree_timeout: float = 60.0,
    ) -> None:
        """``tls_args``: ``redis-server`` options naming a TLS certificate, key and CA
        (``--tls-cert-file ...``): every server and sentinel then also listens on a TLS port,
        replicates and is watched over it, and the sentinels name those ports (the plain
        ports stay, for the group's own admin connections). ``agree_timeout``: how long
        :meth:`start` waits for the sentinels to agree."""
        self.agree_timeout = agree_timeout
        binary = server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self._dir = Path(tempfile.mkdtemp(prefix="stress-sentinel-"))
        #: a server's plain port by the port the sentinels name it by (its TLS port)
        self._plain: dict[int, int] = {}
        self.servers: list[RedisServer] = []
        for _ in range(1 + replicas):
            if tls_args:
                tls_port = free_port()
                server = RedisServer(
                    extra_args=["--tls-port", str(tls_port), "--tls-replication", "yes", *tls_args]
                )
                self._plain[tls_port] = server.port
            else:
                server = RedisServer()
            self.servers.append(server)
        self.sentinels = [
            SentinelProcess(
                self._dir, self.named_port(self.servers[0]), sentinels // 2 + 1, tls_args
            )
            for _ in range(sentinels)
        ]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels' addresses, for ``redis.sentinel.Sentinel(...)`` (their TLS ports,
        in a TLS group)."""
        return [("127.0.0.1", s.tls_port or s.port) for s in self.sentinels]

    def named_port(self, server: RedisServer) -> int:
        """The port the sentinels name ``server`` by."""
        return next(
            (tls for tls, plain in self._plain.items() if plain == server.port), server.port
        )

    def start(self, timeout: float = 20.0) -> None:
        for server in self.servers:
            server.start()
            # a replica's first sync would otherwise wait 5 s for more replicas to join
            with server.admin() as client:
                client.config_set("repl-diskless-sync-delay", 0)
        primary = self.servers[0]
        for replica in self.servers[1:]:
            with replica.admin() as client:
                client.replicaof("127.0.0.1", self.named_port(primary))
        wait_for(lambda: self.replicas_of(primary.port) == len(self.servers) - 1, timeout, "sync")
        for sentinel in self.sentinels:
            sentinel.start(self.binary)
        # a sentinel learns the others from hello messages (every 2 s) and the replicas from
        # the primary's INFO (every 10 s): on a loaded machine that took longer than 20 s once
        try:
            wait_for(self.agreed, max(timeout, self.agree_timeout), "the sentinels to agree")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.disagreement()}") from None

    def disagreement(self) -> str:
        """What each sentinel says of the primary (for a group whose sentinels do not agree:
        another group's sentinels, still watching a port this group's server now has, count
        as sentinels here and may make it a replica)."""
        said = []
        for sentinel in self.sentinels:
            try:
                with sentinel.admin() as client:
                    state = client.sentinel_master(SERVICE)
                said.append(
                    f"sentinel :{sentinel.port} names {state['ip']}:{state['port']} "
                    f"({state['flags']}), {state['num-slaves']} replicas, "
                    f"{state['num-other-sentinels']} other sentinels"
                )
            except redis.RedisError as exc:
                said.append(f"sentinel :{sentinel.port}: {exc}")
        servers = ", ".join(f":{server.port}" for server in self.servers)
        return f"servers {servers} (the first started as primary); " + "; ".join(said)

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
            with _admin(self._plain.get(port, port)) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return "down"

    def replicas_of(self, port: int) -> int:
        """How many replicas are in sync with the server at ``port``."""
        with _admin(self._plain.get(port, port)) as client:
            info = client.info("replication")
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"
        )

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: a replica is promoted now, without waiting for agreement."""
        with self.sentinels[0].admin() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def server(self, port: int) -> RedisServer:
        """The server at ``port`` (its plain port, or the port the sentinels name)."""
        port = self._plain.get(port, port)
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
