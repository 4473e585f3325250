"""``WriteThroughCache``: configuration, model registration, and installing the session hooks."""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, Session, registry, scoped_session, sessionmaker

from . import _sa_compat
from .backend import RedisBackend
from .breaker import CircuitBreaker
from .config import ModelOptions, ModelOptionsDict, OnRedisError, Strategy, validate
from .dml import StatementTracker
from .exc import ConfigurationError
from .journal import Journal
from .keys import registry_key
from .loading import ReadPath
from .model import CachedModel, ModelLayout, is_cached_model, model_overrides
from .stats import CacheStats, Counters
from .tracking import SessionTracker
from .writing import WritePath

log = logging.getLogger("sqlalchemy_writethrough")

_UNKNOWN: Any = object()
_caches: weakref.WeakSet[WriteThroughCache] = weakref.WeakSet()

InstallTarget = sessionmaker[Any] | scoped_session[Any] | type[Session]


class WriteThroughCache:
    """A Redis write-through cache of ORM entities, installed on a Session factory.

    ::

        cache = WriteThroughCache("redis://localhost:6379/0", prefix="shop", ttl=3600)
        cache.install(Session)              # a sessionmaker, scoped_session or Session subclass

    :param redis: a ``redis.Redis`` client, or a URL (the cache then builds a client with the
        short ``socket_timeout`` and ``socket_connect_timeout`` below and one retry).
    :param prefix: namespace of every key; two applications or databases sharing one Redis
        must use different prefixes.
    :param ttl: seconds an entry lives, minus a random jitter of up to ``ttl_jitter`` of it, so
        entries written together do not expire together.
    :param exclude: attribute names never written to Redis (in any model); cached instances
        leave them unloaded and load them on access.
    :param strategy: ``"write-through"`` writes committed rows to Redis; ``"invalidate"`` leaves
        a miss instead (for write-heavy models).
    :param lock_timeout: seconds a writer's lock lives; longer than a sane transaction. A lock
        older than half of it is taken again just before COMMIT.
    :param on_redis_error: ``"degrade"`` lets commits proceed when Redis cannot be locked, and
        invalidates the affected keys before this process reads Redis again; ``"strict"``
        makes such a flush fail (the transaction rolls back) instead.
    :param fill_wait: seconds a reader that finds another reader loading the same row waits
        for that fill before loading the row itself (a thundering herd on a cold row costs one
        database load); 0 never waits.
    :param buckets: hash-tag buckets per model; a whole-model invalidation touches one key per
        bucket, and a Redis Cluster spreads a model over this many slots.
    """

    def __init__(
        self,
        redis_client: redis.Redis | str,
        *,
        prefix: str = "wt",
        ttl: float = 3600.0,
        ttl_jitter: float = 0.1,
        exclude: Iterable[str] = (),
        strategy: Strategy = "write-through",
        lock_timeout: float = 30.0,
        lease_timeout: float = 10.0,
        fill_wait: float = 0.05,
        on_redis_error: OnRedisError = "degrade",
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        buckets: int = 16,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 0.25,
        journal_limit: int = 10_000,
    ) -> None:
        if not prefix or any(c in prefix for c in "{} \t\n"):
            raise ConfigurationError("prefix must be non-empty, without braces or whitespace")
        if not 0 <= ttl_jitter < 1:
            raise ConfigurationError("ttl_jitter is a fraction of the ttl, from 0 to below 1")
        if not 1 <= buckets <= 16384:
            raise ConfigurationError("buckets must be between 1 and 16384")
        if not fill_wait >= 0:
            raise ConfigurationError("fill_wait is a number of seconds, 0 to never wait")
        if not lease_timeout > 0:
            raise ConfigurationError("lease_timeout must be a positive number of seconds")
        if isinstance(exclude, str):
            raise ConfigurationError("exclude takes a list of attribute names")
        if isinstance(redis_client, str):
            client = redis.Redis.from_url(
                redis_client,
                socket_timeout=0.5 if socket_timeout is None else socket_timeout,
                socket_connect_timeout=(
                    0.5 if socket_connect_timeout is None else socket_connect_timeout
                ),
                # one retry for a pooled connection that died (a restart); never for a timeout,
                # which would double what a stalled Redis costs each operation
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                retry_on_error=[RedisConnectionError],
            )
        elif isinstance(redis_client, redis.Redis):
            if socket_timeout is not None or socket_connect_timeout is not None:
                raise ConfigurationError(
                    "socket timeouts belong to the client you passed: build it with "
                    "redis.Redis(..., socket_timeout=..., socket_connect_timeout=...), "
                    "or pass a URL and let the cache build it"
                )
            client = redis_client
            kwargs = client.connection_pool.connection_kwargs
            if kwargs.get("socket_timeout") is None:
                log.warning(
                    "writethrough: the Redis client has no socket_timeout; a stalled Redis "
                    "will stall every cached read and commit (set one, e.g. 0.5 s)"
                )
            retry = kwargs.get("retry") or getattr(client, "retry", None)
            retries = getattr(retry, "_retries", 0) if retry is not None else 0
            if retries > 1:
                log.warning(
                    "writethrough: the Redis client retries a failed command %d times; while "
                    "Redis is down each cached operation waits that many timeouts before the "
                    "circuit breaker opens (use retry=Retry(NoBackoff(), 1))",
                    retries,
                )
        else:
            raise ConfigurationError("redis_client must be a redis.Redis client or a URL")

        self.redis = client
        self.prefix = prefix
        self._defaults = validate(
            ModelOptions(
                ttl=ttl,
                exclude=frozenset(),
                strategy=strategy,
                lock_timeout=lock_timeout,
                on_redis_error=on_redis_error,
            ),
            where="WriteThroughCache",
        )
        self._exclude_everywhere = frozenset(exclude)
        self._ttl_jitter = ttl_jitter
        self._lease_ms = int(lease_timeout * 1000)
        self._fill_wait_s = fill_wait
        self._buckets = buckets
        self._counters = Counters()
        self._backend = RedisBackend(
            client, CircuitBreaker(breaker_threshold, breaker_cooldown), self._counters
        )
        self._journal = Journal(journal_limit)
        self._backend.on_recovery = self._journal_replayed
        self._info_key = f"writethrough.tracker.{id(self)}"
        self._layouts: dict[Mapper[Any], ModelLayout | None] = {}
        self._registered: dict[type, ModelOptionsDict] = {}
        self._registries: list[registry] = []
        self._register_everything = False
        self._build_lock = threading.RLock()
        self._read = ReadPath(self)
        self._write = WritePath(self)
        self._statements = StatementTracker(self)
        self._by_table: dict[str, list[ModelLayout]] | None = None
        self._all_seen = False
        self._cascade_parents: dict[str, Any] | None = None
        self._cascade_memo: dict[tuple[Any, bool, Any], list[ModelLayout]] = {}
        # weak: SQLAlchemy keeps the listeners (which reference this cache) as long as the
        # target lives; a strong reference back would keep both alive forever
        self._installed: list[tuple[weakref.ref[Any], str, Any]] = []
        _caches.add(self)

    # -- models --------------------------------------------------------------------------

    def register(self, model: type, **options: Any) -> None:
        """Cache ``model`` (a mapped class you cannot give the mixin), with per-model options.

        Raises :class:`ConfigurationError` now if the model is already configured and cannot
        be cached exactly, else when its mapper is configured.
        """
        mapper: Any = inspect(model, raiseerr=False)
        if not isinstance(mapper, Mapper):
            raise ConfigurationError(f"{model!r} is not a mapped class")
        self._defaults.merged(options, where=model.__name__)  # check the option names now
        with self._build_lock:
            self._registered[model] = options  # type: ignore[assignment,unused-ignore]
            self._layouts.pop(mapper, None)
        if mapper.configured:
            self._layout_for(mapper)

    def register_all(self, base: Any = None) -> None:
        """Cache every mapped class under ``base`` (a declarative base or a ``registry``), or,
        with no argument, every mapped class, including ones mapped later."""
        with self._build_lock:
            if base is None:
                self._register_everything = True
                self._forget_uncached()
                return
            reg = base if isinstance(base, registry) else getattr(base, "registry", None)
            if not isinstance(reg, registry):
                raise ConfigurationError(
                    "register_all() takes a declarative base class or a sqlalchemy.orm.registry"
                )
            self._registries.append(reg)
            self._forget_uncached()
            mappers = list(reg.mappers)
        for mapper in mappers:
            if mapper.configured:
                self._layout_for(mapper)

    def _forget_uncached(self) -> None:
        """Mappers seen as not cached may be covered now: look at them again."""
        self._layouts = {m: lay for m, lay in self._layouts.items() if lay is not None}
        self._all_seen = False

    def _covers(self, mapper: Mapper[Any]) -> Mapping[str, Any] | None:
        cls = mapper.class_
        if cls in self._registered:
            return {**model_overrides(cls), **self._registered[cls]}
        if is_cached_model(cls):
            return model_overrides(cls)
        if self._register_everything or any(mapper.registry is r for r in self._registries):
            return model_overrides(cls) if hasattr(cls, "__writethrough__") else {}
        return None

    def _layout_for(self, mapper: Mapper[Any]) -> ModelLayout | None:
        layout: ModelLayout | None = self._layouts.get(mapper, _UNKNOWN)
        if layout is not _UNKNOWN and (layout is None or mapper in layout.variants):
            return layout
        with self._build_lock:
            base = mapper.base_mapper  # a hierarchy is cached as one model, from its base
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
                layout = ModelLayout(
                    base, options, self.prefix, self._buckets, self._exclude_everywhere
                )
            for member in base.self_and_descendants:
                self._layouts[member] = layout
            if layout is not None:
                self._by_table = None
                self._cascade_memo = {}
                self._cascade_parents = None
            return layout

    # -- what else a write touches ---------------------------------------------------------

    def _cached_layouts(self) -> list[ModelLayout]:  # one per model or hierarchy
        """Every model this cache covers, used or not: a statement may change rows of a model
        this process never loaded (another process caches them)."""
        if not self._all_seen:
            for mapper in _sa_compat.all_mappers():
                if mapper.configured and mapper not in self._layouts:
                    self._layout_for(mapper)
            self._all_seen = True
        unique = {id(layout): layout for layout in list(self._layouts.values()) if layout}
        return list(unique.values())

    def _layouts_by_table_name(self) -> dict[str, list[ModelLayout]]:
        """Cached models by lower-cased table name (bare and schema-qualified)."""
        by_table = self._by_table
        if by_table is None:
            by_table = {}
            for layout in self._cached_layouts():
                for table in layout.tables:
                    for name in {table.name.lower(), table.fullname.lower()}:
                        by_table.setdefault(name, []).append(layout)
            self._by_table = by_table
        return by_table

    def _layouts_for_table(self, table: Any) -> list[ModelLayout]:
        fullname = getattr(table, "fullname", None)
        if fullname is None:
            return []
        found = self._layouts_by_table_name().get(fullname.lower(), [])
        base = table._deannotate() if hasattr(table, "_deannotate") else table
        return [layout for layout in found if base in layout.tables]

    def _cascades(self, table: Any, *, deleted: bool, orm_handles: Any) -> list[ModelLayout]:
        """Cached models whose rows the database itself changes when rows of ``table`` are
        deleted (``ON DELETE CASCADE / SET NULL / SET DEFAULT``) or have their referenced key
        updated (``ON UPDATE ...``). ``orm_handles`` is the mapper whose flush this is: a child
        model reached from it by a relationship the ORM cascades itself (``passive_deletes`` /
        ``passive_updates`` off) is tracked by the flush and needs no invalidation."""
        memo_key = (table, deleted, orm_handles)
        found = self._cascade_memo.get(memo_key)
        if found is not None:
            return found
        found = []
        base = table._deannotate() if hasattr(table, "_deannotate") else table
        for layout in self._cached_layouts():
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

    def _cascade_parent_names(self) -> dict[str, Any]:
        """Tables whose deletes or key updates the database cascades into cached tables, by
        lower-cased name (raw SQL names them, cached or not)."""
        if self._cascade_parents is None:
            parents: dict[str, Any] = {}
            for layout in self._cached_layouts():
                for fk in (fk for t in layout.tables for fk in t.foreign_keys):
                    if (fk.ondelete or fk.onupdate) and fk.column.table not in layout.tables:
                        parent = fk.column.table
                        parents[parent.name.lower()] = parent
                        parents[parent.fullname.lower()] = parent
            self._cascade_parents = parents
        return self._cascade_parents

    def _declared_layouts(self, declared: Any) -> list[ModelLayout]:
        """Models named by ``execution_options(writethrough_invalidates=[...])``."""
        if isinstance(declared, (str, type)):
            declared = [declared]
        return self._resolve(declared, where=None)

    def _resolve(self, targets: Iterable[Any], where: str | None) -> list[ModelLayout]:
        """Cached models named by class or table name; ``where`` (a model's name) makes a
        class this cache does not cache an error rather than nothing."""
        found: list[ModelLayout] = []
        for target in targets:
            if isinstance(target, str):
                found += self._layouts_by_table_name().get(target.lower(), [])
                continue
            layout = self._layout_for(inspect(target))
            if layout is not None:
                found.append(layout)
            elif where is not None:
                raise ConfigurationError(
                    f"{where}: also_invalidates names {target.__name__}, "
                    "which this cache does not cache"
                )
        return found

    def _also_invalidated(self, layout: ModelLayout) -> list[ModelLayout]:
        targets = layout.options.also_invalidates
        return self._resolve(targets, where=layout.entity_name) if targets else []

    def install(self, target: InstallTarget) -> None:
        """Add the cache to a ``sessionmaker``, ``scoped_session`` or ``Session`` subclass.

        Listeners are added with SQLAlchemy's event API only. The ``do_orm_execute`` listener
        should come after any of your own that add loader criteria (soft delete, tenancy):
        install the cache after adding them.
        """
        if isinstance(target, Session):
            raise ConfigurationError(
                "install() takes a sessionmaker, scoped_session or Session subclass, so that "
                "every session it makes is covered; not a single Session"
            )
        hooks: list[tuple[str, Any, dict[str, Any]]] = [
            ("do_orm_execute", self._read.on_execute, {"retval": True}),
            ("after_begin", self._write.after_begin, {}),
            ("before_flush", self._write.before_flush, {}),
            ("after_flush", self._write.after_flush, {}),
            ("before_commit", self._write.before_commit, {}),
            ("after_commit", self._write.after_commit, {"insert": True}),
            ("after_transaction_end", self._write.after_transaction_end, {}),
        ]
        for name, fn, kw in hooks:
            event.listen(target, name, fn, **kw)
            self._installed.append((weakref.ref(target), name, fn))

    def uninstall(self, target: InstallTarget) -> None:
        """Remove the listeners :meth:`install` added to ``target``."""
        keep = []
        for ref, name, fn in self._installed:
            if ref() is target:
                event.remove(target, name, fn)
            elif ref() is not None:
                keep.append((ref, name, fn))
        self._installed = keep

    def _tracker(self, session: Session) -> SessionTracker:
        tracker: SessionTracker | None = session.info.get(self._info_key)
        if tracker is None:
            tracker = session.info[self._info_key] = SessionTracker(session)
        return tracker

    def _peek_tracker(self, session: Session) -> SessionTracker | None:
        tracker: SessionTracker | None = session.info.get(self._info_key)
        return tracker

    def _register(self, layout: ModelLayout) -> None:
        """Once per model and process, before its first entry is written."""
        keys = layout.keys
        if not keys.registered:
            keys.registered = self._backend.register_keyspace(
                registry_key(self.prefix), keys.registry_field
            )

    def _ttl_ms(self, layout: ModelLayout) -> int:
        ttl_ms = layout.options.ttl * 1000
        return max(1, int(ttl_ms - ttl_ms * self._ttl_jitter * random.random()))

    def _journal_replayed(self) -> bool:
        return not self._journal.pending or self._journal.replay(self._backend)

    # -- by hand -------------------------------------------------------------------------

    def invalidate(self, model: type, ident: Any = None) -> bool:
        """Forget one row (``ident`` as ``Session.get`` takes it) or, without ``ident``, every
        row of ``model`` at once (O(1) in the number of cached rows).

        Returns False when Redis could not be reached; the invalidation is then journaled and
        done before this process reads from Redis again.
        """
        mapper: Mapper[Any] = inspect(model)
        layout = self._layout_for(mapper)
        if layout is None:
            raise ConfigurationError(f"{model.__name__} is not cached by this cache")
        if ident is None:
            if self._backend.bump_generations(layout.keys.generation_keys()):
                self._counters.add("invalidations")
                return True
            self._journal.add_model(layout)
            return False
        pk = _identity_values(mapper, ident)
        pair = list(layout.keys.pair(pk))
        if self._backend.invalidate(pair):
            self._counters.add("invalidations")
            return True
        self._journal.add_pairs(pair)
        return False

    def stats(self, reset: bool = False) -> CacheStats:
        """Counters of what the cache did (hits, misses, fills, publishes, errors...)."""
        return self._counters.snapshot(reset)

    def __repr__(self) -> str:
        return f"WriteThroughCache(prefix={self.prefix!r})"


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


