"""The pytest plugin, as a user's suite sees it: installed with the package, its fixtures give
each test a Redis namespace of its own and a cache on it, and its assertions fail with a
message saying what reached the database."""

from __future__ import annotations

import pytest

USER_SUITE = """
import pytest
import redis
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel
from sqlalchemy_writethrough.testing import assert_no_sql, assert_served_from_cache


class Base(DeclarativeBase):
    pass


class Product(Base, CachedModel):
    __tablename__ = "product"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def app(tmp_path, writethrough_cache):
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Product(id=1, name="one"))
        s.commit()
    factory = sessionmaker(engine)
    cache = writethrough_cache(factory)
    yield factory, cache, engine
    engine.dispose()


PREFIXES = []


@pytest.mark.parametrize("run", [1, 2])
def test_own_namespace(writethrough_prefix, writethrough_redis_url, run):
    PREFIXES.append(writethrough_prefix)
    assert len(set(PREFIXES)) == len(PREFIXES)
    client = redis.Redis.from_url(writethrough_redis_url)
    assert list(client.scan_iter(match=f"{writethrough_prefix}:*")) == []
    client.close()


def test_served_from_cache(app):
    factory, cache, engine = app
    with factory() as s:
        s.get(Product, 1)  # a miss fills the entry
    with factory() as s:
        with assert_served_from_cache(cache, hits=1), assert_no_sql(engine):
            assert s.get(Product, 1).name == "one"


def test_a_miss_fails_the_assertion(app):
    factory, cache, engine = app
    with factory() as s:
        with assert_served_from_cache(cache):
            s.get(Product, 1)


def test_sql_fails_the_assertion(app):
    factory, cache, engine = app
    with factory() as s:
        with assert_no_sql(s):
            s.get(Product, 1)


SHARED = sessionmaker()  # a module's factory, a cache installed on it per test
DEPTHS = []


@pytest.mark.parametrize("run", [1, 2, 3])
def test_a_shared_factory_keeps_its_class(writethrough_cache, run):
    writethrough_cache(SHARED)
    DEPTHS.append(len(SHARED.class_.__mro__))
    assert len(set(DEPTHS)) == 1  # each install derives from the class the factory had
"""


def test_a_users_suite_gets_fixtures_and_assertions(
    pytester: pytest.Pytester, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*not served from the cache: 1 load(s) missed the cache*",
            "*1 SQL statement(s) were sent:*",
        ]
    )


ASYNC_USER_SUITE = """
import asyncio

import pytest
from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_writethrough import CachedModel
from sqlalchemy_writethrough.testing import assert_served_from_cache


class Base(DeclarativeBase):
    pass


class Product(Base, CachedModel):
    __tablename__ = "product"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


async def served(tmp_path, writethrough_cache):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    cache = writethrough_cache(factory)
    async with factory() as s:
        s.add(Product(id=1, name="one"))
        await s.commit()
    async with factory() as s:
        with assert_served_from_cache(cache, hits=1):
            assert (await s.get(Product, 1)).name == "one"
    await engine.dispose()
"""

#: each test runs its own loop, closed when it returns
RUN_PER_TEST = """

@pytest.mark.parametrize("run", [1, 2, 3])
def test_served(tmp_path, writethrough_cache, run):
    asyncio.run(served(tmp_path, writethrough_cache))
"""

#: pytest-asyncio's loop per test
PYTEST_ASYNCIO = """

@pytest.mark.parametrize("run", [1, 2, 3])
async def test_served(tmp_path, writethrough_cache, run):
    await served(tmp_path, writethrough_cache)
"""


@pytest.mark.parametrize("loops", ["asyncio.run", "pytest-asyncio"])
def test_an_asyncio_suite_with_warnings_as_errors_passes(
    pytester: pytest.Pytester, redis_url: str, monkeypatch: pytest.MonkeyPatch, loops: str
) -> None:
    """A loop per test, closed after it: the fixture closes the cache's ``redis.asyncio``
    connections of that loop, so that a suite whose warnings are errors (``filterwarnings =
    error``) does not exit non-zero on the sockets the cache left open (before: every test
    passed, and the run failed on the collected connections)."""
    pytest.importorskip("aiosqlite")
    ini = "[pytest]\nfilterwarnings =\n    error\n"
    if loops == "pytest-asyncio":
        pytest.importorskip("pytest_asyncio")  # not a test dependency: where installed
        ini += "asyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    monkeypatch.setenv("REDIS_URL", redis_url)
    tests = RUN_PER_TEST if loops == "asyncio.run" else PYTEST_ASYNCIO
    pytester.makepyfile(test_user=ASYNC_USER_SUITE + tests)
    pytester.makeini(ini)
    # pytest-asyncio, where installed, warns of its unset option: an error here
    off = ("-p", "no:asyncio") if loops == "asyncio.run" else ()
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", *off)
    result.assert_outcomes(passed=3)
    assert result.ret == 0, result.stdout.str()
