"""The command-line tool, end to end: ``python -m sqlalchemy_writethrough --app wtapp:Session ...``
run as a subprocess on a tiny application module the test writes, against the real Redis and
databases. Each test asserts what the tool printed, its exit status, and what Redis (or the
database) holds afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _flavours import async_url

from _servers import reset_schema

APP = textwrap.dedent(
    '''
    import os
    import uuid

    from sqlalchemy import String, TypeDecorator, create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

    from sqlalchemy_writethrough import CachedModel, WriteThroughCache


    class Base(DeclarativeBase):
        pass


    class Product(Base, CachedModel):
        __tablename__ = "cli_product"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(40))
        price: Mapped[int]


    class Line(Base, CachedModel):
        __tablename__ = "cli_line"
        order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        sku: Mapped[str] = mapped_column(String(20), primary_key=True)
        qty: Mapped[int]


    class GUID(TypeDecorator):
        """UUIDs stored as text: the recipe fastapi-users' tables key on."""

        impl = String(36)
        cache_ok = True

        def process_bind_param(self, value, dialect):
            return None if value is None else str(uuid.UUID(str(value)))

        def process_result_value(self, value, dialect):
            return None if value is None else uuid.UUID(value)


    class Device(Base, CachedModel):
        __tablename__ = "cli_device"
        id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
        name: Mapped[str] = mapped_column(String(40))


    engine = create_engine(os.environ["WT_DB_URL"])
    Session = sessionmaker(engine)
    cache = WriteThroughCache(os.environ["WT_REDIS_URL"], prefix=os.environ["WT_PREFIX"])
    cache.install(Session)
    scoped = scoped_session(Session)


    def make_session(prefix=None):
        """What an application built by a factory does: a new engine, a cache, installed."""
        factory = sessionmaker(create_engine(os.environ["WT_DB_URL"]))
        prefix = prefix or os.environ["WT_PREFIX"]
        built = WriteThroughCache(os.environ["WT_REDIS_URL"], prefix=prefix)
        built.install(factory)
        return factory


    def traffic():
        """Reads and writes, as a worker would; then the counts go to Redis."""
        with Session() as s:
            for i in range(1, 11):
                s.get(Product, i)  # misses, filled
        for _ in range(5):
            with Session() as s:
                for i in range(1, 11):
                    s.get(Product, i)  # hits
        with Session() as s:
            s.get(Product, 1).price += 1
            s.commit()
        with Session() as s:
            s.get(Product, 2).price += 1
            s.flush()
            s.rollback()
        assert cache.send_stats()
    '''
)

#: the same application on asyncio: an async_sessionmaker, and a cache given only a
#: redis.asyncio client (so the tool has no sync client to fall back on)
ASYNC_APP = textwrap.dedent(
    """
    import asyncio
    import os

    import redis.asyncio
    from sqlalchemy import String
    from sqlalchemy.ext.asyncio import (
        async_scoped_session,
        async_sessionmaker,
        create_async_engine,
    )
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from sqlalchemy_writethrough import CachedModel, WriteThroughCache


    class Base(DeclarativeBase):
        pass


    class Product(Base, CachedModel):
        __tablename__ = "cli_product"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(40))
        price: Mapped[int]


    class Line(Base, CachedModel):
        __tablename__ = "cli_line"
        order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        sku: Mapped[str] = mapped_column(String(20), primary_key=True)
        qty: Mapped[int]


    engine = create_async_engine(os.environ["WT_ASYNC_DB_URL"])
    Session = async_sessionmaker(engine, expire_on_commit=False)
    client = redis.asyncio.Redis.from_url(
        os.environ["WT_REDIS_URL"], socket_timeout=5, socket_connect_timeout=5
    )
    cache = WriteThroughCache(client, prefix=os.environ["WT_PREFIX"], stats_interval=60)
    cache.install(Session)
    scoped = async_scoped_session(Session, scopefunc=asyncio.current_task)


    def make_session(prefix=None):
        # as a FastAPI app's lifespan does, but called outside any event loop: a new
        # engine, a cache built from the URL, installed
        factory = async_sessionmaker(create_async_engine(os.environ["WT_ASYNC_DB_URL"]))
        prefix = prefix or os.environ["WT_PREFIX"]
        built = WriteThroughCache(os.environ["WT_REDIS_URL"], prefix=prefix)
        built.install(factory)
        return factory
    """
)

metadata = sa.MetaData()
product = sa.Table(
    "cli_product",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(40), nullable=False),
    sa.Column("price", sa.Integer, nullable=False),
)
line = sa.Table(
    "cli_line",
    metadata,
    sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sku", sa.String(20), primary_key=True),
    sa.Column("qty", sa.Integer, nullable=False),
)

device = sa.Table(
    "cli_device",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(40), nullable=False),
)
DEVICE = "0b5e3c1e-6a0f-4a52-9d4e-5f2b8c7d1e90"
ROWS = 50

#: runs the tool's main() for each request line: one interpreter start for many commands (the
#: machine is slow to import SQLAlchemy; each test still runs the real `python -m` too)
WORKER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import redis.connection
    from sqlalchemy_writethrough.cli import main
    # the synchronous redis-py connections this process opens (none, for an asyncio app)
    sync_connections = []
    # redis-py 5.0 has no connect_check_health: there connect() is where every connection starts
    _name = "connect_check_health"
    if not hasattr(redis.connection.AbstractConnection, _name):
        _name = "connect"
    _connect = getattr(redis.connection.AbstractConnection, _name)
    def counted(self, *args, **kwargs):
        sync_connections.append(1)
        return _connect(self, *args, **kwargs)
    setattr(redis.connection.AbstractConnection, _name, counted)
    real_stdin, real_stdout = sys.stdin, sys.stdout
    for request in real_stdin:
        request = json.loads(request)
        out, err = io.StringIO(), io.StringIO()
        sys.stdin = io.StringIO(request["stdin"])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(request["argv"])
            except SystemExit as exc:
                status = exc.code
        sys.stdin = real_stdin
        reply = [status, out.getvalue(), err.getvalue(), len(sync_connections)]
        real_stdout.write(json.dumps(reply) + "\\n")
        real_stdout.flush()
    """
)


class App:
    """The application directory and a way to run the tool in it."""

    def __init__(
        self,
        path: Path,
        env: dict[str, str],
        engine: sa.Engine,
        prefix: str,
        module: str = "wtapp",
    ) -> None:
        self.path = path
        self.env = env
        self.engine = engine
        self.prefix = prefix
        self.module = module
        self._worker: subprocess.Popen[str] | None = None
        #: synchronous redis-py connections the worker process has opened so far
        self.sync_connections = 0

    def close(self) -> None:
        if self._worker is not None:
            assert self._worker.stdin is not None
            assert self._worker.stdout is not None
            self._worker.stdin.close()
            self._worker.wait(timeout=30)
            self._worker.stdout.close()

    def main(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """``main(argv)`` in a long-lived interpreter of the application's directory."""
        if self._worker is None:
            self._worker = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                cwd=self.path,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.write(json.dumps({"argv": list(argv), "stdin": stdin}) + "\n")
        self._worker.stdin.flush()
        reply = self._worker.stdout.readline()
        assert reply, "the tool's worker died"
        status, out, err, self.sync_connections = json.loads(reply)
        return subprocess.CompletedProcess(list(argv), status, out, err)

    def run(
        self, *args: str, stdin: str = "", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sqlalchemy_writethrough", *args],
            cwd=self.path,
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def tool(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return self.main("--app", f"{self.module}:Session", *args, stdin=stdin)

    def command(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """The real thing: ``python -m sqlalchemy_writethrough --app wtapp:Session ...``."""
        return self.run("--app", f"{self.module}:Session", *args, stdin=stdin)

    def json(self, *args: str, status: int = 0) -> Any:
        done = self.tool(*args, "--json")
        assert done.returncode == status, done.stderr
        return json.loads(done.stdout)

    def python(self, code: str, env: dict[str, str] | None = None) -> None:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=self.path,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


@pytest.fixture
def app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    engine: sa.Engine,
    db_url: str,
    redis_url: str,
    prefix: str,
) -> Iterator[App]:
    """The application directory; ``wtapp`` (sync), or with ``indirect`` parametrization
    ``wtapp_async`` (the asyncio twin)."""
    reset_schema(engine, metadata)
    with engine.begin() as conn:
        conn.execute(
            product.insert(),
            [{"id": i, "name": f"product {i}", "price": 100 + i} for i in range(1, ROWS + 1)],
        )
        conn.execute(line.insert(), [{"order_id": 1, "sku": "abc", "qty": 2}])
        conn.execute(device.insert(), [{"id": DEVICE, "name": "phone"}])
    (tmp_path / "wtapp.py").write_text(APP)
    (tmp_path / "wtapp_async.py").write_text(ASYNC_APP)
    url = engine.url.render_as_string(hide_password=False)
    env = {
        **os.environ,
        "WT_DB_URL": url,
        "WT_ASYNC_DB_URL": async_url(url),
        "WT_REDIS_URL": redis_url,
        "WT_PREFIX": prefix,
        "PYTHONPATH": "",
    }
    found = App(tmp_path, env, engine, prefix, getattr(request, "param", "wtapp"))
    try:
        yield found
    finally:
        found.close()


def entry_keys(client: redis.Redis, prefix: str, table: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}:{{{table}:*}}:*", count=1000))


@pytest.mark.databases("postgresql", "mariadb")
def test_warm_fills_every_row_and_verify_finds_nothing(app: App, redis_client: redis.Redis) -> None:
    done = app.command("warm", "Product", "--batch-size", "20")
    assert done.returncode == 0, done.stderr
    assert f"{ROWS} rows" in done.stdout and f"{ROWS} filled" in done.stdout
    keys = entry_keys(redis_client, app.prefix, "cli_product")
    assert len(keys) == ROWS
    assert all(redis_client.get(k)[:1] == b"V" for k in keys)

    again = app.json("warm", "cli_product")  # by table name; everything is cached already
    assert again["rows"] == ROWS and again["cached"] == ROWS and again["filled"] == 0

    report = app.json("verify", "Product")
    assert report["checked"] == ROWS and report["equal"] == ROWS and report["mismatches"] == []
    sample = app.json("verify", "Product", "--sample", "10")
    assert sample["checked"] == 10 and sample["ok"] is True


@pytest.mark.databases("postgresql")
def test_warm_where_loads_only_matching_rows(app: App, redis_client: redis.Redis) -> None:
    report = app.json("warm", "Product", "--where", "id <= 5")
    assert report["rows"] == 5 and report["filled"] == 5
    assert len(entry_keys(redis_client, app.prefix, "cli_product")) == 5


@pytest.mark.databases("postgresql")
def test_verify_finds_stale_extra_and_undecodable_entries(
    app: App, redis_client: redis.Redis
) -> None:
    assert app.tool("warm", "Product").returncode == 0
    # the database changes behind the cache's back (a plain engine: no session, no hooks)
    with app.engine.begin() as conn:
        conn.execute(product.update().where(product.c.id == 7).values(price=1))
        conn.execute(product.delete().where(product.c.id == 8))
    key9 = next(k for k in entry_keys(redis_client, app.prefix, "cli_product") if k.endswith(b":9"))
    raw = redis_client.get(key9)
    redis_client.set(key9, raw[: raw.index(b":") + 1] + b"\xc1garbage", keepttl=True)

    done = app.command("verify", "Product")
    assert done.returncode == 1, done.stderr
    assert "mismatches             3" in done.stdout
    assert "stale" in done.stdout and "price" in done.stdout
    report = app.json("verify", "Product", status=1)
    kinds = {m["key"].rsplit(":", 1)[1]: (m["kind"], m["detail"]) for m in report["mismatches"]}
    assert kinds["7"] == ("stale", "price")
    assert kinds["8"][0] == "extra"
    assert kinds["9"][0] == "undecodable"
    assert report["equal"] == ROWS - 3

    inspected = app.json("inspect", "Product", "7")
    assert inspected["state"] == "value" and inspected["equal"] is False
    assert inspected["differences"] == ["price"] and inspected["row"]["price"] == 107

    fixed = app.json("verify", "Product", "--fix", status=1)
    assert fixed["fixed"] == 3
    assert app.json("verify", "Product")["mismatches"] == []


@pytest.mark.databases("postgresql")
def test_inspect_shows_state_ttl_row_and_equality(app: App, redis_client: redis.Redis) -> None:
    absent = app.json("inspect", "Product", "3")
    assert absent["state"] == "absent" and absent["row"] is None and absent["equal"] is None
    assert app.tool("warm", "Product", "--where", "id = 3").returncode == 0
    done = app.command("inspect", "Product", "3")
    assert done.returncode == 0, done.stderr
    assert "state  value" in done.stdout
    assert "'product 3'" in done.stdout and "equal to the database: yes" in done.stdout
    report = app.json("inspect", "Product", "3")
    assert 0 < report["ttl_ms"] <= 3600 * 1000
    assert report["row"] == {"id": 3, "name": "product 3", "price": 103}
    # --app may name a scoped_session of the factory, or the cache itself
    for app_ref in ("wtapp:scoped", "wtapp:cache"):
        done = app.main("--app", app_ref, "inspect", "Product", "3", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["state"] == "value", done.stderr
    # a composite key, comma-separated
    assert app.tool("warm", "Line").returncode == 0
    composite = app.json("inspect", "Line", "1,abc")
    assert composite["state"] == "value" and composite["row"]["qty"] == 2
    assert composite["equal"] is True


@pytest.mark.databases("sqlite", "postgresql")
def test_a_key_of_a_type_decorator_is_given_as_text(app: App, redis_client: redis.Redis) -> None:
    """A model keyed by a TypeDecorator (UUIDs stored as text, loaded as UUIDs): the tool takes
    the key as its text, and reads the keys of the entries it finds back as UUIDs."""
    assert app.json("inspect", "Device", DEVICE)["state"] == "absent"
    warmed = app.json("warm", "Device")
    assert warmed["rows"] == 1 and warmed["filled"] == 1
    inspected = app.json("inspect", "Device", DEVICE.upper())  # as uuid.UUID reads it
    assert inspected["state"] == "value" and inspected["equal"] is True
    assert inspected["row"]["name"] == "phone"
    with app.engine.begin() as conn:  # behind the cache's back
        conn.execute(device.update().values(name="tablet"))
    report = app.json("verify", "Device", status=1)
    assert [(m["kind"], m["detail"]) for m in report["mismatches"]] == [("stale", "name")]
    assert app.json("verify", "Device", "--fix", status=1)["fixed"] == 1
    assert app.json("verify", "Device")["mismatches"] == []
    refused = app.tool("inspect", "Device", "not-a-uuid")
    assert refused.returncode == 2 and "primary key" in refused.stderr


@pytest.mark.databases("postgresql")
def test_purge_asks_then_invalidates_a_model_or_clears_the_prefix(
    app: App, redis_client: redis.Redis
) -> None:
    assert app.tool("warm", "Product").returncode == 0
    refused = app.command("purge", "Product", stdin="n\n")
    assert refused.returncode == 1 and "Purge every entry of Product" in refused.stderr
    assert app.json("inspect", "Product", "1")["state"] == "value"

    confirmed = app.tool("purge", "Product", stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    # O(1): the entries are still there, of an old generation, and never served again
    assert app.json("inspect", "Product", "1")["state"] == "old generation"
    assert app.json("verify", "Product")["old_generation"] == ROWS

    cleared = app.json("purge", "--all", "--yes")
    assert cleared["deleted"] > ROWS
    assert list(redis_client.scan_iter(match=f"{app.prefix}:*")) == []


@pytest.mark.databases("postgresql")
def test_stats_adds_up_what_every_process_sent(app: App) -> None:
    app.python(
        "import wtapp; wtapp.traffic()", env={"SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL": "60"}
    )
    app.python(
        "import wtapp; wtapp.traffic()", env={"SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL": "60"}
    )
    stats = app.json("stats")
    product_stats = stats["models"]["Product"]
    # two processes, 62 reads each: the first misses 10 times, the second finds its entries
    assert stats["hits"] == product_stats["hits"]
    assert (product_stats["hits"], product_stats["misses"]) == (114, 10)
    assert stats["commits"] == 2 and stats["rollbacks"] == 2
    assert stats["rollback_frequency"] == 0.5
    assert stats["read_latency"]["count"] > 0 and stats["read_latency"]["p99"] > 0
    assert stats["commit_latency"]["count"] == 2
    assert product_stats["recommendation"]["strategy"] == "write-through"
    assert len(stats["processes"]) == 2

    text = app.command("stats")
    assert text.returncode == 0, text.stderr
    assert "Product" in text.stdout and "write-through" in text.stdout
    assert app.tool("stats", "--reset").returncode == 0
    assert app.json("stats")["hits"] == 0


@pytest.mark.databases("postgresql")
def test_wrong_arguments_say_what_in_one_line_and_exit_2(app: App) -> None:
    cases = {
        (): "no command given",
        ("stats",): "--app is required",
        ("--app", "wtapp", "stats"): "is not MODULE:ATTR",
        ("--app", "nosuchmodule:Session", "stats"): "cannot import module",
        ("--app", "wtapp:Nope", "stats"): "has no attribute",
        ("--app", "wtapp:Nope()", "stats"): "has no attribute",
        ("--app", "wtapp:make_session", "stats"): "is a function",
        ("--app", "wtapp:make_session(os.sep)", "stats"): "with literal arguments",
        ("--app", "wtapp:make_session(", "stats"): "with literal arguments",
        ("--app", "wtapp:Session()", "stats"): "no WriteThroughCache is installed",
        ("--app", "wtapp:engine", "stats"): "no WriteThroughCache is installed",
        ("--app", "wtapp:Session", "frobnicate"): "invalid choice",
        ("--app", "wtapp:Session", "inspect", "Nope", "1"): "no cached model is named 'Nope'",
        ("--app", "wtapp:Session", "inspect", "Product", "abc"): "is a int primary key",
        ("--app", "wtapp:Session", "inspect", "Line", "1"): "2 columns",
        ("--app", "wtapp:Session", "verify", "Product", "--sample", "0"): "not a positive",
        ("--app", "wtapp:Session", "purge"): "a MODEL or --all",
        ("--app", "wtapp:Session", "purge", "Product", "--all"): "a MODEL or --all",
    }
    run_for_real = {(), ("--app", "nosuchmodule:Session", "stats")}
    for args, expected in cases.items():
        done = app.run(*args) if args in run_for_real else app.main(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert expected in lines[0] and "(hint: " in lines[0], (args, done.stderr)
        assert done.stdout == ""


@pytest.mark.databases("postgresql")
@pytest.mark.parametrize("app", ["wtapp_async"], indirect=True)
def test_every_command_runs_on_an_async_sessionmaker_without_a_sync_client(
    app: App, redis_client: redis.Redis
) -> None:
    """An asyncio application (async_sessionmaker, a cache given only a redis.asyncio
    client): each command runs in SQLAlchemy's greenlet on an event loop of its own, and no
    synchronous Redis connection is ever opened."""
    done = app.command("warm", "Product")  # the real `python -m`, once
    assert done.returncode == 0, done.stderr
    assert f"{ROWS} filled" in done.stdout
    keys = entry_keys(redis_client, app.prefix, "cli_product")
    assert len(keys) == ROWS and all(redis_client.get(k)[:1] == b"V" for k in keys)

    # many commands in one process: each main() runs its own event loop
    assert app.json("warm", "Product")["cached"] == ROWS
    with app.engine.begin() as conn:
        conn.execute(product.update().where(product.c.id == 7).values(price=1))
    report = app.json("verify", "Product", status=1)
    assert report["checked"] == ROWS and report["equal"] == ROWS - 1
    assert [(m["kind"], m["detail"]) for m in report["mismatches"]] == [("stale", "price")]
    inspected = app.json("inspect", "Product", "7")
    assert inspected["state"] == "value" and inspected["differences"] == ["price"]
    assert app.json("verify", "Product", "--fix", status=1)["fixed"] == 1
    assert app.json("inspect", "Product", "7")["state"] == "absent"
    assert app.json("verify", "Product")["mismatches"] == []
    assert app.json("warm", "Line")["filled"] == 1
    assert app.json("inspect", "Line", "1,abc")["equal"] is True
    models = app.json("models")
    assert {m["model"] for m in models} == {"Product", "Line"}
    # what the database's catalog says of each, as cache.models() does (nothing here)
    assert {m["commits_invalidate_because"] for m in models} == {""}
    assert all(m["invalidated_by_writes_to"] == m["written_by_triggers_of"] == [] for m in models)

    # warm and verify sent what they did: the tool's own counts, through redis.asyncio
    stats = app.json("stats")
    assert stats["models"]["Product"]["fills"] == ROWS and stats["models"]["Line"]["fills"] == 1
    assert stats["models"]["Product"]["hits"] == ROWS  # the second warm
    assert len(stats["processes"]) == 2  # python -m's, at its end; the worker's
    assert app.tool("stats", "--reset").returncode == 0
    assert not redis_client.exists(f"{app.prefix}:stats", f"{app.prefix}:stats:processes")

    # --app may name the async_scoped_session, or the cache itself
    for ref in ("wtapp_async:scoped", "wtapp_async:cache"):
        done = app.main("--app", ref, "inspect", "Product", "3", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "value"

    assert app.tool("purge", "Product", "--yes").returncode == 0
    assert app.json("inspect", "Product", "1")["state"] == "old generation"
    assert app.json("purge", "--all", "--yes")["deleted"] > ROWS
    assert entry_keys(redis_client, app.prefix, "cli_product") == []
    assert app.sync_connections == 0


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("sqlalchemy-writethrough")
    if not script.exists():
        pytest.skip("not installed as a package in this environment")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "verify" in done.stdout


@pytest.mark.parametrize("app", ["wtapp", "wtapp_async"], indirect=True)
@pytest.mark.databases("postgresql")
def test_app_may_name_a_function_that_builds_the_factory(
    app: App, redis_client: redis.Redis
) -> None:
    """An application built by a factory (Flask's create_app, FastAPI's lifespan) has no
    module-level sessionmaker: ``--app 'MODULE:FUNC()'`` calls a function of the
    application's that builds one, with literal arguments, as Flask's ``--app`` does."""
    done = app.run("--app", f"{app.module}:make_session()", "warm", "Product", "--where", "id <= 3")
    assert done.returncode == 0, done.stderr
    assert "3 filled" in done.stdout
    assert len(entry_keys(redis_client, app.prefix, "cli_product")) == 3
    other = f"{app.prefix}-other"
    try:
        done = app.main(
            "--app", f"{app.module}:make_session(prefix={other!r})", "warm", "Product", "--json"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["filled"] == ROWS
        assert len(entry_keys(redis_client, other, "cli_product")) == ROWS
        assert len(entry_keys(redis_client, app.prefix, "cli_product")) == 3
    finally:
        for key in redis_client.scan_iter(match=f"{other}:*"):
            redis_client.delete(key)
