"""Looking after a cache from outside the application: inspect, verify, warm, purge.

The Python API under the command-line tool (:mod:`.cli`, a thin shell over it): each function
takes the cache and the session factory it is installed on, and returns a plain dataclass
the tool prints (or dumps as JSON). Nothing here is on a read or write path; everything
goes through the same protocol the application uses, so it is safe while the application
runs:

- ``warm`` loads rows with ``from_cache()``: misses take leases and fill over them, so a
  writer's lock refuses a fill that raced it, exactly as for the application's own reads;
- ``verify`` reads entries and rows without writing anything (``--fix`` invalidates the
  entries found wrong, through the same script as ``cache.invalidate``); an entry that
  changes while it is being compared is read again rather than reported;
- ``purge`` is ``cache.invalidate(Model)`` (every database, O(1)) or ``cache.clear()``.

Redis is reached through the cache's own transport (:mod:`.transport`): a ``redis.Redis``, a
``RedisCluster`` (every multi-key read is one ``MGET`` per bucket, which never crosses a
slot), or, for a cache on an ``async_sessionmaker``, its ``redis.asyncio`` client. An async
factory's functions run in SQLAlchemy's greenlet on an event loop (:func:`run`), on the sync
``Session`` each ``AsyncSession`` runs, as the application's own ``run_sync`` code does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy import func, inspect, select, text, tuple_
from sqlalchemy.orm import (
    Session,
    configure_mappers,
    scoped_session,
    sessionmaker,
    with_polymorphic,
)

from . import _redis_compat, flavours
from . import _rng as random
from .backend import ScriptBackend
from .cache import WriteThroughCache, _caches
from .codec import DecodeError
from .exc import ConfigurationError
from .keys import DecoratedKey
from .model import ModelLayout
from .options import from_cache
from .protocol import payload_of
from .shared import parse_shared, processes_key, stats_key

#: a progress callback: (rows done, rows in all or None when unknown)
Progress = Callable[[int, "int | None"], None]


class UsageError(ConfigurationError):
    """A wrong argument or configuration of the tool: said in one line, with a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


# -- finding the cache and the model -------------------------------------------------------


class AsyncSessions:
    """The sessions of an ``async_sessionmaker`` as this module uses them: each call makes an
    ``AsyncSession`` and gives its sync ``Session``, to be used inside SQLAlchemy's greenlet
    (:func:`run`), where the cache's asyncio hooks serve it."""

    def __init__(self, maker: Any) -> None:
        self.maker = maker

    def __call__(self) -> Session:
        session: Session = self.maker().sync_session
        return session

    def engines(self) -> list[Any]:
        """The ``AsyncEngine`` objects the factory binds (disposed of by :func:`run`)."""
        kw = getattr(self.maker, "kw", {})
        found = [kw.get("bind"), *(kw.get("binds") or {}).values()]
        return [e for e in found if e is not None and hasattr(e, "dispose")]


def session_factory_of(target: Any) -> Callable[[], Session]:
    """A callable making new sessions of ``target`` (a sessionmaker, a scoped_session: a new
    session, never its thread's current one, or a Session subclass; an async_sessionmaker or
    async_scoped_session: :class:`AsyncSessions`)."""
    if flavours.is_async_target(target) and not isinstance(target, type):
        api = flavours._async_api()
        if isinstance(target, api.async_scoped_session):
            target = target.session_factory
        return AsyncSessions(target)
    if isinstance(target, scoped_session):
        factory: Callable[[], Session] = target.session_factory
        return factory
    if isinstance(target, sessionmaker):
        return target
    if isinstance(target, type) and issubclass(target, Session):
        return target
    raise UsageError(
        f"{target!r} is not a session factory",
        "--app names the sessionmaker, scoped_session, async_sessionmaker or "
        "async_scoped_session the cache is installed on",
    )


