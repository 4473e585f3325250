"""The read path: recognising a primary-key load in ``do_orm_execute`` and serving it.

A load is served from Redis only when it is exactly "this entity, by this primary key, nothing
else": ``session.get()`` (or ``Query.get()``), a many-to-one lazy load, or a ``select()`` or
legacy ``Query`` carrying ``from_cache()``.
Anything that asks the ORM for more (locking, refresh, populate_existing, loader options or
criteria, joins, limits) goes to the database untouched. A miss loads from the database and
fills the entry, but only over its own lease and only from a read that cannot predate a commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import repeat
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.horizontal_shard import ShardedSession, execute_and_instances
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from . import _sa_compat, codec
from .codec import IMMUTABLE, DecodeError
from .databases import NAMING, DatabaseUnknown, naming_of, own_naming
from .keys import fits_key
from .near import Copy
from .options import FromCache
from .protocol import Fetch, payload_of
from .tracing import record_span
from .tracking import UNTOUCHED, unique_token
from .writing import WritePath

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

    from .keys import KeySpace
    from .model import ModelLayout
    from .runtime import Runtime
    from .tracking import SessionTracker

log = logging.getLogger("sqlalchemy_writethrough")

#: a cached row of another class of the hierarchy than the one asked for
_NO_ROW: Any = object()

#: a load whose values need no time zone of the reader's (see ReadPath.zone)
NO_ZONE: Any = object()

#: the execution option by which a ``Session.get`` that already read the entry and found no hit
#: (see .session) tells the handler so: it asks for a lease at once, without reading it again
PEEKED = "_wt_peeked"

_PLAIN_GET_BIND = Session.get_bind

#: isolation levels under which every statement reads the latest committed rows
_FRESH_LEVELS = frozenset({"READ COMMITTED", "AUTOCOMMIT"})


def others_await_begin(session: Session) -> bool:
    """Whether ``after_begin`` listeners besides the caches' are waiting for the session's
    transaction to begin on a connection."""
    return any(
        not isinstance(getattr(fn, "__self__", None), WritePath)
        for fn in session.dispatch.after_begin
    )


def begin_like_a_load(session: Session, bind: Any) -> None:
    """What the database load the cache answers would have begun: the session's
    transaction (see :func:`._sa_compat.begin_as_a_load`), and, where ``after_begin``
    listeners besides the caches' wait for it, the session's connection to ``bind``:
    zope.sqlalchemy joins the session to the transaction manager there (which closes it at
    the end of the request), others ``SET`` per-transaction settings. Otherwise no
    connection is taken: its checkout costs more than a cached get."""
    _sa_compat.begin_as_a_load(session, getattr(type(session), "_wt_defers_begin", False))
    if others_await_begin(session):
        session.connection(bind_arguments={"bind": bind})


class ReadPath:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        #: the listeners already named in a warning (by module and name: never kept alive)
        self._warned_listeners: set[str] = set()
        self.retirement = runtime.retirement

    def on_execute(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        rt = self.runtime
        if not orm_state.is_select:
            return None  # DML is tracked where it reaches the cursor (see .dml)
        if self.retirement.any and self.retirement.retired_for(orm_state.session):
            return None  # uninstalled; the listener stays (see .retiring)
        if orm_state.is_column_load:
            return self._reload(orm_state)
        mapper = orm_state.bind_mapper
        if mapper is None:
            return None
        layout = rt.models.layout_for(mapper)
        if layout is None:
            return None

        requested = None
        for opt in orm_state.user_defined_options:
            if isinstance(opt, FromCache):
                requested = opt.enabled
        if requested is False:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        if requested is None and not _sa_compat.is_identity_load(orm_state):
            return None  # a select() or legacy Query without from_cache()
        if self._listened_after(orm_state):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None

        stmt = orm_state.statement
        criteria = _sa_compat.plain_entity_select(stmt, mapper)
        if (
            criteria is None
            or layout.loaded_with_row
            or _sa_compat.load_options_forbid_cache(orm_state)
            or not _sa_compat.only_user_defined_options(stmt)
        ):
            rt.counters.add("bypasses", 1, layout.entity_name)
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
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None

        session = orm_state.session
        # a database load autoflushes first (SQLAlchemy does it after this hook, for a result
        # this hook returns it never would)
        _sa_compat.autoflush_before_load(orm_state)
        found_bind = self._bind(orm_state, mapper)
        if found_bind is None:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        bind, token = found_bind
        identity_key = mapper.identity_key_from_primary_key(tuple(pk), token)
        existing = session.identity_map.get(identity_key)
        if existing is not None:
            # the identity map wins, as for a database load (which would not overwrite it)
            state = instance_state(existing)
            if state.expired or state.expired_attributes:
                return None  # a database load refreshes expired attributes: let it
            # another class of the hierarchy is no row of this one (session.get agrees)
            same_class = [existing] if state.mapper.isa(mapper) else []
            return _sa_compat.make_result(same_class, mapper.class_.__name__)

        tracker = self._usable_tracker(session, mapper, bind)
        if tracker is None:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        may_fill = not tracker.wrote
        keys = self._served_keys(orm_state, layout, bind, tracker)
        if keys is None:
            return None
        zone = self.zone(session, layout, bind)
        key, gen_key = keys.pair(pk)
        name = layout.entity_name
        counters = rt.counters
        started = perf_counter()
        # a hit needs no script: one MGET of the entry and its bucket's generation
        found = False if PEEKED in orm_state.execution_options else rt.peek(layout, key, gen_key)
        if found is None:
            counters.add("misses", 1, name)
            self._read_done(name, started, "error")
            return None
        if found is not False:
            result = self._hit(
                session, layout, identity_key, pk, found, key, gen_key, mapper, bind, zone
            )
            if result is not None:
                self._read_done(name, started, "hit")
                return result
        # a miss (or a damaged entry): the script grants a lease, atomically with the check
        lease = unique_token() if may_fill else ""
        # a lease's round trip records the keyspace too, behind the fetch, every time
        # (Redis may have forgotten it): a commit that finds it in the registry after its
        # COMMIT invalidates its keys there, and voids a lease taken before it (see .siblings)
        register = rt.siblings.registration(keys.fields) if may_fill else None
        reply = rt.backend.fetch(key, gen_key, lease, rt.settings.lease_ms, register)
        # refused (see Siblings.registered): a lease granted with it is given up unused
        refused = register is not None and not rt.siblings.registered(register, rt.backend.address)
        if reply is None:
            counters.add("misses", 1, name)
            self._read_done(name, started, "error")
            return None
        status, data = reply
        if status is Fetch.BUSY and data == b"E" and rt.settings.fill_wait:
            # each poll registers again: the lease it may be granted is a new one
            reply = rt.backend.wait_for_fill(
                key, gen_key, lease, rt.settings.lease_ms, rt.settings.fill_wait, register
            )
            if reply is not None:
                status, data = reply
                if register is not None:
                    refused = not rt.siblings.registered(register, rt.backend.address)
        if status is Fetch.BUSY and data == b"L":
            counters.add("locked_reads", 1, name)
        if status is Fetch.DAMAGED:
            counters.add("decode_errors", 1, name)
            log.warning("writethrough: damaged entry %s replaced, served as a miss", key)
            status = Fetch.LEASED if data else Fetch.MISS
        if status is Fetch.HIT:
            assert data is not None
            payload = payload_of(data)
            result = self._hit(
                session, layout, identity_key, pk, payload, key, gen_key, mapper, bind, zone
            )
            if result is not None:
                self._read_done(name, started, "hit")
                return result
            status = Fetch.MISS
        counters.add("misses", 1, name)
        self._read_done(name, started, "locked" if status is Fetch.BUSY else "miss")
        if status is not Fetch.LEASED:
            return None

        assert data is not None
        if refused:
            rt.backend.fill(key, gen_key, lease, data, b"", 0)  # give the lease up
            return None
        return self._load_and_fill(
            orm_state, layout, keys, bind, tracker, identity_key, key, gen_key, lease, data
        )

    def _load_and_fill(
        self,
        orm_state: ORMExecuteState,
        layout: ModelLayout,
        keys: KeySpace,
        bind: Any,
        tracker: SessionTracker,
        identity_key: Any,
        key: str,
        gen_key: str,
        lease: str,
        gen: bytes,
    ) -> Result[Any]:
        """The load SQLAlchemy was about to run, then a fill of its one row over our lease
        (given up when the load fails or must not fill)."""
        rt = self.runtime
        began_before = tracker.began
        try:
            frozen = orm_state.invoke_statement().freeze()
        except BaseException:
            rt.backend.fill(key, gen_key, lease, gen, b"", 0)  # give the lease up
            raise
        rows = frozen.data
        filled = len(rows) == 1 and self._fill(
            orm_state.session,
            layout,
            keys,
            bind,
            identity_key,
            rows[0],
            key,
            gen_key,
            lease,
            gen,
            began_before,
        )
        if not filled:
            rt.backend.fill(key, gen_key, lease, gen, b"", 0)  # others may fill
        return frozen()

    def _read_done(
        self,
        name: str,
        started: float,
        result: str,
        rows: int = 1,
        *,
        hits: int = 0,
        near_hits: int = 0,
    ) -> None:
        """A read that asked Redis: its latency (Redis and decoding), counted with its
        ``hits`` (of them ``near_hits``) when the caller leaves them to this, a span when
        traced, a debug line (never the row)."""
        elapsed = perf_counter() - started
        self.runtime.counters.observe_read(elapsed, name, hits, near_hits)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("writethrough: read %s: %s (%d rows)", name, result, rows)
        tracer = self.runtime.tracer
        if tracer is not None:
            record_span(tracer, "writethrough.read", name, elapsed, result=result, rows=rows)

    def _span(self, what: str, name: str, started: float, **attributes: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("writethrough: %s %s: %r", what[13:], name, attributes)
        tracer = self.runtime.tracer
        if tracer is not None:
            record_span(tracer, what, name, perf_counter() - started, **attributes)

    def _served_keys(
        self, orm_state: ORMExecuteState, layout: ModelLayout, bind: Any, tracker: Any
    ) -> KeySpace | None:
        """The keys of this load's rows in ``bind``'s database, or None (a bypass) when the
        cache may not answer it there: the database could not be named (the load itself
        says what is wrong with it), or a table of the model has row-level security, whose
        policies decide what each session sees."""
        rt = self.runtime
        try:
            keys = rt.models.keys(layout, bind, _naming(orm_state, tracker, bind))
        except DatabaseUnknown:
            keys = None
        if keys is None or not keys.served:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        return keys

    def zone(self, session: Any, layout: ModelLayout, bind: Any) -> Any:
        """The tzinfo in which a load by ``session`` from ``bind`` would return the
        ``DateTime(timezone=True)`` values of ``layout`` (PostgreSQL's drivers give them in
        the time zone of the connection that loaded them, asyncpg in UTC): that of the
        connection the session holds to ``bind`` (``SET TIME ZONE`` in its transaction),
        else that of a new connection of its pool. :data:`NO_ZONE` when the layout has no
        such attribute (or values have no zone on this database), and when the driver
        cannot say (psycopg2 in a zone with transitions, whose offsets come from the server's
        time zone database: values are served as the entry holds them)."""
        if not layout.zoned or bind.dialect.name != "postgresql":
            return NO_ZONE
        held = bind if isinstance(bind, Connection) else _sa_compat.held_connection(session, bind)
        try:
            if held is not None:
                found = codec.driver_timezone(bind.dialect, held.connection)
            else:
                found = self.runtime.models.pool_timezone(bind)
        except Exception:  # the connection or the server cannot say
            found = None
        return NO_ZONE if found is None else found

    def _listened_after(self, orm_state: ORMExecuteState) -> bool:
        """Whether a ``do_orm_execute`` listener runs after the cache's (one added after
        ``install()``, or to a session itself): it may add loader criteria or options, or
        answer the load itself, and a load the cache answered would never reach it. Such a
        load goes to the database, where it does reach it. Another cache's read path and
        ``ShardedSession``'s own listener are known: the cache answers as they would."""
        for fn in _sa_compat.listeners_after(orm_state):
            if fn is execute_and_instances or isinstance(getattr(fn, "__self__", None), ReadPath):
                continue
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
            if name not in self._warned_listeners:
                self._warned_listeners.add(name)
                log.warning(
                    "writethrough: the do_orm_execute listener %s runs after the cache's, "
                    "which cannot see what it does to a load (loader criteria, options, a "
                    "result of its own): loads of sessions it listens to go to the database. "
                    "Add it before cache.install() (listeners of a factory or Session class "
                    "run in the order they were added) to have them served from Redis",
                    name,
                )
            return True
        return False

    def _reload(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        """The expired attributes of a cached model's object reloaded from its entry (the
        read-back after a commit with ``expire_on_commit``): a primary-key load like a get,
        under the same rules. An explicit ``refresh()``, ``populate_existing``, a deferred
        column, an attribute the entry does not hold (excluded, a SQL expression), loader
        options or a miss go to the database, and nothing is filled from a partial load."""
        reload = _sa_compat.reload_of_expired(orm_state)
        mapper = orm_state.bind_mapper
        if reload is None or mapper is None:
            return None
        state, props = reload
        rt = self.runtime
        layout = rt.models.layout_for(mapper)
        if layout is None or state.mapper is not mapper:
            return None
        if self._listened_after(orm_state):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        variant = layout.variant(mapper)
        if variant is None:
            return None
        stored = variant.attr_set
        relationships = mapper.relationships
        if not all(key in stored or key in relationships for key in props):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        stmt = orm_state.statement
        criteria = _sa_compat.plain_entity_select(stmt, mapper)
        if criteria is None or not _sa_compat.only_user_defined_options(stmt):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        params = orm_state.parameters
        pk = _sa_compat.get_clause_identity(criteria, mapper, layout.pk_columns, params)
        if pk is None:
            pk = _sa_compat.pk_equalities(criteria, layout.table, layout.pk_index, params)
        if pk is None or list(state.key[1]) != pk or not layout.pk_is_cacheable(pk):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        session = orm_state.session
        _sa_compat.autoflush_before_load(orm_state)
        found_bind = self._bind(orm_state, mapper)
        if found_bind is None or found_bind[1] != state.key[2]:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        bind = found_bind[0]
        tracker = self._usable_tracker(session, mapper, bind)
        if tracker is None:
            return None
        keys = self._served_keys(orm_state, layout, bind, tracker)
        if keys is None:
            return None
        zone = self.zone(session, layout, bind)
        key, gen_key = keys.pair(pk)
        found = rt.peek(layout, key, gen_key)
        if not found:
            rt.counters.add("misses", 1, layout.entity_name)
            if found is None or not stored <= props or tracker.wrote:
                return None
            return self._reload_and_fill(
                orm_state, layout, keys, bind, tracker, state, key, gen_key
            )
        decoded = self._decoded(layout, found, bind.dialect, pk, key, gen_key)
        if decoded is None or decoded[0] is not variant:
            rt.counters.add("misses", 1, layout.entity_name)
            return None  # undecodable, or the row is now of another class: the database says
        values = decoded[1]
        if zone is not NO_ZONE and variant.zoned:
            values = codec.in_zone(values, variant.zoned, zone)
        state_dict = state.dict
        for name in props:
            if name in stored:
                state_dict[name] = values[name]
        _sa_compat.commit_reloaded(orm_state.session, state, props)
        rt.counters.add("hits", 1, layout.entity_name)
        return _sa_compat.make_result([state.obj()], mapper.class_.__name__)

    def _reload_and_fill(
        self,
        orm_state: ORMExecuteState,
        layout: ModelLayout,
        keys: KeySpace,
        bind: Any,
        tracker: SessionTracker,
        state: Any,
        key: str,
        gen_key: str,
    ) -> Result[Any] | None:
        """A read-back that missed and reloads every column the entry holds: the database's
        row, loaded under a lease as a get's miss is, fills the entry. Without this, a row
        loaded with a plain ``select()`` and changed by UPDATEs that leave loaded columns
        unwritten (whose publish needs the entry it replaces) would never be cached again
        once its entry was gone (TTL, eviction, a Redis that forgot)."""
        rt = self.runtime
        lease = unique_token()
        register = rt.siblings.registration(keys.fields)  # as a get's miss (see .siblings)
        reply = rt.backend.fetch(key, gen_key, lease, rt.settings.lease_ms, register)
        refused = not rt.siblings.registered(register, rt.backend.address)
        if reply is None or reply[0] is not Fetch.LEASED:
            return None  # a hit now, a lock, a lease of another reader: the database says
        data = reply[1]
        assert data is not None
        if refused:
            rt.backend.fill(key, gen_key, lease, data, b"", 0)  # give the lease up
            return None
        # the fill's payload check (the row's key is the object's, nothing modified) holds
        # for the reloaded object only
        return self._load_and_fill(
            orm_state, layout, keys, bind, tracker, state.key, key, gen_key, lease, data
        )

    def _bind(self, orm_state: ORMExecuteState, mapper: Any) -> tuple[Any, Any] | None:
        """(the bind this load reads, its identity token), or None when the load may read
        one of several databases (a sharded session given no shard: it queries each).

        The session then holds a connection to it, as after a database load, if it has
        ``after_begin`` listeners besides the caches' (see :func:`begin_like_a_load`)."""
        found = self._bind_of(orm_state, mapper)
        if found is not None:
            begin_like_a_load(orm_state.session, found[0])
        return found

    def _bind_of(self, orm_state: ORMExecuteState, mapper: Any) -> tuple[Any, Any] | None:
        session = orm_state.session
        token = _sa_compat.identity_token(orm_state)
        if type(session).get_bind is _PLAIN_GET_BIND:
            return session.get_bind(mapper=mapper), token
        if not isinstance(session, ShardedSession):
            # a get_bind of your own sees what it sees when the statement runs
            return session.get_bind(**orm_state.bind_arguments), token
        if token is None:
            parent = orm_state.lazy_loaded_from
            if parent is not None:  # a lazy load reads its parent's shard
                token = parent.identity_token
            else:
                token = orm_state.bind_arguments.get("shard_id")
        if token is None:
            return None  # the session queries every shard the identity_chooser names
        return session.get_bind(mapper=mapper, shard_id=token), token

    def _usable_tracker(self, session: Any, mapper: Any, bind: Any) -> SessionTracker | None:
        """The session's tracker, or None when this transaction must not read Redis: it ran
        SQL whose effect the cache cannot tell, or keys journaled while Redis was away are
        not invalidated yet. A session with no tracker yet has done nothing: a read only
        looks at the shared UNTOUCHED state (unless the session joined an outer
        transaction, which its tracker must remember)."""
        rt = self.runtime
        tracker = rt.peek_tracker(session)
        if tracker is None and isinstance(bind, Connection) and bind.in_transaction():
            tracker = rt.tracker(session)
        if tracker is None:
            tracker = UNTOUCHED
        else:
            tracker.note_first_read(bind)
        if tracker.untracked_write or not rt.journal_replayed():
            return None
        return tracker

    def _hit(
        self,
        session: Any,
        layout: ModelLayout,
        identity_key: Any,
        pk: list[Any],
        payload: memoryview | bytes,
        key: str,
        gen_key: str,
        mapper: Any,
        bind: Any,
        zone: Any = NO_ZONE,
    ) -> Result[Any] | None:
        """The result of a cached row, or None when the entry turned out unusable."""
        instance = self._build(
            session, layout, identity_key, pk, payload, bind.dialect, key, gen_key, mapper, zone
        )
        if instance is None:
            return None
        self.runtime.counters.add("hits", 1, layout.entity_name)
        rows = [] if instance is _NO_ROW else [instance]
        return _sa_compat.make_result(rows, mapper.class_.__name__)

    def _many(
        self, orm_state: ORMExecuteState, layout: ModelLayout, mapper: Any, ids: list[Any]
    ) -> Result[Any] | None:
        """``select(M).where(M.id.in_(ids)).options(from_cache())``: every hit from one MGET,
        the misses from one database query (filled over their leases, as single misses)."""
        rt = self.runtime
        ids = list(dict.fromkeys(ids))
        # every id of the key's exact type: one set of their types, made in C (else each
        # id on its own: asyncpg's UUIDs, ids taken from rows it loaded)
        kind = layout.pk_types[0]
        if not ids or (set(map(type, ids)) != {kind} and not all(fits_key(i, kind) for i in ids)):
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        if kind is int:
            # the order an IN query without ORDER BY gives on SQLite and InnoDB (by the
            # primary key), and on PostgreSQL while the rows lie in key order: not the list's
            ids.sort()
        session = orm_state.session
        _sa_compat.autoflush_before_load(orm_state)
        found_bind = self._bind(orm_state, mapper)
        if found_bind is None:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        bind, token = found_bind
        tracker = self._usable_tracker(session, mapper, bind)
        if tracker is None:
            rt.counters.add("bypasses", 1, layout.entity_name)
            return None
        # identity keys are (class, pk tuple, token): the class of one, for all
        identity_class = mapper.identity_key_from_primary_key((ids[0],))[0]
        identity_map = session.identity_map
        found: dict[Any, Any] = {}
        built = None  # the rows, in the order of ids, when every one was built from the cache
        # the ids to read and their identity keys, in two lists of the same order
        todo: list[Any]
        todo_keys: list[Any]
        if not len(identity_map):  # a session that holds nothing yet: no lookup per id
            todo = ids
            # (class, (value,), token) each, made in C: zip(ids) gives the 1-tuples
            todo_keys = list(zip(repeat(identity_class), zip(ids), repeat(token)))
        else:
            todo = []
            todo_keys = []
            for value in ids:
                identity_key = (identity_class, (value,), token)
                existing = identity_map.get(identity_key)
                if existing is None:
                    todo.append(value)
                    todo_keys.append(identity_key)
                    continue
                state = instance_state(existing)
                if state.expired or state.expired_attributes:
                    return None  # a database load would refresh it: let it
                if state.mapper.isa(mapper):
                    found[value] = existing
        if todo:
            keys = self._served_keys(orm_state, layout, bind, tracker)
            if keys is None:
                return None
            zone = self.zone(session, layout, bind)
            pairs = keys.pairs_of(todo)
            name = layout.entity_name
            started = perf_counter()
            # the near cache's copies from memory, the rest in one MGET (see Runtime.peek_many)
            entries = rt.peek_many(layout, pairs)
            if entries is None:
                rt.counters.add("misses", len(todo), name)
                self._read_done(name, started, "error")
                return None
            # every id to read (none in the identity map): the instances may be the rows
            whole = len(todo) == len(ids)
            missing, built = self._build_many(
                session,
                layout,
                mapper,
                bind.dialect,
                todo,
                todo_keys,
                pairs,
                entries,
                found,
                whole,
                zone,
            )
            rt.counters.add("hits", len(todo) - len(missing), name)
            self._read_done(name, started, "miss" if missing else "hit", len(todo))
            if missing:
                self._load_missing(orm_state, layout, mapper, keys, bind, tracker, missing, found)
        if built is not None:
            rows = built
        elif len(found) == len(ids):  # every row found (found holds no other key)
            rows = list(map(found.__getitem__, ids))
        else:
            rows = [row for row in map(found.get, ids) if row is not None]
        return _sa_compat.make_result(rows, mapper.class_.__name__)

    def _build_many(
        self,
        session: Any,
        layout: ModelLayout,
        requested: Any,
        dialect: Any,
        todo: list[Any],
        todo_keys: list[Any],
        pairs: list[tuple[str, str]],
        entries: Sequence[Any],
        found: dict[Any, Any],
        whole: bool = False,
        zone: Any = NO_ZONE,
    ) -> tuple[list[tuple[Any, Any, str, str]], list[Any] | None]:
        """Instances of the usable entries, into ``found``; the others, to load (as
        ``(value, identity key, key, generation key)``). With ``whole`` (``todo`` is every id
        of the load, in order), when every entry is a row of the requested class, the
        instances in that order instead, ``found`` left alone: the caller's rows, without a
        dict of them by id and a lookup per id."""
        undecoded = entries
        near_copies = (
            self.runtime.near is not None
            and layout.options.near_cache
            and Copy in map(type, entries)
        )
        if near_copies:
            one = layout.base_variant
            if one.mapper.isa(requested):
                kept = _kept_rows(layout, one, dialect, todo, todo_keys, entries)
                if kept is not None:
                    if zone is not NO_ZONE and one.zoned:  # each values dict a copy of its own
                        for _, own in kept:
                            codec.in_zone(own, one.zoned, zone, True)
                    # every entry a near copy of the layout's own class, decoded before
                    instances = _sa_compat.build_persistent_many(
                        session, one.mapper, kept, one.expired, True
                    )
                    if whole:
                        return [], instances
                    found.update(zip(todo, instances, strict=True))
                    return [], None
            # a near-cache copy is decoded by _decoded below, which keeps its decoding
            undecoded = [False if type(entry) is Copy else entry for entry in entries]
        decoded_rows, variants = layout.decode_rows(undecoded, dialect, todo)
        if variants is None and not near_copies and None not in decoded_rows:
            # the common case: every entry a row of the layout's one class, decoded here
            one = layout.base_variant
            if one.mapper.isa(requested):
                if zone is not NO_ZONE and one.zoned:  # decoded here: this load's own
                    for row in decoded_rows:
                        if row is not None:  # (none is: see the test above)
                            codec.in_zone(row, one.zoned, zone, True)
                rows: Any = zip(todo_keys, decoded_rows, strict=True)  # no None among them
                instances = _sa_compat.build_persistent_many(
                    session, one.mapper, rows, one.expired, True
                )
                if whole:
                    return [], instances
                found.update(zip(todo, instances, strict=True))
            return [], None
        missing = []
        # the classes whose rows this load returns (a row of another class of the hierarchy:
        # the ORM finds no row), and the rows by class, in order (one class, most often)
        wanted = {v for v in layout.by_tag.values() if v.mapper.isa(requested)}
        hits: list[tuple[Any, Any, Any, dict[str, Any]]] = []
        classes: dict[Any, None] = {}  # in order of first appearance, as the rows
        only = layout.base_variant if variants is None else None
        for i, values in enumerate(decoded_rows):
            variant: Any = only if variants is None else variants[i]
            if values is None:
                entry = entries[i]
                key, gen_key = pairs[i]
                if entry is not False:
                    # a near-cache copy (its kept decoding, else decoded and kept); else
                    # undecodable or another key's row: logged, counted and removed there
                    decoded = self._decoded(layout, entry, dialect, [todo[i]], key, gen_key)
                    if decoded is not None:
                        # a near copy keeps its values for its next hits: the instance's own
                        variant, values = decoded[0], dict(decoded[1])
                if values is None:
                    missing.append((todo[i], todo_keys[i], key, gen_key))
                    continue
            if variant in wanted:
                if zone is not NO_ZONE and variant.zoned:  # decoded or copied: its own
                    codec.in_zone(values, variant.zoned, zone, True)
                hits.append((variant, todo[i], todo_keys[i], values))
                classes[variant] = None
        for variant in classes:
            rows = hits if len(classes) == 1 else [hit for hit in hits if hit[0] is variant]
            instances = _sa_compat.build_persistent_many(
                session, variant.mapper, [(hit[2], hit[3]) for hit in rows], variant.expired, True
            )
            found.update(zip([hit[1] for hit in rows], instances, strict=True))
        return missing, None

    def _load_missing(
        self,
        orm_state: ORMExecuteState,
        layout: ModelLayout,
        mapper: Any,
        keys: KeySpace,
        bind: Any,
        tracker: Any,
        missing: list[tuple[Any, Any, str, str]],
        found: dict[Any, Any],
    ) -> None:
        rt = self.runtime
        name = layout.entity_name
        rt.counters.add("misses", len(missing), name)
        may_fill = not tracker.wrote
        leases = [unique_token() if may_fill else "" for _ in missing]
        requests = [
            (key, gen_key, lease)
            for (_, _, key, gen_key), lease in zip(missing, leases, strict=True)
        ]
        register = rt.siblings.registration(keys.fields) if may_fill else None  # see .siblings
        fetched = rt.backend.fetch_many(requests, rt.settings.lease_ms, register)
        replies: list[Any] = fetched or [None] * len(missing)
        # refused (see Siblings.registered): every lease granted with it is given up unused
        unlisted = register is not None and not rt.siblings.registered(register, rt.backend.address)
        began_before = tracker.began
        column = mapper.primary_key[0]
        statement = select(mapper).where(column.in_([value for value, _, _, _ in missing]))
        # invoke_statement keeps the call's execution options, not the replaced statement's:
        # the naming the keys were made with (a schema_translate_map on the statement) goes
        # with the load, else it reads another schema's rows into this one's keys
        options = orm_state.execution_options
        naming = {name: options[name] for name in NAMING if name in options}
        if naming:
            statement = statement.execution_options(**naming)
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
            if obj is not None and not unlisted:
                if fresh is None:
                    connection = orm_state.session.connection(bind_arguments={"bind": bind})
                    fresh = _read_was_fresh(connection, began_before)
                    dialect = connection.dialect
                if fresh:
                    payload = self._payload(layout, identity_key, obj, dialect, key) or b""
            ttl = rt.ttl_ms(layout) if payload else 0
            fills.append((key, gen_key, lease, reply[1], payload, ttl))
        started = perf_counter()
        results = rt.backend.fill_many(fills)
        written = sum(1 for fill, ok in zip(fills, results, strict=False) if fill[4] and ok)
        refused = sum(
            1 for fill, ok in zip(fills, results, strict=False) if fill[4] and ok is False
        )
        rt.counters.add("fills", written, name)
        rt.counters.add("fills_refused", refused, name)
        self._span("writethrough.fill", name, started, rows=len(fills), written=written)

    def _build(
        self,
        session: Any,
        layout: ModelLayout,
        identity_key: Any,
        pk: list[Any],
        payload: memoryview | bytes,
        dialect: Any,
        key: str,
        gen_key: str,
        requested: Any,
        zone: Any = NO_ZONE,
    ) -> Any:
        decoded = self._decoded(layout, payload, dialect, pk, key, gen_key)
        if decoded is None:
            return None
        variant, values = decoded
        built = variant.mapper_ref()  # alive: its class is the one requested, or a subclass
        if built is not requested and not built.isa(requested):
            return _NO_ROW  # the row is another class of the hierarchy: the ORM finds no row
        # values decoded from Redis's reply are this load's; a near copy's may be kept in it
        owned = type(payload) is not Copy
        if zone is not NO_ZONE and variant.zoned:
            values = codec.in_zone(values, variant.zoned, zone, owned)
            owned = owned or values is not decoded[1]
        return _sa_compat.build_persistent(
            session, built, identity_key, values, variant.expired, owned
        )

    def _decoded(
        self,
        layout: ModelLayout,
        payload: memoryview | bytes,
        dialect: Any,
        pk: list[Any],
        key: str,
        gen_key: str,
    ) -> tuple[Any, dict[str, Any]] | None:
        """(class layout, attribute values) of an entry; None when it is not a row of its key
        (undecodable, or holding another primary key): then it is removed, and served as a
        miss. The values are the caller's to read, not to change: a near-cache copy whose
        values are all immutable keeps them for its next hits (a mutable value, a JSON
        document say, is decoded again for each)."""
        near_copy = type(payload) is Copy
        if near_copy:
            memo = payload.decoded  # type: ignore[union-attr]
            if memo is not None and memo[0] is dialect and memo[1] is layout and memo[2] == pk:
                decoded: tuple[Any, dict[str, Any]] = memo[3]
                return decoded
        try:
            variant, values = layout.decode_row(payload, dialect)
            if [values[a] for a in layout.pk_attrs] != pk:
                raise DecodeError("holds another primary key")
        except (DecodeError, ValueError) as exc:
            self.runtime.counters.add("decode_errors", 1, layout.entity_name)
            log.warning("writethrough: undecodable entry %s, served as a miss: %s", key, exc)
            self.runtime.backend.invalidate((key, gen_key))
            return None
        if near_copy and all(type(v) in IMMUTABLE for v in values.values()):
            payload.decoded = (dialect, layout, list(pk), (variant, values))  # type: ignore[union-attr]
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
        keys: KeySpace,
        bind: Any,
        identity_key: Any,
        instance: Any,
        key: str,
        gen_key: str,
        lease: str,
        gen: bytes,
        began_before: bool,
    ) -> bool:
        """Fill the entry over our lease; False when this load must not (or could not) fill."""
        connection = session.connection(bind_arguments={"bind": bind})
        if not _read_was_fresh(connection, began_before):
            return False
        payload = self._payload(layout, identity_key, instance, connection.dialect, key)
        if payload is None:
            return False
        rt = self.runtime
        started = perf_counter()
        written = rt.backend.fill(key, gen_key, lease, gen, payload, rt.ttl_ms(layout))
        name = layout.entity_name
        if written:
            rt.counters.add("fills", 1, name)
        elif written is not None:
            rt.counters.add("fills_refused", 1, name)
        self._span("writethrough.fill", name, started, rows=1, written=int(bool(written)))
        return True