def _identity_values(mapper: Mapper[Any], ident: Any) -> list[Any]:
    pk_props = [mapper.get_property_by_column(c) for c in mapper.primary_key]
    if isinstance(ident, Mapping):
        try:
            return [ident[p.key] for p in pk_props]
        except KeyError as exc:
            raise ConfigurationError(f"missing primary key attribute {exc}") from exc
    values = list(ident) if isinstance(ident, (tuple, list)) else [ident]
    if len(values) != len(pk_props):
        raise ConfigurationError(
            f"{mapper.class_.__name__} has {len(pk_props)} primary key column(s), "
            f"got {len(values)} value(s)"
        )
    return values


def _on_mapper_configured(mapper: Mapper[Any], cls: type) -> None:
    """Validate cached models when SQLAlchemy configures them, so errors are loud and early."""
    caches = list(_caches)
    for cache in caches:
        cache._layouts.pop(mapper, None)
        cache._layout_for(mapper)
    if not caches and is_cached_model(cls):
        # no cache exists yet: check what can be checked with the default options
        defaults = ModelOptions(3600.0, frozenset(), "write-through", 30.0, "degrade", ())
        ModelLayout(mapper, defaults.merged(model_overrides(cls), where=cls.__name__), "wt", 1)


event.listen(Mapper, "mapper_configured", _on_mapper_configured)

__all__ = ["CachedModel", "WriteThroughCache"]
