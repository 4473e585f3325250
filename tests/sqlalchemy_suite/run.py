"""SQLAlchemy's own ORM test suite, plainly and with the extension on every Session.

    python tests/sqlalchemy_suite/run.py [--quick | --target test/ext ...] [-n 2] [--dburi URL]
        [-- pytest arguments]

Takes the sdist of the installed SQLAlchemy (it ships ``test/`` and its pytest plugin) into
``.sqlalchemy-suite/`` (``--workdir``), runs ``test/orm`` (``--target``, repeatable: other
folders or files of the sdist, e.g. ``test/ext``; ``--quick``: the files listed in
``quick.txt``) on its default database, SQLite in memory, with ``wt_suite_plugin``, then
plainly the tests that failed (pytest's ``--last-failed``; ``--full-plain``: every test
plainly, first, as a full comparison), each selection's results in a folder of its own. It
prints the tests that fail only with the extension, minus those listed in
``known_failures.txt`` with their reason, and exits non-zero on any unexplained one, or if the
extension was not active.

``--dburi postgresql+psycopg://user@host/db`` (or ``mysql+pymysql://...``) runs on that server
instead: the URL's database only serves to connect; each run creates a database of its own
(``wtsuite_<random>``, with the schemas the suite needs), SQLAlchemy's provisioning makes one
per pytest-xdist worker from it, and all of them are dropped at the end. Results go to a
folder named after the backend too (``postgresql-full``, ``postgresql-quick``,
``postgresql-test_ext``).

``--asyncio-flavour`` installs the cache on ``AsyncSession`` instead of ``Session`` (results in
``...-asyncio``): ``test/ext/asyncio`` then runs through the cache's asyncio flavour
(``redis.asyncio``), as asyncio applications do, rather than through the sync one inside the
event loop. An asyncio driver in ``--dburi`` (``postgresql+asyncpg://``, ``mysql+aiomysql://``)
is used for the suite, a synchronous one of the same database for making the run's database.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: the database/driver suffix SQLAlchemy adds to backend-specific test classes:
#: ``_postgresql+psycopg2_15_20``, and on an asyncio driver ``_postgresql+asyncpg_async_15_20``
_BACKEND_SUFFIX = re.compile(r"_[a-z]+\+[a-z0-9]+(_[a-z]+)?(_\d+)+\b")


def read_list(path: Path) -> dict[str, str]:
    """``test id -- reason`` lines (``#`` comments); the reason may be empty."""
    entries = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test, _, reason = line.partition(" -- ")
        entries[test.strip()] = reason.strip()
    return entries


def known_reason(known: dict[str, str], test: str) -> str | None:
    """The reason ``test`` is known to fail with the extension, if listed (``prefix*``)."""
    if test in known:
        return known[test] or "(no reason given)"
    for entry, reason in known.items():
        if entry.endswith("*") and test.startswith(entry[:-1]):
            return reason or "(no reason given)"
    return None


def known_on(known: dict[str, str], backend: str, flavour: str | None = None) -> dict[str, str]:
    """The entries that apply on ``backend``: a reason starting with ``[postgresql, mysql]``
    applies on those backends only (``sqlite`` is the default run's; a ``mysql+`` URL is
    ``mysql`` on MariaDB too), one without such a tag everywhere; ``[asyncio]`` to the runs
    with ``--asyncio-flavour`` only."""
    applying = {}
    for test, reason in known.items():
        tags, bracket, _ = reason.partition("]")
        if reason.startswith("[") and bracket:
            only = {tag.strip() for tag in tags[1:].split(",")}
            if not only & {backend, flavour}:
                continue
        applying[test] = reason
    return applying


def sdist_folder(workdir: Path) -> Path:
    """The unpacked sdist of the installed SQLAlchemy, downloaded once."""
    import sqlalchemy

    version = sqlalchemy.__version__
    folder = workdir / f"sqlalchemy-{version}"
    if (folder / "test" / "orm").is_dir():
        return folder
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / f"sqlalchemy-{version}.tar.gz"
    if not archive.exists():
        # --no-build-isolation: building the metadata in an isolated environment compiles
        # the Cython extensions first (minutes); with setuptools at hand it takes seconds
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", ":all:", "--no-build-isolation", "--dest", str(workdir)),
                f"sqlalchemy=={version}",
            ],
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return folder


