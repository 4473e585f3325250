"""Runs: the stress run (workers + faults + checker) and the herd, outage and partition scenarios.

Every function here starts what it needs (a throwaway ``redis-server`` on a free loopback port,
the proxy, worker processes) and stops all of it before returning, also on errors: processes
started here die with the thread that started them (``PR_SET_PDEATHSIG``), are killed in
``finally`` blocks and at exit, and every wait has a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from inspect import signature
from pathlib import Path
from typing import Any, Literal

import redis
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.cluster import slot_of
from sqlalchemy_writethrough.keys import epoch_key, registry_key
from sqlalchemy_writethrough.protocol import payload_of

from .checker import DEFAULT_TENANT, Report, Row, check, tenant_table, versioned
from .cluster import ClusterGroup
from .eviction import EvictionListener, LockDropper, Squeezer
from .faults import (
    ALL_FAULTS,
    OPT_IN_FAULTS,
    PROXIED,
    TOPOLOGY_FAULTS,
    FaultSchedule,
    topology_of,
)
from .history import Recorder, now, read_histories
from .models import (
    KEY_TYPES,
    SHADOWS,
    VERSIONS,
    StItem,
    StParent,
    StShadow,
    create_rewriting_triggers,
    create_sibling_trigger,
    create_tenant_schemas,
    drop_tenant_schemas,
    first_value,
    key_part_id,
    metadata_of,
    reset_schema,
    stored_value,
)
from .proxy import FaultyProxy
from .redis_server import RedisServer, die_with_parent
from .sentinel import SentinelGroup
from .worker import make_engine

REPO_ROOT = Path(__file__).resolve().parents[1]
ISOLATIONS = ("READ COMMITTED", "REPEATABLE READ")
HOT_ITEMS = list(range(1, 9))
PARENTS = [1, 2]
#: rows only the outage scenario's database-only baseline touches (never through the cache)
BASELINE_ITEMS = list(range(101, 109))
BASELINE_PARENTS = [101, 102]

Log = Callable[[str], None]

_live: set[subprocess.Popen[bytes]] = set()


def _kill_live() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)
        _live.discard(proc)


atexit.register(_kill_live)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so ``finally`` blocks stop what was started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, _on_sigterm)


def spawn(config: dict[str, Any], workdir: Path) -> subprocess.Popen[bytes]:
    name = config["worker"]
    path = workdir / f"cfg-{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(workdir / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stress.worker", str(path)],
            cwd=str(REPO_ROOT),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    _live.add(proc)
    return proc


def start_when_ready(
    workdir: Path, names: list[str], procs: list[subprocess.Popen[bytes]], what: str
) -> int:
    """Wait (at most 120 s) until every worker named has said it is ready (imported,
    connected), and return the time the run's clock starts: now. On a loaded machine start-up
    alone once took longer than a phase of a short run."""
    give_up = time.monotonic() + 120
    while not all((workdir / f"{name}.ready").exists() for name in names):
        if time.monotonic() > give_up or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{what} workers did not get ready within 120 s")
        time.sleep(0.05)
    return now()


def release(start_file: Path, deadline: int, baseline: tuple[int, int] | None = None) -> None:
    """Let the waiting workers go: the deadline (and the database-only baseline's span, for
    the outage scenario's workers) in their start file, written at once."""
    tmp = start_file.with_suffix(".tmp")
    tmp.write_text(" ".join(str(t) for t in (deadline, *(baseline or ()))))
    tmp.replace(start_file)


def reap(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    """Wait for the processes until ``deadline`` (monotonic seconds), then kill them."""
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        _live.discard(proc)


@contextlib.contextmanager
def workspace(keep: bool | Callable[[], bool], log: Log) -> Iterator[Path]:
    """A folder for the run's histories, removed afterwards unless ``keep`` (or ``keep()``,
    asked at the end: whether the run failed) says otherwise."""
    path = Path(tempfile.mkdtemp(prefix="stress-"))
    try:
        yield path
    finally:
        if keep() if callable(keep) else keep:
            log(f"histories kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def seed_rows(
    engine: Engine,
    workdir: Path,
    rng: random.Random,
    items: list[int],
    parents: list[int],
    tenant: str | None = None,
    key_type: str = "int",
    shadows: str | None = None,
) -> None:
    """Create the hot rows, and record their creation as a commit that ended before any read
    (``tenant``: the label of the schema ``engine`` reaches, in a ``--tenants`` run;
    ``key_type``: the models', see :data:`stress.models.KEY_TYPES`; ``shadows``: each item's
    shadow too, with its value, for ``--sibling-trigger`` (its mode: :data:`stress.models.
    SHADOWS`)."""
    models, key, _ = KEY_TYPES[key_type]
    Parent, Item = models[StParent.__tablename__], models[StItem.__tablename__]
    rec = Recorder(workdir / f"seed{'' if tenant is None else '-' + tenant}.jsonl", "seed")
    rec.tenant = tenant
    writes: list[list[Any]] = []
    with Session(engine) as s:
        for pid in parents:
            value = first_value(rng)
            s.add(Parent(id=key(pid), counter=value))
            writes.append([StParent.__tablename__, pid, value])
        s.flush()
        for i, iid in enumerate(items):
            value = first_value(rng)
            s.add(Item(id=key(iid), counter=value, parent_id=key(parents[i % len(parents)])))
            writes.append([StItem.__tablename__, iid, value])
            shadow = SHADOWS[shadows](StItem.__tablename__, iid) if shadows else None
            if shadow is not None and shadow[0] == StItem.__tablename__:
                parent = key(parents[i % len(parents)])
                s.add(Item(id=key(shadow[1]), counter=value, parent_id=parent))
            elif shadow is not None:
                s.add(StShadow(id=shadow[1], counter=value))
            if shadow is not None:
                writes.append([*shadow, value])
        t = now()
        s.commit()
    tx = f"seed:{t}" if tenant is None else f"seed:{tenant}:{t}"
    rec.log({"e": "cstart", "tx": tx, "writes": writes, "t": t})
    rec.log({"e": "cend", "tx": tx, "outcome": "ok", "t": now(), "lf": 0})
    rec.close()


def final_state(
    engine: Engine,
    redis_url: str | list[str],
    prefix: str,
    tenants: list[str] | None = None,
    model_versions: int = 1,
    epochs: bool = True,
    key_type: str = "int",
    shadows: bool = False,
) -> tuple[dict[Row, dict[str, Any]], dict[Row, dict[str, Any] | None], Counter[str]]:
    """The database rows, the decoded current VALUE entries, and what else Redis still holds
    (``redis_url``: the server, or every primary of a Redis Cluster: an entry and its
    generation key always live on the same one). ``tenants``: the schemas of a ``--tenants``
    run; each row is then named ``tenant/table`` (the default schema's ``(default)/table``),
    each entry by the database its key names. ``model_versions`` 2: the entries of the second
    model version's keyspace too, each decoded with its own model and named
    ``table@B`` (:func:`stress.checker.versioned`), beside the row as version B loads it.
    ``epochs``: the workers check epochs (all but ``--sabotage no-epoch-check``), so the
    entries of a server whose epoch none checked since it changed are never served: they are
    counted in ``leftover`` (:data:`UNCHECKED_EPOCH`), not returned. ``key_type`` "uuid":
    the rows are read with the Uuid-keyed models, and rows and entries named by int ids (as
    the histories name them). ``shadows``: the shadow table's rows and entries too
    (``--sibling-trigger other``, int keys)."""
    urls = [redis_url] if isinstance(redis_url, str) else redis_url
    db: dict[Row, dict[str, Any]] = {}
    cached: dict[Row, dict[str, Any] | None] = {}
    leftover: Counter[str] = Counter()
    for url in urls:
        db, found, left = _final_state_of(
            engine, url, prefix, tenants, model_versions, epochs, key_type, shadows
        )
        cached.update(found)
        leftover.update(left)
    return db, cached, leftover


def _final_state_of(
    engine: Engine,
    redis_url: str,
    prefix: str,
    tenants: list[str] | None = None,
    model_versions: int = 1,
    epochs: bool = True,
    key_type: str = "int",
    shadows: bool = False,
) -> tuple[dict[Row, dict[str, Any]], dict[Row, dict[str, Any] | None], Counter[str]]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
    #: (table, model digest) -> (model version, its model, its layout): the digest a key
    #: names tells which version wrote the entry (whatever its ``buckets``)
    layouts: dict[tuple[str, str], tuple[str, Any, Any]] = {}
    keyed, _, unkey = KEY_TYPES[key_type]
    versions = VERSIONS if key_type == "int" else {"A": keyed}
    for version in list(versions)[:model_versions]:
        models = dict(versions[version])
        if shadows and version == "A":
            models[StShadow.__tablename__] = StShadow
        for table, model in models.items():
            layout = cache._layout_for(inspect(model))
            assert layout is not None
            layouts[(table, layout.digest)] = (version, model, layout)
    # (label, engine) of every tenant: the run's one database, or each schema and the default
    binds: list[tuple[str | None, Engine]] = [(None, engine)]
    if tenants:
        binds = [(DEFAULT_TENANT, engine)]
        binds += [(t, engine.execution_options(schema_translate_map={None: t})) for t in tenants]
    #: the database digest a key names -> its tenant's label
    labels = {cache._databases.of(bind): label for label, bind in binds}
    db: dict[Row, dict[str, Any]] = {}
    for label, bind in binds:
        for (table, _), (version, model, layout) in layouts.items():
            with Session(bind) as s:
                for obj in s.scalars(select(model)):
                    row = (versioned(tenant_table(label, table), version), unkey(obj.id))
                    db[row] = {a: _plain(getattr(obj, a), unkey) for a in layout.attrs}
    cached: dict[Row, dict[str, Any] | None] = {}
    leftover: Counter[str] = Counter()
    try:
        # a server (or Cluster node) whose identity changed since a process last checked its
        # epoch (a restart, here from the RDB file of a replica's last full sync, after the
        # workers stopped): its entries are never served, since the first process to use it
        # replaces every generation of its slots first (docs/consistency.md, "Epochs")
        unchecked = epochs and not epoch_checked(client, prefix)
        for raw_key in client.scan_iter(match=f"{prefix}:*", count=1000):
            key = raw_key.decode()
            if key.endswith("}") or "}:" not in key:
                continue  # a bucket's generation key, or the cache's keyspace registry
            tag, _, part = key.rpartition("}:")
            # {table:<model digest>:<database digest>:<bucket>
            inner = tag.split("{", 1)[1].split(":") if "{" in tag else [""]
            table = inner[0]
            found = layouts.get((table, inner[1])) if len(inner) >= 4 else None
            database = inner[-2] if len(inner) >= 4 else ""
            id_ = key_part_id(part, key_type)
            if found is None or id_ is None or database not in labels:
                leftover[f"unknown key {key}"] += 1
                continue
            raw = client.get(key)
            if raw is None:
                continue
            state = raw[:1]
            if state == b"L":
                leftover["lock"] += 1
                continue
            if state == b"E":
                leftover["lease"] += 1
                continue
            if state != b"V":
                leftover["other"] += 1
                continue
            if unchecked:
                leftover[UNCHECKED_EPOCH] += 1
                continue
            gen = raw[1 : raw.index(b":", 1)]
            if client.get(tag + "}") != gen:
                leftover["old generation"] += 1
                continue
            version, _, layout = found
            row = (versioned(tenant_table(labels[database], table), version), id_)
            try:
                decoded = layout.decode(payload_of(raw), engine.dialect)
                cached[row] = {a: _plain(v, unkey) for a, v in decoded.items()}
            except ValueError:
                cached[row] = None
    finally:
        client.close()
    return db, cached, leftover


def _plain(value: Any, unkey: Callable[[Any], int]) -> Any:
    """A column value as the checker compares it: a UUID (a key: ``id``, ``parent_id``) as
    its int id; the same for a row and an entry, whichever UUID class the driver gave."""
    return unkey(value) if isinstance(value, uuid.UUID) else value


#: ``leftover`` of the VALUE entries of a server or Cluster node whose epoch no process has
#: checked since its identity changed (see :func:`epoch_checked`)
UNCHECKED_EPOCH = "new epoch nobody checked"


def epoch_checked(client: redis.Redis, prefix: str) -> bool:
    """Whether the epoch key a process checks on this server names its identity (``<run
    id>:<replication id>``), as ``lua/epoch_check.lua`` decides: if not, the first process
    to use it starts a new epoch, which replaces every generation of its keyspaces (on a
    Cluster node: of the slots it serves) before anything there is read, so none of the
    entries it holds now is ever served. On a Cluster node, the key is
    ``{prefix}:epoch:{<n>}`` for the smallest ``n`` whose slot the node serves, as
    :meth:`~sqlalchemy_writethrough.cluster.ClusterEpochGuard.epoch_key_of` picks it."""
    server = client.info("server")
    identity = f"{server['run_id']}:{client.info('replication')['master_replid']}"
    key = epoch_key(prefix)
    if int(client.info("cluster").get("cluster_enabled", 0)):
        port = int(server["tcp_port"])
        mine = [
            (int(entry[0]), int(entry[1]))
            for entry in client.execute_command("CLUSTER", "SLOTS")
            if int(entry[2][1]) == port
        ]
        n = next(
            (n for n in range(1 << 16) if any(a <= slot_of(str(n)) <= b for a, b in mine)), None
        )
        if n is None:
            return True  # serves no slot: holds no entry a process could reach
        key = f"{prefix}:epoch:{{{n}}}"
    value = client.get(key)
    return value is not None and value.decode(errors="replace").startswith(identity + "|")


def dump_cluster(cluster: ClusterGroup, prefix: str, path: Path) -> None:
    """Every key of the run on every Cluster node (role, value, PTTL), for reading a failed
    run's logs (``--keep-logs``): when an entry was written (from its PTTL), where."""
    with path.open("w") as out:
        for node in cluster.nodes:
            if not node.running:
                continue
            try:
                with redis.Redis(port=node.port, socket_timeout=5) as client:
                    replication = client.info("replication")
                    role = replication["role"]
                    identity = f"{client.info('server')['run_id']}:{replication['master_replid']}"
                    out.write(json.dumps({"node": node.port, "identity": identity}) + "\n")
                    if role != "master":
                        client.execute_command("READONLY")
                    for raw_key in client.scan_iter(match=f"{prefix}:*", count=1000):
                        raw = client.get(raw_key)
                        out.write(
                            json.dumps(
                                {
                                    "node": node.port,
                                    "role": role,
                                    "key": raw_key.decode(errors="replace"),
                                    "v": None
                                    if raw is None
                                    else raw[:120].decode(errors="replace"),
                                    "pttl": client.pttl(raw_key),
                                    "t": now(),
                                }
                            )
                            + "\n"
                        )
            except redis.RedisError as exc:
                out.write(json.dumps({"node": node.port, "error": str(exc)}) + "\n")


@contextlib.contextmanager
def exclusive_tables(engine: Engine, wait: float = 600.0) -> Iterator[None]:
    """Hold a database-wide named lock for the whole run: two runs on one database (a test
    suite and a ``nox -s stress`` side by side) would otherwise drop each other's tables.

    PostgreSQL: a session advisory lock; MariaDB: ``GET_LOCK``. Waits at most ``wait`` s.
    """
    conn = engine.connect()
    try:
        deadline = time.monotonic() + wait
        if engine.dialect.name == "postgresql":
            while not conn.exec_driver_sql("SELECT pg_try_advisory_lock(74312001)").scalar():
                if time.monotonic() > deadline:
                    raise RuntimeError("another stress run holds the stress tables")
                time.sleep(0.2)
        else:
            got = conn.exec_driver_sql(
                f"SELECT GET_LOCK('writethrough_stress', {max(0, int(wait))})"
            ).scalar()
            if got != 1:
                raise RuntimeError("another stress run holds the stress tables")
        conn.commit()
        yield
    finally:
        conn.invalidate()  # closing the session releases the lock on both databases
        conn.close()


# ----------------------------------------------------------------------------- stress


@dataclasses.dataclass
class StressConfig:
    db_url: str
    seconds: float = 20.0
    faults: frozenset[str] = frozenset()
    workers: int = 5
    isolations: tuple[str, ...] = ISOLATIONS
    on_redis_error: str = "strict"
    seed: int | None = None
    lock_timeout: float = 2.0
    kill_prob: float = 0.0015
    #: keep the history files: always (True), or only when the run fails ("failed": it found
    #: a violation, a worker crashed, or the run ended with an exception)
    keep_logs: bool | Literal["failed"] = False
    #: break the cache on purpose in every worker (see ``stress.worker.sabotage``)
    sabotage: str | None = None
    #: seconds to wait for another stress run on the same database to finish
    lock_wait: float = 600.0
    #: write paths of the mixed workers: "unit" (unit of work only), "statements" (statement-level
    #: DML only: bulk/ORM/Core/text UPDATEs, ``bulk_update_mappings``) or "mixed" (both)
    paths: str = "mixed"
    #: how many of the workers run the asyncio flavour (AsyncSession on asyncpg / aiomysql,
    #: redis.asyncio), next to sync ones on the same prefix
    asyncio_workers: int = 0
    #: the cache's ``publish`` option in every worker: "sync", or "background" (the publish
    #: after COMMIT on the cache's background worker)
    publish: str = "sync"
    #: the near cache's staleness bound (seconds) in every worker; None: no near cache
    near_cache: float | None = None
    #: how many tenants' schemas (0: the one database); each operation picks one
    tenants: int = 0
    #: the ways operations may reach their tenant (None: all of ``stress.worker.WAYS``)
    tenant_ways: tuple[str, ...] | None = None
    #: "path:way" pairs the workers never use for a statement-level write (with tenants): a
    #: known defect set aside, so that a run checks everything else
    avoid: frozenset[str] = frozenset()
    #: IN-list reads of 2-8 rows in the workers' read mix (``--no-batch-reads``: none)
    batch_reads: bool = True
    #: 2: a rolling deploy, two code versions on the same tables and prefix: the odd worker
    #: slots map the tables with the second model version (``stress.models``: one more
    #: column, which the tables have and version A does not map), so their rows' keys are
    #: another keyspace; 1: every worker maps them alike
    model_versions: int = 1
    #: the second model version's cache ``buckets`` (None: the library's default, as version
    #: A's): a rolling deploy that changes it too
    model_b_buckets: int | None = None
    #: every worker's cache ``ttl`` (seconds)
    ttl: float = 600.0
    #: with ``model_versions`` 2: the second version's workers all stop for this many seconds
    #: in every twice as long (0: never), so that the registry may drop their keyspace while
    #: the first version goes on committing, and they register it again when they resume
    idle_second_version: float = 0.0
    #: the type of the stress tables' keys: "int", "uuid" (``Uuid`` primary keys and foreign
    #: key, the same logical rows: ids stay ints in the histories, see
    #: :data:`stress.models.KEY_TYPES`), so that asyncio workers write objects whose loaded
    #: identities hold asyncpg's own UUID class; or "guid" (the same through a TypeDecorator);
    #: PostgreSQL only, one model version, no tenants, no ``evict``/``evict-locks`` (the
    #: checker names evicted keys by int ids)
    key_type: str = "int"
    #: ``evict-registry``: the registry is deleted every this many seconds, drawn between the
    #: two (a short interval keeps it rarely whole: more transactions go by two lists of it)
    evict_registry_every: tuple[float, float] = (0.2, 1.0)
    #: a ``BEFORE INSERT OR UPDATE`` trigger on the stress tables stores another value than
    #: the one written (:func:`stress.models.create_rewriting_triggers`): the cache must see
    #: it and invalidate instead of writing through
    rewriting_trigger: bool = False
    #: an ``AFTER`` trigger on the item table copies each hot item's counter into its shadow
    #: row (:func:`stress.models.create_sibling_trigger`), which workers read and never write,
    #: where the mode keeps it (:data:`stress.models.SHADOWS`): ``"own"``, the item table
    #: itself, ``"other"``, another cached table (:class:`stress.models.StShadow`); the cache
    #: must see which table the trigger writes and invalidate that model whole. None: no
    #: trigger. PostgreSQL only; not with ``rewriting_trigger``, ``tenants`` or another
    #: ``key_type``
    sibling_trigger: str | None = None


#: the faults a ``key_type`` "uuid" run refuses: the checker parses and buckets evicted keys
#: by their int ids' digits
UUID_REFUSED_FAULTS = frozenset({"evict", "evict-locks"})


def key_type_problem(config: StressConfig) -> str | None:
    """Why the run's ``key_type`` cannot run with the rest of its configuration (None: it
    can)."""
    if config.key_type not in KEY_TYPES:
        return f"key_type must be one of {', '.join(KEY_TYPES)}, not {config.key_type!r}"
    if config.key_type == "int":
        return None
    if not config.db_url.startswith("postgresql"):
        return f"key type {config.key_type} runs on PostgreSQL only"
    if config.model_versions != 1:
        return f"key type {config.key_type} has one model version (no --model-versions 2)"
    if config.tenants:
        return f"key type {config.key_type} runs without --tenants"
    refused = sorted(frozenset(config.faults) & UUID_REFUSED_FAULTS)
    if refused:
        return f"key type {config.key_type} runs without the faults {', '.join(refused)}"
    return None


@dataclasses.dataclass
class StressResult:
    config: StressConfig
    report: Report
    info: dict[str, Any]

    def format(self) -> str:
        db = self.config.db_url.split("+", 1)[0].split(":", 1)[0]
        faults = ",".join(sorted(self.config.faults)) or "none"
        head = (
            f"== {db}, faults: {faults}, {self.config.workers} workers"
            f"{f' ({self.config.asyncio_workers} asyncio)' if self.config.asyncio_workers else ''}, "
            f"{'/'.join(self.config.isolations)}, on_redis_error={self.config.on_redis_error}, "
            f"{'publish=background, ' if self.config.publish == 'background' else ''}"
            f"{f'near cache {self.config.near_cache} s, ' if self.config.near_cache else ''}"
            f"{f'{self.config.tenants} tenants, ' if self.config.tenants else ''}"
            f"{'avoiding ' + ','.join(sorted(self.config.avoid)) + ', ' if self.config.avoid else ''}"
            f"{self._versions()}"
            f"{'' if self.config.key_type == 'int' else self.config.key_type + ' keys, '}"
            f"{f'ttl {self.config.ttl:g} s, ' if self.config.ttl != 600 else ''}"
            f"{'rewriting trigger, ' if self.config.rewriting_trigger else ''}"
            f"{f'sibling trigger ({self.config.sibling_trigger}), ' if self.config.sibling_trigger else ''}"
            f"{self.config.seconds:.0f}s"
        )
        info = " ".join(f"{k}={v}" for k, v in self.info.items())
        return f"{head}\n{info}\n{self.report.format()}"

    def _versions(self) -> str:
        if self.config.model_versions < 2:
            return ""
        second = range(1, self.config.workers, 2)
        buckets = self.config.model_b_buckets
        idle = self.config.idle_second_version
        return (
            f"2 model versions (B: workers {','.join(f'w{i}' for i in second)}"
            f"{f', buckets={buckets}' if buckets else ''}"
            f"{f', idle {idle:g} s in every {2 * idle:g} s' if idle else ''}), "
        )


def sibling_trigger_problem(config: StressConfig) -> str | None:
    """Why ``config``'s ``sibling_trigger`` (or its sabotage) cannot run, if it cannot."""
    if config.sabotage == "blind-self-writers" and not config.sibling_trigger:
        return "the sabotage blind-self-writers needs --sibling-trigger"
    if not config.sibling_trigger:
        return None
    if config.sibling_trigger not in SHADOWS:
        return f"--sibling-trigger is one of {sorted(SHADOWS)}"
    if not config.db_url.startswith("postgresql"):
        return (
            "--sibling-trigger runs on PostgreSQL only (MySQL refuses a trigger writing its table)"
        )
    if config.rewriting_trigger or config.tenants or config.key_type != "int":
        return "--sibling-trigger runs without --rewriting-trigger, --tenants and --key-type"
    if config.sibling_trigger == "other" and config.model_versions > 1:
        # the second version's tables are created from its own metadata, without the shadows
        return "--sibling-trigger other runs with one model version"
    return None


def run_stress(config: StressConfig, log: Log = print) -> StressResult:
    seed = config.seed if config.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    faults = frozenset(config.faults)
    unknown = faults - set(ALL_FAULTS) - set(OPT_IN_FAULTS) - set(TOPOLOGY_FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}")
    topology_of(faults)  # a combination that cannot run fails now
    problem = key_type_problem(config)
    if problem:
        raise ValueError(problem)
    if config.sabotage == "blind-triggers" and not config.rewriting_trigger:
        raise ValueError("the sabotage blind-triggers needs --rewriting-trigger")
    problem = sibling_trigger_problem(config)
    if problem:
        raise ValueError(problem)
    started = time.monotonic()
    lock_wait = config.lock_wait
    procs: dict[int, subprocess.Popen[bytes]] = {}
    #: set once the checker has judged the run (keep_logs="failed" keeps the others')
    passed: list[bool] = []
    keep: bool | Callable[[], bool] = config.keep_logs is True
    if config.keep_logs == "failed":
        keep = lambda: not passed  # noqa: E731
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace(keep, log))
        topology = topology_of(faults)
        server: RedisServer | None = None
        sentinel: SentinelGroup | None = None
        cluster: ClusterGroup | None = None
        redis_option: dict[str, Any]
        if topology == "sentinel":
            sentinel = stack.enter_context(SentinelGroup())
            redis_option = {"sentinels": sentinel.addresses}
        elif topology == "cluster":
            cluster = stack.enter_context(ClusterGroup())
            redis_option = {"cluster": cluster.startup_nodes}
        else:
            server = stack.enter_context(RedisServer())
        proxy: FaultyProxy | None = None
        if faults & PROXIED:
            assert server is not None
            mode = "faulty" if "proxy" in faults else "pass"
            proxy = FaultyProxy(server.port, mode=mode, seed=rng.randrange(1 << 30))
            stack.callback(proxy.close)
        if server is not None:
            redis_option = {"redis_url": proxy.url if proxy else server.url}
        standby = stack.enter_context(RedisServer()) if "redis-switch" in faults else None
        engine = make_engine(config.db_url)
        stack.callback(engine.dispose)
        stack.enter_context(exclusive_tables(engine, lock_wait))
        if config.model_versions not in (1, 2):
            raise ValueError("model_versions must be 1 or 2")
        metadata = metadata_of(config.model_versions, config.key_type)
        reset_schema(engine, metadata)
        if config.rewriting_trigger:
            create_rewriting_triggers(engine, metadata)
        tenants: list[str] = []
        if config.tenants:
            tenants = [f"stt{i}_{uuid.uuid4().hex[:6]}" for i in range(config.tenants)]
            stack.callback(drop_tenant_schemas, engine, tenants)
            create_tenant_schemas(engine, tenants, metadata)
            if config.rewriting_trigger:
                for tenant in tenants:
                    create_rewriting_triggers(engine, metadata, tenant)
            # the default schema holds the same ids with values of its own: a statement that
            # misses its tenant's map reads or writes there, and the checker sees it
            seed_rows(engine, workdir, rng, HOT_ITEMS, PARENTS, DEFAULT_TENANT)
            for tenant in tenants:
                tenant_engine = engine.execution_options(schema_translate_map={None: tenant})
                seed_rows(tenant_engine, workdir, rng, HOT_ITEMS, PARENTS, tenant)
        else:
            seed_rows(
                engine,
                workdir,
                rng,
                HOT_ITEMS,
                PARENTS,
                key_type=config.key_type,
                shadows=config.sibling_trigger,
            )
        if config.sibling_trigger:
            create_sibling_trigger(engine, config.sibling_trigger)
        prefix = f"st-{uuid.uuid4().hex[:8]}"
        squeezer: Squeezer | None = None
        listener: EvictionListener | None = None
        #: the schedule, once made: the eviction listener follows its server (redis-switch)
        scheduled: list[FaultSchedule] = []
        if "evict" in faults:
            assert server is not None
            first = server
            listener = EvictionListener(
                lambda: (scheduled[0].server if scheduled else first).port,
                workdir / "evictions.jsonl",
            )
            stack.callback(listener.close)
            squeezer = Squeezer(listener, rng)
        dropper: LockDropper | None = None
        if "evict-locks" in faults:
            dropper = LockDropper(prefix, workdir / "evictions-of-locks.jsonl")
            stack.callback(dropper.close)
        # The clock starts once every first worker is ready (imported, connected): on a loaded
        # machine start-up alone once took longer than a short run, which then did nothing.
        start_file = workdir / "start"
        deadline = 0
        stack.callback(lambda: reap(list(procs.values()), time.monotonic()))
        incarnations = [0] * config.workers

        def start(slot: int) -> None:
            name = f"w{slot}.{incarnations[slot]}"
            # a respawned worker keeps its slot's version: one process, one code version
            second = config.model_versions > 1 and slot % 2 == 1
            procs[slot] = spawn(
                {
                    "worker": name,
                    "slot": slot,
                    "incarnation": incarnations[slot],
                    "slots": config.workers,
                    "seed": rng.randrange(1 << 30),
                    "db_url": config.db_url,
                    **redis_option,
                    "prefix": prefix,
                    "deadline": deadline,
                    "start_file": str(start_file),
                    "ready": str(workdir / f"{name}.ready"),
                    "history": str(workdir / f"{name}.jsonl"),
                    "isolations": list(config.isolations),
                    "on_redis_error": config.on_redis_error,
                    "publish": config.publish,
                    "near_cache": config.near_cache,
                    "lock_timeout": config.lock_timeout,
                    "lease_timeout": config.lock_timeout,
                    "kill_prob": config.kill_prob if "sigkill" in faults else 0.0,
                    "db_errors": "db-errors" in faults,
                    "hot_items": HOT_ITEMS,
                    "parents": PARENTS,
                    "role": "mixed",
                    "paths": config.paths,
                    "sabotage": config.sabotage,
                    "flavour": "asyncio" if slot < config.asyncio_workers else "sync",
                    "tenants": tenants,
                    "tenant_ways": list(config.tenant_ways or ()),
                    "avoid": sorted(config.avoid),
                    "batch_reads": config.batch_reads,
                    "shadows": config.sibling_trigger,
                    "model_version": "B" if second else "A",
                    "ttl": config.ttl,
                    "idle": config.idle_second_version if second else 0.0,
                    "buckets": config.model_b_buckets if second else None,
                    "key_type": config.key_type,
                },
                workdir,
            )

        for slot in range(config.workers):
            start(slot)
        names = [f"w{slot}.0" for slot in range(config.workers)]
        deadline = start_when_ready(workdir, names, list(procs.values()), "stress")
        deadline += int(config.seconds * 1e9)
        release(start_file, deadline)
        schedule = FaultSchedule(
            faults,
            server,
            proxy,
            rng,
            standby,
            sentinel,
            cluster,
            squeezer,
            dropper,
            registry_key(prefix),
            config.evict_registry_every,
        )
        scheduled.append(schedule)
        respawns = 0
        crashed: list[str] = []
        while now() < deadline:
            time.sleep(0.05)
            for slot, proc in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                _live.discard(proc)
                if rc == -signal.SIGKILL and deadline - now() > 1.5e9:
                    incarnations[slot] += 1
                    respawns += 1
                    start(slot)
                elif rc not in (0, -signal.SIGKILL):
                    crashed.append(f"w{slot}.{incarnations[slot]} exited {rc}")
                    del procs[slot]
                else:
                    del procs[slot]
            if now() < deadline - 1e9:
                schedule.tick()
            elif squeezer is not None:
                squeezer.let_go()  # no eviction in the last second: entries stay to compare
        schedule.heal()
        (workdir / "faults.log").write_text("".join(f"{line}\n" for line in schedule.timeline))
        reap(list(procs.values()), time.monotonic() + 30)
        for slot, proc in procs.items():
            if proc.returncode not in (0, -signal.SIGKILL):
                crashed.append(f"w{slot}.{incarnations[slot]} exited {proc.returncode}")
        # quiescence: every lock and lease taken before the end has expired
        time.sleep(config.lock_timeout + 0.5)
        # the server the workers reach at the end (redis-switch moves them)
        final_db, final_cache, leftover = final_state(
            engine,
            _final_urls(schedule),
            prefix,
            tenants,
            config.model_versions,
            epochs=config.sabotage != "no-epoch-check",
            key_type=config.key_type,
            shadows=config.sibling_trigger == "other",
        )
        if config.keep_logs and schedule.cluster is not None:
            dump_cluster(schedule.cluster, prefix, workdir / "final-redis.dump")
        events = read_histories(workdir)
        report = check(
            events,
            final_db,
            final_cache,
            leftover,
            schedule.windows,
            _bound(config.near_cache),
            buckets=_bucket_counts(config),
            stored=stored_value if config.rewriting_trigger else None,
            mirrored=SHADOWS[config.sibling_trigger] if config.sibling_trigger else None,
        )
        if report.ok and not crashed:
            passed.append(True)
        stats: Counter[str] = Counter()
        for e in events:
            if e["e"] == "stop":
                stats.update({k: v for k, v in e["stats"].items() if v})
        info: dict[str, Any] = {"seed": seed, "respawns": respawns}
        info.update(schedule.counts)
        if proxy is not None:
            info.update({f"proxy {k}": v for k, v in proxy.counts.items()})
        if squeezer is not None and listener is not None:
            info["keys evicted (the servers' count)"] = squeezer.evicted
            info["evictions heard"] = listener.heard
            if squeezer.uncounted:
                info["squeezes ended by a restart (not counted)"] = squeezer.uncounted
        info["cache stats of workers alive at the end"] = dict(stats)
        if crashed:
            info["crashed"] = crashed
            for path in sorted(workdir.glob("*.log")):
                text = path.read_text(errors="replace").strip()
                if text:
                    log(f"--- {path.name}\n{text[-3000:]}")
        info["elapsed"] = f"{time.monotonic() - started:.1f}s"
        return StressResult(config, report, info)
    raise AssertionError("unreachable")  # pragma: no cover


def _bucket_counts(config: StressConfig) -> tuple[int, ...]:
    """The cache ``buckets`` of the run's keyspaces (the workers' default, and the second
    model version's own): the checker finds a row's bucket with them."""
    default = int(signature(WriteThroughCache).parameters["buckets"].default)
    return tuple(sorted({default, config.model_b_buckets or default}))


def _bound(near_cache: float | None) -> int | None:
    """The checker's near-cache bound (ns) of a near cache's staleness (s; None: none)."""
    return None if near_cache is None else int(near_cache * 1e9)


def _final_urls(schedule: FaultSchedule) -> str | list[str]:
    """The server the workers reach at the end: the primaries, on Sentinel or Cluster."""
    if schedule.cluster is not None:
        cluster = schedule.cluster
        return [f"redis://127.0.0.1:{port}/0" for port in cluster.primaries()]
    if schedule.sentinel is not None:
        port = schedule.sentinel.primary_port()
        assert port is not None
        return f"redis://127.0.0.1:{port}/0"
    return schedule.server.url


# ------------------------------------------------------------------------------ herd


def run_herd(
    db_url: str,
    processes: int = 5,
    threads: int = 10,
    rounds: int = 5,
    log: Log = print,
    keep_logs: bool = False,
    fill_wait: float | None = None,
    lock_wait: float = 600.0,
) -> dict[str, Any]:
    """``processes * threads`` readers get one cold row at the same instant, ``rounds`` times.

    ``fill_wait``: the cache's option of that name (None: the library's default).
    """
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace(keep_logs, log))
        server = stack.enter_context(RedisServer())
        engine = make_engine(db_url)
        stack.callback(engine.dispose)
        stack.enter_context(exclusive_tables(engine, lock_wait))
        reset_schema(engine)
        rng = random.Random()
        cold = [10 + i for i in range(rounds)]
        warm = [900 + p for p in range(processes)]
        seed_rows(engine, workdir, rng, cold + warm, PARENTS)
        prefix = f"st-{uuid.uuid4().hex[:8]}"
        go = workdir / "go"
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: reap(procs, time.monotonic()))
        for p in range(processes):
            procs.append(
                spawn(
                    {
                        "scenario": "herd",
                        "worker": f"h{p}",
                        "db_url": db_url,
                        "redis_url": server.url,
                        "prefix": prefix,
                        "threads": threads,
                        "history": str(workdir / f"h{p}.jsonl"),
                        "ready": str(workdir / f"h{p}.ready"),
                        "go": str(go),
                        "warm_id": warm[p],
                        "ids": cold,
                        "round_ns": int(1e9),
                        "fill_wait": fill_wait,
                    },
                    workdir,
                )
            )
        give_up = time.monotonic() + 60
        while not all((workdir / f"h{p}.ready").exists() for p in range(processes)):
            if time.monotonic() > give_up or any(proc.poll() is not None for proc in procs):
                raise RuntimeError("herd workers did not get ready")
            time.sleep(0.02)
        tmp = workdir / "go.tmp"
        tmp.write_text(str(now() + int(0.5e9)))
        tmp.rename(go)
        reap(procs, time.monotonic() + 30 + rounds)
        events = [e for e in read_histories(workdir) if e["e"] == "herd"]
        per_round = []
        for id_ in cold:
            rows = [e for e in events if e["id"] == id_]
            per_round.append(
                {
                    "row": id_,
                    "readers": processes * threads,
                    "database loads": sum(e["loads"] for e in rows),
                    "cache hits": sum(e["hits"] for e in rows),
                    "fills": sum(e["fills"] for e in rows),
                    "errors": sum(e["errors"] for e in rows),
                }
            )
        return {"rounds": per_round}
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------- outage


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _latencies(events: list[dict[str, Any]], lo: int, hi: int) -> dict[str, dict[str, Any]]:
    by_kind: dict[str, list[float]] = {}
    for e in events:
        if e["e"] == "op" and lo <= e["t0"] and e["t1"] <= hi:
            by_kind.setdefault(e["k"], []).append((e["t1"] - e["t0"]) / 1e6)
    return {
        k: {
            "n": len(v),
            "p50_ms": round(_percentile(v, 0.5), 2),
            "p99_ms": round(_percentile(v, 0.99), 2),
        }
        for k, v in sorted(by_kind.items())
    }


