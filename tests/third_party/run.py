"""Other projects' test suites, plainly and with the extension on every Session.

    python tests/third_party/run.py SUITE [--workdir DIR] [-- pytest arguments]

SUITE is one of ``flask-sqlalchemy``, ``sqlmodel``, ``sqlalchemy-continuum``,
``sqlalchemy-utils``, ``flask-admin``, ``fastapi-users-db-sqlalchemy`` (and
``fastapi-users-db-sqlalchemy-asyncio``: the cache on ``AsyncSession`` itself, through
``redis.asyncio``), ``zope.sqlalchemy``, ``zope.sqlalchemy-twophase``,
``marshmallow-sqlalchemy``, ``factory_boy``, ``wtforms-sqlalchemy``, ``graphene-sqlalchemy``
(and ``graphene-sqlalchemy-asyncio``), ``sqlalchemy-searchable``,
``sqlalchemy-easy-softdelete``, ``sqlalchemy-json``, ``advanced-alchemy``:
libraries our users put between their code and the ORM, each with its own Session subclass,
listeners, types, declarative base or loads by primary key. The sdist of the installed
release (each ships its tests) is unpacked into ``.third-party/`` (``--workdir``) and its
tests run with
``tests/sqlalchemy_suite/wt_suite_plugin.py`` (a cache on ``sqlalchemy.orm.Session`` under
a fresh prefix per test, ``register_all()`` over every mapping), then those that failed run
again plainly (pytest's ``--last-failed``; ``--full-plain`` runs every test plainly, first: the
two passes' times and plain failures to compare). It prints the tests that fail only with the
extension, minus those listed in ``known_failures.txt`` with their reason (``suite:test id --
reason``), and exits non-zero on any unexplained one, or if the extension was not active.

sqlalchemy-utils' tests need PostgreSQL (with the ``hstore`` and ``ltree`` extensions) and
MySQL/MariaDB: the run makes a database of its own on each ($POSTGRESQL_URL and $MARIADB_URL,
else the local servers) and drops them at the end. Flask-Admin's SQLAlchemy tests (its admin
views over models with inline forms, composite keys, hstore and citext columns) and
fastapi-users' (its ``User`` table keyed by the GUID TypeDecorator, run on asyncpg) get a
PostgreSQL database of their own the same way. zope.sqlalchemy's (the transaction manager of
Pyramid and Plone) run on a PostgreSQL database of their own, and again two-phase (XA) on a
MariaDB database of their own. SQLAlchemy-Searchable's (search vectors its triggers compute)
get a PostgreSQL database of their own on localhost (its conftest names only the database,
user and password). marshmallow-sqlalchemy's (schemas loading instances by primary
key), factory_boy's SQLAlchemy tests (``tests/test_alchemy.py``: model factories committing or
flushing, get-or-create), WTForms-SQLAlchemy's (query-backed select fields),
SQLAlchemy-Easy-SoftDelete's (soft-delete criteria added to every query) and
graphene-sqlalchemy's (GraphQL types: relay nodes by primary key, batched relationship loads;
on in-memory SQLite and aiosqlite) run on SQLite, the only database their tests know.

advanced-alchemy's (Litestar's repository and service layer, its Litestar/FastAPI/Flask
integrations) ask pytest-databases for Docker containers: ``tests/third_party/wt_aa_services.py``
(``-p wt_aa_services``) gives its PostgreSQL (psycopg, asyncpg) and MySQL (asyncmy) engines a
database of each test process's own on the local servers instead. Its integration tests run
on SQLite, aiosqlite, psycopg and asyncpg (``_AA_ENGINES`` says why not on the others), on two
pytest-xdist workers, on SQLAlchemy 2.0 (1.12.0 maps its JSON type with
``sqlalchemy.util.portable_instancemethod``, which 2.1 removed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PLUGIN_DIR = REPO / "tests" / "sqlalchemy_suite"

# the results reading of SQLAlchemy's suite runner (tests/sqlalchemy_suite/run.py)
_spec = importlib.util.spec_from_file_location("sqlalchemy_suite_run", PLUGIN_DIR / "run.py")
assert _spec is not None and _spec.loader is not None
_suite_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite_run)
any_failed, cache_args, known_reason, outcomes, read_list = (
    _suite_run.any_failed,
    _suite_run.cache_args,
    _suite_run.known_reason,
    _suite_run.outcomes,
    _suite_run.read_list,
)

#: its tests are a module of the package (``zope`` is a namespace package)
_ZOPE = ("--import-mode=importlib",)

#: advanced-alchemy's engines run: not those with no local server (Oracle, MSSQL, CockroachDB,
#: Spanner), nor its mocks (no Session), DuckDB and asyncmy (its other engines cover their
#: tests, in a third of the time), nor psycopg's async driver: its tests share asyncpg's tables
#: on one database, and under --dist loadgroup some find them missing when they seed them,
#: a dozen to thirty a run, plainly as well (each passes alone, with the extension too)
_AA_ENGINES = (
    "not (oracledb_sync or oracledb_async or spanner or cockroachdb_sync or cockroachdb_async"
    " or mssql_sync or mssql_async or mock_sync or mock_async or duckdb or asyncmy"
    " or psycopg_async)"
)
#: its tests of services that only Docker gives (S3, Oracle), and of the Alembic command
#: line (no Session, 150 tests)
_AA_DESELECT = tuple(
    f"--deselect=tests/integration/{test}"
    for test in (
        "test_alembic_cli_integration.py",
        "test_oracledb_json.py",
        *(
            f"test_file_object.py::test_{lib}_s3_basic_operations_{flavour}"
            for lib in ("fsspec", "obstore")
            for flavour in ("sync", "async")
        ),
    )
)

#: its benchmarks run as tests, once each; its sdist holds no pytest configuration, and
#: pytest would take this project's from a folder above it (warnings made errors)
_GRAPHENE = ("--benchmark-disable", "-c", "setup.cfg")

#: suite -> (distribution, test folder, pytest arguments of its own)
SUITES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flask-sqlalchemy": ("Flask-SQLAlchemy", "tests", ()),
    "sqlmodel": ("sqlmodel", "tests", ()),
    # on SQLite (its default): versioning tables written from flush listeners
    "sqlalchemy-continuum": ("SQLAlchemy-Continuum", "tests", ("-n", "2")),
    # its tox.ini turns every warning into an error; dateutil's and pendulum's deprecations
    # are the environment's, not the tests'
    "sqlalchemy-utils": ("SQLAlchemy-Utils", "tests", ("-W", "ignore::DeprecationWarning")),
    # admin views: list, edit and inline forms loading rows by primary key
    "flask-admin": ("Flask-Admin", "flask_admin/tests/sqla", ()),
    # a User table keyed by a TypeDecorator (GUID), through AsyncSession: the cache on
    # Session (AsyncSession's sync sessions), then on AsyncSession itself (redis.asyncio)
    "fastapi-users-db-sqlalchemy": ("fastapi-users-db-sqlalchemy", "tests", ()),
    "fastapi-users-db-sqlalchemy-asyncio": ("fastapi-users-db-sqlalchemy", "tests", ()),
    # Pyramid's and Plone's transaction manager: it joins a session at after_begin and
    # closes it at the end of the transaction; on PostgreSQL, then two-phase on MariaDB (XA)
    "zope.sqlalchemy": ("zope.sqlalchemy", "src/zope/sqlalchemy/tests.py", _ZOPE),
    "zope.sqlalchemy-twophase": ("zope.sqlalchemy", "src/zope/sqlalchemy/tests.py", _ZOPE),
    # on SQLite (its tests' only database): load_instance schemas and Related fields load
    # instances by primary key through the session (session.get), the cache's read path
    "marshmallow-sqlalchemy": ("marshmallow-sqlalchemy", "tests", ()),
    # its SQLAlchemy tests only (on SQLite, the one database they know): factories persisting
    # with commit or flush, get-or-create by unique columns, on a scoped_session
    "factory_boy": ("factory_boy", "tests/test_alchemy.py", ()),
    # form fields whose choices are ORM queries (QuerySelectField...), on SQLite
    "wtforms-sqlalchemy": ("WTForms-SQLAlchemy", "tests", ()),
    # GraphQL types over models: relay nodes by primary key (session.get), many-to-one
    # fields, batched relationship loads (SQLAlchemy's selectin loader driven from a
    # dataloader); on SQLite and aiosqlite, in memory; the cache on Session, then on
    # AsyncSession itself
    "graphene-sqlalchemy": ("graphene-sqlalchemy", "graphene_sqlalchemy/tests", _GRAPHENE),
    "graphene-sqlalchemy-asyncio": ("graphene-sqlalchemy", "graphene_sqlalchemy/tests", _GRAPHENE),
    # soft deletion: its do_orm_execute listener on Session filters out deleted rows from
    # every SELECT (and session.get); on SQLite, in one transaction rolled back per test
    "sqlalchemy-easy-softdelete": ("sqlalchemy-easy-softdelete", "tests", ()),
    # JSON columns of nested mutable dicts and lists (changes deep inside a document are
    # flushed), committed and reloaded: on in-memory SQLite
    "sqlalchemy-json": ("sqlalchemy-json", "test", ()),
    # search vectors its PostgreSQL triggers compute from the row's other columns (the
    # commit writes a row the database then changes), tables and triggers made per test
    "sqlalchemy-searchable": ("sqlalchemy-searchable", "tests", ()),
    # repositories and services over sync and async sessions (get, get_one, upsert, bulk
    # updates, its own dogpile.cache of query results): SQLite, aiosqlite, and PostgreSQL
    # by wt_aa_services (psycopg, asyncpg); two workers, its engines' xdist groups
    "advanced-alchemy": (
        "advanced-alchemy",
        "tests/integration",
        (
            *("-p", "wt_aa_services", "-m", _AA_ENGINES, "-n", "2", "--dist", "loadgroup"),
            *_AA_DESELECT,
            # its deprecation warnings (declarative_mixin...), thousands of lines
            *("-W", "ignore::DeprecationWarning"),
        ),
    ),
}

_POSTGRESQL = os.environ.get("POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_MARIADB = os.environ.get("MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def sdist_folder(workdir: Path, distribution: str) -> Path:
    """The unpacked sdist of the installed release of ``distribution``, downloaded once."""
    version = importlib.metadata.version(distribution)
    workdir.mkdir(parents=True, exist_ok=True)
    # the sdist's name: normalized, or as an older release spelled it (graphene-sqlalchemy)
    stems = [f"{re.sub(r'[-_.]+', '_', distribution).lower()}-{version}"]
    stems.append(f"{distribution}-{version}")
    for stem in stems:
        if (workdir / stem).is_dir():
            return workdir / stem
    if not any((workdir / f"{stem}.tar.gz").exists() for stem in stems):
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", ":all:", "--dest", str(workdir)),
                f"{distribution}=={version}",
            ],
            check=True,
        )
    stem = next(stem for stem in stems if (workdir / f"{stem}.tar.gz").exists())
    with tarfile.open(workdir / f"{stem}.tar.gz") as tar:
        tar.extractall(workdir, filter="data")
    return workdir / stem


@contextlib.contextmanager
def utils_databases() -> Iterator[dict[str, str]]:
    """The environment sqlalchemy-utils' conftest reads, naming a database of this run's on
    PostgreSQL and on MySQL/MariaDB (one name for both, as its conftest wants)."""
    name = f"wt_utils_{uuid.uuid4().hex[:10]}"
    with postgresql_database(("hstore", "ltree"), name) as pg, mariadb_database(name) as my:
        yield {
            "SQLALCHEMY_UTILS_TEST_DB": name,
            "SQLALCHEMY_UTILS_TEST_POSTGRESQL_HOST": f"{pg.host}:{pg.port or 5432}",
            "SQLALCHEMY_UTILS_TEST_POSTGRESQL_USER": pg.username or "postgres",
            "SQLALCHEMY_UTILS_TEST_POSTGRESQL_PASSWORD": pg.password or "",
            "SQLALCHEMY_UTILS_TEST_MYSQL_USER": my.username or "root",
        }


@contextlib.contextmanager
def mariadb_database(name: str = "") -> Iterator[URL]:
    """A MySQL/MariaDB database of this run's (named ``name``, else a name of its own),
    dropped at the end."""
    from sqlalchemy import create_engine, make_url, pool

    name = name or f"wt_suite_{uuid.uuid4().hex[:10]}"
    url = make_url(_MARIADB)
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


@contextlib.contextmanager
def postgresql_database(extensions: tuple[str, ...] = (), name: str = "") -> Iterator[URL]:
    """A PostgreSQL database of this run's (with ``extensions``; named ``name``, else a name
    of its own), dropped at the end."""
    from sqlalchemy import create_engine, make_url, pool

    name = name or f"wt_suite_{uuid.uuid4().hex[:10]}"
    url = make_url(_POSTGRESQL)
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        with create_engine(url.set(database=name), poolclass=pool.NullPool).begin() as conn:
            for extension in extensions:
                conn.exec_driver_sql(f"CREATE EXTENSION IF NOT EXISTS {extension}")
        yield url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def drop_databases(prefix: str) -> None:
    """Drop the databases whose name starts with ``prefix`` on PostgreSQL and MariaDB."""
    from sqlalchemy import create_engine, make_url, pool, text

    for url, listing, drop in (
        (
            _POSTGRESQL,
            "SELECT datname FROM pg_database WHERE datname LIKE :p",
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        ),
        (
            _MARIADB,
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p",
            "DROP DATABASE IF EXISTS {}",
        ),
    ):
        admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        try:
            with admin.connect() as conn:
                for (name,) in conn.execute(text(listing), {"p": f"{prefix}%"}).all():
                    conn.exec_driver_sql(drop.format(name))
        finally:
            admin.dispose()


@contextlib.contextmanager
def suite_environment(suite: str) -> Iterator[dict[str, str]]:
    """The environment a suite's tests read to find their databases (made for this run)."""
    if suite == "sqlalchemy-utils":
        with utils_databases() as env:
            yield env
    elif suite == "flask-admin":
        with postgresql_database(("hstore", "citext")) as url:
            plain = url.set(drivername="postgresql+psycopg2")  # what its tests install
            yield {"SQLALCHEMY_DATABASE_URI": plain.render_as_string(hide_password=False)}
    elif suite == "graphene-sqlalchemy-asyncio":
        yield {"WT_SUITE_ASYNCIO": "1"}  # the plugin installs on AsyncSession
    elif suite.startswith("fastapi-users-db-sqlalchemy"):
        with postgresql_database() as url:
            found = url.set(drivername="postgresql+asyncpg")
            env = {"DATABASE_URL": found.render_as_string(hide_password=False)}
            if suite.endswith("-asyncio"):
                env["WT_SUITE_ASYNCIO"] = "1"  # the plugin installs on AsyncSession
            yield env
    elif suite == "sqlalchemy-searchable":
        # its conftest connects to localhost's PostgreSQL, by database name and user
        with postgresql_database(("hstore",)) as url:
            yield {
                "SQLALCHEMY_SEARCHABLE_TEST_DB": url.database or "",
                "SQLALCHEMY_SEARCHABLE_TEST_USER": url.username or "postgres",
                "SQLALCHEMY_SEARCHABLE_TEST_PASSWORD": url.password or "",
            }
    elif suite == "zope.sqlalchemy":
        with postgresql_database() as url:
            yield {"TEST_DSN": url.render_as_string(hide_password=False)}
    elif suite == "advanced-alchemy":
        # wt_aa_services makes (and drops) a database per pytest-xdist worker on each server,
        # named after this prefix: those a killed run left are dropped here
        prefix = f"wt_aa_{uuid.uuid4().hex[:10]}"
        try:
            yield {
                "AA_POSTGRESQL_URL": _POSTGRESQL,
                "AA_MARIADB_URL": _MARIADB,
                "AA_DATABASE_PREFIX": prefix,
            }
        finally:
            drop_databases(prefix)
    elif suite == "zope.sqlalchemy-twophase":
        # XA transactions (PostgreSQL's prepared ones are off by default)
        with mariadb_database() as url:
            yield {"TEST_DSN": url.render_as_string(hide_password=False), "TEST_TWOPHASE": "1"}
    else:
        yield {}


