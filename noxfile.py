"""Nox sessions: lint, typecheck, and the test suite against SQLAlchemy 2.0 and 2.1.

Sessions run on the interpreter that runs nox; pick another with
``nox --force-python 3.12`` (or ``--extra-python``).
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
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
    session.install("-e", ".[test]")
    # Installed after the project so the pin wins over whatever `.[test]` resolved.
    session.install(SQLALCHEMY_PINS[sqlalchemy])
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
