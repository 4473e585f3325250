"""The stress checker's "Redis forgets" faults do what they say, on throwaway servers.

``python -m stress`` (and ``tests/test_stress_short.py``) trusts ``stress.faults`` to make Redis
go back in time; these tests check that it does: a restart from a snapshot holds the snapshot's
values under a new run id, a switch lands every connection on a server holding an older copy,
and ``FLUSHALL`` empties the server the workers reach.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.__main__ import phases
from stress.faults import ALL_FAULTS, FaultSchedule
from stress.proxy import FaultyProxy
from stress.redis_server import RedisServer


def _run_id(server: RedisServer) -> str:
    return str(server.admin().info("server")["run_id"])


@pytest.mark.parametrize("crash", [False, True], ids=["shutdown-nosave", "sigkill"])
def test_a_restart_from_a_snapshot_goes_back_in_time(server: RedisServer, crash: bool) -> None:
    server.admin().set("k", "v1")
    schedule = FaultSchedule(frozenset({"redis-snapshot"}), server, None, random.Random(1))
    assert schedule.save_snapshot()
    server.admin().set("k", "v2")
    before = _run_id(server)

    schedule.restore_snapshot(crash=crash)
    assert server.admin().get("k") == b"v1"
    assert _run_id(server) != before
    assert sum(n for k, n in schedule.counts.items() if k.startswith("restarts from")) == 1

    server.restart()  # a plain restart still loses everything: the snapshot was taken away
    assert server.admin().get("k") is None


def test_a_switch_lands_every_connection_on_an_older_copy(server: RedisServer) -> None:
    with RedisServer() as standby:
        proxy = FaultyProxy(server.port)
        try:
            schedule = FaultSchedule(
                frozenset({"redis-switch"}), server, proxy, random.Random(1), standby
            )
            # no retry: redis-py 6+ would otherwise reconnect and hide the reset
            client = redis.Redis.from_url(proxy.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
            client.set("k", "v1")
            assert schedule.copy_to_standby()
            client.set("k", "v2")
            before = client.info("server")["run_id"]

            schedule.switch()
            assert schedule.server is standby
            # the open connection was reset: redis-py reconnects at checkout when it sees the
            # reset, or the command fails once when it does not
            with contextlib.suppress(redis.ConnectionError):
                client.get("k")
            assert client.get("k") == b"v1"  # the next one reaches the older copy
            assert client.info("server")["run_id"] != before

            schedule.flushall()
            assert client.get("k") is None and server.admin().get("k") == b"v2"
            client.close()
        finally:
            proxy.close()


def test_every_fault_is_in_all_and_topologies_run_alone() -> None:
    """The failovers run on a Sentinel group or a Cluster instead of the one server that the
    server faults act on: ``all`` leaves them out, and a mix is refused."""
    assert phases("all") == [frozenset(ALL_FAULTS)]
    assert {"redis-snapshot", "flushall", "redis-switch"} <= set(ALL_FAULTS)
    assert phases("cluster-failover,sigkill") == [frozenset({"cluster-failover", "sigkill"})]
    assert frozenset({"sentinel-failover"}) in phases("each")
    with pytest.raises(SystemExit, match="topology of their own"):
        phases("redis-restart,sentinel-failover")
    with pytest.raises(SystemExit, match="topology of their own"):
        phases("sentinel-failover,cluster-failover")
