"""Versions, the ratios the performance targets talk about, the Markdown table and the plot."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy
from sqlalchemy import text

from .harness import BLOCKS, block_slices, paired_spread

if TYPE_CHECKING:
    from .context import Env
    from .harness import Group, Variant
    from .peers import PeerRows
    from .runner import Results

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- versions


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # the results themselves do not make the measured code "changed"
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)benchmarks/results",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{rev}{' (with uncommitted changes)' if dirty else ''}"
    except Exception:
        return "unknown"


def collect_versions(env: Env, peers: list[PeerRows]) -> dict[str, Any]:
    from redis.utils import HIREDIS_AVAILABLE

    info = env.redis.info("server")
    with env.engine.connect() as conn:
        pg_version = conn.execute(text("SHOW server_version")).scalar()
        sync_commit = conn.execute(text("SHOW synchronous_commit")).scalar()
        fsync = conn.execute(text("SHOW fsync")).scalar()
    try:
        import psycopg

        psycopg_version = (
            f"{psycopg.__version__} (libpq {psycopg.pq.version()}, {psycopg.pq.__impl__})"
        )
    except Exception:
        psycopg_version = _dist("psycopg")
    hiredis = _dist("hiredis")
    try:  # what the connection negotiated (redis-py 8 speaks RESP3 unless told otherwise)
        protocol = env.redis.client_info().get("resp", "?")
    except Exception:
        protocol = env.redis.connection_pool.connection_kwargs.get("protocol") or "?"
    versions: dict[str, Any] = {
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), {platform.platform()}",
        "sqlalchemy-writethrough": f"{_dist('sqlalchemy-writethrough')} (git {_git()})",
        "SQLAlchemy": sqlalchemy.__version__,
        "redis-py": f"{redis.__version__} (RESP{protocol})",
        "hiredis": (
            f"{hiredis} installed, {'used' if HIREDIS_AVAILABLE else 'NOT used'} by redis-py"
            if hiredis
            else "not installed (pure-Python RESP parser)"
        ),
        "msgpack": _dist("msgpack"),
        "psycopg": psycopg_version,
        "Redis server": f"{info.get('redis_version')} ({env.settings.redis_url})",
        "PostgreSQL server": (
            f"{pg_version} ({env.engine.url.render_as_string(hide_password=True)}; "
            f"synchronous_commit={sync_commit}, fsync={fsync})"
        ),
        "matplotlib": _dist("matplotlib") or "not installed (no plot)",
    }
    for peer in peers:
        parts = [f"{d} {v or 'not installed'}" for d, v in peer.versions.items()]
        versions[f"peer: {peer.name}"] = ", ".join(parts)
    return versions


# --------------------------------------------------------------------------- ratios


#: the target of a row shown for information: no bound to meet, its "met" column is "-"
INFORMATION = "(information)"

#: a group whose floor's block medians spread more than this (p90 over p10, minus 1) ran on a
#: disturbed machine: its ratios say more about the disturbance than about the code
DISTURBED_SPREAD = 0.20
#: blocks of fewer rounds than this are too small to tell a disturbed machine from one slow
#: round (a quick run's, or the 1,000-row commits' 2 rounds a block)
STEADY_BLOCK_ROUNDS = 5

#: what the "met" column says: the whole interval on the target's side, wholly on the other
#: side, or straddling the bound
YES, NO, UNCLEAR = "yes", "no", "unclear"


@dataclass
class Ratio:
    name: str
    value: float | None
    """the median of the per-block values (the exact value for a row without rounds)"""
    display: str
    target: str
    met: str | None
    """``YES``, ``NO`` or ``UNCLEAR``; None for a row without a target (information)"""
    note: str = ""
    low: float | None = None
    """10th percentile of the per-block values (None: not measured in rounds)"""
    high: float | None = None
    """90th percentile of the per-block values"""
    blocks: int = 0
    """how many blocks of rounds the values come from (0: not measured in rounds)"""
    interval: str = "-"
    """``low`` to ``high`` as shown ("exact" for a count that has no rounds)"""


def judge(low: float, high: float, bound: tuple[str, float] | None) -> str | None:
    """ "yes" when all of [low, high] meets ``bound`` ("<=" or ">=" a number), "no" when none
    of it does, "unclear" otherwise; None when there is no bound."""
    if bound is None:
        return None
    op, limit = bound
    if op == "<=":
        return YES if high <= limit else NO if low > limit else UNCLEAR
    if op == ">=":
        return YES if low >= limit else NO if high < limit else UNCLEAR
    raise ValueError(f"unknown bound {op!r}")


def _went_to_db(variant: Variant) -> bool:
    note = variant.note.lower()
    return "went to postgresql" in note or "not served from cache" in note


def _ratio(a: float, b: float) -> float:
    return a / b


def _overhead(a: float, b: float) -> float:
    return (a - b) / b * 100


def _show_ratio(v: float) -> str:
    return f"{v:.2f}x"


def _show_overhead(v: float) -> str:
    return f"{v:+.1f}%"


def compute_ratios(results: Results) -> list[Ratio]:
    """The rows of "Against the targets": each ratio of two rows of one group, per block of
    rounds (see ``harness.paired_spread``), with its median and 10th-90th percentile."""
    ratios: list[Ratio] = []

    def paired(
        name: str,
        num_key: str,
        den_key: str,
        target: str,
        bound: tuple[str, float] | None,
        note: str = "",
        overhead: bool = False,
    ) -> None:
        num = results.variant(num_key)
        den = results.variant(den_key)
        spread = None
        if num is not None and den is not None and num.stats() and den.stats():
            spread = paired_spread(num.samples, den.samples, _overhead if overhead else _ratio)
        if spread is None:
            ratios.append(Ratio(name, None, "n/a", target, None, note or "row not measured"))
            return
        show = _show_overhead if overhead else _show_ratio
        ratios.append(
            Ratio(
                name,
                spread.value,
                show(spread.value),
                target,
                judge(spread.low, spread.high, bound),
                note,
                low=spread.low,
                high=spread.high,
                blocks=spread.blocks,
                interval=f"{show(spread.low)} to {show(spread.high)}",
            )
        )

    def exact(
        name: str, value: float, display: str, target: str, bound: tuple[str, float] | None
    ) -> None:
        ratios.append(
            Ratio(
                name,
                value,
                display,
                target,
                judge(value, value, bound),
                low=value,
                high=value,
                interval="exact",
            )
        )

    paired("cached session.get / floor", "get.cached", "floor", "<= 1.2x", ("<=", 1.2))
    paired("uncached session.get / cached session.get", "get.pg", "get.cached", INFORMATION, None)
    paired(
        "bound: SQLAlchemy's session.get around the floor / floor",
        "floor.orm",
        "floor",
        INFORMATION,
        None,
        note="the least a cache behind do_orm_execute can cost, before any work of its own",
    )
    paired(
        "cached session.get / that bound",
        "get.cached",
        "floor.orm",
        INFORMATION,
        None,
        note="what the cache itself adds: key, tracker, decoding, building the instance",
    )
    paired(
        "bound: a new Session opened and closed / floor",
        "session",
        "floor",
        INFORMATION,
        None,
        note="with maker() as s: pass; every session.get row of the one-row group pays it",
    )

    # the asyncio flavour (benchmarks/peers/ours_asyncio.py), when it ran
    async_cached = results.variant("pk.async.cached")
    if async_cached is not None and async_cached.stats() is not None:
        paired(
            "asyncio: await session.get cached / await redis.asyncio GET + decode",
            "pk.async.cached",
            "pk.async.floor",
            INFORMATION,
            None,
            note="AsyncSession + redis.asyncio against the asyncio floor",
        )
        paired(
            "asyncio: await session.get on asyncpg / cached",
            "pk.async.postgresql",
            "pk.async.cached",
            INFORMATION,
            None,
            note="what the cache saves an AsyncSession on asyncpg",
        )
        paired(
            "asyncio cached await session.get / sync cached session.get",
            "pk.async.cached",
            "get.cached",
            INFORMATION,
            None,
            note="the event loop and SQLAlchemy's greenlet bridge, per load",
        )

    pk_group = results.group("pk")
    best: tuple[float, Variant] | None = None
    if pk_group is not None:
        for variant in pk_group.variants:
            if variant.who in ("floor", "postgresql", "ours", "ours (asyncio)", "baseline"):
                continue
            stats = variant.stats()
            if stats is None or _went_to_db(variant):
                continue
            if best is None or stats.median_ns < best[0]:
                best = (stats.median_ns, variant)
    name = "fastest peer's cached pk load / cached session.get"
    if best is not None:
        caveat = f"; that row's note: {best[1].note}" if best[1].note else ""
        paired(
            name,
            best[1].key,
            "get.cached",
            INFORMATION,
            None,
            note=f"fastest peer row: [{best[1].who}] {best[1].label}{caveat}",
        )
    else:
        ratios.append(Ratio(name, None, "n/a", INFORMATION, None, "no peer row measured"))

    if results.variant("get.near") is not None:
        paired(
            "near-cache hit (near_cache=True) / floor",
            "get.near",
            "floor",
            "<= 0.3x",
            ("<=", 0.3),
            note="a session.get answered from process memory, against one Redis GET + unpack",
        )

    batch_cached = results.variant("batch.cached")
    note = ""
    if batch_cached is not None and _went_to_db(batch_cached):
        note = "the cached row is NOT served from cache yet (it went to PostgreSQL)"
    paired(
        "100 rows: PostgreSQL / our cache", "batch.pg", "batch.cached", ">= 2.5x", (">=", 2.5), note
    )
    paired(
        "100 rows: our cache / the bound (MGET + unpack inside SQLAlchemy's select)",
        "batch.cached",
        "batch.floor",
        INFORMATION,
        None,
        note="what building 100 identity-mapped instances (and our checks) adds",
    )
    paired(
        "100 rows: PostgreSQL / the bound",
        "batch.pg",
        "batch.floor",
        INFORMATION,
        None,
        note="the most any cache behind do_orm_execute could gain here, building nothing",
    )
    if results.variant("batch.near") is not None:
        paired(
            "100 rows: near cache (near_cache=True) / our cache from Redis",
            "batch.near",
            "batch.cached",
            INFORMATION,
            None,
            note="the same IN list answered from process memory, against one MGET",
        )
    paired("3 lazy loads: PostgreSQL / our cache", "chain.pg", "chain.cached", "(no target)", None)
    from .context import COMMIT_SIZES

    paired(
        "read-back after commit: PostgreSQL / our cache",
        "readback.pg",
        "readback.cached",
        INFORMATION,
        None,
        note="reading an attribute of the object a commit expired",
    )
    for size in COMMIT_SIZES:
        targeted = size in (1, 100)
        paired(
            f"commit overhead, {size:,} row(s)",
            f"commit{size}.cached",
            f"commit{size}.plain",
            "<= 30%" if targeted else INFORMATION,
            ("<=", 30.0) if targeted else None,
            overhead=True,
        )
        if results.variant(f"commit{size}.floor") is not None:
            paired(
                f"bound: plain commit + one MSET of the rows, {size:,} row(s)",
                f"commit{size}.floor",
                f"commit{size}.plain",
                INFORMATION,
                None,
                note="the least a synchronous write-through adds after COMMIT",
                overhead=True,
            )
    if results.variant("commit1.background") is not None:
        paired(
            'commit overhead, 1 row, publish="background"',
            "commit1.background",
            "commit1.plain",
            "<= 12%",
            ("<=", 12.0),
            note="until commit() returns; the publish lands after it",
            overhead=True,
        )
    for size in COMMIT_SIZES:
        committed = results.variant(f"commit{size}.cached")
        trips = committed.metric_mean("redis_round_trips") if committed else None
        if trips is None:
            continue
        ratios.append(
            Ratio(
                f"Redis round trips per commit, {size:,} row(s)",
                trips,
                f"{trips:.2f}",
                "constant",
                None,
                "mean over the measured commits",
            )
        )
    for group in results.groups:
        for variant in group.variants:
            if variant.who != "baseline":
                continue
            ours_key = variant.key.replace(".baseline", ".cached")
            if results.variant(ours_key) is None:  # get.near.baseline beside get.near
                ours_key = variant.key.removesuffix(".baseline")
            ours = results.variant(ours_key)
            paired(
                f"ours / baseline: {ours.label if ours else ours_key}",
                ours_key,
                variant.key,
                INFORMATION,
                None,
                note="the same operation, this version over the --baseline one, interleaved",
            )
    mem = results.memory
    if mem:
        value = mem["strlen"] / mem["bare_msgpack"]
        exact(
            "bytes per entry (STRLEN) / bare msgpack of the row",
            value,
            _show_ratio(value),
            "<= 1.2x",
            ("<=", 1.2),
        )
        value = mem["memory_usage"] / mem["bare_msgpack"]
        exact(
            "Redis MEMORY USAGE per entry / bare msgpack of the row",
            value,
            _show_ratio(value),
            INFORMATION,
            None,
        )
    return ratios


@dataclass
class Steadiness:
    """How steady the machine was while one group ran: its floor's medians block by block."""

    group: Group
    row: Variant
    """the group's floor (or, without one, its reference row)"""
    low_ns: float
    """10th percentile of the row's block medians"""
    high_ns: float
    """90th percentile"""
    spread: float
    """``high_ns / low_ns - 1``"""
    disturbed: bool | None
    """``spread`` above ``DISTURBED_SPREAD``; None: blocks too small to tell"""


