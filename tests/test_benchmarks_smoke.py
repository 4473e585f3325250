"""Smoke test of the benchmark suite (``benchmarks/``): its quick mode still runs.

Runs the quick mode's core rows in-process (the Redis floor, plain SQLAlchemy on PostgreSQL and
this library; not the peers, which need packages the test environment does not install), then
checks the structure of what it reports and that it cleaned up after itself. Timings are never
asserted: they mean nothing in a smoke run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, registry, sessionmaker

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives at the repository root, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, report, runner  # noqa: E402
from benchmarks.context import Settings  # noqa: E402
from benchmarks.harness import BLOCKS, Group, Variant  # noqa: E402
from benchmarks.models import ITEM_TABLE  # noqa: E402

CORE = ("floor", "postgresql", "ours")


@pytest.fixture(scope="module")
def results(redis_url: str, postgresql_url: str) -> runner.Results:
    args = cli.parse_args(["--quick", "--no-peers", "--iterations", "2", "--warmup", "1"])
    settings = cli.settings_from(args)
    settings.postgresql_url = postgresql_url
    settings.redis_url = redis_url
    return runner.run(settings, "python -m benchmarks --quick --no-peers", log=lambda _: None)


def test_quick_mode_options() -> None:
    """--quick gives a few rounds of every group, all groups, no files in benchmarks/results."""
    settings = cli.settings_from(cli.parse_args(["--quick"]))
    assert settings.quick and settings.peers and not settings.only
    for group in runner.GROUP_ORDER:
        iterations, warmup = settings.group_iterations(group)
        assert 1 <= iterations <= 5 and warmup >= 1
    assert Settings().iterations > settings.iterations


def test_every_core_row_ran(results: runner.Results) -> None:
    """Each group's floor / PostgreSQL / library rows produced one sample per round."""
    assert [g.key for g in results.groups] == list(runner.GROUP_ORDER)
    for group in results.groups:
        core = [v for v in group.variants if v.who in CORE]
        assert {v.who for v in core} >= {"postgresql", "ours"}, group.key
        for variant in core:
            assert variant.error is None, (variant.label, variant.error)
            assert len(variant.samples) == group.iterations, variant.label
            stats = variant.stats()
            assert stats is not None and stats.median_ns > 0 and stats.p99_ns >= stats.median_ns
    assert not results.peers
    # the one-row group's bound of a new Session opened and closed, beside the floor
    pk = next(g for g in results.groups if g.key == "pk")
    session = pk.find("session")
    assert session is not None and session.who == "floor"
    assert len(session.samples) == pk.iterations


def test_commit_rows_count_redis_round_trips(results: runner.Results) -> None:
    """The library's commit rows record the Redis round trips of every measured commit."""
    for group in results.groups:
        if not group.key.startswith("commit"):
            continue
        ours = group.find(f"{group.key}.cached")
        assert ours is not None
        assert len(ours.metrics["redis_round_trips"]) == group.iterations


def test_report_structure(results: runner.Results, tmp_path: Path) -> None:
    """The Markdown report has the versions, the target ratios, every group and the memory."""
    files = report.write_outputs(results, tmp_path, name="smoke")
    assert files[0] == tmp_path / "smoke.md"
    text = files[0].read_text(encoding="utf-8")
    assert "python -m benchmarks --quick --no-peers" in text
    for heading in ("## Versions", "## Against the targets", "## Memory per cached row"):
        assert heading in text
    for group in results.groups:
        assert f"## {group.title}" in text
    names = [r.name for r in report.compute_ratios(results)]
    for expected in (
        "cached session.get / floor",
        "uncached session.get / cached session.get",
        "fastest peer's cached pk load / cached session.get",
        "bound: a new Session opened and closed / floor",
        "100 rows: PostgreSQL / our cache",
        "commit overhead, 1 row(s)",
        "commit overhead, 1,000 row(s)",
        "bytes per entry (STRLEN) / bare msgpack of the row",
    ):
        assert expected in names
    for key in ("Python", "SQLAlchemy", "redis-py", "hiredis", "Redis server", "PostgreSQL server"):
        assert results.versions.get(key)
    assert results.memory["strlen"] > 0 and results.memory["bare_msgpack"] > 0
    if len(files) > 1:  # matplotlib installed
        assert files[1] == tmp_path / "smoke.png" and files[1].stat().st_size > 0


