"""Shared fixtures: real Redis and databases (see ``_servers`` for how they are found).

Fixtures:

* ``redis_url`` (session): URL of a Redis server.
* ``redis_client``: ``redis.Redis`` on ``redis_url`` (bytes replies), closed after the test.
* ``prefix``: a unique Redis key namespace (``t-<8 hex>``); its keys are deleted afterwards.
* ``clients`` / ``caches``: make Redis clients / caches with a near cache on ``prefix``,
  closed after the test (the near cache tests).
* ``postgresql_url`` / ``mariadb_url`` (session): SQLAlchemy URLs of the server databases.
* ``db_name``: one of ``sqlite``, ``postgresql``, ``mariadb``; a test using it (or ``db_url``
  / ``engine``) runs once per database. Restrict with ``@pytest.mark.databases("postgresql")``
  on the test, class or module (``pytestmark``), and for the whole run with
  ``--databases sqlite`` (or ``$WRITETHROUGH_TEST_DATABASES``).
* ``db_url``: SQLAlchemy URL for ``db_name`` (SQLite: a fresh file under ``tmp_path``).
* ``engine``: an ``Engine`` on ``db_url``, disposed after the test.
* ``cluster`` (session): a Redis Cluster of 3 primaries and 3 replicas on loopback
  (``stress/cluster.py``), started at first use; tests that fail a node over restart it.

Helpers to import from ``_servers``: ``reset_schema``, ``capture_sql``, ``counting_redis``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from _servers import (
    DATABASES,
    DISCOVERED,
    MADE_PREFIXES,
    MARIADB,
    POSTGRESQL,
    REDIS,
    delete_prefix,
    new_prefix,
    server_url,
)

# Caches made by tests send no shared stats in the background: a send landing inside a test
# that counts Redis round trips would be counted. The tests of the shared stats turn it on.
os.environ.setdefault("SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL", "off")

# the pytest plugin's own tests run a user's suite with pytester
pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--databases",
        default=os.environ.get("WRITETHROUGH_TEST_DATABASES", ""),
        help="comma-separated databases to run the database tests on (sqlite, postgresql, "
        "mariadb; default all, or $WRITETHROUGH_TEST_DATABASES); tests needing none still run",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``db_name`` over the databases allowed by the closest ``databases`` marker
    and by ``--databases``."""
    if "db_name" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(argnames, str):
            argnames = [name.strip() for name in argnames.split(",")]
        if "db_name" in argnames:
            return  # the test parametrizes db_name itself
    names = list(DATABASES)
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None:
        unknown = [name for name in marker.args if name not in DATABASES]
        if unknown:
            raise ValueError(
                f"@pytest.mark.databases: unknown database(s) {unknown}; "
                f"choose from {list(DATABASES)}"
            )
        names = [name for name in DATABASES if name in marker.args]
    chosen = _chosen_databases(metafunc.config)
    if chosen:
        names = [name for name in names if name in chosen]
    metafunc.parametrize("db_name", names, ids=names, indirect=True)


def _chosen_databases(config: pytest.Config) -> list[str]:
    """The databases ``--databases`` names (empty: all)."""
    chosen = [n.strip() for n in config.getoption("databases").split(",") if n.strip()]
    unknown = [name for name in chosen if name not in DATABASES]
    if unknown:
        raise pytest.UsageError(
            f"--databases: unknown database(s) {unknown}; choose from {list(DATABASES)}"
        )
    return chosen


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--databases`` also deselects tests that parametrize a ``db`` of their own (the stress
    runs), so that a SQLite-only run needs no PostgreSQL or MariaDB at all."""
    _narrowed(config, items)
    chosen = _chosen_databases(config)
    if not chosen:
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        spec = getattr(item, "callspec", None)
        db = spec.params.get("db") if spec is not None else None
        other = isinstance(db, str) and db in DATABASES and db not in chosen
        (drop if other else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _narrowed(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A parameter marked ``pytest.param(..., marks=pytest.mark.databases(...))`` narrows
    the databases of its test instances: the others are deselected (a Redis Cluster flavour
    of the behaviour suite runs on one database, not on each)."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        spec = getattr(item, "callspec", None)
        db = spec.params.get("db_name") if spec is not None else None
        # the test's own marks and its parameters' (a module's or class's are pytestmark)
        marks = [m.args for m in getattr(item, "own_markers", ()) if m.name == "databases"]
        outside = isinstance(db, str) and any(db not in names for names in marks)
        (drop if outside else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which servers the run actually used, so a CI log shows what was tested; and the
    keys tests left behind in the Redis at ``redis_url``, if any."""
    terminalreporter.write_sep("-", "servers used")
    for name, where in sorted(DISCOVERED.items()):  # empty in pytest-xdist's controller
        terminalreporter.write_line(f"{name}: {where}")
    terminalreporter.write_line(f"servers started by fixtures: {_started_binary()}")
    if _KEYS_LEFT:
        terminalreporter.write_sep("!", "Redis keys left behind (a bug: each test deletes its own)")
        for line in sorted(_KEYS_LEFT):
            terminalreporter.write_line(line)


#: the Redis URLs ``redis_url`` gave this process, and what the run left there
_REDIS_URLS: set[str] = set()
_KEYS_LEFT: list[str] = []


