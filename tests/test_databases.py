"""Two databases never share an entry (invariant 10): the key names the database a row came from.

On two real PostgreSQL databases (one per tenant) and, for sharding, PostgreSQL and MariaDB:

* one sessionmaker, ``Session(bind=tenant_a)`` / ``Session(bind=tenant_b)``: B is never served
  A's row (by a get, a fill or a batch read); each tenant's commit publishes only its own
  entry, each rollback (or savepoint rollback) touches only its own; ``binds={Model: engine}``
  per sessionmaker, lazy loads included;
* statements (bulk UPDATE by key, range UPDATE, raw SQL) on one tenant leave the other's
  entries served;
* ``cache.invalidate()`` with ``bind=`` forgets one database's entries, without it every
  database's (also those only another process used, from the keyspace registry);
* horizontal sharding (``ShardedSession``): gets, lazy loads and commits are cached per shard;
* how a database is named: backend, host, port, database, never the driver or the password; a
  SQLite file by its path; in-memory SQLite never shared; ``writethrough_database`` names it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache
from sqlalchemy_writethrough.databases import Databases, describe

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema, run_database


class TnBase(DeclarativeBase):
    pass


class TnAccount(TnBase, CachedModel):
    __tablename__ = "tn_account"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(String(10), default="pg")
    name: Mapped[str] = mapped_column(String(40))
    balance: Mapped[int] = mapped_column(default=0)


class TnNote(TnBase, CachedModel):
    __tablename__ = "tn_note"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("tn_account.id"))
    body: Mapped[str] = mapped_column(String(40))
    account: Mapped[TnAccount] = relationship()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tenant_b_url(postgresql_url: str) -> Iterator[str]:
    """A second PostgreSQL database on the same server: another tenant."""
    with run_database(postgresql_url, "postgresql (tenant B)") as url:
        yield url


@pytest.fixture
def tenant_a(postgresql_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(postgresql_url)
    reset_schema(engine, TnBase.metadata)
    yield engine
    engine.dispose()


@pytest.fixture
def tenant_b(tenant_b_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(tenant_b_url)
    reset_schema(engine, TnBase.metadata)
    yield engine
    engine.dispose()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cache(client: redis.Redis, prefix: str) -> WriteThroughCache:
    return WriteThroughCache(client, prefix=prefix)


@pytest.fixture
def maker(cache: WriteThroughCache) -> sessionmaker[Session]:
    """One sessionmaker for every tenant; each session names its tenant's engine."""
    factory = sessionmaker()
    cache.install(factory)
    return factory


def add_account(maker: sessionmaker[Session], bind: Engine, name: str, pk: int = 1) -> None:
    with maker(bind=bind) as s:
        s.add(TnAccount(id=pk, name=name))
        s.commit()


def served(maker: sessionmaker[Session], bind: Engine, pk: int = 1) -> tuple[Any, list[str]]:
    """(name and balance ``session.get`` returns, or None; the SQL it sent)."""
    with maker(bind=bind) as s, capture_sql(bind) as sql:
        account = s.get(TnAccount, pk)
        found = None if account is None else (account.name, account.balance)
    return found, sql


def state(cache: WriteThroughCache, client: redis.Redis, bind: Any, pk: int = 1) -> str | None:
    return entry_state(client, entry_key(cache, TnAccount, pk, bind=bind))


# --------------------------------------------------------------------------- tenants


def test_tenant_b_is_never_served_tenant_a_row(
    maker: sessionmaker[Session], tenant_a: Engine, tenant_b: Engine
) -> None:
    """The issue's reproduction: A's committed row is cached; B, which has no such row, asks
    its own database and finds none. Once both have a row 1, each is served its own."""
    add_account(maker, tenant_a, "alice (A)")
    assert served(maker, tenant_a) == (("alice (A)", 0), [])
    found, sql = served(maker, tenant_b)
    assert found is None
    assert len(sql) == 1  # B's own database answered

    add_account(maker, tenant_b, "bob (B)")
    assert served(maker, tenant_a) == (("alice (A)", 0), [])
    assert served(maker, tenant_b) == (("bob (B)", 0), [])


