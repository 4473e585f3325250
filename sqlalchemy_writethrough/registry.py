"""Which models a cache caches, and their keys: the registry the read and write hooks consult.

One :class:`Models` per cache. It builds a :class:`~.model.ModelLayout` per cached model (or
hierarchy) when SQLAlchemy configures its mapper, remembers the models ``register_all()`` left
out and why, and answers the questions a write asks about the rest of the schema (which cached
models a table, a raw SQL name or a database cascade touches).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, registry

from . import _sa_compat, engine_events, forks
from .config import ModelOptions, ModelOptionsDict, OptionError
from .databases import Databases, DatabaseUnknown, connection_naming, for_schemas, own_naming
from .exc import ConfigurationError, WriteThroughWarning
from .keys import KeySpace
from .model import ModelLayout, cache_root, cached_members, is_cached_model, model_overrides

log = logging.getLogger("sqlalchemy_writethrough")


class Models:
    """The cached models of one cache (prefix, defaults, buckets), by mapper."""

    def __init__(
        self,
        prefix: str,
        defaults: ModelOptions,
        buckets: int,
        exclude_everywhere: frozenset[str],
    ) -> None:
        self._prefix = prefix
        self._defaults = defaults
        self._buckets = buckets
        self._exclude_everywhere = exclude_everywhere
        self._databases = Databases()
        #: (model, reason) pairs already named in a "not served" warning
        self._unserved_said: set[tuple[str, str]] = set()
        # Every mapper and class is held weakly here (and by the layouts): every mapper
        # configured while the cache lives is looked at, and a class mapped at run time (a
        # test's, a per-tenant automap) must stay free to be collected, cached or not.
        self._layouts: weakref.WeakKeyDictionary[Mapper[Any], ModelLayout] = (
            weakref.WeakKeyDictionary()
        )
        #: mappers seen and not cached
        self._uncached: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()
        self._registered: weakref.WeakKeyDictionary[type, ModelOptionsDict] = (
            weakref.WeakKeyDictionary()
        )
        self._registries: weakref.WeakSet[registry] = weakref.WeakSet()
        self._register_everything = False
        # models register_all() covers but cannot keep exact (base mapper -> why), and the
        # warnings about them not given yet (given outside SQLAlchemy's configure)
        self._left_out: weakref.WeakKeyDictionary[Mapper[Any], str] = weakref.WeakKeyDictionary()
        self._unwarned: list[str] = []
        self._build_lock = threading.RLock()
        self._by_table: dict[str, list[ModelLayout]] | None = None
        #: base mappers whose end resets the memos (see _layout_gone)
        self._watched: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()
        self._all_seen = False
        forks.renew_in_child(self, "_build_lock")
        self._cascade_parents: dict[str, Any] | None = None
        #: (table, deleted, a weak reference to the flushing mapper or None) -> layouts
        self._cascade_memo: dict[tuple[Any, bool, Any], list[ModelLayout]] = {}
        #: id of a server's trigger_writes -> (it, each table whose triggers write cached
        #: models, by lower-cased name: (its schema, each model)); it is held, so its id is
        #: not reused
        self._writer_memo: dict[int, tuple[Any, dict[str, list[tuple[str, ModelLayout]]]]] = {}
        #: engine -> (its pool, its tables' names -> trigger_written of them, on the engine's
        #: own naming): a flush asks once per class; weak keys, an engine is never kept
        #: alive; a new pool (``engine.dispose()``) is asked anew
        self._written_by_engine: weakref.WeakKeyDictionary[
            Any, tuple[Any, dict[tuple[str, ...], list[ModelLayout]]]
        ] = weakref.WeakKeyDictionary()
        #: the engines whose ``dispose()`` has what a keyspace was told of its database
        #: (served, rewritten, self-written) asked anew on the new pool (weak keys; the
        #: engine_events listener holds this registry weakly); see :meth:`_watch_disposal`
        self._disposal_watched: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        #: bumped whenever a model's layout is built, dropped or may change (register,
        #: register_all, a mapper configured again): what a hook decided from the layouts
        #: holds while it is unchanged
        self.generation = 0
        #: the get path's decisions per entity (see :mod:`.session`), each tagged with the
        #: generation it was made in
        self.get_plans: dict[Any, Any] = {}

    def _changed(self) -> None:
        """A layout was built, dropped or may now differ: every decision made from the
        layouts before is stale."""
        self.generation += 1

    @property
    def databases(self) -> Databases:
        return self._databases

    @property
    def defaults(self) -> ModelOptions:
        return self._defaults

    def left_out(self) -> dict[Mapper[Any], str]:
        """The models ``register_all()`` covers but cannot cache, with why."""
        with self._build_lock:
            return dict(self._left_out)

    def disposed(self, cls: type) -> None:
        """SQLAlchemy is taking ``cls``'s instrumentation away (``registry.dispose()``,
        ``clear_mappers()``): forget its layout and what was worked out from it. Nothing else
        would: a layout holds its tables, and an index on an ORM-annotated expression links a
        table back to its mapper, so a layout held in a dict keyed weakly by that mapper kept
        it, and the whole registry, alive."""
        with self._build_lock:
            gone = [m for m in list(self._layouts.keys()) if m.class_ is cls]
            if not gone and cls not in self.get_plans:
                return
            for mapper in gone:
                self._layouts.pop(mapper, None)
            self.get_plans.pop(cls, None)
            self._forget_memos()
            self._changed()

    def reconfigured(self, mapper: Mapper[Any]) -> None:
        """SQLAlchemy (re)configured ``mapper``: build its layout again, now."""
        self._layouts.pop(mapper, None)
        self._uncached.discard(mapper)
        self._changed()
        self.layout_for(mapper)

    def register(self, model: type, **options: Any) -> None:
        """See :meth:`.WriteThroughCache.register`."""
        mapper: Any = inspect(model, raiseerr=False)
        if not isinstance(mapper, Mapper):
            raise ConfigurationError(f"{model!r} is not a mapped class")
        self._defaults.merged(options, where=model.__name__)  # check the option names now
        with self._build_lock:
            self._registered[model] = options  # type: ignore[assignment,unused-ignore]
            self._layouts.pop(mapper, None)
            self._uncached.discard(mapper)
            self._changed()
        if mapper.configured:
            self.layout_for(mapper)

    def register_all(self, base: Any = None, *, stacklevel: int = 1) -> None:
        """See :meth:`.WriteThroughCache.register_all`; ``stacklevel`` as for
        :func:`warnings.warn`, from the caller of this method."""
        with self._build_lock:
            if base is None:
                self._register_everything = True
                self._forget_uncached()
                mappers = _sa_compat.all_mappers()
            else:
                reg = base if isinstance(base, registry) else getattr(base, "registry", None)
                if not isinstance(reg, registry):
                    raise ConfigurationError(
                        "register_all() takes a declarative base class or a sqlalchemy.orm.registry"
                    )
                self._registries.add(reg)
                self._forget_uncached()
                mappers = _sa_compat.registry_mappers(reg)
        for mapper in mappers:
            if mapper.configured:
                self.layout_for(mapper)
        self.warn_left_out(stacklevel=stacklevel + 1)

    def _forget_uncached(self) -> None:
        """Mappers seen as not cached may be covered now: look at them again."""
        self._uncached = weakref.WeakSet()
        self._all_seen = False
        self._changed()

    def _covers(self, mapper: Mapper[Any]) -> Mapping[str, Any] | None:
        cls = mapper.class_
        if cls in self._registered:
            return {**model_overrides(cls), **self._registered[cls]}
        if is_cached_model(cls):
            return model_overrides(cls)
        if self._register_everything or any(mapper.registry is r for r in self._registries):
            return model_overrides(cls) if hasattr(cls, "__writethrough__") else {}
        return None

    def layout_for(self, mapper: Mapper[Any]) -> ModelLayout | None:
        layout: ModelLayout | None = self._layouts.get(mapper)
        if layout is not None:
            if layout.variant(mapper) is not None:
                return layout
        elif mapper in self._uncached:
            return None
        with self._build_lock:
            # a hierarchy is cached as one model, from its base; a concrete class on its own
            base = cache_root(mapper)
            overrides = self._covers(base)
            if overrides is None:
                if base is not mapper and self._covers(mapper) is not None:
                    raise ConfigurationError(
                        f"{mapper.class_.__name__}: cache the base class of its hierarchy "
                        f"({base.class_.__name__}); the whole hierarchy shares its entries"
                    )
                layout = None
            else:
                options = self._defaults.merged(overrides, where=base.class_.__name__)
                try:
                    layout = ModelLayout(
                        base, options, self._prefix, self._buckets, self._exclude_everywhere
                    )
                    layout.strategy_declared = "strategy" in overrides
                except OptionError:
                    raise
                except ConfigurationError as exc:
                    if self._explicitly_cached(base):
                        raise
                    self._leave_out(base, str(exc))
                    layout = None
            for member in cached_members(base):
                if layout is None:
                    self._layouts.pop(member, None)
                    self._uncached.add(member)
                else:
                    self._uncached.discard(member)
                    self._layouts[member] = layout
            self._changed()
            if layout is not None:
                self._left_out.pop(base, None)
                self._forget_memos()
                if base not in self._watched:
                    # when the class goes, so do the memos that list its layout
                    self._watched.add(base)
                    ended = weakref.finalize(base, _layout_gone, weakref.ref(self))
                    ended.atexit = False  # nothing to forget when the process ends
            return layout

    def _forget_memos(self) -> None:
        """The layouts changed: what was worked out from them is worked out again."""
        self._by_table = None
        self._cascade_memo = {}
        self._cascade_parents = None
        self._writer_memo = {}
        self._written_by_engine = weakref.WeakKeyDictionary()

    def _explicitly_cached(self, base: Mapper[Any]) -> bool:
        """Whether a class of the hierarchy has the mixin or was given to ``register()``: such
        a model fails loudly; one only ``register_all()`` covers is left out instead."""
        return any(
            m.class_ in self._registered or is_cached_model(m.class_) for m in cached_members(base)
        )

    def _leave_out(self, base: Mapper[Any], reason: str) -> None:
        """Remember a model ``register_all()`` cannot cache; log and warn once per model."""
        if base in self._left_out:
            return
        self._left_out[base] = reason
        message = (
            f"writethrough: register_all() leaves {base.class_.__name__} out of the cache, "
            f"its loads go to the database: {reason}"
        )
        log.warning("%s", message)
        self._unwarned.append(message)

    def warn_left_out(self, stacklevel: int = 2) -> None:
        """Give the warnings of models left out, here, outside SQLAlchemy's mapper configuration:
        a warning filter that turns them into errors (``-W error``) then raises to the caller
        instead of marking a mapper as failed to configure (and the warnings after the one that
        raised are not given later, in an unrelated place: the log has them all)."""
        unwarned, self._unwarned = self._unwarned, []
        for message in unwarned:
            warnings.warn(message, WriteThroughWarning, stacklevel=stacklevel + 1)

    # -- what else a write touches ---------------------------------------------------------

    def cached_layouts(self) -> list[ModelLayout]:  # one per model or hierarchy
        """Every model this cache covers, used or not: a statement may change rows of a model
        this process never loaded (another process caches them)."""
        if not self._all_seen:
            for mapper in _sa_compat.all_mappers():
                if (
                    mapper.configured
                    and mapper not in self._layouts
                    and mapper not in self._uncached
                ):
                    self.layout_for(mapper)
            self._all_seen = True
        unique = {id(layout): layout for layout in list(self._layouts.values())}
        return list(unique.values())

    def layouts_by_table_name(self) -> dict[str, list[ModelLayout]]:
        """Cached models by lower-cased table name (bare and schema-qualified)."""
        by_table = self._by_table
        if by_table is None:
            by_table = {}
            for layout in self.cached_layouts():
                for table in layout.tables:
                    for name in {table.name.lower(), table.fullname.lower()}:
                        by_table.setdefault(name, []).append(layout)
            self._by_table = by_table
        return by_table

    def layouts_for_table(self, table: Any) -> list[ModelLayout]:
        fullname = getattr(table, "fullname", None)
        if fullname is None:
            return []
        found = self.layouts_by_table_name().get(fullname.lower(), [])
        base = table._deannotate() if hasattr(table, "_deannotate") else table
        return [layout for layout in found if base in layout.tables]

    def cascades(self, table: Any, *, deleted: bool, orm_handles: Any) -> list[ModelLayout]:
        """Cached models whose rows the database itself changes when rows of ``table`` are
        deleted (``ON DELETE CASCADE / SET NULL / SET DEFAULT``) or have their referenced key
        updated (``ON UPDATE ...``). ``orm_handles`` is the mapper whose flush this is: a child
        model reached from it by a relationship the ORM cascades itself (``passive_deletes`` /
        ``passive_updates`` off) is tracked by the flush and needs no invalidation."""
        # (a weak reference: the memo must not keep a class mapped at run time alive)
        memo_key = (table, deleted, weakref.ref(orm_handles) if orm_handles else None)
        found = self._cascade_memo.get(memo_key)
        if found is not None:
            return found
        found = []
        base = table._deannotate() if hasattr(table, "_deannotate") else table
        for layout in self.cached_layouts():
            for fk in (fk for t in layout.tables for fk in t.foreign_keys):
                action = fk.ondelete if deleted else fk.onupdate
                if not action or action.upper() in ("NO ACTION", "RESTRICT"):
                    continue
                if fk.column.table is not base or fk.column.table in layout.tables:
                    continue  # (a joined subclass's key referencing its own base is no cascade)
                if orm_handles and _orm_cascades(orm_handles, layout, deleted):
                    continue
                found.append(layout)
                break
        self._cascade_memo[memo_key] = found
        return found

    def trigger_written(
        self, tables: Iterable[Any], bind: Any, naming: Mapping[str, Any] | None = None
    ) -> list[ModelLayout]:
        """The cached models, other than those of ``tables``, whose tables the statements of
        the triggers (and PostgreSQL rules) of ``tables`` write in ``bind``'s database (a
        counter cache: a trigger on ``review`` updating ``product``): every write of
        ``tables``, cached or not, invalidates them whole. Read from the triggers' code once
        per pool (:meth:`.Databases.trigger_writes`); nothing when the database cannot be
        asked (then a model's own use of it says so)."""
        tables = tuple(tables)
        engine = bind.engine if isinstance(bind, Connection) else bind
        names = tuple(t.fullname for t in tables)
        per_engine = self._written_by_engine.get(engine) if naming is None else None
        if per_engine is not None and per_engine[0] is engine.pool:
            found = per_engine[1].get(names)
            if found is not None:
                return found
        try:
            targets = self._databases.trigger_writes(bind, naming, tables)
        except DatabaseUnknown:
            return []
        own = frozenset(name.lower() for name in names)
        found = self._written_layouts(targets, own) if targets else []
        if naming is None:
            if per_engine is None or per_engine[0] is not engine.pool:
                per_engine = self._written_by_engine[engine] = (engine.pool, {})
            per_engine[1][names] = found
        return found

    def _written_layouts(self, targets: Iterable[str], own: frozenset[str]) -> list[ModelLayout]:
        """The cached models of the tables named ``targets`` (``table`` or ``schema.table``,
        lower-cased), but for those of the tables named ``own``. By table name, whatever the
        schema: a model of no schema, or of one an engine's ``schema_translate_map`` renames
        (``shop`` to each tenant's), may be the table a trigger's code names in its own
        schema (on MySQL, every name: see :func:`.databases._in_schema`)."""
        by_name = self.layouts_by_table_name()
        found: list[ModelLayout] = []
        for name in sorted(targets):
            layouts = by_name.get(name.rpartition(".")[2])
            for layout in layouts or ():
                if layout not in found and own.isdisjoint(
                    t.fullname.lower() for t in layout.tables
                ):
                    found.append(layout)
        return found

    def trigger_writer_names(
        self, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, list[tuple[str, ModelLayout]]], str | None]:
        """Each table of ``bind``'s database whose triggers write cached models' tables (see
        :meth:`trigger_written`), by lower-cased name, bare and schema-qualified: raw SQL
        names such a table, cached or not; with each of those models, the schema of the
        table whose triggers write it. And the schema a bare name is a table of (MySQL's,
        whose listing is of the whole server: a bare name reaches only that schema's), or
        None (any)."""
        try:
            writers, scope = self._databases.trigger_writers(bind, naming)
        except DatabaseUnknown:
            return {}, None
        if not writers:
            return {}, None
        memo = self._writer_memo.get(id(writers))
        if memo is None or memo[0] is not writers:
            names: dict[str, list[tuple[str, ModelLayout]]] = {}
            for (schema, table), targets in writers.items():
                own = frozenset({table.lower(), f"{schema}.{table}".lower()})
                for layout in self._written_layouts(targets, own):
                    for name in own:
                        names.setdefault(name, []).append((schema, layout))
            memo = self._writer_memo[id(writers)] = (writers, names)
        return memo[1], scope

    def cascade_parent_names(self) -> dict[str, Any]:
        """Tables whose deletes or key updates the database cascades into cached tables, by
        lower-cased name (raw SQL names them, cached or not)."""
        if self._cascade_parents is None:
            parents: dict[str, Any] = {}
            for layout in self.cached_layouts():
                for fk in (fk for t in layout.tables for fk in t.foreign_keys):
                    if (fk.ondelete or fk.onupdate) and fk.column.table not in layout.tables:
                        parent = fk.column.table
                        parents[parent.name.lower()] = parent
                        parents[parent.fullname.lower()] = parent
            self._cascade_parents = parents
        return self._cascade_parents

    def declared_layouts(self, declared: Any) -> list[ModelLayout]:
        """Models named by ``execution_options(writethrough_invalidates=[...])``."""
        if isinstance(declared, (str, type)):
            declared = [declared]
        return self.resolve(declared, where=None)

    def resolve(self, targets: Iterable[Any], where: str | None) -> list[ModelLayout]:
        """Cached models named by class or table name; ``where`` (a model's name) makes a
        class this cache does not cache an error rather than nothing."""
        found: list[ModelLayout] = []
        for target in targets:
            if isinstance(target, str):
                found += self.layouts_by_table_name().get(target.lower(), [])
                continue
            layout = self.layout_for(inspect(target))
            if layout is not None:
                found.append(layout)
            elif where is not None:
                raise ConfigurationError(
                    f"{where}: also_invalidates names {target.__name__}, "
                    "which this cache does not cache"
                )
        return found

    def also_invalidated(self, layout: ModelLayout) -> list[ModelLayout]:
        targets = layout.options.also_invalidates
        return self.resolve(targets, where=layout.entity_name) if targets else []

    def keys(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> KeySpace:
        """The keys of ``layout``'s rows in the database of ``bind`` (the Engine or Connection
        the load, flush or statement used): a tuple check when the bind is the last one.
        ``naming``: the naming options of the statement or the session's connection, where
        they name another database than the engine's (:func:`.databases.naming_of`); a
        Connection's own are read from it."""
        if naming is None and isinstance(bind, Connection):
            naming = connection_naming(bind)
        if naming is not None:
            named = for_schemas(naming, layout.schemas)
            keys = layout.keyspace(self._databases.renamed(bind, named))
            if keys.served is None:
                self._learn(keys, layout, bind, naming)
            return keys
        last = layout.last_keys
        if last[0] is bind:
            found: KeySpace = last[1]
            return found
        if isinstance(bind, Connection):  # named by its engine; never kept alive here
            bind = bind.engine
            if last[0] is bind:
                found = last[1]
                return found
        if bind.get_execution_options().get("schema_translate_map"):
            # the engine's own map, as it names this model's tables (see for_schemas)
            named = for_schemas(own_naming(bind), layout.schemas)
            keys = layout.keyspace(self._databases.renamed(bind, named))
        else:
            keys = layout.keyspace(self._databases.of(bind, None in layout.schemas))
        if keys.served is None:
            self._learn(keys, layout, bind, None)
        layout.last_keys = (bind, keys)
        return keys

    def _learn(
        self, keys: KeySpace, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None
    ) -> None:
        """What ``keys`` must know of ``layout``'s tables in that database, asked of its
        catalog (``served`` last: set, the others are); again after a dispose."""
        self._watch_disposal(bind)
        keys.rewritten = self._rewritten(layout, bind, naming)
        keys.self_written = self.self_written(layout, bind, naming)
        keys.served = self._served(layout, bind, naming)
        self._warn_written(layout, bind, naming)

    def _watch_disposal(self, bind: Any) -> None:
        """Have ``engine.dispose()`` of ``bind``'s engine (its pool replaced) make what the
        keyspaces were told of their databases be asked again at their next use, as the
        catalog itself is asked again per pool (a trigger, a view, row-level security
        created since). An engine derived by ``execution_options()`` shares its parent's
        pool, and the dispose of either replaces it: both are watched."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        if engine in self._disposal_watched:
            return
        # through the listener on the Engine class (engine_events: never one added to an
        # engine in use, which another thread may be disposing of)
        for disposing in _sa_compat.engine_lineage(engine):
            if disposing not in self._disposal_watched:
                engine_events.disposals.add(disposing, self._on_engine_disposed)
                self._disposal_watched[disposing] = True

    def _on_engine_disposed(self, engine: Any) -> None:
        self._ask_again()

    def unwatch(self) -> None:
        """Stop watching the engines :meth:`_watch_disposal` was given (the cache was
        uninstalled from its last target); installed again, the flags are worked out again,
        and the engines watched again, at their next use."""
        watched = list(self._disposal_watched)
        self._disposal_watched.clear()
        for engine in watched:
            engine_events.disposals.discard(engine, self._on_engine_disposed)
        self._ask_again()

    def _ask_again(self) -> None:
        """An engine's pool was replaced: every keyspace's flags are worked out again at its
        next use (the catalog of an unchanged pool is not asked again: its answers are kept
        per pool). Until then a keyspace reads as not served: loads read the database and
        commits invalidate, never a wrong value."""
        for layout in self._built_layouts():
            layout.last_keys = (None, None)
            for keys in list(layout.keyspaces.values()):
                keys.served = None

    def unserved(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Why loads of ``layout``'s rows in ``bind``'s database are not served, if they are
        not: a view, row-level security (:meth:`.Databases.unserved`)."""
        return self._databases.unserved(bind, naming, layout.tables)

    def pool_timezone(self, bind: Any) -> Any:
        """The tzinfo of ``timestamptz`` values on a new connection of ``bind``'s pool
        (PostgreSQL: see :meth:`.Databases.timezone`)."""
        return self._databases.timezone(bind)

    def _served(self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None) -> bool:
        """Whether loads of ``layout``'s rows in this database may be answered from the
        cache: not when one of its tables has row-level security, whose policies decide per
        session (its role, its settings) which rows it sees, nor when it is a view (or a
        materialized view, a foreign table), whose rows change when the tables it reads do,
        which no commit of the view's says. Said once per model and reason."""
        reasons = self.unserved(layout, bind, naming)
        for reason in reasons:
            if self._first_said(layout, reason):
                log.warning(
                    "writethrough: %s is not served from the cache in that database (%s): %s; "
                    "its loads read the database and its commits write no entries. Leave the "
                    "model uncached to spare its commits the Redis round trips",
                    layout.entity_name,
                    reason,
                    "row-level security policies decide which rows each session sees"
                    if reason.startswith("row-level security")
                    else "its rows change when the tables it reads do, and commits to those "
                    "do not touch its entries",
                )
        return not reasons

    def _first_said(self, layout: ModelLayout, reason: str) -> bool:
        """Whether ``reason`` is said of ``layout``'s model for the first time (then it is
        remembered as said)."""
        said = (layout.entity_name, reason)
        if said in self._unserved_said:
            return False
        self._unserved_said.add(said)
        return True

    def rewritten(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Why commits of ``layout``'s rows in ``bind``'s database invalidate instead of
        writing through, if they do for its tables (:meth:`.Databases.rewritten`) and not
        already by its own choice: a model whose own options say its strategy is taken at
        its word (``"write-through"``: its triggers only fill columns declared
        ``server_onupdate=FetchedValue()``, read back with ``eager_defaults``), and one that
        invalidates anyway needs no reason but for invalidating whole (:meth:`self_written`)."""
        if layout.strategy_declared:
            return []
        rows = layout.options.strategy != "invalidate"  # else only whole-model reasons
        return self._databases.rewritten(bind, naming, layout.tables, rows=rows)

    def _rewritten(self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None) -> bool:
        """Whether the database may rewrite ``layout``'s rows as they are written (a
        ``BEFORE`` trigger setting ``NEW.updated_at``): the values the flush sent may not be
        those stored, so its commits invalidate, as ``strategy="invalidate"`` does (see
        :meth:`rewritten`). Said once per model and reason."""
        reasons = self.rewritten(layout, bind, naming)
        for reason in reasons:
            if self._first_said(layout, reason):
                log.info(
                    "writethrough: %s's commits invalidate its entries in that database "
                    'instead of writing them (%s), as with strategy="invalidate": the values '
                    "stored may not be those the flush sent. Declare the model's strategy to "
                    'say it yourself ("write-through" if its triggers only fill columns '
                    "declared server_onupdate=FetchedValue()); triggers that write other "
                    "tables need also_invalidates",
                    layout.entity_name,
                    reason,
                )
        return bool(reasons)

    def self_written(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether every write of ``layout``'s rows in ``bind``'s database must invalidate
        the model whole: a trigger of its table writes that table (:meth:`.Databases.
        self_written`), maybe rows the flush did not write, and nothing tells the cache which.
        A model whose own options say its strategy is taken at its word (its triggers write
        only the row being written; ``also_invalidates`` naming the model itself says
        otherwise). The log says why with the other reasons (:meth:`_rewritten`)."""
        if layout.strategy_declared:
            return False
        return self._databases.self_written(bind, naming, layout.tables)

    def written_by(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> list[str]:
        """The tables of ``bind``'s database whose triggers' code names one of ``layout``'s
        tables (:meth:`.Databases.written_by`), but for those whose cached models declare
        ``layout``'s in ``also_invalidates``: their triggers may change its rows, and nothing
        the cache sees says so."""
        found = self._databases.written_by(bind, naming, layout.tables)
        if not found:
            return []
        by_name = self.layouts_by_table_name()
        return [
            table
            for table in found
            if not any(
                layout in self.resolve(writer.options.also_invalidates, where=None)
                for name in {table.lower(), table.rpartition(".")[2].lower()}
                for writer in by_name.get(name, [])
            )
        ]

    def writers_of(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None = None
    ) -> list[str]:
        """The tables of ``bind``'s database whose triggers' statements write ``layout``'s
        tables (:meth:`.Databases.writers_of`): each of their writes invalidates it whole."""
        return self._databases.writers_of(bind, naming, layout.tables)

    def _warn_written(
        self, layout: ModelLayout, bind: Any, naming: Mapping[str, Any] | None
    ) -> None:
        """Say, once per model and table, that a trigger of another table may write
        ``layout``'s rows unseen (see :meth:`written_by`), and what to declare; and, at INFO,
        which tables' triggers write them (their writes invalidate it whole)."""
        for table in self.writers_of(layout, bind, naming):
            if self._first_said(layout, f"written by {table}"):
                log.info(
                    "writethrough: a trigger (or rule) of %s writes %s's table: every write "
                    "of %s invalidates %s whole in that database",
                    table,
                    layout.entity_name,
                    table,
                    layout.entity_name,
                )
        for table in self.written_by(layout, bind, naming):
            if self._first_said(layout, f"written by {table}"):
                log.warning(
                    "writethrough: the code of a trigger (or rule) of %s names %s's table, "
                    "though not in a statement the cache reads as a write of it (dynamic "
                    "SQL built from pieces?): the rows it writes there are not seen by "
                    "the cache, which may serve %s's entries stale until their TTL. If it "
                    "writes them, declare it on the model of %s: __writethrough__ = "
                    '{"also_invalidates": [%s]} (or cache.register(ThatModel, '
                    "also_invalidates=[%s])); its writes then invalidate %s whole",
                    table,
                    layout.entity_name,
                    layout.entity_name,
                    table,
                    layout.entity_name,
                    layout.entity_name,
                    layout.entity_name,
                )

    def _built_layouts(self) -> list[ModelLayout]:
        """Each layout built so far, once (a hierarchy's is every member's)."""
        return list({id(lay): lay for lay in list(self._layouts.values())}.values())

    def longest_holds(self, fields: Iterable[str]) -> tuple[float, float]:
        """(the longest ``ttl``, the longest ``lock_timeout``), in seconds, of the models whose
        keyspaces have these registry fields: how long one of their entries may live, and a
        lock be held (of every model built so far, for a field of none of them)."""
        built = self._built_layouts()
        owners = {
            keys.registry_field: lay for lay in built for keys in list(lay.keyspaces.values())
        }
        layouts = [owners.get(field) for field in fields]
        found = [lay for lay in layouts if lay is not None]
        if not found or len(found) < len(layouts):
            found = built
        if not found:
            return 0.0, 0.0
        return (
            max(lay.options.ttl for lay in found),
            max(lay.options.lock_timeout for lay in found),
        )

    def used_keyspaces(self) -> list[KeySpace]:
        """The keyspaces this process has used: each built layout's, in every database."""
        return [keys for lay in self._built_layouts() for keys in list(lay.keyspaces.values())]

    def known_keyspaces(self) -> list[str]:
        """Registry fields of the keyspaces this process has used."""
        return [keys.registry_field for keys in self.used_keyspaces()]


def _layout_gone(models: weakref.ref[Models]) -> None:
    """A cached class was collected: the memos listing its layout are worked out again, and
    the get path's decisions made again."""
    found = models()
    if found is not None:
        found._forget_memos()
        found._changed()


def _orm_cascades(mapper: Any, layout: ModelLayout, deleted: bool) -> bool:
    """Whether deleting (or re-keying) a ``mapper`` row makes the ORM load and change the
    related ``layout`` rows itself, rather than leaving it to the database."""
    for rel in mapper.relationships:
        if rel.mapper is not layout.mapper or rel.direction.name != "ONETOMANY":
            continue
        if deleted and not rel.passive_deletes:
            return True
        if not deleted and not rel.passive_updates:
            return True
    return False