def _keys_left_behind() -> list[str]:
    """Keys still in Redis under a prefix this process made (:func:`new_prefix`): a test
    deletes its prefix at teardown, so each is a test's bug, or a cache of one still writing
    after its test ended (a closed cache's breaker probe once did)."""
    found: dict[str, list[str]] = {}
    for url in _REDIS_URLS:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            for raw in client.scan_iter(match="t-*", count=1000):
                key = raw.decode(errors="replace")
                made = key.split(":", 1)[0]
                if made in MADE_PREFIXES:
                    found.setdefault(made, []).append(key)
        except redis.RedisError:
            continue
        finally:
            client.close()
    return [
        f"{MADE_PREFIXES[made]}: {', '.join(sorted(keys)[:3])}"
        + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        for made, keys in found.items()
    ]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's sends a worker's output
def pytest_sessionfinish(session: pytest.Session) -> None:
    left = _keys_left_behind()
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a pytest-xdist worker: its controller reports
        output["wt_keys_left"] = left
    else:
        _KEYS_LEFT.extend(left)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: a worker finished; keep what it found left behind."""
    _KEYS_LEFT.extend(getattr(node, "workeroutput", {}).get("wt_keys_left", []))


def _started_binary() -> str:
    """The server binary the fixtures start (Cluster, Sentinel, restarts), and its version."""
    from stress.redis_server import SERVER_BINARY_ENV, server_binary

    try:
        binary = server_binary()
    except RuntimeError as exc:
        return str(exc)
    if binary is None:
        return "none (no redis-server on PATH)"
    where = f"${SERVER_BINARY_ENV}" if os.environ.get(SERVER_BINARY_ENV) else "PATH"
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"--version failed: {exc}"
    return f"{binary} (from {where}): {version}"


# A background thread of a finished test's cache (a breaker's probe) may log a warning between
# tests, when no handler is installed: logging's last resort then wrote it to pytest's closed
# capture stream ("--- Logging error ---"). Tests read the records through caplog, not stderr.
logging.getLogger("sqlalchemy_writethrough").addHandler(logging.NullHandler())


@pytest.fixture(scope="module", autouse=True)
def _freeze_what_earlier_modules_left() -> None:
    """Collect the garbage of earlier modules, then exempt every survivor from later
    collections (``gc.freeze``). Several tests call ``gc.collect()`` to free the caches they
    discarded; late in the suite each such call walked every object of every module before
    (about a second each), and now walks only this module's."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server: $REDIS_URL, local 127.0.0.1:6379, or a container."""
    with server_url(REDIS) as url:
        _REDIS_URLS.add(url)
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client for ``redis_url`` returning bytes (decode_responses=False)."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix unique to this test; all keys under it are deleted afterwards."""
    value = new_prefix()
    yield value
    client = redis.Redis.from_url(redis_url)
    try:
        delete_prefix(client, value)
    finally:
        client.close()


@pytest.fixture
def clients(redis_url: str) -> Iterator[Callable[[], redis.Redis]]:
    """Makes clients for ``redis_url`` (1 s timeouts), each closed after the test."""
    made: list[redis.Redis] = []

    def make() -> redis.Redis:
        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def caches(clients: Callable[[], redis.Redis], prefix: str) -> Iterator[Callable[..., Any]]:
    """Makes caches with a near cache on the test's prefix, each on its own client (one per
    "process"), each closed after the test. Their copies live ``_cache_helpers.LASTING``
    seconds unless the test passes ``near_cache=``."""
    from sqlalchemy_writethrough import NearCacheOptions, WriteThroughCache

    from _cache_helpers import LASTING

    made: list[WriteThroughCache] = []

    def make(**options: Any) -> WriteThroughCache:
        options.setdefault("near_cache", NearCacheOptions(staleness=LASTING))
        cache = WriteThroughCache(clients(), prefix=prefix, stats_interval=None, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A Redis Cluster (3 primaries, 3 replicas) the tests start on loopback ports."""
    from stress.cluster import running_cluster

    from _sentinel import require_redis_server

    require_redis_server()
    with running_cluster() as group:
        yield group


@pytest.fixture
def server() -> Iterator[Any]:
    """A throwaway redis-server of the test's own on a loopback port (to stop, freeze,
    restart or configure), stopped afterwards."""
    from stress.redis_server import RedisServer

    from _sentinel import require_redis_server

    require_redis_server()
    with RedisServer() as started:
        yield started


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A new event loop of the test's own, closed afterwards."""
    new = asyncio.new_event_loop()
    try:
        yield new
    finally:
        new.close()


# ------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database: $POSTGRESQL_URL, local, or a container."""
    with server_url(POSTGRESQL) as url:
        yield url


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """SQLAlchemy URL of a MariaDB database: $MARIADB_URL, local, or a container."""
    with server_url(MARIADB) as url:
        yield url


@pytest.fixture
def db_name(request: pytest.FixtureRequest) -> str:
    """Which database this test instance runs on (parametrized by pytest_generate_tests)."""
    name: str = getattr(request, "param", "sqlite")
    return name


@pytest.fixture
def db_url(db_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLAlchemy URL for ``db_name``; server URLs are only looked up when needed."""
    if db_name == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue(f"{db_name}_url")
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An Engine on ``db_url``, disposed after the test. Use ``reset_schema`` for tables."""
    eng = sa.create_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()