def test_a_fill_serves_only_its_own_database(
    maker: sessionmaker[Session], tenant_a: Engine, tenant_b: Engine, cache: WriteThroughCache
) -> None:
    """Rows written outside the cache, then filled by a read: each fill lands in its own
    database's entry."""
    for engine, name in ((tenant_a, "alice (A)"), (tenant_b, "bob (B)")):
        with Session(engine) as s:
            s.add(TnAccount(id=1, name=name))
            s.commit()
    assert served(maker, tenant_a)[0] == ("alice (A)", 0)  # a miss, filled
    assert served(maker, tenant_b)[0] == ("bob (B)", 0)  # a miss too, not A's fill
    assert served(maker, tenant_a) == (("alice (A)", 0), [])
    assert served(maker, tenant_b) == (("bob (B)", 0), [])
    assert cache.stats().fills == 2


def test_commit_and_rollback_touch_only_their_own_tenant(
    maker: sessionmaker[Session],
    tenant_a: Engine,
    tenant_b: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
) -> None:
    add_account(maker, tenant_a, "alice (A)")
    add_account(maker, tenant_b, "bob (B)")

    with maker(bind=tenant_a) as s:
        account = s.get(TnAccount, 1)
        assert account is not None
        account.balance = 10
        s.commit()
    assert served(maker, tenant_a) == (("alice (A)", 10), [])
    assert served(maker, tenant_b) == (("bob (B)", 0), [])

    with maker(bind=tenant_b) as s:
        account = s.get(TnAccount, 1)
        assert account is not None
        account.balance = 99
        s.flush()
        assert state(cache, client, tenant_b) == "lock"
        assert state(cache, client, tenant_a) == "value"
        assert served(maker, tenant_a) == (("alice (A)", 10), [])  # A's entry is not locked
        s.rollback()
    assert state(cache, client, tenant_b) == "value"  # restored
    assert served(maker, tenant_b) == (("bob (B)", 0), [])
    assert served(maker, tenant_a) == (("alice (A)", 10), [])


def test_a_savepoint_rolled_back_on_one_tenant_leaves_the_other_served(
    maker: sessionmaker[Session],
    tenant_a: Engine,
    tenant_b: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
) -> None:
    add_account(maker, tenant_a, "alice (A)")
    add_account(maker, tenant_b, "bob (B)")
    with maker(bind=tenant_b) as s:
        account = s.get(TnAccount, 1)
        assert account is not None
        with s.begin_nested() as savepoint:
            account.balance = 99
            s.flush()
            savepoint.rollback()
        s.commit()
    assert state(cache, client, tenant_b) is None  # a rolled-back savepoint leaves a miss
    assert served(maker, tenant_b)[0] == ("bob (B)", 0)
    assert served(maker, tenant_a) == (("alice (A)", 0), [])


def test_a_batch_read_serves_each_tenant_its_own_rows(
    maker: sessionmaker[Session], tenant_a: Engine, tenant_b: Engine
) -> None:
    """``select(M).where(M.id.in_(...)).options(from_cache())``: A has rows 1 and 2 cached, B
    only row 1; B's batch read is served B's row 1 and finds no row 2."""
    add_account(maker, tenant_a, "alice (A)")
    add_account(maker, tenant_a, "carol (A)", pk=2)
    add_account(maker, tenant_b, "bob (B)")
    stmt = select(TnAccount).where(TnAccount.id.in_([1, 2])).options(from_cache())
    with maker(bind=tenant_a) as s, capture_sql(tenant_a) as sql:
        assert [a.name for a in s.scalars(stmt)] == ["alice (A)", "carol (A)"]
    assert sql == []
    for _ in range(2):  # the miss, then its row 1 from the cache
        with maker(bind=tenant_b) as s:
            assert [a.name for a in s.scalars(stmt)] == ["bob (B)"]
    with maker(bind=tenant_b) as s, capture_sql(tenant_b) as sql:
        assert s.get(TnAccount, 1) is not None
    assert sql == []


def test_binds_per_model_and_lazy_loads(
    cache: WriteThroughCache, tenant_a: Engine, tenant_b: Engine
) -> None:
    """``sessionmaker(binds={Model: engine})``, one per tenant: a many-to-one lazy load is
    served from the entry of the database its parent came from."""
    makers = {}
    for engine, tenant in ((tenant_a, "A"), (tenant_b, "B")):
        makers[tenant] = sessionmaker(binds={TnAccount: engine, TnNote: engine})
        cache.install(makers[tenant])
        with makers[tenant]() as s:
            s.add(TnAccount(id=1, name=f"account {tenant}"))
            s.add(TnNote(id=1, account_id=1, body=f"note {tenant}"))
            s.commit()
    for tenant in makers:
        with makers[tenant]() as s, capture_sql(tenant_a) as sql_a, capture_sql(tenant_b) as sql_b:
            note = s.get(TnNote, 1)
            assert note is not None and note.body == f"note {tenant}"
            assert note.account.name == f"account {tenant}"
        assert sql_a == sql_b == []