def _install_targets(target: Any) -> list[Any]:
    """What ``cache.install()`` may have been given for ``target``'s sessions: the target, or
    the factory a scoped session wraps (sync or async)."""
    candidates = [target]
    api = flavours._async_api()
    scoped = (scoped_session,) if api is None else (scoped_session, api.async_scoped_session)
    if isinstance(target, scoped):
        candidates.append(target.session_factory)
    return candidates


def cache_of(target: Any) -> WriteThroughCache:
    """The cache installed on ``target`` (or ``target`` itself when it is a cache)."""
    if isinstance(target, WriteThroughCache):
        return target
    candidates = _install_targets(target)
    found = [
        cache
        for cache in list(_caches)
        if any(ref() is c for ref in cache._targets for c in candidates)
    ]
    if not found:
        raise UsageError(
            "no WriteThroughCache is installed on it",
            "call cache.install(Session) when the module is imported, or point --app at "
            "the factory the cache is installed on",
        )
    if len(found) > 1:
        raise UsageError(
            f"{len(found)} caches are installed on it",
            "point --app at the cache itself and make sure it is installed on one factory",
        )
    return found[0]


def factory_of(target: Any, cache: WriteThroughCache) -> Callable[[], Session]:
    """The session factory to use: ``target``, or when ``target`` is the cache, the one
    factory it is installed on."""
    if not isinstance(target, WriteThroughCache):
        return session_factory_of(target)
    targets = [t for ref in cache._targets if (t := ref()) is not None]
    unique = list({id(t): t for t in targets}.values())
    if len(unique) != 1:
        raise UsageError(
            f"the cache is installed on {len(unique)} session factories",
            "point --app at the sessionmaker to use (MODULE:Session)",
        )
    return session_factory_of(unique[0])


def run(cache: WriteThroughCache, factory: Callable[[], Session], fn: Callable[[], Any]) -> Any:
    """``fn()``, where this module's functions work with ``factory``: called as it is for a
    sync factory; for an async one, in SQLAlchemy's greenlet on a new event loop (the cache's
    ``redis.asyncio`` client and the async engine are awaited there, no sync client is
    used), after which the client's connections and the engine's pool, bound to that loop,
    are closed (both stay usable: the next call opens new ones)."""
    if not isinstance(factory, AsyncSessions):
        return fn()
    from ._sa_compat import greenlet_spawn

    flavour = cache._async
    client: Any = None if flavour is None else flavour.runtime.backend.client  # type: ignore[attr-defined]

    async def main() -> Any:
        if client is not None and _redis_compat.bound_loops(client):
            # connections an earlier loop opened (the application's own, at import) cannot
            # be used on this one
            client.connection_pool.reset()
        try:
            return await greenlet_spawn(fn)
        finally:
            if client is not None:
                await client.connection_pool.disconnect()
            for engine in factory.engines():
                await engine.dispose()

    return asyncio.run(main())


def _backend(cache: WriteThroughCache) -> ScriptBackend:
    """The backend the tool talks to Redis through: the sync flavour's, or in SQLAlchemy's
    greenlet (an async factory, :func:`run`) the asyncio one's. A plain client at a Redis
    Cluster node is switched to the cluster first (one ``INFO cluster``, as the cache does
    when a reply says so)."""
    runtime = cache._runtime_here()
    backend: Any = runtime.backend
    seen = backend.on_cluster_node
    if seen is not None:
        seen(backend)
        backend = runtime.backend
    found: ScriptBackend = backend
    return found