def outcomes(junit: Path) -> dict[str, str]:
    """``{test id: 'passed' | 'failed' | 'skipped'}`` with failure messages folded in
    (``failed: <first line>``); ids without the backend suffix of their class."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        test = _BACKEND_SUFFIX.sub("", f"{case.get('classname')}::{case.get('name')}")
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or "").strip().splitlines()
                state = f"failed: {message[0][:160] if message else child.tag}"
                break
            if child.tag == "skipped":
                state = "skipped"
        if state.startswith("failed") or test not in found:
            found[test] = state
    return found


def cache_args(out: Path, failed_only: bool = False) -> list[str]:
    """pytest arguments keeping its cache in ``out`` (never in the sdist's folder) and, with
    ``failed_only``, running only the tests the last run there failed (none if none did): a
    test that passes with the extension needs no plain run."""
    args = ["-o", f"cache_dir={out / 'cache'}"]
    if failed_only:
        args += ["--last-failed", "--last-failed-no-failures", "none"]
    return args


def any_failed(junit: Path) -> bool:
    return any(state.startswith("failed") for state in outcomes(junit).values())


#: schemas SQLAlchemy's suite expects in its database (README.unittests.rst in the sdist)
_SCHEMAS = ("test_schema", "test_schema_2")

#: a synchronous driver for the provisioning of a run whose ``--dburi`` names an asyncio one
#: (the suite itself runs on the asyncio driver, through SQLAlchemy's greenlet adaptation)
_SYNC_DRIVERS = {"asyncpg": "psycopg", "psycopg_async": "psycopg", "aiomysql": "pymysql"}
_SYNC_DRIVERS |= {"asyncmy": "pymysql"}


@contextlib.contextmanager
def fresh_database(dburi: str, out: Path) -> Iterator[str]:
    """The URL of a new, uniquely named database on the server of ``dburi``, for one run.

    On PostgreSQL it holds the schemas the suite needs, and is the template of each xdist
    worker's database. On MySQL/MariaDB a schema is a database: provisioning makes
    ``<worker db>_test_schema(_2)`` per worker (hence at least one worker, see ``main``).
    Afterwards the database is dropped, with the worker databases the passes listed in
    ``out/*.followers`` (``wt_suite_followers``) that SQLAlchemy did not drop itself."""
    from sqlalchemy import create_engine, make_url, pool

    url = make_url(dburi)
    backend = url.get_backend_name()
    driver = url.get_driver_name()
    sync_url = url.set(drivername=f"{backend}+{_SYNC_DRIVERS.get(driver, driver)}")
    admin = create_engine(sync_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    name = f"wtsuite_{uuid.uuid4().hex[:12]}"
    if backend == "postgresql":
        with admin.connect() as conn:
            # UTF8 for the suite's unicode JSONB tests (README.unittests.rst)
            conn.exec_driver_sql(f"CREATE DATABASE {name} ENCODING 'utf8' TEMPLATE template0")
        with create_engine(sync_url.set(database=name), poolclass=pool.NullPool).begin() as conn:
            for schema in _SCHEMAS:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    elif backend in ("mysql", "mariadb"):
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    else:
        sys.exit(f"--dburi: no provisioning for {backend} here (PostgreSQL, MySQL, MariaDB)")
    print(f"== database {name} on {url.get_backend_name()} at {url.host}:{url.port}", flush=True)
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        workers = {
            line.strip()
            for listed in out.glob("*.followers")
            for line in listed.read_text(encoding="utf-8").splitlines()
            if line.strip()
        }
        with admin.connect() as conn:
            for db in [*sorted(workers), name]:
                if backend == "postgresql":
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                else:
                    for suffix in ("", "_test_schema", "_test_schema_2"):
                        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db}{suffix}")
        admin.dispose()


def run_pass(
    folder: Path,
    out: Path,
    targets: list[str],
    extra: list[str],
    plugin: bool,
    dburi: str | None = None,
    failed_only: bool = False,
) -> tuple[Path, float]:
    """One pytest run of the targets, with the extension (``plugin``) or plainly; with
    ``failed_only``, of the tests the last run failed (pytest's cache, kept in ``out``)."""
    junit = out / ("extension.xml" if plugin else "plain.xml")
    junit.unlink(missing_ok=True)
    status = out / "extension.status"
    command = [sys.executable, "-s", "-m", "pytest", *targets, *cache_args(out, failed_only)]
    command += ["--maxfail=1000000", "-q", f"--junitxml={junit}", *extra]
    if dburi:
        command += [f"--dburi={dburi}", "-p", "wt_suite_followers"]
        command += [f"--wt-followers={junit.with_suffix('.followers')}"]
    # -s for pytest-xdist's workers too: else the suite's conftest puts the sdist's lib/ (pure
    # Python) before the installed SQLAlchemy
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    if plugin:
        status.unlink(missing_ok=True)
        command += ["-p", "wt_suite_plugin", f"--wt-status={status}"]
    label = "with the extension" if plugin else "plainly"
    if failed_only:
        label += ", the tests that failed with the extension"
    print(f"== {label}: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    with open(out / (junit.stem + ".log"), "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    print(f"   {elapsed:.0f} s, log in {out / (junit.stem + '.log')}", flush=True)
    if not junit.exists():
        sys.exit(f"no results from the run {label}: see its log")
    return junit, elapsed


def out_name(targets: list[str]) -> str:
    """The results folder of a selection of targets: ``full`` for ``test/orm``, as before."""
    if targets == ["test/orm"]:
        return "full"
    return "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_") for target in targets)


def _backend(dburi: str | None) -> str | None:
    """``postgresql``, ``mysql``, ``mariadb`` for a --dburi; None for the default SQLite."""
    if not dburi:
        return None
    from sqlalchemy import make_url

    return make_url(dburi).get_backend_name()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the files in quick.txt")
    parser.add_argument(
        "--target",
        action="append",
        metavar="PATH",
        help="a folder or file of the sdist to run, repeatable (default: test/orm)",
    )
    parser.add_argument("-n", "--workers", default="2", help="pytest-xdist workers, 0 for none")
    parser.add_argument("--workdir", type=Path, default=REPO / ".sqlalchemy-suite")
    parser.add_argument(
        "--dburi",
        help="run on this PostgreSQL/MySQL/MariaDB server, in a database made for the run "
        "(the URL's database is only connected to)",
    )
    parser.add_argument(
        "--asyncio-flavour",
        action="store_true",
        help="install the cache on AsyncSession (its asyncio flavour) instead of Session: "
        "for test/ext/asyncio",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="compare the results of the last run again"
    )
    parser.add_argument(
        "--full-plain",
        action="store_true",
        help="run every test plainly too (first), not only those failing with the extension",
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args()

    folder = sdist_folder(args.workdir)
    targets = list(read_list(HERE / "quick.txt")) if args.quick else args.target or ["test/orm"]
    extra = list(args.pytest_args)
    backend = _backend(args.dburi)
    if args.workers == "0" and backend in ("mysql", "mariadb"):
        # without xdist the suite's schemas would be the server-wide test_schema(_2)
        args.workers = "1"
    if args.workers != "0":
        extra += ["-n", args.workers]
    selection = "quick" if args.quick else out_name(targets)
    flavour = "asyncio" if args.asyncio_flavour else None
    out = args.workdir / "-".join(filter(None, [backend, selection, flavour]))
    if args.asyncio_flavour:
        os.environ["WT_SUITE_ASYNCIO"] = "1"
    out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        plain_xml, ext_xml = out / "plain.xml", out / "extension.xml"
    else:
        for listed in out.glob("*.followers"):
            listed.unlink()
        # a SIGTERM (timeout, CI) unwinds like Ctrl-C: the run's databases are dropped
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        database = fresh_database(args.dburi, out) if args.dburi else contextlib.nullcontext()
        shutil.rmtree(out / "cache", ignore_errors=True)  # --last-failed: this run's only
        plain_xml = out / "plain.xml"
        with database as dburi:
            if args.full_plain:
                run_pass(folder, out, targets, extra, plugin=False, dburi=dburi)
            ext_xml, _ = run_pass(folder, out, targets, extra, plugin=True, dburi=dburi)
            if not args.full_plain:
                # a test passing with the extension needs no plain run: the failures are run
                # again plainly, to tell the suite's own failures from the extension's
                plain_xml.unlink(missing_ok=True)
                if any_failed(ext_xml):
                    run_pass(folder, out, targets, extra, False, dburi, failed_only=True)

    status = (out / "extension.status").read_text(encoding="utf-8").split("\n")
    skipped = sorted({line for line in status if line.startswith("skipped model ")})
    used = [line.split() for line in status if line.startswith("used ")]
    status = [line for line in status if not line.startswith("used ")]
    problems = [line for line in status if line and line != "ok" and line not in skipped]
    plain = outcomes(plain_xml) if plain_xml.exists() else {}
    ext = outcomes(ext_xml)
    known = known_on(read_list(HERE / "known_failures.txt"), backend or "sqlite", flavour)
    only_ext = {
        test: state
        for test, state in ext.items()
        if state.startswith("failed") and not plain.get(test, "").startswith("failed")
    }
    explained = {test: reason for test in only_ext if (reason := known_reason(known, test))}
    unexplained = {test: state for test, state in only_ext.items() if test not in explained}
    # entries some of whose tests passed with the extension and none failed (one whose tests
    # did not run, in another target or skipped without an async driver, is not reported)
    passed = {test for test, state in ext.items() if state == "passed"}
    fixed = sorted(
        entry
        for entry in known
        if any(known_reason({entry: "x"}, test) for test in passed)
        and not any(known_reason({entry: "x"}, test) for test in explained)
    )
    failed_plain = sum(1 for state in plain.values() if state.startswith("failed"))

    print(
        f"\n{len(ext)} tests; failing plainly"
        f"{' (of those failing with the extension)' if len(plain) < len(ext) else ''}: "
        f"{failed_plain}; failing only with the extension: {len(only_ext)} "
        f"({len(explained)} known, {len(unexplained)} unexplained)"
    )
    if used:
        through = "the asyncio flavour" if args.asyncio_flavour else "the cache"
        print(
            f"  {sum(int(u[1]) for u in used)} of the {sum(int(u[2]) for u in used)} tests run "
            f"with the extension read or wrote through {through}"
        )
    by_reason: dict[str, list[str]] = {}
    for test, reason in sorted(explained.items()):
        by_reason.setdefault(reason, []).append(test)
    for reason, tests in by_reason.items():
        print(f"  known   {len(tests)} x {tests[0]}{' ...' if len(tests) > 1 else ''}")
        print(f"          {reason}")
    for test, state in sorted(unexplained.items()):
        print(f"  FAILED  {test}\n          {state}")
    if fixed and not args.quick:
        print("known failures that did not fail (remove them from known_failures.txt):")
        for test in fixed:
            print(f"  {test}")
    if skipped:
        print(f"models register_all() refused, not cached ({len(skipped)}):")
        for line in skipped:
            print(f"  {line.removeprefix('skipped model ')}")
    if problems:
        print("the extension was NOT active everywhere:")
        for line in problems[:20]:
            print(f"  {line}")
    return 1 if unexplained or problems else 0


if __name__ == "__main__":
    sys.exit(main())