def test_a_model_bound_to_an_outer_transaction_is_never_published(
    cache: WriteThroughCache,
    maker: sessionmaker[Session],
    client: redis.Redis,
    tenant_a: Engine,
    tenant_b: Engine,
) -> None:
    """``binds={TnNote: engine, TnAccount: connection}``, the connection already in a
    transaction: the session's commit does not COMMIT it, so the account it wrote must not be
    published, even when the flush's first row is a note (on an engine that does COMMIT);
    once the outer transaction rolls back, the account is gone."""
    with tenant_a.begin() as conn:  # the note's account, on the note's database
        conn.execute(TnAccount.__table__.insert().values(id=1, name="a", region="pg"))
    with tenant_b.connect() as outer:
        outer.begin()
        joined = sessionmaker(binds={TnNote: tenant_a, TnAccount: outer})
        cache.install(joined)
        with joined() as s:
            s.add(TnNote(id=1, account_id=1, body="committed"))  # the flush's first row
            s.add(TnAccount(id=1, name="uncommitted"))
            s.commit()
        assert state(cache, client, outer.engine) != "value"
        outer.rollback()
    assert served(maker, tenant_b)[0] is None


@pytest.mark.parametrize(
    "statement",
    [
        update(TnAccount).where(TnAccount.id == 1).values(balance=5),
        update(TnAccount).where(TnAccount.balance == 0).values(balance=5),
        text("UPDATE tn_account SET balance = 5"),
    ],
    ids=["by key", "range", "raw SQL"],
)
def test_a_statement_on_one_tenant_leaves_the_other_served(
    maker: sessionmaker[Session], tenant_a: Engine, tenant_b: Engine, statement: Any
) -> None:
    add_account(maker, tenant_a, "alice (A)")
    add_account(maker, tenant_b, "bob (B)")
    with maker(bind=tenant_a) as s:
        s.execute(statement)
        s.commit()
    found, sql = served(maker, tenant_a)
    assert found == ("alice (A)", 5) and len(sql) == 1  # A's entry is gone: a fresh load
    assert served(maker, tenant_b) == (("bob (B)", 0), [])

    with maker(bind=tenant_b) as s:  # and the other way round, rolled back
        s.execute(statement)
        s.rollback()
    assert served(maker, tenant_a) == (("alice (A)", 5), [])
    assert served(maker, tenant_b)[0] == ("bob (B)", 0)


def test_invalidate_with_and_without_a_bind(
    maker: sessionmaker[Session],
    tenant_a: Engine,
    tenant_b: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    prefix: str,
) -> None:
    add_account(maker, tenant_a, "alice (A)")
    add_account(maker, tenant_b, "bob (B)")
    warm = (("alice (A)", 0), []), (("bob (B)", 0), [])

    def hits() -> tuple[bool, bool]:
        a, b = served(maker, tenant_a), served(maker, tenant_b)
        return a[1] == [], b[1] == []

    assert cache.invalidate(TnAccount, 1, bind=tenant_a)
    assert hits() == (False, True)  # (the miss refilled A)
    assert cache.invalidate(TnAccount, bind=tenant_b)
    assert hits() == (True, False)
    assert (served(maker, tenant_a), served(maker, tenant_b)) == warm

    assert cache.invalidate(TnAccount, 1)  # every database
    assert hits() == (False, False)
    assert cache.invalidate(TnAccount)
    assert hits() == (False, False)

    # another process, which never used either database, finds them in the registry
    other = WriteThroughCache(client, prefix=prefix)
    assert other.invalidate(TnAccount, 1)
    assert state(cache, client, tenant_a) is None and state(cache, client, tenant_b) is None
    assert hits() == (False, False)
    assert other.invalidate(TnAccount)
    assert hits() == (False, False)


# ---------------------------------------------------------------------------- shards