def _kept_rows(
    layout: ModelLayout,
    one: Any,
    dialect: Any,
    todo: list[Any],
    todo_keys: list[Any],
    entries: Sequence[Any],
) -> list[tuple[Any, dict[str, Any]]] | None:
    """(identity key, values) of each entry when every one is a near-cache copy whose kept
    decoding (``ReadPath._decoded``'s memo: this dialect, this layout, this primary key) is
    a row of the class layout ``one``, each values dict a copy of its own for its instance;
    None as soon as one is not (the general loop then looks at each entry again). The
    memo's check inline, one loop: a batch served from memory spent more on calling
    ``_decoded`` per entry than on the check."""
    rows: list[tuple[Any, dict[str, Any]]] = []
    append = rows.append
    for value, identity_key, entry in zip(todo, todo_keys, entries, strict=True):
        if type(entry) is not Copy:
            return None
        memo = entry.decoded
        if (
            memo is None
            or memo[0] is not dialect
            or memo[1] is not layout
            or memo[2][0] != value  # this layout's keys are of one column: no list to make
            or memo[3][0] is not one
        ):
            return None
        # the copy keeps its values for its next hits: the instance gets its own
        append((identity_key, memo[3][1].copy()))
    return rows


def _pk_value(obj: Any) -> Any:
    key = instance_state(obj).key
    assert key is not None
    return key[1][0]


