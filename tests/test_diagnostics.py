"""Errors that say why, an example that says what really happened, and a prefix that can be emptied.

* A Redis that refuses (a wrong password, a Cluster node) is named in the log line (host:port,
  never the password) with the server's own message and a remedy, and so is strict mode's error.
* ``examples/quickstart.py`` reports from what the cache did: with a Redis that does not answer
  it says so, and never claims a load came from Redis.
* ``cache.clear()`` removes every key under its prefix (entries, generations, the registry) and
  nothing under another prefix, even one that starts with the same letters; the keyspace
  registry comes back with the next write.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, CacheUnavailableError, WriteThroughCache
from stress.redis_server import server_binary

from _cache_helpers import prefix_keys
from _servers import capture_sql, in_ci, reset_schema
from _servers import new_prefix as fresh_prefix

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class DgItem(Base, CachedModel):
    __tablename__ = "dg_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def _free_port() -> int:
    """A free loopback port whose Cluster bus port (+10000) is free and valid too."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture
def spawn_redis(tmp_path: Path) -> Iterator[object]:
    """``spawn_redis(*args)``: a throwaway redis-server with extra arguments; its port."""
    binary = server_binary()
    if binary is None:
        if in_ci():
            pytest.fail("[CI] no redis-server binary on PATH", pytrace=False)
        pytest.skip("no redis-server binary on PATH")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> int:
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket_to(port):
                    return port
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server {' '.join(args)} did not start ({proc.poll()})")

    yield spawn
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=5)


def socket_to(port: int) -> object:
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=0.2)


# ------------------------------------------------------------------------- log lines


