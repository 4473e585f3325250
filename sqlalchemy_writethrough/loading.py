"""The read path: recognising a primary-key load in ``do_orm_execute`` and serving it.

A load is served from Redis only when it is exactly "this entity, by this primary key, nothing
else": ``session.get()``, a many-to-one lazy load, or a ``select()`` carrying ``from_cache()``.
Anything that asks the ORM for more (locking, refresh, populate_existing, loader options or
criteria, joins, limits) goes to the database untouched. A miss loads from the database and
fills the entry, but only over its own lease and only from a read that cannot predate a commit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import instance_state

from . import _sa_compat
from .codec import DecodeError
from .options import FromCache
from .protocol import Fetch, payload_of
from .tracking import UNTOUCHED, unique_token

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

    from .cache import WriteThroughCache
    from .model import ModelLayout
    from .tracking import SessionTracker

log = logging.getLogger("sqlalchemy_writethrough")

#: a cached row of another class of the hierarchy than the one asked for
_NO_ROW: Any = object()

#: isolation levels under which every statement reads the latest committed rows
_FRESH_LEVELS = frozenset({"READ COMMITTED", "AUTOCOMMIT"})


class ReadPath:
    def __init__(self, cache: WriteThroughCache) -> None:
        self.cache = cache

    def on_execute(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        cache = self.cache
        if not orm_state.is_select:
            return None  # DML is tracked where it reaches the cursor (see .dml)
        if orm_state.is_column_load:
            return None
        mapper = orm_state.bind_mapper
        if mapper is None:
            return None
        layout = cache._layout_for(mapper)
        if layout is None:
            return None

        requested = None
        for opt in orm_state.user_defined_options:
            if isinstance(opt, FromCache):
                requested = opt.enabled
        if requested is False:
            cache._counters.add("bypasses")
            return None
        if requested is None and "_sa_orm_load_options" not in orm_state.execution_options:
            return None  # a plain select() without from_cache()

        stmt = orm_state.statement
        criteria = _sa_compat.plain_entity_select(stmt, mapper)
        if (
            criteria is None
            or layout.eager_relationships
            or _sa_compat.load_options_forbid_cache(orm_state)
            or not _sa_compat.only_user_defined_options(stmt)
        ):
            cache._counters.add("bypasses")
            return None
        params = orm_state.parameters
        pk = _sa_compat.get_clause_identity(criteria, mapper, layout.pk_columns, params)
        if pk is None:
            pk = _sa_compat.pk_equalities(criteria, layout.table, layout.pk_index, params)
        if pk is None and requested and len(layout.pk_index) == 1 and _sa_compat.unordered(stmt):
            ids = _sa_compat.pk_in_list(
                criteria, layout.table, next(iter(layout.pk_index)), orm_state.parameters
            )
            if ids is not None:
                return self._many(orm_state, layout, mapper, ids)
        if pk is None or not layout.pk_is_cacheable(pk):
            cache._counters.add("bypasses")
            return None

        session = orm_state.session
        # a database load autoflushes first (SQLAlchemy does it after this hook, for a result
        # this hook returns it never would)
        _sa_compat.autoflush_before_load(orm_state)
        identity_key = mapper.identity_key_from_primary_key(tuple(pk))
        existing = session.identity_map.get(identity_key)
        if existing is not None:
            # the identity map wins, as for a database load (which would not overwrite it)
            state = instance_state(existing)
            if state.expired or state.expired_attributes:
                return None  # a database load refreshes expired attributes: let it
            return _sa_compat.make_result([existing], mapper.class_.__name__)

        bind = session.get_bind(mapper=mapper)
        tracker = self._usable_tracker(session, mapper, bind)
        if tracker is None:
            return None
        may_fill = not tracker.wrote
        key, gen_key = layout.keys.pair(pk)
        # a hit needs no script: one MGET of the entry and its bucket's generation
        found = cache._backend.peek(key, gen_key)
        if found is None:
            cache._counters.add("misses")
            return None
        if found is not False:
            result = self._hit(session, layout, identity_key, pk, found, key, gen_key, mapper, bind)
            if result is not None:
                return result
        # a miss (or a damaged entry): the script grants a lease, atomically with the check
        lease = unique_token() if may_fill else ""
        reply = cache._backend.fetch(key, gen_key, lease, cache._lease_ms)
        if reply is None:
            cache._counters.add("misses")
            return None
        status, data = reply
        if status is Fetch.BUSY and data == b"E" and cache._fill_wait_s:
            reply = self._wait_for_fill(key, gen_key, lease)
            if reply is not None:
                status, data = reply
        if status is Fetch.DAMAGED:
            cache._counters.add("decode_errors")
            log.warning("writethrough: damaged entry %s replaced, served as a miss", key)
            status = Fetch.LEASED if data else Fetch.MISS
        if status is Fetch.HIT:
            assert data is not None
            payload = payload_of(data)
            result = self._hit(
                session, layout, identity_key, pk, payload, key, gen_key, mapper, bind
            )
            if result is not None:
                return result
            status = Fetch.MISS
        cache._counters.add("misses")
        if status is not Fetch.LEASED:
            return None

        began_before = tracker.began
        assert data is not None
        try:
            result = orm_state.invoke_statement()
            frozen = result.freeze()
        except BaseException:
            cache._backend.fill(key, gen_key, lease, data, b"", 0)  # give the lease up
            raise
        rows = frozen.data
        filled = len(rows) == 1 and self._fill(
            session, layout, identity_key, rows[0], key, gen_key, lease, data, began_before
        )
        if not filled:
            cache._backend.fill(key, gen_key, lease, data, b"", 0)  # others may fill
        return frozen()

    def _usable_tracker(self, session: Any, mapper: Any, bind: Any) -> SessionTracker | None:
        """The session's tracker, or None when this transaction must not read Redis: it ran
        SQL whose effect the cache cannot tell, or keys journaled while Redis was away are
        not invalidated yet. A session with no tracker yet has done nothing: a read only
        looks at the shared UNTOUCHED state (unless the session joined an outer
        transaction, which its tracker must remember)."""
        cache = self.cache
        tracker = cache._peek_tracker(session)
        if tracker is None and isinstance(bind, Connection) and bind.in_transaction():
            tracker = cache._tracker(session)
        if tracker is None:
            tracker = UNTOUCHED
        else:
            tracker.note_first_activity(session, mapper, bind)
        if tracker.untracked_write or not cache._journal_replayed():
            cache._counters.add("bypasses")
            return None
        return tracker

    def _hit(
        self,
        session: Any,
        layout: ModelLayout,
        identity_key: Any,
        pk: list[Any],
        payload: memoryview,
        key: str,
        gen_key: str,
        mapper: Any,
        bind: Any,
    ) -> Result[Any] | None:
        """The result of a cached row, or None when the entry turned out unusable."""
        instance = self._build(
            session, layout, identity_key, pk, payload, bind.dialect, key, gen_key, mapper
        )
        if instance is None:
            return None
        self.cache._counters.add("hits")
        rows = [] if instance is _NO_ROW else [instance]
        return _sa_compat.make_result(rows, mapper.class_.__name__)

    def _many(
        self, orm_state: ORMExecuteState, layout: ModelLayout, mapper: Any, ids: list[Any]
    ) -> Result[Any] | None:
        """``select(M).where(M.id.in_(ids)).options(from_cache())``: every hit from one MGET,
        the misses from one database query (filled over their leases, as single misses)."""
        cache = self.cache
        ids = list(dict.fromkeys(ids))
        pk_type = layout.pk_types[0]
        if not ids or not all(type(v) is pk_type for v in ids):
            cache._counters.add("bypasses")
            return None
        session = orm_state.session
        _sa_compat.autoflush_before_load(orm_state)
        bind = session.get_bind(mapper=mapper)
        tracker = self._usable_tracker(session, mapper, bind)
        if tracker is None:
            return None
        # identity keys are (class, pk tuple, token): the class and token of one, for all
        identity_class, _, token = mapper.identity_key_from_primary_key((ids[0],))
        identity_map = session.identity_map
        found: dict[Any, Any] = {}
        todo: list[tuple[Any, Any]] = []
        for value in ids:
            identity_key = (identity_class, (value,), token)
            existing = identity_map.get(identity_key)
            if existing is None:
                todo.append((value, identity_key))
                continue
            state = instance_state(existing)
            if state.expired or state.expired_attributes:
                return None  # a database load would refresh it: let it
            if state.mapper.isa(mapper):
                found[value] = existing
        if todo:
            pairs = layout.keys.pairs_of([value for value, _ in todo])
            entries = cache._backend.peek_many(pairs)
            if entries is None:
                cache._counters.add("misses", len(todo))
                return None
            missing = self._build_many(
                session, layout, mapper, bind.dialect, todo, pairs, entries, found
            )
            cache._counters.add("hits", len(todo) - len(missing))
            if missing:
                self._load_missing(orm_state, layout, mapper, tracker, missing, found)
        rows = [found[value] for value in ids if value in found]
        return _sa_compat.make_result(rows, mapper.class_.__name__)

    def _build_many(
        self,
        session: Any,
        layout: ModelLayout,
        requested: Any,
        dialect: Any,
        todo: list[tuple[Any, Any]],
        pairs: list[tuple[str, str]],
        entries: list[Any],
        found: dict[Any, Any],
    ) -> list[tuple[Any, Any, str, str]]:
        """Instances of the usable entries, into ``found``; the others, to load (as
        ``(value, identity key, key, generation key)``)."""
        missing = []
        by_variant: dict[Any, list[tuple[Any, dict[str, Any]]]] = {}
        order: dict[Any, list[Any]] = {}
        for (value, identity_key), (key, gen_key), entry in zip(todo, pairs, entries, strict=True):
            decoded = None
            if entry is not False:
                decoded = self._decoded(layout, entry, dialect, [value], key, gen_key)
            if decoded is None:
                missing.append((value, identity_key, key, gen_key))
                continue
            variant, values = decoded
            if not variant.mapper.isa(requested):
                continue  # another class of the hierarchy: the ORM finds no row
            by_variant.setdefault(variant, []).append((identity_key, values))
            order.setdefault(variant, []).append(value)
        for variant, rows in by_variant.items():
            instances = _sa_compat.build_persistent_many(
                session, variant.mapper, rows, variant.expired
            )
            found.update(zip(order[variant], instances, strict=True))
        return missing

    def _load_missing(
        self,
        orm_state: ORMExecuteState,
        layout: ModelLayout,
        mapper: Any,
        tracker: Any,
        missing: list[tuple[Any, Any, str, str]],
        found: dict[Any, Any],
    ) -> None:
        cache = self.cache
        cache._counters.add("misses", len(missing))
        may_fill = not tracker.wrote
        leases = [unique_token() if may_fill else "" for _ in missing]
        requests = [
            (key, gen_key, lease)
            for (_, _, key, gen_key), lease in zip(missing, leases, strict=True)
        ]
        replies: list[Any] = cache._backend.fetch_many(requests, cache._lease_ms) or [None] * len(
            missing
        )
        began_before = tracker.began
        column = mapper.primary_key[0]
        statement = select(mapper).where(column.in_([value for value, _, _, _ in missing]))
        loaded = orm_state.invoke_statement(statement=statement).scalars().all()
        by_value = {_pk_value(obj): obj for obj in loaded}
        fresh: bool | None = None
        dialect: Any = None
        fills = []
        for (value, identity_key, key, gen_key), lease, reply in zip(
            missing, leases, replies, strict=True
        ):
            obj = by_value.get(value)
            if obj is not None and instance_state(obj).mapper.isa(mapper):
                found[value] = obj
            if reply is None or reply[0] not in (Fetch.LEASED, Fetch.DAMAGED) or not reply[1]:
                continue
            payload = b""
            if obj is not None:
                if fresh is None:
                    connection = orm_state.session.connection(bind_arguments={"mapper": mapper})
                    fresh = _read_was_fresh(connection, began_before)
                    dialect = connection.dialect
                if fresh:
                    payload = self._payload(layout, identity_key, obj, dialect, key) or b""
            ttl = cache._ttl_ms(layout) if payload else 0
            fills.append((key, gen_key, lease, reply[1], payload, ttl))
        if any(fill[4] for fill in fills):
            cache._register(layout)
        results = cache._backend.fill_many(fills)
        written = sum(1 for fill, ok in zip(fills, results, strict=False) if fill[4] and ok)
        cache._counters.add("fills", written)

    def _wait_for_fill(self, key: str, gen_key: str, lease: str) -> Any:
        """Another reader holds the lease and is loading the row: poll briefly for its fill
        rather than load the same row too (a thundering herd on a cold key)."""
        cache = self.cache
        deadline = time.monotonic() + cache._fill_wait_s
        pause = 0.001
        reply = None
        while time.monotonic() + pause < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.016)
            reply = cache._backend.fetch(key, gen_key, lease, cache._lease_ms)
            if reply is None or reply[0] is not Fetch.BUSY or reply[1] != b"E":
                return reply
        return reply

    def _build(
        self,
        session: Any,
        layout: ModelLayout,
        identity_key: Any,
        pk: list[Any],
        payload: memoryview,
        dialect: Any,
        key: str,
        gen_key: str,
        requested: Any,
    ) -> Any:
        decoded = self._decoded(layout, payload, dialect, pk, key, gen_key)
        if decoded is None:
            return None
        variant, values = decoded
        if not variant.mapper.isa(requested):
            return _NO_ROW  # the row is another class of the hierarchy: the ORM finds no row
        return _sa_compat.build_persistent(
            session, variant.mapper, identity_key, values, variant.expired
        )

    def _decoded(
        self,
        layout: ModelLayout,
        payload: memoryview,
        dialect: Any,
        pk: list[Any],
        key: str,
        gen_key: str,
    ) -> tuple[Any, dict[str, Any]] | None:
        """(class layout, attribute values) of an entry; None when it is not a row of its key
        (undecodable, or holding another primary key): then it is removed, and served as a
        miss."""
        try:
            variant, values = layout.decode_row(payload, dialect)
            if [values[a] for a in layout.pk_attrs] != pk:
                raise DecodeError("holds another primary key")
        except (DecodeError, ValueError) as exc:
            self.cache._counters.add("decode_errors")
            log.warning("writethrough: undecodable entry %s, served as a miss: %s", key, exc)
            self.cache._backend.invalidate((key, gen_key))
            return None
        return variant, values

    def _payload(
        self, layout: ModelLayout, identity_key: Any, instance: Any, dialect: Any, key: str
    ) -> bytes | None:
        """What a fill stores for a row just loaded, or None when it must not be stored."""
        state = instance_state(instance)
        variant = layout.variant(state.mapper)
        if state.key != identity_key or variant is None:
            return None  # e.g. a case-insensitive collation matched another spelling
        if state.modified:
            return None
        try:
            return variant.encode_loaded(state.dict, dialect)
        except Exception:  # a value no codec expected: no fill, never an error to the caller
            log.warning("writethrough: could not encode %s for the cache", key, exc_info=True)
            return None

    def _fill(
        self,
        session: Any,
        layout: ModelLayout,
        identity_key: Any,
        instance: Any,
        key: str,
        gen_key: str,
        lease: str,
        gen: bytes,
        began_before: bool,
    ) -> bool:
        """Fill the entry over our lease; False when this load must not (or could not) fill."""
        connection = session.connection(bind_arguments={"mapper": layout.mapper})
        if not _read_was_fresh(connection, began_before):
            return False
        payload = self._payload(layout, identity_key, instance, connection.dialect, key)
        if payload is None:
            return False
        cache = self.cache
        cache._register(layout)
        written = cache._backend.fill(key, gen_key, lease, gen, payload, cache._ttl_ms(layout))
        if written:
            cache._counters.add("fills")
        elif written is not None:
            cache._counters.add("fills_refused")
        return True


def _pk_value(obj: Any) -> Any:
    key = instance_state(obj).key
    assert key is not None
    return key[1][0]


def _read_was_fresh(connection: Any, began_before: bool) -> bool:
    """Did the load just made see every commit that completed before its lease was granted?

    Under READ COMMITTED every statement does. Under REPEATABLE READ / SERIALIZABLE only a
    transaction's first statement does (its snapshot starts then, after the lease). SQLite's
    driver runs a SELECT outside any transaction unless the transaction already wrote.
    """
    level = _sa_compat.connection_isolation_level(connection)
    if level == "READ UNCOMMITTED":
        return False
    if level in _FRESH_LEVELS or not began_before:
        return True
    if connection.dialect.name == "sqlite":
        dbapi = connection.connection.dbapi_connection
        return getattr(dbapi, "in_transaction", True) is False
    return False
