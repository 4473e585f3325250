"""Nox sessions: lint, typecheck, and the test suite against SQLAlchemy 2.0 and 2.1.

Sessions run on the interpreter that runs nox; pick another with
``nox --force-python 3.12`` (or ``--extra-python``).
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests", "tests_oldest_redis"]
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
    """Run pytest; extra arguments after ``--`` are passed to pytest."""
    _pytest(session, SQLALCHEMY_PINS[sqlalchemy])


@nox.session
def tests_oldest_redis(session: nox.Session) -> None:
    """The suite on the oldest supported redis-py (5.0), whose connection pool API differs."""
    _pytest(session, "redis~=5.0.0")


def _pytest(session: nox.Session, pin: str) -> None:
    session.install("-e", ".[test]")
    # Installed after the project so the pin wins over whatever `.[test]` resolved.
    session.install(pin)
    session.run(
        "python",
        "-c",
        "import sqlalchemy, redis; "
        "print('SQLAlchemy', sqlalchemy.__version__, '/ redis-py', redis.__version__)",
    )
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and formatting check (configuration in pyproject.toml)."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package (configuration in pyproject.toml)."""
    session.install(".", "mypy", "msgpack-types")
    session.run("mypy")


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
def stress(session: nox.Session) -> None:
    """The long stress run: both databases, every fault at once, the checker (``stress/``).

    Arguments after ``--`` go to ``python -m stress`` and replace the defaults, e.g.
    ``nox -s stress -- --seconds 60 --db postgresql --faults each``.
    """
    session.install(".[test]")
    args = session.posargs or ["--seconds", "300", "--db", "both", "--faults", "all"]
    session.run("python", "-m", "stress", *args)