def _steady_row(group: Group) -> Variant | None:
    ran = [v for v in group.variants if v.stats() is not None]
    for who in ("floor", "postgresql"):
        for variant in ran:
            if variant.who == who:
                return variant
    return ran[0] if ran else None


def steadiness(results: Results) -> list[Steadiness]:
    """Per group, how much its floor's median moved between blocks of rounds."""
    out: list[Steadiness] = []
    for group in results.groups:
        row = _steady_row(group)
        spread = row.block_spread() if row is not None else None
        if row is None or spread is None or spread.low <= 0:
            continue
        ratio = spread.high / spread.low - 1
        disturbed = None
        if len(row.samples) >= STEADY_BLOCK_ROUNDS * spread.blocks:
            disturbed = ratio > DISTURBED_SPREAD
        out.append(Steadiness(group, row, spread.low, spread.high, ratio, disturbed))
    return out


def _load(load: tuple[float, ...] | None) -> str:
    return f"{load[0]:.2f}" if load else "unknown"


# --------------------------------------------------------------------------- markdown


def fmt_time(ns: float) -> str:
    us = ns / 1000
    if us < 10_000:
        return f"{us:,.1f} µs"
    return f"{us / 1000:,.2f} ms"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


REFERENCE = {
    "pk": "floor",
    "batch": "batch.pg",
    "chain": "chain.pg",
}


