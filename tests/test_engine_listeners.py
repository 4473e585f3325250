"""The cache never adds a listener to an engine the application is using.

SQLAlchemy iterates an engine's listeners without a lock, and a listener added meanwhile makes
the statement being executed raise ``RuntimeError: deque mutated during iteration``. The cache
meets an engine at its first transaction or load, while other threads run statements on it:
it added its ``before_cursor_execute`` listener (raw SQL and DML tracking) then, and its
``engine_disposed`` one at the first load of each model. A Sentinel failover test under load
(two caches on one engine, writer and reader threads) met it in CI: a reader's ``get`` raised.

The tests make that moment deterministic: the cache's first use of the engine happens while
the engine runs its listeners for a statement of the application's own (from inside one of
them, on another connection, as another thread would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import String, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")


class Base(DeclarativeBase):
    pass


class ElItem(Base, CachedModel):
    __tablename__ = "el_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def installed(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    """Row 1 in the database, and a cache installed on a factory of ``engine`` that has not
    used the engine yet; uninstalled and closed afterwards."""
    reset_schema(engine, Base.metadata)
    with Session(engine) as s:
        s.add(ElItem(id=1, name="one"))
        s.commit()
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    factory = sessionmaker(engine)
    cache.install(factory)
    yield cache, factory
    cache.uninstall(factory)
    cache.close()


def _during_a_statement(engine: Engine, event_name: str, action: Callable[[], Any]) -> None:
    """Run one statement of the application's own on ``engine`` whose listeners for
    ``event_name`` run ``action`` (once); what the statement raises is raised."""
    done: list[bool] = []

    def listener(*args: Any) -> None:
        if not done:
            done.append(True)
            action()

    event.listen(engine, event_name, listener)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        event.remove(engine, event_name, listener)
    assert done


def _during_a_dispose(engine: Engine, action: Callable[[], Any]) -> None:
    """``engine.dispose()`` whose ``engine_disposed`` listeners run ``action`` (once)."""
    done: list[bool] = []

    def listener(disposed: Any) -> None:
        if not done:
            done.append(True)
            action()

    event.listen(engine, "engine_disposed", listener)
    try:
        engine.dispose()
    finally:
        event.remove(engine, "engine_disposed", listener)
    assert done


def test_a_first_transaction_while_the_engine_runs_a_statement(
    engine: Engine, installed: tuple[WriteThroughCache, sessionmaker[Session]], redis_client: Any
) -> None:
    """The cache's first transaction on an engine that is executing: before the fix, the
    executing statement raised RuntimeError (the cache's listener was added to the engine
    its listeners were being iterated for). Raw SQL through a session is still tracked."""
    cache, factory = installed

    def first_use() -> None:
        with factory() as session:
            assert session.get(ElItem, 1).name == "one"  # type: ignore[union-attr]
            session.commit()

    _during_a_statement(engine, "before_cursor_execute", first_use)
    assert entry_state(redis_client, entry_key(cache, ElItem, 1, bind=engine)) == "value"
    # the cache's statement tracking works on the engine: raw SQL through a session
    # invalidates the model (else the next get is served "one" from the entry)
    with factory() as session:
        session.execute(sa.text("UPDATE el_item SET name = 'raw' WHERE id = 1"))
        session.commit()
    with factory() as session:
        assert session.get(ElItem, 1).name == "raw"  # type: ignore[union-attr]


def test_a_first_load_while_the_engine_is_disposed(
    engine: Engine, installed: tuple[WriteThroughCache, sessionmaker[Session]]
) -> None:
    """The first load of a model asks the database's catalog and watches the engine's
    dispose: before the fix, a load during another thread's ``dispose()`` added the
    ``engine_disposed`` listener while that dispose ran them, and the dispose raised."""
    _, factory = installed

    def first_load() -> None:
        with factory() as session:
            assert session.get(ElItem, 1).name == "one"  # type: ignore[union-attr]

    _during_a_dispose(engine, first_load)


def test_raw_sql_through_a_session_invalidates_on_an_engine_nobody_else_listens_to(
    installed: tuple[WriteThroughCache, sessionmaker[Session]],
) -> None:
    """The cache's statement tracking reaches an engine that has no listener of anyone's:
    the listener on the ``Engine`` class runs for an engine only once a cache watches it (the
    others skip SQLAlchemy's event dispatch), so the watch must turn it on; else raw SQL
    through a session changes a cached row unseen, and the next get serves the old entry."""
    _, factory = installed
    with factory() as session:  # fills the entry
        assert session.get(ElItem, 1).name == "one"  # type: ignore[union-attr]
    with factory() as session:
        session.execute(sa.text("UPDATE el_item SET name = 'raw' WHERE id = 1"))
        session.commit()
    with factory() as session:
        assert session.get(ElItem, 1).name == "raw"  # type: ignore[union-attr]
