"""``WriteThroughCache``: configuration, model registration, and installing the session hooks."""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker

from . import _redis_compat, _sa_compat, background, flavours, forks, retiring, shared
from .backend import AsyncRedisBackend, Backend, RedisBackend, ScriptBackend
from .background import Publisher
from .breaker import CircuitBreaker, weakly
from .cluster import ClusterBackend
from .cluster_async import AsyncClusterBackend, AsyncClusterTransport
from .config import ModelOptions, NearCacheOptions, OnRedisError, Publish, Strategy, validate
from .databases import Databases
from .diagnostics import explain
from .exc import CacheUnavailableError, ConfigurationError
from .journal import Journal
from .keys import (
    REGISTRY_WHOLE,
    DecoratedKey,
    KeySpace,
    fits_key,
    keyspace_of,
    prefix_patterns,
    registry_key,
)
from .loading import ReadPath
from .model import CachedModel, ModelLayout, is_cached_model, model_overrides
from .near import ClusterSubscriptions, NearCache, Subscriptions, TwinSubscriptions
from .redis_async import AsyncTransport, ClosedCacheError, OtherEventLoopError, close_off_loop
from .redis_sync import SyncTransport
from .registry import Models
from .report import CachedModels, describe
from .retiring import Retirement
from .runtime import Runtime, Settings
from .session import overrides_get_path, plain_subclass, session_class
from .shared import SharedStats, parse_shared, processes_key, stats_key
from .siblings import database_of
from .stats import CacheStats, Counters
from .writing import WritePath

log = logging.getLogger("sqlalchemy_writethrough")

_UNKNOWN: Any = object()

_caches: weakref.WeakSet[WriteThroughCache] = weakref.WeakSet()

InstallTarget: TypeAlias = (
    "sessionmaker[Any] | scoped_session[Any] | type[Session]"
    " | async_sessionmaker[Any] | async_scoped_session[Any] | type[AsyncSession]"
)