def render_markdown(results: Results) -> str:
    from .context import COMMIT_SIZES

    s = results.settings
    out: list[str] = []
    out.append("# Benchmark results")
    out.append("")
    out.append(
        f"Mode: **{'quick (smoke run, not meaningful numbers)' if s.quick else 'full'}**; "
        f"{s.rows:,} rows in `bench_item`; everything measured in one process, interleaved "
        "(each round runs every row of a group once, in shuffled order), after warm-up rounds. "
        f"Total run time {results.elapsed_s:.0f} s (setup and cache warm-up {results.setup_s:.0f} s)."
    )
    out.append("")
    out.append("Command:")
    out.append("")
    out.append("```")
    out.append(results.command)
    out.append("```")
    out.append("")
    out.append("## Versions")
    out.append("")
    for name, value in results.versions.items():
        out.append(f"- {name}: {value}")
    out.append("")

    steady = steadiness(results)
    disturbed = [st for st in steady if st.disturbed]
    out.append("## Against the targets")
    out.append("")
    out.append(
        f"How sure each ratio is: the measured rounds of a group are cut into {BLOCKS} blocks "
        "of consecutive rounds (fewer when a group has fewer rounds); each block gives its own "
        "ratio of the two rows' medians over the same rounds (rows of a round are paired: they "
        "ran at the same moment). *measured* is the median of the block ratios, *10th to 90th "
        "percentile* their spread: how far the ratio moved while the run went on. *met*: yes "
        "when the whole spread is on the target's side, **no** when it is wholly on the other "
        "side, unclear otherwise; - for a row without a target. One run's spread does not "
        "cover a machine that was busy for the whole run: compare the floor's medians and the "
        "load average with another run's."
    )
    out.append("")
    if disturbed:
        names = ", ".join(f"{st.group.title} ({st.spread:.0%})" for st in disturbed)
        out.append(
            f"**Disturbed run**: the floor's block medians moved more than "
            f"{DISTURBED_SPREAD:.0%} (10th to 90th percentile) in: {_md_escape(names)}. "
            "Those groups' ratios say more about the machine than about the code."
        )
        out.append("")
    out.append("| ratio | measured | 10th to 90th percentile | target | met |")
    out.append("|---|---:|---:|---|---|")
    for ratio in compute_ratios(results):
        met = {YES: "yes", NO: "**no**", UNCLEAR: "unclear", None: "-"}[ratio.met]
        display = ratio.display + (f" ({_md_escape(ratio.note)})" if ratio.note else "")
        out.append(
            f"| {_md_escape(ratio.name)} | {display} | {ratio.interval} | {ratio.target} | {met} |"
        )
    out.append("")
    out.append("### How steady the machine was")
    out.append("")
    out.append(
        "Per group: the floor's median block by block (10th to 90th percentile of the block "
        "medians; the reference row where a group has no floor) and the 1-minute load average "
        f"when the group started and ended ({os.cpu_count()} CPUs; the benchmark, Redis and "
        "PostgreSQL count in it)."
    )
    out.append("")
    out.append("| group | row | block medians | spread | load average | |")
    out.append("|---|---|---:|---:|---:|---|")
    for st in steady:
        flag = {True: "**disturbed**", False: "", None: "too few rounds a block to tell"}[
            st.disturbed
        ]
        out.append(
            f"| {_md_escape(st.group.title)} | {_md_escape(st.row.label)} | "
            f"{fmt_time(st.low_ns)} to {fmt_time(st.high_ns)} | {st.spread:.0%} | "
            f"{_load(st.group.load_before)} to {_load(st.group.load_after)} | {flag} |"
        )
    out.append("")

    for group in results.groups:
        ref_key = REFERENCE.get(group.key)
        if group.key.startswith("commit"):
            ref_key = f"{group.key}.plain"
        ref = results.variant(ref_key) if ref_key else None
        ref_stats = ref.stats() if ref else None
        out.append(f"## {group.title}")
        out.append("")
        blocks = len(block_slices(group.iterations))
        out.append(
            f"{group.iterations} measured rounds after {group.warmup} warm-up rounds "
            f"({group.elapsed_s:.1f} s), in {blocks} blocks of about "
            f"{group.iterations / blocks:.0f} rounds; load average (1 min) "
            f"{_load(group.load_before)} at the start, {_load(group.load_after)} at the end."
        )
        out.append("")
        if ref is not None:
            out.append(f"`x ref`: median over the median of *{_md_escape(ref.label)}*.")
            out.append("")
        out.append(
            "`block medians`: the 10th to 90th percentile of the row's medians over each block "
            "of rounds (how much the row moved during the run)."
        )
        out.append("")
        out.append("| operation | median | p99 | block medians | x ref | notes |")
        out.append("|---|---:|---:|---:|---:|---|")
        for variant in group.variants:
            stats = variant.stats()
            notes = variant.note
            if variant.error:
                notes = f"failed: {variant.error}" + (f"; {notes}" if notes else "")
            trips = variant.metric_mean("redis_round_trips")
            if trips is not None:
                shown = f"{trips:,.0f}" if trips == int(trips) else f"{trips:,.2f}"
                notes = f"{shown} Redis round trips per commit" + (f"; {notes}" if notes else "")
            spread = variant.block_spread()
            if stats is None or spread is None:
                cells = ["-", "-", "-", "-"]
                if not notes:
                    notes = "not run"
            else:
                rel = f"{stats.median_ns / ref_stats.median_ns:.2f}" if ref_stats else "-"
                moved = f"{fmt_time(spread.low)} to {fmt_time(spread.high)}"
                cells = [fmt_time(stats.median_ns), fmt_time(stats.p99_ns), moved, rel]
            who = "" if variant.who in ("ours", "floor", "postgresql") else f"[{variant.who}] "
            label = _md_escape(who + variant.label)
            out.append(f"| {label} | {' | '.join(cells)} | {_md_escape(notes)} |")
        out.append("")

    mem = results.memory
    out.append("## Memory per cached row")
    out.append("")
    if mem:
        out.append(
            "Bare msgpack: `msgpack.packb` of the row's 8 values as a list, with the datetime as "
            "an ISO string and the Decimal as a string. STRLEN is the value's length; MEMORY "
            "USAGE adds the key and Redis' own overhead."
        )
        out.append("")
        out.append(
            "| cache | keys per row | value bytes (STRLEN) | MEMORY USAGE | bare msgpack | STRLEN / bare |"
        )
        out.append("|---|---:|---:|---:|---:|---:|")
        out.append(
            f"| ours | 1 (+1 generation key per bucket) | {mem['strlen']:.0f} | {mem['memory_usage']:.0f} "
            f"| {mem['bare_msgpack']:.0f} | {mem['strlen'] / mem['bare_msgpack']:.2f}x |"
        )
        for name, pm in results.peer_memory.items():
            if not pm:
                out.append(f"| {name} | - | - | - | - | not measured |")
                continue
            out.append(
                f"| {name} | {pm['keys']:.0f} | {pm['strlen']:.0f} | {pm['memory_usage']:.0f} | "
                f"{pm['bare_msgpack']:.0f} | {pm['strlen'] / pm['bare_msgpack']:.2f}x |"
            )
        out.append("")
        out.append(f"Our key, for example: `{mem['example_key']}` ({mem['key_bytes']:.0f} bytes).")
        out.append("")

    if results.peers:
        out.append("## What each peer could do")
        out.append("")
        for peer in results.peers:
            versions = ", ".join(f"{d} {v or 'not installed'}" for d, v in peer.versions.items())
            out.append(f"### {peer.name} ({versions})")
            out.append("")
            if peer.unavailable:
                out.append(f"- could not run at all: {_md_escape(peer.unavailable)}")
            for line in peer.capabilities:
                out.append(f"- {line}")
            out.append("")

    out.append("## How it is measured")
    out.append("")
    out.append(
        "- Every row is timed with `time.perf_counter_ns` around the operation only; a session "
        "is opened and closed inside the timed part for the read rows (new session per "
        "operation). The lazy-load rows time the three attribute accesses after an untimed "
        "load of the item. The commit rows load and change the rows untimed, then time "
        "`session.commit()` (flush + COMMIT + the extension's Redis work)."
    )
    out.append(
        "- The floor GETs a plain key holding a byte-for-byte copy of our cache entry for the "
        "same row and runs `msgpack.unpackb` on its row payload: what any Redis-backed cache "
        "pays for one row, before building an ORM object."
    )
    out.append(
        "- Our rows, the PostgreSQL rows and sqlmodel-cache share one `create_engine` (psycopg 3, "
        "default pool); the dogpile recipe has its own engine on the same URL (see its notes) "
        "and sqlacache an asyncio engine (psycopg 3 async). All tables live in a schema of the "
        "run's own (`search_path`), dropped at the end. Our rows and the floor share one "
        f"redis-py client. The read rows cycle through {results.read_rows:,} warm rows; the "
        f"100-row rows through {results.batch_lists} fixed id lists (warm in every cache); the "
        "commit rows change a disjoint range of rows (`quantity` and `price` of each), sizes "
        f"{', '.join(f'{n:,}' for n in COMMIT_SIZES)}."
    )
    out.append(
        "- median and p99 (nearest rank) per row; `x ref` is the row's median over the "
        "group's reference row. Round trips per commit are counted by a redis-py connection "
        "subclass on a second cache instance used only by the commit rows."
    )
    out.append(
        f"- Sample *i* of every row of a group comes from round *i*. The ratios against the "
        f"targets are computed per block of consecutive rounds ({BLOCKS} blocks, at least one "
        "round each), from the two rows' medians in that block; the table shows the median "
        "of the block ratios and their 10th to 90th percentile (linear between ranks). A "
        f"group whose floor's block medians spread more than {DISTURBED_SPREAD:.0%} is "
        f"flagged as disturbed (when its blocks hold at least {STEADY_BLOCK_ROUNDS} rounds)."
    )
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- plot