def test_a_wrong_password_is_logged_with_the_server_and_its_message(
    spawn_redis: object, schema: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    port = spawn_redis("--requirepass", "right-secret")  # type: ignore[operator]
    cache = WriteThroughCache(f"redis://:wrong-secret@127.0.0.1:{port}/0", prefix="dg")
    Session = sessionmaker(schema)
    cache.install(Session)
    try:
        with caplog.at_level(logging.DEBUG, logger="sqlalchemy_writethrough"):
            with Session() as session:
                session.add(DgItem(id=1, name="a"))
                session.commit()
            with Session() as session:
                assert session.get(DgItem, 1).name == "a"  # type: ignore[union-attr]
    finally:
        cache.uninstall(Session)
        cache.redis.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings, "a refused password must be a warning, not a debug line"
    line = warnings[0]
    assert f"Redis at 127.0.0.1:{port}" in line
    assert "AuthenticationError" in line
    assert "password" in line  # the server's message, and the remedy
    assert all("wrong-secret" not in r.getMessage() for r in caplog.records)


def test_a_cluster_node_is_named_as_such(
    spawn_redis: object, schema: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain URL to a Cluster node (no slots served here: every key command is refused)."""
    port = spawn_redis(  # type: ignore[operator]
        "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{os.getpid()}.conf"
    )
    cache = WriteThroughCache(f"redis://127.0.0.1:{port}/0", prefix="dg")
    Session = sessionmaker(schema)
    cache.install(Session)
    try:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            with Session() as session:
                session.add(DgItem(id=1, name="a"))
                session.commit()
            with Session() as session:
                assert session.get(DgItem, 1).name == "a"  # type: ignore[union-attr]
    finally:
        cache.uninstall(Session)
        cache.redis.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"127.0.0.1:{port}" in m and "Cluster" in m for m in lines), lines


def test_strict_mode_error_says_which_redis_and_why(schema: Engine) -> None:
    port = _free_port()  # nothing listens there
    cache = WriteThroughCache(f"redis://127.0.0.1:{port}/0", prefix="dg", on_redis_error="strict")
    Session = sessionmaker(schema)
    cache.install(Session)
    try:
        with Session() as session:
            session.add(DgItem(id=1, name="a"))
            with pytest.raises(CacheUnavailableError) as raised:
                session.commit()
    finally:
        cache.uninstall(Session)
        cache.redis.close()
    assert f"Redis at 127.0.0.1:{port}" in str(raised.value)
    assert "ConnectionError" in str(raised.value)


# --------------------------------------------------------------------------- clear()


def test_clear_removes_every_key_of_its_prefix_and_nothing_else(
    redis_url: str, redis_client: redis.Redis, prefix: str, schema: Engine
) -> None:
    cache = WriteThroughCache(redis_url, prefix=prefix)
    neighbour = WriteThroughCache(redis_url, prefix=f"{prefix}:eu")  # starts with ours
    Session, Other = sessionmaker(schema), sessionmaker(schema)
    cache.install(Session)
    neighbour.install(Other)
    try:
        with Session() as session:
            session.add_all([DgItem(id=1, name="a"), DgItem(id=2, name="b")])
            session.commit()
        cache.invalidate(DgItem)  # generations too
        with Session() as session:
            session.get(DgItem, 1)  # a fill, under the new generation
        with Other() as session:
            session.get(DgItem, 2)
        ours = [
            k
            for k in prefix_keys(redis_client, prefix)
            if not k.startswith(b"%s:eu" % prefix.encode())
        ]
        theirs = prefix_keys(redis_client, f"{prefix}:eu")
        assert f"{prefix}:registry".encode() in ours
        assert any(k.endswith(b":1") for k in ours) and theirs

        assert cache.clear() == len(ours)
        assert [k for k in prefix_keys(redis_client, prefix) if k not in theirs] == []
        assert prefix_keys(redis_client, f"{prefix}:eu") == theirs

        # the cache works on: a miss, a fill, and the registry is written again
        with Session() as session:
            assert session.get(DgItem, 1).name == "a"  # type: ignore[union-attr]
        with Session() as session:
            session.get(DgItem, 1)
        assert cache.stats().hits >= 1
        assert redis_client.hkeys(f"{prefix}:registry")
    finally:
        cache.uninstall(Session)
        neighbour.uninstall(Other)
        neighbour.clear()
        cache.redis.close()
        neighbour.redis.close()


def test_another_process_records_its_keyspace_again_after_a_clear(
    redis_url: str, redis_client: redis.Redis, prefix: str, schema: Engine
) -> None:
    """The registry lets a migration find every keyspace of a table; a process that wrote it
    before another process's clear() writes it again at its next lease (or lock)."""
    cache, other = (
        WriteThroughCache(redis_url, prefix=prefix),
        WriteThroughCache(redis_url, prefix=prefix),
    )
    Session = sessionmaker(schema)
    cache.install(Session)
    try:
        with Session() as session:
            session.add(DgItem(id=1, name="a"))
            session.commit()
        assert redis_client.hkeys(f"{prefix}:registry")
        other.clear()  # "another process"
        assert not redis_client.exists(f"{prefix}:registry")
        with Session() as session:
            session.get(DgItem, 1)  # a miss and a fill: this process records its keyspace
        assert redis_client.hkeys(f"{prefix}:registry")
    finally:
        cache.uninstall(Session)
        cache.redis.close()
        other.redis.close()


def test_clear_on_an_unreachable_redis_raises_with_the_reason() -> None:
    port = _free_port()
    cache = WriteThroughCache(f"redis://127.0.0.1:{port}/0", prefix="dg")
    with pytest.raises(CacheUnavailableError, match=f"127.0.0.1:{port}.*ConnectionError"):
        cache.clear()
    cache.redis.close()


# ------------------------------------------------------------------------ quickstart


def _run_quickstart(tmp_path: Path, redis_url: str, prefix: str) -> str:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'quickstart.db'}",
        "WRITETHROUGH_PREFIX": prefix,
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart_shows_the_cache_serving_loads(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    out = _run_quickstart(tmp_path, redis_url, prefix)
    assert "does not answer" not in out
    assert "2 load(s) served from Redis" in out
    assert "SQL   INSERT INTO product" in out  # the statements themselves, not a count
    assert "previous value(s) put back by the rollback" in out
    assert "5 hits, 0 misses, 3 rows written through, 1 restored, 0 Redis errors" in out


def test_quickstart_says_what_happened_when_redis_does_not_answer(tmp_path: Path) -> None:
    out = _run_quickstart(tmp_path, f"redis://127.0.0.1:{_free_port()}/0", fresh_prefix())
    assert "does not answer" in out and "ConnectionError" in out
    assert "served from Redis" not in out
    assert "written to Redis" not in out
    assert "the database served everything" in out
    assert "SQL   SELECT product" in out


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("how", ["client", "url"])
def test_a_one_node_cluster_through_a_redis_cluster_client_or_a_url(
    spawn_redis: object, schema: Engine, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-node Cluster (every slot on it): a ``RedisCluster`` client is used as such; a
    plain URL to the node gets CROSSSLOT for a commit over several buckets, which makes the
    cache check INFO and go on as a Cluster client, with a warning that says so."""
    from redis.cluster import RedisCluster

    port = spawn_redis(  # type: ignore[operator]
        "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{os.getpid()}-{how}.conf"
    )
    admin = redis.Redis(port=port)
    admin.execute_command("CLUSTER", "ADDSLOTS", *range(16384))  # ADDSLOTSRANGE: 7.0+
    deadline = time.monotonic() + 5
    while admin.cluster("info")["cluster_state"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.05)
    admin.close()
    if how == "client":
        client: Any = RedisCluster(host="127.0.0.1", port=port, socket_timeout=0.5)
    else:
        client = f"redis://127.0.0.1:{port}/0"
    cache = WriteThroughCache(client, prefix="dg")
    Session = sessionmaker(schema)
    cache.install(Session)
    try:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            for _ in range(2):  # the first commit may meet the refusal that reveals a Cluster
                with Session() as session:
                    for i in range(1, 21):
                        item = session.get(DgItem, i)
                        if item is None:
                            session.add(DgItem(id=i, name="a"))
                        else:
                            item.name = "b"
                    session.commit()
        with Session() as session, capture_sql(schema) as sql:
            assert [session.get(DgItem, i).name for i in range(1, 21)] == ["b"] * 20  # type: ignore[union-attr]
        assert sql == []
    finally:
        cache.uninstall(Session)
        cache.redis.close()
    # this thread's: another test's cache left probing a port this node now has would log
    # from its prober's thread
    switched = [
        r.getMessage()
        for r in caplog.records
        if "is a Redis Cluster node" in r.getMessage() and r.thread == threading.get_ident()
    ]
    assert len(switched) == (1 if how == "url" else 0), switched