class WriteThroughCache:
    """A Redis write-through cache of ORM entities, installed on a Session factory.

    ::

        cache = WriteThroughCache("redis://localhost:6379/0", prefix="shop", ttl=3600)
        cache.install(Session)              # a sessionmaker, scoped_session or Session subclass

    :param redis_client: a ``redis.Redis`` client (a Sentinel ``master_for()`` one too), a
        ``redis.cluster.RedisCluster`` client, or a URL (the cache then builds a client with
        the short ``socket_timeout`` and ``socket_connect_timeout`` below and one retry). A
        plain client or URL that reaches a Redis Cluster node is switched to the cluster when
        the node first answers as one (docs/running-redis.md).
    :param prefix: namespace of every key; two applications sharing one Redis must use
        different prefixes. Databases need not: every key names the database its row came
        from (see :mod:`sqlalchemy_writethrough.databases`).
    :param ttl: seconds an entry lives, minus a random jitter of up to ``ttl_jitter`` of it, so
        entries written together do not expire together.
    :param ttl_jitter: the largest fraction of ``ttl`` removed at random (0 to below 1).
    :param exclude: attribute names never written to Redis (in any model); cached instances
        leave them unloaded and load them on access.
    :param strategy: ``"write-through"`` writes committed rows to Redis; ``"invalidate"`` leaves
        a miss instead (for write-heavy models).
    :param lock_timeout: seconds a writer's lock lives; longer than a sane transaction. A lock
        older than half of it is taken again just before COMMIT.
    :param on_redis_error: ``"degrade"`` lets commits proceed when Redis cannot be locked, and
        invalidates the affected keys before this process reads Redis again; ``"strict"``
        makes such a flush fail (the transaction rolls back) instead.
    :param publish: ``"sync"`` writes a commit's rows to Redis before ``commit()`` returns;
        ``"background"`` returns first and leaves the publish (and a rollback's restore) to
        one background worker per cache: until it lands, readers miss (the entries stay
        locked), never read stale data (docs/consistency.md). A per-model option too.
    :param publish_queue: ``publish="background"``: transactions queued for the worker at
        most; a commit that finds the queue full publishes synchronously.
    :param lease_timeout: seconds a reader's fill lease lives; longer than a primary-key load.
    :param fill_wait: seconds a reader that finds another reader loading the same row waits
        for that fill before loading the row itself (a thundering herd on a cold row costs one
        database load); 0 never waits.
    :param epoch_check_interval: seconds between two checks, on one open connection, that
        Redis is still the data set the cache last saw (every new or re-established connection
        is checked before its first use): a Redis that restarted from an older snapshot,
        failed over, or was flushed starts a new epoch, and no entry written before it is
        served again. See docs/consistency.md.
    :param buckets: hash-tag buckets per model; a whole-model invalidation touches one key per
        bucket, and a Redis Cluster spreads a model over this many slots. Every process
        sharing a prefix must use the same number.
    :param socket_timeout: seconds, for the client built from a URL (0.5 by default); set it
        on your own client instead when you pass one.
    :param socket_connect_timeout: likewise, for connecting (0.5 by default).
    :param breaker_threshold: consecutive Redis failures before the circuit breaker opens and
        the cache stops calling Redis until a background probe succeeds.
    :param breaker_cooldown: seconds before the first probe of an open breaker (doubling up
        to 1 s while probes fail).
    :param journal_limit: keys remembered while Redis cannot be locked (``degrade`` mode);
        beyond it their buckets are invalidated whole.
    :param stats_interval: seconds between two sends of this process's counters to Redis
        (``{prefix}:stats``, one pipelined batch from a background thread), where
        ``sqlalchemy-writethrough stats`` and :meth:`shared_stats` add up every process's;
        what is left is sent by :meth:`close` or at interpreter exit; a ``redis.asyncio``
        client is sent to on its event loop. None sends nothing. Left out:
        ``$SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL`` when set (``off`` sends nothing), else 5.
    :param near_cache: ``True`` (or a :class:`NearCacheOptions` with other bounds than its
        10 000 entries and 1 s) keeps copies of entries in process memory, so a repeated
        primary-key read costs no round trip; such a read may be up to the staleness bound
        behind another process's commit (never uncommitted, never behind this process's own
        commits): docs/consistency.md. Every model uses it unless its ``near_cache`` option
        says False. Sync and asyncio sessions, standalone, Sentinel or Cluster (its
        subscriber is a thread, on a synchronous twin of a ``redis.asyncio`` client, on one
        node of a Cluster); every process sharing the prefix should enable it, so that its
        writes tell the others at once. Off by default.
    :param keep_connections: whether each thread keeps one pooled connection of a
        synchronous, standalone Redis client checked out between the cache's commands (a
        read then skips redis-py's checkout and release: docs/usage.md). ``None`` (the
        default): yes for the client the cache builds from a URL, whose pool only it uses,
        and for a pool without a real bound (``max_connections`` of 2**20 or more: redis-py
        5's default); no for a client you pass with a bounded pool (redis-py 6 and later
        default to 100), which your own commands share: a thread keeping one needs a second
        for its own command. ``True`` keeps them on such a pool too (at most a quarter of
        its ``max_connections`` at a time); ``False`` never. Only a plain
        ``redis.ConnectionPool`` ever keeps one (not Blocking, Sentinel or Cluster).
    """

    def __init__(
        self,
        redis_client: redis.Redis | redis.asyncio.Redis | RedisCluster | AsyncRedisCluster | str,
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
        publish: Publish = "sync",
        publish_queue: int = 1000,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        buckets: int = 16,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 0.25,
        journal_limit: int = 10_000,
        epoch_check_interval: float = 1.0,
        stats_interval: float | None = _UNKNOWN,
        near_cache: bool | NearCacheOptions = False,
        keep_connections: bool | None = None,
    ) -> None:
        if not prefix or any(c in prefix for c in "{} \t\n"):
            raise ConfigurationError("prefix must be non-empty, without braces or whitespace")
        if not 0 <= ttl_jitter < 1:
            raise ConfigurationError("ttl_jitter is a fraction of the ttl, from 0 to below 1")
        if not 1 <= buckets <= 16384:
            raise ConfigurationError("buckets must be between 1 and 16384")
        if not fill_wait >= 0:
            raise ConfigurationError("fill_wait is a number of seconds, 0 to never wait")
        if not epoch_check_interval > 0:
            raise ConfigurationError("epoch_check_interval must be a positive number of seconds")
        if not lease_timeout > 0:
            raise ConfigurationError("lease_timeout must be a positive number of seconds")
        if stats_interval is _UNKNOWN:
            stats_interval = _default_stats_interval()
        if stats_interval is not None and not stats_interval > 0:
            raise ConfigurationError("stats_interval is a positive number of seconds, or None")
        if isinstance(exclude, str):
            raise ConfigurationError("exclude takes a list of attribute names")
        if not publish_queue >= 1:
            raise ConfigurationError("publish_queue must be at least 1")
        if near_cache is True:
            near_cache = NearCacheOptions()
        elif near_cache is not False and not isinstance(near_cache, NearCacheOptions):
            raise ConfigurationError("near_cache takes True, False or NearCacheOptions(...)")
        self._near_options = near_cache or None
        self._publish_queue = publish_queue
        self._url: str | None = None
        #: the clients the cache built, (client, whether redis.asyncio), closed by close() /
        #: aclose(): from its URL, and the Redis Cluster clients it switched to
        self._built: list[tuple[Any, bool]] = []
        #: the backends a switch to a Redis Cluster replaced (their clients may be the cache's)
        self._retired: list[ScriptBackend] = []
        #: close() (or the exit hook) made its last epoch check (see _leave)
        self._left = False
        #: None: threads keep a connection between commands on a pool only the cache uses
        #: (built from its URL) or an unbounded one (see :meth:`_keeps_connections`)
        self._keep_connections = keep_connections
        self._timeouts = (
            0.5 if socket_timeout is None else socket_timeout,
            0.5 if socket_connect_timeout is None else socket_connect_timeout,
        )
        sync_client: Any = None
        async_client: Any = None
        if isinstance(redis_client, str):
            self._url = redis_client
            sync_client = redis.Redis.from_url(redis_client, **self._client_options())
            self._built.append((sync_client, False))
        elif isinstance(redis_client, redis.Redis) or _redis_compat.is_async_client(redis_client):
            if socket_timeout is not None or socket_connect_timeout is not None:
                raise ConfigurationError(
                    "socket timeouts belong to the client you passed: build it with "
                    "redis.Redis(..., socket_timeout=..., socket_connect_timeout=...), "
                    "or pass a URL and let the cache build it"
                )
            _check_client(redis_client)
            if isinstance(redis_client, redis.Redis):
                sync_client = redis_client
            else:
                async_client = redis_client
        elif isinstance(redis_client, RedisCluster) or _redis_compat.is_async_cluster_client(
            redis_client
        ):
            if socket_timeout is not None or socket_connect_timeout is not None:
                raise ConfigurationError(
                    "socket timeouts belong to the client you passed: build it with "
                    "RedisCluster(..., socket_timeout=..., socket_connect_timeout=...)"
                )
            if isinstance(redis_client, RedisCluster):
                sync_client = redis_client
            else:
                async_client = redis_client
            kwargs = getattr(redis_client.nodes_manager, "connection_kwargs", {})  # type: ignore[union-attr]
            if kwargs.get("socket_timeout") is None:
                log.warning(
                    "writethrough: the RedisCluster client has no socket_timeout; a stalled "
                    "node will stall every cached read and commit on its slots (set one, "
                    "e.g. 0.5 s)"
                )
        else:
            raise ConfigurationError(
                "redis_client must be a redis.Redis, redis.asyncio.Redis, "
                "redis.cluster.RedisCluster or redis.asyncio.cluster.RedisCluster client, "
                "or a URL"
            )

        #: the client given (or built from the URL): a redis.Redis, or a redis.asyncio.Redis
        self.redis: Any = sync_client if sync_client is not None else async_client
        self.prefix = prefix
        defaults = validate(
            ModelOptions(
                ttl=ttl,
                exclude=frozenset(),
                strategy=strategy,
                lock_timeout=lock_timeout,
                on_redis_error=on_redis_error,
                publish=publish,
                near_cache=True if near_cache else None,
            ),
            where="WriteThroughCache",
        )
        self._models = Models(prefix, defaults, buckets, frozenset(exclude))
        self._shared_counters = Counters()
        self._journal = Journal(journal_limit)
        self._settings = Settings(
            prefix=prefix,
            lease_ms=int(lease_timeout * 1000),
            fill_wait=fill_wait,
            ttl_jitter=ttl_jitter,
            info_key=f"writethrough.tracker.{id(self)}",
        )
        self._breaker_options = (breaker_threshold, breaker_cooldown)
        self._epoch_interval = epoch_check_interval
        self._cluster_lock = threading.Lock()
        #: close() closed the synchronous clients: no switch to the cluster builds one more
        self._sync_closed = False
        forks.renew_in_child(self, "_cluster_lock")
        #: the hooks of each flavour: sync sessions, and AsyncSession's (made at first need)
        self._sync: _Flavour | None = None
        self._async: _Flavour | None = None
        if sync_client is not None:
            self._sync = self._flavour(RedisBackend, sync_client)
        if async_client is not None:
            self._async = self._flavour(AsyncRedisBackend, async_client)
        primary = self._sync or self._async
        assert primary is not None
        self._runtime = primary.runtime
        self._read = primary.read
        self._write = primary.write
        #: the near cache (``near_cache=``), serving both flavours' reads
        self._near: NearCache | None = None
        if self._near_options is not None:
            self._near = NearCache(_subscriptions(self.redis), prefix, self._near_options)
            for flavour in (self._sync, self._async):
                if flavour is not None:
                    flavour.runtime.near = self._near
                    if isinstance(flavour.runtime.backend, ScriptBackend):
                        self._tell_near(flavour.runtime.backend)
            self._near.start()
            weakref.finalize(self, self._near.stop, 0)
        self._shared_stats: SharedStats | None = None
        if stats_interval is not None:
            # the cache's current client: a plain one switched to a Cluster is followed;
            # a redis.asyncio one is sent to on its event loop (see shared.py)
            me = weakref.ref(self)
            self._shared_stats = SharedStats(
                self._shared_counters,
                lambda: getattr(me(), "redis", None),
                prefix,
                stats_interval,
                self._process_state,
            )
        # weak: SQLAlchemy keeps the listeners (which reference this cache) as long as the
        # target lives; a strong reference back would keep both alive forever
        self._installed: list[tuple[weakref.ref[Any], str, Any]] = []
        #: the factories install() was given (an async one too), for the command-line tool
        self._targets: list[weakref.ref[Any]] = []
        #: install() ran once: aclose() then stops its asyncio calls (see ClosedCacheError)
        self._was_installed = False
        #: what install() was given, the Session class its listeners went on, and the first,
        #: in words (see _refuse_covered_twice)
        self._covered: list[tuple[weakref.ref[Any], weakref.ref[type], str]] = []
        _caches.add(self)

    def _client_options(self, asyncio: bool = False) -> dict[str, Any]:
        """What the cache builds a client from its URL with (sync, or ``redis.asyncio``
        with its own ``Retry``, whose attempts are awaited)."""
        socket_timeout, connect_timeout = self._timeouts
        retry_class: Any = AsyncRetry if asyncio else Retry
        return {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            # one retry for a pooled connection that died (a restart); never for a timeout,
            # which would double what a stalled Redis costs each operation
            "retry": retry_class(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "retry_on_error": [RedisConnectionError],
        }

    def _flavour(self, backend_class: type[ScriptBackend], client: Any) -> _Flavour:
        """A runtime (and its hooks) over ``client``: everything but the backend is shared
        between the flavours (models, counters, journal, settings)."""
        backend = self._backend_for(
            backend_class, client, CircuitBreaker(*self._breaker_options), self._shared_counters
        )
        runtime = Runtime(
            self._models, backend, self._shared_counters, self._journal, self._settings
        )
        runtime.near = getattr(self, "_near", None)  # an asyncio flavour made later too
        backend.on_recovery = runtime.journal_replayed
        # the prober holds the breaker: what it reaches holds this cache weakly, and a cache
        # collected (dropped without close() while Redis was away) stops its prober
        backend.breaker.on_open = weakly(self._breaker_opened)
        weakref.finalize(self, backend.breaker.stop)
        write = WritePath(runtime)
        # made now, started at the first background publish (a thread, or a loop's task)
        write.publisher = Publisher(
            write.run_jobs, self._publish_queue, asynchronous=backend_class is AsyncRedisBackend
        )
        return _Flavour(runtime, ReadPath(runtime), write)

    def _backend_for(
        self,
        backend_class: type[ScriptBackend],
        client: Any,
        breaker: CircuitBreaker,
        counters: Counters,
    ) -> ScriptBackend:
        """The backend of ``client``: a Redis Cluster's, or a standalone or Sentinel one's
        (which hands a reply only a Cluster node gives to :meth:`_cluster_node_seen`), or an
        asyncio one's."""
        if isinstance(client, RedisCluster):
            backend_class = ClusterBackend
        elif _redis_compat.is_async_cluster_client(client):
            backend_class = AsyncClusterBackend
        extra: dict[str, Any] = {}
        if backend_class is RedisBackend:
            extra["keep_connections"] = self._keeps_connections(client)
        backend = backend_class(  # type: ignore[call-arg]
            client,
            breaker,
            counters,
            prefix=self.prefix,
            epoch_interval=self._epoch_interval,
            on_new_epoch=weakly(self._new_epoch),
            known_keyspaces=self._models.known_keyspaces,
            **extra,
        )
        if backend_class in (RedisBackend, AsyncRedisBackend):
            # weakly: the runtime's owner keeps an installed cache alive (see Runtime.owner)
            backend.on_cluster_node = weakly(self._cluster_node_seen)
        self._tell_near(backend)
        return backend

    def _keeps_connections(self, client: Any) -> bool:
        """Whether the cache's threads may each keep one of ``client``'s pooled connections
        between commands: as ``keep_connections`` says, else only on a pool nobody else
        checks connections out of (the client the cache built from its URL) or one without a
        real bound: an application sharing a bounded pool would find it dry sooner (a thread
        keeping one needs a second for its own command)."""
        if self._keep_connections is not None:
            return self._keep_connections
        if any(built is client for built, _ in self._built):
            return True
        return _redis_compat.pool_unbounded(client.connection_pool)

    def _tell_near(self, backend: ScriptBackend) -> None:
        """With a near cache, ``backend``'s write scripts publish their changes for every
        process's near cache, and drop this process's copies at once."""
        near = getattr(self, "_near", None)
        if near is not None:
            backend.near = near
            backend.near_channel = near.channel

    def _async_flavour(self) -> _Flavour:
        """The hooks of AsyncSessions: over the redis.asyncio client given, or one built from
        the URL the cache was given."""
        if self._async is None:
            if self._url is None:
                raise ConfigurationError(
                    "this cache was given a synchronous redis.Redis client, which would block "
                    "the event loop: for an async_sessionmaker or AsyncSession, pass a "
                    "redis.asyncio.Redis client (or a URL) to WriteThroughCache"
                )
            client = redis.asyncio.Redis.from_url(self._url, **self._client_options(True))
            self._built.append((client, True))
            self._async = self._flavour(AsyncRedisBackend, client)
        return self._async

    def _cluster_node_seen(self, backend: ScriptBackend) -> None:
        """A plain client's server answered like a Redis Cluster node (MOVED, CROSSSLOT...):
        when ``INFO cluster`` confirms it, the cache goes on as a Redis Cluster client built
        from the same address and options (it would otherwise hit only that node's slots).
        An asyncio backend's (called from SQLAlchemy's greenlet) asks through
        ``redis.asyncio`` and goes on as a ``redis.asyncio.cluster.RedisCluster``."""
        asynchronous = isinstance(backend, AsyncRedisBackend)
        # an asyncio caller must not wait for the lock: its holder awaits on this very loop
        # (a deadlock); it goes to the database, as its operation does anyway
        if not self._cluster_lock.acquire(blocking=not asynchronous):
            return
        try:
            self._switch_to_cluster(backend, asynchronous)
        finally:
            self._cluster_lock.release()

    def _switch_to_cluster(self, backend: ScriptBackend, asynchronous: bool) -> None:
        """:meth:`_cluster_node_seen`'s work, under its lock."""
        flavour = self._async if asynchronous else self._sync
        if (
            flavour is None
            or flavour.runtime.backend is not backend
            or backend.on_cluster_node is None
        ):
            return
        client: Any = backend.client  # type: ignore[attr-defined]
        if _closed_under_way(backend):
            return
        # (aclose() forgets the clients it closed)
        ours = any(built is client for built, _ in self._built)
        if not asynchronous and self._sync_closed:
            return  # close() ran: nothing more is built
        try:
            try:
                if asynchronous:
                    info = _sa_compat.await_(client.info("cluster"))
                else:
                    info = client.info("cluster")
            except (AttributeError, TypeError, ValueError) as exc:
                # close() disconnected the client's pool under this thread's INFO
                _redis_compat.raise_if_closed_under_us(exc)
                raise
        except (redis.RedisError, OSError):
            return  # asked again at the next such reply
        if asynchronous and _closed_under_way(backend):
            # aclose() ran during INFO, whose connection (if it connected only then) went
            # back to the closed pool open: closed now, if the client is the cache's
            if ours and _redis_compat.bound_loops(client) <= {asyncio.get_running_loop()}:
                _close_quietly(lambda: _sa_compat.await_(client.connection_pool.disconnect()))
            return
        if str(info.get("cluster_enabled", 0)) != "1":
            backend.on_cluster_node = None
            return
        try:
            if asynchronous:
                cluster: Any = _redis_compat.async_cluster_like(client)
                _sa_compat.await_(_redis_compat.async_cluster_initialize(cluster))
            else:
                cluster = _redis_compat.cluster_like(client)
        except Exception as exc:  # no node answers CLUSTER SLOTS now: asked again later
            log.debug("writethrough: Redis Cluster client not built: %s", exc)
            return
        if asynchronous and _closed_under_way(backend):
            # aclose() ran while the slot map was read: the client would be no one's to close
            _close_quietly(lambda: _sa_compat.await_(cluster.aclose()))
            return
        switched = self._backend_for(
            AsyncRedisBackend if asynchronous else RedisBackend,
            cluster,
            backend.breaker,
            flavour.runtime.counters,
        )
        switched.on_recovery = flavour.runtime.journal_replayed
        flavour.runtime.backend = switched
        self._built.append((cluster, asynchronous))
        self._retired.append(backend)
        if isinstance(backend.transport, SyncTransport):
            backend.transport.close()  # the connections its threads kept go back to the pool
        if ours:
            # the plain client of the cache's URL is used no more: its idle connections are
            # closed now (one in use by another thread at this moment is closed by close())
            try:
                if asynchronous:
                    # only on the loop its connections belong to (one of another loop's
                    # copies is the transport's, closed by aclose() on that loop)
                    if _redis_compat.bound_loops(client) <= {asyncio.get_running_loop()}:
                        pool = client.connection_pool
                        _sa_compat.await_(pool.disconnect(inuse_connections=False))
                else:
                    client.connection_pool.disconnect(inuse_connections=False)
            except Exception as exc:  # never in the way of the switch
                log.debug("writethrough: closing the plain client's connections: %s", exc)
        if self.redis is client:
            self.redis = cluster
            if self._near is not None:
                # listen on a node of the cluster from now on (the node given hears every
                # node's messages, but would not be left when it fails)
                self._near.switch(_subscriptions(cluster))
        log.warning(
            "writethrough: Redis at %s is a Redis Cluster node: the cache uses the cluster "
            "through it (pass a redis.cluster.RedisCluster client%s to say so; "
            "docs/running-redis.md)",
            backend.address,
            " or its redis.asyncio twin" if asynchronous else "",
        )

    # -- models --------------------------------------------------------------------------

    def register(self, model: type, **options: Any) -> None:
        """Cache ``model`` (a mapped class you cannot give the mixin), with per-model options.

        Raises :class:`ConfigurationError` now if the model is already configured and cannot
        be cached exactly, else when its mapper is configured.
        """
        self._models.register(model, **options)

    def register_all(self, base: Any = None) -> None:
        """Cache every mapped class under ``base`` (a declarative base or a ``registry``), or,
        with no argument, every mapped class, including ones mapped later.

        "Every model the cache can keep exact": a model it cannot (a polymorphic concrete base,
        mapped to a join or a select, a key or column type with no exact stored form) is left out,
        with one :class:`WriteThroughWarning` naming it and saying why. A wrong option in a
        model's ``__writethrough__`` still raises :class:`ConfigurationError`.
        """
        self._models.register_all(base, stacklevel=2)

    # what tests and tools look at from outside (private: no promise across versions)

    @property
    def _backend(self) -> Backend:
        return self._runtime.backend

    @_backend.setter
    def _backend(self, backend: Backend) -> None:
        self._runtime.backend = backend

    @property
    def _counters(self) -> Counters:
        return self._runtime.counters

    @property
    def _databases(self) -> Databases:
        return self._models.databases

    @property
    def _defaults(self) -> ModelOptions:
        return self._models.defaults

    def _layout_for(self, mapper: Mapper[Any]) -> ModelLayout | None:
        return self._models.layout_for(mapper)

    def _keys(self, layout: ModelLayout, bind: Any) -> KeySpace:
        return self._models.keys(layout, bind)

    def install(self, target: InstallTarget) -> None:
        """Add the cache to a ``sessionmaker``, ``scoped_session`` or ``Session`` subclass, or
        to an ``async_sessionmaker``, ``async_scoped_session`` or ``AsyncSession`` subclass.

        Listeners are added with SQLAlchemy's event API only. The ``do_orm_execute`` listener
        should come after your own (loader criteria for soft delete or tenancy): install the
        cache after adding them. Loads that a listener running after the cache's would see go
        to the database (logged once per listener). An async target's sessions run a ``Session``
        subclass the cache gives the factory (see :mod:`.flavours`): its listeners go there,
        and talk to Redis through ``redis.asyncio`` on the event loop (docs/asyncio.md).

        A ``sessionmaker`` (or the one behind a ``scoped_session``) is also given a subclass of
        its Session class whose ``get()`` answers a plain primary-key get from the cache before
        SQLAlchemy builds a statement (see :meth:`session_class`), unless that class loads gets
        its own way (then a subclass that only carries the listeners); the listeners go on
        that class, where :meth:`uninstall` can leave them. The Session subclass an async
        target's sessions run is such a class too (its gets awaited on ``redis.asyncio``
        inside SQLAlchemy's greenlet), unless the class it is made from overrides how a get
        loads. A sync Session class given directly keeps its class: its gets are answered
        through ``do_orm_execute``, as every other load is.
        """
        if isinstance(target, Session) or flavours.is_async_session(target):
            raise ConfigurationError(
                "install() takes a sessionmaker, scoped_session or Session subclass (or their "
                "async twins), so that every session it makes is covered; not a single Session"
            )
        if flavours.is_async_target(target):
            flavour = self._async_flavour()
            _check_loop(flavour.runtime.backend)
            transport = getattr(flavour.runtime.backend, "transport", None)
            if isinstance(transport, _CLOSABLE_TRANSPORTS):
                transport.closed = False  # closed by aclose(), in use again
            planned = flavours.planned_sync_session_class(target)
            revived = flavour.runtime.retirement.off_in(planned[0])
            if revived is None:
                self._refuse_covered_twice(target, *planned)
            # made (or given the read path again) before the listeners go on it
            listen_on: Any = revived or flavours.sync_session_class(target, flavour.read)
            covered: type | None = listen_on
        else:
            if self._sync is None:
                raise ConfigurationError(
                    "this cache was given a redis.asyncio client, which serves AsyncSessions: "
                    "install it on an async_sessionmaker, async_scoped_session or AsyncSession "
                    "subclass, or give the cache a redis.Redis client (or a URL) for sync "
                    "sessions"
                )
            maker = target.session_factory if isinstance(target, scoped_session) else target
            revived = (
                self._sync.runtime.retirement.off_in(maker.class_)
                if isinstance(maker, sessionmaker)
                else None
            )
            if revived is not None:
                covered = revived
            elif isinstance(maker, sessionmaker):
                self._refuse_covered_twice(target, maker.class_, True)
                # before the listeners, which SQLAlchemy puts on the factory's class: a class
                # of the factory's own (its listeners reach its sessions only, and uninstall()
                # can leave them there: see .retiring), with the get path unless the class
                # it derives from loads gets its own way
                made = (
                    plain_subclass(maker.class_)
                    if overrides_get_path(maker.class_)
                    else self.session_class(maker.class_)
                )
                setattr(made, retiring.MADE_FROM, maker.class_)
                maker.class_ = covered = made
            else:  # a Session class (the async kinds were taken above), or what a
                # scoped_session was made of (SQLAlchemy refuses what it cannot listen on)
                covered = maker if isinstance(maker, type) else None
                if covered is not None:
                    self._refuse_covered_twice(target, covered, False)
            # on the class itself, as SQLAlchemy would through the factory: uninstall()
            # then removes them from this class, even once the factory has another
            flavour, listen_on = self._sync, covered or target
        hooks: list[tuple[str, Any, dict[str, Any]]] = [
            ("do_orm_execute", flavour.read.on_execute, {"retval": True}),
            ("after_begin", flavour.write.after_begin, {}),
            ("before_flush", flavour.write.before_flush, {}),
            ("after_flush", flavour.write.after_flush, {}),
            ("before_commit", flavour.write.before_commit, {}),
            ("after_commit", flavour.write.after_commit, {"insert": True}),
            ("after_transaction_end", flavour.write.after_transaction_end, {}),
        ]
        # a class made for a factory keeps the listeners of an uninstall(): on one again
        # (the factory's lineage has it), they are turned back on, not added
        rejoined = _made_for_a_factory(listen_on) and flavour.runtime.retirement.join(listen_on)
        if rejoined and "_wt_read" in listen_on.__dict__:
            listen_on._wt_read = flavour.read
        for name, fn, kw in hooks:
            if not rejoined:
                event.listen(listen_on, name, fn, **kw)
            self._installed.append((weakref.ref(listen_on), name, fn))
        self._targets.append(weakref.ref(target))
        self._was_installed = True
        flavour.runtime.owner = self
        if covered is not None:
            where = _described(target, covered)
            self._covered.append((weakref.ref(target), weakref.ref(covered), where))

    def _refuse_covered_twice(self, target: Any, cls: type, subclassed: bool) -> None:
        """SQLAlchemy runs the listeners of a Session class for its subclasses too: installed
        on a class and on a subclass of it (``Session`` and an ``async_sessionmaker``, whose
        sessions run a ``Session`` subclass; or one factory twice), every flush and commit of
        the subclass would go through the cache twice, each pass taking the other's locks for
        a concurrent writer's (or, across the two flavours, failing). ``cls`` is the class
        the listeners will go on, or with ``subclassed`` the class a new one will derive
        from."""
        for installed, ref, where in self._covered:
            other = ref()
            if other is None or installed() is None:
                continue
            if issubclass(cls, other) or (not subclassed and issubclass(other, cls)):
                what = _described(target, cls if subclassed else None)
                if installed() is target:
                    what, where = "it again", "its first install()"
                raise ConfigurationError(
                    f"installing this cache on {what} would cover sessions it already covers "
                    f"through {where}: SQLAlchemy runs a Session class's listeners for its "
                    "subclasses too, so every flush and commit of those sessions would go "
                    "through the cache twice. Install it once per family of Session classes: "
                    "on your sessionmaker and your async_sessionmaker, for instance, rather "
                    "than on Session itself (or uninstall() the other first)"
                )

    def session_class(self, base: type[Session] = Session) -> type[Session]:
        """A subclass of ``base`` whose ``get()`` answers a plain primary-key get from this
        cache before SQLAlchemy builds a statement; anything else goes to ``base.get()``.

        :meth:`install` gives one to a ``sessionmaker`` and to an async factory (as its
        ``sync_session_class``); make one yourself for a sync Session class you construct
        directly, then ``install()`` it. The class asks the cache only while the cache's
        listeners are its only ``do_orm_execute`` listeners.
        """
        if overrides_get_path(base):
            raise ConfigurationError(
                f"{base.__name__} overrides how Session.get loads (get, get_bind, execute or "
                "_identity_lookup): install() the cache on it directly, without a subclass"
            )
        if self._sync is None:
            raise ConfigurationError(
                "session_class() answers gets of sync sessions: give the cache a redis.Redis "
                "client or a URL"
            )
        return session_class(base, self._sync.read)

    def uninstall(self, target: InstallTarget) -> None:
        """Turn off what :meth:`install` added to ``target``, for its sessions already open
        in other threads too: safe while they run.

        A factory install() gave a Session subclass gets back the class it had; the cache's
        listeners stay on the subclass, doing nothing, for its sessions still open (removing
        a listener while another thread's session runs its event makes that session raise:
        see :mod:`.retiring`). The listeners added to a Session class given directly are
        removed from it."""
        self._targets = [ref for ref in self._targets if ref() not in (None, target)]
        classes = [entry[1]() for entry in self._covered if entry[0]() is target]
        self._covered = [entry for entry in self._covered if entry[0]() not in (None, target)]
        keep = []
        retired: dict[type, Retirement] = {}
        for ref, name, fn in self._installed:
            cls = ref()
            if cls is not None and cls in classes:
                if _made_for_a_factory(cls):
                    # left in place: removing a listener while other threads' sessions run
                    # its event makes them raise (see .retiring)
                    retired[cls] = fn.__self__.retirement
                elif event.contains(cls, name, fn):
                    event.remove(cls, name, fn)
            elif cls is not None:
                keep.append((ref, name, fn))
        self._installed = keep
        for cls, retirement in retired.items():
            if retirement.retire(cls):
                self._give_back(target, cls)
        self._give_back_kept_connections()
        if not self._targets:
            self._unwatch_engines()
            for each in (self._sync, self._async):
                if each is not None:
                    each.runtime.owner = None
        reads = [flavour.read for flavour in (self._sync, self._async) if flavour is not None]
        for made in classes:
            for cls in made.__mro__ if made is not None else ():
                if any(cls.__dict__.get("_wt_read") is read for read in reads):
                    cls._wt_read = None  # type: ignore[attr-defined]

    @staticmethod
    def _give_back(target: Any, made: type) -> None:
        """Give ``target`` back the Session class it had before install() made ``made``, now
        that no cache's listeners on ``made`` are live: its new sessions run none of them."""
        if flavours.is_async_target(target):
            flavours.give_back(target, made)
            return
        maker = target.session_factory if isinstance(target, scoped_session) else target
        if isinstance(maker, sessionmaker) and maker.class_ is made:
            maker.class_ = retiring.live_base(made)

    # -- by hand -------------------------------------------------------------------------

    def invalidate(self, model: type, ident: Any = None, *, bind: Any = None) -> bool:
        """Forget one row (``ident`` as ``Session.get`` takes it) or, without ``ident``, every
        row of ``model`` at once (O(1) in the number of cached rows).

        :param bind: the Engine or Connection of the database whose entries to forget.
            Without it, the row (or model) is forgotten in every database: each one that
            holds entries of the model (any process's, from the keyspace registry), and each
            one this process has used the model with. Either way, the keyspaces of other
            versions of the model (a rolling deploy's) are reached too, read from the registry.

        Returns False when Redis could not be reached; the invalidation is then journaled and
        done before this process reads from Redis again (for the databases this process
        knows of, when no bind was given).
        """
        return self._invalidate(self._runtime_here(), model, ident, bind)

    async def ainvalidate(self, model: type, ident: Any = None, *, bind: Any = None) -> bool:
        """:meth:`invalidate`, awaited on the event loop (through ``redis.asyncio``): for
        asyncio code, where the sync twin would block the loop."""
        runtime = self._async_flavour().runtime
        result: bool = await _sa_compat.greenlet_spawn(
            self._invalidate, runtime, model, ident, bind
        )
        return result

    def _runtime_here(self) -> Runtime:
        """The runtime a by-hand call uses: the sync one, or inside SQLAlchemy's greenlet
        (``run_sync``, an event of an AsyncSession) the asyncio one."""
        if self._async is not None and (self._sync is None or _sa_compat.in_greenlet()):
            if not _sa_compat.in_greenlet():
                raise ConfigurationError(
                    "this cache talks to Redis through redis.asyncio: await "
                    "cache.ainvalidate() / cache.aclear() instead"
                )
            return self._async.runtime
        assert self._sync is not None
        return self._sync.runtime

    def _invalidate(self, runtime: Runtime, model: type, ident: Any, bind: Any) -> bool:
        bind = _sync_bind(bind)
        mapper: Mapper[Any] = inspect(model)
        layout = runtime.models.layout_for(mapper)
        if layout is None:
            raise ConfigurationError(f"{model.__name__} is not cached by this cache")
        own = None if bind is None else runtime.models.keys(layout, bind)
        keyspaces, complete = self._all_keyspaces(runtime, layout, own)
        if ident is None:
            gen_keys = [g for keys in keyspaces for g in keys.generation_keys()]
            if complete and (not gen_keys or runtime.backend.bump_generations(gen_keys)):
                runtime.counters.invalidated("model", 1, layout.entity_name)
                return True
            runtime.journal.add_buckets(gen_keys)
            return False
        pk = _key_values(layout, mapper, _identity_values(mapper, ident))
        pairs = [k for keys in keyspaces for k in keys.pair(pk)]
        if complete and (not pairs or runtime.backend.invalidate(pairs)):
            runtime.counters.invalidated("manual", 1, layout.entity_name)
            return True
        runtime.journal.add_pairs(pairs)
        return False

    def _new_epoch(self, replaced: int) -> None:
        """Redis may have forgotten anything, the registry included (every lease and lock
        records its keyspaces again: see :mod:`.siblings`)."""
        self._runtime.counters.add("epochs")
        self._runtime.counters.invalidated("epoch")  # every model at once
        self._registry_forgotten()
        if self._near is not None:
            self._near.renew()

    def _registry_forgotten(self) -> None:
        """Redis may have forgotten the keyspace registry: the flavours' next registrations
        go ahead of their fetches and locks as well (see :class:`.backend.Registration`)."""
        for flavour in (self._sync, self._async):
            if flavour is not None:
                flavour.runtime.siblings.doubt()

    def clear(self) -> int:
        """Delete every key under this cache's prefix: entries, locks, leases, bucket
        generations and the keyspace registry; returns how many keys were deleted.

        For retiring a prefix, or starting over. Safe while the application runs: to readers
        and writers a deleted key is an evicted one (a miss, a refused fill, a publish that
        leaves a miss), never a stale value. Raises :class:`CacheUnavailableError` when Redis
        fails midway (what was deleted stays deleted; call it again).
        """
        return self._clear(self._runtime_here())

    async def aclear(self) -> int:
        """:meth:`clear`, awaited on the event loop (through ``redis.asyncio``)."""
        deleted: int = await _sa_compat.greenlet_spawn(self._clear, self._async_flavour().runtime)
        return deleted

    def _publishers(self) -> list[Publisher]:
        """The background workers of this cache's flavours."""
        return [
            flavour.write.publisher
            for flavour in (self._sync, self._async)
            if flavour is not None and flavour.write.publisher is not None
        ]

    def flush_publishes(self, timeout: float = 5.0) -> bool:
        """Wait until the background publishes (``publish="background"``) queued so far have
        been written, up to ``timeout`` seconds; True when none is pending. A ``redis.asyncio``
        cache's run on the event loop: await :meth:`aflush_publishes` there instead."""
        deadline = time.monotonic() + timeout
        done = True
        for publisher in self._publishers():
            done = publisher.flush(max(0.0, deadline - time.monotonic())) and done
        return done

    async def aflush_publishes(self, timeout: float = 5.0) -> bool:
        """:meth:`flush_publishes` on the event loop: lets the worker task run until nothing
        queued is pending, up to ``timeout`` seconds (a sync flavour's thread is waited for
        in a thread of the loop's executor)."""
        deadline = time.monotonic() + timeout
        done = True
        if self._async is not None and self._async.write.publisher is not None:
            done = await self._async.write.publisher.aflush(timeout)
        if self._sync is not None and self._sync.write.publisher is not None:
            publisher = self._sync.write.publisher
            left = max(0.0, deadline - time.monotonic())
            flushed = await asyncio.get_running_loop().run_in_executor(None, publisher.flush, left)
            done = flushed and done
        return done

    def close(self, timeout: float = 5.0) -> None:
        """Shut the cache down: wait for the pending background publishes (up to ``timeout``
        seconds; later commits publish synchronously), send what this process's counters
        gained since their last send (see ``stats_interval``; never raising, waiting at most
        the client's socket timeout, not at all while the circuit breaker is open), stop
        sending and probing (a journal the breaker's probe has not replayed yet is dropped,
        as at exit), and close the synchronous clients the cache built: from its URL, and the
        Redis Cluster client it went on through when the server turned out to be a Cluster
        node (a client you passed is yours to close). Once the event loops of AsyncSessions
        it served are over, the ``redis.asyncio`` connections :meth:`aclose` would have closed
        are closed too, without awaiting. The cache is unusable after. An
        interpreter that exits without it does the same (``atexit`` hooks). In asyncio code,
        ``await cache.aclose()``: called on a running event loop once the cache has served
        AsyncSessions, close() raises :class:`ConfigurationError` (it would leave the
        ``redis.asyncio`` connections open)."""
        if (self._sync is None or self._async is not None) and _loop_running():
            # on the loop: the redis.asyncio client (and the connections opened for this
            # loop) can only be closed by awaiting, which close() cannot do here
            raise ConfigurationError(
                "this cache talks to Redis through redis.asyncio (for AsyncSessions): on the "
                "event loop, await cache.aclose()"
            )
        self.flush_publishes(timeout)
        for publisher in self._publishers():
            publisher.close()
        self._leave()
        if self._near is not None:
            self._near.stop()
        if self._shared_stats is not None:
            self._shared_stats.final()
        self._give_back_kept_connections(close=True)
        self._stop_probing()
        self._close_built_sync_clients()
        self._close_async_off_loop()

    def _unwatch_engines(self) -> None:
        """Take the statement listeners off the engines the sessions used, once the cache is
        installed nowhere (an engine may outlive it: a test suite's, one several caches
        share). Not at close(): a session of a factory it is still installed on would then
        change rows no statement lock covers."""
        for flavour in (self._sync, self._async):
            if flavour is not None:
                flavour.write.statements.unwatch()
        self._models.unwatch()

    def _leave(self) -> None:
        """The synchronous backend's last epoch check on a Sentinel-managed pool (see
        :meth:`.ScriptBackend.leave`); once."""
        if self._sync is None or self._left:
            return
        self._left = True
        self._sync.runtime.backend.leave()

    def _give_back_kept_connections(self, close: bool = False) -> None:
        """Return to their pools the connections the synchronous transports keep per thread
        between commands (:class:`~.redis_sync.SyncTransport`); with ``close``, they keep none
        from now on."""
        if self._sync is None:
            return
        for backend in [self._sync.runtime.backend, *self._retired]:
            transport = getattr(backend, "transport", None)
            if isinstance(transport, SyncTransport):
                if close:
                    transport.close()
                else:
                    transport.release_held()

    def _stop_probing(self) -> None:
        """Stop every breaker's prober, whoever built the client: one left running on a client
        the caller passed probed on after close(), and once Redis answered it checked the
        prefix's epoch (writing an epoch and a registry for a prefix the application may have
        deleted since) and replayed the journal. A journal not replayed by close() is dropped,
        as at the process's exit (docs/failures.md)."""
        backends = [f.runtime.backend for f in (self._sync, self._async) if f is not None]
        for backend in [*backends, *self._retired]:
            backend.breaker.stop()

    def _close_built_sync_clients(self) -> None:
        """Close the synchronous clients the cache built: from its URL, and a Redis Cluster
        client it switched to, with the plain client it switched away from when that was the
        URL's (a client the caller passed is theirs to close)."""
        # a synchronous switch to the cluster under way (another thread's get) finishes
        # first, and its cluster client is among those closed; none starts after. Not waited
        # for on an event loop (aclose()): the lock's holder may be an asyncio switch awaiting
        # on this very loop, which would never resume
        locked = self._cluster_lock.acquire(blocking=not _loop_running())
        try:
            self._sync_closed = True
            for client, asynchronous in self._built:
                if not asynchronous:
                    client.close()
        finally:
            if locked:
                self._cluster_lock.release()
        self._built = [(client, True) for client, asynchronous in self._built if asynchronous]

    def _close_async_off_loop(self) -> None:
        """close() once the event loops the cache served are over (a script's second
        ``asyncio.run()``, a test's loop): the ``redis.asyncio`` connections of the client it
        built and those it opened for other loops are closed without awaiting, as
        :meth:`aclose` would have closed them on their loop (else each is collected with a
        ``ResourceWarning``, an error in suites whose warnings are). A connection of a loop
        still running in another thread is left to that loop."""
        if self._async is None:
            return
        for backend in [self._async.runtime.backend, *self._retired]:
            transport = getattr(backend, "transport", None)
            if isinstance(transport, AsyncTransport):
                transport.close_off_loop()
        for client, _ in self._built:  # the asyncio ones left
            close_off_loop(_redis_compat.async_connections(client))

    async def aclose(self, timeout: float = 5.0) -> None:
        """:meth:`close`, on the event loop: the pending background publishes and the last
        stats send are awaited (through ``redis.asyncio`` when the cache has it), and the
        ``redis.asyncio`` client the cache built from its URL is closed too, as are the
        connections the cache opened of its own for the running loop (a client used on more
        than one event loop, docs/asyncio.md)."""
        await self.aflush_publishes(timeout)
        for publisher in self._publishers():
            publisher.close()
        if self._async is not None and not self._left:
            self._left = True
            await _sa_compat.greenlet_spawn(self._async.runtime.backend.leave)
        if self._near is not None:
            # waited for in the loop's executor (a join would block the loop): the thread
            # looks whether it was stopped every 0.1 s, and closes the client it built
            await asyncio.get_running_loop().run_in_executor(None, self._near.stop)
        sender = self._shared_stats
        if sender is not None:
            sender.stop()
            if not self._runtime.backend.breaker.is_open:
                if self._async is None:
                    await sender.asend(None)
                elif (client := self._async_client_here()) is not None:
                    await sender.asend(client)
        if self._async is not None:
            # the connections opened on this loop, by the backend and those a switch replaced;
            # installed nowhere, the cache sends nothing more: a session in flight (made
            # before the uninstall) would open its client's connections again
            closing = self._was_installed and not self._targets
            for backend in [self._async.runtime.backend, *self._retired]:
                transport = getattr(backend, "transport", None)
                if isinstance(transport, _CLOSABLE_TRANSPORTS):
                    transport.closed |= closing
                if isinstance(transport, AsyncTransport):  # (a Cluster client: closed below)
                    await transport.aclose()
        self._stop_probing()
        self._close_built_sync_clients()
        built, self._built = self._built, []
        for client, _ in built:  # the asyncio ones left
            await client.aclose()

    def _clear(self, runtime: Runtime) -> int:
        backend = runtime.backend
        try:
            deleted = backend.delete_matching(prefix_patterns(self.prefix))
        except Exception as exc:
            raise CacheUnavailableError(
                f"clear() of prefix {self.prefix!r} failed at Redis at "
                f"{backend.address}: {explain(exc)}"
            ) from exc
        self._registry_forgotten()
        near = self._near
        if near is not None:
            near.drop_all()
            try:  # every other process's near cache: forget everything
                backend.transport.command("PUBLISH", near.channel, "*")
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "writethrough: clear() could not tell the near caches: %s", explain(exc)
                )
        return deleted

    def _all_keyspaces(
        self, runtime: Runtime, layout: ModelLayout, own: KeySpace | None = None
    ) -> tuple[list[KeySpace], bool]:
        """Every keyspace of a model's table (the registered ones and this process's): every
        database's, or with ``own`` (a bind's keyspace) its database's only; those of other
        versions of the model too (a rolling deploy's, another ``buckets``: see .siblings).
        And whether the registry could be read."""
        if own is None:
            found = {keys.registry_field: keys for keys in list(layout.keyspaces.values())}
            database = None
        else:
            found = {own.registry_field: own}
            database = database_of(keyspace_of(self.prefix, own.registry_field)[1])
        fields = self._whole_registry(runtime)
        for field in fields or ():
            table, digest, keys = keyspace_of(self.prefix, field)
            if (
                table == layout.table.fullname
                and field not in found
                and (database is None or database_of(digest) == database)
            ):
                found[field] = keys
        return list(found.values()), fields is not None

    def _whole_registry(self, runtime: Runtime) -> list[str] | None:
        """:meth:`_read_registry`, made whole first when Redis forgot it (see .siblings): the
        list of every keyspace that may hold entries; None when that could not be had."""
        fields = self._read_registry(runtime)
        if fields is None or REGISTRY_WHOLE in fields:
            return fields
        if not runtime.siblings.make_whole(runtime.backend):
            return None
        return self._read_registry(runtime)

    def _read_registry(self, runtime: Runtime) -> list[str] | None:
        """The keyspace registry's fields (None when Redis failed), read again on the
        cluster when the first read's refusal switched a plain client at a Cluster node to
        it: the first command of a cache can be this read (``invalidate(Model)``, a
        migration)."""
        backend = runtime.backend
        fields = backend.read_registry(registry_key(self.prefix))
        if fields is None and runtime.backend is not backend:
            fields = runtime.backend.read_registry(registry_key(self.prefix))
        return fields

    def stats(self, reset: bool = False) -> CacheStats:
        """What the cache did in this process (hits, misses, fills, publishes, errors,
        latencies...), in total and per model; ``reset`` zeroes the counters."""
        runtime = self._runtime
        return runtime.counters.snapshot(
            reset,
            breaker_open=runtime.backend.breaker.is_open,
            journal_size=len(runtime.journal),
            pending_publishes=self._pending_publishes(),
        )

    def _pending_publishes(self) -> int:
        return sum(publisher.pending for publisher in self._publishers())

    def shared_stats(self) -> CacheStats:
        """What the cache did in every process using this prefix, as far as they have sent it
        to Redis (every ``stats_interval`` seconds; call :meth:`send_stats` first to include
        this process's latest). Raises :class:`CacheUnavailableError` when Redis fails."""
        return self._read_shared(self._runtime_here())[0]

    async def ashared_stats(self) -> CacheStats:
        """:meth:`shared_stats`, awaited on the event loop (through ``redis.asyncio``)."""
        runtime = self._async_flavour().runtime
        found = await _sa_compat.greenlet_spawn(self._read_shared, runtime)
        return found[0]

    def _read_shared(self, runtime: Runtime) -> tuple[CacheStats, list[dict[str, Any]]]:
        transport = runtime.backend.transport
        try:
            return parse_shared(
                transport.command("HGETALL", stats_key(self.prefix)),
                transport.command("HGETALL", processes_key(self.prefix)),
            )
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailableError(
                f"reading the stats of prefix {self.prefix!r} from Redis at "
                f"{runtime.backend.address} failed: {explain(exc)}"
            ) from exc

    def send_stats(self) -> bool:
        """Send this process's counters to Redis now (as the background thread does every
        ``stats_interval`` seconds); False when Redis failed or sending is off. Inside
        SQLAlchemy's greenlet (``run_sync``) it goes through the cache's ``redis.asyncio``
        client, when it has one."""
        sender = self._shared_stats
        if sender is None:
            return False
        if self._async is not None and _sa_compat.in_greenlet():
            client = self._async_client_here()
            if client is None:
                return False
            sent: bool = _sa_compat.await_(sender.asend(client))
            return sent
        return sender.send()

    async def asend_stats(self) -> bool:
        """:meth:`send_stats`, awaited on the event loop (through ``redis.asyncio`` when the
        cache has it; a sync client's send runs in the loop's executor)."""
        sender = self._shared_stats
        if sender is None:
            return False
        if self._async is None:
            return await sender.asend(None)
        client = self._async_client_here()
        return False if client is None else await sender.asend(client)

    def _async_client_here(self) -> Any:
        """The ``redis.asyncio`` client to send the stats through on the running loop, as the
        cache's own calls choose it (the client on its home loop, which the running loop
        becomes once the client's own is closed; the cache's copy on a loop open beside it):
        the client itself would raise on any other loop than its connections'. None where
        there is none (a client the cache cannot copy, on a loop open beside its own): the
        counts wait for the next send."""
        assert self._async is not None
        backend: Any = self._async.runtime.backend
        here = getattr(getattr(backend, "transport", None), "client_here", None)
        if here is None:
            return backend.client
        try:
            return here()
        except (OtherEventLoopError, ClosedCacheError):  # (closed: installed nowhere)
            return None

    @property
    def _tracer(self) -> Any:
        """The OpenTelemetry tracer ``otel.instrument(cache)`` gave the hooks, or None."""
        return self._runtime.tracer

    @_tracer.setter
    def _tracer(self, tracer: Any) -> None:
        self._runtime.tracer = tracer

    def _process_state(self) -> dict[str, Any]:
        runtime = self._runtime
        return {
            "breaker_open": runtime.backend.breaker.is_open,
            "journal_size": len(runtime.journal),
            "pending_publishes": self._pending_publishes(),
        }

    def _breaker_opened(self) -> None:
        self._runtime.counters.add("breaker_openings")

    def models(self, bind: Engine | Connection | Dialect) -> CachedModels:
        """What this cache caches: every model with its keys and effective options, the columns
        whose commits invalidate instead of writing through on ``bind``'s database (an Engine,
        Connection or Dialect), whether its loads are served there and why not (an Engine or
        Connection is asked which tables are views or have row-level security, which have
        triggers that make its commits invalidate, and which triggers name its tables), and
        the models
        ``register_all()`` left out, with why."""
        if isinstance(bind, Engine) and getattr(bind.dialect, "server_version_info", None) is None:
            with bind.connect():  # a first connection tells MariaDB from MySQL, as at a flush
                pass
        dialect: Dialect = bind if isinstance(bind, Dialect) else bind.dialect
        layouts = self._models.cached_layouts()
        self._models.warn_left_out(stacklevel=2)
        secured = {}
        rewritten = {}
        written = {}
        triggered = {}
        if not isinstance(bind, Dialect):  # a database to ask (views, row security, triggers)
            for layout in layouts:
                found = self._models.unserved(layout, bind)
                if found:
                    secured[layout] = found
                found = self._models.rewritten(layout, bind)
                if found:
                    rewritten[layout] = found
                found = self._models.written_by(layout, bind)
                if found:
                    written[layout] = found
                found = self._models.writers_of(layout, bind)
                if found:
                    triggered[layout] = found
        return describe(
            self, layouts, self._models.left_out(), dialect, secured, rewritten, written, triggered
        )

    def __repr__(self) -> str:
        return f"WriteThroughCache(prefix={self.prefix!r})"