def test_information_rows_are_neither_met_nor_missed(
    results: runner.Results, tmp_path: Path
) -> None:
    """A row shown for information has no bound: "-" in the report's "met" column and in the
    console summary, never "yes" / "met" (which read as a target reached)."""
    ratios = report.compute_ratios(results)
    informative = [r for r in ratios if r.target == report.INFORMATION and r.value is not None]
    assert informative
    text = report.render_markdown(results)
    console = report.console_summary(results).splitlines()
    for ratio in informative:
        row = next(line for line in text.splitlines() if line.startswith(f"| {ratio.name} |"))
        assert row.endswith("| (information) | - |"), row
        line = next(line for line in console if line.startswith(f"  {ratio.name:<58} "))
        assert line.split("target (information)", 1)[1].split()[0] == "-", line


def test_ratios_say_how_sure_they_are(results: runner.Results) -> None:
    """Every ratio of two measured rows carries its block count and a 10th-90th percentile
    around its median, shown in the Markdown table and the console summary; "met" is yes, no
    or unclear for a target and "-" for information; every group has a steadiness line with
    the load average when it started and ended."""
    ratios = report.compute_ratios(results)
    measured = [r for r in ratios if r.blocks]
    assert len(measured) >= 15
    rounds = {g.key: g.iterations for g in results.groups}
    for ratio in measured:
        assert ratio.value is not None and ratio.low is not None and ratio.high is not None
        assert ratio.low <= ratio.value <= ratio.high, ratio
        assert ratio.blocks in {min(BLOCKS, n) for n in rounds.values()}, ratio
        assert " to " in ratio.interval, ratio
        if ratio.target in (report.INFORMATION, "(no target)"):
            assert ratio.met is None, ratio
        else:
            assert ratio.met in (report.YES, report.NO, report.UNCLEAR), ratio
    targeted = [r for r in measured if r.met is not None]
    assert {r.name for r in targeted} >= {
        "cached session.get / floor",
        "near-cache hit (near_cache=True) / floor",
        "100 rows: PostgreSQL / our cache",
        "commit overhead, 1 row(s)",
        "commit overhead, 100 row(s)",
        'commit overhead, 1 row, publish="background"',
    }
    strlen = next(r for r in ratios if r.name.startswith("bytes per entry (STRLEN)"))
    assert strlen.interval == "exact" and strlen.met in (report.YES, report.NO)

    text = report.render_markdown(results)
    assert "| ratio | measured | 10th to 90th percentile | target | met |" in text
    shown = {"yes": report.YES, "**no**": report.NO, "unclear": report.UNCLEAR, "-": None}
    for ratio in measured:
        row = next(line for line in text.splitlines() if line.startswith(f"| {ratio.name} |"))
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[-3] == ratio.interval and shown[cells[-1]] == ratio.met, row
    console = report.console_summary(results)
    for ratio in measured:
        line = next(x for x in console.splitlines() if x.startswith(f"  {ratio.name:<58} "))
        assert ratio.interval in line, line

    assert "### How steady the machine was" in text
    steady = report.steadiness(results)
    assert [st.group.key for st in steady] == [g.key for g in results.groups]
    for st in steady:
        assert 0 < st.low_ns <= st.high_ns and st.spread >= 0
        assert st.disturbed is None  # a quick run's blocks hold one round: too few to tell
        assert st.group.load_before is not None and st.group.load_after is not None
        assert f"| {st.group.title} | {st.row.label} |" in text
    pk = next(st for st in steady if st.group.key == "pk")
    assert pk.row.key == "floor"


