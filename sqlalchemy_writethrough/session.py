"""The get path before the statement: ``Session.get`` answered from the cache directly.

A cached ``session.get`` that goes through ``do_orm_execute`` pays for SQLAlchemy cloning a
select, building an ``ORMExecuteState`` and dispatching the event before the cache is asked:
about as much as the Redis round trip itself. :meth:`WriteThroughCache.install` therefore
gives a ``sessionmaker`` (or the one behind a ``scoped_session``) a subclass of its Session
class whose :meth:`~sqlalchemy.orm.Session.get` asks the cache first, as SQLAlchemy's own
``ShardedSession`` overrides Session methods. An ``async_sessionmaker``, ``AsyncSession``
subclass or ``async_scoped_session`` gets one as its ``sync_session_class``: ``await
session.get()`` runs it in SQLAlchemy's greenlet, where the asyncio flavour's read path awaits
``redis.asyncio`` through ``await_``.

Only the plain case is answered here: ``session.get(Model, pk)`` with no keyword argument (or
each at its default, as ``scoped_session``, ``get_one`` and ``AsyncSession`` pass them), for a
model the cache holds, on a session that uses SQLAlchemy's own get machinery and bind (no
override of ``get_bind``, ``execute``, ``_identity_lookup``), has no session-wide execution
options and no ``do_orm_execute`` listener but the cache's, has nothing to flush, and does not
hold the object already; and only when the entry is a hit. Everything else (options,
``with_for_update``, ``populate_existing``, ``identity_token``, execution options, an object in
the identity map, a miss) goes to ``super().get()``, and from there to the ``do_orm_execute``
path exactly as without this class; ``select()``, lazy loads and ``IN`` batches never come
here.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session, SessionTransaction

from . import _sa_compat
from .codec import in_zone
from .databases import DatabaseUnknown
from .loading import _NO_ROW, NO_ZONE, PEEKED
from .near import Copy
from .retiring import Retirement
from .tracing import record_span

if TYPE_CHECKING:
    from .loading import ReadPath
    from .model import ModelLayout
    from .registry import Models


class _Answer(enum.Enum):
    UNANSWERED = "unanswered"
    MISSED = "missed"


#: not answered: ask ``super().get()``
UNANSWERED = _Answer.UNANSWERED
#: the entry is no hit: ask ``super().get()``, telling the read path the entry was just read
MISSED = _Answer.MISSED

_PEEKED_OPTIONS: Any = {PEEKED: True}

#: the read path's logger (see ``ReadPath._read_done``)
log = logging.getLogger("sqlalchemy_writethrough")
_DEBUG = logging.DEBUG

_GET_BIND = Session.get_bind
_IDENTITY_LOOKUP = Session._identity_lookup
_EXECUTE = Session.execute
_EXECUTE_INTERNAL = Session._execute_internal
_GET = Session.get
_GET_IMPL = Session._get_impl


class CachedGetSession(Session):
    """The ``get()`` of a Session class made by :func:`session_class`: a plain primary-key get
    is answered from the cache, anything else by the class it was made from."""

    #: the read path answering gets; None once the cache is uninstalled
    _wt_read: ClassVar[ReadPath | None] = None

    #: a load the cache answers records the transaction it would have begun, and the
    #: methods that can tell begin it first (_sa_compat.begin_as_a_load): a session that
    #: only reads the cache and closes never pays for one
    _wt_defers_begin: ClassVar[bool] = True

    def close(self) -> None:
        # the event collections close() reads, set up first (a get has, or they are made
        # now): without their lazy AttributeErrors, see _sa_compat.session_dispatch. Here
        # rather than in __init__, whose pass-through of the factory's keywords costs more
        # than it saves
        _sa_compat.session_dispatch(self)
        _sa_compat.forget_deferred_begin(self)
        super().close()

    def begin(self, nested: bool = False) -> SessionTransaction:
        _sa_compat.begin_deferred(self)  # "already begun", as after a database load
        return super().begin(nested)

    def rollback(self) -> None:
        _sa_compat.begin_deferred(self)  # its rollback expires what the cache answered
        super().rollback()

    def in_transaction(self) -> bool:
        _sa_compat.begin_deferred(self)
        return super().in_transaction()

    def get_transaction(self) -> SessionTransaction | None:
        _sa_compat.begin_deferred(self)
        return super().get_transaction()

    def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        found = answer_get(type(self)._wt_read, self, entity, ident, kw)
        if found is UNANSWERED:
            return super().get(entity, ident, **kw)
        if found is MISSED:
            return super().get(entity, ident, **{**kw, "execution_options": _PEEKED_OPTIONS})
        return found


def get_through(
    read: ReadPath | None,
    session: Session,
    entity: Any,
    ident: Any,
    kw: dict[str, Any],
    plain_get: Callable[..., Any],
) -> Any:
    """``session.get(entity, ident, **kw)``: answered by ``read`` when it is the plain case,
    else by ``plain_get`` (the class's own get), told when the entry was read already.
    :meth:`CachedGetSession.get` is this, with ``super().get`` as ``plain_get``."""
    found = answer_get(read, session, entity, ident, kw)
    if found is UNANSWERED:
        return plain_get(entity, ident, **kw)
    if found is MISSED:
        return plain_get(entity, ident, **{**kw, "execution_options": _PEEKED_OPTIONS})
    return found


#: the keywords of Session.get whose default is empty (None, or an empty collection)
_EMPTY_BY_DEFAULT = frozenset({"options", "execution_options", "bind_arguments"})
#: those whose default is None or False (``populate_existing`` is False on 2.0, None on 2.1)
_OFF_BY_DEFAULT = frozenset({"populate_existing", "with_for_update"})


def _defaults_only(kw: dict[str, Any]) -> bool:
    """Whether every keyword is at its default: ``scoped_session.get``, ``get_one`` and
    ``AsyncSession.get`` pass them all explicitly."""
    for name, value in kw.items():
        if name in _EMPTY_BY_DEFAULT:
            if value:
                return False
        elif name in _OFF_BY_DEFAULT:
            if value is not None and value is not False:
                return False
        elif name != "identity_token" or value is not None:
            return False
    return True


def overrides_get_path(cls: type[Session]) -> bool:
    """Whether ``cls`` changes how a get loads (its own ``get``, bind or execution): such a
    class keeps its own path, and the cache answers its gets from ``do_orm_execute``."""
    return (
        cls.get_bind is not _GET_BIND
        or cls._identity_lookup is not _IDENTITY_LOOKUP
        or cls.execute is not _EXECUTE
        or cls._execute_internal is not _EXECUTE_INTERNAL
        or cls._get_impl is not _GET_IMPL
        or (cls.get is not _GET and not issubclass(cls, CachedGetSession))
    )


def session_class(
    base: type[Session], read: ReadPath, extra: dict[str, Any] | None = None
) -> type[Session]:
    """A subclass of ``base`` (same name, with ``extra`` in its namespace) whose plain gets
    ``read`` answers first (the sync flavour's, or the asyncio flavour's inside SQLAlchemy's
    greenlet)."""
    mixin = () if issubclass(base, CachedGetSession) else (CachedGetSession,)
    return plain_subclass(base, {**(extra or {}), "_wt_read": read}, mixin)


def plain_subclass(
    base: type[Session], extra: dict[str, Any] | None = None, mixins: tuple[type, ...] = ()
) -> type[Session]:
    """A subclass of ``base`` named as it is (with ``mixins`` before it, and ``extra`` in its
    namespace); on its own, one that only carries a factory's listeners, for a class whose
    gets the get path must leave alone (see :func:`overrides_get_path`)."""
    namespace = {
        **(extra or {}),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    made: type[Session] = type(base.__name__, (*mixins, base), namespace)
    return made


class _Plan:
    """What :func:`answer_get` decides from an entity alone (its mapper, its model's layout,
    whether a get of it may be answered at all), kept per entity class in
    ``Models.get_plans``: valid while the registry's generation is the one it was made in and
    the class still has the ``ClassManager`` it had (not unmapped, not mapped again)."""

    __slots__ = (
        "generation",
        "identity_class",
        "layout",
        "manager",
        "mapper",
        "pk_count",
        "pk_type",
    )

    def __init__(self, generation: int, mapper: Mapper[Any], layout: ModelLayout) -> None:
        self.generation = generation
        self.mapper = mapper
        self.layout = layout
        self.manager = mapper.class_manager
        #: the first item of the mapper's identity keys
        self.identity_class = mapper.identity_key_from_primary_key((None,))[0]
        self.pk_count = len(layout.pk_types)
        #: the Python type of a one-column key (a ``get`` whose ident is a value of it needs
        #: no other check), else None
        only = layout.pk_types[0] if self.pk_count == 1 else None
        self.pk_type = None if only in (tuple, list) else only


#: plans kept per cache at most (then forgotten at once): classes made and dropped by the
#: thousand (a test suite's) are not kept alive by the memo
_PLANS = 256
_MANAGER_ATTR = _sa_compat.CLASS_MANAGER_ATTR
_BINDS_ATTR = _sa_compat.SESSION_BINDS_ATTR
_INFO_ATTR = _sa_compat.SESSION_INFO_ATTR


def _plan_of(models: Models, entity: Any) -> _Plan | None:
    """The plan of ``entity``, made now (and kept, for a mapped class); None when its gets are
    not answered here (not a mapped entity, an uncached model, eager
    relationships, a subclass with primary key columns of its own)."""
    generation = models.generation  # read first: a change while deciding makes this stale
    mapper = inspect(entity, raiseerr=False)
    if not isinstance(mapper, Mapper):
        return None
    layout = models.layout_for(mapper)
    if layout is None or layout.loaded_with_row:
        return None
    if mapper is not layout.mapper and not _same_columns(mapper.primary_key, layout.pk_columns):
        return None
    plan = _Plan(generation, mapper, layout)
    manager = plan.manager
    if (
        isinstance(entity, type)
        and manager.class_ is entity
        and getattr(entity, _MANAGER_ATTR, None) is manager
    ):
        plans = models.get_plans
        if len(plans) >= _PLANS:
            plans.clear()
        plans[entity] = plan
    return plan


def _live_counts(session: Session) -> tuple[int, int]:
    """:func:`._sa_compat.listener_counts` without the listeners of caches uninstalled from
    the session's class (still there, turned off: see :mod:`.retiring`), so that a cache
    installed with another one gets the get path back once the other is uninstalled."""
    dispatch: Any = session.dispatch

    def live(listeners: Any) -> int:
        count = 0
        for fn in listeners:
            retirement = getattr(getattr(fn, "__self__", None), "retirement", None)
            if not (
                isinstance(retirement, Retirement)
                and retirement.any
                and retirement.retired_for(session)
            ):
                count += 1
        return count

    return live(dispatch.do_orm_execute), live(dispatch.after_begin)


def answer_get(
    read: ReadPath | None, session: Session, entity: Any, ident: Any, kw: dict[str, Any]
) -> Any:
    """``session.get(entity, ident, **kw)`` from the cache: the instance (or None, when the
    cached row is of another class of the hierarchy, as the database would find no row),
    MISSED when the entry is no hit, UNANSWERED when this get is not the plain case (a
    keyword off its default, no ``read``: the cache was uninstalled).

    A near hit is the common case, and every Python call is a measurable share of it: the
    tracker, keys, near-cache and decoding-memo steps of the read path are inlined here for
    it (each falls back to the read path's own call off that case)."""
    if read is None or (kw and not _defaults_only(kw)):
        return UNANSWERED
    cls = type(session)
    if (
        cls.get_bind is not _GET_BIND
        or cls._identity_lookup is not _IDENTITY_LOOKUP
        or cls.execute is not _EXECUTE
        or cls._execute_internal is not _EXECUTE_INTERNAL
        # the cache's own do_orm_execute listener only, and no after_begin listener but the
        # cache's (others wait for the connection a load takes: see begin_like_a_load)
        or (_sa_compat.listener_counts(session) != (1, 1) and _live_counts(session) != (1, 1))
        or getattr(session, "execution_options", None)  # session-wide options (2.1)
    ):
        return UNANSWERED
    rt = read.runtime
    models = rt.models
    try:
        plan = models.get_plans.get(entity)
    except TypeError:  # unhashable: no entity SQLAlchemy knows, it says so
        return UNANSWERED
    if (
        plan is None
        or plan.generation != models.generation
        or getattr(entity, _MANAGER_ATTR, None) is not plan.manager
    ):
        plan = _plan_of(models, entity)
        if plan is None:
            return UNANSWERED
    mapper = plan.mapper
    if mapper.always_refresh:  # read per get: it may be set after mapping, and after a plan
        return UNANSWERED
    layout = plan.layout
    if type(ident) is plan.pk_type:  # one column, a value of its exact type
        pk = [ident]
    else:
        pk = list(ident) if type(ident) is tuple or type(ident) is list else [ident]
        if len(pk) != plan.pk_count or not layout.pk_is_cacheable(pk):
            return UNANSWERED  # a dict, a composite, a wrong count or type: SQLAlchemy decides
    # Mapper.identity_key_from_primary_key(pk), without its call
    identity_key = (plan.identity_class, tuple(pk), None)
    # the identity map wins (and refreshes an expired object); the database path autoflushes
    if _sa_compat.holds_or_changed(session, identity_key):
        return UNANSWERED
    # Session.get_bind's first case without its call: no per-entity binds, and a bind
    bind = session.bind
    if not bind or getattr(session, _BINDS_ATTR):
        bind = session.get_bind(mapper=mapper)
    # the transaction a database load begins (recorded here: see CachedGetSession.begin)
    _sa_compat.begin_as_a_load(session, True)  # a CachedGetSession's
    # ReadPath._usable_tracker's common case inlined: a session whose transaction did
    # nothing yet (no tracker; not joined to a Connection's transaction) reads as UNTOUCHED
    info = session.__dict__.get(_INFO_ATTR)
    if (info is None or rt.settings.info_key not in info) and not isinstance(bind, Connection):
        if rt.journal.pending and not rt.journal_replayed():
            return UNANSWERED  # keys journaled while Redis was away are not invalidated yet
        renamed = None
    else:
        tracker = read._usable_tracker(session, mapper, bind)
        if tracker is None:
            return UNANSWERED
        renamed = tracker.renamed.get(bind) if tracker.renamed else None
    last = layout.last_keys  # Models.keys' first case (the bind of the last get) inlined
    if last[0] is bind and renamed is None:
        keys = last[1]
    else:
        try:
            keys = models.keys(layout, bind, renamed)
        except DatabaseUnknown:
            return UNANSWERED
    if not keys.served:  # row-level security: the database's load decides
        return UNANSWERED
    zone = read.zone(session, layout, bind) if layout.zoned else NO_ZONE
    # KeySpace.pair's memo of int keys read, without its call
    pair = keys._pairs.get(ident) if type(ident) is int else None
    key, gen_key = keys.pair(pk) if pair is None else pair
    started = perf_counter()
    near = rt.near  # Runtime.peek's, with a near-cache hit counted with the hit below
    found: memoryview | bytes | Literal[False] | None
    if near is not None and layout.options.near_cache:
        found = near.get(key)
        if found is None:
            found = near.read_through(rt.backend, key, gen_key)
    else:
        found = rt.backend.peek(key, gen_key)
    if found is None:
        return UNANSWERED  # Redis failed: the database path (behind the breaker)
    if found is False:
        return MISSED
    dialect = bind.dialect
    memo = found.decoded if type(found) is Copy else None
    if memo is not None and memo[0] is dialect and memo[1] is layout and memo[2] == pk:
        # ReadPath._build of a near copy already decoded: its values are kept in it
        near_hits = 1
        variant, values = memo[3]
        built = variant.mapper_ref()
        if built is mapper or built.isa(mapper):
            if zone is not NO_ZONE and variant.zoned:
                values = in_zone(values, variant.zoned, zone)
            instance = _sa_compat.build_persistent(
                session, built, identity_key, values, variant.expired
            )
        else:
            instance = _NO_ROW
    else:
        near_hits = 1 if type(found) is Copy else 0
        instance = read._build(
            session, layout, identity_key, pk, found, dialect, key, gen_key, mapper, zone
        )
        if instance is None:
            if near_hits:
                rt.counters.add("near_hits", 1, layout.entity_name)
            return MISSED  # an undecodable entry, now removed
    # ReadPath._read_done, inlined
    name = layout.entity_name
    elapsed = perf_counter() - started
    rt.counters.observe_read(elapsed, name, 1, near_hits)
    if log.isEnabledFor(_DEBUG):
        log.debug("writethrough: read %s: %s (%d rows)", name, "hit", 1)
    tracer = rt.tracer
    if tracer is not None:
        record_span(tracer, "writethrough.read", name, elapsed, result="hit", rows=1)
    # a row of another class of the hierarchy than the one asked for: the database finds none
    return None if instance is _NO_ROW else instance


def _same_columns(a: Any, b: Any) -> bool:
    """Columns compared by identity (``Column.__eq__`` builds SQL)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
