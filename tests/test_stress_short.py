"""A short stress run in the normal suite: several worker processes, all faults, the checker.

For each server database, about half a minute of ``stress.runner.run_stress``: five worker
processes (each its own engine and cache, through a misbehaving loopback proxy to a throwaway
``redis-server``) read and write eight hot rows and their parents under READ COMMITTED and
REPEATABLE READ, while Redis is restarted with its data lost, its connections are killed, the
proxy delays, stalls and drops traffic, workers SIGKILL themselves between flush and COMMIT and
between COMMIT and publish, and two-row transactions deadlock. The checker must then find no
stale read, no read of an uncommitted value and, at quiescence, no cached entry that differs
from its row (invariants 1, 2, 3 and 5 of DESIGN.md).

Bounded: the workload stops at its deadline, every wait has a timeout, and every process and
server started is stopped. Loopback only. The longer run is ``nox -s stress``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from _servers import in_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.faults import ALL_FAULTS
from stress.runner import StressConfig, run_stress

#: workload seconds per database; with start-up and quiescence a run takes about 30 s
SECONDS = 22.0

pytestmark = pytest.mark.stress


@pytest.fixture(scope="module")
def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "the stress run starts its own throwaway redis-server, which is not installed"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.mark.timeout(150)
@pytest.mark.parametrize("db", ["postgresql", "mariadb"])
def test_short_stress_run_finds_no_violation(
    db: str, redis_server_binary: str, request: pytest.FixtureRequest
) -> None:
    """All faults at once, strict mode (the proxy's per-connection faults are partitions, where
    degrade mode has a documented gap): zero stale, uncommitted or divergent."""
    url: str = request.getfixturevalue(f"{db}_url")
    result = run_stress(
        StressConfig(
            db_url=url,
            seconds=SECONDS,
            faults=frozenset(ALL_FAULTS),
            workers=5,
            on_redis_error="strict",
            lock_wait=60,  # another stress run on the same database: wait, bounded
        ),
        log=print,
    )
    print(result.format())
    report = result.report
    assert "crashed" not in result.info, result.format()
    # the run did something worth checking
    assert report.reads["cache"] > 0 and report.reads["db"] > 0, result.format()
    assert report.commits["ok"] > 0, result.format()
    assert report.ok, result.format()