def run_pass(
    folder: Path,
    out: Path,
    tests: str,
    extra: list[str],
    suite_env: dict[str, str],
    plugin: bool,
    failed_only: bool = False,
) -> Path:
    """One pytest run of the suite, with the extension (``plugin``) or plainly; with
    ``failed_only``, of the tests the last run failed (pytest's own cache, kept in ``out``:
    never in the project's folder)."""
    junit = out / ("extension.xml" if plugin else "plain.xml")
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", tests, "-q", *cache_args(out, failed_only)]
    command += [f"--junitxml={junit}", *extra]
    env = {**os.environ, **suite_env}
    # the plugin, and this folder's plugins of a suite's own (wt_aa_services)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PLUGIN_DIR), str(HERE), env.get("PYTHONPATH")])
    )
    if plugin:
        status = out / "extension.status"
        status.unlink(missing_ok=True)
        command += ["-p", "wt_suite_plugin", f"--wt-status={status}"]
    label = "with the extension" if plugin else "plainly"
    if failed_only:
        label += ", the tests that failed with the extension"
    from sqlalchemy import make_url

    where = "".join(
        f" {k}={make_url(v).render_as_string(hide_password=True)}"  # never a password in a log
        for k, v in sorted(suite_env.items())
        if k.endswith(("URI", "URL", "DSN"))
    )
    print(f"== {label}:{where} {' '.join(command[2:])}", flush=True)
    with open(out / (junit.stem + ".log"), "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not junit.exists():
        sys.exit(f"no results from the run {label}: see {out / (junit.stem + '.log')}")
    return junit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--workdir", type=Path, default=REPO / ".third-party")
    parser.add_argument(
        "--full-plain",
        action="store_true",
        help="run every test plainly too (first), not only those failing with the extension",
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    # SUITE, then --workdir, then -- and pytest's own: the documented order
    args = parser.parse_intermixed_args()

    distribution, tests, own = SUITES[args.suite]
    folder = sdist_folder(args.workdir, distribution)
    out = args.workdir / f"{args.suite}-results"
    out.mkdir(parents=True, exist_ok=True)
    extra = [*own, *args.pytest_args]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the databases are dropped
    shutil.rmtree(out / "cache", ignore_errors=True)  # --last-failed: this run's failures only
    with suite_environment(args.suite) as env:
        if args.full_plain:
            plain_xml = run_pass(folder, out, tests, extra, env, plugin=False)
        ext_xml = run_pass(folder, out, tests, extra, env, plugin=True)
        if not args.full_plain:
            # a test passing with the extension needs no plain run: only the failures are
            # run again plainly, to tell the suite's own failures from the extension's
            plain_xml = out / "plain.xml"
            plain_xml.unlink(missing_ok=True)
            if any_failed(ext_xml):
                run_pass(folder, out, tests, extra, env, plugin=False, failed_only=True)

    status = (out / "extension.status").read_text(encoding="utf-8").split("\n")
    used = [line.split() for line in status if line.startswith("used ")]
    problems = [
        line
        for line in status
        if line and line != "ok" and not line.startswith(("used ", "skipped model "))
    ]
    plain = outcomes(plain_xml) if plain_xml.exists() else {}
    ext = outcomes(ext_xml)
    known = {
        test.removeprefix(f"{args.suite}:"): reason
        for test, reason in read_list(HERE / "known_failures.txt").items()
        if test.startswith(f"{args.suite}:")
    }
    only_ext = {
        test: state
        for test, state in ext.items()
        if state.startswith("failed") and not plain.get(test, "").startswith("failed")
    }
    explained = {test: reason for test in only_ext if (reason := known_reason(known, test))}
    unexplained = {test: state for test, state in only_ext.items() if test not in explained}
    failed_plain = sum(1 for state in plain.values() if state.startswith("failed"))
    if failed_plain * 2 > len(ext):
        # a missing test dependency or a collection error: a comparison proves nothing
        problems.append(f"{failed_plain} of {len(ext)} tests fail without the extension")
    if not sum(int(u[1]) for u in used):
        problems.append("no test read or wrote through the cache")
    print(
        f"\n{args.suite} {importlib.metadata.version(distribution)}: {len(ext)} tests; failing "
        f"plainly{'' if args.full_plain else ' (of those failing with the extension)'}: "
        f"{failed_plain}; failing only with the extension: {len(only_ext)} "
        f"({len(explained)} known, {len(unexplained)} unexplained)"
    )
    if used:
        print(
            f"  {sum(int(u[1]) for u in used)} of the {sum(int(u[2]) for u in used)} tests run "
            "with the extension read or wrote through the cache"
        )
    for test, reason in sorted(explained.items()):
        print(f"  known   {test}\n          {reason}")
    for test, state in sorted(unexplained.items()):
        print(f"  FAILED  {test}\n          {state}")
    if problems:
        print("the extension was NOT active everywhere:")
        for line in problems[:20]:
            print(f"  {line}")
    return 1 if unexplained or problems else 0


if __name__ == "__main__":
    sys.exit(main())
