"""The examples and the documentation's code run as a user would run them, so none of them rots.

* ``examples/flask_app``: the Flask + Flask-SQLAlchemy app, through Flask's test client;
* ``examples/fastapi_app``: the FastAPI app (AsyncSession, redis.asyncio), through FastAPI's
  test client;
* ``examples/alembic_project``: its README's walk-through, command by command (``alembic``
  and ``app.py`` as subprocesses);
* ``docs/quickstart.md``: the "your own first cached model" program, as the page shows it.

(``examples/quickstart.py`` is run by ``test_diagnostics.py``, and from an installed wheel by
``test_packaging.py``.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ Flask


@pytest.fixture
def flask_app(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Any]:
    pytest.importorskip("flask_sqlalchemy")
    example = sys.modules.get("writethrough_flask_example") or _load(
        ROOT / "examples" / "flask_app" / "app.py", "writethrough_flask_example"
    )
    app = example.create_app(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'flask.db'}",
            "REDIS_URL": redis_url,
            "WRITETHROUGH_PREFIX": prefix,
        }
    )
    try:
        yield app
    finally:
        cache = app.extensions["writethrough"]
        cache.uninstall(example.db.session)
        cache.redis.close()
        with app.app_context():
            example.db.engine.dispose()


def test_flask_app_serves_products_from_redis_and_restores_on_a_failed_request(
    flask_app: Any,
) -> None:
    client = flask_app.test_client()
    with flask_app.app_context():
        engine = flask_app.extensions["sqlalchemy"].engine
    stats = flask_app.extensions["writethrough"].stats

    created = client.post("/products", json={"id": 1, "name": "Teapot", "price": "19.90"})
    assert created.status_code == 201

    with capture_sql(engine) as sql:
        assert client.get("/products/1").json == {"id": 1, "name": "Teapot", "price": "19.90"}
    assert sql == []  # the commit wrote the row through: the request sent no SQL

    refused = client.patch("/products/1", json={"price": "-1"})  # flushed, then rolled back
    assert refused.status_code == 400
    with capture_sql(engine) as sql:
        assert client.get("/products/1").json["price"] == "19.90"
    assert sql == []  # the rollback put the previous entry back
    assert stats().restores == 1

    updated = client.patch("/products/1", json={"price": "17.50"})
    assert updated.json == {"id": 1, "name": "Teapot", "price": "17.50"}
    with capture_sql(engine) as sql:
        assert client.get("/products/1").json["price"] == "17.50"
    assert sql == []

    assert client.get("/products/2").status_code == 404
    reported = client.get("/cache").json
    assert reported["publishes"] == 2 and reported["errors"] == 0


#: what the example's tests ask the command-line tool
INSPECT = ("inspect", "Product", "1", "--json")


def _cli(example: str, tmp_path: Path, redis_url: str, prefix: str, database_url: str) -> Any:
    """``python -m sqlalchemy_writethrough --app 'app:cli_session()' inspect Product 1 --json``
    run in the example's directory, as its docstring says, on the test's database and prefix."""
    import json

    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_writethrough", "--app", "app:cli_session()", *INSPECT],
        cwd=ROOT / "examples" / example,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "WRITETHROUGH_PREFIX": prefix,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_cli_reaches_the_flask_apps_cache(
    flask_app: Any, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """The app is built by a factory: the tool calls the example's ``cli_session()``."""
    client = flask_app.test_client()
    assert (
        client.post("/products", json={"id": 1, "name": "Teapot", "price": "19.90"}).status_code
        == 201
    )
    report = _cli("flask_app", tmp_path, redis_url, prefix, f"sqlite:///{tmp_path / 'flask.db'}")
    assert report["state"] == "value" and report["equal"] is True, report
    assert report["row"]["name"] == "Teapot"


# ---------------------------------------------------------------------------------- FastAPI