# ---------------------------------------------------------------- how sure a ratio is, by hand


def _results(groups: list[Group]) -> runner.Results:
    """Results of made-up samples (no services): what the report makes of them."""
    return runner.Results(
        settings=Settings(),
        command="python -m benchmarks  # made up",
        groups=groups,
        peers=[],
        memory={},
        peer_memory={},
        versions={},
    )


def _row(key: str, who: str, samples: list[int]) -> Variant:
    return Variant(key, key, who, lambda i: 0, samples=samples)


def _pk(floor: list[int], cached: list[int]) -> Group:
    group = Group(
        "pk",
        runner.GROUP_TITLES["pk"],
        [_row("floor", "floor", floor), _row("get.cached", "ours", cached)],
        iterations=len(floor),
        warmup=0,
    )
    group.load_before = group.load_after = (1.0, 1.0, 1.0)
    return group


def _markdown_row(results: runner.Results, name: str) -> list[str]:
    text = report.render_markdown(results)
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split(" | ")]


def test_a_ratio_is_paired_round_by_round() -> None:
    """Both rows tripled half way through the run (a busy machine): the ratio of the rounds
    they shared stays 1.10x in every block, so the target is met without doubt, and the
    floor's move shows the run as disturbed."""
    floor = [100_000] * 50 + [300_000] * 50
    cached = [110_000] * 50 + [330_000] * 50
    results = _results([_pk(floor, cached)])
    ratio = next(r for r in report.compute_ratios(results) if r.name.startswith("cached session"))
    assert (ratio.value, ratio.low, ratio.high, ratio.blocks) == pytest.approx(
        (1.1, 1.1, 1.1, BLOCKS)
    )
    assert _markdown_row(results, "cached session.get / floor") == [
        "cached session.get / floor",
        "1.10x",
        "1.10x to 1.10x",
        "<= 1.2x",
        "yes",
    ]
    (steady,) = report.steadiness(results)
    assert steady.disturbed is True and steady.spread == pytest.approx(2.0)
    text = report.render_markdown(results)
    assert "**Disturbed run**" in text and "| **disturbed** |" in text
    assert "DISTURBED" in report.console_summary(results)


@pytest.mark.parametrize(
    ("cached", "shown", "met"),
    [
        ([110_000] * 100, "1.10x to 1.10x", "yes"),
        ([130_000] * 100, "1.30x to 1.30x", "**no**"),
        # 1.10x for the first 60 rounds, 1.30x after: the spread straddles the target
        ([110_000] * 60 + [130_000] * 40, "1.10x to 1.30x", "unclear"),
    ],
)
def test_met_is_yes_only_when_the_whole_spread_is_on_the_right_side(
    cached: list[int], shown: str, met: str
) -> None:
    results = _results([_pk([100_000] * 100, cached)])
    cells = _markdown_row(results, "cached session.get / floor")
    assert cells[2:] == [shown, "<= 1.2x", met]
    console = report.console_summary(results)
    line = next(x for x in console.splitlines() if x.startswith("  cached session.get / floor"))
    assert line.endswith({"yes": "met", "**no**": "NOT met", "unclear": "unclear"}[met])
    (steady,) = report.steadiness(results)
    assert steady.disturbed is False and "Disturbed run" not in report.render_markdown(results)


def test_a_commit_overhead_has_a_spread_too() -> None:
    """A commit's overhead is computed per block like a ratio: +20% in the first half of the
    run and +40% in the second straddle the <= 30% target: unclear."""
    plain = [1_000_000] * 100
    cached = [1_200_000] * 50 + [1_400_000] * 50
    group = Group(
        "commit1",
        runner.GROUP_TITLES["commit1"],
        [_row("commit1.plain", "postgresql", plain), _row("commit1.cached", "ours", cached)],
        iterations=100,
        warmup=0,
    )
    results = _results([group])
    cells = _markdown_row(results, "commit overhead, 1 row(s)")
    assert cells[2:] == ["+20.0% to +40.0%", "<= 30%", "unclear"]
    # no floor in this group: the steadiness line reads the PostgreSQL row
    (steady,) = report.steadiness(results)
    assert steady.row.key == "commit1.plain" and steady.disturbed is False


