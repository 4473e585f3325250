"""Legacy ``Query`` (and ``select()``) return the same thing with the extension as without it.

Each program below runs twice on the same database: in a session with the cache installed and
in a plain one. What it returns (entities, rows, mappings, scalars, with their types) or raises
must be the same; with the cache, the row comes from Redis or from the identity map.

The rule (docs/usage.md "What is served from the cache"): a legacy ``Query`` is served from
Redis exactly when the equivalent ``select()`` would be, that is only with
``.options(from_cache())``; ``Query.get()`` is ``session.get()`` and is served by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import ForeignKey, String, select, update
from sqlalchemy.engine import Engine, Row, RowMapping
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Query,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
    with_parent,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _servers import capture_sql, reset_schema

pytestmark = [
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning"),
    pytest.mark.filterwarnings("ignore:The Result.tuples:DeprecationWarning"),  # 2.1
]


class Base(DeclarativeBase):
    pass


class LqPref(Base, CachedModel):
    __tablename__ = "lq_pref"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    theme: Mapped[str] = mapped_column(String(20))


class LqUser(Base, CachedModel):
    __tablename__ = "lq_user"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    pref_id: Mapped[int] = mapped_column(ForeignKey("lq_pref.id"))
    pref: Mapped[LqPref] = relationship()


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield WriteThroughCache(client, prefix=prefix)
    finally:
        client.close()


@pytest.fixture
def cached(db: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    """Sessions with the cache; two users and their prefs are committed (and so in Redis)."""
    maker = sessionmaker(db)
    cache.install(maker)
    with maker() as s:
        s.add_all(
            [
                LqUser(id=1, name="ann", pref=LqPref(id=1, theme="dark")),
                LqUser(id=2, name="bob", pref=LqPref(id=2, theme="light")),
            ]
        )
        s.commit()
    return maker


@pytest.fixture
def plain(db: Engine) -> sessionmaker[Session]:
    return sessionmaker(db)


def describe(value: Any) -> Any:
    """What a caller can observe of a returned value, comparable across two sessions."""
    if isinstance(value, (LqUser, LqPref)):
        return (type(value).__name__, value.id)
    if isinstance(value, RowMapping):
        return ("RowMapping", {key: describe(v) for key, v in value.items()})
    if isinstance(value, Row):
        return ("Row", tuple(describe(v) for v in value), tuple(value._fields))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [describe(v) for v in value])
    return (type(value).__name__, value)


def outcome(program: Callable[[Session], Any], session: Session) -> Any:
    try:
        return describe(program(session))
    except Exception as exc:  # the exception a caller sees is part of the outcome
        return ("raises", type(exc).__name__)


def users(s: Session, cached: bool) -> Query[LqUser]:
    q = s.query(LqUser)
    return q.options(from_cache()) if cached else q


QUERY_PROGRAMS: dict[str, Callable[[Session, bool], Any]] = {
    "all": lambda s, fc: users(s, fc).filter(LqUser.id == 1).all(),
    "filter_by.all": lambda s, fc: users(s, fc).filter_by(id=1).all(),
    "first": lambda s, fc: users(s, fc).filter(LqUser.id == 1).first(),
    "one": lambda s, fc: users(s, fc).filter(LqUser.id == 1).one(),
    "one_or_none": lambda s, fc: users(s, fc).filter(LqUser.id == 1).one_or_none(),
    "scalar": lambda s, fc: users(s, fc).filter(LqUser.id == 1).scalar(),
    "iteration": lambda s, fc: list(users(s, fc).filter(LqUser.id == 1)),
    "get": lambda s, fc: users(s, fc).get(1),
    "get.missing": lambda s, fc: users(s, fc).get(99),
    "one.missing": lambda s, fc: users(s, fc).filter(LqUser.id == 99).one(),
    "one_or_none.missing": lambda s, fc: users(s, fc).filter(LqUser.id == 99).one_or_none(),
    "scalar.missing": lambda s, fc: users(s, fc).filter(LqUser.id == 99).scalar(),
    # without ORDER BY the rows come in any order, from the database as from Redis
    "in.all": lambda s, fc: sorted(
        users(s, fc).filter(LqUser.id.in_([2, 1])).all(), key=lambda u: u.id
    ),
    "in.one": lambda s, fc: users(s, fc).filter(LqUser.id.in_([1, 2])).one(),
    "in.scalar": lambda s, fc: users(s, fc).filter(LqUser.id.in_([1, 2])).scalar(),
    "only_return_tuples": lambda s, fc: (
        users(s, fc).filter(LqUser.id == 1).only_return_tuples(True).all()
    ),
    "with_parent": lambda s, fc: (
        (s.query(LqPref).options(from_cache()) if fc else s.query(LqPref))
        .filter(with_parent(s.get_one(LqUser, 1), LqUser.pref))
        .all()
    ),
}


def user_select(fc: bool) -> Any:
    stmt = select(LqUser).where(LqUser.id == 1)
    return stmt.options(from_cache()) if fc else stmt


SELECT_PROGRAMS: dict[str, Callable[[Session, bool], Any]] = {
    "execute.all": lambda s, fc: s.execute(user_select(fc)).all(),
    "execute.one": lambda s, fc: s.execute(user_select(fc)).one(),
    "execute.first": lambda s, fc: s.execute(user_select(fc)).first(),
    "scalars.all": lambda s, fc: s.execute(user_select(fc)).scalars().all(),
    "unique.scalars": lambda s, fc: s.execute(user_select(fc)).unique().scalars().all(),
    "tuples": lambda s, fc: s.execute(user_select(fc)).tuples().all(),
    "mappings": lambda s, fc: s.execute(user_select(fc)).mappings().all(),
    "scalar_one": lambda s, fc: s.execute(user_select(fc)).scalar_one(),
    "session.scalars": lambda s, fc: s.scalars(user_select(fc)).all(),
    "session.scalar": lambda s, fc: s.scalar(user_select(fc)),
    "iteration": lambda s, fc: list(s.execute(user_select(fc))),
}


def compare(
    cached: sessionmaker[Session],
    plain: sessionmaker[Session],
    program: Callable[[Session], Any],
    warm: bool,
) -> tuple[Any, Any]:
    """The outcome of ``program`` with the cache and without; ``warm`` loads user 1 and pref 1
    into the session first, so the identity map answers instead of Redis."""
    results = []
    for maker in (cached, plain):
        with maker() as s:
            if warm:
                s.get_one(LqUser, 1).pref  # noqa: B018 - loads the pref too
            results.append(outcome(program, s))
    return results[0], results[1]


@pytest.mark.parametrize("warm", [False, True], ids=["redis", "identity-map"])
@pytest.mark.parametrize("with_from_cache", [False, True], ids=["plain", "from_cache"])
@pytest.mark.parametrize("name", list(QUERY_PROGRAMS))
def test_legacy_query_returns_what_it_returns_without_the_extension(
    cached: sessionmaker[Session],
    plain: sessionmaker[Session],
    name: str,
    with_from_cache: bool,
    warm: bool,
) -> None:
    program = QUERY_PROGRAMS[name]
    with_cache, without = compare(cached, plain, lambda s: program(s, with_from_cache), warm)
    assert with_cache == without


@pytest.mark.parametrize("warm", [False, True], ids=["redis", "identity-map"])
@pytest.mark.parametrize("with_from_cache", [False, True], ids=["plain", "from_cache"])
@pytest.mark.parametrize("name", list(SELECT_PROGRAMS))
def test_select_returns_what_it_returns_without_the_extension(
    cached: sessionmaker[Session],
    plain: sessionmaker[Session],
    name: str,
    with_from_cache: bool,
    warm: bool,
) -> None:
    program = SELECT_PROGRAMS[name]
    with_cache, without = compare(cached, plain, lambda s: program(s, with_from_cache), warm)
    assert with_cache == without


def test_outcomes_are_entities_and_exceptions_as_documented(
    cached: sessionmaker[Session],
) -> None:
    """The comparison above is not vacuous: with the cache, the entities are entities."""
    with cached() as s:
        assert describe(QUERY_PROGRAMS["all"](s, True)) == ("list", [("LqUser", 1)])
        assert outcome(lambda s: QUERY_PROGRAMS["one.missing"](s, True), s) == (
            "raises",
            "NoResultFound",
        )
        assert outcome(lambda s: QUERY_PROGRAMS["in.one"](s, True), s) == (
            "raises",
            "MultipleResultsFound",
        )
        assert describe(QUERY_PROGRAMS["with_parent"](s, True)) == ("list", [("LqPref", 1)])


def make_stale(db: Engine) -> None:
    """User 1 is "ann" in Redis but "db" in the database: a load served from Redis says so."""
    with db.begin() as conn:
        conn.execute(update(LqUser).where(LqUser.id == 1).values(name="db"))


@pytest.mark.parametrize(
    ("load", "served"),
    [
        (lambda s: s.query(LqUser).filter(LqUser.id == 1).one(), False),
        (lambda s: s.query(LqUser).filter_by(id=1).all()[0], False),
        (lambda s: s.query(LqUser).filter(LqUser.id == 1).first(), False),
        (lambda s: s.query(LqUser).filter(LqUser.id == 1).options(from_cache()).one(), True),
        (lambda s: s.query(LqUser).filter(LqUser.id.in_([1])).options(from_cache()).one(), True),
        # first() adds LIMIT 1, which select() with from_cache() sends to the database too
        (lambda s: s.query(LqUser).filter(LqUser.id == 1).options(from_cache()).first(), False),
        (lambda s: s.query(LqUser).get(1), True),
        (lambda s: s.get(LqUser, 1), True),
        (lambda s: s.execute(select(LqUser).where(LqUser.id == 1)).scalar_one(), False),
        (
            lambda s: s.execute(
                select(LqUser).where(LqUser.id == 1).options(from_cache())
            ).scalar_one(),
            True,
        ),
    ],
    ids=[
        "query.filter.one",
        "query.filter_by.all",
        "query.first",
        "query.from_cache.one",
        "query.from_cache.in",
        "query.from_cache.first",
        "query.get",
        "session.get",
        "select",
        "select.from_cache",
    ],
)
def test_legacy_query_is_served_from_redis_exactly_when_select_would_be(
    cached: sessionmaker[Session], db: Engine, load: Callable[[Session], LqUser], served: bool
) -> None:
    make_stale(db)
    with cached() as s, capture_sql(db) as sql:
        user = load(s)
        assert user.name == ("ann" if served else "db")
    assert (sql == []) is served