def run_outage(
    db_url: str,
    seconds: float = 30.0,
    workers: int = 4,
    log: Log = print,
    keep_logs: bool = False,
    lock_timeout: float = 2.0,
    lock_wait: float = 600.0,
    near_cache: float | None = None,
    batch_reads: bool = True,
) -> dict[str, Any]:
    """Redis unreachable for every process (the proxy black-holes it), in ``degrade`` mode.

    Timeline (fractions of ``seconds``, from the moment every worker is ready): 0-0.2 warm up
    through the cache; 0.2-0.45 the database-only baseline (sessions without the cache, on
    rows the cache never sees); 0.45-0.5 cache again; 0.5-0.75 outage; 0.75-1 Redis back.
    ``near_cache``: every worker's
    near cache bound (seconds; None: none); ``batch_reads``: IN-list reads in the mix (not in
    the baseline).
    """
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace(keep_logs, log))
        server = stack.enter_context(RedisServer())
        proxy = FaultyProxy(server.port, mode="pass")
        stack.callback(proxy.close)
        engine = make_engine(db_url)
        stack.callback(engine.dispose)
        stack.enter_context(exclusive_tables(engine, lock_wait))
        reset_schema(engine)
        rng = random.Random()
        seed_rows(engine, workdir, rng, HOT_ITEMS, PARENTS)
        seed_rows(engine, workdir, rng, BASELINE_ITEMS, BASELINE_PARENTS)
        prefix = f"st-{uuid.uuid4().hex[:8]}"
        start_file = workdir / "start"
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: reap(procs, time.monotonic()))
        for slot in range(workers):
            procs.append(
                spawn(
                    {
                        "worker": f"o{slot}",
                        "slot": slot,
                        "incarnation": 0,
                        "slots": workers,
                        "seed": rng.randrange(1 << 30),
                        "db_url": db_url,
                        "redis_url": proxy.url,
                        "prefix": prefix,
                        "deadline": 0,  # from the start file (with the baseline)
                        "start_file": str(start_file),
                        "ready": str(workdir / f"o{slot}.ready"),
                        "history": str(workdir / f"o{slot}.jsonl"),
                        "isolations": list(ISOLATIONS),
                        "on_redis_error": "degrade",
                        "lock_timeout": lock_timeout,
                        "lease_timeout": lock_timeout,
                        "hot_items": HOT_ITEMS,
                        "parents": PARENTS,
                        "baseline_items": BASELINE_ITEMS,
                        "baseline_parents": BASELINE_PARENTS,
                        "role": "simple",
                        "near_cache": near_cache,
                        "batch_reads": batch_reads,
                    },
                    workdir,
                )
            )
        names = [f"o{slot}" for slot in range(workers)]
        t_start = start_when_ready(workdir, names, procs, "outage")
        span = int(seconds * 1e9)

        def at(fraction: float) -> int:
            return t_start + int(span * fraction)

        deadline = at(1.0)
        baseline = (at(0.2), at(0.45))
        outage = [at(0.5), at(0.75)]
        release(start_file, deadline, baseline)
        while now() < outage[0]:
            time.sleep(0.02)
        proxy.mode = "blackhole"
        proxy.kill_connections()  # open connections stop answering too
        while now() < outage[1]:
            time.sleep(0.02)
        proxy.mode = "pass"
        reap(procs, time.monotonic() + (deadline - now()) / 1e9 + 30)
        time.sleep(lock_timeout + 0.5)
        final_db, final_cache, leftover = final_state(engine, server.url, prefix)
        events = read_histories(workdir)
        report = check(events, final_db, final_cache, leftover, near_bound=_bound(near_cache))
        errors = Counter(
            e["ec"]
            for e in events
            if e["e"] == "op" and e.get("ec") and outage[0] <= e["t0"] and e["t1"] <= outage[1]
        )
        after_return = [v for v in report.stale + report.gap if v.t >= outage[1]]
        missed_outage_write = sum(1 for v in after_return if v.newer < outage[1])
        return {
            "report": report,
            "baseline (database only)": _latencies(events, *baseline),
            "outage": _latencies(events, *outage),
            "outage after its first second": _latencies(events, outage[0] + int(1e9), outage[1]),
            "with Redis (before the outage)": _latencies(events, at(0.45), outage[0]),
            "errors during the outage": dict(errors),
            "stale reads after Redis returned": len(after_return),
            "  of which missed a commit made during the outage": missed_outage_write,
            "  of which missed a commit made after Redis returned": len(after_return)
            - missed_outage_write,
            "proxy": dict(proxy.counts),
        }
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------- partition


