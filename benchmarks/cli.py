"""Command line: parse options, run, write the Markdown table and the plot, print versions."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shlex
import sys
import tempfile
from pathlib import Path

from .context import Settings
from .harness import Variant
from .runner import GROUP_ORDER

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Measure sqlalchemy-writethrough against the Redis floor, plain SQLAlchemy on "
            "PostgreSQL and the peers, interleaved in one process."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a few rounds of every row (for CI; the numbers mean nothing); "
        "writes to a temporary directory unless --output-dir is given",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="measured rounds of the single-row group (default 2000; quick: 5). Other groups "
        "scale from it: 100 rows x0.2, lazy loads x0.5, commits of 1 and 10 rows x0.1, of 100 "
        "x0.025, of 1,000 x0.01 (at least 10 rounds each; quick: 3)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up rounds of the single-row group (default: a tenth of --iterations), scaled "
        "like --iterations for the other groups",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=GROUP_ORDER,
        help="run only this group (repeatable)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the peers")
    parser.add_argument(
        "--postgresql-url",
        default=None,
        help="default: $BENCH_POSTGRESQL_URL, "
        "$POSTGRESQL_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="default: $BENCH_REDIS_URL, $REDIS_URL or redis://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where latest.md and latest.png go (default: {RESULTS_DIR} for a full run)",
    )
    parser.add_argument(
        "--name",
        default="latest",
        help="file name (without extension) of the Markdown table and the plot (default: latest)",
    )
    parser.add_argument(
        "--keep-tables",
        action="store_true",
        help="do not drop the run's schema (bench_<8 hex>) and its bench_* tables",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="also measure the sqlalchemy_writethrough package found in DIR (another version, "
        "e.g. `git archive <commit> sqlalchemy_writethrough | tar -x -C DIR`), interleaved "
        "with this one: a 'baseline' row beside each of ours",
    )
    parser.add_argument(
        "--profile",
        metavar="ROW",
        default=None,
        help="after the run, profile the rows whose key or label contains ROW (e.g. "
        "get.cached) with cProfile and print the top functions",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(quick=args.quick, peers=not args.no_peers, keep_tables=args.keep_tables)
    if args.postgresql_url:
        settings.postgresql_url = args.postgresql_url
    if args.redis_url:
        settings.redis_url = args.redis_url
    if args.iterations is not None:
        settings.iterations = args.iterations
    elif args.quick:
        settings.iterations = 5
    if args.warmup is not None:
        settings.warmup = args.warmup
    elif args.quick:
        settings.warmup = 2
    if args.only:
        settings.only = frozenset(args.only)
    if args.baseline is not None:
        settings.baseline = args.baseline.resolve()
    return settings


def main(argv: list[str] | None = None) -> int:
    from . import report, runner

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = settings_from(args)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    nox_session = os.environ.get("NOX_CURRENT_SESSION")
    if nox_session:
        command += f"  # run by: nox -s {nox_session}"
    profile_target = args.profile

    results = runner.run(settings, command, profile=profile_target)
    out_dir = args.output_dir
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="bench-quick-")) if settings.quick else RESULTS_DIR
    files = report.write_outputs(results, out_dir, name=args.name)
    print(report.console_summary(results))
    report.print_versions(results)
    print("\nWrote:")
    for path in files:
        print(f"  {path}")
    broken = [
        v.label
        for g in results.groups
        for v in g.variants
        if v.who in ("ours", "floor", "postgresql") and (v.error or (v.op and not v.samples))
    ]
    if broken:
        print(f"\nCore rows that failed: {broken}", file=sys.stderr)
        return 1
    return 0


def profile_rows(variants: list[Variant], rounds: int) -> None:
    """Profile each variant's op for ``rounds`` calls and print where the time goes."""
    for variant in variants:
        if variant.op is None or variant.error:
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(rounds):
            variant.op(i)
        profiler.disable()
        print(f"\n=== cProfile: {variant.label} ({rounds} operations), by internal time ===")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
        print(f"=== {variant.label}: by cumulative time ===")
        stats.sort_stats("cumulative").print_stats(30)
