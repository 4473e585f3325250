"""pytest plugin for advanced-alchemy's suite: its Docker services (pytest-databases) on the
local servers instead.

Loaded with ``-p wt_aa_services`` (this folder on ``PYTHONPATH``) by ``run.py``. Its conftest
asks pytest-databases for ``postgres_service`` (the psycopg and asyncpg engines) and
``mysql_service`` (asyncmy), which start containers: here they are a database of the test
process's own on the server at $AA_POSTGRESQL_URL and $AA_MARIADB_URL (one per pytest-xdist
worker, as pytest-databases' "database" isolation makes them), named after $AA_DATABASE_PREFIX
and dropped at the end of the session. The fixtures are registered in ``pytest_configure``,
after the conftest's ``pytest_plugins`` (pytest-databases): among plugins the last one
registered provides a fixture. Without the URLs, the services are those of pytest-databases.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


@contextlib.contextmanager
def _local_database(env_var: str, drop_suffix: str = "") -> Iterator[URL]:
    """A database of this test process's own on the server at ``$env_var``, named after
    $AA_DATABASE_PREFIX and the pytest-xdist worker, dropped at the end."""
    from sqlalchemy import create_engine, make_url, pool

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    prefix = os.environ.get("AA_DATABASE_PREFIX") or f"wt_aa_{uuid.uuid4().hex[:10]}"
    name = f"{prefix}_{worker}"
    url = make_url(os.environ[env_var])
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{drop_suffix}")
        admin.dispose()


class _LocalServices:
    @pytest.fixture(scope="session")
    def postgres_service(self) -> Iterator[Any]:
        from pytest_databases.docker.postgres import PostgresService

        with _local_database("AA_POSTGRESQL_URL", " WITH (FORCE)") as url:
            yield PostgresService(
                container=None,  # type: ignore[arg-type]
                host=url.host or "127.0.0.1",
                port=url.port or 5432,
                database=url.database or "",
                user=url.username or "postgres",
                password=url.password or "",
            )

    @pytest.fixture(scope="session")
    def mysql_service(self) -> Iterator[Any]:
        from pytest_databases.docker.mysql import MySQLService

        with _local_database("AA_MARIADB_URL") as url:
            yield MySQLService(
                container=None,  # type: ignore[arg-type]
                host=url.host or "127.0.0.1",
                port=url.port or 3306,
                db=url.database or "",
                user=url.username or "root",
                password=url.password or "",
            )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("AA_POSTGRESQL_URL") and os.environ.get("AA_MARIADB_URL"):
        config.pluginmanager.register(_LocalServices(), "wt_aa_local_services")
