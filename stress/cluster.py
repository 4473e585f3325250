"""A throwaway Redis Cluster on loopback: primaries and replicas as real ``redis-server
--cluster-enabled yes`` processes, each in its own temporary directory (its own
``nodes.conf``), joined by ``redis-cli --cluster create``, killed with their parent.

A node that was ever a replica keeps the RDB file of its last full sync (``dump.rdb``: a replica
writes what it receives to disk before loading it) and loads it when it starts again: a killed
node does not come back empty but back in time, to that sync.

``cluster-node-timeout`` is short (1000 ms), so that a killed primary's replica is promoted
within two or three seconds. Helpers kill a primary (or fail it over with ``CLUSTER FAILOVER``)
and wait for the promotion, and move a hash slot to another primary key by key while traffic
runs (``CLUSTER SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``CLUSTER SETSLOT NODE``), which is
what makes clients see ``ASK`` and then ``MOVED``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from .redis_server import (
    admin_client,
    cli_binary,
    die_with_parent,
    free_port,
    server_binary,
    wait_for,
)

NODE_TIMEOUT_MS = 1000
SLOTS = 16384


def _admin(port: int, timeout: float = 1.0) -> redis.Redis:
    return admin_client(port, timeout)


class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` on 127.0.0.1 (its bus on port + 10000)."""

    def __init__(self, binary: str, directory: Path, tls_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.port = free_port(bus=True)
        self.dir = directory / f"node-{self.port}"
        self.dir.mkdir()
        self._proc: subprocess.Popen[bytes] | None = None
        #: with ``tls_args`` (certificate options), a TLS port too, which the bus and the
        #: replication use; the plain port stays, for the admin clients and redis-cli
        self.tls_port = free_port() if tls_args else None
        self._tls = (
            [
                *tls_args,
                "--tls-port",
                str(self.tls_port),
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                "--cluster-port",
                str(self.port + 10000),
            ]
            if tls_args
            else []
        )

    def start(self) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--loglevel",
                "warning",
                *self._tls,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def admin(self, timeout: float = 1.0) -> redis.Redis:
        """A direct client to this node (no redirections followed, no retries)."""
        return _admin(self.port, timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies at once, as in a crash."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

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

    def signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, sig)

    def node_id(self) -> str:
        with self.admin() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def role(self) -> str:
        """``master`` or ``slave`` (INFO replication), ``down`` when it does not answer."""
        try:
            with self.admin(0.5) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return "down"


@dataclass
class SlotMove:
    """What :meth:`ClusterGroup.migrate_slot` did."""

    slot: int
    source: int
    target: int
    keys: int


class ClusterGroup:
    """``primaries`` primaries with ``replicas`` replicas each, every slot assigned (one
    primary without replicas: a one-node cluster, started in a fraction of a second).

    ``start()`` returns once every node reports ``cluster_state:ok`` and knows every other
    node; ``close()`` stops everything within a few seconds, whatever state it is in.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, tls_args: Sequence[str] = ()) -> None:
        binary = server_binary()
        cli = cli_binary()
        if binary is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster")
        self.cli = cli
        self._dir = Path(tempfile.mkdtemp(prefix="stress-cluster-"))
        self.nodes = [
            ClusterNode(binary, self._dir, tls_args) for _ in range(primaries * (1 + replicas))
        ]
        self._replicas = replicas

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        """A URL of one (running) node, as ``RedisCluster.from_url`` takes it."""
        port = next(n.port for n in self.nodes if n.running)
        return f"redis://127.0.0.1:{port}/0"

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_for(lambda n=node: n.admin(0.2).ping(), timeout, f"node {node.port}")
        if len(self.nodes) == 1:  # redis-cli wants 3 primaries: one node takes every slot
            with self.nodes[0].admin() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(SLOTS))  # RANGE: 7.0+
            self.wait_ok(timeout)
            return
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in self.ports],
                "--cluster-replicas",
                str(self._replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Every running node says ``cluster_state:ok``, knows every running node as such,
        and every replica's link to its primary is up."""
        wait_for(self._all_ok, timeout, "cluster_state:ok on every node")

    def _all_ok(self) -> bool:
        running = [n for n in self.nodes if n.running]
        for node in running:
            with node.admin(0.5) as client:
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                lines = str(client.execute_command("CLUSTER", "NODES")).splitlines()
                alive = [
                    line
                    for line in lines
                    if "fail" not in line.split()[2] and line.split()[7] == "connected"
                ]
                if len(alive) < len(running):
                    return False
                replication = client.info("replication")
                if (
                    replication.get("role") == "slave"
                    and replication.get("master_link_status") != "up"
                ):
                    return False
        return True

    def slots(self) -> dict[int, list[tuple[int, int]]]:
        """Primary port -> the slot ranges it serves (CLUSTER SLOTS, asked of a running node)."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(redis.RedisError), node.admin(0.5) as client:
                found: dict[int, list[tuple[int, int]]] = {}
                for entry in client.execute_command("CLUSTER", "SLOTS"):
                    start, end, primary = entry[0], entry[1], entry[2]
                    found.setdefault(int(primary[1]), []).append((int(start), int(end)))
                return found
        raise RuntimeError("no cluster node answers")

    def primaries(self) -> list[int]:
        """Ports of the running nodes that serve slots."""
        return sorted(p for p in self.slots() if self.node(p).running)

    def owner(self, slot: int) -> int:
        """Port of the primary serving ``slot``."""
        for port, ranges in self.slots().items():
            if any(a <= slot <= b for a, b in ranges):
                return port
        raise LookupError(f"slot {slot} is not served")

    def url_of_a_primary_not_serving(self, *keys: str) -> str:
        """A URL of a primary that serves none of ``keys``' slots, so that a command on one of
        them meets a MOVED there. A primary, not any node: a failover (which a short node
        timeout starts on a loaded machine) moves slots to a replica of their primary only, so
        it cannot make this node serve them while the caller relies on the MOVED."""
        owners = {self.owner(key_slot(key.encode())) for key in keys}
        port = next(port for port in self.primaries() if port not in owners)
        return f"redis://127.0.0.1:{port}/0"

    def replica_of(self, primary: int) -> int:
        """Port of a replica of the primary at ``primary``."""
        primary_id = self.node(primary).node_id()
        for node in self.nodes:
            if node.port == primary or not node.running:
                continue
            with contextlib.suppress(redis.RedisError), node.admin(0.5) as client:
                for line in str(client.execute_command("CLUSTER", "NODES")).splitlines():
                    fields = line.split()
                    if "myself" in fields[2] and fields[3] == primary_id:
                        return node.port
        raise LookupError(f"no replica of {primary}")

    # -- faults ----------------------------------------------------------------------------

    def kill_primary(self, port: int, timeout: float = 20.0) -> int:
        """SIGKILL the primary at ``port`` and wait until its replica serves its slots and
        the cluster is ``ok`` again; returns the promoted replica's port."""
        replica = self.replica_of(port)
        self.node(port).kill()
        wait_for(lambda: self.node(replica).role() == "master", timeout, f"{replica} promoted")
        self.wait_serving(timeout)
        return replica

    def failover(self, primary: int, timeout: float = 20.0) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``primary`` (a coordinated manual failover: the
        primary stops taking writes until the replica has them all, then swaps roles); returns
        the new primary's port."""
        replica = self.replica_of(primary)
        with self.node(replica).admin() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        wait_for(lambda: self.node(replica).role() == "master", timeout, f"{replica} promoted")
        wait_for(lambda: self.node(primary).role() == "slave", timeout, f"{primary} demoted")
        self.wait_ok(timeout)
        return replica

    def restart(self, port: int, timeout: float = 20.0) -> None:
        """Start a killed node again; it rejoins as a replica of the
        node that took over its slots, from its nodes.conf. Not necessarily empty: nothing
        saves by itself, but a replica writes the RDB of each full sync to its ``dump.rdb``
        (``repl-diskless-load`` is off), and a restart loads it, so a node that was a replica
        comes back holding the data of its last full sync (a Redis gone back in time)."""
        node = self.node(port)
        node.start()
        wait_for(lambda: node.admin(0.2).ping(), timeout, f"node {port}")
        self.wait_ok(timeout)

    def restart_in_place(self, port: int, wait: float | None = 20.0) -> None:
        """SIGKILL the node at ``port`` and start it again at once, well within the node
        timeout: a primary keeps its slots (no failover) and serves them from what it loads,
        the RDB file of its last ``SAVE`` or full sync if any (back in time), else nothing; its
        replica syncs that from it. ``wait``: seconds to wait for every slot to be served
        again (None: return at once)."""
        node = self.node(port)
        node.kill()
        node.start()
        if wait is not None:
            wait_for(lambda: node.admin(0.2).ping(), wait, f"node {port}")
            self.wait_serving(wait)

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Every running node says ``cluster_state:ok`` (dead nodes may still be listed)."""
        wait_for(self._ok_without_down_nodes, timeout, "cluster_state:ok on the running nodes")

    def pause(self, port: int) -> None:
        """SIGSTOP the node at ``port``: it keeps its connections and answers nothing (a
        replica stops replicating)."""
        self.node(port).signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.node(port).signal(signal.SIGCONT)

    def _ok_without_down_nodes(self) -> bool:
        for node in self.nodes:
            if node.running:
                with node.admin(0.5) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
        return True

    def migrate_slot(
        self,
        slot: int,
        target: int,
        batch: int = 10,
        between: Callable[[], None] | None = None,
        timeout: float = 20.0,
    ) -> SlotMove:
        """Move ``slot`` to the primary at ``target``, ``batch`` keys per ``MIGRATE``, the
        way ``redis-cli --cluster reshard`` does; ``between()`` runs between two batches
        (while the slot is half moved: clients get ``ASK``). Afterwards every node names the
        target as the slot's owner (clients that ask the source get ``MOVED``)."""
        source = self.owner(slot)
        if source == target:
            return SlotMove(slot, source, target, 0)
        source_id, target_id = self.node(source).node_id(), self.node(target).node_id()
        src, dst = self.node(source).admin(5.0), self.node(target).admin(5.0)
        moved = 0
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
                moved += len(keys)
                if between is not None:
                    between()
            # the target first: from then on it serves the slot, whatever the source says
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            for node in self.nodes:
                if node.running and node.port not in (source, target) and node.role() == "master":
                    with node.admin() as client:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        finally:
            src.close()
            dst.close()
        wait_for(lambda: self.owner(slot) == target, timeout, f"slot {slot} served by {target}")
        return SlotMove(slot, source, target, moved)

    def keys_per_primary(self, pattern: str = "*") -> dict[int, int]:
        """How many keys matching ``pattern`` each running primary holds."""
        counts: dict[int, int] = {}
        for port in self.primaries():
            with self.node(port).admin(5.0) as client:
                counts[port] = sum(1 for _ in client.scan_iter(match=pattern, count=1000))
        return counts

    def close(self) -> None:
        for node in self.nodes:  # a stopped node would wait out its shutdown timeout
            node.signal(signal.SIGCONT)
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ClusterGroup:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_cluster(
    primaries: int = 3, replicas: int = 1, tls_args: Sequence[str] = ()
) -> Iterator[ClusterGroup]:
    """A started :class:`ClusterGroup`, closed (every process gone) afterwards."""
    with ClusterGroup(primaries, replicas, tls_args) as group:
        yield group
