"""The ``evict`` fault: Redis really evicts keys under ``maxmemory``, and the run hears which.

Redis forgets by eviction too: a server at its ``maxmemory`` deletes keys by its
``maxmemory-policy`` before it runs a write. Nothing is restarted or flushed, nothing
disconnects; single keys of every kind vanish at random moments. :class:`Squeezer` makes that
happen on the throwaway server: at each squeeze it sets a policy (``allkeys-random``, which may
evict any key, the generation keys, the keyspace registry and the epoch key included; or
``volatile-random``, only keys with a TTL: entries, leases, locks, generation locks) and a
``maxmemory`` a few kilobytes below what the server uses, holds it for a moment (every write
meanwhile evicts more) and lifts it again. With ``volatile-random`` a server may find nothing
left to evict and refuse writes (``OOM``), as a full server does.

:class:`EvictionListener` hears every eviction as Redis announces it (keyspace notifications,
``notify-keyspace-events Ee``, set at each squeeze on the server squeezed: a restart forgets it,
and resets ``maxmemory`` too) and appends ``{"e": "evicted", "key": ..., "t": ...}`` to a history
file of its own, so the checker can tell the documented residual of an evicted lock from a
defect (:func:`stress.checker.check`). ``t`` is when the notice was read, a little after the
eviction. A squeeze waits until the listener is subscribed to the server it squeezes, so no
eviction goes unheard; the runner compares the count heard with the servers' own
``evicted_keys``.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from .history import now
from .redis_server import RedisServer

#: the policies a squeeze picks from: the harshest (any key may go) and the one
#: docs/running-redis.md advises against only for its cost (keys with a TTL only)
POLICIES = ("allkeys-random", "volatile-random")
CHANNEL = "__keyevent@0__:evicted"


class EvictionLog:
    """A history file of ``evicted`` events (``w`` "redis"), written from any thread."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0

    def record(self, key: str) -> None:
        line = json.dumps(
            {"e": "evicted", "key": key, "t": now(), "w": "redis"}, separators=(",", ":")
        )
        with self._lock:
            self.count += 1
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class EvictionListener:
    """A daemon thread subscribed to the evictions of the server ``port_of()`` names (it
    follows a switch, and reconnects after a restart), recording each in ``path``."""

    def __init__(self, port_of: Callable[[], int], path: Path) -> None:
        self._port_of = port_of
        self._log = EvictionLog(path)
        #: the port whose evictions are being heard now (None: not subscribed)
        self.subscribed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-evictions", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self._port_of()
            client = redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.5)
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set() and self._port_of() == port:
                    message = pubsub.get_message(timeout=0.05)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.subscribed = port
                    elif message["type"] == "message":
                        self._log.record(message["data"].decode(errors="replace"))
            except (redis.RedisError, OSError):
                time.sleep(0.02)
            finally:
                self.subscribed = None
                with contextlib.suppress(Exception):
                    pubsub.close()
                client.close()

    @property
    def heard(self) -> int:
        return self._log.count

    def wait_subscribed(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.subscribed != port:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._log.close()


class Squeezer:
    """Squeezes one server at a time below the memory it uses, then lets it go."""

    def __init__(self, listener: EvictionListener, rng: random.Random) -> None:
        self.listener = listener
        self.rng = rng
        #: the server squeezed now, its run id and ``evicted_keys`` when the squeeze began
        self._squeezed: tuple[RedisServer, str, int] | None = None
        #: evictions the servers counted during squeezes they lived through
        self.evicted = 0
        #: squeezes whose server restarted before it was let go (its count is lost)
        self.uncounted = 0

    @property
    def squeezing(self) -> bool:
        return self._squeezed is not None

    def squeeze(self, server: RedisServer, policy: str, below: int) -> bool:
        """Set ``policy`` and a ``maxmemory`` ``below`` bytes under the server's
        ``used_memory`` (False: the listener is not on this server yet, or Redis is down)."""
        if not self.listener.wait_subscribed(server.port, 0.5):
            return False
        client = server.admin(1.0)
        try:
            client.config_set("notify-keyspace-events", "Ee")
            client.config_set("maxmemory-policy", policy)
            run_id = str(client.info("server")["run_id"])
            before = int(client.info("stats")["evicted_keys"])
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", max(1, used - below))
        except redis.RedisError:
            return False
        finally:
            client.close()
        self._squeezed = (server, run_id, before)
        return True

    def let_go(self) -> None:
        """``maxmemory 0`` again, and count what the server evicted meanwhile."""
        if self._squeezed is None:
            return
        server, run_id, before = self._squeezed
        self._squeezed = None
        client = server.admin(1.0)
        try:
            client.config_set("maxmemory", 0)
            if str(client.info("server")["run_id"]) == run_id:
                self.evicted += int(client.info("stats")["evicted_keys"]) - before
            else:
                self.uncounted += 1  # restarted meanwhile: no limit, and the count is lost
        except redis.RedisError:
            self.uncounted += 1
        finally:
            client.close()


#: delete a key only while it holds a LOCK (an entry's, or a bucket's generation lock):
#: what an eviction of that lock does, at the moment the script runs
_DROP_IF_LOCKED = """
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) == 76 then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LockDropper:
    """``evict-locks``: the locks Redis may evict, targeted. Real eviction picks its keys at
    random, and a lock lives only from its writer's flush to its publish, so few evictions
    land on one; this deletes one to three of the locks the server holds now (entries' and
    generation locks, under the run's ``prefix``), as an eviction of each would, and records
    each as an ``evicted`` event heard right after it (a history file of its own)."""

    def __init__(self, prefix: str, path: Path) -> None:
        self.prefix = prefix
        self._log = EvictionLog(path)

    def drop(self, server: RedisServer, rng: random.Random) -> int:
        """Delete up to three locks of the server's, picked at random (0: none, or Redis
        was down)."""
        client = server.admin(0.5)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:{{*", count=1000))
            values = client.mget(keys) if keys else []
            locked = [k for k, v in zip(keys, values, strict=True) if v and v[:1] == b"L"]
            dropped = 0
            for key in rng.sample(locked, min(len(locked), rng.randint(1, 3))):
                if client.eval(_DROP_IF_LOCKED, 1, key):
                    self._log.record(key.decode())
                    dropped += 1
        except redis.RedisError:
            return 0
        finally:
            client.close()
        return dropped

    @property
    def dropped(self) -> int:
        return self._log.count

    def close(self) -> None:
        self._log.close()
