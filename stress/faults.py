"""The fault schedule of a run: what to break, and when.

Run from the runner's main loop (no threads): :meth:`FaultSchedule.tick` performs whatever is
due. Worker-side faults (SIGKILL at flush or after COMMIT, deadlock-prone transactions) are
switched on in the workers' configuration instead; see :mod:`stress.worker`.

Every Redis fault includes "Redis forgets": besides a restart with every key lost,

``redis-snapshot``  ``SAVE`` at a random moment, keep running, then stop (``SHUTDOWN NOSAVE`` or
                    SIGKILL) and start from that snapshot: Redis goes back in time, holding old
                    values under the generations of that moment, and none of the later locks;
``flushall``        ``FLUSHALL`` on open connections: entries, locks, leases, generations, the
                    keyspace registry and the epoch key vanish at once, nothing disconnects;
``redis-switch``    the proxy every worker goes through switches to another server, started from
                    a snapshot of the current one taken a few seconds earlier (an older copy),
                    and resets every connection: a failover to a replica that lagged behind;
``evict``           every 0.3 to 1.5 s, for 0.1 to 1 s, the server is squeezed a few KB below the
                    memory it uses (``maxmemory``, under ``allkeys-random`` or
                    ``volatile-random``): it evicts keys of every kind, one at a time, while the
                    workers run (:mod:`stress.eviction`, which also hears every eviction);
``evict-locks``     (opt-in, not in ``all``) every 20 to 100 ms, one to three of the locks the
                    server holds (entries' and generation locks) are deleted, as an eviction of
                    each would: real eviction rarely lands on a lock in its short life.
``evict-registry``  (opt-in) every 0.2 to 1 s (``--evict-registry-every``) the keyspace
                    registry alone is deleted, as an ``allkeys-*`` eviction of it would, the
                    entries staying: with
                    ``--versions 2``, what a rolling deploy meets (see the library's
                    ``siblings`` module: the next commit that goes by the new registry makes
                    it whole again).

Two faults run on a Redis topology of their own instead of the one throwaway server (so they
combine with the worker-side faults and ``evict-registry``, which deletes the registry on the
primary that holds it, not with the other server faults above):

``sentinel-failover``  a primary, a replica and three sentinels (:mod:`stress.sentinel`); the
                       workers use ``Sentinel.master_for()``; ``SENTINEL FAILOVER`` every 5 to 9
                       s (the old primary takes writes until Sentinel demotes it ~10 s later);
``cluster-failover``   3 primaries and 3 replicas (:mod:`stress.cluster`); the workers use a
                       ``RedisCluster``; every 3 to 6 s a random primary is SIGKILLed (and started
                       again, as a replica, once its replica is promoted), or a replica takes
                       over with ``CLUSTER FAILOVER``, or the primary saves a snapshot
                       (``SAVE``) and 1 to 3 s later is SIGKILLed and started again at once,
                       well within the node timeout: it stays the primary and serves its slots
                       from that snapshot (a crash under a supervisor: back in time, without a
                       failover; its replica syncs the old data from it). A killed node restarts
                       from the RDB file of its last full sync or save, if it had one (back in
                       time); one killed in the last second restarts when the run heals, which
                       may be before its replica's promotion: its old data may then become the
                       primary's, after the workers stopped (see
                       :func:`stress.runner.epoch_checked`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import redis
from redis.crc import key_slot

from .cluster import ClusterGroup
from .eviction import POLICIES, LockDropper, Squeezer
from .history import now
from .proxy import FaultyProxy
from .redis_server import RedisServer
from .sentinel import SentinelGroup, wait_for

ALL_FAULTS = (
    "redis-restart",
    "redis-snapshot",
    "flushall",
    "redis-switch",
    "client-kill",
    "proxy",
    "sigkill",
    "db-errors",
    "evict",
)
#: faults a run takes only when named (not in ``all``): targeted, where ``all``'s are natural
OPT_IN_FAULTS = ("evict-locks", "evict-registry")
#: faults that need the workers to reach Redis through the proxy
PROXIED = frozenset({"proxy", "redis-switch"})
#: faults on a Redis topology of their own (not in ``all``; one at a time)
TOPOLOGY_FAULTS = ("sentinel-failover", "cluster-failover")
#: faults that act on the workers, on any topology
WORKER_FAULTS = frozenset({"sigkill", "db-errors"})
#: faults that act on the single throwaway server (they do not combine with TOPOLOGY_FAULTS)
SERVER_FAULTS = frozenset((*ALL_FAULTS, *OPT_IN_FAULTS)) - WORKER_FAULTS
#: server faults that also run on a topology's primaries (the registry's node of a Cluster)
TOPOLOGY_COMPANIONS = frozenset({"evict-registry"})
#: a failover window ends this long after the promotion: the workers' epoch_check_interval
#: (1 s, the default) and the sentinels' own lag
WINDOW_AFTER_PROMOTION_NS = 1_250_000_000
#: faults not built yet, and what they wait for (``--faults`` names them with this reason)
PLANNED_FAULTS: dict[str, str] = {}


def topology_of(faults: frozenset[str]) -> str:
    """``server``, ``sentinel`` or ``cluster``: what Redis a run with ``faults`` needs."""
    chosen = [f for f in TOPOLOGY_FAULTS if f in faults]
    if not chosen:
        return "server"
    if len(chosen) > 1 or faults & (SERVER_FAULTS - TOPOLOGY_COMPANIONS):
        raise ValueError(
            f"{', '.join(chosen)} run on a Redis topology of their own: combine "
            "them only with sigkill, db-errors and evict-registry"
        )
    return chosen[0].split("-", 1)[0]


class FaultSchedule:
    def __init__(
        self,
        faults: frozenset[str],
        server: RedisServer | None,
        proxy: FaultyProxy | None,
        rng: random.Random,
        standby: RedisServer | None = None,
        sentinel: SentinelGroup | None = None,
        cluster: ClusterGroup | None = None,
        squeezer: Squeezer | None = None,
        dropper: LockDropper | None = None,
        registry: str = "",
        registry_every: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        """``server``: the Redis the workers reach (through ``proxy`` if any); ``standby``: the
        other server ``redis-switch`` moves them to (and back, after refreshing it);
        ``sentinel`` / ``cluster``: the topology of ``sentinel-failover`` /
        ``cluster-failover`` (then there is no ``server``); ``squeezer``: what ``evict``
        squeezes the server with; ``dropper``: what ``evict-locks`` deletes locks with;
        ``registry``: the keyspace registry's key, which ``evict-registry`` deletes, every
        ``registry_every`` seconds (drawn between the two)."""
        self.faults = faults
        self._server = server
        self.sentinel = sentinel
        self.cluster = cluster
        self.proxy = proxy
        self.standby = standby
        self.rng = rng
        self.counts: Counter[str] = Counter()
        #: "<history time> <fault>" of every fault injected, for reading a failed run's logs
        self.timeline: list[str] = []
        start = time.monotonic()
        self._next_restart = start + rng.uniform(2, 4)
        self._next_kill = start + rng.uniform(0.5, 1.5)
        self._next_flush = start + rng.uniform(1.5, 3.5)
        #: redis-snapshot: the snapshot taken (None: take one at _next_snapshot), restored at
        #: _next_restore
        self._snapshot: Path | None = None
        self._next_snapshot = start + rng.uniform(1, 2.5)
        self._next_restore = 0.0
        #: redis-switch: the standby is loaded with a snapshot of the server at _next_copy and
        #: becomes the server at _next_switch
        self._standby_ready = False
        self._next_copy = start + rng.uniform(1, 3)
        self._next_switch = 0.0
        if "redis-switch" in faults and (proxy is None or standby is None):
            raise ValueError("redis-switch needs the proxy and a standby server")
        self._next_failover = start + rng.uniform(2, 4)
        if "evict" in faults and squeezer is None:
            raise ValueError("evict needs a squeezer (and its eviction listener)")
        self.squeezer = squeezer
        self._next_squeeze = start + rng.uniform(0.3, 1.0)
        self._next_let_go = 0.0
        if "evict-locks" in faults and dropper is None:
            raise ValueError("evict-locks needs a lock dropper")
        self.dropper = dropper
        self._next_drop = start + rng.uniform(0.02, 0.1)
        if "evict-registry" in faults and not registry:
            raise ValueError("evict-registry needs the registry's key")
        self.registry = registry
        self._registry_every = registry_every
        self._next_registry_drop = start + rng.uniform(*registry_every)
        #: cluster-failover: the primary killed, and the replica whose promotion ends it
        self._victim: tuple[int, int] | None = None
        self._victim_deadline = 0.0
        #: cluster-failover: the primary that saved a snapshot, and when it is restarted
        self._saved: tuple[int, float] | None = None
        #: sentinel-failover: (began, old primary, give up at) of the one under way
        self._failover: tuple[int, int | None, float] | None = None
        #: failover windows (history times, ns) for the checker
        self.windows: list[tuple[int, int]] = []

    @property
    def server(self) -> RedisServer:
        assert self._server is not None, "no single server in this topology"
        return self._server

    @server.setter
    def server(self, value: RedisServer) -> None:
        self._server = value

    def tick(self) -> None:
        before = Counter(self.counts)
        self._tick(time.monotonic())
        for name in self.counts - before:
            self.timeline.append(f"{now()} {name}")

    def _tick(self, t: float) -> None:
        if "redis-restart" in self.faults and t >= self._next_restart:
            self.server.restart(down_for=self.rng.uniform(0.1, 0.8))
            self.counts["redis restarts"] += 1
            self._next_restart = time.monotonic() + self.rng.uniform(3, 6)
        if "redis-snapshot" in self.faults:
            self._snapshot_tick(t)
        if "flushall" in self.faults and t >= self._next_flush:
            self.flushall()
            self._next_flush = time.monotonic() + self.rng.uniform(1.5, 4)
        if "redis-switch" in self.faults:
            self._switch_tick(t)
        if "client-kill" in self.faults and t >= self._next_kill:
            self.client_kill()
            self._next_kill = time.monotonic() + self.rng.uniform(0.5, 2.0)
        if "evict" in self.faults:
            self._evict_tick(t)
        if "evict-locks" in self.faults and t >= self._next_drop:
            assert self.dropper is not None
            self.counts["locks evicted (deleted)"] += self.dropper.drop(self.server, self.rng)
            self._next_drop = time.monotonic() + self.rng.uniform(0.02, 0.1)
        if "evict-registry" in self.faults and t >= self._next_registry_drop:
            self.evict_registry()
            self._next_registry_drop = time.monotonic() + self.rng.uniform(*self._registry_every)
        if "sentinel-failover" in self.faults:
            self._sentinel_tick()
            if t >= self._next_failover and self._failover is None:
                self.sentinel_failover()
                self._next_failover = time.monotonic() + self.rng.uniform(5, 9)
        if "cluster-failover" in self.faults:
            self._cluster_tick(t)

    def evict_registry(self) -> None:
        """Delete the keyspace registry alone, as an eviction of it would (counted when it was
        there: a registry just deleted may not be made again yet)."""
        client = self._registry_node()
        if client is None:
            return
        try:
            if client.delete(self.registry):
                self.counts["registry evicted (deleted)"] += 1
        except redis.RedisError:
            pass
        finally:
            client.close()

    def _registry_node(self) -> redis.Redis | None:
        """A direct client to the primary holding the registry (None: none answers now)."""
        if self.cluster is not None:
            try:
                port = self.cluster.owner(key_slot(self.registry.encode()))
            except (LookupError, RuntimeError, redis.RedisError):
                return None
            return self.cluster.node(port).admin(0.5)
        if self.sentinel is not None:
            primary = self.sentinel.primary_port()
            if primary is None:
                return None
            return redis.Redis(
                host="127.0.0.1", port=primary, socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return self.server.admin(0.5)

    def sentinel_failover(self) -> None:
        """``SENTINEL FAILOVER`` (refused while a failover is in progress: counted apart)."""
        assert self.sentinel is not None
        old = self.sentinel.primary_port()
        began = now()
        try:
            self.sentinel.failover()
            self.counts["Sentinel failovers"] += 1
        except redis.RedisError:
            self.counts["Sentinel failovers refused"] += 1
            return
        self._failover = (began, old, time.monotonic() + 15)

    def _sentinel_tick(self) -> None:
        """The window of the failover under way ends ``epoch_check_interval`` (and the
        sentinels' lag) after a majority of the sentinels name the new primary."""
        if self._failover is None:
            return
        began, old, give_up = self._failover
        assert self.sentinel is not None
        promoted = self.sentinel.primary_port() not in (None, old)
        if promoted or time.monotonic() > give_up:
            self.windows.append((began, now() + WINDOW_AFTER_PROMOTION_NS))
            self._failover = None

    def _cluster_tick(self, t: float) -> None:
        cluster = self.cluster
        assert cluster is not None
        if self._victim is not None:
            victim, replica = self._victim
            if cluster.node(replica).role() == "master" or t > self._victim_deadline:
                cluster.node(victim).start()  # rejoins as a replica of the promoted node
                self.timeline.append(
                    f"{now()} restarted {victim} (its replica {replica}: "
                    f"{cluster.node(replica).role()})"
                )
                self._victim = None
                self._next_failover = time.monotonic() + self.rng.uniform(3, 6)
            return
        if self._saved is not None:
            self._restart_saved(t)
            return
        if t < self._next_failover:
            return
        self._next_failover = time.monotonic() + self.rng.uniform(3, 6)
        try:
            port = self.rng.choice(cluster.primaries())
            replica = cluster.replica_of(port)
        except (redis.RedisError, LookupError, RuntimeError):
            return  # a restarted node is still syncing: next time
        draw = self.rng.random()
        if draw < 1 / 3:
            try:
                with cluster.node(port).admin() as client:
                    client.save()
            except redis.RedisError:
                return
            self.timeline.append(f"{now()} SAVE on primary {port}")
            self._saved = (port, time.monotonic() + self.rng.uniform(1, 3))
        elif draw < 2 / 3:
            cluster.node(port).kill()
            self.timeline.append(f"{now()} killed primary {port} (its replica {replica})")
            self._victim = (port, replica)
            self._victim_deadline = time.monotonic() + 15
            self.counts["Cluster primaries killed"] += 1
        else:
            try:
                with cluster.node(replica).admin() as client:
                    client.execute_command("CLUSTER", "FAILOVER")
                self.timeline.append(f"{now()} CLUSTER FAILOVER of {port} to {replica}")
                self.counts["CLUSTER FAILOVERs"] += 1
            except redis.RedisError:
                self.counts["CLUSTER FAILOVERs refused"] += 1

    def _restart_saved(self, t: float) -> None:
        """SIGKILL the primary that saved a snapshot, and start it again at once: it loads
        the snapshot and, back before the node timeout, keeps its slots."""
        assert self.cluster is not None and self._saved is not None
        port, at = self._saved
        if t < at:
            return
        self._saved = None
        self._next_failover = time.monotonic() + self.rng.uniform(3, 6)
        if not self.cluster.node(port).running:
            return
        self.cluster.restart_in_place(port, wait=None)
        self.timeline.append(f"{now()} restarted {port} in place from its snapshot")
        self.counts["Cluster primaries restarted from an older snapshot"] += 1

    def _snapshot_tick(self, t: float) -> None:
        if self._snapshot is None:
            if t >= self._next_snapshot and self.save_snapshot():
                self._next_restore = time.monotonic() + self.rng.uniform(1, 3.5)
        elif t >= self._next_restore:
            self.restore_snapshot(crash=self.rng.random() < 0.5)
            self._next_snapshot = time.monotonic() + self.rng.uniform(0.5, 2.5)

    def save_snapshot(self) -> bool:
        """``SAVE`` the server's data set now, for :meth:`restore_snapshot` (False: Redis was
        down, try later)."""
        try:
            self._snapshot = self.server.snapshot()
        except redis.RedisError:
            return False
        self.counts["snapshots saved"] += 1
        return True

    def restore_snapshot(self, crash: bool) -> None:
        """Stop the server (SIGKILL if ``crash``, else ``SHUTDOWN NOSAVE``) and start it from
        the saved snapshot: everything written since is forgotten."""
        assert self._snapshot is not None
        self.server.restart(down_for=self.rng.uniform(0, 0.5), from_rdb=self._snapshot, crash=crash)
        how = "SIGKILL" if crash else "SHUTDOWN NOSAVE"
        self.counts[f"restarts from an older snapshot ({how})"] += 1
        self._snapshot = None

    def _switch_tick(self, t: float) -> None:
        if not self._standby_ready:
            if t >= self._next_copy and self.copy_to_standby():
                self._next_switch = time.monotonic() + self.rng.uniform(1, 3.5)
        elif t >= self._next_switch:
            self.switch()
            self._next_copy = time.monotonic() + self.rng.uniform(0.5, 2.5)

    def copy_to_standby(self) -> bool:
        """Restart the standby from a snapshot of the server taken now: a fresh process holding
        an older copy, as a lagging replica would (False: the server was down, try later)."""
        assert self.standby is not None
        try:
            copy = self.server.snapshot()
        except redis.RedisError:
            return False
        self.standby.restart(from_rdb=copy)
        self._standby_ready = True
        return True

    def switch(self) -> None:
        """Point the proxy at the standby and reset every connection through it; the former
        server keeps running, unreached, until it is the standby refreshed by the next copy."""
        assert self.proxy is not None and self.standby is not None
        self.server, self.standby = self.standby, self.server
        self.proxy.upstream_port = self.server.port
        self.proxy.kill_connections()
        self.counts["switches to an older copy"] += 1
        self._standby_ready = False

    def _evict_tick(self, t: float) -> None:
        squeezer = self.squeezer
        assert squeezer is not None
        if squeezer.squeezing:
            if t >= self._next_let_go:
                squeezer.let_go()
                self._next_squeeze = time.monotonic() + self.rng.uniform(0.3, 1.5)
        elif t >= self._next_squeeze:
            self.squeeze()

    def squeeze(self) -> bool:
        """Squeeze the server (:class:`stress.eviction.Squeezer`) until the tick that lets
        it go, 0.1 to 1 s later (False: it could not, try at the next tick)."""
        assert self.squeezer is not None
        policy = self.rng.choice(POLICIES)
        if not self.squeezer.squeeze(self.server, policy, self.rng.randint(500, 8000)):
            return False
        self.counts[f"squeezes ({policy})"] += 1
        self._next_let_go = time.monotonic() + self.rng.uniform(0.1, 1.0)
        return True

    def flushall(self) -> None:
        client = self.server.admin(1.0)
        try:
            client.flushall(asynchronous=self.rng.random() < 0.5)
            self.counts["FLUSHALLs"] += 1
        except redis.RedisError:
            pass
        finally:
            client.close()

    def client_kill(self) -> None:
        client = self.server.admin(1.0)
        try:
            killed = client.execute_command("CLIENT", "KILL", "TYPE", "normal")
            self.counts["client kills"] += 1
            self.counts["connections killed"] += int(killed)
        except redis.RedisError:
            pass
        finally:
            client.close()

    def heal(self) -> None:
        """Leave Redis up and the proxy passing traffic (every slot served, a primary named)."""
        if self.squeezer is not None:
            self.squeezer.let_go()
        if self._server is not None and not self._server.running:
            self._server.start()
        if self.proxy is not None:
            self.proxy.mode = "pass"
        if self.cluster is not None:
            for node in self.cluster.nodes:
                if not node.running:
                    self.timeline.append(f"{now()} heal: started {node.port}")
                node.start()
            self.cluster.wait_serving(30)
        if self.sentinel is not None:
            group = self.sentinel
            if self._failover is not None:
                # begun before the workload's last second, when the ticks stop: its window
                # ends as the others do, after the promotion (the workers' last reads may lie
                # in it; left open, they were counted as stale)
                _, old, give_up = self._failover
                wait_for(
                    lambda: group.primary_port() not in (None, old) or time.monotonic() > give_up,
                    30,
                    "the promotion of the failover under way",
                )
                self._sentinel_tick()
            wait_for(
                lambda: (port := group.primary_port()) is not None and group.role(port) == "master",
                30,
                "a primary named by the sentinels",
            )