def test_fastapi_app_serves_products_from_redis_and_restores_on_a_failed_request(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("aiosqlite")
    from fastapi.testclient import TestClient

    example = sys.modules.get("writethrough_fastapi_example") or _load(
        ROOT / "examples" / "fastapi_app" / "app.py", "writethrough_fastapi_example"
    )
    app = example.create_app(
        f"sqlite+aiosqlite:///{tmp_path / 'fastapi.db'}", redis_url=redis_url, prefix=prefix
    )
    engine = app.state.engine.sync_engine
    redis_client = redis.Redis.from_url(redis_url)
    # Entering the client runs the lifespan (the cache is built and installed on its loop);
    # leaving it uninstalls and closes the cache and disposes of the engine.
    with TestClient(app) as client, contextlib.closing(redis_client):
        cache = app.state.cache
        key = entry_key(cache, example.Product, 1, bind=engine)

        created = client.post("/products", json={"id": 1, "name": "Teapot", "price": "19.90"})
        assert created.status_code == 201
        assert entry_state(redis_client, key) == "value"  # written through at the commit

        with capture_sql(engine) as sql:
            got = client.get("/products/1")
        assert got.json() == {"id": 1, "name": "Teapot", "price": "19.90"}
        assert sql == []  # served from Redis: the request sent no SQL
        held = redis_client.get(key)

        refused = client.put("/products/1", json={"price": "-1"})  # flushed, then rolled back
        assert refused.status_code == 400
        assert redis_client.get(key) == held  # the rollback put the previous entry back
        with capture_sql(engine) as sql:
            assert client.get("/products/1").json()["price"] == "19.90"
        assert sql == []

        updated = client.put("/products/1", json={"price": "17.50"})
        assert updated.json() == {"id": 1, "name": "Teapot", "price": "17.50"}
        # the command-line tool, which runs no lifespan, reaches the same entry through the
        # example's cli_session()
        report = _cli(
            "fastapi_app",
            tmp_path,
            redis_url,
            prefix,
            f"sqlite+aiosqlite:///{tmp_path / 'fastapi.db'}",
        )
        assert report["state"] == "value" and report["equal"] is True, report
        assert report["row"]["price"] == "17.50"
        assert entry_state(redis_client, key) == "value"
        assert redis_client.get(key) != held  # the new row, written through at the commit
        with capture_sql(engine) as sql:
            assert client.get("/products/1").json()["price"] == "17.50"
        assert sql == []

        assert client.get("/products/2").status_code == 404
        reported = client.get("/cache").json()
        assert reported["publishes"] == 2 and reported["restores"] == 1
        assert reported["errors"] == 0


# ---------------------------------------------------------------------------------- Alembic


def test_the_alembic_projects_readme_walk_through(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every command of examples/alembic_project/README.md, with the output it promises.

    In this process (``alembic``'s own ``main`` and the example's functions), as a subprocess
    per command would cost seconds each in every CI session."""
    alembic_config = pytest.importorskip("alembic.config")
    project = ROOT / "examples" / "alembic_project"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'example.db'}")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("WRITETHROUGH_PREFIX", prefix)
    app = _load(project / "app.py", "writethrough_alembic_example")

    def alembic(*argv: str) -> None:
        alembic_config.main(argv=["-c", str(project / "alembic.ini"), "-q", *argv])

    def show_1() -> str:
        capsys.readouterr()
        app.show(1)
        return capsys.readouterr().out.strip()

    readme = (project / "README.md").read_text()
    promised = re.findall(r"app\.py show 1 +# (.+)", readme)
    assert len(promised) == 4
    try:
        alembic("upgrade", "0001")
        app.seed()
        assert show_1() == promised[0]  # 1500 cents (from Redis)
        alembic("upgrade", "0002")
        assert show_1() == promised[1]  # 3000 cents (from database)
        assert show_1() == promised[2]  # 3000 cents (from Redis)
        alembic("downgrade", "0001")
        assert show_1() == promised[3]  # 1500 cents (from database)
    finally:
        app.cache.uninstall(app.Session)
        app.cache.redis.close()
        app.engine.dispose()
        del sys.modules["writethrough_alembic_example"]


# ------------------------------------------------------------------------- the quickstart page


def test_the_quickstart_pages_first_model_runs_as_shown(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    page = (ROOT / "docs" / "quickstart.md").read_text()
    program = re.findall(r"```python\n(.*?)```", page, re.DOTALL)[0]
    assert 'prefix="myshop"' in program
    (tmp_path / "app.py").write_text(program.replace('prefix="myshop"', f'prefix="{prefix}"'))
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=tmp_path, env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "got Teapot" in out and "got Blue teapot" in out
    assert "INSERT INTO product" in out and "UPDATE product" in out
    assert "SELECT" not in out  # both gets were served from Redis, as the page says
    assert "hits=2, misses=0" in out and "publishes=2" in out