class _Flavour(NamedTuple):
    """One flavour's runtime and the hooks installed with it."""

    runtime: Runtime
    read: ReadPath
    write: WritePath


def _check_client(client: Any) -> None:
    """Warn about a client that would make a stalled Redis stall the application."""
    if _redis_compat.connection_kwargs(client).get("socket_timeout") is None:
        log.warning(
            "writethrough: the Redis client has no socket_timeout; a stalled Redis "
            "will stall every cached read and commit (set one, e.g. 0.5 s)"
        )
    sentinels = _redis_compat.sentinel_kwargs(client)
    if sentinels is not None and sentinels.get("socket_timeout") is None:
        log.warning(
            "writethrough: the Sentinel has no socket_timeout; a stalled sentinel will "
            "stall every reconnection and the cache's check of the primary (build it "
            "with Sentinel([...], socket_timeout=0.5))"
        )
    retries = _redis_compat.retries(client)
    if retries > 1:
        log.warning(
            "writethrough: the Redis client retries a failed command %d times; while "
            "Redis is down each cached operation waits that many timeouts before the "
            "circuit breaker opens (use retry=Retry(NoBackoff(), 1))",
            retries,
        )


def _subscriptions(client: Any) -> Subscriptions:
    """Where the near cache's subscriber thread listens for ``client`` (see :mod:`.near`):
    the client itself (a sync standalone or Sentinel one), a synchronous twin of a
    ``redis.asyncio`` one, or one node of a Redis Cluster (either kind) at a time."""
    if isinstance(client, RedisCluster) or _redis_compat.is_async_cluster_client(client):
        return ClusterSubscriptions(
            functools.partial(_redis_compat.cluster_addresses, client),
            _redis_compat.cluster_node_options(client),
        )
    if _redis_compat.is_async_client(client):
        return TwinSubscriptions(functools.partial(_redis_compat.sync_twin, client))
    return Subscriptions(client)


