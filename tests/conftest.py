"""Shared fixtures: real Redis and databases (see ``_servers`` for how they are found).

Fixtures:

* ``redis_url`` (session): URL of a Redis server.
* ``redis_client``: ``redis.Redis`` on ``redis_url`` (bytes replies), closed after the test.
* ``prefix``: a unique Redis key namespace (``t-<8 hex>``); its keys are deleted afterwards.
* ``postgresql_url`` / ``mariadb_url`` (session): SQLAlchemy URLs of the server databases.
* ``db_name``: one of ``sqlite``, ``postgresql``, ``mariadb``; a test using it (or ``db_url``
  / ``engine``) runs once per database. Restrict with ``@pytest.mark.databases("postgresql")``
  on the test, class or module (``pytestmark``).
* ``db_url``: SQLAlchemy URL for ``db_name`` (SQLite: a fresh file under ``tmp_path``).
* ``engine``: an ``Engine`` on ``db_url``, disposed after the test.

Helpers to import from ``_servers``: ``reset_schema``, ``capture_sql``, ``counting_redis``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from _servers import (
    DATABASES,
    DISCOVERED,
    MARIADB,
    POSTGRESQL,
    REDIS,
    delete_prefix,
    new_prefix,
    server_url,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``db_name`` over the databases allowed by the closest ``databases`` marker."""
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
    metafunc.parametrize("db_name", names, ids=names, indirect=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which servers the run actually used, so a CI log shows what was tested."""
    if DISCOVERED:
        terminalreporter.write_sep("-", "servers used")
        for name, where in sorted(DISCOVERED.items()):
            terminalreporter.write_line(f"{name}: {where}")


# ---------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server: $REDIS_URL, local 127.0.0.1:6379, or a container."""
    with server_url(REDIS) as url:
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
