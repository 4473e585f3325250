"""SQLAlchemy's own ORM test suite, plainly and with the extension on every Session.

    python tests/sqlalchemy_suite/run.py [--quick | --target test/ext ...] [-n 2] [-- pytest args]

Takes the sdist of the installed SQLAlchemy (it ships ``test/`` and its pytest plugin) into
``.sqlalchemy-suite/`` (``--workdir``), runs ``test/orm`` (``--target``, repeatable: other
folders or files of the sdist, e.g. ``test/ext``; ``--quick``: the files listed in
``quick.txt``) on its default database, SQLite in memory, twice: plainly, then with
``wt_suite_plugin``, each selection's results in a folder of its own. It prints the tests
that fail only with the extension, minus those listed in ``known_failures.txt`` with their
reason, and exits non-zero on any unexplained one, or if the extension was not active.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: the database/driver suffix SQLAlchemy adds to backend-specific test classes
_BACKEND_SUFFIX = re.compile(r"_[a-z]+\+[a-z0-9]+(_\d+)+\b")


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


def run_pass(
    folder: Path, out: Path, targets: list[str], extra: list[str], plugin: bool
) -> tuple[Path, float]:
    junit = out / ("extension.xml" if plugin else "plain.xml")
    status = out / "extension.status"
    command = [sys.executable, "-s", "-m", "pytest", *targets, "-p", "no:cacheprovider"]
    command += ["--maxfail=1000000", "-q", f"--junitxml={junit}", *extra]
    # -s for pytest-xdist's workers too: else the suite's conftest puts the sdist's lib/ (pure
    # Python) before the installed SQLAlchemy
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    if plugin:
        status.unlink(missing_ok=True)
        command += ["-p", "wt_suite_plugin", f"--wt-status={status}"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    label = "with the extension" if plugin else "plainly"
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
        "--report-only", action="store_true", help="compare the results of the last run again"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args()

    folder = sdist_folder(args.workdir)
    targets = list(read_list(HERE / "quick.txt")) if args.quick else args.target or ["test/orm"]
    extra = list(args.pytest_args)
    if args.workers != "0":
        extra += ["-n", args.workers]
    out = args.workdir / ("quick" if args.quick else out_name(targets))
    out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        plain_xml, ext_xml = out / "plain.xml", out / "extension.xml"
    else:
        plain_xml, _ = run_pass(folder, out, targets, extra, plugin=False)
        ext_xml, _ = run_pass(folder, out, targets, extra, plugin=True)

    status = (out / "extension.status").read_text(encoding="utf-8").split("\n")
    skipped = sorted({line for line in status if line.startswith("skipped model ")})
    problems = [line for line in status if line and line != "ok" and line not in skipped]
    plain, ext = outcomes(plain_xml), outcomes(ext_xml)
    known = read_list(HERE / "known_failures.txt")
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
        f"\n{len(ext)} tests; failing plainly: {failed_plain}; failing only with the "
        f"extension: {len(only_ext)} ({len(explained)} known, {len(unexplained)} unexplained)"
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