def _made_for_a_factory(cls: type) -> bool:
    """A Session class install() made for a factory (see :mod:`.retiring`): a sessionmaker's
    subclass, or an async factory's ``sync_session_class``."""
    return retiring.MADE_FROM in cls.__dict__ or flavours.made_here(cls)


def _described(target: Any, cls: type | None = None) -> str:
    """An install target in a message: its class's path, or which kind of factory it is (a
    factory's repr lists its whole configuration), with the class its sessions are
    (``cls``). A Session subclass the cache made has its base's name: it says so."""
    if isinstance(target, type):
        return _class_words(target)
    kind = type(target).__name__
    words = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    return words if cls is None else f"{words} of {_class_words(cls)}"


def _class_words(cls: type) -> str:
    path = f"{cls.__module__}.{cls.__qualname__}"
    if "_wt_read" in cls.__dict__ or flavours.made_here(cls):
        return f"the {path} subclass made by a WriteThroughCache"
    return path


#: the asyncio transports ``aclose()`` of a cache installed nowhere closes to calls in flight
#: (see :class:`.redis_async.ClosedCacheError`); ``install()`` opens them again
_CLOSABLE_TRANSPORTS = (AsyncTransport, AsyncClusterTransport)


def _close_quietly(close: Callable[[], Any]) -> None:
    """Close what a closed cache was building (on a failure's path: a get's, whose caller
    goes to the database): closing a connection Redis does not answer may fail too, and must
    not raise out of the get."""
    try:
        close()
    except Exception as exc:
        log.debug("writethrough: closing what a closed cache built: %s", exc)


