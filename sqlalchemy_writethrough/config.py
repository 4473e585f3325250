"""Cache-wide settings and the per-model options that override them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

from .exc import ConfigurationError

Strategy = Literal["write-through", "invalidate"]
OnRedisError = Literal["degrade", "strict"]
Publish = Literal["sync", "background"]


class OptionError(ConfigurationError):
    """An option given explicitly that is wrong (a typo, a bad value): it raises even for a
    model that ``register_all()`` would otherwise leave out of the cache with a warning."""


STRATEGIES: tuple[Strategy, ...] = ("write-through", "invalidate")
ON_REDIS_ERROR: tuple[OnRedisError, ...] = ("degrade", "strict")
PUBLISH: tuple[Publish, ...] = ("sync", "background")


class ModelOptionsDict(TypedDict, total=False):
    """Per-model overrides, as written in a model's ``__writethrough__`` or given to ``register()``."""

    ttl: float
    exclude: Iterable[str]
    strategy: Strategy
    lock_timeout: float
    on_redis_error: OnRedisError
    also_invalidates: Iterable[Any]
    publish: Publish
    near_cache: bool


MODEL_OPTION_NAMES = frozenset(ModelOptionsDict.__annotations__)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The effective options of one cached model."""

    ttl: float
    exclude: frozenset[str]
    strategy: Strategy
    lock_timeout: float
    on_redis_error: OnRedisError
    #: models (classes or table names) whose rows a write to this model may change behind the
    #: ORM's back (a trigger): they are invalidated whole by every write to this model
    also_invalidates: tuple[Any, ...] = ()
    #: ``"background"``: a commit's publish (and a rollback's restore) runs on the cache's
    #: background worker after ``commit()`` returns; a transaction publishes in the background
    #: only when every cached model it wrote says so
    publish: Publish = "sync"
    #: serve this model's primary-key reads from the cache's near cache (process memory);
    #: None when the cache has no near cache (then a model may not ask for one)
    near_cache: bool | None = None

    def merged(self, overrides: Mapping[str, Any], *, where: str) -> ModelOptions:
        unknown = set(overrides) - MODEL_OPTION_NAMES
        if unknown:
            raise OptionError(
                f"{where}: unknown option(s) {sorted(unknown)}; "
                f"valid per-model options are {sorted(MODEL_OPTION_NAMES)}"
            )
        values = dataclasses.asdict(self)
        for name, value in overrides.items():
            if name == "exclude":
                if isinstance(value, str):
                    raise OptionError(f"{where}: exclude takes a list of attribute names")
                value = frozenset(value)
            elif name == "also_invalidates":
                value = tuple(value)
            elif name == "near_cache" and value is True and self.near_cache is None:
                raise OptionError(
                    f"{where}: near_cache needs the cache's near cache: "
                    "WriteThroughCache(..., near_cache=True) (or NearCacheOptions(...))"
                )
            values[name] = value
        return validate(ModelOptions(**values), where=where)


def validate(options: ModelOptions, *, where: str) -> ModelOptions:
    if not options.ttl > 0:
        raise OptionError(f"{where}: ttl must be a positive number of seconds")
    if not options.lock_timeout > 0:
        raise OptionError(f"{where}: lock_timeout must be a positive number of seconds")
    if options.strategy not in STRATEGIES:
        raise OptionError(f"{where}: strategy must be one of {STRATEGIES}")
    if options.on_redis_error not in ON_REDIS_ERROR:
        raise OptionError(f"{where}: on_redis_error must be one of {ON_REDIS_ERROR}")
    if options.publish not in PUBLISH:
        raise OptionError(f"{where}: publish must be one of {PUBLISH}")
    if options.near_cache not in (True, False, None):
        raise OptionError(f"{where}: near_cache must be True or False")
    if isinstance(options.exclude, str):
        raise OptionError(f"{where}: exclude takes a list of attribute names")
    for target in options.also_invalidates:
        if not isinstance(target, (str, type)):
            raise OptionError(
                f"{where}: also_invalidates takes mapped classes or table names, not {target!r}"
            )
    return options


@dataclasses.dataclass(frozen=True)
class NearCacheOptions:
    """The near cache's bounds (``WriteThroughCache(near_cache=NearCacheOptions(...))``;
    ``near_cache=True`` takes these defaults). See docs/consistency.md, "Near cache"."""

    #: entries kept in process memory at most; the oldest copy goes first
    max_entries: int = 10_000
    #: seconds a read served from memory may be behind a commit another process completed:
    #: every copy expires this long after it was read from Redis, and nothing is served while
    #: the invalidation channel is down or lags by more
    staleness: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_entries, bool) or not (
            isinstance(self.max_entries, int) and self.max_entries >= 1
        ):
            raise ConfigurationError("NearCacheOptions.max_entries must be at least 1")
        if not (isinstance(self.staleness, (int, float)) and 0 < self.staleness <= 3600):
            raise ConfigurationError(
                "NearCacheOptions.staleness must be a positive number of seconds (at most 3600)"
            )