def run_partition(
    db_url: str,
    mode: str,
    seconds: float = 20.0,
    readers: int = 3,
    log: Log = print,
    keep_logs: bool = False,
    lock_timeout: float = 2.0,
    lock_wait: float = 600.0,
    near_cache: float | None = None,
    batch_reads: bool = True,
) -> dict[str, Any]:
    """One writer cut off from Redis (its proxy black-holes) while readers reach it directly.

    Timeline (from the moment every process is ready): 0-0.3 everything connected (the
    readers fill the cache); 0.3-0.8 the writer's Redis is unreachable; 0.8-1 healed.
    ``near_cache``: every process's near cache bound (seconds; None: none); ``batch_reads``:
    IN-list reads in the readers' mix.
    """
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace(keep_logs, log))
        server = stack.enter_context(RedisServer())
        proxy = FaultyProxy(server.port, mode="pass")
        stack.callback(proxy.close)
        engine = make_engine(db_url)
        stack.callback(engine.dispose)
        stack.enter_context(exclusive_tables(engine, lock_wait))
        reset_schema(engine)
        rng = random.Random()
        seed_rows(engine, workdir, rng, HOT_ITEMS, PARENTS)
        prefix = f"st-{uuid.uuid4().hex[:8]}"
        start_file = workdir / "start"
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: reap(procs, time.monotonic()))
        for slot in range(readers + 1):
            writer = slot == 0
            procs.append(
                spawn(
                    {
                        "worker": f"{'W' if writer else 'r'}{slot}",
                        "slot": slot,
                        "incarnation": 0,
                        "slots": readers + 1,
                        "seed": rng.randrange(1 << 30),
                        "db_url": db_url,
                        "redis_url": proxy.url if writer else server.url,
                        "prefix": prefix,
                        "deadline": 0,  # from the start file
                        "start_file": str(start_file),
                        "ready": str(workdir / f"p{slot}.ready"),
                        "history": str(workdir / f"p{slot}.jsonl"),
                        "isolations": list(ISOLATIONS),
                        "on_redis_error": mode,
                        "lock_timeout": lock_timeout,
                        "lease_timeout": lock_timeout,
                        "hot_items": HOT_ITEMS,
                        "parents": PARENTS,
                        "role": "writer" if writer else "reader",
                        "near_cache": near_cache,
                        "batch_reads": batch_reads,
                    },
                    workdir,
                )
            )
        t_start = start_when_ready(
            workdir, [f"p{slot}" for slot in range(readers + 1)], procs, "partition"
        )
        span = int(seconds * 1e9)
        deadline = t_start + span
        cut = (t_start + int(span * 0.3), t_start + int(span * 0.8))
        release(start_file, deadline)
        while now() < cut[0]:
            time.sleep(0.02)
        proxy.mode = "blackhole"
        proxy.kill_connections()
        while now() < cut[1]:
            time.sleep(0.02)
        proxy.mode = "pass"
        reap(procs, time.monotonic() + (deadline - now()) / 1e9 + 30)
        time.sleep(lock_timeout + 0.5)
        final_db, final_cache, leftover = final_state(engine, server.url, prefix)
        events = read_histories(workdir)
        report = check(events, final_db, final_cache, leftover, near_bound=_bound(near_cache))
        commits = Counter(
            e["outcome"] for e in events if e["e"] == "cend" and not e["tx"].startswith("seed")
        )
        stale = report.stale + report.gap
        return {
            "report": report,
            "writer commits": dict(commits),
            "stale reads while cut off": sum(1 for v in stale if cut[0] <= v.t < cut[1]),
            "stale reads after healing": sum(1 for v in stale if v.t >= cut[1]),
            "stale entries at quiescence": sum(1 for v in report.gap if v.t == 0)
            + len(report.divergent),
        }
    raise AssertionError("unreachable")  # pragma: no cover