def _closed_under_way(backend: ScriptBackend) -> bool:
    """Whether ``aclose()`` closed the cache (installed nowhere) while an asyncio call to
    ``backend`` was on its way: it then builds and connects nothing more (see
    :class:`.redis_async.ClosedCacheError`)."""
    return bool(getattr(getattr(backend, "transport", None), "closed", False))


def _check_loop(backend: Any) -> None:
    """A redis.asyncio client whose connections belong to another event loop than the one
    running (or to a closed one) would fail every call: refuse it at install()."""
    client = getattr(backend, "client", None)
    if client is None:
        return
    loops = _redis_compat.bound_loops(client)
    if not loops:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if any(loop.is_closed() for loop in loops) or (running is not None and running not in loops):
        raise ConfigurationError(
            "the redis.asyncio client has connections bound to another event loop than the "
            "one the sessions will run on; build the client (or the cache) inside the loop "
            "that serves the application, e.g. in FastAPI's lifespan (docs/asyncio.md)"
        )


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _sync_bind(bind: Any) -> Any:
    """An AsyncEngine or AsyncConnection names the database of its sync twin."""
    for name in ("sync_engine", "sync_connection"):
        inner = getattr(bind, name, None)
        if inner is not None:
            return inner
    return bind


def _default_stats_interval() -> float | None:
    setting = os.environ.get("SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL", "").strip().lower()
    if not setting:
        return 5.0
    if setting in ("off", "0", "none", "no"):
        return None
    try:
        return float(setting)
    except ValueError:
        raise ConfigurationError(
            f"SQLALCHEMY_WRITETHROUGH_STATS_INTERVAL={setting!r}: give seconds, or off"
        ) from None


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


