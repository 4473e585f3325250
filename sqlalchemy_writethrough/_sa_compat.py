"""Every use of SQLAlchemy's private API, in one place.

Each function names the public API it stands in for (none exists, or it is several times slower,
measured in benchmarks/) and the versions it was checked against: SQLAlchemy 2.0.x and 2.1.x.
``tests/test_sa_compat.py`` exercises every function here directly, so an upgrade that moves one
of these internals fails there, by name, instead of somewhere in the cache's behaviour.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.event.attr import _EmptyListener
from sqlalchemy.orm import Mapper, Session, UserDefinedOption
from sqlalchemy.orm import identity as _identity
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import DEFAULT_STATE_ATTR, instance_dict
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.orm.exc import UnmappedClassError
from sqlalchemy.orm.instrumentation import ClassManager
from sqlalchemy.orm.loading import _new_runid
from sqlalchemy.sql import bindparam, operators, select
from sqlalchemy.sql.base import CompileState
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList
from sqlalchemy.sql.selectable import Select
from sqlalchemy.util import LRUCache as _LRUCache

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

SQLA_VERSION = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2])

#: the base of ``Interval`` and ``postgresql.INTERVAL`` (no public common base)
ABSTRACT_INTERVAL: type = sqlalchemy.sql.sqltypes._AbstractInterval
#: "no value known" in ``InstanceState.committed_state`` (not exported by sqlalchemy.orm)
NO_VALUE: Any = sqlalchemy.orm.base.NO_VALUE
SQLA_2_1 = SQLA_VERSION >= (2, 1)
#: the class attribute holding a mapped class's ``ClassManager`` (``inspect(cls)`` reads it
#: from the class's own ``__dict__``): reading it is how a memo keyed on a class sees, for the
#: price of one attribute lookup, that the class was unmapped or mapped again (2.0 and 2.1)
CLASS_MANAGER_ATTR: str = sqlalchemy.orm.base.DEFAULT_MANAGER_ATTR
#: the Session attribute holding its per-entity binds (``Session(binds=...)``, ``bind_mapper()``):
#: ``binds`` on 2.1, the name-mangled ``__binds`` on 2.0. ``Session.get_bind`` returns
#: ``self.bind`` when it has none and a ``bind`` (its first case after an explicit ``bind=``),
#: which a cached get checks without calling it
SESSION_BINDS_ATTR: str = "binds" if SQLA_2_1 else "_Session__binds"
#: the ``Session.info`` dict, once made: ``info`` is a memoized property (2.0 and 2.1) whose
#: first read makes the dict and keeps it under this name in the instance's ``__dict__``; a
#: read that only looks for a key in it reads it there, not making one per session
SESSION_INFO_ATTR: str = "info"
#: the session's identity map class: ``_WeakInstanceDict`` on 2.1, ``WeakInstanceDict`` on 2.0
#: (same ``_add_unpresent``: ``self._dict[key] = state; state._instance_dict = self._wr``)
WEAK_INSTANCE_DICT: type = next(
    getattr(_identity, name)
    for name in ("_WeakInstanceDict", "WeakInstanceDict")
    if hasattr(_identity, name)
)

_T = TypeVar("_T")


def type_on(type_: Any, dialect_name: str) -> Any:
    """The type SQLAlchemy creates and loads a column of ``type_`` with on a dialect of this
    name: its ``with_variant()`` for that name, else itself (``TypeEngine._variant_mapping``,
    private, 2.0 and 2.1; ``dialect_impl()`` resolves it too, but into dialect classes that do
    not always subclass their generic type)."""
    mapping = getattr(type_, "_variant_mapping", None)
    while mapping and dialect_name in mapping:
        found = mapping[dialect_name]
        if found is type_:
            break
        type_ = found
        mapping = getattr(type_, "_variant_mapping", None)
    return type_


def shard_binds(session: Any) -> list[Any]:
    """The bind of every shard of a ``ShardedSession`` (``shards=`` and ``bind_shard()``): kept
    under the name-mangled ``__shards`` (2.0 and 2.1), with no public accessor. Its public
    ``get_bind()`` needs a shard id or a row, else it asks the user's ``shard_chooser`` with no
    row, which the unit of work never does."""
    return list(session._ShardedSession__shards.values())


_UNIQUE_BY_ID: list[Callable[[Any], Any]] = [id]


def _unique_by_id(result: Any) -> list[Callable[[Any], Any]]:
    return _UNIQUE_BY_ID


#: what ``loading.instances`` tells legacy ``Query._iter`` about an entity result: one entity
#: (so it calls ``.scalars()``) of mapped rows (so it calls ``.unique()``)
_ENTITY_ATTRIBUTES: Any = sqlalchemy.util.immutabledict(
    {"filtered": True, "is_single_entity": True}
)


def make_result(objects: Sequence[Any], key: str) -> Result[Any]:
    """A Result of ORM entities, as the ORM's own loading returns for ``select(Entity)``.

    No public constructor builds an entity result: ``FrozenResult`` needs a result to freeze and
    ``merge_frozen_result`` overwrites unflushed edits. Rows are unique by ``id()`` as the ORM
    does, so dataclass models (``__hash__ = None``) work with ``.unique()``. The keyword changed
    in 2.1 (``_unique_filters`` list became ``_create_unique_filters`` callable). The metadata
    is built once per entity name and shared, as SQLAlchemy shares a compiled statement's.
    The private ``_attributes`` carry what legacy ``Query`` reads to return entities, not rows.
    """
    metadata = _METADATA.get(key)
    if metadata is None:
        if SQLA_2_1:
            metadata = SimpleResultMetaData([key], _create_unique_filters=_unique_by_id)
        else:  # pragma: no cover - exercised by the SQLAlchemy 2.0 nox session
            metadata = SimpleResultMetaData([key], _unique_filters=_UNIQUE_BY_ID)  # type: ignore[call-arg,unused-ignore]
        _METADATA[key] = metadata
    result: IteratorResult[Any] = IteratorResult(
        metadata, iter(objects), _source_supports_scalars=True
    )
    result._attributes = _ENTITY_ATTRIBUTES
    return result


_METADATA: dict[str, SimpleResultMetaData] = {}

log = logging.getLogger("sqlalchemy_writethrough")

#: mapper -> (statement, ORM compile state, parameter names) of a load of one of its rows by
#: primary key (see :func:`load_context`): at most 256 mappers, as SQLAlchemy's compiled
#: cache bounds the statements it keeps, and forgotten when SQLAlchemy disposes of the class
_LOAD_STATEMENTS: Any = _LRUCache(256)
#: set once a QueryContext could not be made (logged once; the events then get None)
_NO_LOAD_CONTEXT: list[str] = []


def load_context(
    session: Session, mapper: Mapper[Any], identity_key: tuple[Any, ...], refreshing: Any = None
) -> Any:
    """The QueryContext SQLAlchemy gives the ``load`` event (and ``refresh``, when
    ``refreshing`` is the state whose expired attributes a load fills) of a row it loaded by
    primary key, for an instance built from the cache: that session, ``select(Model)`` by key
    as its statement, the key's values as its parameters. A listener may read
    ``context.session`` (the request's user in ``session.info``), and SQLAlchemy gives None
    only where no query loaded the row (``merge()``).

    The ORM compile state of that statement is made once per mapper (as SQLAlchemy's
    compiled cache keeps it with the compiled statement: in a timeit probe, not in
    benchmarks/, it cost about 30 times the context made from it) by the private
    ``_create_orm_context`` of the statement's plugin class, as
    ``Query._compile_state`` makes it (2.0 and 2.1); ``QueryContext``'s constructor is the
    one ``ORMCompileState.orm_setup_cursor_result`` calls, and its run id
    ``loading._new_runid``'s, as ``loading.instances`` gives it. Only made when a listener is
    there to receive it. None, logged once, if an upgrade breaks this: the event then fires
    as before rather than failing the load."""
    try:
        found = _LOAD_STATEMENTS.get(mapper)
        if found is None:
            names = [f"pk_{i}" for i in range(len(mapper.primary_key))]
            stmt = select(mapper).where(
                *(
                    column == bindparam(name, type_=column.type)
                    for column, name in zip(mapper.primary_key, names, strict=True)
                )
            )
            plugin: Any = CompileState._get_plugin_class_for_plugin(stmt, "orm")
            compile_state = plugin._create_orm_context(stmt, toplevel=True, compiler=None)
            found = _LOAD_STATEMENTS[mapper] = (stmt, compile_state, names)
        stmt, compile_state, names = found
        options: Any = QueryContext.default_load_options
        if identity_key[2] is not None or refreshing is not None:
            options += {"_identity_token": identity_key[2], "_refresh_state": refreshing}
        params = dict(zip(names, identity_key[1], strict=True))
        context = QueryContext(compile_state, stmt, stmt, params, session, options)
        # what loading.instances() sets before it loads a row (a run id per load)
        context.runid = _new_runid()
        context.post_load_paths = {}
        return context
    except Exception as exc:  # pragma: no cover - an upgrade moved these internals
        if not _NO_LOAD_CONTEXT:
            _NO_LOAD_CONTEXT.append(repr(exc))
            log.warning(
                "writethrough: the load events of rows served from the cache get no "
                "QueryContext (this SQLAlchemy's internals moved: %r)",
                exc,
            )
        return None


def forget_load_statements(cls: type) -> None:
    """``cls`` is being disposed of: :data:`_LOAD_STATEMENTS` lets go of its mappers."""
    for mapper in [m for m in list(_LOAD_STATEMENTS.keys()) if m.class_ is cls]:
        _LOAD_STATEMENTS.pop(mapper, None)


def build_persistent(
    session: Session,
    mapper: Mapper[Any],
    identity_key: tuple[Any, ...],
    values: dict[str, Any],
    expired: Iterable[str],
    owned: bool = False,
) -> Any:
    """Create a clean, persistent, identity-mapped instance from column values, with no SQL.

    This is what ``sqlalchemy.orm.loading._instance`` does for a new row. The public route
    (``make_transient_to_detached`` + ``Session.add``) is about 3x slower and fires
    ``detached_to_persistent`` instead of ``load``; here the ``load`` and
    ``loaded_as_persistent`` events fire as for a database load (``load`` receives no
    QueryContext: there was no query).

    The one-row form of :func:`build_persistent_many`'s common case (a cached get): with
    SQLAlchemy's own ``ClassManager`` (its default ``new_instance``, dict getter and state
    attribute) and a class of ``object.__new__``, ``values`` (a copy of them, unless
    ``owned``: the caller's to give away) becomes the instance's ``__dict__`` with the state
    in it, and the state goes into the open ``_WeakInstanceDict``'s private ``_dict`` as its
    ``_add_unpresent`` puts it: four Python calls fewer than ``new_instance``,
    ``dict_getter()`` and ``_add_unpresent``. Anything else goes through
    :func:`build_persistent_many`.
    """
    manager = mapper.class_manager
    cls: Any = manager.class_
    identity_map: Any = session.identity_map
    if (
        type(manager) is not ClassManager
        or cls.__new__ is not object.__new__
        or type(identity_map) is not WEAK_INSTANCE_DICT
        or "_add_unpresent" in identity_map.__dict__  # a closed session's killed map
    ):
        return build_persistent_many(session, mapper, [(identity_key, values)], expired, owned)[0]
    instance = cls.__new__(cls)
    state = manager._state_constructor(instance, manager)
    if not owned:
        values = values.copy()
    values[DEFAULT_STATE_ATTR] = state
    instance.__dict__ = values
    state.key = identity_key
    state.identity_token = identity_key[2]
    state.session_id = session.hash_key
    weak: Any = identity_map  # (a _WeakInstanceDict: its _add_unpresent inlined)
    weak._dict[identity_key] = state
    state._instance_dict = weak._wr
    if expired:
        state.expired_attributes.update(expired)
    load = manager.dispatch.load
    if load:
        load(state, load_context(session, mapper, identity_key))
    dispatch = session.__dict__.get("dispatch")  # session_dispatch's common case, inlined
    if dispatch is None:
        dispatch = session_dispatch(session)
    loaded_as_persistent = dispatch.loaded_as_persistent
    if loaded_as_persistent:
        loaded_as_persistent(session, state)
    return instance


def build_persistent_many(
    session: Session,
    mapper: Mapper[Any],
    rows: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    expired: Iterable[str],
    owned: bool = False,
) -> list[Any]:
    """:func:`build_persistent` for many rows of one class: (identity key, values) each; the
    event collections, the identity map and the session's key are looked up once.

    With SQLAlchemy's own instrumentation, ``ClassManager.new_instance`` is inlined (its
    private ``_state_constructor`` and ``_state_setter``), and the instance's dict is reached
    through ``dict_getter()`` rather than the ``InstanceState.dict`` property: three Python
    calls fewer a row, about a fifth of building 100 instances. ``IdentityMap._add_unpresent``
    is inlined too (its private ``_dict`` and ``_wr``) while the map is a plain
    ``_WeakInstanceDict`` that the session did not close.

    ``owned``: the values dicts are the caller's to give away (decoded for this load, kept
    nowhere else). Each then becomes its instance's ``__dict__``, the state stored in it under
    the manager's ``STATE_ATTR`` (what ``_state_setter`` does), rather than being copied into
    the dict ``__new__`` made: a Python call and a dict copy fewer a row, a third of the
    instructions above the state's own constructor. Only where that is all ``__new__`` and the
    state setter do (``object.__new__``, SQLAlchemy's default dict getter and state attribute).
    """
    manager = mapper.class_manager
    identity_map = session.identity_map
    hash_key = session.hash_key
    expired = tuple(expired)
    load = manager.dispatch.load
    loaded_as_persistent = session.dispatch.loaded_as_persistent
    has_load = bool(load)
    has_persistent = bool(loaded_as_persistent)
    # SQLAlchemy's own instrumentation (ext.instrumentation's managers make instances their way)
    inline = type(manager).new_instance is ClassManager.new_instance
    cls: Any = manager.class_
    make_state = manager._state_constructor
    set_state = manager._state_setter
    dict_of = manager.dict_getter()
    # a closed session's old map has a raising _add_unpresent of its own (IdentityMap._kill)
    map_dict: dict[Any, Any] | None = None
    if type(identity_map) is WEAK_INSTANCE_DICT and "_add_unpresent" not in vars(identity_map):
        map_dict = identity_map._dict
        map_ref = identity_map._wr
    add = identity_map._add_unpresent  # type: ignore[attr-defined,unused-ignore]
    handover = (
        owned
        and inline
        and cls.__new__ is object.__new__
        and dict_of is instance_dict
        and manager.STATE_ATTR == DEFAULT_STATE_ATTR
    )
    instances: list[Any] = []
    append = instances.append
    if handover and map_dict is not None:
        # the common case, in a loop of its own: a batch of 100 rows spends most of its
        # instructions here
        for identity_key, values in rows:
            instance = cls.__new__(cls)
            state = make_state(instance, manager)
            values[DEFAULT_STATE_ATTR] = state
            instance.__dict__ = values
            state.key = identity_key
            state.identity_token = identity_key[2]
            state.session_id = hash_key
            map_dict[identity_key] = state
            state._instance_dict = map_ref
            if expired:
                state.expired_attributes.update(expired)
            if has_load:
                load(state, load_context(session, mapper, identity_key))
            if has_persistent:
                loaded_as_persistent(session, state)
            append(instance)
        return instances
    for identity_key, values in rows:
        if inline:
            instance = cls.__new__(cls)
            state = make_state(instance, manager)
            set_state(instance, state)
        else:  # pragma: no cover - ext.instrumentation
            instance = manager.new_instance()
            state = instance_state(instance)
        dict_of(instance).update(values)
        state.key = identity_key
        state.identity_token = identity_key[2]
        state.session_id = hash_key
        add(state, identity_key)
        if expired:
            state.expired_attributes.update(expired)
        if has_load:
            load(state, load_context(session, mapper, identity_key))
        if has_persistent:
            loaded_as_persistent(session, state)
        append(instance)
    return instances


#: the session events a cached get reads (``do_orm_execute``, ``loaded_as_persistent``) and
#: those ``Session.close()`` reads when it detaches the session's objects
PRIMED_SESSION_EVENTS = (
    "do_orm_execute",
    "after_begin",
    "loaded_as_persistent",
    "persistent_to_detached",
    "deleted_to_detached",
    "pending_to_transient",
    "persistent_to_transient",
    "after_transaction_create",
    "after_transaction_end",
)


def session_dispatch(session: Session) -> Any:
    """``session.dispatch``, made (when it is not made yet) with the listener collections of
    :data:`PRIMED_SESSION_EVENTS` already in place.

    A session's ``_Dispatch`` (2.0 and 2.1) makes each event's collection at its first read:
    the event names are slots, so the read fails, Python formats an ``AttributeError`` and
    ``_Dispatch.__getattr__`` then sets the class's shared ``_EmptyListener`` from
    ``_empty_listeners`` (about 6k instructions per name; a cached get in a new session read
    six of them, close() included). Setting those same objects up front is what those reads
    would do, without the exceptions. A dispatch made before (listeners given to the session
    itself, an earlier use) is returned as it is.
    """
    dispatch: Any = session.__dict__.get("dispatch")
    if dispatch is None:
        dispatch = session.dispatch
        empty = dispatch._empty_listeners
        # PRIMED_SESSION_EVENTS, unrolled (a loop of setattr() costs twice as many opcodes:
        # every session of a cache's factory pays this once)
        dispatch.do_orm_execute = empty["do_orm_execute"]
        dispatch.after_begin = empty["after_begin"]
        dispatch.loaded_as_persistent = empty["loaded_as_persistent"]
        dispatch.persistent_to_detached = empty["persistent_to_detached"]
        dispatch.deleted_to_detached = empty["deleted_to_detached"]
        dispatch.pending_to_transient = empty["pending_to_transient"]
        dispatch.persistent_to_transient = empty["persistent_to_transient"]
        dispatch.after_transaction_create = empty["after_transaction_create"]
        dispatch.after_transaction_end = empty["after_transaction_end"]
    return dispatch


def begin_as_a_load(session: Session, defers: bool) -> None:
    """What a database load does first: autobegin the session's transaction when it has none
    (``Session._autobegin_t()``, 2.0 and 2.1), so that ``rollback()`` expires what was
    loaded, ``begin()`` refuses to begin again, transaction listeners fire, and
    ``autobegin=False`` refuses the load outside ``begin()`` with SQLAlchemy's own error.

    ``defers``: the session's class is the get path's Session subclass, which begins it when
    something can tell (:func:`begin_deferred`): while no ``after_transaction_create``
    listener and no ``after_transaction_end`` listener but one (the cache's) would see it,
    it is only recorded, in the session's ``_wt_deferred_begin`` (an attribute, not a
    ``__dict__`` item: that costs 3% of a cached get). A transaction that a session then
    closes unseen costs about a third of a cached get. The listener collections are read
    as :func:`listener_counts` reads its two (a cached get asks on every call)."""
    if session._transaction is not None:
        return
    if defers and session.autobegin:
        dispatch: Any = session.__dict__.get("dispatch")
        if dispatch is None:
            dispatch = session_dispatch(session)
        creates = dispatch.after_transaction_create
        ends = dispatch.after_transaction_end
        if (
            type(creates) is _EmptyListener
            and not creates.parent_listeners
            and type(ends) is _EmptyListener
            and len(ends.parent_listeners) <= 1
        ):
            session._wt_deferred_begin = True  # type: ignore[attr-defined]
            return
    session._autobegin_t()


def begin_deferred(session: Session) -> None:
    """Begin the transaction a load the cache answered deferred (see
    :func:`begin_as_a_load`), unless one began or ended since."""
    if session._transaction is None and getattr(session, "_wt_deferred_begin", False):
        session._wt_deferred_begin = False  # type: ignore[attr-defined]
        session._autobegin_t()


def forget_deferred_begin(session: Session) -> None:
    """The session's transaction ended (or it closed): a deferred begin was its."""
    if getattr(session, "_wt_deferred_begin", False):
        session._wt_deferred_begin = False  # type: ignore[attr-defined]


def held_connection(session: Session, bind: Any) -> Any:
    """The ``Connection`` the session's transaction holds for ``bind`` (an Engine), without
    taking one; None when it holds none. SQLAlchemy 2.1.7 has this as
    ``SessionTransaction.bound_connection()``; here for 2.0 too: each transaction's
    ``_connections`` (keyed by bind), up through its parents (a savepoint's own may not hold
    the outer transaction's)."""
    trans: Any = session._transaction
    while trans is not None:
        entry = trans._connections.get(bind)
        if entry is not None:
            return entry[0]
        trans = trans._parent
    return None


def listener_counts(session: Session) -> tuple[int, int]:
    """``(len(session.dispatch.do_orm_execute), len(session.dispatch.after_begin))``: the
    session's listeners of those events, its class's and its own (the dispatch made by
    :func:`session_dispatch` when not made yet).

    With no listener of the session's own, each collection is the class's shared
    ``_EmptyListener`` (2.0 and 2.1), whose ``__len__`` is ``len(self.parent_listeners)``:
    read here without that Python call (a cached get asks on every call)."""
    dispatch: Any = session.__dict__.get("dispatch")
    if dispatch is None:
        dispatch = session_dispatch(session)
    executes = dispatch.do_orm_execute
    begins = dispatch.after_begin
    return (
        len(executes.parent_listeners) if type(executes) is _EmptyListener else len(executes),
        len(begins.parent_listeners) if type(begins) is _EmptyListener else len(begins),
    )


def listeners_after(orm_state: ORMExecuteState) -> Sequence[Any]:
    """The ``do_orm_execute`` listeners SQLAlchemy runs after the one now running
    (``ORMExecuteState._remaining_events()``, 2.0 and 2.1): a load the cache answers never
    reaches them. Without a listener after it (the common case) no list is built."""
    todo = orm_state._events_todo
    after = orm_state._starting_event_idx + 1
    return todo[after:] if len(todo) > after else ()


def holds_or_changed(session: Session, identity_key: tuple[Any, ...]) -> bool:
    """Whether the session holds a live object under ``identity_key``
    (``session.identity_map.get(identity_key) is not None``) or has changes to flush (not
    :func:`session_is_clean`): a cached get asks both on every call, here in one call.

    With the session's own ``_WeakInstanceDict`` (2.0 and 2.1), its ``get`` is read as it reads
    itself: the state in its private ``_dict``, live while its ``obj()`` is not None."""
    identity_map: Any = session.identity_map
    if type(identity_map) is WEAK_INSTANCE_DICT:
        weak: Any = identity_map  # (a _WeakInstanceDict: its get inlined)
        state = weak._dict.get(identity_key)
        if state is not None and state.obj() is not None:
            return True
    elif identity_map.get(identity_key) is not None:
        return True
    return bool(identity_map._modified or session._deleted or session._new)


def info_if_made(session: Session) -> dict[Any, Any] | None:
    """``session.info`` if it was made, else None (then it is empty).

    ``Session.info`` is a memoized property (2.0 and 2.1): its first read makes the dict and
    keeps it in the instance's ``__dict__``. A read that only looks for a key in it need not
    make one per session (a cached get in a new session).
    """
    info: dict[Any, Any] | None = session.__dict__.get(SESSION_INFO_ATTR)
    return info


def session_is_clean(session: Session) -> bool:
    """True when commit() will not flush: nothing new, deleted or modified.

    ``Session._is_clean()`` is O(1); the public ``new``/``dirty``/``deleted`` build sets and
    check attribute history of every modified object. This is its body (2.0 and 2.1), without
    its two calls (``IdentityMap.check_modified()`` is ``bool(self._modified)``): a cached get
    asks on every call.
    """
    return not session.identity_map._modified and not session._deleted and not session._new


def pending_states(session: Session) -> tuple[list[Any], list[Any], list[Any]]:
    """(modified, deleted, new) states of a session about to flush, in before_flush.

    The public ``session.dirty``, ``deleted`` and ``new`` build an ``IdentitySet`` of objects
    each, whose states the caller then looks up again; these are the dicts they are built
    from (2.0 and 2.1: ``identity_map._modified``, ``Session._deleted``, ``Session._new``,
    keyed by state), with ``dirty``'s own rule (modified, not deleted).
    """
    deleted = session._deleted
    modified = [s for s in session.identity_map._modified if s not in deleted]
    return modified, list(deleted), list(session._new)


def flushed_states(session: Session, flush_context: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(deleted, inserted, updated) states a flush wrote, in after_flush: what the unit of
    work itself saved and deleted, not the session's collections.

    ``UOWTransaction.states`` (2.0 and 2.1) maps every state the flush registered to
    ``(isdelete, listonly)``: the session's new, modified and deleted objects after every
    before_flush listener ran, plus what the relationships' processors added while it ran
    (a ``delete-orphan`` child removed from its collection, deleted without ever being in
    ``session.deleted``; a removed child whose foreign key is set to NULL); ``listonly``
    states were only looked at, not written. An inserted row is one still in
    ``Session._new``, which the flush empties after after_flush (its ``key`` may already be
    set then, by ``eager_defaults``).
    """
    new = session._new
    deleted: list[Any] = []
    inserted: list[Any] = []
    updated: list[Any] = []
    for state, (isdelete, listonly) in flush_context.states.items():
        if listonly:
            continue
        if isdelete:
            deleted.append(state)
        elif state in new:
            inserted.append(state)
        else:
            updated.append(state)
    return deleted, inserted, updated


def session_is_flushing(session: Session | None) -> bool:
    """Whether a flush (or a bulk save) is running. A flag of our own set in before_flush
    stays set when a flush stops before after_flush (a listener raising, nothing to write
    after all); ``Session._flushing`` is reset in a ``finally``, so the two together say
    whether a statement belongs to the flush after_flush will track."""
    return session is not None and bool(session._flushing)


def emitted_by_unit_of_work(context: Any) -> bool:
    """Whether a DML statement is one the unit of work emits for a flushed row, not one a
    listener runs during the flush (``connection.execute`` in a mapper event, the documented
    place for more SQL; ``session.execute`` in an ``after_flush`` listener that runs before the
    cache's). ``persistence.py`` runs every INSERT, UPDATE and DELETE of the flush with the base
    mapper's own ``_compiled_cache`` (an ``LRUCache``) as an execution option; no public API says
    which statements a flush emitted. The secondary table's rows of a many-to-many are written
    without it (``dependency.py``), and are tracked like any other statement."""
    return type(context.execution_options.get("compiled_cache")) is _LRUCache


def autoflush_before_load(orm_state: ORMExecuteState) -> None:
    """Flush pending changes as the ORM does before a load that asks for autoflush.

    SQLAlchemy autoflushes in ``orm_pre_session_exec`` *after* ``do_orm_execute`` handlers,
    so a result returned by a handler skips it; ``Session._autoflush()`` is the ORM's own call
    (it honours ``autoflush=False`` and ``no_autoflush``, and annotates flush errors).
    """
    session = orm_state.session
    if orm_state.load_options._autoflush and not session._is_clean():
        session._autoflush()


def load_options_forbid_cache(orm_state: ORMExecuteState) -> bool:
    """populate_existing and refresh must load from the database; the flags live on the
    private load options. So does a legacy ``Query.only_return_tuples()``, whose rows are
    tuples, not entities."""
    lo = orm_state.load_options
    return bool(
        lo._populate_existing
        or lo._refresh_state is not None
        or lo._only_return_tuples
        or orm_state.execution_options.get("populate_existing")
    )


def reload_of_expired(orm_state: ORMExecuteState) -> tuple[Any, frozenset[str]] | None:
    """(the object's state, the attribute keys to load) when a column load reloads expired
    attributes of a persistent object (after a commit with ``expire_on_commit``, an
    ``expire()``), not an explicit ``Session.refresh()``, a ``populate_existing`` or a
    deferred column's load; else None.

    The ORM marks these loads only on its private load options (``_refresh_state``,
    ``_is_user_refresh``) and compile options (``_only_load_props``); checked on 2.0 and 2.1.
    """
    lo = orm_state.load_options
    state = lo._refresh_state
    if (
        state is None
        or lo._is_user_refresh
        or lo._populate_existing
        or orm_state.execution_options.get("populate_existing")
        or state.key is None
    ):
        return None
    compile_options = getattr(orm_state.statement, "_compile_options", None)
    props = getattr(compile_options, "_only_load_props", None)
    if not props:
        return None
    return state, frozenset(props)


def commit_reloaded(session: Session, state: Any, keys: frozenset[str]) -> None:
    """Fire the ``refresh`` event (with the QueryContext of a load of the row by primary key:
    :func:`load_context`) and mark the reloaded attributes as loaded, as ``loading._instance``
    does after reloading an expired object from a row (a reload counts as a populate-existing
    of its object there). ``InstanceState._commit`` has no public counterpart."""
    refresh = state.manager.dispatch.refresh
    if refresh:
        refresh(state, load_context(session, state.mapper, state.key, state), keys)
    state._commit(state.dict, keys)


def identity_token(orm_state: ORMExecuteState) -> Any:
    """The identity token a load gives its rows (``session.get(..., identity_token=...)``,
    horizontal sharding's shard id), or None; it lives on the private load options."""
    return orm_state.load_options._identity_token


def is_identity_load(orm_state: ORMExecuteState) -> bool:
    """True for ``session.get()``, ``Query.get()`` and a many-to-one lazy load, False for a
    ``select()`` or a legacy ``Query`` being iterated.

    The first three run ``loading._load_on_pk_identity``, which passes the private
    ``_sa_orm_load_options`` execution option; legacy ``Query._iter()`` passes it too, but
    only ``Query._statement_20()`` sets the ``_use_legacy_query_style`` compile option
    (absent from Core's default compile options, hence the getattr). Checked on 2.0 and 2.1.
    """
    if "_sa_orm_load_options" not in orm_state.execution_options:
        return False
    compile_options = getattr(orm_state.statement, "_compile_options", None)
    return not getattr(compile_options, "_use_legacy_query_style", False)


def plain_entity_select(stmt: Any, mapper: Mapper[Any]) -> Sequence[Any] | None:
    """The WHERE criteria of ``select(Entity).where(...)`` when the statement is nothing more.

    Anything that changes which rows or how they load (joins, limits, locking, grouping, CTEs,
    hints, a second entity, an alias, a column instead of the entity) returns None, and the
    statement goes to the database. Select has no public API to ask "is this only a filtered
    entity select?".
    """
    if not isinstance(stmt, Select):
        return None
    raw = stmt._raw_columns
    if len(raw) != 1:
        return None
    entity = raw[0]
    annotations = getattr(entity, "_annotations", None)
    if (
        not annotations
        or annotations.get("parententity") is not mapper
        or not getattr(entity, "is_selectable", False)
    ):
        return None
    if (
        stmt._for_update_arg is not None
        or stmt._setup_joins
        or stmt._from_obj
        or stmt._memoized_select_entities
        or stmt._limit_clause is not None
        or stmt._offset_clause is not None
        or stmt._fetch_clause is not None
        or stmt._group_by_clauses
        or stmt._having_criteria
        or stmt._independent_ctes
        or stmt._prefixes
        or stmt._suffixes
        or stmt._hints
        or stmt._statement_hints
    ):
        return None
    criteria: Sequence[Any] = stmt._where_criteria
    return criteria


def pk_terms(
    criteria: Sequence[Any], same_table: Callable[[Any], bool], pk_keys: dict[str, int]
) -> list[tuple[Any, BindParameter[Any]]] | None:
    """``(operator, bind)`` per primary-key column (in ``pk_keys`` order) when the criteria
    are nothing but ANDed ``pk_col <op> <bind>`` terms naming every column once; else None.

    Matches by (table, column key), never by Column equality: an annotated column's ``__eq__``
    builds SQL and costs microseconds. Callers decide which operators they accept and where the
    values come from.
    """
    terms: list[Any] = [None] * len(pk_keys)
    stack = list(criteria)
    while stack:
        clause = stack.pop()
        if isinstance(clause, BooleanClauseList):
            if clause.operator is not operators.and_:
                return None
            stack.extend(clause.clauses)
            continue
        if not isinstance(clause, BinaryExpression):
            return None
        left, right = clause.left, clause.right
        if isinstance(left, BindParameter):
            left, right = right, left
        if not isinstance(right, BindParameter) or not same_table(getattr(left, "table", None)):
            return None
        index = pk_keys.get(getattr(left, "key", None))  # type: ignore[arg-type]
        if index is None or terms[index] is not None:
            return None
        terms[index] = (clause.operator, right)
    if any(term is None for term in terms):
        return None
    return terms


def get_clause_identity(
    criteria: Sequence[Any], mapper: Mapper[Any], pk_columns: Sequence[Any], params: Any
) -> list[Any] | None:
    """Primary-key values (in ``pk_columns`` order) when the WHERE clause is the mapper's own
    get clause, the very object ``session.get()`` and many-to-one lazy loads put there on 2.1:
    one identity check and a dict lookup per column instead of a walk of the clause (about 3 us
    of a cached get). Anything else, including 2.0's annotated copy, returns None and takes
    :func:`pk_equalities`.
    """
    if len(criteria) != 1 or not params:
        return None
    clause, binds = mapper._get_clause
    if criteria[0] is not clause:
        return None
    try:
        return [params[binds[column].key] for column in pk_columns]
    except KeyError:
        return None


def pk_equalities(
    criteria: Sequence[Any], table: Any, pk_keys: dict[str, int], params: Any
) -> list[Any] | None:
    """Primary-key values from criteria that are exactly ``pk_col = value`` for every pk column:
    the ORM's own get/lazy-load clause (an annotated copy on 2.0, the mapper's object on 2.1),
    ``where(pk == x)`` and ``filter_by``."""
    terms = pk_terms(criteria, lambda t: t is table, pk_keys)
    if terms is None:
        return None
    values: list[Any] = []
    for operator, bind in terms:
        if operator is not operators.eq:
            return None
        if params and bind.key in params:
            values.append(params[bind.key])
        elif bind.callable is not None:
            values.append(bind.callable())
        else:
            values.append(bind.value)
    return values


def pk_in_list(criteria: Sequence[Any], table: Any, pk_key: str, params: Any) -> list[Any] | None:
    """The values of ``pk IN (...)`` when that is the whole WHERE clause of a single-column
    primary key (``where(Model.id.in_(ids))``); None otherwise."""
    if len(criteria) != 1:
        return None
    clause = criteria[0]
    if not isinstance(clause, BinaryExpression) or clause.operator is not operators.in_op:
        return None
    left, right = clause.left, clause.right
    if not isinstance(right, BindParameter) or not right.expanding:
        return None
    if getattr(left, "table", None) is not table or getattr(left, "key", None) != pk_key:
        return None
    if params and right.key in params:
        values = params[right.key]
    elif right.callable is not None:
        values = right.callable()
    else:
        values = right.value
    return list(values) if isinstance(values, (list, tuple)) else None


def unordered(stmt: Any) -> bool:
    """A statement without ORDER BY: its rows may come back in any order."""
    return not stmt._order_by_clauses


def only_user_defined_options(stmt: Any) -> bool:
    """True when the statement's options cannot change what or how it loads.

    Loader options (``joinedload``, ``with_loader_criteria``, ``defer`` ...) are applied at
    compile time and are invisible in the WHERE clause; a loader criteria option in particular
    may filter the row out (soft delete). ORMExecuteState has no public view of the options
    before compilation.
    """
    return all(isinstance(opt, UserDefinedOption) for opt in stmt._with_options)


def all_mappers() -> list[Mapper[Any]]:
    """Every mapper of every live registry (``sqlalchemy.orm.mapper._mapper_registries``), so a
    cache knows the tables of every model it covers, not only those it has used."""
    import sys

    registries = getattr(sys.modules["sqlalchemy.orm.mapper"], "_mapper_registries", {})
    found: list[Mapper[Any]] = []
    for reg in list(registries):
        found.extend(registry_mappers(reg))
    return found


def registry_mappers(reg: Any) -> list[Mapper[Any]]:
    """``registry.mappers``, without the classes not mapped yet: ``registry.mappers`` raises
    UnmappedClassError while one is pending (``DeferredReflection`` before ``prepare()``, an
    ``AbstractConcreteBase`` before configure)."""
    try:
        return list(reg.mappers)
    except UnmappedClassError:
        return [m.mapper for m in list(reg._managers) if m.is_mapped]


def expanded_parameter_names(context: Any, name: str) -> list[str] | None:
    """The parameter names an expanding IN parameter became in this execution
    (``id_1`` -> ``id_1_1, id_1_2``); ``ExecutionContext`` has no public view of them."""
    expanded = getattr(context, "_expanded_parameters", None)
    if not isinstance(expanded, Mapping) or name not in expanded:
        return None
    return list(expanded[name])


def engine_lineage(engine: Any) -> list[Any]:
    """``engine`` and the engines it was derived from by ``execution_options()``, nearest
    first. The ``dispose()`` of any of them replaces the pool it uses, but fires only that
    engine's own ``engine_disposed`` listeners; a parent's ``before_cursor_execute`` listeners
    run for its statements (a derived engine's dispatch joins its parent's, never the
    reverse). ``OptionEngine`` keeps its parent only privately (``_proxied``)."""
    found = [engine]
    parent = getattr(engine, "_proxied", None)
    while parent is not None and parent not in found:
        found.append(parent)
        parent = getattr(parent, "_proxied", None)
    return found


def listen_on_engine_class(identifier: str, fn: Callable[..., Any]) -> None:
    """``event.listen(Engine, identifier, fn)``, without putting every engine of the process
    on SQLAlchemy's event path.

    A ``ConnectionEvents`` listener on the ``Engine`` class sets ``Engine._has_events``, which
    each ``Connection`` reads (``self._has_events or self.engine._has_events``) before it runs
    the events of a statement, a begin or a commit: with it set, every engine's connections
    take the slow path (a plain SQLite get and commit: +16% instructions, all of it
    SQLAlchemy's dispatch, none the listener's). So the class keeps the flag it had (set by
    someone else's class listener, it stays set), and :func:`run_engine_events` turns it on
    for the engines the cache watches. Checked on 2.0 and 2.1: the flag is a class attribute
    of ``Engine``, an instance attribute once set on an engine, and a property of a derived
    engine (``execution_options()``) that reads its parent's too.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    had = Engine.__dict__.get("_has_events", False)
    event.listen(Engine, identifier, fn)
    if not had:
        Engine._has_events = False


def run_engine_events(engine: Any) -> None:
    """Make ``engine``'s connections (and those of engines derived from it) run its events,
    class-level listeners included, as a listener added to the engine would (see
    :func:`listen_on_engine_class`). Setting one attribute: safe while the engine is in use,
    where ``event.listen()`` on it is not. Connections check it at each statement, so one
    already open runs the events from its next statement."""
    engine._has_events = True


def connection_isolation_level(connection: Any) -> str | None:
    """The isolation level a connection runs at, without asking the database.

    ``Connection.get_isolation_level()`` sends a query. The level comes from, in order: the
    connection's or engine's execution options, ``create_engine(isolation_level=...)`` (kept
    privately on the dialect), then the database default read at first connect.
    """
    level = connection.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(connection.dialect, "_on_connect_isolation_level", None)
    if level is None:
        level = connection.default_isolation_level
    return str(level) if level is not None else None


def json_functions(dialect: Any) -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    """The functions a JSON column's values go through: ``create_engine(json_serializer=...,
    json_deserializer=...)``, else ``json.dumps`` and ``json.loads`` (the default of SQLAlchemy
    and of psycopg, which SQLAlchemy hands the engine's functions to). The dialect keeps them in
    private attributes, with no public accessor (2.0: only the dialects with JSON types)."""
    return (
        getattr(dialect, "_json_serializer", None) or json.dumps,
        getattr(dialect, "_json_deserializer", None) or json.loads,
    )


# -- asyncio: SQLAlchemy's greenlet bridge --------------------------------------------------
# An AsyncSession runs its sync Session inside a greenlet that SQLAlchemy spawned on the event
# loop; code there (the cache's hooks) awaits a coroutine with ``await_`` (2.1; ``await_only``
# in 2.0, deprecated in 2.1). Documented for event handlers in "Using awaitable-only driver
# methods in connection pool and other events"; checked against 2.0.x and 2.1.x.


def await_(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` from sync code running in SQLAlchemy's greenlet (raises
    ``sqlalchemy.exc.MissingGreenlet`` anywhere else)."""
    return _AWAIT(awaitable)  # type: ignore[no-any-return]


async def greenlet_spawn(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run sync ``fn`` in a greenlet on the running loop, where it may call :func:`await_`."""
    result: _T = await sqlalchemy.util.greenlet_spawn(fn, *args, **kwargs)
    return result


def in_greenlet() -> bool:
    """Whether :func:`await_` can be called here (inside a greenlet SQLAlchemy spawned).
    False without the greenlet library (SQLAlchemy 2.0 raises ``ValueError`` there, 2.1
    ``ImportError``): a sync application need not install it."""
    try:
        return bool(_IN_GREENLET())
    except (ImportError, ValueError):
        return False


_AWAIT: Callable[[Any], Any] = (
    getattr(sqlalchemy.util, "await_", None) or sqlalchemy.util.await_only
)
_IN_GREENLET: Callable[[], Any] = sqlalchemy.util.concurrency.in_greenlet
