"""One benchmark run: data, warm caches, interleaved groups, memory, report, clean-up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from . import core, counting
from .context import COMMIT_SIZES, Env, Settings, build_env
from .data import create_and_fill, delete_pattern, drop, glob_escape
from .harness import Group, Variant, run_group
from .peers import PeerRows, load_peers

GROUP_TITLES = {
    "pk": "One row by primary key (new session per operation)",
    "batch": "100 rows by primary key",
    "chain": "Chain of 3 many-to-one lazy loads (item.category.section.department)",
    **{f"commit{n}": f"Commit of {n:,} changed row{'s' if n > 1 else ''}" for n in COMMIT_SIZES},
    "readback": "Read-back after a commit (get, change, commit, then read an attribute)",
}
GROUP_ORDER = ("pk", "batch", "chain", *(f"commit{n}" for n in COMMIT_SIZES), "readback")


@dataclass
class Results:
    settings: Settings
    command: str
    groups: list[Group]
    peers: list[PeerRows]
    memory: dict[str, Any]
    peer_memory: dict[str, dict[str, Any] | None]
    versions: dict[str, Any]
    schema: str = ""
    """the PostgreSQL schema of the run's tables (dropped at the end)"""
    read_rows: int = 0
    batch_lists: int = 0
    prefix: str = ""
    """the Redis key prefix of the run (every key under it is deleted at the end)"""
    elapsed_s: float = 0.0
    setup_s: float = 0.0
    files: list[Path] = field(default_factory=list)

    def variant(self, key: str) -> Variant | None:
        for group in self.groups:
            found = group.find(key)
            if found is not None:
                return found
        return None

    def group(self, key: str) -> Group | None:
        for group in self.groups:
            if group.key == key:
                return group
        return None


def _core_rows(env: Env, group: str) -> list[Variant]:
    if group == "pk":
        return [*core.pk_variants(env), counting.uncounted_variant(env)]
    if group == "batch":
        return core.batch_variants(env)
    if group == "chain":
        return core.chain_variants(env)
    if group == "readback":
        return core.readback_variants(env)
    size = int(group.removeprefix("commit"))
    return core.commit_variants(env, size)


def _peer_rows(peer: PeerRows, group: str) -> list[Variant]:
    if peer.unavailable is not None:
        return [
            Variant(
                f"{group}.{peer.name}",
                peer.name,
                peer.name,
                None,
                note=f"could not run: {peer.unavailable}",
            )
        ]
    rows = peer.rows.get(group)
    if rows is None:
        return [Variant(f"{group}.{peer.name}", peer.name, peer.name, None, note="not measured")]
    return rows


def run(
    settings: Settings,
    command: str,
    *,
    log: Callable[[str], None] = print,
    profile: str | None = None,
) -> Results:
    """Build everything, measure every group, and return the results (no files written)."""
    from .report import collect_versions

    started = time.perf_counter()
    load_at_start = _load_average()
    outer_log = log

    def log(message: str) -> None:
        outer_log(f"[{time.perf_counter() - started:6.1f}s] {message}")

    env = build_env(settings)
    peers: list[PeerRows] = []
    try:
        log(
            f"PostgreSQL: creating and filling the bench_* tables in schema {env.schema} "
            f"({settings.rows:,} items)"
        )
        create_and_fill(env.engine, env.schema, settings.rows)
        log(
            f"Redis: prefix {env.prefix!r}; warming our cache ({len(env.read_pks)} rows read "
            f"one by one, {len(env.batches)} lists of 100)"
        )
        core.warm_ours(env)
        if settings.peers:
            log("Peers: installing and warming")
            peers = load_peers(env, log=log)
        setup_s = time.perf_counter() - started

        groups: list[Group] = []
        for key in GROUP_ORDER:
            if not settings.wants(key):
                continue
            variants = _core_rows(env, key)
            for peer in peers:
                variants += _peer_rows(peer, key)
            iterations, warmup = settings.group_iterations(key)
            groups.append(Group(key, GROUP_TITLES[key], variants, iterations, warmup))

        for group in groups:
            runnable = sum(1 for v in group.variants if v.op is not None)
            log(
                f"[{group.key}] {group.title}: {runnable} rows x {group.iterations} rounds "
                f"(+{group.warmup} warm-up), interleaved"
            )
            run_group(group, seed=settings.seed, log=log)
            log(f"[{group.key}] done in {group.elapsed_s:.1f} s")

        if profile:
            from .cli import profile_rows

            for group in groups:
                wanted = [
                    v
                    for v in group.variants
                    if profile in v.key or profile.lower() in v.label.lower()
                ]
                if wanted:
                    profile_rows(wanted, rounds=min(group.iterations, 300))

        log("Memory: bytes per cached entry")
        memory = core.memory_usage(env)
        peer_memory: dict[str, dict[str, Any] | None] = {}
        sample = env.commit_pks[-20:]  # rows no peer has cached yet
        for peer in peers:
            if peer.memory is None or peer.unavailable is not None:
                continue
            sizes = []
            try:
                for pk in sample:
                    found = peer.memory(pk)
                    if found:
                        found["bare_msgpack"] = len(
                            msgpack.packb(core.bare_values(pk), use_bin_type=True)
                        )
                        sizes.append(found)
            except Exception as exc:
                log(f"  ! {peer.name} memory: {type(exc).__name__}: {exc}")
            peer_memory[peer.name] = _mean_dicts(sizes) if sizes else None

        versions = collect_versions(env, peers)
        versions["load average (1, 5, 15 min)"] = (
            f"{load_at_start} at the start, {_load_average()} at the end "
            "(other processes on the machine disturb the numbers)"
        )
        return Results(
            settings=settings,
            command=command,
            groups=groups,
            peers=peers,
            memory=memory,
            peer_memory=peer_memory,
            versions=versions,
            prefix=env.prefix,
            schema=env.schema,
            read_rows=len(env.read_pks),
            batch_lists=len(env.batches),
            elapsed_s=time.perf_counter() - started,
            setup_s=setup_s,
        )
    finally:
        for peer in peers:
            try:
                peer.close()
            except Exception as exc:
                log(f"  ! closing {peer.name}: {type(exc).__name__}: {exc}")
        removed = delete_pattern(env.redis, glob_escape(env.prefix) + "*")
        log(f"Redis: removed {removed} keys under {env.prefix!r}")
        if not settings.keep_tables:
            drop(env.engine, env.schema)
            log(f"PostgreSQL: dropped schema {env.schema} and its bench_* tables")
        env.close()


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _mean_dicts(items: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in items[0].items() if isinstance(v, (int, float))]
    return {k: sum(d[k] for d in items) / len(items) for k in keys} | {"entries": len(items)}
