"""``sqlalchemy-writethrough``: look after a cache from a shell (also ``python -m sqlalchemy_writethrough``).

::

    sqlalchemy-writethrough --app MODULE:ATTR COMMAND [options]
      stats   [--json] [--reset]
      inspect MODEL PK [--json]
      verify  MODEL [--all | --sample N] [--fix] [--json]
      warm    MODEL [--where SQL] [--batch-size N] [--json]
      purge   (MODEL | --all) [--yes] [--json]
      models  [--json]

``--app`` names the session factory the cache is installed on (a sessionmaker,
scoped_session, async_sessionmaker or async_scoped_session; or the cache itself), as
``package.module:Session``, or a function that builds one, called, as
``package.module:make_session()`` (an application built by a factory has no module-level
one); the module is imported, as the application imports it, from the current directory. A
thin shell over :mod:`.admin`: every command is a function there (an async factory's run in
SQLAlchemy's greenlet on an event loop, see :func:`.admin.run`).

Exit status: 0 done (``verify``: nothing found); 1 ``verify`` found mismatches, or a purge
was not confirmed; 2 a wrong argument or configuration, said in one line on stderr with a
hint; 3 Redis or the database failed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from . import admin
from .cache import WriteThroughCache
from .exc import ConfigurationError
from .stats import CacheStats, Latency

PROG = "sqlalchemy-writethrough"

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


class _Usage(Exception):
    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line with a hint, never the usage block."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(message, f"see '{PROG} --help' or '{PROG} --app M:S COMMAND --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Look after a sqlalchemy-writethrough cache: stats, inspect, verify, warm, purge.",
    )
    parser.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="the session factory the cache is installed on (sessionmaker, scoped_session, "
        "async_sessionmaker or async_scoped_session), or the WriteThroughCache itself; "
        "MODULE:FUNC() calls a function of yours that builds and returns one (an app built "
        "by a factory)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser("stats", help="what the cache did, in every process, per model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--reset", action="store_true", help="zero the shared counters afterwards")

    p = commands.add_parser("models", help="the cached models and their options")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("inspect", help="one entry: state, TTL, row, equal to the database?")
    p.add_argument("model", metavar="MODEL", help="class name or table name")
    p.add_argument("pk", metavar="PK", help="primary key (composite: comma-separated)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("verify", help="compare cached entries with the database")
    p.add_argument("model", metavar="MODEL", help="class name or table name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every entry (the default)")
    which.add_argument("--sample", type=_positive, metavar="N", help="N entries chosen at random")
    p.add_argument("--fix", action="store_true", help="invalidate the mismatched entries")
    p.add_argument("--batch-size", type=_positive, default=1000, metavar="N")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("warm", help="load rows into the cache through its fill protocol")
    p.add_argument("model", metavar="MODEL", help="class name or table name")
    p.add_argument("--where", metavar="SQL", help="only rows matching this SQL condition")
    p.add_argument("--batch-size", type=_positive, default=1000, metavar="N")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("purge", help="invalidate a model's entries, or delete the prefix")
    p.add_argument("model", metavar="MODEL", nargs="?", help="class name or table name")
    p.add_argument("--all", action="store_true", help="delete every key of the cache's prefix")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def load_app(spec: str) -> Any:
    """The object ``MODULE:ATTR`` names (``ATTR`` may be dotted), or what ``MODULE:FUNC(...)``
    returns: an application built by a factory (Flask's ``create_app()``, FastAPI's lifespan)
    has no module-level session factory, so a function of the application's that builds one
    the way the application does is called, with literal arguments if any, as Flask's own
    ``--app 'module:create_app()'`` does."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _Usage(f"--app {spec!r} is not MODULE:ATTR", "for example --app myapp.db:Session")
    name, args, kwargs = _call_of(spec, attr)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise _Usage(
                f"cannot import module {module_name!r}",
                "run the tool from the directory that holds it, or set PYTHONPATH",
            ) from None
        raise
    found: Any = module
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise _Usage(
                f"module {module_name!r} has no attribute {name!r}",
                "name the sessionmaker the cache is installed on, e.g. MODULE:Session, or a "
                "function that builds it, e.g. MODULE:make_session()",
            ) from None
    if args is None:
        if inspect.isfunction(found):
            raise _Usage(
                f"{module_name}:{name} is a function",
                f"to call it, add parentheses: --app '{module_name}:{name}()'",
            )
        return found
    if not callable(found):
        raise _Usage(f"{module_name}:{name} is not callable", f"--app {module_name}:{name}")
    return found(*args, **kwargs)


