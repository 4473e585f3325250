"""``$REDIS_SERVER_BINARY`` and ``$REDIS_CLI_BINARY`` pick the server build every fixture and
stress run starts (a Valkey build, another Redis version), as docs/running-redis.md says; unset,
``redis-server`` and ``redis-cli`` on PATH, as before."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from stress.redis_server import RedisServer, cli_binary, server_binary

from _sentinel import require_redis_server


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_unset_means_the_binaries_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SERVER_BINARY", raising=False)
    monkeypatch.delenv("REDIS_CLI_BINARY", raising=False)
    assert server_binary() == shutil.which("redis-server")
    assert cli_binary() == shutil.which("redis-cli")


def test_a_configured_server_is_the_one_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The fixture's server is the configured binary (a wrapper here, which leaves a mark)."""
    require_redis_server()
    real = server_binary()
    assert real is not None
    mark = tmp_path / "started"
    wrapper = _script(tmp_path / "my-server", f'echo "$@" > {mark}\nexec {real} "$@"')
    monkeypatch.setenv("REDIS_SERVER_BINARY", str(wrapper))
    with RedisServer() as server:
        assert server.admin().ping()
        assert f"--port {server.port}" in mark.read_text()


def test_the_cli_beside_a_configured_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One variable picks a whole build: ``valkey-server`` brings its ``valkey-cli``; an
    explicit ``$REDIS_CLI_BINARY`` wins."""
    server = _script(tmp_path / "valkey-server", "exit 0")
    cli = _script(tmp_path / "valkey-cli", "exit 0")
    monkeypatch.setenv("REDIS_SERVER_BINARY", str(server))
    monkeypatch.delenv("REDIS_CLI_BINARY", raising=False)
    assert server_binary() == str(server)
    assert cli_binary() == str(cli)
    other = _script(tmp_path / "other-cli", "exit 0")
    monkeypatch.setenv("REDIS_CLI_BINARY", str(other))
    assert cli_binary() == str(other)


def test_a_configured_binary_that_is_missing_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A variable naming nothing runnable is a broken setup: never a silent fallback to the
    ``redis-server`` on PATH (a Valkey run would then have tested Redis)."""
    monkeypatch.setenv("REDIS_SERVER_BINARY", str(tmp_path / "valkey-server"))
    with pytest.raises(RuntimeError, match="REDIS_SERVER_BINARY"):
        server_binary()
    with pytest.raises(RuntimeError, match="REDIS_SERVER_BINARY"):
        RedisServer()
    not_executable = tmp_path / "valkey-cli"
    not_executable.write_text("")
    os.chmod(not_executable, 0o644)
    monkeypatch.setenv("REDIS_CLI_BINARY", str(not_executable))
    with pytest.raises(RuntimeError, match="REDIS_CLI_BINARY"):
        cli_binary()
