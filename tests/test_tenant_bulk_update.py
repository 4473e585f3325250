"""ORM bulk UPDATE by primary key with the tenant's ``schema_translate_map`` only in
``session.execute(..., execution_options=...)``: found by ``python -m stress --tenants``.

SQLAlchemy 2.1 runs that UPDATE without the map, on the default schema (plain sessions too,
without the cache), so the tenant's row keeps its value and the default schema's row changes.
Each test here states what a user can observe, and fails until that is resolved (the same map
on the statement, ``update(M).execution_options(...)``, reaches the tenant).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from test_schema_tenants import StItem, maker, schemas  # noqa: F401 (fixtures)

pytestmark = pytest.mark.databases("postgresql", "mariadb")

KNOWN = (
    "known: SQLAlchemy's ORM bulk UPDATE by primary key ignores a schema_translate_map given "
    "only in session.execute()'s execution_options (it writes the default schema)"
)


def _tenant(schema: str) -> dict[str, Any]:
    return {"schema_translate_map": {None: schema}}


def _names(engine: Engine, schema: str) -> tuple[str | None, str | None]:
    """(the tenant's row 1, the default schema's row 1), straight from the database."""
    stmt = select(StItem.name).where(StItem.id == 1)
    with engine.connect() as conn:
        default = conn.scalar(stmt)
    with engine.connect() as conn:  # Connection.execution_options() changes conn itself
        return conn.execution_options(**_tenant(schema)).scalar(stmt), default


@pytest.mark.xfail(strict=True, reason=KNOWN)
def test_bulk_update_by_pk_with_the_map_in_execute_options_writes_the_tenant(
    maker: sessionmaker[Session],  # noqa: F811
    engine: Engine,
    schemas: tuple[str, str],  # noqa: F811
) -> None:
    a, _b = schemas
    with maker() as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    assert _names(engine, a) == ("a bulk", "default")


@pytest.mark.xfail(strict=True, reason=KNOWN)
def test_without_the_cache_too(engine: Engine, schemas: tuple[str, str]) -> None:  # noqa: F811
    """The same statement through a plain Session: SQLAlchemy's own behaviour."""
    a, _b = schemas
    with Session(engine) as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    assert _names(engine, a) == ("a bulk", "default")


def test_the_map_on_the_statement_writes_the_tenant(
    maker: sessionmaker[Session],  # noqa: F811
    engine: Engine,
    schemas: tuple[str, str],  # noqa: F811
) -> None:
    """The workaround: the map on the statement itself."""
    a, _b = schemas
    with maker() as session:
        session.execute(update(StItem).execution_options(**_tenant(a)), [{"id": 1, "name": "a"}])
        session.commit()
    assert _names(engine, a) == ("a", "default")


def test_bulk_update_by_pk_leaves_no_stale_entry_whichever_schema_it_wrote(
    maker: sessionmaker[Session],  # noqa: F811
    engine: Engine,
    schemas: tuple[str, str],  # noqa: F811
) -> None:
    """Whatever schema the UPDATE reached, the cache answers each schema's row as its
    database holds it afterwards (every entry warmed first)."""
    a, _b = schemas
    for _ in range(2):  # warm: the second round from the cache
        with maker() as session:
            assert session.get(StItem, 1, execution_options=_tenant(a)) is not None
            assert session.get(StItem, 1) is not None
    with maker() as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    in_tenant, in_default = _names(engine, a)
    with maker() as session:
        found = session.get(StItem, 1, execution_options=_tenant(a))
        assert found is not None and found.name == in_tenant
    with maker() as session:
        found = session.get(StItem, 1)
        assert found is not None and found.name == in_default