COLORS = {
    "floor": "#7f7f7f",
    "postgresql": "#1f77b4",
    "ours": "#2ca02c",
    "baseline": "#bcbd22",
}
PEER_COLORS = ["#ff7f0e", "#9467bd", "#d62728", "#8c564b"]


def render_plot(results: Results, path: Path) -> str | None:
    """A horizontal bar chart of medians with p99 whiskers; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"

    labels: list[str] = []
    medians: list[float] = []
    p99s: list[float] = []
    colors: list[str] = []
    peer_colors: dict[str, str] = {}
    separators: list[int] = []
    for group in results.groups:
        first = True
        for variant in group.variants:
            stats = variant.stats()
            if stats is None:
                continue
            if first and labels:
                separators.append(len(labels))
            first = False
            who = variant.who
            if who not in COLORS and who not in peer_colors:
                peer_colors[who] = PEER_COLORS[len(peer_colors) % len(PEER_COLORS)]
            label = variant.label if who in COLORS else f"[{who}] {variant.label}"
            if len(label) > 70:
                label = label[:67] + "..."
            labels.append(label)
            medians.append(stats.median_ns / 1000)
            p99s.append(stats.p99_ns / 1000)
            colors.append(COLORS.get(who) or peer_colors[who])
    if not labels:
        return "nothing to plot"
    height = max(4.0, 0.32 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(12, height))
    ys = list(range(len(labels)))[::-1]
    errors = [[0.0] * len(medians), [max(0.0, p - m) for p, m in zip(p99s, medians, strict=True)]]
    ax.barh(ys, medians, color=colors, xerr=errors, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    for sep in separators:
        ax.axhline(ys[sep] + 0.5, color="#cccccc", linewidth=0.8)
    if max(p99s) / max(1e-9, min(medians)) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("microseconds per operation (bar: median, whisker: p99)")
    title = "sqlalchemy-writethrough benchmarks"
    if results.settings.quick:
        title += " (quick smoke run: not meaningful)"
    elif any(st.disturbed for st in steadiness(results)):
        title += " (disturbed run: see the report's steadiness table)"
    ax.set_title(title)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=c)
        for c in [COLORS["floor"], COLORS["postgresql"], COLORS["ours"], *peer_colors.values()]
    ]
    ax.legend(
        handles,
        ["Redis floor, bounds", "PostgreSQL, no cache", "this library", *peer_colors.keys()],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.04 * 30 / max(30, len(labels)) - 0.03),
        ncol=3,
        frameon=False,
    )
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- console


def console_summary(results: Results) -> str:
    lines = []
    for group in results.groups:
        blocks = len(block_slices(group.iterations))
        lines.append(
            f"\n{group.title}  ({group.iterations} rounds in {blocks} blocks; load "
            f"{_load(group.load_before)} -> {_load(group.load_after)})"
        )
        for variant in group.variants:
            stats = variant.stats()
            label = variant.label if variant.who in COLORS else f"[{variant.who}] {variant.label}"
            if stats is None:
                why = variant.error or variant.note or "not run"
                lines.append(f"  {label[:78]:<78} {'-':>12} {'-':>12}  {why}")
            else:
                lines.append(
                    f"  {label[:78]:<78} {fmt_time(stats.median_ns):>12} {fmt_time(stats.p99_ns):>12}"
                    + (f"  {variant.note}" if variant.note else "")
                )
    lines.append(
        f"\nAgainst the targets (median of {BLOCKS} blocks' ratios, 10th to 90th percentile)"
    )
    for ratio in compute_ratios(results):
        met = {YES: "met", NO: "NOT met", UNCLEAR: "unclear", None: "-"}[ratio.met]
        note = f"  ({ratio.note})" if ratio.note else ""
        lines.append(
            f"  {ratio.name:<58} {ratio.display:>10} {ratio.interval:>22}  "
            f"target {ratio.target:<14} {met}{note}"
        )
    lines.append("\nHow steady the machine was (the floor's block medians, 10th to 90th pct)")
    for st in steadiness(results):
        flag = {True: "  DISTURBED", False: "", None: "  (too few rounds a block to tell)"}[
            st.disturbed
        ]
        lines.append(
            f"  {st.group.title[:58]:<58} {fmt_time(st.low_ns):>12} to {fmt_time(st.high_ns):>12}"
            f"  spread {st.spread:>5.0%}{flag}"
        )
    return "\n".join(lines)


def write_outputs(results: Results, out_dir: Path, name: str = "latest") -> list[Path]:
    """Write ``<name>.md`` and ``<name>.png`` into ``out_dir``; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    png = out_dir / f"{name}.png"
    written = []
    problem = render_plot(results, png)
    text_ = render_markdown(results)
    if problem is None:
        text_ += f"\n![benchmark plot]({png.name})\n"
        written.append(png)
    else:
        text_ += f"\n(No plot: {problem}.)\n"
    md.write_text(text_, encoding="utf-8")
    written.insert(0, md)
    return written


def print_versions(results: Results) -> None:
    print("\nVersions")
    for name, value in results.versions.items():
        print(f"  {name}: {value}")
    print(f"\nCommand: {results.command}")
    print(f"Python executable: {sys.executable}")
