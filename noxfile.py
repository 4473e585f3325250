"""Nox sessions: lint, typecheck, the docs, and the test suite against SQLAlchemy 2.0 and 2.1.

Sessions run on the interpreter that runs nox; pick another with
``nox --force-python 3.12`` (or ``--extra-python``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import nox

# uv where it is installed (``pip install "nox[uv]"``, as .ci/run does): it makes a session's
# venv and installs into it about ten times faster than pip, most of CI's time between the
# tests; venv and pip otherwise. Sessions whose tools call pip themselves install it.
nox.options.default_venv_backend = "uv|venv"
nox.options.sessions = [
    "lint",
    "typecheck",
    "docs",
    "tests",
    "tests_oldest_redis",
    "sqlalchemy_suite_quick",
    "third_party(suite='flask-sqlalchemy')",
    "third_party(suite='sqlmodel')",
    "third_party(suite='fastapi-users-db-sqlalchemy')",
    "third_party(suite='flask-admin')",
    "third_party(suite='zope.sqlalchemy')",
    "third_party(suite='zope.sqlalchemy-twophase')",
]
# Not in CI: marshmallow-sqlalchemy's, factory_boy's and WTForms-SQLAlchemy's suites (about 1.5
# minutes together; their tests flush and read in one session, so 4, 5 and 6 tests reach the
# cache), and advanced-alchemy's (about 5 minutes and a large install; 175 of its 710 tests
# reach the cache): `nox -s third_party` runs them with the others.
# Reuse session venvs between local runs; installs still run, so requirement changes apply.
nox.options.reuse_venv = "yes"

# The newest release of each supported SQLAlchemy minor series.
SQLALCHEMY_PINS = {
    "2.0": "sqlalchemy~=2.0.0",
    "2.1": "sqlalchemy>=2.1,<2.2",
}


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY_PINS))
def tests(session: nox.Session, sqlalchemy: str) -> None:
    """Run pytest; extra arguments after ``--`` are passed to pytest.

    On SQLAlchemy 2.0 the Redis-topology runs (Sentinel failovers, Redis Cluster, the short
    stress runs) and the modules about Redis's behaviour, which do not depend on SQLAlchemy's
    version, are left to the other sessions; the distribution is built and installed
    (tests/test_packaging.py), and the command-line tool run, by the 2.1 session only. On
    2.1 the Sentinel runs under load take PostgreSQL and MariaDB (tests_oldest_redis takes
    SQLite)."""
    if session.posargs:
        args: tuple[str, ...] = ()
    elif sqlalchemy == "2.0":
        args = _REDIS_ONLY_RUNS + _REDIS_BEHAVIOUR + _ONCE_RUNS
    else:
        args = _SENTINEL_ON_SQLITE
    _pytest(session, SQLALCHEMY_PINS[sqlalchemy], *args)


_REDIS_ONLY_RUNS = (
    "--ignore=tests/test_sentinel.py",
    "--ignore=tests/test_cluster.py",
    "--ignore=tests/test_stress_short.py",
    "--ignore=tests/test_stress_short_schemas.py",
    # the asyncio Cluster module, and the behaviour suite's async-cluster flavour
    "-m",
    "not cluster",
)
# Modules about what Redis does (failures, epochs, the keyspace registry, the near cache's
# subscription, TLS and ACLs, the sabotages' scenarios): they go through the same ORM hooks as
# the rest of the suite, which the 2.0 session runs; half of its time otherwise. They run on
# SQLAlchemy 2.1 with the newest and the oldest redis-py.
_REDIS_BEHAVIOUR = tuple(
    f"--ignore=tests/{name}.py"
    for name in (
        "test_sabotages",
        "test_siblings",
        "test_redis_failures",
        "test_near_cache",
        "test_near_cache_asyncio",
        "test_near_cache_batch",
        "test_near_cache_close",
        "test_tls",
        "test_acl",
        "test_kept_connections",
        "test_epochs",
        "test_loop_watch",
        "test_redis_compat",
        "test_shared_stats_clients",
        "test_stress_faults",
        "test_stress_checker",
        "test_scripts",
        "test_server_binaries",
        "test_cluster_switch_close",
        "test_herd",
    )
)
# The Sentinel runs under load on SQLite: tests_oldest_redis runs them (the database changes
# nothing of a failover's handling; PostgreSQL and MariaDB run on 2.1).
_SENTINEL_ON_SQLITE = tuple(
    f"--deselect=tests/test_sentinel.py::{test}[sqlite]"
    for test in (
        "test_a_stopped_primary_under_load",
        "test_a_failover_under_load",
        "test_each_connection_leaves_the_old_primary_within_the_check_interval",
    )
)
# Tests that depend on neither SQLAlchemy's nor redis-py's version: run by one session only.
_ONCE_RUNS = (
    "--ignore=tests/test_packaging.py",
    # the command-line tool: its Redis calls are the backend's, its loads the ORM's, which
    # every other module tests on each version (a minute of a session: each of its tests
    # starts Python twice, and SQLAlchemy is slow to import)
    "--ignore=tests/test_cli.py",
    # the benchmarks' scripts (callgrind under valgrind: 20 s), smoke-run once
    "--ignore=tests/test_benchmarks_smoke.py",
)


@nox.session
def tests_oldest_redis(session: nox.Session) -> None:
    """The suite on the oldest supported redis-py (5.0), whose connection pool and Cluster
    slot map APIs differ (tests/test_redis_compat.py exercises both on a one-node cluster);
    the Redis Cluster runs (3 primaries, 3 replicas) are left to tests(2.1), to keep CI short:
    ``nox -s tests_oldest_redis -- tests/test_cluster.py`` runs them here. On SQLite and
    PostgreSQL (synchronous and asyncio drivers): what the cache sends Redis is the same on
    MariaDB, which tests(2.0) and tests(2.1) run."""
    own = (*_NEWEST_REDIS_ONLY, *_ONCE_RUNS, *_SQLALCHEMY_LOGIC, "--databases", "sqlite,postgresql")
    args = () if session.posargs else own
    _pytest(session, "redis~=5.0.0", *args)


# Modules that test what the ORM returns and what values are stored, through the same backend
# calls the rest of the suite makes: redis-py's version changes nothing there, and they are
# half the suite's time. The redis-facing modules (compat, failures, epochs, scripts, read and
# write paths, asyncio, Sentinel, stress) all run on redis-py 5.0.
_SQLALCHEMY_LOGIC = tuple(
    f"--ignore=tests/{name}.py"
    for name in (
        "test_exactness",
        "test_exactness_hypothesis",
        "test_json_exactness",
        "test_legacy_query",
        "test_orm_transparency",
        "test_mappings",
        "test_inheritance",
        "test_register_all",
        "test_write_paths",
        "test_fuzz_entries",
        "test_alembic",
        "test_examples",
        "test_benchmarks_smoke",
        # what a load returns and what a commit stores, on one database or another
        "test_session_time_zones",
        "test_row_security",
        "test_type_side_effects",
        "test_dialect_types",
        "test_pk_value_types",
        "test_psycopg2_values",
        "test_sql_expression_types",
        "test_decorated_keys",
        "test_stale_loaded_columns",
        "test_row_triggers",
        "test_tenant_search_path",
        "test_schema_tenants",
        "test_encode_once",
        "test_configuration",
        # each declaration against what the database stores of it
        "test_declarations_swept",
        "test_declarations_swept_lenient",
        "test_declarations_swept_asyncpg",
        "test_declared_charsets",
        "test_declared_variants",
        "test_numeric_columns",
        "test_binary_columns",
        "test_mysql_lenient_mode",
        "test_pg_fractional_seconds",
        "test_pg_normalised_types",
        "test_sqlite_storage_formats",
    )
)


_NEWEST_REDIS_ONLY = (
    "--ignore=tests/test_cluster.py",
    "--deselect=tests/test_stress_short.py::test_short_cluster_failover_run_finds_no_violation",
    # the failovers and the stress run exercise redis-py the same way on every database: on
    # redis-py 5.0 they run on one database each (tests(2.1) runs them on all)
    "--deselect=tests/test_stress_short.py::test_short_stress_run_finds_no_violation[mariadb]",
    # the command line's --repeat: nothing of redis-py's own
    "--deselect=tests/test_stress_short.py::"
    "test_repeat_lists_the_failing_seeds_and_keeps_only_their_histories",
    # UUID keys (the write path's keys of asyncpg's UUID class), tenants' key naming, a
    # trigger's rewritten rows (what the database stores): nothing of redis-py's own
    "--ignore=tests/test_stress_short_schemas.py",
    # model versions' keyspaces, the command line's log keeping: the same Redis commands as
    # the runs kept here
    *(
        f"--deselect=tests/test_stress_short.py::{test}"
        for test in (
            "test_short_two_model_versions_run_finds_no_violation",
            "test_keep_logs_failed_removes_the_histories_of_a_passing_run",
        )
    ),
    *(
        f"--deselect=tests/test_sentinel.py::{test}[{db}]"
        for test in (
            "test_a_stopped_primary_under_load",
            "test_a_failover_under_load",
            "test_each_connection_leaves_the_old_primary_within_the_check_interval",
        )
        for db in ("postgresql", "mariadb")
    ),
    # the asyncio Cluster module, and the behaviour suite's async-cluster flavour
    "-m",
    "not cluster",
)


def _pytest(session: nox.Session, pin: str, *args: str) -> None:
    # pip: tests/test_packaging.py installs the wheel with it
    session.install("-e", ".[test]", "pip")
    # Installed after the project so the pin wins over whatever `.[test]` resolved.
    session.install(pin)
    session.run(
        "python",
        "-c",
        "import sqlalchemy, redis; "
        "print('SQLAlchemy', sqlalchemy.__version__, '/ redis-py', redis.__version__)",
    )
    # Four workers on CI's two cores, each taking whole modules (--dist loadfile: a module's
    # Cluster, Sentinel group or throwaway servers are started once): the tests mostly wait
    # on servers (one CPU and a half busy), and four cut a session by a third to a half;
    # `-- -n 2` after the session's name asks for fewer. The slowest tests, in CI's log:
    # where the next cut of CI time is
    session.run(
        "pytest", "-n", "4", "--dist", "loadfile", "--durations=25", *args, *session.posargs
    )  # fmt: skip


@nox.session
def server_build(session: nox.Session) -> None:
    """The suite against another server build: Valkey, or an older or newer Redis (not in the
    default list: CI has only the machine's Redis).

    ``REDIS_SERVER_BINARY`` names a ``redis-server`` or ``valkey-server`` (``REDIS_CLI_BINARY``
    its cli, by default the ``-cli`` beside it): the session starts one on a free loopback port
    for ``REDIS_URL``, and every fixture (Cluster nodes, Sentinel groups, restarted servers,
    the short stress runs) starts that binary too. docs/running-redis.md ("Server versions")
    says which builds were verified. Arguments after ``--`` go to pytest."""
    binary = os.environ.get("REDIS_SERVER_BINARY", "")
    found = shutil.which(binary) if binary else None
    if found is None:
        session.error(
            "set REDIS_SERVER_BINARY to a redis-server or valkey-server binary "
            "(docs/running-redis.md, 'Server versions')"
        )
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    session.log(version.strip())
    with (
        tempfile.TemporaryDirectory(prefix="nox-server-build-") as workdir,
        _server(found, workdir) as url,
    ):
        session.env["REDIS_URL"] = url
        _pytest(session, SQLALCHEMY_PINS["2.1"], *(() if session.posargs else _ONCE_RUNS))


@contextlib.contextmanager
def _server(binary: str, workdir: str) -> Iterator[str]:
    """A throwaway ``binary`` (redis-server or valkey-server) on a free loopback port, without
    persistence; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(port: int) -> bool:
    """True when the server on ``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and formatting check (configuration in pyproject.toml)."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package (configuration in pyproject.toml)."""
    # the optional integrations and the pytest plugin are checked too
    session.install(".[asyncio,cli,prometheus,opentelemetry]", "pytest", "mypy", "msgpack-types")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into docs/_build/html, warnings as errors.

    Sphinx with MyST reads docs/*.md; the API reference comes from the docstrings. No network
    is needed: the diagrams are committed SVG files (docs/diagrams/render.sh makes them).
    Arguments after ``--`` go to sphinx-build (e.g. ``-- -b linkcheck``).
    """
    # the API reference imports the optional integrations and the pytest plugin
    session.install("-e", ".[docs,asyncio,cli,prometheus,opentelemetry]", "pytest")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-q", "-b", "html",
        "-d", "docs/_build/doctrees", *session.posargs, "docs", "docs/_build/html",
    )  # fmt: skip


# The runs of ``nox -s sqlalchemy_suite``: test/orm, test/ext (sharding, mutable columns,
# association proxies, hybrids, automap, baked queries, declarative...), the tests of
# SQLAlchemy's examples (test/base/test_examples.py: versioned_history) and of its tutorials
# and query guides (test/base/test_tutorials.py: doctests of every value printed), test/ext/asyncio,
# whose tests need an async driver (on SQLite's default pysqlite they are skipped), twice: with
# the cache on Session (AsyncSessions then run its sync flavour inside the event loop) and on
# AsyncSession (its asyncio flavour, as asyncio applications run it). 2.0's test/ext/mypy (its
# mypy plugin's tests, gone in 2.1) needs mypy of that time: left out.
SQLALCHEMY_SUITE_RUNS: tuple[tuple[str, ...], ...] = (
    (),
    ("--target", "test/ext", "--", "--ignore=test/ext/mypy"),
    ("--target", "test/base/test_examples.py", "--target", "test/base/test_tutorials.py"),
    ("--target", "test/ext/asyncio", "--", "--db", "aiosqlite"),
    ("--target", "test/ext/asyncio", "--asyncio-flavour", "--", "--db", "aiosqlite"),
)
#: SQLAlchemy's asyncio tests with the cache on AsyncSession itself (run by CI too)
ASYNCIO_FLAVOUR_RUN = SQLALCHEMY_SUITE_RUNS[-1]


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY_PINS))
def sqlalchemy_suite(session: nox.Session, sqlalchemy: str) -> None:
    """SQLAlchemy's own test/orm and test/ext with the extension on every Session (then
    plainly the tests that failed: ``-- --full-plain`` for every test), on each supported
    SQLAlchemy series (its newest release's sdist: ``nox -s
    "sqlalchemy_suite(sqlalchemy='2.0')"`` for one).

    Fails on a test that fails only with the extension and is not in
    tests/sqlalchemy_suite/known_failures.txt. Arguments after ``--`` make it one run of
    ``python tests/sqlalchemy_suite/run.py`` with them instead (see its ``--help``):
    ``nox -s sqlalchemy_suite -- --quick`` runs the files of tests/sqlalchemy_suite/quick.txt,
    ``-- --target test/ext`` test/ext only. Needs Redis ($REDIS_URL or local).
    """
    session.install(
        "-e", ".[test]", "pip", "pytest-xdist", "setuptools>=77", SQLALCHEMY_PINS[sqlalchemy]
    )
    for args in [session.posargs] if session.posargs else SQLALCHEMY_SUITE_RUNS:
        session.run("python", "tests/sqlalchemy_suite/run.py", *args)


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY_PINS))
def sqlalchemy_suite_quick(session: nox.Session, sqlalchemy: str) -> None:
    """The CI subset of ``sqlalchemy_suite`` (the files of tests/sqlalchemy_suite/quick.txt),
    on each supported SQLAlchemy series; on 2.1, ``test/ext/asyncio`` too, with the cache on
    ``AsyncSession`` itself (its asyncio flavour: about 45 seconds)."""
    session.install(
        "-e", ".[test]", "pip", "pytest-xdist", "setuptools>=77", SQLALCHEMY_PINS[sqlalchemy]
    )
    session.run("python", "tests/sqlalchemy_suite/run.py", "--quick", *session.posargs)
    if sqlalchemy == "2.1" and not session.posargs:
        session.run("python", "tests/sqlalchemy_suite/run.py", *ASYNCIO_FLAVOUR_RUN)


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY_PINS))
def sqlalchemy_suite_postgresql(session: nox.Session, sqlalchemy: str) -> None:
    """``sqlalchemy_suite`` on PostgreSQL ($POSTGRESQL_URL or the local server), in a database
    the run makes and drops, on each supported SQLAlchemy series. Not in the default list: the
    plain pass alone took 18 minutes on two cores, the pass with the extension much longer.
    ``-- --quick`` for the quick subset."""
    _suite_on(
        session, sqlalchemy, "POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY_PINS))
def sqlalchemy_suite_mariadb(session: nox.Session, sqlalchemy: str) -> None:
    """``sqlalchemy_suite`` on MariaDB or MySQL ($MARIADB_URL or the local server), in
    databases the run makes and drops, on each supported SQLAlchemy series. Not in the
    default list (slower than PostgreSQL)."""
    _suite_on(
        session,
        sqlalchemy,
        "MARIADB_URL",
        "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4",
    )


def _suite_on(session: nox.Session, sqlalchemy: str, env_var: str, default_url: str) -> None:
    # the URL's database is only connected to: run.py --dburi makes a database for the run
    session.install(
        "-e", ".[test]", "pip", "pytest-xdist", "setuptools>=77", SQLALCHEMY_PINS[sqlalchemy]
    )
    dburi = os.environ.get(env_var, default_url)
    session.run("python", "tests/sqlalchemy_suite/run.py", "--dburi", dburi, *session.posargs)


# Other projects' suites run with the extension on every Session (tests/third_party/run.py):
# the release each is verified at, and what its tests import. On SQLAlchemy 2.0 but where
# THIRD_PARTY_SQLALCHEMY says: Flask-SQLAlchemy 3.1.1's tests fail on 2.1 without the extension,
# SQLModel and fastapi-users-db-sqlalchemy 7.0.0 require <2.1, SQLAlchemy-Utils 0.43 does not
# import on 2.1, Flask-Admin 2.2.1's multi-bind tests and zope.sqlalchemy's two-phase retry
# test fail on 2.1 without it, and so does WTForms-SQLAlchemy 0.4.2's test_convert_types (its
# converters find Float by its base Numeric, which 2.1's Float no longer has); advanced-alchemy
# 1.12.0 maps its JSON type with sqlalchemy.util.portable_instancemethod, gone in 2.1;
# graphene-sqlalchemy 3.0.0rc2 fails 9 of its batching tests on 2.1 without the extension (2.1.x:
# the same 9 with it, none more).
# SQLAlchemy-Continuum 2.0.0 allows 2.1 and passes there with the extension too (2.1.9: 871
# tests, 3 failing plainly, none only with it).
THIRD_PARTY_SUITES: dict[str, tuple[str, ...]] = {
    "flask-sqlalchemy": ("flask-sqlalchemy==3.1.1", "flask"),
    "sqlmodel": (
        "sqlmodel==0.0.50",
        *("fastapi", "httpx", "dirty-equals", "black", "jinja2", "typer", "coverage", "pyyaml"),
    ),
    # its versioning writes its tables from flush listeners
    "sqlalchemy-continuum": (
        "sqlalchemy-continuum==2.0.0",
        *("flask", "flask-login", "flask-sqlalchemy", "psycopg2-binary", "packaging"),
        "pytest-xdist",
    ),
    "sqlalchemy-utils": (
        "sqlalchemy-utils[arrow,babel,color,encrypted,intervals,password,pendulum,phone,"
        "timezone,url]==0.43.0",
        *("psycopg2-binary", "pg8000", "pytz", "python-dateutil", "flexmock", "docutils"),
        *("pygments", "jinja2"),
    ),
    # admin views over models (inline forms, composite keys, hstore, citext) on PostgreSQL;
    # WTForms 3.3 deprecates what its 2.2.1 passes, and its tests turn warnings into errors
    "flask-admin": (
        "flask-admin[sqlalchemy,sqlalchemy-lite,sqlalchemy-with-utils,export,translation]==2.2.1",
        *("wtforms<3.3", "flask[async]", "beautifulsoup4", "psycopg2-binary"),
    ),
    # a User table keyed by the GUID TypeDecorator, on asyncpg
    "fastapi-users-db-sqlalchemy": (
        "fastapi-users-db-sqlalchemy==7.0.0",
        *("asyncpg", "aiosqlite", "pytest-asyncio"),
    ),
    # the transaction manager of Pyramid and Plone: on PostgreSQL, then two-phase on MariaDB
    "zope.sqlalchemy": ("zope.sqlalchemy==4.1", "transaction", "zope.testing", "psycopg[binary]"),
    "zope.sqlalchemy-twophase": ("zope.sqlalchemy==4.1", "transaction", "zope.testing", "pymysql"),
    # schemas loading instances by primary key (load_instance, Related fields), on SQLite
    "marshmallow-sqlalchemy": (
        "marshmallow-sqlalchemy==1.6.0",
        *("marshmallow==4.4.0", "pytest-lazy-fixtures==1.4.1"),
    ),
    # model factories persisting by commit or flush, get-or-create (its SQLAlchemy tests only,
    # on SQLite: its test models hard-code their engine)
    "factory_boy": ("factory_boy==3.3.3",),
    # form fields whose choices are ORM queries (QuerySelectField...), on SQLite; WTForms 3.3
    # deprecates the tuple choices its converters make, and its tests turn warnings into errors
    "wtforms-sqlalchemy": ("wtforms-sqlalchemy==0.4.2", "wtforms==3.2.1"),
    # GraphQL types over models (relay nodes by key, batched relationship loads), on SQLite;
    # its conftest marks a fixture, which pytest 9 refuses
    "graphene-sqlalchemy": (
        "graphene-sqlalchemy==3.0.0rc2",
        *("pytest<9", "pytest-asyncio", "pytest-benchmark", "sqlalchemy-utils"),
        *("aiosqlite", "nest-asyncio", "greenlet"),
    ),
    # soft deletion: a do_orm_execute listener on Session adds its criteria to every SELECT
    "sqlalchemy-easy-softdelete": ("sqlalchemy-easy-softdelete==0.9.1", "syrupy"),
    # JSON columns whose nested dicts and lists track their own changes (mutation tracking)
    "sqlalchemy-json": ("sqlalchemy-json==0.7.0",),
    # full-text search vectors that PostgreSQL triggers compute from a row's other columns
    "sqlalchemy-searchable": ("sqlalchemy-searchable==3.0.0", "psycopg2-binary"),
    # repositories and services (Litestar's), run on SQLite and PostgreSQL (run.py's
    # _AA_ENGINES); its conftest imports every pytest-databases service and google-cloud-spanner
    "advanced-alchemy": (
        "advanced-alchemy[cli,cryptography,dogpile,fsspec,uuid,nanoid,argon2,passlib,pwdlib,"
        "pyotp,obstore]==1.12.0",
        # wt_aa_services builds its PostgresService and MySQLService
        *("pytest-databases[postgres,oracle,cockroachdb,bigquery,spanner,mssql,mysql]==0.19.0",),
        *("attrs", "cattrs", "sqlmodel", "dishka", "dogpile.cache", "pydantic-extra-types"),
        *("numpy", "pgvector", "cryptography", "pyotp", "rich-click", "fsspec[s3]"),
        *("pytest-asyncio", "pytest-lazy-fixtures", "pytest-rerunfailures", "pytest-mock"),
        *("pytest-xdist", "pytest-click", "asgi-lifespan", "click", "time-machine"),
        *("aiosqlite", "asyncpg", "psycopg[binary,pool]", "psycopg2-binary", "asyncmy"),
        *("pymysql", "duckdb", "duckdb-engine", "pytz", "alembic"),
        *("litestar[cli]", "fastapi[all]", "starlette", "flask-sqlalchemy", "flask[async]"),
        *("sanic", "sanic-testing", "sanic[ext]"),
    ),
}


#: the suites run on SQLAlchemy 2.1: zope.sqlalchemy 4.1's pass there without the extension
#: (2.1.9: 26 tests, as on 2.0), and so do marshmallow-sqlalchemy 1.6.0's (106 tests) and
#: factory_boy 3.3.3's SQLAlchemy tests (25)
THIRD_PARTY_SQLALCHEMY: dict[str, str] = {
    "zope.sqlalchemy": "2.1",
    "marshmallow-sqlalchemy": "2.1",
    "factory_boy": "2.1",
}


#: the runs of tests/third_party/run.py a session makes, where more than its own: the asyncio
#: suite again with the cache on AsyncSession itself (its asyncio flavour, redis.asyncio)
THIRD_PARTY_RUNS: dict[str, tuple[str, ...]] = {
    "fastapi-users-db-sqlalchemy": (
        "fastapi-users-db-sqlalchemy",
        "fastapi-users-db-sqlalchemy-asyncio",
    ),
    "graphene-sqlalchemy": ("graphene-sqlalchemy", "graphene-sqlalchemy-asyncio"),
}


@nox.session
@nox.parametrize("suite", list(THIRD_PARTY_SUITES))
def third_party(session: nox.Session, suite: str) -> None:
    """Another project's test suite (Flask-SQLAlchemy, SQLModel, SQLAlchemy-Continuum,
    SQLAlchemy-Utils, Flask-Admin, fastapi-users-db-sqlalchemy, zope.sqlalchemy,
    marshmallow-sqlalchemy, factory_boy's SQLAlchemy tests, WTForms-SQLAlchemy,
    graphene-sqlalchemy, SQLAlchemy-Searchable, SQLAlchemy-Easy-SoftDelete, sqlalchemy-json,
    advanced-alchemy's integration tests), with the
    extension on every Session, then plainly the tests that failed (``-- --full-plain``
    after the session's name: every test plainly too): fails on a test that fails only with
    the extension and is not in tests/third_party/known_failures.txt
    (``nox -s "third_party(suite='sqlmodel')"`` for one; ``-- -k NAME`` for some of its
    tests). SQLAlchemy-Utils' needs PostgreSQL and MariaDB ($POSTGRESQL_URL, $MARIADB_URL or
    the local servers), Flask-Admin's,
    fastapi-users', zope.sqlalchemy's and SQLAlchemy-Searchable's PostgreSQL (the last
    localhost's: its tests connect there), zope.sqlalchemy's two-phase run MariaDB;
    marshmallow-sqlalchemy's, factory_boy's, WTForms-SQLAlchemy's, graphene-sqlalchemy's,
    SQLAlchemy-Easy-SoftDelete's and sqlalchemy-json's run on SQLite,
    advanced-alchemy's on SQLite and PostgreSQL. Needs Redis
    ($REDIS_URL or local)."""
    session.install("-e", ".[test]", "pip", "setuptools>=77", *THIRD_PARTY_SUITES[suite])
    session.install(SQLALCHEMY_PINS[THIRD_PARTY_SQLALCHEMY.get(suite, "2.0")])
    # arguments after nox's ``--`` are pytest's (``-- -k test_name``), but --full-plain
    own = [arg for arg in session.posargs if arg == "--full-plain"]
    posargs = [arg for arg in session.posargs if arg != "--full-plain"]
    pytest_args = ("--", *posargs) if posargs else ()
    for run in THIRD_PARTY_RUNS.get(suite, (suite,)):
        session.run("python", "tests/third_party/run.py", run, *own, *pytest_args)


# The caches a user would pick instead, measured by the benchmark suite (never dependencies of
# the library). sqlacache is asyncio-only and imports only once greenlet is installed.
BENCH_PEERS = ("dogpile.cache", "sqlmodel-cache", "sqlacache[redis]", "greenlet")


def _bench(session: nox.Session, extras: str, default_args: tuple[str, ...]) -> None:
    session.install("-e", f".[{extras}]", "matplotlib")
    for peer in BENCH_PEERS:
        # A peer that cannot be installed here is reported as such in the results table.
        try:
            session.install(peer)
        except nox.command.CommandFailed:
            session.warn(f"could not install {peer}; the benchmark reports it as unavailable")
    session.run("python", "-m", "benchmarks", *default_args, *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the Redis floor, PostgreSQL and the peers (``python -m benchmarks``).

    Writes benchmarks/results/latest.md and latest.png. Arguments after ``--`` go to the
    benchmark, e.g. ``nox -s bench -- --quick`` or ``-- --iterations 500``.
    """
    _bench(session, "test", ())


@nox.session
def bench_hiredis(session: nox.Session) -> None:
    """The same benchmarks with redis-py's hiredis parser (the ``hiredis`` extra).

    Writes benchmarks/results/latest-hiredis.md and latest-hiredis.png.
    """
    _bench(session, "test,hiredis", ("--name", "latest-hiredis"))


@nox.session
def callgrind(session: nox.Session) -> None:
    """Instruction counts of the hot paths under valgrind (``python -m benchmarks.callgrind``).

    Client-side instructions per operation (cached and near-cache ``session.get``, 100-row
    ``IN`` lists, commits of 1 and 100 rows) and their bounds, on SQLite and the local Redis:
    reproducible where the wall-clock ``bench`` is not. Needs valgrind (its ``vgdb``).
    Arguments after ``--`` go to the tool, e.g. ``-- --baseline /tmp/base --output FILE``.
    """
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks.callgrind", *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """The long stress run: both databases, every fault at once, the checker (``stress/``).

    Arguments after ``--`` go to ``python -m stress`` and replace the defaults, e.g.
    ``nox -s stress -- --seconds 60 --db postgresql --faults each``.
    """
    session.install(".[test]")
    args = session.posargs or ["--seconds", "300", "--db", "both", "--faults", "all"]
    session.run("python", "-m", "stress", *args)