def _call_of(spec: str, attr: str) -> tuple[str, list[Any] | None, dict[str, Any]]:
    """(dotted name, positional arguments or None when ``attr`` is no call, keywords)."""
    if "(" not in attr and ")" not in attr:
        return attr, None, {}
    try:
        call = ast.parse(attr.strip(), mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError
        name = ast.unparse(call.func)
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError
        args = [ast.literal_eval(arg) for arg in call.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        if len(kwargs) != len(call.keywords):
            raise ValueError
    except (SyntaxError, ValueError):
        raise _Usage(
            f"--app {spec!r} is not MODULE:FUNC(...) with literal arguments",
            "for example --app 'myapp:create_session()' or --app 'myapp:create_session(\"prod\")'",
        ) from None
    return name, args, kwargs


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise _Usage(
                "no command given",
                f"one of stats, inspect, verify, warm, purge, models (see '{PROG} --help')",
            )
        if not args.app:
            raise _Usage("--app is required", "for example --app myapp.db:Session")
        target = load_app(args.app)
        cache = admin.cache_of(target)
        factory = admin.factory_of(target, cache)
        command = _COMMANDS[args.command]

        def run() -> int:
            try:
                return command(args, cache, factory, out)
            finally:
                if args.command in ("warm", "verify"):
                    cache.send_stats()  # what the tool's own reads and fills did counts too

        status: int = admin.run(cache, factory, run)
        return status
    except _Usage as exc:
        return _usage(str(exc), exc.hint)
    except admin.UsageError as exc:
        return _usage(str(exc), exc.hint)
    except ConfigurationError as exc:
        return _usage(str(exc), "check the cache's configuration")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # Redis or the database: one line, the cause, no traceback
        print(f"{PROG}: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _usage(message: str, hint: str) -> int:
    print(f"{PROG}: error: {message} (hint: {hint})", file=sys.stderr)
    return EXIT_USAGE


# -- commands ------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, WriteThroughCache, Any, TextIO], int]


def _stats(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    stats, processes = admin.read_stats(cache)
    if args.reset:
        admin.reset_stats(cache)
    if args.json:
        data = stats_json(stats)
        data["processes"] = processes
        _dump(data, out)
        return EXIT_OK
    _write(out, render_stats(stats, processes, cache.prefix))
    return EXIT_OK


def _models(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    with factory() as session:
        layouts = admin.layouts(cache)
        bind = session.get_bind(mapper=layouts[0].mapper) if layouts else session.get_bind()
    described = cache.models(bind)
    if args.json:
        _dump(
            [
                {
                    "model": info.model.__name__,
                    "classes": [c.__name__ for c in info.classes],
                    "tables": list(info.tables),
                    "keys": info.keys,
                    "ttl": info.options.ttl,
                    "strategy": info.options.strategy,
                    "exclude": sorted(info.options.exclude),
                    "inexact_columns": [str(c) for c in info.inexact_columns],
                    "loads_served": info.loads_served,
                    "not_served_because": info.not_served_because,
                    "also_invalidates": [
                        t if isinstance(t, str) else t.__name__
                        for t in info.options.also_invalidates
                    ],
                    "commits_invalidate_because": info.commits_invalidate_because,
                    "invalidated_by_writes_to": list(info.invalidated_by_writes_to),
                    "written_by_triggers_of": list(info.written_by_triggers_of),
                }
                for info in described.cached
            ],
            out,
        )
        return EXIT_OK
    _write(out, str(described))
    return EXIT_OK


def _inspect(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    layout = admin.find_model(cache, args.model)
    pk = admin.parse_pk(layout, args.pk)
    report = admin.inspect_entry(cache, factory, layout, pk)
    if args.json:
        _dump(admin.jsonable(report), out)
        return EXIT_OK
    lines = [f"{report.model} {', '.join(map(str, pk))}", f"  key    {report.key}"]
    lines.append(f"  state  {report.state}")
    ttl = "none" if report.ttl_ms is None else f"{report.ttl_ms / 1000:.1f} s"
    lines.append(f"  ttl    {ttl}")
    if report.decode_error:
        lines.append(f"  undecodable: {report.decode_error}")
    if report.row is not None:
        lines.append(f"  row    ({report.row_class})")
        width = max(len(a) for a in report.row)
        lines += [f"    {a.ljust(width)}  {v!r}" for a, v in report.row.items()]
    if report.equal is not None:
        if report.equal:
            lines.append("  equal to the database: yes")
        else:
            lines.append(f"  equal to the database: NO ({', '.join(report.differences)})")
    _write(out, "\n".join(lines))
    return EXIT_OK


def _verify(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    layout = admin.find_model(cache, args.model)
    with _progress(f"verify {layout.entity_name}", quiet=args.json) as progress:
        report = admin.verify(
            cache,
            factory,
            layout,
            sample=args.sample,
            batch_size=args.batch_size,
            fix=args.fix,
            progress=progress,
        )
    if args.json:
        _dump(admin.jsonable(report), out)
    else:
        lines = [
            f"{report.model}: {report.checked} entries checked in {report.seconds:.2f} s "
            f"({_rate(report.checked, report.seconds)})",
            f"  equal to the database  {report.equal}",
            f"  old generation         {report.old_generation} (invalidated, never served)",
            f"  locked or leased       {report.in_flux} (in flux, not compared)",
            f"  mismatches             {len(report.mismatches)}",
        ]
        for m in report.mismatches[:50]:
            lines.append(f"    {m.kind:<11} {m.key}  {m.detail}")
        if len(report.mismatches) > 50:
            lines.append(f"    ... and {len(report.mismatches) - 50} more (--json lists them all)")
        if report.fixed:
            lines.append(f"  invalidated            {report.fixed}")
        elif report.mismatches:
            lines.append(f"  fix: {PROG} --app {args.app} verify {args.model} --fix")
        _write(out, "\n".join(lines))
    return EXIT_OK if report.ok else EXIT_FOUND


def _warm(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    layout = admin.find_model(cache, args.model)
    with _progress(f"warm {layout.entity_name}", quiet=args.json) as progress:
        report = admin.warm(
            cache, factory, layout, where=args.where, batch_size=args.batch_size, progress=progress
        )
    if args.json:
        _dump(admin.jsonable(report), out)
        return EXIT_OK
    _write(
        out,
        f"{report.model}: {report.rows} rows in {report.seconds:.2f} s "
        f"({_rate(report.rows, report.seconds)}): {report.filled} filled, "
        f"{report.cached} already cached, {report.skipped} skipped (a writer or Redis)",
    )
    return EXIT_OK


def _purge(args: argparse.Namespace, cache: WriteThroughCache, factory: Any, out: TextIO) -> int:
    if args.all == bool(args.model):
        raise _Usage(
            "purge takes a MODEL or --all (one of them)",
            f"{PROG} --app {args.app} purge Product, or purge --all",
        )
    layout = None if args.all else admin.find_model(cache, args.model)
    what = (
        f"every key under prefix {cache.prefix!r}"
        if layout is None
        else f"every entry of {layout.entity_name} (prefix {cache.prefix!r}, every database)"
    )
    if not args.yes and not _confirm(f"Purge {what}? [y/N] "):
        print(f"{PROG}: not purged", file=sys.stderr)
        return EXIT_FOUND
    report = admin.purge(cache, layout)
    if args.json:
        _dump(admin.jsonable(report), out)
    elif layout is None:
        _write(out, f"deleted {report.deleted} keys under prefix {cache.prefix!r}")
    elif report.done:
        _write(out, f"{layout.entity_name}: every entry invalidated")
    else:
        _write(out, f"{layout.entity_name}: Redis did not answer; nothing was invalidated")
        return EXIT_FAILED
    return EXIT_OK


_COMMANDS: dict[str, Command] = {
    "stats": _stats,
    "models": _models,
    "inspect": _inspect,
    "verify": _verify,
    "warm": _warm,
    "purge": _purge,
}


def _confirm(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        return False
    return answer.strip().lower() in ("y", "yes")


# -- output --------------------------------------------------------------------------------


def _dump(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2, default=str)
    out.write("\n")


def _write(out: TextIO, text: str) -> None:
    out.write(text + "\n")


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


class _progress:
    """A progress bar on stderr when it is a terminal (rich's, when installed), else nothing."""

    def __init__(self, what: str, quiet: bool) -> None:
        self.what = what
        self.enabled = not quiet and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self._last = 0.0

    def __enter__(self) -> admin.Progress | None:
        if not self.enabled:
            return None
        try:
            from rich.progress import Progress
        except ImportError:
            return self._plain
        self._bar = Progress(transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.what, total=None)
        return self._rich

    def _rich(self, done: int, total: int | None) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def _plain(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            of = f"/{total}" if total is not None else ""
            print(f"\r{self.what}: {done}{of}", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled:
            print(file=sys.stderr)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return "inf" if math.isinf(ratio) else f"{ratio:.1f}:1"


def _latency_json(latency: Latency) -> dict[str, Any]:
    return {
        "count": latency.count,
        "mean": latency.mean,
        "p50": latency.p50,
        "p95": latency.p95,
        "p99": latency.p99,
    }


def stats_json(stats: CacheStats) -> dict[str, Any]:
    """A CacheStats as JSON: counters, rates, latencies (seconds) and per-model figures."""
    data: dict[str, Any] = admin.jsonable(stats)
    for name in ("read_latency", "commit_cache_latency", "commit_latency"):
        data[name] = _latency_json(getattr(stats, name))
    data["hit_rate"] = stats.hit_rate
    data["cache_write_success_rate"] = stats.cache_write_success_rate
    data["database_write_success_rate"] = stats.database_write_success_rate
    data["rollback_frequency"] = stats.rollback_frequency
    for name, model in stats.models.items():
        entry = data["models"][name]
        entry["invalidations"] = model.invalidations
        entry["hit_rate"] = model.hit_rate
        ratio = model.read_write_ratio
        entry["read_write_ratio"] = None if ratio is None or math.isinf(ratio) else ratio
        rec = model.recommendation()
        entry["recommendation"] = {"strategy": rec.strategy, "reason": rec.reason}
    return data


def render_stats(stats: CacheStats, processes: list[dict[str, Any]], prefix: str) -> str:
    """The stats as a terminal page: totals, rates, latencies, per model, processes."""
    exited = sum(1 for p in processes if p.get("exited"))
    lines = [
        f"Cache {prefix!r}: {len(processes) - exited} live process(es) reporting"
        + (f", {exited} exited lately" if exited else "")
    ]
    lines.append(
        f"  reads    {stats.hits} hits, {stats.misses} misses (hit rate {_pct(stats.hit_rate)}), "
        f"{stats.locked_reads} found a lock, {stats.bypasses} bypassed"
        + (f"; {stats.near_hits} of the hits from near caches" if stats.near_hits else "")
    )
    lines.append(
        f"  fills    {stats.fills} ({stats.fills_refused} refused), decode errors "
        f"{stats.decode_errors}"
    )
    lines.append(
        f"  writes   {stats.commits} commits, {stats.rollbacks} rollbacks, "
        f"{stats.publishes} rows published, {stats.restores} restored"
    )
    reasons = ", ".join(f"{r} {n}" for r, n in stats.invalidations_by_reason.items())
    lines.append(f"  invalidations {stats.invalidations}" + (f" ({reasons})" if reasons else ""))
    kinds = ", ".join(f"{k} {n}" for k, n in stats.errors_by_kind.items())
    lines.append(
        f"  Redis    {stats.errors} errors"
        + (f" ({kinds})" if kinds else "")
        + f", breaker opened {stats.breaker_openings} times"
        + (", OPEN now in some process" if stats.breaker_open else "")
        + f", journal {stats.journal_size}, new epochs {stats.epochs}"
    )
    lines.append(
        f"  rates    cache writes {_pct(stats.cache_write_success_rate)} ok, database writes "
        f"{_pct(stats.database_write_success_rate)} ok, rollbacks "
        f"{_pct(stats.rollback_frequency)}"
    )
    lines.append("  latency              count      p50        p95        p99")
    for label, lat in (
        ("cached read", stats.read_latency),
        ("commit, cache share", stats.commit_cache_latency),
        ("commit, whole", stats.commit_latency),
    ):
        lines.append(
            f"    {label:<19}{lat.count:>6}  {_ms(lat.p50):>9}  {_ms(lat.p95):>9}  {_ms(lat.p99):>9}"
        )
    if stats.models:
        lines.append(
            "  per model            hits   misses   writes  hit rate  read:write  recommendation"
        )
        for name, m in stats.models.items():
            rec = m.recommendation()
            lines.append(
                f"    {name:<17}{m.hits:>7}  {m.misses:>7}  {m.writes:>7}  "
                f"{_pct(m.hit_rate):>8}  {_ratio(m.read_write_ratio):>10}  {rec}"
            )
    for p in processes:
        if p.get("exited"):
            lines.append(f"  process {p['host']}:{p['pid']}: exited (its counts are in)")
            continue
        state = "breaker OPEN" if p.get("breaker_open") else "ok"
        lines.append(
            f"  process {p['host']}:{p['pid']}: {state}, journal {p.get('journal_size', 0)}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
