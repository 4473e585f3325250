"""What the short stress runs share (tests/test_stress_short.py and
tests/test_stress_short_schemas.py: two modules, so that pytest-xdist's ``--dist loadfile``
runs them on two workers; one module of both was the longest a worker ran, by a minute)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.redis_server import server_binary
from stress.runner import StressConfig, StressResult, run_stress

from _servers import in_ci


def ran(config: StressConfig) -> StressResult:
    """A stress run, its report printed (pytest shows it on failure); no worker crashed."""
    result = run_stress(config, log=print)
    print(result.format())
    assert "crashed" not in result.info, result.format()
    return result


def redis_server_binary_or_skip() -> str:
    """The ``redis-server`` the runs start (their own, throwaway): a skip locally when there
    is none, a failure in CI."""
    binary = server_binary()
    if binary is None:
        message = "the stress run starts its own throwaway redis-server, which is not installed"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary
