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

if TYPE_CHECKING:
    from .context import Env
    from .harness import Variant
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


@dataclass
class Ratio:
    name: str
    value: float | None
    display: str
    target: str
    met: bool | None
    note: str = ""


def _median(results: Results, key: str) -> float | None:
    variant = results.variant(key)
    if variant is None:
        return None
    stats = variant.stats()
    return stats.median_ns if stats else None


def _went_to_db(variant: Variant) -> bool:
    note = variant.note.lower()
    return "went to postgresql" in note or "not served from cache" in note


def compute_ratios(results: Results) -> list[Ratio]:
    ratios: list[Ratio] = []

    def add(
        name: str,
        num: float | None,
        den: float | None,
        target: str,
        ok: Any,
        note: str = "",
        fmt: str = "{:.2f}x",
    ) -> None:
        if num is None or den is None or den == 0:
            ratios.append(Ratio(name, None, "n/a", target, None, note or "row not measured"))
            return
        value = num / den
        met = None if target == INFORMATION else bool(ok(value))  # nothing to meet
        ratios.append(Ratio(name, value, fmt.format(value), target, met, note))

    floor = _median(results, "floor")
    get_cached = _median(results, "get.cached")
    get_pg = _median(results, "get.pg")
    add("cached session.get / floor", get_cached, floor, "<= 1.2x", lambda v: v <= 1.2)
    add(
        "uncached session.get / cached session.get",
        get_pg,
        get_cached,
        INFORMATION,
        lambda v: True,
    )
    orm_floor = _median(results, "floor.orm")
    add(
        "bound: SQLAlchemy's session.get around the floor / floor",
        orm_floor,
        floor,
        INFORMATION,
        lambda v: True,
        note="the least a cache behind do_orm_execute can cost, before any work of its own",
    )
    add(
        "cached session.get / that bound",
        get_cached,
        orm_floor,
        INFORMATION,
        lambda v: True,
        note="what the cache itself adds: key, tracker, decoding, building the instance",
    )
    add(
        "bound: a new Session opened and closed / floor",
        _median(results, "session"),
        floor,
        INFORMATION,
        lambda v: True,
        note="with maker() as s: pass; every session.get row of the one-row group pays it",
    )

    # the asyncio flavour (benchmarks/peers/ours_asyncio.py), when it ran
    async_cached = _median(results, "pk.async.cached")
    if async_cached is not None:
        add(
            "asyncio: await session.get cached / await redis.asyncio GET + decode",
            async_cached,
            _median(results, "pk.async.floor"),
            INFORMATION,
            lambda v: True,
            note="AsyncSession + redis.asyncio against the asyncio floor",
        )
        add(
            "asyncio: await session.get on asyncpg / cached",
            _median(results, "pk.async.postgresql"),
            async_cached,
            INFORMATION,
            lambda v: True,
            note="what the cache saves an AsyncSession on asyncpg",
        )
        add(
            "asyncio cached await session.get / sync cached session.get",
            async_cached,
            get_cached,
            INFORMATION,
            lambda v: True,
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
    if best is not None:
        caveat = f"; that row's note: {best[1].note}" if best[1].note else ""
        add(
            "fastest peer's cached pk load / cached session.get",
            best[0],
            get_cached,
            INFORMATION,
            lambda v: True,
            note=f"fastest peer row: [{best[1].who}] {best[1].label}{caveat}",
        )
    else:
        add(
            "fastest peer's cached pk load / cached session.get",
            None,
            None,
            INFORMATION,
            None,
            note="no peer row measured",
        )

    if results.variant("get.near") is not None:
        add(
            "near-cache hit (near_cache=True) / floor",
            _median(results, "get.near"),
            _median(results, "floor"),
            "<= 0.3x",
            lambda v: v <= 0.3,
            note="a session.get answered from process memory, against one Redis GET + unpack",
        )

    batch_cached = results.variant("batch.cached")
    note = ""
    if batch_cached is not None and _went_to_db(batch_cached):
        note = "the cached row is NOT served from cache yet (it went to PostgreSQL)"
    add(
        "100 rows: PostgreSQL / our cache",
        _median(results, "batch.pg"),
        _median(results, "batch.cached"),
        ">= 2.5x",
        lambda v: v >= 2.5,
        note=note,
    )
    add(
        "100 rows: our cache / the bound (MGET + unpack inside SQLAlchemy's select)",
        _median(results, "batch.cached"),
        _median(results, "batch.floor"),
        INFORMATION,
        lambda v: True,
        note="what building 100 identity-mapped instances (and our checks) adds",
    )
    add(
        "100 rows: PostgreSQL / the bound",
        _median(results, "batch.pg"),
        _median(results, "batch.floor"),
        INFORMATION,
        lambda v: True,
        note="the most any cache behind do_orm_execute could gain here, building nothing",
    )
    if results.variant("batch.near") is not None:
        add(
            "100 rows: near cache (near_cache=True) / our cache from Redis",
            _median(results, "batch.near"),
            _median(results, "batch.cached"),
            INFORMATION,
            lambda v: True,
            note="the same IN list answered from process memory, against one MGET",
        )
    add(
        "3 lazy loads: PostgreSQL / our cache",
        _median(results, "chain.pg"),
        _median(results, "chain.cached"),
        "(no target)",
        lambda v: True,
    )
    from .context import COMMIT_SIZES

    add(
        "read-back after commit: PostgreSQL / our cache",
        _median(results, "readback.pg"),
        _median(results, "readback.cached"),
        INFORMATION,
        lambda v: True,
        note="reading an attribute of the object a commit expired",
    )
    for size in COMMIT_SIZES:
        plain = _median(results, f"commit{size}.plain")
        ours = _median(results, f"commit{size}.cached")
        target = "<= 30%" if size in (1, 100) else INFORMATION
        if plain is None or ours is None:
            add(f"commit overhead, {size} row(s)", None, None, target, None)
            continue
        overhead = (ours - plain) / plain * 100
        ratios.append(
            Ratio(
                f"commit overhead, {size:,} row(s)",
                overhead,
                f"{overhead:+.1f}%",
                target,
                overhead <= 30 if size in (1, 100) else None,
            )
        )
        floor = _median(results, f"commit{size}.floor")
        if floor is not None:
            bound = (floor - plain) / plain * 100
            ratios.append(
                Ratio(
                    f"bound: plain commit + one MSET of the rows, {size:,} row(s)",
                    bound,
                    f"{bound:+.1f}%",
                    INFORMATION,
                    None,
                    "the least a synchronous write-through adds after COMMIT",
                )
            )
    background = _median(results, "commit1.background")
    plain1 = _median(results, "commit1.plain")
    if background is not None and plain1:
        overhead = (background - plain1) / plain1 * 100
        ratios.append(
            Ratio(
                'commit overhead, 1 row, publish="background"',
                overhead,
                f"{overhead:+.1f}%",
                "<= 12%",
                overhead <= 12,
                "until commit() returns; the publish lands after it",
            )
        )
    for size in COMMIT_SIZES:
        variant = results.variant(f"commit{size}.cached")
        trips = variant.metric_mean("redis_round_trips") if variant else None
        if trips is None:
            continue
        ratios.append(
            Ratio(
                f"Redis round trips per commit, {size:,} row(s)",
                trips,
                f"{trips:.2f}",
                "constant",
                None,
            )
        )
    for group in results.groups:
        for variant in group.variants:
            if variant.who != "baseline":
                continue
            ours_key = variant.key.replace(".baseline", ".cached")
            if results.variant(ours_key) is None:  # get.near.baseline beside get.near
                ours_key = variant.key.removesuffix(".baseline")
            add(
                f"ours / baseline: {results.variant(ours_key).label if results.variant(ours_key) else ours_key}",
                _median(results, ours_key),
                _median(results, variant.key),
                INFORMATION,
                lambda v: True,
                note="the same operation, this version over the --baseline one, interleaved",
            )
    mem = results.memory
    if mem:
        add(
            "bytes per entry (STRLEN) / bare msgpack of the row",
            mem["strlen"],
            mem["bare_msgpack"],
            "<= 1.2x",
            lambda v: v <= 1.2,
        )
        add(
            "Redis MEMORY USAGE per entry / bare msgpack of the row",
            mem["memory_usage"],
            mem["bare_msgpack"],
            INFORMATION,
            lambda v: True,
        )
    return ratios


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

    out.append("## Against the targets")
    out.append("")
    out.append("| ratio | measured | target | met |")
    out.append("|---|---:|---|---|")
    for ratio in compute_ratios(results):
        met = {True: "yes", False: "**no**", None: "-"}[ratio.met]
        display = ratio.display + (f" ({_md_escape(ratio.note)})" if ratio.note else "")
        out.append(f"| {_md_escape(ratio.name)} | {display} | {ratio.target} | {met} |")
    out.append("")

    for group in results.groups:
        ref_key = REFERENCE.get(group.key)
        if group.key.startswith("commit"):
            ref_key = f"{group.key}.plain"
        ref = results.variant(ref_key) if ref_key else None
        ref_stats = ref.stats() if ref else None
        out.append(f"## {group.title}")
        out.append("")
        out.append(
            f"{group.iterations} measured rounds after {group.warmup} warm-up rounds "
            f"({group.elapsed_s:.1f} s)."
        )
        out.append("")
        if ref is not None:
            out.append(f"`x ref`: median over the median of *{_md_escape(ref.label)}*.")
            out.append("")
        out.append("| operation | median | p99 | x ref | notes |")
        out.append("|---|---:|---:|---:|---|")
        for variant in group.variants:
            stats = variant.stats()
            notes = variant.note
            if variant.error:
                notes = f"failed: {variant.error}" + (f"; {notes}" if notes else "")
            trips = variant.metric_mean("redis_round_trips")
            if trips is not None:
                shown = f"{trips:,.0f}" if trips == int(trips) else f"{trips:,.2f}"
                notes = f"{shown} Redis round trips per commit" + (f"; {notes}" if notes else "")
            if stats is None:
                cells = ["-", "-", "-"]
                if not notes:
                    notes = "not run"
            else:
                rel = f"{stats.median_ns / ref_stats.median_ns:.2f}" if ref_stats else "-"
                cells = [fmt_time(stats.median_ns), fmt_time(stats.p99_ns), rel]
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
        lines.append(f"\n{group.title}")
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
    lines.append("\nAgainst the targets")
    for ratio in compute_ratios(results):
        met = {True: "met", False: "NOT met", None: "-"}[ratio.met]
        note = f"  ({ratio.note})" if ratio.note else ""
        lines.append(
            f"  {ratio.name:<58} {ratio.display:>10}  target {ratio.target:<14} {met}{note}"
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
