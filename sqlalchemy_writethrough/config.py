"""Cache-wide settings and the per-model options that override them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

from .exc import ConfigurationError

Strategy = Literal["write-through", "invalidate"]
OnRedisError = Literal["degrade", "strict"]

STRATEGIES: tuple[Strategy, ...] = ("write-through", "invalidate")
ON_REDIS_ERROR: tuple[OnRedisError, ...] = ("degrade", "strict")


class ModelOptionsDict(TypedDict, total=False):
    """Per-model overrides, as written in a model's ``__writethrough__`` or given to ``register()``."""

    ttl: float
    exclude: Iterable[str]
    strategy: Strategy
    lock_timeout: float
    on_redis_error: OnRedisError
    also_invalidates: Iterable[Any]


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

    def merged(self, overrides: Mapping[str, Any], *, where: str) -> ModelOptions:
        unknown = set(overrides) - MODEL_OPTION_NAMES
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown option(s) {sorted(unknown)}; "
                f"valid per-model options are {sorted(MODEL_OPTION_NAMES)}"
            )
        values = dataclasses.asdict(self)
        for name, value in overrides.items():
            if name == "exclude":
                if isinstance(value, str):
                    raise ConfigurationError(f"{where}: exclude takes a list of attribute names")
                value = frozenset(value)
            elif name == "also_invalidates":
                value = tuple(value)
            values[name] = value
        return validate(ModelOptions(**values), where=where)


def validate(options: ModelOptions, *, where: str) -> ModelOptions:
    if not options.ttl > 0:
        raise ConfigurationError(f"{where}: ttl must be a positive number of seconds")
    if not options.lock_timeout > 0:
        raise ConfigurationError(f"{where}: lock_timeout must be a positive number of seconds")
    if options.strategy not in STRATEGIES:
        raise ConfigurationError(f"{where}: strategy must be one of {STRATEGIES}")
    if options.on_redis_error not in ON_REDIS_ERROR:
        raise ConfigurationError(f"{where}: on_redis_error must be one of {ON_REDIS_ERROR}")
    if isinstance(options.exclude, str):
        raise ConfigurationError(f"{where}: exclude takes a list of attribute names")
    for target in options.also_invalidates:
        if not isinstance(target, (str, type)):
            raise ConfigurationError(
                f"{where}: also_invalidates takes mapped classes or table names, not {target!r}"
            )
    return options