def _key_values(layout: ModelLayout, mapper: Mapper[Any], values: list[Any]) -> list[Any]:
    """The primary key of an invalidation as its entry's key spells it: a UUID given as text,
    an ``IntEnum`` member or a ``str`` subclass's value are what the database compares; any
    other value of another type than the column's would name a key no entry has (the call
    would report success and leave the row cached), so it is refused."""
    if layout.pk_is_cacheable(values):
        return values
    out = []
    for value, kind in zip(values, layout.pk_types, strict=True):
        try:
            if fits_key(value, kind):
                pass
            elif isinstance(kind, DecoratedKey):
                # what a load of the row holds: a UUID given as text for a GUID column
                found = kind.key_of(value)
                if found is None:
                    raise ValueError(value)
                value = found
            elif kind is uuid.UUID and isinstance(value, str):
                value = uuid.UUID(value)
            elif kind is int and isinstance(value, int):
                value = int(value)  # an IntEnum member, True
            elif kind is str and isinstance(value, str):
                value = str.__str__(value)
            else:
                raise ValueError(value)
        except ValueError:
            raise ConfigurationError(
                f"{mapper.class_.__name__}: {value!r} is not a primary key value of the "
                f"column's type ({kind.__name__})"
            ) from None
        out.append(value)
    return out


