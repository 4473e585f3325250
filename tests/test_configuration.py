"""Configuration: which models are cached and how, loud failures, installing, invalidating, stats.

* ``CachedModel`` and per-model ``__writethrough__`` options (ttl, exclude, strategy);
  ``cache.register()``, ``cache.register_all(Base)`` and ``cache.register_all()``; models that
  are not covered are never cached.
* Wrong configuration fails when the mapper is configured (or at ``register()``), with a
  ConfigurationError whose message says what to do.
* ``install()`` targets, ``uninstall()``, two caches with different prefixes, client timeouts.
* ``cache.invalidate()`` of one row and of a whole model (also while Redis is unreachable),
  ``cache.stats()``, TTLs of entries and generation keys.
"""

from __future__ import annotations

import datetime
import gc
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _proxy import LoopbackProxy, upstream_of
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    registry,
    scoped_session,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache

from _cache_helpers import cached_values, entry_key, entry_state, prefix_keys
from _servers import COUNTED, capture_sql, counting_redis, delete_prefix, new_prefix, reset_schema

LOG_NAME = "sqlalchemy_writethrough"


class Base(DeclarativeBase):
    pass


class CfWidget(Base, CachedModel):
    """Cached with the cache's defaults."""

    __tablename__ = "cf_widget"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class CfShortLived(Base, CachedModel):
    __tablename__ = "cf_short_lived"
    __writethrough__ = {"ttl": 600}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class CfSecretive(Base, CachedModel):
    __tablename__ = "cf_secretive"
    __writethrough__ = {"exclude": ["secret"]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    secret: Mapped[str] = mapped_column(String(50))


class CfBusy(Base, CachedModel):
    __tablename__ = "cf_busy"
    __writethrough__ = {"strategy": "invalidate"}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class CfThirdParty(Base):
    """A model we cannot give the mixin: cached only when registered."""

    __tablename__ = "cf_third_party"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class CfPlain(Base):
    """Never covered by the module's caches, except by ``register_all()``."""

    __tablename__ = "cf_plain"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


# ------------------------------------------------------------------------------ helpers


_clients: list[redis.Redis] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the Redis clients of the caches ``make_cache`` built during the test."""
    yield
    while _clients:
        _clients.pop().close()


def _collect() -> None:
    """Free unreferenced caches now: every live cache validates each mapper SQLAlchemy
    configures, and a cache is freed only by the garbage collector (reference cycles)."""
    gc.collect()
    gc.collect()  # a class freed in the first pass releases its event listeners in the second


Installer = Callable[[WriteThroughCache, Any], None]


@pytest.fixture
def install() -> Iterator[Installer]:
    """``cache.install(target)``, undone at teardown: an installed cache is never freed
    otherwise (see test_a_discarded_cache_stops_judging_new_mappers), and would go on judging
    every mapper configured later in the test session."""
    done: list[tuple[WriteThroughCache, Any]] = []

    def _install(cache: WriteThroughCache, target: Any) -> None:
        cache.install(target)
        done.append((cache, target))

    yield _install
    for cache, target in reversed(done):
        cache.uninstall(target)


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def make_cache(redis_url: str, prefix: str, **options: Any) -> WriteThroughCache:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    _clients.append(client)
    return WriteThroughCache(client, prefix=prefix, **options)


def add(factory: Callable[[], Session], *objects: Any) -> None:
    with factory() as session:
        session.add_all(objects)
        session.commit()


def load(factory: Callable[[], Session], model: type, pk: Any) -> Any:
    """``session.get`` in a fresh session; returns the instance's column values."""
    with factory() as session:
        obj = session.get(model, pk)
        assert obj is not None
        return {c.key: getattr(obj, c.key) for c in sa.inspect(model).column_attrs}


def sql_of_get(engine: Engine, factory: Callable[[], Session], model: type, pk: Any) -> int:
    """Number of SQL statements one ``session.get`` in a fresh session emitted."""
    with capture_sql(engine) as sql:
        load(factory, model, pk)
    return len(sql)


def entity_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    """Entity keys under ``prefix``: ``{prefix}:{<hash tag>}:<primary key>``."""
    shape = re.compile(re.escape(prefix.encode()) + rb":\{[^}]*\}:.+")
    return [k for k in prefix_keys(client, prefix) if shape.fullmatch(k)]


def generation_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    """Generation keys under ``prefix``: ``{prefix}:{<hash tag>}``."""
    shape = re.compile(re.escape(prefix.encode()) + rb":\{[^}]*\}")
    return [k for k in prefix_keys(client, prefix) if shape.fullmatch(k)]


def dispose(reg: registry) -> None:
    reg.dispose()
    _collect()


# --------------------------------------------------------------- which models are cached


def test_mixin_marks_a_model_and_unmarked_models_are_never_cached(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """A CachedModel is written to Redis at commit and served without SQL; a model with
    neither the mixin nor a registration leaves no key and costs SQL on every get."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="w"), CfPlain(id=1, name="p"))

    assert entry_state(redis_client, entry_key(cache, CfWidget, 1)) == "value"
    assert sql_of_get(schema, factory, CfWidget, 1) == 0
    assert load(factory, CfWidget, 1) == {"id": 1, "name": "w"}

    assert cache._layout_for(sa.inspect(CfPlain)) is None
    assert sql_of_get(schema, factory, CfPlain, 1) == 1
    assert sql_of_get(schema, factory, CfPlain, 1) == 1
    assert all(b"cf_plain" not in key for key in prefix_keys(redis_client, prefix))
    assert len(entity_keys(redis_client, prefix)) == 1


def _assert_pttl_within(client: redis.Redis, key: str, ttl_s: float, jitter: float) -> None:
    pttl = client.pttl(key)
    slack_ms = 5_000
    assert ttl_s * 1000 * (1 - jitter) - slack_ms <= pttl <= ttl_s * 1000, pttl


def test_per_model_ttl(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``__writethrough__ = {"ttl": 600}`` gives that model's entries a 600 s TTL minus at
    most the jitter, on publish and on fill; other models keep the cache's ttl."""
    cache = make_cache(redis_url, prefix, ttl=3600, ttl_jitter=0.1)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfShortLived(id=1, name="s"), CfWidget(id=1, name="w"))

    short_key = entry_key(cache, CfShortLived, 1)
    assert entry_state(redis_client, short_key) == "value"
    _assert_pttl_within(redis_client, short_key, 600, 0.1)
    _assert_pttl_within(redis_client, entry_key(cache, CfWidget, 1), 3600, 0.1)

    assert cache.invalidate(CfShortLived, 1)
    assert sql_of_get(schema, factory, CfShortLived, 1) == 1  # miss, then fill
    assert entry_state(redis_client, short_key) == "value"
    _assert_pttl_within(redis_client, short_key, 600, 0.1)


def test_per_model_exclude(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """An excluded attribute is never written to Redis; a cached instance loads it from the
    database on access, with the right value."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfSecretive(id=1, name="n", secret="hunter2"))

    held = cached_values(cache, redis_client, CfSecretive, 1, dialect=schema.dialect)
    assert held == {"id": 1, "name": "n"}
    raw = redis_client.get(entry_key(cache, CfSecretive, 1))
    assert raw is not None and b"hunter2" not in raw

    with factory() as session:
        with capture_sql(schema) as sql:
            obj = session.get(CfSecretive, 1)
            assert obj is not None and obj.name == "n"
        assert sql == []
        with capture_sql(schema) as sql:
            assert obj.secret == "hunter2"
        assert len(sql) == 1


def test_per_model_strategy_invalidate(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``strategy: "invalidate"`` leaves a miss at commit instead of the new row (the next read
    fills); a write-through model in the same commit is published."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfBusy(id=1, name="b1"), CfWidget(id=1, name="w1"))

    busy_key = entry_key(cache, CfBusy, 1)
    assert entry_state(redis_client, busy_key) is None
    assert entry_state(redis_client, entry_key(cache, CfWidget, 1)) == "value"
    assert cache.stats().publishes == 1

    assert sql_of_get(schema, factory, CfBusy, 1) == 1
    assert entry_state(redis_client, busy_key) == "value"
    assert sql_of_get(schema, factory, CfBusy, 1) == 0

    with factory() as session:
        obj = session.get(CfBusy, 1)
        assert obj is not None
        obj.name = "b2"
        session.commit()
    assert entry_state(redis_client, busy_key) is None
    assert load(factory, CfBusy, 1)["name"] == "b2"


def test_register_caches_a_model_without_the_mixin(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``cache.register(Model, ttl=600)``: a model without the mixin is cached with that ttl;
    an unregistered one next to it is not."""
    cache = make_cache(redis_url, prefix, ttl=3600)
    cache.register(CfThirdParty, ttl=600)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfThirdParty(id=1, name="t"), CfPlain(id=1, name="p"))

    key = entry_key(cache, CfThirdParty, 1)
    assert entry_state(redis_client, key) == "value"
    _assert_pttl_within(redis_client, key, 600, 0.1)
    assert sql_of_get(schema, factory, CfThirdParty, 1) == 0
    assert sql_of_get(schema, factory, CfPlain, 1) == 1
    assert len(entity_keys(redis_client, prefix)) == 1


def test_register_before_the_mapper_is_configured(
    engine: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``register()`` of a class whose mapper is not configured yet takes effect when it is."""

    class LocalBase(DeclarativeBase):
        pass

    class CfEarly(LocalBase):
        __tablename__ = "cf_early"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(50))

    try:
        assert not sa.inspect(CfEarly).configured
        cache = make_cache(redis_url, prefix)
        cache.register(CfEarly)
        reset_schema(engine, LocalBase.metadata)
        factory = sessionmaker(engine)
        install(cache, factory)
        add(factory, CfEarly(id=1, name="e"))
        assert entry_state(redis_client, entry_key(cache, CfEarly, 1)) == "value"
        assert sql_of_get(engine, factory, CfEarly, 1) == 0
    finally:
        dispose(LocalBase.registry)


def test_register_all_under_a_base_covers_later_classes(
    engine: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``register_all(Base)`` caches every class of that base, including classes mapped after
    the call; classes of another base stay uncached."""

    class LocalBase(DeclarativeBase):
        pass

    class CfBefore(LocalBase):
        __tablename__ = "cf_before"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(50))

    try:
        LocalBase.registry.configure()
        cache = make_cache(redis_url, prefix)
        cache.register_all(LocalBase)

        class CfAfter(LocalBase):
            __tablename__ = "cf_after"

            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            name: Mapped[str] = mapped_column(String(50))

        reset_schema(engine, LocalBase.metadata)
        reset_schema(engine, Base.metadata)
        factory = sessionmaker(engine)
        install(cache, factory)
        add(factory, CfBefore(id=1, name="b"), CfAfter(id=1, name="a"), CfPlain(id=1, name="p"))

        for model in (CfBefore, CfAfter):
            assert entry_state(redis_client, entry_key(cache, model, 1)) == "value"
            assert sql_of_get(engine, factory, model, 1) == 0
        assert sql_of_get(engine, factory, CfPlain, 1) == 1
        assert len(entity_keys(redis_client, prefix)) == 2
    finally:
        dispose(LocalBase.registry)


def test_register_all_without_argument_covers_every_mapped_class(
    engine: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``register_all()`` caches every mapped class, here a plain model of this module and one
    of a base created after the call."""
    cache = make_cache(redis_url, prefix)
    cache.register_all()

    class LocalBase(DeclarativeBase):
        pass

    class CfAnywhere(LocalBase):
        __tablename__ = "cf_anywhere"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(50))

    try:
        reset_schema(engine, LocalBase.metadata)
        reset_schema(engine, Base.metadata)
        factory = sessionmaker(engine)
        install(cache, factory)
        add(factory, CfAnywhere(id=1, name="a"), CfPlain(id=1, name="p"))
        for model in (CfAnywhere, CfPlain):
            assert entry_state(redis_client, entry_key(cache, model, 1)) == "value"
            assert sql_of_get(engine, factory, model, 1) == 0
    finally:
        del cache  # a register_all() cache would judge every model configured later
        dispose(LocalBase.registry)


def test_cache_wide_exclude_applies_to_models_that_have_the_attribute(
    engine: Engine, prefix: str, redis_client: redis.Redis, redis_url: str, install: Installer
) -> None:
    """``WriteThroughCache(exclude=[...])`` names attributes never written to Redis "in any
    model": a model with such an attribute leaves it out (also when it has its own ``exclude``,
    which adds to the cache-wide one), and a model without it is cached normally (the option
    is not a per-model ``exclude`` naming an unknown attribute)."""
    cache = make_cache(redis_url, prefix, exclude=["notes"])

    class LocalBase(DeclarativeBase):
        pass

    class CfWithNotes(LocalBase, CachedModel):
        __tablename__ = "cf_with_notes"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        notes: Mapped[str] = mapped_column(String(50))

    class CfWithBoth(LocalBase, CachedModel):
        __tablename__ = "cf_with_both"
        __writethrough__ = {"exclude": ["secret"]}

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        notes: Mapped[str] = mapped_column(String(50))
        secret: Mapped[str] = mapped_column(String(50))

    class CfWithoutNotes(LocalBase, CachedModel):
        __tablename__ = "cf_without_notes"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(50))

    try:
        LocalBase.registry.configure()
        reset_schema(engine, LocalBase.metadata)
        factory = sessionmaker(engine)
        install(cache, factory)
        add(
            factory,
            CfWithNotes(id=1, notes="private"),
            CfWithBoth(id=1, notes="private", secret="s"),
            CfWithoutNotes(id=1, name="n"),
        )
        dialect = engine.dialect
        assert cached_values(cache, redis_client, CfWithNotes, 1, dialect=dialect) == {"id": 1}
        assert cached_values(cache, redis_client, CfWithBoth, 1, dialect=dialect) == {"id": 1}
        held = cached_values(cache, redis_client, CfWithoutNotes, 1, dialect=dialect)
        assert held == {"id": 1, "name": "n"}
    finally:
        del cache  # it would reject every CachedModel configured later without `notes`
        dispose(LocalBase.registry)


# ------------------------------------------------------------- wrong configuration is loud


def _model(
    base: type[DeclarativeBase], kind: str, options: dict[str, Any] | None, mixin: bool
) -> type:
    """Map one class of ``kind`` on ``base``; ``options`` become its ``__writethrough__``."""
    bases: tuple[type, ...] = (base, CachedModel) if mixin else (base,)
    ns: dict[str, Any] = {"__tablename__": f"cf_bad_{kind}"}
    if mixin and options is not None:
        ns["__writethrough__"] = options
    if kind == "date_pk":
        ns["__annotations__"] = {"day": Mapped[datetime.date]}
        ns["day"] = mapped_column(primary_key=True)
    else:
        ns["__annotations__"] = {"id": Mapped[int], "name": Mapped[str]}
        ns["id"] = mapped_column(primary_key=True)
        ns["name"] = mapped_column(String(50))
    if kind == "pickle":
        ns["blob"] = mapped_column(sa.PickleType)
    if kind == "single_table":
        ns["__annotations__"]["kind"] = Mapped[str]
        ns["kind"] = mapped_column(String(20))
        ns["__mapper_args__"] = {"polymorphic_on": "kind", "polymorphic_identity": "parent"}
    cls = type(f"CfBad_{kind}", bases, ns)
    if kind == "single_table":
        type("CfBadChild", (cls,), {"__mapper_args__": {"polymorphic_identity": "child"}})
    return cls


#: (case id, model kind, options, what the message must say)
BAD_MODELS = [
    ("unknown-option", "plain", {"tll": 60}, r"unknown option\(s\) \['tll'\].*valid per-model"),
    ("pickle-column", "pickle", {}, r"PickleType.*`exclude`"),
    ("date-primary-key", "date_pk", {}, r"primary keys of type Date.*integer, string and UUID"),
    ("exclude-primary-key", "plain", {"exclude": ["id"]}, r"primary key column cannot be excl"),
    ("exclude-unknown", "plain", {"exclude": ["nope"]}, r"exclude names unknown.*\['nope'\]"),
    ("exclude-as-string", "plain", {"exclude": "name"}, r"exclude takes a list"),
    ("negative-ttl", "plain", {"ttl": -1}, r"ttl must be a positive number"),
    ("zero-lock-timeout", "plain", {"lock_timeout": 0}, r"lock_timeout must be a positive"),
    ("bad-strategy", "plain", {"strategy": "write-back"}, r"strategy must be one of"),
    ("bad-on-redis-error", "plain", {"on_redis_error": "ignore"}, r"on_redis_error must be one"),
]
_OPTION_CASES = {"unknown-option", "exclude-as-string", "negative-ttl", "zero-lock-timeout",
                 "bad-strategy", "bad-on-redis-error"}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "kind", "options", "message"), BAD_MODELS, ids=[c[0] for c in BAD_MODELS]
)
def test_bad_cached_model_fails_when_the_mapper_is_configured(
    case: str, kind: str, options: dict[str, Any], message: str, redis_url: str, prefix: str
) -> None:
    """A CachedModel the cache cannot keep exact raises ConfigurationError, with a message
    saying what to do, when SQLAlchemy configures its mapper."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        model = _model(LocalBase, kind, options, mixin=True)  # referenced: see above
        with pytest.raises(ConfigurationError, match=message):
            LocalBase.registry.configure()
        del model
    finally:
        del cache
        dispose(LocalBase.registry)


@pytest.mark.parametrize("configured", [True, False], ids=["configured", "unconfigured"])
@pytest.mark.parametrize(
    ("case", "kind", "options", "message"), BAD_MODELS, ids=[c[0] for c in BAD_MODELS]
)
def test_bad_registered_model_fails_at_register_or_configuration(
    case: str,
    kind: str,
    options: dict[str, Any],
    message: str,
    configured: bool,
    redis_url: str,
    prefix: str,
) -> None:
    """The same mistakes through ``cache.register(Model, **options)``: bad options raise at
    ``register()``; a model the cache cannot keep raises at ``register()`` when its mapper is
    already configured, else when it gets configured."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        model = _model(LocalBase, kind, None, mixin=False)
        if configured:
            LocalBase.registry.configure()
        if configured or case in _OPTION_CASES:
            with pytest.raises(ConfigurationError, match=message):
                cache.register(model, **options)
        else:
            cache.register(model, **options)
            with pytest.raises(ConfigurationError, match=message):
                LocalBase.registry.configure()
    finally:
        del cache
        dispose(LocalBase.registry)


def test_configure_mappers_raises_our_configuration_error(redis_url: str, prefix: str) -> None:
    """What the user sees from ``configure_mappers()`` (and from the first use of the class,
    which configures it) is our ConfigurationError itself, not wrapped by SQLAlchemy, so the
    hint reaches them. The same model with the column excluded configures fine."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        # keep the class referenced: registries hold mapped classes weakly, and a collected
        # class leaves nothing for configure_mappers() to configure
        model = _model(LocalBase, "pickle", {}, mixin=True)
        with pytest.raises(ConfigurationError) as caught:
            sa.orm.configure_mappers()
        assert type(caught.value) is ConfigurationError
        assert "CfBad_pickle.blob" in str(caught.value)
        assert "exclude" in str(caught.value)
        del model
    finally:
        dispose(LocalBase.registry)

    class OtherBase(DeclarativeBase):
        pass

    try:
        model = _model(OtherBase, "pickle", {}, mixin=True)
        with pytest.raises(ConfigurationError, match="exclude"):
            sa.inspect(model).attrs  # noqa: B018 - first use configures the mapper
    finally:
        dispose(OtherBase.registry)

    class GoodBase(DeclarativeBase):
        pass

    try:
        model = _model(GoodBase, "pickle", {"exclude": ["blob"]}, mixin=True)
        GoodBase.registry.configure()
        assert cache._layout_for(sa.inspect(model)) is not None
    finally:
        del cache
        dispose(GoodBase.registry)


def test_a_cached_model_is_checked_even_before_any_cache_exists() -> None:
    """With no WriteThroughCache alive, a CachedModel is checked with the default options."""
    _collect()

    class LocalBase(DeclarativeBase):
        pass

    try:
        model = _model(LocalBase, "date_pk", {}, mixin=True)  # referenced: see above
        with pytest.raises(ConfigurationError, match="primary keys of type Date"):
            LocalBase.registry.configure()
        del model
    finally:
        dispose(LocalBase.registry)


def test_a_discarded_cache_stops_judging_new_mappers(redis_url: str, prefix: str) -> None:
    """A program that built a ``register_all()`` cache, installed it and dropped it (no
    reference left, no ``uninstall()``) must not have that cache reject models configured
    afterwards: it must be freed, like the sessionmaker it was installed on."""
    cache = make_cache(redis_url, prefix)
    cache.register_all()
    factory: sessionmaker[Session] = sessionmaker()
    cache.install(factory)
    cache_ref, factory_ref = weakref.ref(cache), weakref.ref(factory)
    del cache, factory
    _collect()

    class LocalBase(DeclarativeBase):
        pass

    try:
        model = _model(LocalBase, "pickle", None, mixin=False)  # never meant to be cached
        LocalBase.registry.configure()
        del model
        assert cache_ref() is None, "the discarded cache is still alive"
        assert factory_ref() is None, "the sessionmaker it was installed on is still alive"
    finally:
        leaked, leaked_factory = cache_ref(), factory_ref()
        if leaked is not None and leaked_factory is not None:
            leaked.uninstall(leaked_factory)  # keep the leak out of the tests that follow
        del leaked, leaked_factory
        dispose(LocalBase.registry)


BAD_CACHE_OPTIONS = [
    ("prefix-brace", {"prefix": "shop{1}"}, r"prefix.*without braces"),
    ("prefix-closing-brace", {"prefix": "shop}"}, r"prefix.*without braces"),
    ("prefix-space", {"prefix": "my shop"}, r"prefix.*whitespace"),
    ("prefix-empty", {"prefix": ""}, r"prefix must be non-empty"),
    ("negative-ttl", {"ttl": -5}, r"ttl must be a positive"),
    ("bad-strategy", {"strategy": "lazy"}, r"strategy must be one of"),
    ("bad-on-redis-error", {"on_redis_error": "raise"}, r"on_redis_error must be one of"),
    ("jitter-one", {"ttl_jitter": 1.0}, r"ttl_jitter"),
    ("zero-buckets", {"buckets": 0}, r"buckets"),
    ("zero-lease", {"lease_timeout": 0}, r"lease_timeout"),
    ("exclude-as-string", {"exclude": "notes"}, r"exclude takes a list"),
]


@pytest.mark.parametrize(
    ("options", "message"),
    [c[1:] for c in BAD_CACHE_OPTIONS],
    ids=[c[0] for c in BAD_CACHE_OPTIONS],
)
def test_bad_cache_options_raise_at_construction(
    options: dict[str, Any], message: str, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    options = {"prefix": "cf-ok", **options}
    with pytest.raises(ConfigurationError, match=message):
        WriteThroughCache(client, **options)
    client.close()


def test_register_rejects_what_is_not_a_mapped_class(redis_url: str, prefix: str) -> None:
    cache = make_cache(redis_url, prefix)
    with pytest.raises(ConfigurationError, match="not a mapped class"):
        cache.register(int)
    with pytest.raises(ConfigurationError, match="register_all"):
        cache.register_all(object())


# ----------------------------------------------------------------------------- install


def _factory_kinds() -> list[str]:
    return ["sessionmaker", "scoped_session", "session_subclass"]


@pytest.mark.parametrize("kind", _factory_kinds())
def test_install_targets(
    kind: str, schema: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """``install()`` on a sessionmaker, a scoped_session or a Session subclass: sessions they
    make publish at commit and are served from Redis."""
    cache = make_cache(redis_url, prefix)
    make: Callable[[], Session]
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if kind == "sessionmaker":
        target: Any = sessionmaker(schema)
        make = target
    elif kind == "scoped_session":
        target = scoped_session(sessionmaker(schema))
        cleanup = target.remove

        def make() -> Session:
            target.remove()
            return target()  # type: ignore[no-any-return]

    else:

        class CfSession(Session):
            pass

        target = CfSession

        def make() -> Session:
            return CfSession(schema)

    cache.install(target)
    try:
        add(make, CfWidget(id=1, name="w"))
        assert entry_state(redis_client, entry_key(cache, CfWidget, 1)) == "value"
        assert sql_of_get(schema, make, CfWidget, 1) == 0
        assert cache.stats().hits == 1
    finally:
        cache.uninstall(target)
        cleanup()


def test_install_on_a_session_instance_raises(schema: Engine, redis_url: str, prefix: str) -> None:
    cache = make_cache(redis_url, prefix)
    with Session(schema) as session, pytest.raises(ConfigurationError, match="sessionmaker"):
        cache.install(session)


def test_uninstall_stops_caching(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """After ``uninstall()`` sessions of that factory neither read nor write Redis."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="w1"))
    assert sql_of_get(schema, factory, CfWidget, 1) == 0

    cache.uninstall(factory)
    cache.stats(reset=True)
    keys_before = prefix_keys(redis_client, prefix)
    with factory() as session:
        obj = session.get(CfWidget, 1)
        assert obj is not None
        obj.name = "w2"
        session.add(CfWidget(id=2, name="new"))
        session.commit()
    assert sql_of_get(schema, factory, CfWidget, 1) == 1
    assert load(factory, CfWidget, 1)["name"] == "w2"
    assert sql_of_get(schema, factory, CfWidget, 2) == 1
    assert prefix_keys(redis_client, prefix) == keys_before
    assert cache.stats() == type(cache.stats())()


def test_an_engine_that_outlives_its_caches_keeps_none_of_them(
    schema: Engine, redis_url: str, prefix: str
) -> None:
    """A test suite's engine outlives the cache of each test: every cache used to leave a
    ``before_cursor_execute`` listener on it, run for every later statement, holding the
    cache (its models, their mappers) alive. The cache adds no listener to an engine (its
    statements reach the caches through one on the ``Engine`` class: test_engine_listeners),
    and what watches the engine holds the cache weakly: an uninstalled cache is collected
    (once the sessions made before its uninstall() are: their class keeps its listeners, off,
    see test_uninstall_while_other_threads_run_sessions_never_raises)."""
    listeners = (schema.dispatch.before_cursor_execute, schema.dispatch.engine_disposed)
    baseline = [len(each) for each in listeners]
    caches = []
    for n in range(3):
        cache = make_cache(redis_url, f"{prefix}-{n}")
        factory = sessionmaker(schema)
        cache.install(factory)
        add(factory, CfWidget(id=10 + n, name="w"))
        with factory() as session:
            assert session.get(CfWidget, 10 + n) is not None  # a load: the dispose watched
        assert [len(each) for each in listeners] == baseline
        cache.uninstall(factory)
        caches.append(weakref.ref(cache))
        del cache, factory, session
    gc.collect()
    gc.collect()  # a class collected drops its listeners' deque in a weakref callback
    assert [ref() for ref in caches] == [None, None, None]


def test_uninstall_after_the_listeners_were_removed_elsewhere(
    schema: Engine, redis_url: str, prefix: str
) -> None:
    """Test harnesses clear a target's listeners themselves (SQLAlchemy's own suite clears
    every SessionEvents listener): ``uninstall()`` then removes what is left, no error."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    cache.install(factory)
    # the listeners are on the factory's class (as SQLAlchemy puts a factory's)
    sa.event.remove(factory.class_, "do_orm_execute", cache._read.on_execute)
    cache.uninstall(factory)
    assert not sa.event.contains(factory.class_, "before_flush", cache._write.before_flush)
    cache.install(factory)  # and it can come back
    cache.uninstall(factory)


@pytest.mark.parametrize("order", ["session_first", "factory_first", "factory_twice"])
def test_installing_twice_over_one_family_of_sessions_raises(
    order: str, schema: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """SQLAlchemy runs a Session class's listeners for its subclasses: installed on
    ``Session`` and on a sessionmaker (either order), or on one factory twice, every commit
    of the factory's sessions went through the cache twice, the second pass taking the
    first's lock for a concurrent writer's and invalidating instead of publishing (the next
    get went to the database). The second install() now says so, and the first keeps
    working: a commit publishes, the next get sends no SQL."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    first, second = {
        "session_first": (Session, factory),
        "factory_first": (factory, Session),
        "factory_twice": (factory, factory),
    }[order]
    cache.install(first)
    try:
        with pytest.raises(ConfigurationError, match="through the cache twice"):
            cache.install(second)
        add(factory, CfWidget(id=1, name="w"))
        assert entry_state(redis_client, entry_key(cache, CfWidget, 1)) == "value"
        assert sql_of_get(schema, factory, CfWidget, 1) == 0
        assert cache.stats().commits == 1
    finally:
        cache.uninstall(first)
    cache.install(second)  # once uninstalled, the other one may have it
    cache.uninstall(second)


def test_uninstalling_another_wrapper_of_the_factory_keeps_the_refusal(
    schema: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """``uninstall()`` removes what ``install()`` added to that very target: installed on a
    scoped_session, an uninstall of its sessionmaker removes nothing, so the sessionmaker is
    still covered and a second install() on it is still refused (it was let through, and ran
    every hook twice)."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    scoped = scoped_session(factory)
    cache.install(scoped)
    try:
        cache.uninstall(factory)
        with pytest.raises(ConfigurationError, match="through the cache twice"):
            cache.install(factory)
        scoped.remove()
        add(factory, CfWidget(id=1, name="w"))
        assert sql_of_get(schema, factory, CfWidget, 1) == 0
        assert cache.stats().commits == 1
    finally:
        scoped.remove()
        cache.uninstall(scoped)


def test_two_caches_on_one_factory_uninstall_and_install_again(
    schema: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """With a second cache installed on the same sessionmaker (whose class it replaced with a
    subclass of its own), the first cache's uninstall() left its listeners on the class it
    had installed them on (SQLAlchemy resolved the factory to its current class), so a new
    install() made it run twice. Now each commit goes through each cache once."""
    other_prefix = new_prefix()
    first, second = make_cache(redis_url, prefix), make_cache(redis_url, other_prefix)
    factory = sessionmaker(schema)
    first.install(factory)
    second.install(factory)
    try:
        first.uninstall(factory)
        add(factory, CfWidget(id=1, name="w"))
        assert (first.stats().commits, second.stats().commits) == (0, 1)
        first.install(factory)
        add(factory, CfWidget(id=2, name="w"))
        assert (first.stats().commits, second.stats().commits) == (1, 2)
        assert entry_state(redis_client, entry_key(first, CfWidget, 2)) == "value"
    finally:
        first.uninstall(factory)
        second.uninstall(factory)
        delete_prefix(redis_client, other_prefix)


def test_sibling_factories_share_one_cache(
    schema: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """Two sessionmakers of plain ``Session`` get a subclass each, siblings: both install."""
    cache = make_cache(redis_url, prefix)
    one, two = sessionmaker(schema), sessionmaker(schema)
    cache.install(one)
    cache.install(two)
    try:
        add(one, CfWidget(id=1, name="w"))
        assert sql_of_get(schema, two, CfWidget, 1) == 0
        assert cache.stats().commits == 1
    finally:
        cache.uninstall(one)
        cache.uninstall(two)


# ---------------------------------------------------------------- two caches, timeouts


def test_two_caches_with_different_prefixes_do_not_interfere(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """Two caches on the same models and engine, with different prefixes: each keeps its own
    keys, generations and counters; invalidating one leaves the other's entries alone."""
    other_prefix = new_prefix()
    try:
        cache_a = make_cache(redis_url, prefix)
        cache_b = make_cache(redis_url, other_prefix)
        factory_a = sessionmaker(schema)
        factory_b = sessionmaker(schema)
        install(cache_a, factory_a)
        install(cache_b, factory_b)

        add(factory_a, CfWidget(id=1, name="w1"), CfWidget(id=2, name="w2"))
        assert entry_state(redis_client, entry_key(cache_a, CfWidget, 1)) == "value"
        assert entity_keys(redis_client, other_prefix) == []
        assert entry_key(cache_a, CfWidget, 1) != entry_key(cache_b, CfWidget, 1)

        assert sql_of_get(schema, factory_b, CfWidget, 1) == 1  # B fills its own entry
        assert sql_of_get(schema, factory_b, CfWidget, 1) == 0
        assert sql_of_get(schema, factory_a, CfWidget, 1) == 0

        assert cache_a.invalidate(CfWidget)  # whole model, in A only
        assert sql_of_get(schema, factory_b, CfWidget, 1) == 0
        assert sql_of_get(schema, factory_a, CfWidget, 1) == 1
        assert cache_b.invalidate(CfWidget, 1)
        assert entry_state(redis_client, entry_key(cache_b, CfWidget, 1)) is None
        assert entry_state(redis_client, entry_key(cache_a, CfWidget, 1)) == "value"

        stats_a, stats_b = cache_a.stats(), cache_b.stats()
        assert (stats_a.publishes, stats_a.hits, stats_a.fills) == (2, 1, 1)
        assert (stats_b.publishes, stats_b.hits, stats_b.fills) == (0, 2, 1)
        assert all(k.startswith(f"{prefix}:".encode()) for k in prefix_keys(redis_client, prefix))
    finally:
        delete_prefix(redis_client, other_prefix)


def test_both_caches_on_one_factory_are_both_kept_current(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """Two caches installed on the same sessionmaker: a commit publishes to both."""
    other_prefix = new_prefix()
    try:
        cache_a = make_cache(redis_url, prefix)
        cache_b = make_cache(redis_url, other_prefix)
        factory = sessionmaker(schema)
        install(cache_a, factory)
        install(cache_b, factory)
        add(factory, CfWidget(id=1, name="w1"))
        with factory() as session:
            obj = session.get(CfWidget, 1)
            assert obj is not None
            obj.name = "w2"
            session.commit()
        for cache in (cache_a, cache_b):
            held = cached_values(cache, redis_client, CfWidget, 1, dialect=schema.dialect)
            assert held is not None and held["name"] == "w2"
        cache_a.uninstall(factory)
        assert sql_of_get(schema, factory, CfWidget, 1) == 0  # B still serves
    finally:
        delete_prefix(redis_client, other_prefix)


def test_client_without_socket_timeout_logs_a_warning(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOG_NAME):
        WriteThroughCache(redis.Redis.from_url(redis_url), prefix=prefix)
    warned = [r for r in caplog.records if r.name == LOG_NAME and r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "socket_timeout" in warned[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG_NAME):
        WriteThroughCache(redis.Redis.from_url(redis_url, socket_timeout=0.5), prefix=prefix)
    assert [r for r in caplog.records if r.name == LOG_NAME] == []


@pytest.mark.parametrize("option", ["socket_timeout", "socket_connect_timeout"])
def test_timeouts_with_a_client_raise(option: str, redis_url: str, prefix: str) -> None:
    """Timeouts belong to the client the user built; passing both is a mistake."""
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    with pytest.raises(ConfigurationError, match="socket timeouts belong to the client"):
        WriteThroughCache(client, prefix=prefix, **{option: 0.5})
    client.close()


# -------------------------------------------------------------------------- invalidate


def test_invalidate_one_row(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``cache.invalidate(Model, pk)`` leaves a miss for that row only."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="a"), CfWidget(id=2, name="b"))

    assert cache.invalidate(CfWidget, 1) is True
    assert entry_state(redis_client, entry_key(cache, CfWidget, 1)) is None
    assert entry_state(redis_client, entry_key(cache, CfWidget, 2)) == "value"
    assert sql_of_get(schema, factory, CfWidget, 1) == 1
    assert sql_of_get(schema, factory, CfWidget, 1) == 0
    assert sql_of_get(schema, factory, CfWidget, 2) == 0

    # the identity forms Session.get takes
    assert cache.invalidate(CfWidget, (2,)) is True
    assert sql_of_get(schema, factory, CfWidget, 2) == 1
    assert cache.invalidate(CfWidget, {"id": 2}) is True
    assert sql_of_get(schema, factory, CfWidget, 2) == 1
    with pytest.raises(ConfigurationError):
        cache.invalidate(CfWidget, (1, 2))


def test_invalidate_whole_model_in_one_round_trip(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """``cache.invalidate(Model, bind=engine)``: all 50 cached rows are misses at once (one
    Redis round trip, whatever the number of rows, after the registry's read, which finds
    other versions' keyspaces of the table); reads refill them; other models keep their
    entries."""
    client, trips = counting_redis(redis_url, socket_timeout=10)
    cache = WriteThroughCache(client, prefix=prefix, **COUNTED)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(
        factory, *[CfWidget(id=i, name=f"w{i}") for i in range(1, 51)], CfShortLived(id=1, name="s")
    )
    assert all(sql_of_get(schema, factory, CfWidget, i) == 0 for i in range(1, 51))

    trips.reset()
    assert cache.invalidate(CfWidget, bind=schema) is True
    assert trips.count == 2, trips.names

    with capture_sql(schema) as sql:
        for i in range(1, 51):
            assert load(factory, CfWidget, i)["name"] == f"w{i}"
    assert len(sql) == 50
    with capture_sql(schema) as sql:
        for i in range(1, 51):
            assert load(factory, CfWidget, i)["name"] == f"w{i}"
    assert sql == []
    assert sql_of_get(schema, factory, CfShortLived, 1) == 0
    assert cache.stats().invalidations == 1

    trips.reset()
    assert cache.invalidate(CfWidget) is True
    assert trips.count == 2
    assert sql_of_get(schema, factory, CfWidget, 1) == 1
    client.close()


def test_invalidate_an_uncached_model_raises(redis_url: str, prefix: str) -> None:
    cache = make_cache(redis_url, prefix)
    with pytest.raises(ConfigurationError, match="not cached"):
        cache.invalidate(CfPlain)
    with pytest.raises(ConfigurationError, match="not cached"):
        cache.invalidate(CfPlain, 1)


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[LoopbackProxy]:
    with LoopbackProxy(upstream_of(redis_url)) as proxy:
        yield proxy


@pytest.mark.parametrize("scope", ["row", "model"])
def test_invalidate_while_redis_is_unreachable_is_journaled(
    scope: str,
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_proxy: LoopbackProxy,
    install: Installer,
) -> None:
    """With Redis unreachable ``invalidate()`` returns False; once Redis answers again the
    invalidation is done before this process's next cache read, so the row changed behind the
    cache's back is never served from the old entry."""
    client = redis.Redis.from_url(
        redis_proxy.url, socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    cache = WriteThroughCache(client, prefix=prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="old"))
    assert sql_of_get(schema, factory, CfWidget, 1) == 0
    with schema.begin() as conn:  # changed behind the cache's back
        conn.execute(sa.update(CfWidget).where(CfWidget.id == 1).values(name="new"))

    redis_proxy.blackhole()
    result = cache.invalidate(CfWidget, 1) if scope == "row" else cache.invalidate(CfWidget)
    assert result is False
    redis_proxy.forward()
    held = cached_values(cache, redis_client, CfWidget, 1, dialect=schema.dialect)
    assert held is not None and held["name"] == "old"  # not done yet: Redis was away

    assert load(factory, CfWidget, 1)["name"] == "new"
    assert sql_of_get(schema, factory, CfWidget, 1) == 0  # refilled with the new row
    assert load(factory, CfWidget, 1)["name"] == "new"
    client.close()


# ------------------------------------------------------------------------- stats, TTLs


def test_stats_count_and_reset(
    schema: Engine, prefix: str, redis_url: str, install: Installer
) -> None:
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="a"), CfWidget(id=2, name="b"))  # 2 publishes
    assert cache.invalidate(CfWidget, 1)
    load(factory, CfWidget, 1)  # miss + fill
    load(factory, CfWidget, 1)  # hit
    load(factory, CfWidget, 2)  # hit

    stats = cache.stats(reset=True)
    assert (stats.publishes, stats.misses, stats.fills, stats.hits) == (2, 1, 1, 2)
    assert stats.invalidations == 1
    assert stats.errors == 0
    assert cache.stats() == type(stats)()
    load(factory, CfWidget, 2)
    assert cache.stats().hits == 1


def test_entries_expire_and_generation_keys_do_not(
    schema: Engine,
    prefix: str,
    redis_client: redis.Redis,
    redis_url: str,
    install: Installer,
) -> None:
    """Every entry (published or filled) has a TTL; the generation keys have none."""
    cache = make_cache(redis_url, prefix)
    factory = sessionmaker(schema)
    install(cache, factory)
    add(factory, CfWidget(id=1, name="a"), CfShortLived(id=1, name="s"))
    assert cache.invalidate(CfWidget, 1)
    load(factory, CfWidget, 1)  # filled

    entities = entity_keys(redis_client, prefix)
    generations = generation_keys(redis_client, prefix)
    assert len(entities) == 2
    assert generations
    assert all(redis_client.pttl(k) > 0 for k in entities)
    assert all(redis_client.pttl(k) == -1 for k in generations)
