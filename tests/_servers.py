"""Test helpers: find Redis/PostgreSQL/MariaDB servers, reset schemas, count SQL and Redis I/O.

Server discovery order (per service), so the suite runs the same way on a laptop, on CI
and on a machine with only Docker:

1. an explicit URL in the environment (``REDIS_URL``, ``POSTGRESQL_URL``, ``MARIADB_URL``);
2. the usual local service on loopback, if it answers within about a second;
3. a throwaway testcontainers container, only if a Docker engine is reachable;
4. otherwise ``pytest.fail`` when ``CI`` is set (a missing service must fail CI),
   else ``pytest.skip`` with the reasons.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
import redis
import redis.connection
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

#: Database ids accepted by the ``db_name`` fixture and the ``databases`` marker.
DATABASES: tuple[str, ...] = ("sqlite", "postgresql", "mariadb")

#: Timeout for probing a local default service: it is on loopback, so it answers fast or never.
LOCAL_PROBE_TIMEOUT = 1.0
#: An explicitly configured server may be remote, so give it longer before failing.
ENV_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServiceSpec:
    """How to find one kind of server."""

    name: str
    label: str
    env_var: str
    default_url: str
    image: str


REDIS = ServiceSpec(
    name="redis",
    label="Redis",
    env_var="REDIS_URL",
    default_url="redis://127.0.0.1:6379/0",
    image="redis:7",
)
POSTGRESQL = ServiceSpec(
    name="postgresql",
    label="PostgreSQL",
    env_var="POSTGRESQL_URL",
    default_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
    image="postgres:15",
)
MARIADB = ServiceSpec(
    name="mariadb",
    label="MariaDB",
    env_var="MARIADB_URL",
    default_url="mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4",
    image="mariadb:10.11",
)
SERVICES: dict[str, ServiceSpec] = {s.name: s for s in (REDIS, POSTGRESQL, MARIADB)}

#: service name -> "url (how it was found)", for the end-of-run summary.
DISCOVERED: dict[str, str] = {}


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to something truthy."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def redact(url: str) -> str:
    """Render a URL for logs without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# --------------------------------------------------------------------------- probing


