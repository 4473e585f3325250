"""The fault schedule of a run: what to break, and when.

Run from the runner's main loop (no threads): :meth:`FaultSchedule.tick` performs whatever is
due. Worker-side faults (SIGKILL at flush or after COMMIT, deadlock-prone transactions) are
switched on in the workers' configuration instead; see :mod:`stress.worker`.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import redis

from .proxy import FaultyProxy
from .redis_server import RedisServer

ALL_FAULTS = ("redis-restart", "client-kill", "proxy", "sigkill", "db-errors")


class FaultSchedule:
    def __init__(
        self,
        faults: frozenset[str],
        server: RedisServer,
        proxy: FaultyProxy | None,
        rng: random.Random,
    ) -> None:
        self.faults = faults
        self.server = server
        self.proxy = proxy
        self.rng = rng
        self.counts: Counter[str] = Counter()
        start = time.monotonic()
        self._next_restart = start + rng.uniform(2, 4)
        self._next_kill = start + rng.uniform(0.5, 1.5)

    def tick(self) -> None:
        t = time.monotonic()
        if "redis-restart" in self.faults and t >= self._next_restart:
            self.server.restart(down_for=self.rng.uniform(0.1, 0.8))
            self.counts["redis restarts"] += 1
            self._next_restart = time.monotonic() + self.rng.uniform(3, 6)
        if "client-kill" in self.faults and t >= self._next_kill:
            self.client_kill()
            self._next_kill = time.monotonic() + self.rng.uniform(0.5, 2.0)

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
        """Leave Redis up and the proxy passing traffic."""
        if not self.server.running:
            self.server.start()
        if self.proxy is not None:
            self.proxy.mode = "pass"