def _raised(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


def read_entries(
    cache: WriteThroughCache, keys: list[str]
) -> tuple[list[bytes | None], list[bytes | None]]:
    """(each entry's raw value, its bucket's generation): one ``MGET`` per bucket, the
    generation key first (an entry and its generation share a hash slot), in one batch."""
    transport = _backend(cache).transport
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(_gen_key(key), []).append(i)
    commands = [("MGET", gen, *[keys[i] for i in idx]) for gen, idx in groups.items()]
    replies = _raised(transport.batch(commands)) if commands else []
    raws: list[bytes | None] = [None] * len(keys)
    gens: list[bytes | None] = [None] * len(keys)
    for idx, reply in zip(groups.values(), replies, strict=True):
        for i, value in zip(idx, reply[1:], strict=True):
            raws[i] = value
            gens[i] = reply[0]
    return raws, gens


def read_stats(cache: WriteThroughCache) -> tuple[Any, list[dict[str, Any]]]:
    """Every process's counters under the cache's prefix (:func:`.shared.read_shared`)."""
    transport = _backend(cache).transport
    return parse_shared(
        transport.command("HGETALL", stats_key(cache.prefix)),
        transport.command("HGETALL", processes_key(cache.prefix)),
    )


def reset_stats(cache: WriteThroughCache) -> None:
    """Delete the shared counters (one key at a time: a Cluster has them in two slots)."""
    transport = _backend(cache).transport
    for key in (stats_key(cache.prefix), processes_key(cache.prefix)):
        transport.command("DEL", key)


def layouts(cache: WriteThroughCache) -> list[ModelLayout]:
    configure_mappers()
    return sorted(cache._models.cached_layouts(), key=lambda lay: lay.entity_name)


def find_model(cache: WriteThroughCache, name: str) -> ModelLayout:
    """A cached model named by its class name (any class of its hierarchy) or table name."""
    found = layouts(cache)
    for layout in found:
        if any(v.mapper.class_.__name__ == name for v in layout.by_tag.values()):
            return layout
    lowered = name.lower()
    for layout in found:
        if any(lowered in (t.name.lower(), t.fullname.lower()) for t in layout.tables):
            return layout
    names = ", ".join(lay.entity_name for lay in found) or "none"
    raise UsageError(f"no cached model is named {name!r}", f"cached models: {names}")


def parse_pk(layout: ModelLayout, text_: str) -> list[Any]:
    """A primary key from the command line (composite keys comma-separated)."""
    parts = text_.split(",") if len(layout.pk_types) > 1 else [text_]
    if len(parts) != len(layout.pk_types):
        raise UsageError(
            f"{layout.entity_name} has a primary key of {len(layout.pk_types)} columns "
            f"({', '.join(layout.pk_attrs)}), got {len(parts)} value(s)",
            "separate the values of a composite key with commas: 1,abc",
        )
    values: list[Any] = []
    for part, kind, attr in zip(parts, layout.pk_types, layout.pk_attrs, strict=True):
        try:
            if isinstance(kind, DecoratedKey):
                values.append(_decorated_value(kind, _spellings(part)))
            else:
                values.append(kind(part) if kind is not str else part)
        except ValueError:
            raise UsageError(
                f"{attr} is a {kind.__name__} primary key, not {part!r}",
                f"give {layout.entity_name}'s key as its database holds it",
            ) from None
    return values


def _spellings(text_: str) -> Iterator[Any]:
    """The values a command-line key may stand for: a UUID, an int, the text itself."""
    with contextlib.suppress(ValueError):
        yield uuid.UUID(text_)
    with contextlib.suppress(ValueError):
        yield int(text_)
    yield text_


def _decorated_value(kind: DecoratedKey, candidates: Iterable[Any]) -> Any:
    """The first of ``candidates`` that a TypeDecorator key column takes as its own (the value
    a load of the row holds), else ValueError."""
    for value in candidates:
        found = kind.key_of(value)
        if found is not None:
            return found
    raise ValueError("no key value")


def _bind(factory: Callable[[], Session], layout: ModelLayout) -> Any:
    with factory() as session:
        return session.get_bind(mapper=layout.mapper)


def _gen_key(key: str) -> str:
    return key[: key.index("}") + 1]


def _state_of(raw: bytes | None, gen: bytes | None) -> str:
    if raw is None:
        return "absent"
    kind = raw[:1]
    if kind == b"V":
        sep = raw.find(b":", 1)
        return "value" if gen is not None and raw[1:sep] == gen else "old generation"
    return {b"L": "lock", b"E": "lease"}.get(kind, "unknown")


def _entity(layout: ModelLayout) -> Any:
    return with_polymorphic(layout.mapper, "*") if len(layout.by_tag) > 1 else layout.mapper


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _differences(values: dict[str, Any], obj: Any, variant_mapper: Any) -> list[str]:
    """Attributes whose cached value is not the database's (or the row's class differs)."""
    state = inspect(obj)
    if state.mapper is not variant_mapper:
        return ["(class)"]
    dict_ = state.dict
    return [
        attr
        for attr, value in values.items()
        if not _same(value, dict_[attr] if attr in dict_ else getattr(obj, attr))
    ]


# -- inspect -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntryReport:
    model: str
    pk: list[Any]
    key: str
    #: value, old generation (never served), lock, lease, absent
    state: str
    #: milliseconds left, None without expiry or entry
    ttl_ms: int | None
    #: the cached row (a value, or an old generation's), None otherwise or when undecodable
    row: dict[str, Any] | None
    #: class of the cached row
    row_class: str | None
    decode_error: str | None
    #: whether the cached row equals the database's (None when there is no row to compare)
    equal: bool | None
    #: attributes that differ from the database row ("(absent)" when the row is gone)
    differences: list[str]


def inspect_entry(
    cache: WriteThroughCache, factory: Callable[[], Session], layout: ModelLayout, pk: list[Any]
) -> EntryReport:
    bind = _bind(factory, layout)
    key, gen_key = cache._keys(layout, bind).pair(pk)
    transport = _backend(cache).transport
    raw, gen, ttl = _raised(transport.batch([("GET", key), ("GET", gen_key), ("PTTL", key)]))
    state = _state_of(raw, gen)
    row = row_class = decode_error = equal = None
    differences: list[str] = []
    if raw is not None and raw[:1] == b"V":
        try:
            variant, row = layout.decode_row(payload_of(raw), bind.dialect)
            row_class = variant.mapper.class_.__name__
        except (DecodeError, ValueError) as exc:
            decode_error = str(exc) or type(exc).__name__
        if row is not None:
            with factory() as session:
                obj = session.get(layout.mapper.class_, tuple(pk), options=[from_cache(False)])
                if obj is None:
                    differences = ["(absent)"]
                else:
                    differences = _differences(row, obj, variant.mapper)
            equal = not differences
    return EntryReport(
        model=layout.entity_name,
        pk=pk,
        key=key,
        state=state,
        ttl_ms=ttl if isinstance(ttl, int) and ttl >= 0 else None,
        row=row,
        row_class=row_class,
        decode_error=decode_error,
        equal=equal,
        differences=differences,
    )


# -- verify --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mismatch:
    key: str
    #: stale (differs from the database), extra (no such row), undecodable
    kind: str
    #: the attributes that differ (stale), or the decoding error (undecodable)
    detail: str


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    model: str
    #: entries looked at (every key of the model in this database, or the sample)
    checked: int
    #: current values compared with the database and found equal
    equal: int
    #: entries of an old generation: invalidated already, never served, expiring by TTL
    old_generation: int
    #: entries locked by a writer or leased to a reader: in flux, not compared
    in_flux: int
    mismatches: list[Mismatch]
    #: mismatched entries invalidated (``fix``)
    fixed: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _scan(transport: Any, pattern: str, count: int) -> Iterator[str]:
    """The keys matching ``pattern``, a ``SCAN`` page at a time (every primary of a
    Cluster)."""
    if transport.clustered:
        keys: Any = transport.scan(pattern, count)
    else:
        keys = _pages(transport, pattern, count)
    for key in keys:
        yield key.decode() if isinstance(key, bytes) else key


def _pages(transport: Any, pattern: str, count: int) -> Iterator[Any]:
    cursor: Any = 0
    while True:
        reply = transport.command("SCAN", cursor, "MATCH", pattern, "COUNT", count)
        cursor = int(reply[0])
        yield from reply[1]
        if cursor == 0:
            return


def _sample(keys: Iterator[str], n: int) -> list[str]:
    """A uniform sample of ``n`` keys (reservoir sampling: the SCAN is cheap next to the
    comparison of each entry)."""
    chosen: list[str] = []
    for i, key in enumerate(keys):
        if i < n:
            chosen.append(key)
        else:
            j = random.randint(0, i)
            if j < n:
                chosen[j] = key
    return chosen


def _batches(keys: Iterator[str] | list[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def verify(
    cache: WriteThroughCache,
    factory: Callable[[], Session],
    layout: ModelLayout,
    *,
    sample: int | None = None,
    batch_size: int = 1000,
    fix: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare a model's entries (in the database of ``factory``'s bind) with the rows.

    Reads only; ``fix`` invalidates the mismatched entries afterwards.
    """
    started = time.perf_counter()
    bind = _bind(factory, layout)
    keys = cache._keys(layout, bind)
    backend = _backend(cache)
    scanned = _scan(backend.transport, keys.pattern, batch_size)
    found: Iterator[str] | list[str] = scanned
    total = None
    if sample is not None:
        found = _sample(scanned, sample)
        total = len(found)
    checked = equal = old = in_flux = 0
    mismatches: list[Mismatch] = []
    dialect = bind.dialect
    compare = _compare_rows if len(layout.by_tag) == 1 else _compare_objects
    for batch in _batches(found, batch_size):
        raws, gens = read_entries(cache, batch)
        current: dict[tuple[Any, ...], tuple[str, bytes]] = {}
        for key, raw, gen in zip(batch, raws, gens, strict=True):
            state = _state_of(raw, gen)
            if state == "absent":
                continue
            checked += 1
            if state == "old generation":
                old += 1
                continue
            if state != "value":
                in_flux += state in ("lock", "lease")
                if state == "unknown":
                    mismatches.append(Mismatch(key, "undecodable", "not an entry"))
                continue
            pk = _pk_of_key(layout, key)
            if pk is None:
                mismatches.append(Mismatch(key, "undecodable", "not a key of this model"))
                continue
            assert raw is not None  # a value
            current[pk] = (key, raw)
        if current:
            suspects = compare(factory, layout, dialect, current)
            equal += len(current) - len(suspects)
            if suspects:
                # read again: an entry a writer changed meanwhile is no mismatch
                again = read_entries(cache, [s[0] for s in suspects])[0]
                for (key, raw, kind, detail), now in zip(suspects, again, strict=True):
                    if now == raw:
                        mismatches.append(Mismatch(key, kind, detail))
                    else:
                        in_flux += 1
        if progress is not None:
            progress(checked, total)
    fixed = 0
    if fix and mismatches:
        pairs: list[str] = []
        for m in mismatches:
            pairs += (m.key, _gen_key(m.key))
        if backend.invalidate(pairs):
            fixed = len(mismatches)
            cache._counters.add("invalidations", fixed)
    return VerifyReport(
        model=layout.entity_name,
        checked=checked,
        equal=equal,
        old_generation=old,
        in_flux=in_flux,
        mismatches=mismatches,
        fixed=fixed,
        seconds=time.perf_counter() - started,
    )


def _pk_of_key(layout: ModelLayout, key: str) -> tuple[Any, ...] | None:
    """The primary key an entity key names (see :mod:`.keys`), or None."""
    sep = key.find("}:")
    if sep < 0:
        return None
    text_ = key[sep + 2 :]
    parts = text_.split(":") if len(layout.pk_types) > 1 else [text_]
    if len(parts) != len(layout.pk_types):
        return None
    values: list[Any] = []
    try:
        for part, kind in zip(parts, layout.pk_types, strict=True):
            if isinstance(kind, DecoratedKey):
                # a key spells an int, a str or a UUID's hex: the one the column takes
                text_value = _unescaped(part)
                hex_uuid = [uuid.UUID(hex=part)] if len(part) == 32 else []
                values.append(_decorated_value(kind, [*hex_uuid, *_spellings(text_value)]))
            elif kind is int:
                values.append(int(part))
            elif kind is uuid.UUID:
                values.append(uuid.UUID(hex=part))
            else:
                values.append(_unescaped(part))
    except ValueError:
        return None
    return tuple(values)


def _unescaped(part: str) -> str:
    return part.replace("%7D", "}").replace("%7B", "{").replace("%3A", ":").replace("%25", "%")


def _pk_filter(layout: ModelLayout, pks: list[tuple[Any, ...]]) -> Any:
    if len(layout.pk_columns) == 1:
        return layout.pk_columns[0].in_([pk[0] for pk in pks])
    return tuple_(*layout.pk_columns).in_(pks)


def _decoded_differences(
    layout: ModelLayout, dialect: Any, raw: bytes, row_values: dict[str, Any], mapper: Any
) -> str | None:
    """None when the entry holds the row's values; else the differing attributes."""
    variant, values = layout.decode_row(payload_of(raw), dialect)
    if variant.mapper is not mapper:
        return "(class)"
    differing = [a for a, v in values.items() if a not in row_values or not _same(v, row_values[a])]
    return ", ".join(differing) or None


def _compare_rows(
    factory: Callable[[], Session],
    layout: ModelLayout,
    dialect: Any,
    current: dict[tuple[Any, ...], tuple[str, bytes]],
) -> list[tuple[str, bytes, str, str]]:
    """(key, raw entry, kind, detail) of the entries that differ from their rows: a model
    of one class, read with Core (no ORM objects) and compared byte for byte with what a fill
    of the row stores, values compared only where the bytes differ."""
    variant = layout.base_variant
    columns = [c.label(a) for a, c in zip(variant.attrs, variant.columns, strict=True)]
    statement = select(*columns).where(_pk_filter(layout, list(current)))
    pk_attrs = layout.pk_attrs
    suspects = []
    with factory() as session:
        result = session.execute(statement, bind_arguments={"mapper": layout.mapper})
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in result.mappings():
            loaded = dict(row)
            rows[tuple(loaded[a] for a in pk_attrs)] = loaded
    for pk, (key, raw) in current.items():
        values = rows.get(pk)
        if values is None:
            suspects.append((key, raw, "extra", "no such row in the database"))
            continue
        if variant.encode_loaded(values, dialect) == bytes(payload_of(raw)):
            continue
        try:
            differing = _decoded_differences(layout, dialect, raw, values, layout.mapper)
        except (DecodeError, ValueError) as exc:
            suspects.append((key, raw, "undecodable", str(exc) or type(exc).__name__))
            continue
        if differing:
            suspects.append((key, raw, "stale", differing))
    return suspects


def _compare_objects(
    factory: Callable[[], Session],
    layout: ModelLayout,
    dialect: Any,
    current: dict[tuple[Any, ...], tuple[str, bytes]],
) -> list[tuple[str, bytes, str, str]]:
    """:func:`_compare_rows` for a hierarchy: loaded as ORM objects (of their classes)."""
    suspects = []
    with factory() as session:
        entity = _entity(layout)
        statement = select(entity).where(_pk_filter(layout, list(current)))
        by_pk = {inspect(obj).identity: obj for obj in session.scalars(statement)}
        for pk, (key, raw) in current.items():
            obj = by_pk.get(pk)
            if obj is None:
                suspects.append((key, raw, "extra", "no such row in the database"))
                continue
            state = inspect(obj)
            variant = layout.variant(state.mapper)
            assert variant is not None  # a row of the hierarchy the layout covers
            values = {a: getattr(obj, a) for a in variant.attrs}
            try:
                differing = _decoded_differences(layout, dialect, raw, values, state.mapper)
            except (DecodeError, ValueError) as exc:
                suspects.append((key, raw, "undecodable", str(exc) or type(exc).__name__))
                continue
            if differing:
                suspects.append((key, raw, "stale", differing))
    return suspects


# -- warm ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WarmReport:
    model: str
    #: rows loaded
    rows: int
    #: entries written (fills)
    filled: int
    #: rows already cached
    cached: int
    #: fills refused (a writer took the key meanwhile) or not attempted (Redis failed)
    skipped: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def warm(
    cache: WriteThroughCache,
    factory: Callable[[], Session],
    layout: ModelLayout,
    *,
    where: str | None = None,
    batch_size: int = 1000,
    progress: Progress | None = None,
) -> WarmReport:
    """Load a model's rows (those matching the SQL condition ``where``) through the cache's
    fill protocol, ``batch_size`` at a time: a cached row is left as it is, a missing one
    is filled over a lease, so a writer that locks a row meanwhile wins."""
    started = time.perf_counter()
    _backend(cache)  # a plain client at a Cluster node goes on as the cluster first
    model = layout.mapper.class_
    before = cache.stats()
    statement = select(*layout.pk_columns).select_from(layout.table)
    if where:
        statement = statement.where(text(where))
    total: int | None = None
    rows = 0
    with factory() as listing:
        try:
            if progress is not None:
                count_stmt = select(func.count()).select_from(statement.subquery())
                total = int(listing.execute(count_stmt).scalar_one())
            result = listing.execute(statement.execution_options(yield_per=batch_size))
            for partition in result.partitions(batch_size):
                pks = [tuple(row) for row in partition]
                _warm_batch(factory, layout, model, pks)
                rows += len(pks)
                if progress is not None:
                    progress(rows, total)
        except Exception as exc:
            if where and "syntax" in str(exc).lower():
                raise UsageError(
                    f"the --where condition is not valid SQL here: {where!r}",
                    "write a condition on the model's table, e.g. --where 'id < 1000'",
                ) from exc
            raise
    after = cache.stats()
    filled = after.fills - before.fills
    cached = after.hits - before.hits
    return WarmReport(
        model=layout.entity_name,
        rows=rows,
        filled=filled,
        cached=cached,
        skipped=max(0, rows - filled - cached),
        seconds=time.perf_counter() - started,
    )


def _warm_batch(
    factory: Callable[[], Session], layout: ModelLayout, model: type, pks: list[tuple[Any, ...]]
) -> None:
    # a new session per batch: its first statement is the load, so the read is fresh
    # whatever the isolation level
    with factory() as session:
        if len(layout.pk_columns) == 1:
            column = layout.pk_columns[0]
            session.scalars(
                select(model).where(column.in_([pk[0] for pk in pks])).options(from_cache())
            ).all()
        else:
            for pk in pks:
                session.get(model, pk)
                session.rollback()  # each row's load is a transaction's first statement


# -- purge ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PurgeReport:
    #: the model purged, or None for every key of the prefix
    model: str | None
    #: whether Redis did it (a model: False means journaled; see cache.invalidate)
    done: bool
    #: keys deleted (``--all``)
    deleted: int | None


def purge(cache: WriteThroughCache, layout: ModelLayout | None) -> PurgeReport:
    _backend(cache)  # a plain client at a Cluster node goes on as the cluster
    if layout is None:
        return PurgeReport(None, True, cache.clear())
    return PurgeReport(layout.entity_name, cache.invalidate(layout.mapper.class_), None)


def jsonable(value: Any) -> Any:
    """Dataclasses, mappings and row values as JSON-friendly structures."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("ok", "rate"):
            if hasattr(type(value), name):
                out[name] = getattr(value, name)
        return out
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)