def test_a_row_that_did_not_run_has_no_ratio() -> None:
    """A row with no samples (it failed) gives "n/a" and no verdict, not a made-up spread."""
    group = _pk([100_000] * 20, [])
    results = _results([group])
    cells = _markdown_row(results, "cached session.get / floor")
    assert cells[1:] == ["n/a (row not measured)", "-", "<= 1.2x", "-"]


def test_run_cleans_up(results: runner.Results, redis_url: str, postgresql_url: str) -> None:
    """No key is left under the run's Redis prefix, and its schema of bench_* tables is gone."""
    client = redis.Redis.from_url(redis_url)
    try:
        assert results.prefix.startswith("bench-")
        assert list(client.scan_iter(match=f"{results.prefix}*", count=1000)) == []
    finally:
        client.close()
    engine = sa.create_engine(postgresql_url)
    try:
        assert results.schema.startswith("bench_")
        inspector = sa.inspect(engine)
        assert results.schema not in inspector.get_schema_names()
        assert not inspector.has_table(ITEM_TABLE, schema=results.schema)
    finally:
        engine.dispose()


def test_a_baseline_version_is_measured_beside_ours(
    redis_url: str, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--baseline DIR`` loads the package in DIR (here this very tree) under another name and
    adds its row beside ours in each group (the asyncio flavour's too), with a ratio of the two;
    its keys are cleaned up."""
    from benchmarks import peers

    ours_asyncio = [peer for peer in peers.PEERS if peer[1] == "ours_asyncio"]
    monkeypatch.setattr(peers, "PEERS", tuple(ours_asyncio))  # the other peers: not here
    quick = ["--quick", "--iterations", "2", "--warmup", "1"]
    only = ["--only", "pk", "--only", "readback", "--only", "batch"]
    args = cli.parse_args([*quick, "--baseline", str(ROOT), *only])
    settings = cli.settings_from(args)
    settings.postgresql_url = postgresql_url
    settings.redis_url = redis_url
    results = runner.run(settings, "python -m benchmarks --baseline", log=lambda _: None)
    for group in results.groups:
        variant = group.find(f"{group.key.replace('pk', 'get')}.baseline")
        assert variant is not None and variant.error is None
        assert len(variant.samples) == group.iterations
    # the baseline's 100 rows come from its cache (with its own from_cache()), not PostgreSQL
    batch = next(g for g in results.groups if g.key == "batch").find("batch.baseline")
    assert batch is not None and "not served" not in (batch.note or ""), batch and batch.note
    names = [r.name for r in report.compute_ratios(results)]
    assert any(name.startswith("ours / baseline: session.get") for name in names)
    async_baseline = next(g for g in results.groups if g.key == "pk").find("pk.async.baseline")
    assert async_baseline is not None and async_baseline.error is None
    assert any(name.startswith("ours / baseline: await session.get") for name in names)
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{results.prefix}*", count=1000)) == []
    finally:
        client.close()


def test_the_baseline_cache_is_built_like_ours(
    redis_url: str, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--baseline`` compares two versions only if both caches are set up alike: neither sends
    shared stats. The baseline's did, every 5 s through the client our rows and the floor
    share, and went on after the run's clean-up: a --baseline run left its prefixes'
    ``stats``, ``stats:processes`` and ``epoch`` keys behind in Redis."""
    from benchmarks.context import build_env

    # what a benchmark run outside the test suite gets (the suite switches stats off)
    monkeypatch.delenv("SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL", raising=False)
    settings = cli.settings_from(cli.parse_args(["--quick", "--baseline", str(ROOT)]))
    settings.postgresql_url = postgresql_url
    settings.redis_url = redis_url
    env = build_env(settings)
    try:
        assert env.cache.send_stats() is False
        assert env.baseline_cache.send_stats() is False
        if env.baseline_near_cache is not None:
            assert env.baseline_near_cache.send_stats() is False
    finally:
        env.close()


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("vgdb") is None,
    reason="valgrind (and its vgdb) is not installed",
)
@pytest.mark.timeout(300)  # 25 to 45 s here; over 120 s once beside other test runs
def test_callgrind_counts_instructions_and_cleans_up(redis_url: str, tmp_path: Path) -> None:
    """``python -m benchmarks.callgrind`` runs its cases under callgrind and writes a table of
    instructions per operation (no count asserted but that there is one); its Redis keys are
    deleted at the end."""
    from benchmarks import callgrind

    out = tmp_path / "callgrind.md"
    argv = ["--iterations", "3", "--only", "floor", "--only", "session", "--only", "get.cached"]
    assert callgrind.main([*argv, "--redis-url", redis_url, "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    counted = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            counted[cells[0].strip("`")] = cells[3]
    assert set(counted) == {"floor", "session", "get.cached"}, text
    for value in counted.values():
        assert value and value[0].isdigit() and value != "0", text
    prefix = next(line for line in text.splitlines() if line.startswith("- Redis prefix"))
    client = redis.Redis.from_url(redis_url)
    try:
        name = prefix.split("`")[1]
        assert name.startswith("callgrind-")
        assert list(client.scan_iter(match=f"{name}*", count=1000)) == []
    finally:
        client.close()


def test_callgrind_takes_over_the_lock_of_a_killed_run(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed before it deleted its lock (a test's timeout) left every later run refused
    for the hour the key lives (CI's rehearsal: "another python -m benchmarks.callgrind is
    running"). A lock of a process of this host that is gone is taken over; one of a live
    process, or of another host, is not."""
    import platform

    from benchmarks import callgrind

    lock = f"{prefix}:callgrind-lock"
    monkeypatch.setattr(callgrind, "LOCK_KEY", lock)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = redis.Redis.from_url(redis_url)
    try:
        for holder, taken in [
            (f"{platform.node()}:{os.getpid()}:live", False),
            (f"another-host-{prefix}:{gone.pid}:elsewhere", False),
            (f"{platform.node()}:{gone.pid}:killed", True),
        ]:
            client.set(lock, holder, ex=60)
            assert callgrind._take_lock(client, "mine") is taken
            assert client.get(lock) == (b"mine" if taken else holder.encode())
    finally:
        client.delete(lock)
        client.close()


def test_the_uncounted_row_counts_nothing(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """The "counting switched off" row measures what counting costs only if its counters
    count nothing: a cached get leaves no hit and no read latency behind, a commit no commit
    and no commit latency."""
    from benchmarks.counting import uncounted
    from sqlalchemy_writethrough import CachedModel, WriteThroughCache

    mapper_registry = registry()

    @mapper_registry.mapped
    class UncountedRow(CachedModel):
        __tablename__ = "uncounted_row"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'uncounted.db'}")
    mapper_registry.metadata.create_all(engine)
    client = redis.Redis.from_url(redis_url)
    cache = uncounted(WriteThroughCache(client, prefix=prefix, stats_interval=None))
    maker = sessionmaker(engine)
    cache.install(maker)
    try:
        with maker() as s:
            s.add(UncountedRow(id=1, name="a"))
            s.commit()
        for _ in range(3):
            with maker() as s:
                assert s.get(UncountedRow, 1).name == "a"
        stats = cache.stats()
        assert stats.hits == 0 and stats.read_latency.count == 0, stats
        assert stats.commits == 0 and stats.commit_latency.count == 0, stats
    finally:
        cache.uninstall(maker)
        client.close()
        engine.dispose()
