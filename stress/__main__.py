"""``python -m stress``: run the stress checker or one of its scenarios; see ``--help``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any, Literal

from .faults import ALL_FAULTS, OPT_IN_FAULTS, PLANNED_FAULTS, TOPOLOGY_FAULTS, topology_of
from .runner import (
    ISOLATIONS,
    StressConfig,
    install_signal_handlers,
    key_type_problem,
    run_herd,
    run_outage,
    run_partition,
    run_stress,
)
from .worker import SABOTAGES, WAYS

DEFAULT_URLS = {
    "postgresql": ("POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": ("MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"),
}


def db_url(name: str) -> str:
    env, default = DEFAULT_URLS[name]
    return os.environ.get(env) or default


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress",
        description="Concurrency and failure stress checker for sqlalchemy-writethrough "
        "(loopback only; PostgreSQL/MariaDB from $POSTGRESQL_URL/$MARIADB_URL or the local "
        "defaults; a throwaway redis-server on a free port: $REDIS_SERVER_BINARY and "
        "$REDIS_CLI_BINARY name another build, e.g. Valkey's valkey-server).",
    )
    p.add_argument(
        "--scenario", choices=["stress", "herd", "outage", "partition"], default="stress"
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="total workload time, split evenly over the runs (databases, phases)",
    )
    p.add_argument("--db", choices=["postgresql", "mariadb", "both"], default="both")
    p.add_argument(
        "--faults",
        default="all",
        help="none | all | each (every fault alone, then all together) | a comma-separated "
        f"list of: {', '.join(ALL_FAULTS)} (all), {', '.join(OPT_IN_FAULTS)} (only when "
        f"named); or one of {', '.join(TOPOLOGY_FAULTS)} (a Redis "
        "Sentinel group or Cluster instead of one server; with sigkill and db-errors only)",
    )
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--isolation", choices=[*ISOLATIONS, "both"], default="both")
    p.add_argument(
        "--on-redis-error",
        choices=["strict", "degrade"],
        default="strict",
        help="the cache's mode in the stress scenario (default strict: the "
        "per-connection proxy faults are partitions, where degrade has a documented "
        "gap; stale reads it explains are reported apart as 'gap')",
    )
    p.add_argument(
        "--publish",
        choices=["sync", "background"],
        default="sync",
        help="stress: the cache's publish option (background: the publish after COMMIT runs "
        "on the cache's background worker; reads may miss meanwhile, never be stale)",
    )
    p.add_argument(
        "--near-cache",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stress, outage, partition: give every worker a near cache with this staleness "
        "bound; a read from memory behind a completed commit by more than the bound, or "
        "behind one its own process completed (own-commit), fails the run",
    )
    p.add_argument(
        "--kill-prob",
        type=float,
        default=0.0015,
        help="probability of a SIGKILL at each flush and after each COMMIT",
    )
    p.add_argument(
        "--sabotage",
        choices=SABOTAGES,
        default=None,
        help="break the cache on purpose, to see the checker fail",
    )
    p.add_argument(
        "--fill-wait",
        type=float,
        default=None,
        help="herd: the cache's fill_wait option (default: the library's default)",
    )
    p.add_argument(
        "--paths",
        choices=["unit", "statements", "mixed"],
        default="mixed",
        help="stress: how the mixed workers change rows: the unit of work, statement-level DML "
        "(ORM bulk UPDATE by primary key, update().where(...), range updates, text() through "
        "the session and session.connection(), bulk_update_mappings), or both (default)",
    )
    p.add_argument(
        "--asyncio-workers",
        type=int,
        default=0,
        help="stress: how many of the workers use AsyncSession (asyncpg / aiomysql) and "
        "redis.asyncio, next to the sync ones (a sabotage breaks every worker's flavour)",
    )
    p.add_argument(
        "--tenants",
        type=int,
        default=0,
        metavar="N",
        help="stress: N tenants, one schema each (PostgreSQL schemas, MariaDB databases; "
        "per-run names, dropped at the end) with the same tables and their own data; each "
        "operation picks a tenant and reaches it through a schema_translate_map in one of "
        "the ways users do (see --tenant-ways); a read of another tenant's value fails the "
        "run as 'cross-tenant' (default 0: one database)",
    )
    p.add_argument(
        "--tenant-ways",
        default=",".join(WAYS),
        help="with --tenants: the ways operations may reach their tenant, a comma-separated "
        f"list of: {', '.join(WAYS)} (default: all; unit-of-work writes need one of bind, "
        "maker, connection)",
    )
    p.add_argument(
        "--avoid",
        default=None,
        metavar="PATH:WAY,...",
        help="with --tenants: statement-level write paths never taken with these ways "
        f"(default: {','.join(sorted(KNOWN_DEFECTS))}: SQLAlchemy 2.0 and 2.1 run an ORM "
        "bulk UPDATE by primary key on the default schema when the map is given only to "
        "session.execute(), see tests/test_schema_tenants.py, so that a run checks everything "
        "else; 'none' takes every path with every way)",
    )
    p.add_argument(
        "--no-batch-reads",
        dest="batch_reads",
        action="store_false",
        help="stress, outage, partition: no IN-list reads (select(M).where(M.id.in_(ids)) and "
        "the legacy Query, with from_cache(); 2-8 rows each) in the workers' read mix",
    )
    p.add_argument(
        "--model-versions",
        "--versions",
        type=int,
        choices=[1, 2],
        default=1,
        help="stress: 2 is a rolling deploy: the odd worker slots (w1, w3...; sync and asyncio "
        "alike) run the next code version, whose models (their own declarative base) map the "
        "same tables with one more nullable column (the tables are created with it; version A "
        "does not map it, version B writes it), so its rows have keys of another keyspace on "
        "the same prefix and Redis; both versions read and write the same rows, and every "
        "read of either is checked against the one committed history (reads compare the "
        "counter, never the extra column; at quiescence each version's entries are compared "
        "with the row as that version loads it) (default 1: one version)",
    )
    p.add_argument(
        "--model-b-buckets",
        type=int,
        default=None,
        metavar="N",
        help="with --model-versions 2: the second version's cache 'buckets' (default: the "
        "library's, as version A's); docs/configuration.md says never to change it in a "
        "rolling deploy",
    )
    p.add_argument(
        "--key-type",
        choices=["int", "uuid", "guid"],
        default="int",
        help="stress: the stress tables' primary keys (and item's foreign key): int, uuid "
        "(Uuid columns holding the same logical rows, so that asyncio workers write objects "
        "whose loaded identities hold asyncpg's own UUID class), or guid (the same through a "
        "TypeDecorator, the GUID recipe); uuid and guid: PostgreSQL only, without "
        "--model-versions 2, --tenants or the evict/evict-locks faults (default int)",
    )
    p.add_argument(
        "--rewriting-trigger",
        action="store_true",
        help="stress: a BEFORE INSERT OR UPDATE trigger on the stress tables stores another "
        "counter than the one written (its low bit flipped), as a trigger stamping a column "
        "does; the checker expects what was stored, so a cache writing through the value a "
        "flush sent fails the run (--sabotage blind-triggers shows it)",
    )
    p.add_argument(
        "--sibling-trigger",
        nargs="?",
        const="own",
        choices=["own", "other"],
        help="stress, PostgreSQL: an AFTER trigger on the item table copies each hot item's "
        "counter into its shadow row, which workers read and never write: in the item table "
        "itself (own, the default), or in another cached table (other); the cache must see "
        "which table the trigger writes and invalidate that model whole at every write "
        "(--sabotage blind-self-writers shows a cache that does not)",
    )
    p.add_argument(
        "--ttl",
        type=float,
        default=600.0,
        help="stress: every worker's cache ttl in seconds (default 600); a short one makes the "
        "keyspace registry drop a keyspace soon after its last use (with --idle-second-version)",
    )
    p.add_argument(
        "--evict-registry-every",
        default="0.2,1.0",
        metavar="LOW,HIGH",
        help="with --faults evict-registry: the registry is deleted every LOW to HIGH seconds "
        "(default 0.2,1.0; 0.01,0.06 keeps it rarely whole, so that more transactions go by "
        "two lists of it)",
    )
    p.add_argument(
        "--idle-second-version",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --model-versions 2: the second version's workers all do nothing for SECONDS "
        "in every 2*SECONDS, while the first version goes on (with a short --ttl, the registry "
        "drops their keyspace meanwhile, and they register it again when they resume)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the run's random seed (default: a random one, printed with the result); with "
        "--repeat, the first repetition's, and each next one adds 1",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the history files")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="stress: do the runs N times, each repetition with its own seed, to find a rare "
        "violation: prints a line per run and, at the end, the seeds of the failing ones; "
        "keeps the histories of failing runs only (all with --keep-logs)",
    )
    return p.parse_args(argv)


def phases(spec: str) -> list[frozenset[str]]:
    if spec == "none":
        return [frozenset()]
    if spec == "all":
        return [frozenset(ALL_FAULTS)]
    if spec == "each":
        each = (*ALL_FAULTS, *OPT_IN_FAULTS, *TOPOLOGY_FAULTS)
        return [frozenset({f}) for f in each] + [frozenset(ALL_FAULTS)]
    faults = frozenset(f.strip() for f in spec.split(",") if f.strip())
    for name in sorted(faults & set(PLANNED_FAULTS)):
        raise SystemExit(f"fault {name} is not built yet: it {PLANNED_FAULTS[name]}")
    unknown = faults - set(ALL_FAULTS) - set(OPT_IN_FAULTS) - set(TOPOLOGY_FAULTS)
    if unknown:
        raise SystemExit(f"unknown faults: {sorted(unknown)}")
    try:
        topology_of(faults)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return [faults]


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


#: (path, way) pairs a tenants run avoids unless told otherwise: SQLAlchemy's own defects,
#: which would fail every run (docs/consistency.md, "One schema per tenant")
KNOWN_DEFECTS = frozenset({"bulk_pk:execute"})


def _interval(spec: str) -> tuple[float, float]:
    """``LOW,HIGH`` seconds, 0 < LOW <= HIGH."""
    try:
        low, high = (float(part) for part in spec.split(","))
    except ValueError:
        raise SystemExit(f"--evict-registry-every {spec!r}: expected LOW,HIGH seconds") from None
    if not 0 < low <= high:
        raise SystemExit(f"--evict-registry-every {spec!r}: expected 0 < LOW <= HIGH")
    return low, high


def _avoided(spec: str | None) -> frozenset[str]:
    if spec is None:
        return KNOWN_DEFECTS
    return frozenset(a.strip() for a in spec.split(",") if a.strip() and a.strip() != "none")


def tenant_ways(spec: str) -> tuple[str, ...]:
    ways = tuple(w.strip() for w in spec.split(",") if w.strip())
    unknown = set(ways) - set(WAYS)
    if unknown or not ways:
        raise SystemExit(f"--tenant-ways: choose from {', '.join(WAYS)}; got {spec!r}")
    return ways


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.tenants < 0:
        raise SystemExit("--tenants must be 0 or more")
    if args.model_b_buckets is not None and args.model_versions < 2:
        raise SystemExit("--model-b-buckets needs --model-versions 2")
    if args.idle_second_version and args.model_versions < 2:
        raise SystemExit("--idle-second-version needs --model-versions 2")
    if not args.ttl > 0 or args.idle_second_version < 0:
        raise SystemExit("--ttl must be positive and --idle-second-version 0 or more")
    if args.key_type != "int" and args.scenario != "stress":
        raise SystemExit("--key-type applies to --scenario stress only")
    if args.rewriting_trigger and args.scenario != "stress":
        raise SystemExit("--rewriting-trigger applies to --scenario stress only")
    if args.sabotage == "blind-triggers" and not args.rewriting_trigger:
        raise SystemExit("--sabotage blind-triggers needs --rewriting-trigger")
    if args.sibling_trigger and (args.scenario != "stress" or args.db != "postgresql"):
        raise SystemExit("--sibling-trigger applies to --scenario stress --db postgresql only")
    if args.sabotage == "blind-self-writers" and not args.sibling_trigger:
        raise SystemExit("--sabotage blind-self-writers needs --sibling-trigger")
    ways = tenant_ways(args.tenant_ways)
    install_signal_handlers()
    dbs = ["postgresql", "mariadb"] if args.db == "both" else [args.db]
    isolations = tuple(ISOLATIONS) if args.isolation == "both" else (args.isolation,)
    failed = False
    if args.repeat < 1:
        raise SystemExit("--repeat must be 1 or more")
    if args.repeat > 1 and args.scenario != "stress":
        raise SystemExit("--repeat applies to --scenario stress only")
    if args.scenario == "stress":
        runs = [(db, faults) for db in dbs for faults in phases(args.faults)]
        for db, faults in runs:
            problem = key_type_problem(
                StressConfig(
                    db_url=db_url(db),
                    faults=faults,
                    tenants=args.tenants,
                    model_versions=args.model_versions,
                    key_type=args.key_type,
                )
            )
            if problem:
                raise SystemExit(f"--key-type {args.key_type}: {problem}")
        every = _interval(args.evict_registry_every)
        per_run = args.seconds / len(runs)
        total: dict[str, int] = {}
        keep_logs: bool | Literal["failed"] = args.keep_logs or (
            "failed" if args.repeat > 1 else False
        )
        #: (repetition, database, faults, seed) of each failing run
        failing: list[tuple[int, str, str, Any]] = []
        for repetition, (db, faults) in itertools.product(range(args.repeat), runs):
            seed = None if args.seed is None else args.seed + repetition
            if args.repeat > 1:
                print(f"== repetition {repetition + 1} of {args.repeat}", flush=True)
            result = run_stress(
                StressConfig(
                    db_url=db_url(db),
                    seconds=per_run,
                    faults=faults,
                    workers=args.workers,
                    isolations=isolations,
                    on_redis_error=args.on_redis_error,
                    seed=seed,
                    kill_prob=args.kill_prob,
                    keep_logs=keep_logs,
                    sabotage=args.sabotage,
                    paths=args.paths,
                    asyncio_workers=args.asyncio_workers,
                    publish=args.publish,
                    near_cache=args.near_cache,
                    tenants=args.tenants,
                    tenant_ways=ways,
                    avoid=_avoided(args.avoid),
                    batch_reads=args.batch_reads,
                    model_versions=args.model_versions,
                    model_b_buckets=args.model_b_buckets,
                    ttl=args.ttl,
                    idle_second_version=args.idle_second_version,
                    key_type=args.key_type,
                    evict_registry_every=every,
                    rewriting_trigger=args.rewriting_trigger,
                    sibling_trigger=args.sibling_trigger,
                )
            )
            print(result.format(), flush=True)
            print(flush=True)
            for k, v in result.report.summary().items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
            if not result.report.ok:
                failed = True
                label = ",".join(sorted(faults)) or "none"
                failing.append((repetition + 1, db, label, result.info.get("seed")))
        print("== total over all runs: " + " ".join(f"{k}={v}" for k, v in total.items()))
        if args.repeat > 1:
            print(f"== {len(failing)} of {args.repeat * len(runs)} runs failed")
            for repetition, db, label, seed in failing:
                print(f"   repetition {repetition}: {db}, faults {label}: --seed {seed}")
    elif args.scenario == "herd":
        for db in dbs:
            result = run_herd(db_url(db), keep_logs=args.keep_logs, fill_wait=args.fill_wait)
            wait = "default" if args.fill_wait is None else args.fill_wait
            print(f"== herd on {db}: 50 concurrent readers of one cold row (fill_wait={wait})")
            for r in result["rounds"]:
                print("  " + " ".join(f"{k}={v}" for k, v in r.items()))
    elif args.scenario == "outage":
        for db in dbs:
            out = run_outage(
                db_url(db),
                seconds=args.seconds / len(dbs),
                workers=min(args.workers, 4),
                keep_logs=args.keep_logs,
                near_cache=args.near_cache,
                batch_reads=args.batch_reads,
            )
            report = out.pop("report")
            print(f"== outage on {db} (degrade mode: no user-visible errors expected)")
            print(_dump(out))
            print(report.format())
            failed = failed or not report.ok
    else:
        for db in dbs:
            for mode in ("degrade", "strict"):
                out = run_partition(
                    db_url(db),
                    mode,
                    seconds=args.seconds / len(dbs) / 2,
                    keep_logs=args.keep_logs,
                    near_cache=args.near_cache,
                    batch_reads=args.batch_reads,
                )
                report = out.pop("report")
                print(f"== partition on {db}, on_redis_error={mode}: one writer cut off")
                print(_dump(out))
                print(report.format())
                if mode == "strict":
                    failed = failed or not report.ok or bool(report.gap)
                else:
                    failed = failed or not report.ok
    print("FAILED: the checker found violations" if failed else "OK: no violations")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