def _read_was_fresh(connection: Any, began_before: bool) -> bool:
    """Did the load just made see every commit that completed before its lease was granted?

    Under READ COMMITTED every statement does. Under REPEATABLE READ / SERIALIZABLE only a
    transaction's first statement does (its snapshot starts then, after the lease). SQLite's
    driver runs a SELECT outside any transaction unless the transaction already wrote: the
    sqlite3 connection says whether it began one (``in_transaction``; aiosqlite's too, behind
    SQLAlchemy's adapter, which does not say).
    """
    level = _sa_compat.connection_isolation_level(connection)
    if level == "READ UNCOMMITTED":
        return False
    if level in _FRESH_LEVELS or not began_before:
        return True
    if connection.dialect.name == "sqlite":
        fairy = connection.connection
        began = getattr(fairy.dbapi_connection, "in_transaction", None)
        if began is None:
            began = getattr(fairy.driver_connection, "in_transaction", True)
        return began is False
    return False


def _naming(
    orm_state: ORMExecuteState, tracker: SessionTracker, bind: Any
) -> dict[str, Any] | None:
    """The naming options the load's SQL runs under, where they name another database than
    its engine's: the statement's (or the session's, on SQLAlchemy 2.1) over those of the
    session's connection over the engine's, as SQLAlchemy applies a ``schema_translate_map``."""
    renamed = tracker.renamed.get(bind) if tracker.renamed else None
    options = orm_state.execution_options
    if NAMING[0] not in options and NAMING[1] not in options:
        return renamed  # the common case
    engine = bind.engine if isinstance(bind, Connection) else bind
    if renamed is not None:
        merged = dict(renamed)
    elif isinstance(bind, Connection):
        merged = dict(bind.get_execution_options())
    else:
        merged = dict(engine.get_execution_options())
    merged.update((name, options[name]) for name in NAMING if name in options)
    # the engine's own said explicitly where it is: a Connection bind's may differ
    return naming_of(engine, merged) or own_naming(engine)