def _on_mapper_configured(mapper: Mapper[Any], cls: type) -> None:
    """Validate cached models when SQLAlchemy configures them, so errors are loud and early."""
    caches = list(_caches)
    for cache in caches:
        cache._models.reconfigured(mapper)
    if not caches and is_cached_model(cls):
        # no cache exists yet: check what can be checked with the default options
        defaults = ModelOptions(
            3600.0, frozenset(), "write-through", 30.0, "degrade", (), "sync", near_cache=False
        )
        ModelLayout(mapper, defaults.merged(model_overrides(cls), where=cls.__name__), "wt", 1)


def _on_after_configured() -> None:
    """Warn about the models left out while the mappers were configured."""
    for cache in list(_caches):
        cache._models.warn_left_out()


def _on_class_uninstrument(cls: type) -> None:
    """A mapped class is being disposed of: no cache may keep it (see ``Models.disposed``)."""
    for cache in list(_caches):
        cache._models.disposed(cls)
    _sa_compat.forget_load_statements(cls)


event.listen(Mapper, "mapper_configured", _on_mapper_configured)
event.listen(Mapper, "after_configured", _on_after_configured)
# every class SQLAlchemy uninstruments: InstrumentationEvents take a base class, propagating
event.listen(object, "class_uninstrument", _on_class_uninstrument)


def _at_exit() -> None:
    """At interpreter exit, what close() would do for every cache: land the pending background
    publishes first, so that the last stats send counts them; and leave a Sentinel-managed
    pool's primary as close() does."""
    background.wait_at_exit()
    for cache in list(_caches):
        try:
            cache._leave()
        except Exception:  # never fail an exit
            log.debug("writethrough: leaving failed", exc_info=True)
    shared.send_at_exit()


atexit.register(_at_exit)

__all__ = ["CachedModel", "WriteThroughCache"]
