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

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


def _database_name() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    prefix = os.environ.get("AA_DATABASE_PREFIX") or f"wt_aa_{uuid.uuid4().hex[:10]}"
    return f"{prefix}_{worker}"


class _LocalServices:
    @pytest.fixture(scope="session")
    def postgres_service(self) -> Iterator[Any]:
        from pytest_databases.docker.postgres import PostgresService
        from sqlalchemy import create_engine, make_url, pool

        url = make_url(os.environ["AA_POSTGRESQL_URL"])
        name = _database_name()
        admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield PostgresService(
                container=None,  # type: ignore[arg-type]
                host=url.host or "127.0.0.1",
                port=url.port or 5432,
                database=name,
                user=url.username or "postgres",
                password=url.password or "",
            )
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.dispose()

    @pytest.fixture(scope="session")
    def mysql_service(self) -> Iterator[Any]:
        from pytest_databases.docker.mysql import MySQLService
        from sqlalchemy import create_engine, make_url, pool

        url = make_url(os.environ["AA_MARIADB_URL"])
        name = _database_name()
        admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield MySQLService(
                container=None,  # type: ignore[arg-type]
                host=url.host or "127.0.0.1",
                port=url.port or 3306,
                db=name,
                user=url.username or "root",
                password=url.password or "",
            )
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            admin.dispose()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("AA_POSTGRESQL_URL") and os.environ.get("AA_MARIADB_URL"):
        config.pluginmanager.register(_LocalServices(), "wt_aa_local_services")