@pytest.fixture
def shards(postgresql_url: str, mariadb_url: str) -> Iterator[dict[str, Engine]]:
    engines = {"pg": sa.create_engine(postgresql_url), "maria": sa.create_engine(mariadb_url)}
    for engine in engines.values():
        reset_schema(engine, TnBase.metadata)
    yield engines
    for engine in engines.values():
        engine.dispose()


def sharded_maker(engines: dict[str, Engine]) -> sessionmaker[ShardedSession]:
    def shard_chooser(mapper: Any, instance: Any, **kw: Any) -> str:
        if isinstance(instance, TnAccount):
            return instance.region
        if isinstance(instance, TnNote):
            return "pg" if instance.body.startswith("pg") else "maria"
        return "pg"

    def identity_chooser(*args: Any, **kw: Any) -> list[str]:
        return list(engines)

    def execute_chooser(context: Any) -> list[str]:
        if context.lazy_loaded_from is not None:
            return [context.lazy_loaded_from.identity_token]
        return list(engines)

    return sessionmaker(
        class_=ShardedSession,
        shards=engines,
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
    )


def test_sharded_gets_lazy_loads_and_commits_are_cached_per_shard(
    shards: dict[str, Engine], cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Row 1 exists on both shards with different values: a get with an identity token, and
    a lazy load from a row of that shard, are served from that shard's entry with no SQL; a
    commit on one shard publishes only its entry."""
    maker = sharded_maker(shards)
    cache.install(maker)
    with maker() as s:
        for shard in shards:
            s.add(TnAccount(id=1, region=shard, name=f"{shard} account"))
            s.add(TnNote(id=1, account_id=1, body=f"{shard} note"))
        s.commit()
    for engine in shards.values():
        assert state(cache, client, engine) == "value"

    @contextlib.contextmanager
    def all_sql() -> Iterator[list[str]]:
        with capture_sql(shards["pg"]) as pg, capture_sql(shards["maria"]) as maria:
            statements: list[str] = []
            yield statements
            statements += pg + maria

    for shard in shards:
        with maker() as s, all_sql() as sql:
            account = s.get(TnAccount, 1, identity_token=shard)
            assert account is not None and account.name == f"{shard} account"
            assert sa.inspect(account).identity_token == shard
            note = s.get(TnNote, 1, identity_token=shard)
            assert note is not None and note.account is account
        assert sql == []
    for shard in shards:  # the lazy load itself, with no account in the identity map
        with maker() as s, all_sql() as sql:
            note = s.get(TnNote, 1, identity_token=shard)
            assert note is not None and not s.identity_map.keys() - {sa.inspect(note).key}
            assert note.account.name == f"{shard} account"
            assert sa.inspect(note.account).identity_token == shard
        assert sql == []

    with maker() as s:
        account = s.get(TnAccount, 1, identity_token="maria")
        assert account is not None
        account.balance = 42
        s.commit()
    with maker() as s, all_sql() as sql:
        maria = s.get(TnAccount, 1, identity_token="maria")
        pg = s.get(TnAccount, 1, identity_token="pg")
        assert maria is not None and pg is not None
        assert (maria.balance, pg.balance) == (42, 0)
    assert sql == []

    with maker() as s:  # no token: the session asks every shard, as without the cache
        rows = s.scalars(select(TnAccount).where(TnAccount.id == 1)).all()
        assert sorted(a.name for a in rows) == ["maria account", "pg account"]


def test_one_flush_of_one_class_on_two_shards_publishes_each_shard_its_own_row(
    shards: dict[str, Engine], cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Rows of one class written to two shards in one flush (an update of each and an insert
    of each): each shard's entries hold that shard's rows, never the other's (the commit path
    looks a class's bind up once per flush only where it cannot depend on the row)."""
    maker = sharded_maker(shards)
    cache.install(maker)
    with maker() as s:
        s.add_all([TnAccount(id=1, region=shard, name=f"{shard} 1") for shard in shards])
        s.commit()
    with maker() as s:
        for shard in shards:
            account = s.get(TnAccount, 1, identity_token=shard)
            assert account is not None
            account.balance = len(shard)
            s.add(TnAccount(id=2, region=shard, name=f"{shard} 2", balance=-len(shard)))
        s.commit()
    for shard, engine in shards.items():
        for pk in (1, 2):
            published = state(cache, client, engine, pk)
            assert published in ("value", None)
            with maker() as s, capture_sql(engine) as sql:
                got = s.get(TnAccount, pk, identity_token=shard)
                assert got is not None
                assert (got.name, got.balance) == (f"{shard} {pk}", len(shard) * (-1) ** (pk + 1))
            assert (sql == []) == (published == "value")


def test_a_shard_chooser_is_asked_only_what_the_flush_asks_it(
    shards: dict[str, Engine], cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A ``shard_chooser`` written for the flush alone (it reads the row, and takes no
    ``clause``, as in SQLAlchemy's own tests) is never called by the cache with no row: the
    flushes that insert, update and delete on both shards run as without the cache, and
    their rows are published per shard."""
    asked: list[Any] = []

    def shard_chooser(mapper: Any, instance: Any) -> str:
        asked.append(instance)
        return str(instance.region)  # AttributeError on None, as a user's chooser would

    maker = sessionmaker(
        class_=ShardedSession,
        shards=shards,
        shard_chooser=shard_chooser,
        identity_chooser=lambda *args, **kw: list(shards),
        execute_chooser=lambda context: list(shards),
    )
    cache.install(maker)
    with maker() as s:
        s.add_all([TnAccount(id=pk, region=r, name=f"{r} {pk}") for r in shards for pk in (1, 2)])
        s.commit()
    with maker() as s:
        for shard in shards:
            account = s.get(TnAccount, 1, identity_token=shard)
            assert account is not None
            account.balance = len(shard)
            s.delete(s.get(TnAccount, 2, identity_token=shard))
        s.commit()
    assert None not in asked and len(asked) == 4  # the four inserts, as without the cache
    for shard, engine in shards.items():
        assert (state(cache, client, engine, 1), state(cache, client, engine, 2)) == ("value", None)
        with maker() as s, capture_sql(engine) as sql:
            got = s.get(TnAccount, 1, identity_token=shard)
            assert got is not None and (got.name, got.balance) == (f"{shard} 1", len(shard))
            assert s.get(TnAccount, 2, identity_token=shard) is None
        assert len(sql) == 1  # the deleted row only: row 1 came from Redis


def test_a_shard_on_an_outer_transaction_keeps_the_sharded_session_from_publishing(
    shards: dict[str, Engine], cache: WriteThroughCache, client: redis.Redis
) -> None:
    """One shard bound to a connection already in a transaction (the test recipe): whichever
    shard a flush writes first, the session's commit does not COMMIT that shard, so its row
    is never published (guarantee 1); once the outer transaction rolls back, it is gone."""
    with shards["maria"].connect() as outer:
        outer.begin()
        maker = sessionmaker(
            class_=ShardedSession,
            shards={"pg": shards["pg"], "maria": outer},
            # with no row, "pg": a flush's first look at its binds saw pg's engine only
            shard_chooser=lambda mapper, instance, **kw: instance.region if instance else "pg",
            identity_chooser=lambda *args, **kw: list(shards),
            execute_chooser=lambda context: list(shards),
        )
        cache.install(maker)
        with maker() as s:
            s.add_all([TnAccount(id=1, region=r, name=f"{r} 1") for r in ("pg", "maria")])
            s.commit()
        assert state(cache, client, outer.engine) != "value"  # maria's row is uncommitted
        outer.rollback()
    reader = sharded_maker(shards)
    cache.install(reader)
    with reader() as s:  # the outer transaction's row is gone; pg's was committed
        assert s.get(TnAccount, 1, identity_token="maria") is None
        assert s.get(TnAccount, 1, identity_token="pg") is not None


# ------------------------------------------------------------------- naming a database


def test_a_database_is_named_by_backend_host_port_and_name() -> None:
    psycopg = describe(make_url("postgresql+psycopg://app:secret@DB.example/shop"), {})
    assert psycopg == describe(make_url("postgresql+asyncpg://admin@db.example:5432/shop"), {})
    assert "secret" not in psycopg and "app" not in psycopg
    assert psycopg != describe(make_url("postgresql://db.example:5433/shop"), {})
    assert psycopg != describe(make_url("postgresql://db.example/other"), {})
    assert psycopg != describe(make_url("postgresql://replica.example/shop"), {})
    assert describe(make_url("mariadb+pymysql://root@h/db"), {}) == describe(
        make_url("mysql+mysqldb://u@h:3306/db"), {}
    )
    translated = describe(make_url("postgresql://h/db"), {"schema_translate_map": {None: "t1"}})
    assert translated != describe(make_url("postgresql://h/db"), {})
    named = {"writethrough_database": "shop"}
    assert describe(make_url("postgresql://h/db"), named) == describe(
        make_url("postgresql://pgbouncer:6432/db"), named
    )


def test_sqlite_files_by_path_and_memory_never_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    databases = Databases()
    monkeypatch.chdir(tmp_path)
    relative = sa.create_engine("sqlite:///app.db")
    absolute = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    assert databases.of(relative) == databases.of(absolute) != databases.of(other)
    memory, memory2 = sa.create_engine("sqlite://"), sa.create_engine("sqlite://")
    assert databases.of(memory) != databases.of(memory2)
    assert databases.of(memory.execution_options(isolation_level="AUTOCOMMIT")) == databases.of(
        memory
    )
    assert Databases().of(memory) != databases.of(memory)  # (a process of its own)
    for engine in (relative, absolute, other, memory, memory2):
        engine.dispose()


def test_one_database_reached_by_two_urls_shares_its_entries(
    cache: WriteThroughCache, maker: sessionmaker[Session], postgresql_url: str
) -> None:
    """``localhost`` in one process, an IP address in another (or a pooler's port): the server
    names the database, so a commit through one URL updates what the other is served."""
    url = make_url(postgresql_url)
    other_url = url.set(host="localhost" if url.host != "localhost" else "127.0.0.1")
    direct, aliased = sa.create_engine(url), sa.create_engine(other_url)
    try:
        reset_schema(direct, TnBase.metadata)
        assert cache._databases.of(direct) == cache._databases.of(aliased)
        assert cache._databases.identity(direct).startswith("postgresql:server=")
        add_account(maker, direct, "alice")
        assert served(maker, aliased) == (("alice", 0), [])
        with maker(bind=aliased) as s:
            account = s.get(TnAccount, 1)
            assert account is not None
            account.balance = 7
            s.commit()
        assert served(maker, direct) == (("alice", 7), [])
    finally:
        direct.dispose()
        aliased.dispose()


def test_mariadb_is_named_by_its_server_too(cache: WriteThroughCache, mariadb_url: str) -> None:
    url = make_url(mariadb_url)
    other_url = url.set(host="localhost" if url.host != "localhost" else "127.0.0.1")
    one, two = sa.create_engine(url), sa.create_engine(other_url)
    other_db = sa.create_engine(url.set(database="information_schema"))
    try:
        assert cache._databases.of(one) == cache._databases.of(two)
        assert cache._databases.of(one) != cache._databases.of(other_db)
    finally:
        for engine in (one, two, other_db):
            engine.dispose()


def test_asking_the_server_uses_none_of_the_applications_connections(
    cache: WriteThroughCache, postgresql_url: str
) -> None:
    """A pool of one, held by the application: the question goes on a connection of its own
    and sends nothing through the engine (no statement an application could see)."""
    engine = sa.create_engine(postgresql_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        with engine.connect() as held, capture_sql(engine) as sql:
            assert held.exec_driver_sql("SELECT 1").scalar() == 1
            cache._databases.of(engine)  # would time out if it waited for the pool
        assert sql == ["SELECT 1"]
    finally:
        engine.dispose()


def test_names_given_explicitly_win(
    cache: WriteThroughCache, maker: sessionmaker[Session], postgresql_url: str
) -> None:
    """Two URLs named alike by the engine option are one database to the cache."""
    url = make_url(postgresql_url)
    named = {"writethrough_database": "tenant-a"}
    direct = sa.create_engine(url, execution_options=named)
    aliased = sa.create_engine(url.set(host="localhost"), execution_options=named)
    try:
        reset_schema(direct, TnBase.metadata)
        assert cache._databases.identity(direct) == "named:tenant-a"
        assert cache._databases.of(direct) == cache._databases.of(aliased)
        add_account(maker, direct, "alice")
        assert served(maker, aliased) == (("alice", 0), [])
    finally:
        direct.dispose()
        aliased.dispose()


def test_invalidate_everywhere_says_so_when_the_registry_cannot_be_read() -> None:
    """Without ``bind``, the databases of other processes come from the registry: a process
    that cannot read it has not invalidated them, and says so."""
    cache = WriteThroughCache("redis://127.0.0.1:1/0", prefix="unreachable")
    assert cache.invalidate(TnAccount, 1) is False
    assert cache.invalidate(TnAccount) is False
