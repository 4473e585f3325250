"""The distribution a user installs: ``python -m build``, then the wheel in a fresh venv.

The sdist and the wheel are built as a release would build them (the wheel from the sdist, in
build's isolated environment), the wheel is installed with its dependencies into a new virtual
environment with nothing else in it, and the quickstart runs there against the installed copy,
not the repository's. About a minute: CI runs it once, in the SQLAlchemy 2.1 session (the
others pass ``--ignore`` for it, see noxfile.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Builds and installs with pip: minutes on a loaded machine, beyond the suite's 120 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(*args: str | Path, timeout: float = 300, **kwargs: object) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    out: str = done.stdout
    return out


def test_the_built_wheel_installs_into_a_fresh_venv_and_runs_the_quickstart(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert "sqlalchemy_writethrough/py.typed" in names
    scripts = sorted(ROOT.joinpath("sqlalchemy_writethrough", "lua").glob("*.lua"))
    assert scripts and {f"sqlalchemy_writethrough/lua/{s.name}" for s in scripts} <= names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    assert b"License-Expression: MIT" in metadata
    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[-1] for m in archive.getnames()}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"} <= members

    # A venv without pip of its own (ensurepip costs more than the rest), filled by this
    # interpreter's pip: the wheel and its dependencies, nothing else.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--disable-pip-version-check", wheel,
    )  # fmt: skip
    where = _run(
        python, "-c", "import sqlalchemy_writethrough as m; print(m.__file__)", cwd=tmp_path
    )
    assert str(venv) in where  # the installed copy, not the repository's

    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'quickstart.db'}",
        "WRITETHROUGH_PREFIX": prefix,
    }
    out = _run(python, ROOT / "examples" / "quickstart.py", cwd=tmp_path, env=env, timeout=120)
    assert "2 load(s) served from Redis" in out
    assert "previous value(s) put back by the rollback" in out
    assert "0 Redis errors" in out
