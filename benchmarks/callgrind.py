"""Instruction counts of the library's hot paths under callgrind (``python -m benchmarks.callgrind``).

The wall-clock suite (``python -m benchmarks``) moves by about ±10% from run to run on a small,
shared machine. Instructions do not depend on the machine's load: this tool runs one Python
process under ``valgrind --tool=callgrind --instr-atstart=no`` and switches the instrumentation
on around the measured operations only (``vgdb --pid=<pid> instrumentation on``, the monitor
command ``callgrind_control -i on`` sends), so the import, the set-up and the warm-up are not
counted. What it counts is the client process only, every thread of it: the round trip's wait
(the kernel, the network, Redis's own work, SQLite's file system calls) is not in the numbers.

Each *case* runs ``n`` operations after its warm-up, then dumps its counters (one callgrind
part file per case). A read case counts one window around its whole loop; a commit case, like
the wall-clock commit rows, loads and changes its rows outside the window and counts
``session.commit()`` only, one window per commit. Switching the instrumentation on and off
costs the process a few thousand instructions (the ``posix_spawn`` of ``vgdb`` and the wait):
a calibration case of empty windows measures it, and every case's count is net of its windows.

The database is SQLite (a file in a temporary directory), so that no server's timing changes
what the client executes; Redis is ``--redis-url`` with a fixed key prefix (:data:`PREFIX`: the
same key strings in every run, so that the dicts holding them collide alike), its keys deleted
at the start and at the end, one run at a time per Redis. ``PYTHONHASHSEED=0`` is set for the
measured process. ``--baseline DIR`` measures
another version of the library in the same process (``benchmarks.baseline``), on its own prefix,
with the same cases: a ``baseline`` column and the ratio of the two.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: rows in the SQLite table (read rows, then the commit rows' pools)
ROWS = 2_000
#: distinct rows the Redis get cycles through, and the near cache's hot rows
READ_ROWS = 200
NEAR_HOT_ROWS = 20
#: distinct 100-id lists the IN-list cases cycle through
BATCH_LISTS = 5
BATCH_SIZE = 100
#: the key prefix of every run: fixed, because a key's characters decide how the dicts that
#: hold it collide, and so the count (a random prefix moved a near-cache hit by 1.5%); one run
#: at a time per Redis, under LOCK_KEY
PREFIX = "callgrind-run"
LOCK_KEY = "callgrind-lock"
#: the empty windows of the calibration case
CALIBRATION_WINDOWS = 20


def _take_lock(client: Any, token: str) -> bool:
    """Take LOCK_KEY for this run (``<host>:<pid>:<random>``), or take it over from a run of
    this host whose process is gone: killed (a test's timeout, SIGKILL), it could not delete
    the key, and every run would be refused for the hour the key lives."""
    from redis.exceptions import WatchError

    for _ in range(2):
        if client.set(LOCK_KEY, token, nx=True, ex=3600):
            return True
        held = client.get(LOCK_KEY)
        if held is None:
            continue
        host, _, rest = held.decode(errors="replace").partition(":")
        pid = rest.partition(":")[0]
        if host != platform.node() or not pid.isdigit() or _alive(int(pid)):
            return False
        with client.pipeline() as pipe:  # deleted only if no other run took it meanwhile
            try:
                pipe.watch(LOCK_KEY)
                if pipe.get(LOCK_KEY) == held:
                    pipe.multi()
                    pipe.delete(LOCK_KEY)
                    pipe.execute()
            except WatchError:
                pass
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.callgrind",
        description=(
            "Count the instructions (client process only) of the library's hot paths and of "
            "their bounds under valgrind --tool=callgrind, instrumentation switched on around "
            "the measured operations only. SQLite database, local Redis."
        ),
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=200,
        help="operations counted in the one-row cases (default 200); the 100-row reads and "
        "the one-row commits count a tenth of it, the 100-row commits a fortieth (at least 3)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(
            "BENCH_REDIS_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        ),
        help="default: $BENCH_REDIS_URL, $REDIS_URL or redis://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="also count the sqlalchemy_writethrough package found in DIR (another version, "
        "e.g. `git archive <commit> sqlalchemy_writethrough | tar -x -C DIR`), same cases, "
        "same process",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="CASE",
        help="count only this case (repeatable; the calibration always runs): "
        + ", ".join(CASE_KEYS),
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the callgrind output files (and say where)"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


#: the cases, in the order they run and are reported: (key, label, reference key or "")
CASES: tuple[tuple[str, str, str], ...] = (
    ("floor", "floor: redis-py GET + msgpack.unpackb of a copy of the entry", ""),
    ("session", "bound: `with Session() as s: pass` (a new session opened and closed)", "floor"),
    (
        "session.cached",
        "`with Session() as s: pass` of the cache's factory (its Session class)",
        "session",
    ),
    ("get.plain", "session.get, SQLite, no cache", "floor"),
    ("get.cached", "session.get, from Redis (warm)", "floor"),
    ("get.near", "session.get, near-cache hit", "floor"),
    ("batch.floor", "floor: redis-py MGET of 100 copies + msgpack.unpackb of each", ""),
    ("batch.plain", "100 rows by pk: select ... IN, SQLite, no cache", "batch.floor"),
    (
        "batch.cached",
        "100 rows by pk: select ... IN .options(from_cache()), from Redis",
        "batch.floor",
    ),
    ("batch.near", "100 rows by pk: the same, all from the near cache", "batch.floor"),
    ("commit1.plain", "commit of 1 changed row, SQLite, no cache", ""),
    ("commit1.cached", "commit of 1 changed row, with the extension", "commit1.plain"),
    ("commit100.plain", "commit of 100 changed rows, SQLite, no cache", ""),
    ("commit100.cached", "commit of 100 changed rows, with the extension", "commit100.plain"),
)
CASE_KEYS = tuple(key for key, _, _ in CASES)
#: the cases that run the library (and so run again for --baseline)
LIBRARY_CASES = frozenset(k for k in CASE_KEYS if k.endswith((".cached", ".near")))


def case_iterations(key: str, iterations: int) -> int:
    if key.startswith("batch.") or key.startswith("commit1."):
        return max(3, iterations // 10)
    if key.startswith("commit100."):
        return max(3, iterations // 40)
    return max(3, iterations)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args)
    for key in args.only or ():
        if key not in CASE_KEYS:
            raise SystemExit(f"--only: no case {key!r} (cases: {', '.join(CASE_KEYS)})")
    valgrind = shutil.which("valgrind")
    vgdb = shutil.which("vgdb")
    if valgrind is None or vgdb is None:
        raise SystemExit("valgrind and vgdb are needed (apt-get install valgrind)")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "sqlalchemy_writethrough" / "__init__.py").is_file():
            raise SystemExit(f"--baseline: no sqlalchemy_writethrough package in {args.baseline}")
    command = shlex.join(["python", "-m", "benchmarks.callgrind", *argv])
    if os.environ.get("NOX_CURRENT_SESSION"):
        command += f"  # run by: nox -s {os.environ['NOX_CURRENT_SESSION']}"
    work = Path(tempfile.mkdtemp(prefix="callgrind-"))
    try:
        counts, meta = run_under_valgrind(args, valgrind, work)
        text = render(counts, meta, command, args)
    finally:
        if args.keep:
            print(f"callgrind output files kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"\nWrote {args.output}")
    return 0


def run_under_valgrind(
    args: argparse.Namespace, valgrind: str, work: Path
) -> tuple[dict[tuple[str, str], float], dict[str, Any]]:
    """Run the child under callgrind; return instructions per operation by (case, version)."""
    child_args = [
        "--child",
        str(work),
        "--iterations",
        str(args.iterations),
        "--redis-url",
        args.redis_url,
    ]
    if args.baseline is not None:
        child_args += ["--baseline", str(args.baseline)]
    for key in args.only or ():
        child_args += ["--only", key]
    cmd = [
        valgrind,
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={work}/callgrind.out.%p",
        f"--log-file={work}/valgrind.log",  # the process's own stderr shows its progress
        sys.executable,
        "-m",
        "benchmarks.callgrind",
        *child_args,
    ]
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"  # the same dict and set orders in every run
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    print(f"running: {shlex.join(cmd)}", file=sys.stderr)
    done = subprocess.run(cmd, cwd=REPO, env=env)
    manifest_path = work / "manifest.json"
    if done.returncode != 0 or not manifest_path.is_file():
        log = work / "valgrind.log"
        if log.is_file():
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
        raise SystemExit(f"the measured process failed (exit status {done.returncode})")
    manifest = json.loads(manifest_path.read_text())
    pid = manifest["pid"]
    totals: dict[int, int] = {}
    for dump in manifest["dumps"]:
        totals[dump["part"]] = read_total(work / f"callgrind.out.{pid}.{dump['part']}")
    calibration = next(d for d in manifest["dumps"] if d["key"] == "calibration")
    per_window = totals[calibration["part"]] / calibration["windows"]
    counts: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    for dump in manifest["dumps"]:
        if dump["key"] == "calibration":
            continue
        net = totals[dump["part"]] - dump["windows"] * per_window
        counts[(dump["key"], dump["version"])] = net / dump["ops"]
        if dump.get("note"):
            notes.append(f"`{dump['key']}` ({dump['version']}): {dump['note']}")
    meta = dict(manifest["meta"])
    meta["per_window"] = per_window
    meta["notes"] = notes
    meta["symbols"] = interpreter_symbols(work / f"callgrind.out.{pid}.{calibration['part']}")
    meta["valgrind"] = subprocess.run(
        [valgrind, "--version"], capture_output=True, text=True
    ).stdout.strip()
    return counts, meta


_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


def read_total(path: Path) -> int:
    """The instructions a callgrind part file counts (its ``totals:`` line)."""
    found = [int(m) for m in _TOTALS.findall(path.read_text(errors="replace"))]
    if not found:
        raise SystemExit(f"no totals in {path}")
    return max(found)


def interpreter_symbols(path: Path) -> bool:
    """Whether callgrind could name the interpreter's own functions (python not stripped):
    the counts do not need it, but ``callgrind_annotate`` of a kept file (``--keep``) does."""
    return "_PyEval_EvalFrameDefault" in path.read_text(errors="replace")


# --------------------------------------------------------------------------- the report


def _fmt(n: float) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:,.2f}M"
    if n >= 100_000:
        return f"{n / 1e3:,.1f}k"
    return f"{n:,.0f}"


def render(
    counts: dict[tuple[str, str], float], meta: dict[str, Any], command: str, args: Any
) -> str:
    baseline = args.baseline is not None
    out = ["# Instruction counts (callgrind)", "", "Command:", "", "```", command, "```", ""]
    out.append(
        "Instructions per operation executed by the client process (all its threads) while "
        "callgrind's instrumentation was on: the operations only, after their warm-up; not "
        "the round trip's wait, nor Redis's or the kernel's work. SQLite database file, "
        f"Redis {args.redis_url}, PYTHONHASHSEED=0. Switching the instrumentation on and off "
        f"costs {meta['per_window']:,.0f} instructions a window, subtracted."
    )
    out.append("")
    for name, value in meta["versions"].items():
        out.append(f"- {name}: {value}")
    out.append(f"- valgrind: {meta['valgrind']}")
    out.append(
        "- interpreter symbols: "
        + ("visible to callgrind" if meta["symbols"] else "HIDDEN (stripped python)")
    )
    out.append(f"- Redis prefix: `{meta['prefix']}` (its keys deleted at the end)")
    if baseline:
        out.append(f"- baseline: {meta.get('baseline', args.baseline)}")
    out.append("")
    head = "| case | operation | ops counted | instructions per op | x ref |"
    rule = "|---|---|---:|---:|---:|"
    if baseline:
        head += " baseline | this / baseline |"
        rule += "---:|---:|"
    out += [head, rule]
    for key, label, ref in CASES:
        ours = counts.get((key, "ours"))
        if ours is None:
            continue
        ref_value = counts.get((ref, "ours")) if ref else None
        rel = f"{ours / ref_value:.2f} (`{ref}`)" if ref_value else "-"
        ops = meta["ops"].get(key, "")
        row = f"| `{key}` | {label} | {ops} | {_fmt(ours)} | {rel} |"
        if baseline:
            base = counts.get((key, "baseline"))
            if base is None:
                row += " - | - |" if key in LIBRARY_CASES else " | |"
            else:
                row += f" {_fmt(base)} | {ours / base:.3f} |"
        out.append(row)
    out.append("")
    if meta.get("notes"):
        out.append("Not what the case means to count (checked once after its warm-up):")
        out.append("")
        out += [f"- {note}" for note in meta["notes"]]
        out.append("")
    ratios = compute_ratios(counts)
    if ratios:
        out += ["| ratio (instructions) | this version |", "|---|---:|"]
        out += [f"| {name} | {value} |" for name, value in ratios]
        out.append("")
    return "\n".join(out)


def compute_ratios(counts: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    def get(key: str) -> float | None:
        return counts.get((key, "ours"))

    found: list[tuple[str, str]] = []

    def ratio(name: str, num: str, den: str) -> None:
        a, b = get(num), get(den)
        if a is not None and b:
            found.append((name, f"{a / b:.2f}x"))

    def overhead(name: str, ours: str, plain: str) -> None:
        a, b = get(ours), get(plain)
        if a is not None and b:
            found.append((name, f"{(a - b) / b * 100:+.0f}%"))

    ratio("cached session.get / floor", "get.cached", "floor")
    ratio("near-cache hit / floor", "get.near", "floor")
    ratio("a new Session opened and closed / floor (every get row pays it)", "session", "floor")
    ratio("near-cache hit / a new Session opened and closed", "get.near", "session")
    ratio("session.get on SQLite, no cache / cached session.get", "get.plain", "get.cached")
    ratio("100 rows from Redis / their MGET + unpack", "batch.cached", "batch.floor")
    ratio("100 rows: near cache / Redis", "batch.near", "batch.cached")
    ratio("100 rows: SQLite, no cache / from Redis", "batch.plain", "batch.cached")
    overhead(
        "commit of 1 row: the extension over plain SQLAlchemy", "commit1.cached", "commit1.plain"
    )
    overhead(
        "commit of 100 rows: the extension over plain SQLAlchemy",
        "commit100.cached",
        "commit100.plain",
    )
    return found


# --------------------------------------------------------------------------- the child


class Meter:
    """Switches callgrind's instrumentation of this very process on and off, and dumps its
    counters, through ``vgdb`` (callgrind's monitor commands). The command is sent by a
    process spawned with ``posix_spawn`` and waited for: it has taken effect on return."""

    def __init__(self) -> None:
        vgdb = shutil.which("vgdb")
        if vgdb is None:
            raise SystemExit("vgdb not found")
        self._argv = [vgdb, f"--pid={os.getpid()}", "--max-invoke-ms=1"]
        self._env = {"PATH": os.environ.get("PATH", "")}
        null = os.open(os.devnull, os.O_WRONLY)
        self._actions = [(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
        self.dumps = 0
        self._command("instrumentation", "off")  # fails at once when not under callgrind

    def _command(self, *words: str) -> None:
        pid = os.posix_spawn(
            self._argv[0], [*self._argv, *words], self._env, file_actions=self._actions
        )
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit(
                f"vgdb {' '.join(words)} failed (status {status}): run this under valgrind "
                "--tool=callgrind (python -m benchmarks.callgrind does)"
            )

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        self._command("instrumentation", "on")
        try:
            yield
        finally:
            self._command("instrumentation", "off")

    def dump(self, reason: str) -> int:
        self._command("dump", reason)
        self.dumps += 1
        return self.dumps


@dataclass
class Case:
    key: str
    version: str
    ops: int
    warmup: int
    #: op(i, meter): one operation; ``meter`` given: it opens its own window around what it
    #: measures (the commit cases); None: the whole loop is one window
    op: Callable[[int, Meter | None], None]
    windowed: bool = False
    check: Callable[[], str | None] | None = None


def child_main(args: argparse.Namespace) -> int:
    import warnings

    warnings.simplefilter("ignore")  # SQLite's Decimal warning, once, outside any window
    work: Path = args.child
    started = time.monotonic()
    meter = Meter()
    env = ChildEnv(work, args.redis_url, args.baseline)
    dumps: list[dict[str, Any]] = []
    ops: dict[str, int] = {}
    try:
        cases = env.cases(args.iterations, set(args.only or CASE_KEYS))
        # calibration: empty windows (the first one warms the spawn path up)
        with meter.window():
            pass
        meter.dump("warm-up")
        gc.collect()
        for _ in range(CALIBRATION_WINDOWS):
            with meter.window():
                pass
        part = meter.dump("calibration")
        dumps.append(
            {
                "key": "calibration",
                "version": "",
                "part": part,
                "windows": CALIBRATION_WINDOWS,
                "ops": 0,
            }
        )
        for case in cases:
            for i in range(case.warmup):
                case.op(case.ops + i, None if not case.windowed else _NoMeter())
            problem = case.check() if case.check is not None else None
            if problem:  # counted all the same, with the note beside it
                print(f"  ! {case.key} ({case.version}): {problem}", file=sys.stderr)
            gc.collect()
            if case.windowed:
                for i in range(case.ops):
                    case.op(i, meter)
                windows = case.ops
            else:
                with meter.window():
                    for i in range(case.ops):
                        case.op(i, None)
                windows = 1
            part = meter.dump(f"{case.key} {case.version}")
            dumps.append(
                {
                    "key": case.key,
                    "version": case.version,
                    "part": part,
                    "windows": windows,
                    "ops": case.ops,
                    "note": problem or "",
                }
            )
            ops[case.key] = case.ops
            print(
                f"  [{time.monotonic() - started:6.1f}s] counted {case.key} ({case.version}): "
                f"{case.ops} ops",
                file=sys.stderr,
            )
        manifest = {"pid": os.getpid(), "dumps": dumps, "meta": {**env.meta(), "ops": ops}}
        (work / "manifest.json").write_text(json.dumps(manifest))
    finally:
        env.close()
    return 0


class _NoMeter(Meter):
    """A meter whose windows do nothing (the commit cases' warm-up)."""

    def __init__(self) -> None:
        self.dumps = 0

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        yield


class ChildEnv:
    """The SQLite database, the Redis client, the caches and the cases' operations."""

    def __init__(self, work: Path, redis_url: str, baseline: Path | None) -> None:
        import redis
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        from .data import fill
        from .models import Base, Item

        self.Item = Item
        self.Base = Base
        self.redis_url = redis_url
        self.engine = create_engine(f"sqlite:///{work / 'callgrind.db'}")
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            fill(conn, ROWS)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = PREFIX
        self._token = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not _take_lock(self.redis, self._token):
            self.redis.close()
            raise SystemExit(
                f"another python -m benchmarks.callgrind is running against {redis_url} "
                f"(its key {LOCK_KEY!r}, an hour at most): the runs share one key prefix"
            )
        from .data import delete_pattern, glob_escape

        delete_pattern(self.redis, glob_escape(PREFIX) + "*")  # a killed run's leftovers
        # plain SQLAlchemy on an engine no cache watches (so its connections skip SQLAlchemy's
        # event dispatch, as in a process without the library): the same file
        self.plain_engine = create_engine(f"sqlite:///{work / 'callgrind.db'}")
        self.plain = sessionmaker(self.plain_engine)
        self.read_pks = list(range(1, READ_ROWS + 1))
        self.hot_pks = self.read_pks[:NEAR_HOT_ROWS]
        self.batches = [
            list(range(1 + b * 7, 1 + b * 7 + BATCH_SIZE * 1, 1)) for b in range(BATCH_LISTS)
        ]
        # commit pools: disjoint ranges of rows no read case reads, one per committing maker
        self._pool_start = READ_ROWS + BATCH_SIZE + BATCH_LISTS * 7 + 1
        self._pools = 0
        self.closers: list[Callable[[], None]] = []
        self.versions: list[tuple[str, Any, str]] = [("ours", None, self.prefix)]
        self.baseline_name = ""
        if baseline is not None:
            from . import baseline as baseline_mod

            module = baseline_mod.load(baseline)
            self.baseline_name = baseline_mod.describe(baseline)
            self.versions.append(("baseline", module, f"{self.prefix}-baseline"))
        self.floor_keys: list[str] = []
        self._sessionmaker = sessionmaker

    def pool(self, size: int, ops: int) -> list[int]:
        """A fresh range of rows for one commit case (``size`` rows per commit)."""
        count = min(size * 4, ROWS // 8)
        start = self._pool_start + self._pools * (ROWS // 8)
        self._pools += 1
        if start + count > ROWS:
            raise SystemExit("not enough rows for the commit cases")
        return list(range(start, start + count))

    def close(self) -> None:
        from .data import delete_pattern, glob_escape

        for close in reversed(self.closers):
            try:
                close()
            except Exception as exc:
                print(f"  ! closing: {type(exc).__name__}: {exc}", file=sys.stderr)
        try:
            delete_pattern(self.redis, glob_escape(self.prefix) + "*")
            if self.redis.get(LOCK_KEY) == self._token.encode():
                self.redis.delete(LOCK_KEY)
        finally:
            self.redis.close()
            self.engine.dispose()
            self.plain_engine.dispose()

    def meta(self) -> dict[str, Any]:
        import sqlite3

        import msgpack
        import redis
        import sqlalchemy

        from .report import _git

        versions = {
            "Python": f"{platform.python_implementation()} {platform.python_version()} "
            f"({sys.executable})",
            "sqlalchemy-writethrough": f"git {_git()}",
            "SQLAlchemy": sqlalchemy.__version__,
            "redis-py": redis.__version__,
            "msgpack": ".".join(str(part) for part in msgpack.version),
            "Redis server": str(self.redis.info("server").get("redis_version")),
            "SQLite": sqlite3.sqlite_version,
        }
        meta: dict[str, Any] = {"versions": versions, "prefix": self.prefix}
        if self.baseline_name:
            meta["baseline"] = self.baseline_name
        return meta

    # ------------------------------------------------------------------ makers

    @staticmethod
    def _keeps(module: Any) -> dict[str, Any]:
        """``keep_connections=True`` for a version that has the option (benchmarks/context.py
        ``keeps``: this file runs under valgrind on its own)."""
        import inspect

        params = inspect.signature(module.WriteThroughCache.__init__).parameters
        return {"keep_connections": True} if "keep_connections" in params else {}

    def cache(self, module: Any, prefix: str) -> tuple[Any, Any]:
        """A cache of ``module`` (None: ours) on ``prefix``, without a near cache, and its
        sessionmaker."""
        if module is None:
            import sqlalchemy_writethrough as module
        # threads keep their connection, as a cache built from a URL does
        cache = module.WriteThroughCache(
            self.redis, prefix=prefix, stats_interval=None, **self._keeps(module)
        )
        maker = self._sessionmaker(self.engine)
        if module.__name__ != "sqlalchemy_writethrough":
            cache.register_all(self.Base)  # its mixin is not ours: name the models
        cache.install(maker)
        self.closers.append(lambda: cache.uninstall(maker))
        return cache, maker

    def caches(self, module: Any, prefix: str) -> tuple[Any, Any, Any, Any]:
        """(cache, maker, near cache or None, near maker or None) of one library version."""
        if module is None:
            import sqlalchemy_writethrough as module
        cache, maker = self.cache(module, prefix)
        options = getattr(module, "NearCacheOptions", None)
        # copies that outlive valgrind's slowness: expiry would send reads to Redis mid-count
        near_option: Any = options(staleness=3600.0) if options is not None else True
        try:
            near = module.WriteThroughCache(
                self.redis_url,
                prefix=prefix,
                stats_interval=None,
                near_cache=near_option,
                socket_timeout=5,
                socket_connect_timeout=5,
            )
        except TypeError:  # a version without a near cache
            return cache, maker, None, None
        if module.__name__ != "sqlalchemy_writethrough":
            near.register_all(self.Base)
        near_maker = self._sessionmaker(self.engine)
        near.install(near_maker)
        self.closers.append(near.close)
        return cache, maker, near, near_maker

    # ------------------------------------------------------------------ cases

    def cases(self, iterations: int, wanted: set[str]) -> list[Case]:
        from sqlalchemy import select

        from .core import change_rows, count_sql, read_floor

        Item = self.Item
        out: list[Case] = []
        n = {key: case_iterations(key, iterations) for key in CASE_KEYS}

        def no_sql(op: Callable[[int, Meter | None], None]) -> Callable[[], str | None]:
            def check() -> str | None:
                with count_sql(self.engine) as statements:
                    op(0, None)
                return f"{len(statements)} SQL statement(s) per operation" if statements else None

            return check

        def get(maker: Any, pks: list[int]) -> Callable[[int, Meter | None], None]:
            def op(i: int, meter: Meter | None) -> None:
                with maker() as s:
                    s.get(Item, pks[i % len(pks)])

            return op

        def opened(maker: Any) -> Callable[[int, Meter | None], None]:
            def op(i: int, meter: Meter | None) -> None:
                with maker():
                    pass

            return op

        def batch(maker: Any, *opts: Any) -> Callable[[int, Meter | None], None]:
            batches = self.batches

            def op(i: int, meter: Meter | None) -> None:
                ids = batches[i % len(batches)]
                with maker() as s:
                    rows = s.execute(select(Item).where(Item.id.in_(ids)).options(*opts))
                    if len(rows.scalars().all()) != len(ids):
                        raise AssertionError("rows missing")

            return op

        def commit(maker: Any, size: int, ops: int) -> Callable[[int, Meter | None], None]:
            pool = self.pool(size, ops)

            def op(i: int, meter: Meter | None) -> None:
                start = (i * size) % len(pool)
                ids = (pool + pool)[start : start + size]
                with maker() as s:
                    objs = list(s.scalars(select(Item).where(Item.id.in_(ids))))
                    change_rows(objs)
                    assert meter is not None
                    with meter.window():
                        s.commit()

            return op

        def add(key: str, version: str, op: Any, warmup: int, **kw: Any) -> None:
            if key in wanted:
                out.append(Case(key, version, n[key], warmup, op, **kw))

        # the library's versions first: their warm-up fills Redis for the floor's copies
        library: list[Case] = []
        for version, module, prefix in self.versions:
            cache, maker, near, near_maker = self.caches(module, prefix)
            # commits on a prefix of their own: no near cache listens to their invalidations
            # (a listener thread handling them inside a window would count at random)
            _, commit_maker = self.cache(module, f"{prefix}-commit")
            from_cache = (module or __import__("sqlalchemy_writethrough")).from_cache
            self.warm(maker, near_maker)
            if version == "ours":
                self.copy_floor_entries(cache)
            cases: list[tuple[str, Any, int, dict[str, Any]]] = []
            cases.append(("session.cached", opened(maker), 20, {}))
            op = get(maker, self.read_pks)
            cases.append(("get.cached", op, READ_ROWS, {"check": no_sql(op)}))
            if near_maker is not None:
                op = get(near_maker, self.hot_pks)
                check = self.near_check(near, op, 1)
                cases.append(("get.near", op, NEAR_HOT_ROWS * 2, {"check": check}))
            op = batch(maker, from_cache())
            cases.append(("batch.cached", op, BATCH_LISTS * 2, {"check": no_sql(op)}))
            if near_maker is not None:
                op = batch(near_maker, from_cache())
                cases.append(
                    (
                        "batch.near",
                        op,
                        BATCH_LISTS * 2,
                        {"check": self.near_check(near, op, BATCH_SIZE)},
                    )
                )
            for size in (1, 100):
                key = f"commit{size}.cached"
                cases.append((key, commit(commit_maker, size, n[key]), 3, {"windowed": True}))
            for key, op, warmup, kw in cases:
                if key in wanted:
                    library.append(Case(key, version, n[key], warmup, op, **kw))

        client = self.redis
        floor_keys = self.floor_keys

        read_keys = [floor_keys[pk - 1] for pk in self.read_pks]

        def floor(i: int, meter: Meter | None) -> None:
            read_floor(client, read_keys[i % len(read_keys)])

        add("floor", "ours", floor, READ_ROWS)

        def session(i: int, meter: Meter | None) -> None:
            with self.plain():
                pass

        add("session", "ours", session, 20)
        add("get.plain", "ours", get(self.plain, self.read_pks), READ_ROWS)

        import msgpack

        from sqlalchemy_writethrough.protocol import payload_of

        batch_keys = [[floor_keys[pk - 1] for pk in ids] for ids in self.batches]

        def batch_floor(i: int, meter: Meter | None) -> None:
            # bytes: every copy exists (the same loop as the wall-clock batch bound, no check)
            for raw in client.mget(batch_keys[i % len(batch_keys)]):
                msgpack.unpackb(payload_of(raw)[1:], raw=False)  # type: ignore[arg-type]

        add("batch.floor", "ours", batch_floor, BATCH_LISTS * 2)
        add("batch.plain", "ours", batch(self.plain), BATCH_LISTS * 2)
        for size in (1, 100):
            key = f"commit{size}.plain"
            add(key, "ours", commit(self.plain, size, n[key]), 3, windowed=True)

        order = {key: index for index, key in enumerate(CASE_KEYS)}
        everything = out + library
        everything.sort(key=lambda c: (order[c.key], c.version != "ours"))
        return everything

    def warm(self, maker: Any, near_maker: Any) -> None:
        Item = self.Item
        every = dict.fromkeys([*self.read_pks, *(pk for ids in self.batches for pk in ids)])
        with maker() as s:
            for pk in every:
                s.get(Item, pk)
                s.expunge_all()
        if near_maker is not None:
            with near_maker() as s:
                for pk in every:
                    s.get(Item, pk)
                    s.expunge_all()

    def copy_floor_entries(self, cache: Any) -> None:
        """Plain keys holding copies of our entries' bytes, indexed by pk - 1 (the floor's)."""
        from sqlalchemy import inspect

        layout = cache._layout_for(inspect(self.Item))  # private: the entry's key
        keys = cache._keys(layout, self.engine)
        every = sorted({*self.read_pks, *(pk for ids in self.batches for pk in ids)})
        for pk in range(1, every[-1] + 1):
            raw = self.redis.get(keys.pair([pk])[0]) if pk in every else None
            floor_key = f"{self.prefix}:floor:{pk}"
            if raw is not None:
                self.redis.set(floor_key, raw)
            self.floor_keys.append(floor_key)

    def near_check(
        self, near: Any, op: Callable[[int, Meter | None], None], rows: int
    ) -> Callable[[], str | None]:
        """A check that one operation is served from the near cache, all ``rows`` of it."""
        from .core import count_sql

        def check() -> str | None:
            before = near.stats()
            with count_sql(self.engine) as statements:
                op(0, None)
            served = near.stats().near_hits - before.near_hits
            if statements or served != rows:
                return f"{served} of {rows} rows from memory, {len(statements)} SQL statement(s)"
            return None

        return check


if __name__ == "__main__":
    raise SystemExit(main())