def probe_redis(url: str, timeout: float) -> str | None:
    """Return None if Redis at ``url`` answers PING within ``timeout``, else the reason."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _connect_args(url: URL, timeout: float) -> dict[str, Any]:
    """Driver-specific connect timeouts, so a dead server costs ~timeout, not minutes."""
    driver = url.get_driver_name()
    if driver.startswith("psycopg"):
        # libpq treats anything below 2 seconds as 2.
        return {"connect_timeout": max(2, math.ceil(timeout))}
    if driver == "pymysql":
        return {"connect_timeout": timeout, "read_timeout": timeout}
    return {}


def probe_sql(url: str, timeout: float) -> str | None:
    """Return None if the database at ``url`` runs ``SELECT 1`` within ``timeout``, else why not."""
    try:
        parsed = make_url(url)
        engine = sa.create_engine(
            parsed, poolclass=NullPool, connect_args=_connect_args(parsed, timeout)
        )
    except Exception as exc:  # bad URL, driver not installed, ...
        return f"{type(exc).__name__}: {exc}"
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        engine.dispose()
    return None


def probe(spec: ServiceSpec, url: str, timeout: float) -> str | None:
    """Probe a service of kind ``spec``; None means it answers."""
    if spec.name == "redis":
        return probe_redis(url, timeout)
    return probe_sql(url, timeout)


@functools.cache
def docker_unavailable_reason() -> str | None:
    """None if testcontainers is importable and a Docker engine answers, else why not.

    Cached: asked once per test session whatever the number of services.
    """
    try:
        import testcontainers  # noqa: F401
    except ImportError as exc:
        return f"testcontainers is not installed ({exc})"
    # docker-py leaks a socket when the engine is absent; keep that ResourceWarning out
    # of every test run on a machine without Docker.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        reason = _ping_docker()
        gc.collect()
    return reason


def _ping_docker() -> str | None:
    try:
        import docker  # a dependency of testcontainers

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine reachable ({type(exc).__name__})"
    return None


# ---------------------------------------------------------------------- containers


def _start_container(spec: ServiceSpec, stack: contextlib.ExitStack) -> str:
    """Start a container for ``spec`` (stopped when ``stack`` closes) and return its URL.

    Imports testcontainers lazily; 4.x moved modules to ``testcontainers.community``.
    """
    if spec.name == "redis":
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer

        redis_container = stack.enter_context(RedisContainer(spec.image))
        host = redis_container.get_container_host_ip()
        port = redis_container.get_exposed_port(6379)
        return f"redis://{host}:{port}/0"

    if spec.name == "postgresql":
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer

        pg = stack.enter_context(
            PostgresContainer(spec.image, username="test", password="test", dbname="test")
        )
        return URL.create(
            "postgresql+psycopg",
            username="test",
            password="test",
            host=pg.get_container_host_ip(),
            port=int(pg.get_exposed_port(5432)),
            database="test",
        ).render_as_string(hide_password=False)

    if spec.name == "mariadb":
        try:
            from testcontainers.community.mysql import MySqlContainer
        except ImportError:
            from testcontainers.mysql import MySqlContainer

        # The MariaDB image honours the MYSQL_* variables that MySqlContainer sets.
        maria = stack.enter_context(
            MySqlContainer(spec.image, username="test", password="test", dbname="test")
        )
        return URL.create(
            "mysql+pymysql",
            username="test",
            password="test",
            host=maria.get_container_host_ip(),
            port=int(maria.get_exposed_port(3306)),
            database="test",
            query={"charset": "utf8mb4"},
        ).render_as_string(hide_password=False)

    raise ValueError(f"unknown service {spec.name!r}")


# ----------------------------------------------------------------------- discovery


def _unavailable(spec: ServiceSpec, reasons: list[str]) -> NoReturn:
    message = (
        f"{spec.label} is not available: "
        + "; ".join(reasons)
        + f". Start {spec.label} locally, set {spec.env_var}, or make a Docker engine reachable."
    )
    if in_ci():
        pytest.fail(f"[CI] {message}", pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def server_url(spec: ServiceSpec) -> Iterator[str]:
    """Find a server for ``spec`` (see module docstring) and yield its URL.

    A database server's URL names a database of this run's own (see :func:`run_database`), so
    two suites running at once on one server never share a table. A container started here is
    stopped when the context exits. Fails or skips the requesting test(s) when nothing is
    available.
    """
    with _found_server_url(spec) as url:
        if spec.name == "redis":
            yield url
            return
        with run_database(url, spec.name) as own:
            yield own


@contextlib.contextmanager
def run_database(url: str, service: str) -> Iterator[str]:
    """A database of this run's own (``wt_run_<8 hex>``) on the server of ``url``, dropped at
    the end; ``url`` itself when the account may not create one (said in the summary)."""
    parsed = make_url(url)
    name = f"wt_run_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(parsed, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    preparer = admin.dialect.identifier_preparer
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {preparer.quote(name)}")
    except Exception as exc:
        admin.dispose()
        DISCOVERED[f"{service} database"] = (
            f"{parsed.database} (shared: could not create a run database: {type(exc).__name__})"
        )
        yield url
        return
    DISCOVERED[f"{service} database"] = f"{name} (this run's own, dropped after)"
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        gc.unfreeze()  # see conftest.py: _freeze_what_earlier_modules_left
        gc.collect()  # engines a test forgot to dispose hold connections to it
        try:
            with admin.connect() as conn:
                force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {preparer.quote(name)}{force}")
        except Exception as exc:
            warnings.warn(f"could not drop the run database {name}: {exc}", stacklevel=1)
        admin.dispose()


@contextlib.contextmanager
def _found_server_url(spec: ServiceSpec) -> Iterator[str]:
    explicit = os.environ.get(spec.env_var)
    if explicit:
        why = probe(spec, explicit, ENV_PROBE_TIMEOUT)
        if why is not None:
            # A configured server that does not answer is a broken setup: never skip it.
            pytest.fail(f"{spec.env_var}={redact(explicit)} does not answer: {why}", pytrace=False)
        DISCOVERED[spec.name] = f"{redact(explicit)} (from ${spec.env_var})"
        yield explicit
        return

    reasons: list[str] = []
    why = probe(spec, spec.default_url, LOCAL_PROBE_TIMEOUT)
    if why is None:
        DISCOVERED[spec.name] = f"{redact(spec.default_url)} (local service)"
        yield spec.default_url
        return
    reasons.append(f"{redact(spec.default_url)} does not answer ({why})")

    docker_why = docker_unavailable_reason()
    if docker_why is not None:
        reasons.append(docker_why)
        _unavailable(spec, reasons)

    with contextlib.ExitStack() as stack:
        try:
            url = _start_container(spec, stack)
        except Exception as exc:
            reasons.append(
                f"starting a {spec.image} container failed ({type(exc).__name__}: {exc})"
            )
            _unavailable(spec, reasons)
        DISCOVERED[spec.name] = f"{redact(url)} (testcontainers {spec.image})"
        yield url


# -------------------------------------------------------------------------- schema


#: (database URL, table name) -> the Table whose CREATE made that table, in this process
_created: dict[tuple[str, str], sa.Table] = {}


def reset_schema(engine: Engine, metadata: sa.MetaData) -> None:
    """Give ``metadata``'s tables on ``engine`` their created, empty state.

    The first time (per database), or when another metadata has since created a table of the
    same name, every table is dropped then created: that clears leftovers of an earlier or
    crashed run on the shared server databases. On PostgreSQL tables are dropped with CASCADE
    and on MariaDB with foreign-key checks off, so a leftover table from another test module
    that references one of ours (same name, different model) cannot block the drop.

    Otherwise the tables are emptied and their autoincrement counters reset, which costs a
    tenth of the drop and create on MariaDB (DDL made setup most of a test's time).
    """
    url = engine.url.render_as_string(hide_password=False)
    tables = list(metadata.sorted_tables)
    if tables and all(_created.get((url, t.fullname)) is t for t in tables):
        try:
            _empty_tables(engine, tables)
            return
        except sa.exc.DBAPIError:  # a test dropped or changed one: start over
            pass
    _drop_and_create(engine, metadata)
    # a CASCADE drop may have changed other metadata's tables: only ours are known now
    for key in [k for k in _created if k[0] == url]:
        del _created[key]
    for table in tables:
        _created[(url, table.fullname)] = table


@contextlib.contextmanager
def _foreign_key_checks_off(conn: sa.Connection) -> Iterator[None]:
    """MySQL/MariaDB: tables referenced by others can be truncated or dropped meanwhile."""
    conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
    try:
        yield
    finally:
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


def _empty_tables(engine: Engine, tables: list[sa.Table]) -> None:
    preparer = engine.dialect.identifier_preparer
    names = [preparer.format_table(t) for t in tables]
    with engine.begin() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
        elif dialect in ("mysql", "mariadb"):
            with _foreign_key_checks_off(conn):
                for name in names:
                    conn.exec_driver_sql(f"TRUNCATE TABLE {name}")
        else:
            for table in reversed(tables):
                conn.execute(table.delete())
            if dialect == "sqlite":
                has_sequences = conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
                ).first()
                if has_sequences:
                    conn.exec_driver_sql("DELETE FROM sqlite_sequence")


def _drop_and_create(engine: Engine, metadata: sa.MetaData) -> None:
    tables = list(reversed(metadata.sorted_tables))
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            for table in tables:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.format_table(table)} CASCADE")
        elif dialect in ("mysql", "mariadb"):
            with _foreign_key_checks_off(conn):
                for table in tables:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.format_table(table)}")
        # Also drops what the loop does not cover: SQLite tables, PostgreSQL enum types, ...
        metadata.drop_all(conn, checkfirst=True)
        metadata.create_all(conn)


# ---------------------------------------------------------------------- SQL capture


@contextlib.contextmanager
def capture_sql(engine: Engine) -> Iterator[list[str]]:
    """Collect every SQL statement sent to a DBAPI cursor of ``engine`` while active.

    Lets a test assert that a cache hit issued no SQL at all (``assert statements == []``).
    An ``executemany`` counts as one statement.
    """
    statements: list[str] = []

    def _record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", _record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", _record)


# ---------------------------------------------------------------- Redis round trips


class RoundTripCounter:
    """Number of writes to a Redis socket (one command, one pipeline or one transaction each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        #: the first command name of each counted write, for an assertion's message
        self.names: list[str] = []

    @property
    def count(self) -> int:
        return self._count

    def increment(self, name: str = "?") -> None:
        with self._lock:
            self._count += 1
            self.names.append(name)

    def reset(self) -> None:
        with self._lock:
            self._count = 0
            self.names = []

    def __repr__(self) -> str:
        return f"<RoundTripCounter count={self._count}>"


def _command_name(packed: Any) -> str:
    """The first command's name in a packed write (RESP ``*n $len NAME ...``), best effort."""
    try:
        first = packed if isinstance(packed, (bytes, bytearray)) else packed[0]
        if isinstance(first, memoryview):
            first = first.tobytes()
        parts = bytes(first).split(b"\r\n", 3)
        return parts[2].decode(errors="replace") if len(parts) > 2 else "?"
    except (IndexError, TypeError):
        return "?"


def _counting_connection_class(
    base: type[redis.connection.AbstractConnection], counter: RoundTripCounter
) -> type[redis.connection.AbstractConnection]:
    """Subclass ``base`` so each ``send_packed_command`` bumps ``counter``.

    The connection handshake (HELLO, CLIENT SETINFO, SELECT, AUTH...) is not counted:
    it happens once per new pooled connection, not per operation under test. redis-py 5
    runs it through ``on_connect``; 6+ through ``on_connect_check_health``. The
    ``send_packed_command(self, command, check_health=True)`` signature is the same in 5-8.
    """

    class CountingConnection(base):  # type: ignore[valid-type,misc]
        _handshake_depth = 0

        def on_connect(self) -> None:
            self._handshake_depth += 1
            try:
                super().on_connect()
            finally:
                self._handshake_depth -= 1

        if hasattr(base, "on_connect_check_health"):

            def on_connect_check_health(self, check_health: bool = True) -> None:
                self._handshake_depth += 1
                try:
                    super().on_connect_check_health(check_health=check_health)
                finally:
                    self._handshake_depth -= 1

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._handshake_depth:
                counter.increment(_command_name(command))
            super().send_packed_command(command, check_health=check_health)

    CountingConnection.__name__ = CountingConnection.__qualname__ = f"Counting{base.__name__}"
    return CountingConnection


#: WriteThroughCache options for a cache whose round trips a test counts: the connection's
#: epoch check (at most every ``epoch_check_interval`` on an open connection) and the
#: counters' sends to Redis are periodic, not part of any one operation; on a loaded machine
#: a periodic check once landed inside a counted commit.
COUNTED: dict[str, Any] = {"epoch_check_interval": 3600.0, "stats_interval": None}


def counting_redis(url: str, **kwargs: Any) -> tuple[redis.Redis, RoundTripCounter]:
    """A Redis client whose pool counts round trips, and its counter.

    ``kwargs`` go to ``redis.Redis.from_url`` (e.g. ``decode_responses=True``). Give a
    generous ``socket_timeout``: redis-py retries a command whose reply timed out, and a late
    reply on a loaded machine (another suite on the same Redis) would count as two trips.
    Close the client when done (``client.close()`` also disconnects its pool).
    """
    scheme = url.split("://", 1)[0].lower()
    base: type[redis.connection.AbstractConnection]
    if scheme == "rediss":
        base = redis.connection.SSLConnection
    elif scheme == "unix":
        base = redis.connection.UnixDomainSocketConnection  # type: ignore[type-abstract]
    else:
        base = redis.connection.Connection
    counter = RoundTripCounter()
    client = redis.Redis.from_url(
        url, connection_class=_counting_connection_class(base, counter), **kwargs
    )
    return client, counter


# ------------------------------------------------------------------------- misc


#: every prefix :func:`new_prefix` made in this process, and the test that asked for it:
#: conftest reports those whose keys are still in Redis when the run ends
MADE_PREFIXES: dict[str, str] = {}


def new_prefix() -> str:
    """A fresh Redis key namespace for one test: ``t-`` and 8 hex characters."""
    value = f"t-{uuid.uuid4().hex[:8]}"
    # "tests/x.py::test_y (setup)": the test, without its phase
    MADE_PREFIXES[value] = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    return value


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key starting with ``prefix`` (SCAN + UNLINK); return how many."""
    pattern = "".join("\\" + c if c in "\\*?[]" else c for c in prefix) + "*"
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted
