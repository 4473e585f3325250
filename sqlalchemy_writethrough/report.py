"""What a cache caches, for a person at a REPL or a test: ``cache.models(engine)``.

Plain frozen dataclasses, built on demand from the cache's model layouts; nothing here is on a
read or write path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import ModelOptions

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Mapper

    from .cache import WriteThroughCache
    from .model import ModelLayout


@dataclasses.dataclass(frozen=True)
class InexactColumn:
    """A column whose commits invalidate its row instead of writing it through, and why."""

    attribute: str
    column: str  #: ``table.column``
    reason: str

    def __str__(self) -> str:
        return f"{self.attribute} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One cached model (or inheritance hierarchy, under its base class)."""

    model: type
    #: the hierarchy's classes, the base first (just ``(model,)`` without inheritance)
    classes: tuple[type, ...]
    tables: tuple[str, ...]
    #: ``SCAN MATCH`` pattern of its entries' keys; the digest changes with its columns
    keys: str
    #: effective options; ``exclude`` includes the cache-wide names the model has
    options: ModelOptions
    #: columns whose commits invalidate instead of writing through, on this database
    inexact_columns: tuple[InexactColumn, ...]
    #: False when eagerly loaded relationships or ``column_property`` expressions (not
    #: deferred) keep its loads off the cache, or a table's row-level security keeps them off
    #: on this database (it is still kept current in Redis)
    loads_served: bool
    #: why its loads are not served ("" when they are)
    not_served_because: str = ""
    #: why all its commits invalidate instead of writing through on this database, though
    #: its strategy is "write-through" (a trigger may rewrite its rows, a generated column is
    #: not declared ``Computed``; "" when neither)
    commits_invalidate_because: str = ""
    #: the tables of this database whose triggers' (or rules') code names this model's table,
    #: though not in a statement the cache reads as a write of it, and whose models do not
    #: declare it in ``also_invalidates``: rows such a trigger writes (through dynamic SQL, a
    #: C function) are not seen by the cache (its own triggers are not listed: see
    #: above)
    written_by_triggers_of: tuple[str, ...] = ()
    #: the tables of this database whose triggers' (or rules') statements write this
    #: model's table: every write of one of them, its model cached or not, invalidates this
    #: model whole
    invalidated_by_writes_to: tuple[str, ...] = ()

    def __str__(self) -> str:
        names = ", ".join(c.__name__ for c in self.classes)
        o = self.options
        lines = [
            f"{names}: tables {', '.join(self.tables)}; keys {self.keys}",
            f"  ttl {o.ttl:g}s, {o.strategy}, lock_timeout {o.lock_timeout:g}s, "
            f"on_redis_error {o.on_redis_error}"
            + (", publish in the background" if o.publish == "background" else "")
            + (", near cache" if o.near_cache else ""),
        ]
        if o.exclude:
            lines.append(f"  exclude: {', '.join(sorted(o.exclude))}")
        if o.also_invalidates:
            targets = [t if isinstance(t, str) else t.__name__ for t in o.also_invalidates]
            lines.append(f"  also_invalidates: {', '.join(targets)}")
        if self.inexact_columns:
            lines.append(
                "  commits invalidate because of: " + "; ".join(map(str, self.inexact_columns))
            )
        if self.commits_invalidate_because:
            lines.append(f"  commits invalidate: {self.commits_invalidate_because}")
        if not self.loads_served:
            lines.append(f"  loads go to the database ({self.not_served_because})")
        if self.invalidated_by_writes_to:
            lines.append(
                "  invalidated whole by every write to: "
                + ", ".join(self.invalidated_by_writes_to)
                + " (their triggers write its table)"
            )
        if self.written_by_triggers_of:
            lines.append(
                "  named by triggers of: "
                + ", ".join(self.written_by_triggers_of)
                + " (if they write its rows, declare also_invalidates on their models)"
            )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class LeftOutModel:
    """A model ``register_all()`` covers but the cache cannot keep exact, and why."""

    model: type
    #: the ConfigurationError an explicit ``register()`` would raise: model, why, remedy
    reason: str

    def __str__(self) -> str:
        return self.reason  # it names the model (or its column)


@dataclasses.dataclass(frozen=True)
class CachedModels:
    """``cache.models(engine)``: the cached models and the ones left out, on one database."""

    prefix: str
    dialect: str
    cached: tuple[ModelInfo, ...]
    left_out: tuple[LeftOutModel, ...]

    def _entry_of(self, model: object) -> ModelInfo | None:
        return next((info for info in self.cached if model in info.classes), None)

    def __getitem__(self, model: type) -> ModelInfo:
        """The entry of a cached class (a subclass finds its hierarchy's)."""
        info = self._entry_of(model)
        if info is None:
            raise KeyError(f"{getattr(model, '__name__', model)!s} is not cached by this cache")
        return info

    def __contains__(self, model: object) -> bool:
        """``Model in report``: whether the class is cached (``report[Model]`` finds it)."""
        return self._entry_of(model) is not None

    def __iter__(self) -> Iterator[ModelInfo]:
        """The cached models' entries (without ``__iter__``, Python would iterate by
        ``report[0]``, ``report[1]``...)."""
        return iter(self.cached)

    def __len__(self) -> int:
        return len(self.cached)

    def __str__(self) -> str:
        lines = [f"Models cached under prefix {self.prefix!r} on {self.dialect}:"]
        lines += ["  " + line for info in self.cached for line in str(info).splitlines()]
        if not self.cached:
            lines.append("  (none)")
        if self.left_out:
            lines.append("Left out by register_all():")
            lines += [f"  {entry}" for entry in self.left_out]
        return "\n".join(lines)


def describe(
    cache: WriteThroughCache,
    layouts: list[ModelLayout],
    left_out: dict[Mapper[Any], str],
    dialect: Dialect,
    unserved: dict[ModelLayout, list[str]] | None = None,
    rewritten: dict[ModelLayout, list[str]] | None = None,
    written: dict[ModelLayout, list[str]] | None = None,
    triggered: dict[ModelLayout, list[str]] | None = None,
) -> CachedModels:
    """``unserved``: why the loads of each layout that has such tables are not served on the
    database described, when it was asked (a view, row-level security); ``rewritten``: why
    its commits invalidate there (a trigger); ``written``: the tables whose triggers name
    its table there (not as a write); ``triggered``: those whose triggers write it."""
    name = f"{dialect.name}+{dialect.driver}"
    secured = unserved or {}
    rewriting = rewritten or {}
    writers = written or {}
    writing = triggered or {}
    cached = sorted(
        (
            _info(
                layout,
                dialect,
                secured.get(layout, []),
                rewriting.get(layout, []),
                writers.get(layout, []),
                writing.get(layout, []),
            )
            for layout in layouts
        ),
        key=_by_name,
    )
    skipped = sorted(
        (LeftOutModel(m.class_, reason) for m, reason in left_out.items()), key=_by_name
    )
    return CachedModels(cache.prefix, name, tuple(cached), tuple(skipped))


def _by_name(entry: ModelInfo | LeftOutModel) -> tuple[str, str]:
    return entry.model.__name__, entry.model.__module__


def _not_served_because(layout: ModelLayout, secured: list[str]) -> str:
    reasons = []
    if layout.eager_relationships:
        reasons.append(f"eagerly loaded relationships: {', '.join(layout.eager_relationships)}")
    if layout.loaded_expressions:
        reasons.append(
            "column_property expressions selected with the row: "
            f"{', '.join(layout.loaded_expressions)}; declare them deferred=True"
        )
    reasons.extend(secured)
    return "; ".join(reasons)


def _info(
    layout: ModelLayout,
    dialect: Dialect,
    secured: list[str],
    rewritten: list[str],
    written: list[str],
    writers: list[str],
) -> ModelInfo:
    inexact: dict[str, InexactColumn] = {}
    for variant in layout.by_tag.values():
        columns = dict(zip(variant.attrs, variant.columns, strict=True))
        for attr, reason in variant.inexact_columns(dialect):
            column = columns[attr]
            name = f"{column.table.fullname}.{column.name}"
            inexact.setdefault(attr, InexactColumn(attr, name, reason))
    return ModelInfo(
        model=layout.mapper.class_,
        classes=tuple(v.mapper.class_ for v in layout.by_tag.values()),
        tables=tuple(sorted({t.fullname for t in layout.tables})),
        keys=layout.key_pattern,
        options=dataclasses.replace(layout.options, exclude=layout.exclude),
        inexact_columns=tuple(inexact.values()),
        loads_served=not (layout.loaded_with_row or secured),
        not_served_because=_not_served_because(layout, secured),
        commits_invalidate_because="; ".join(rewritten),
        written_by_triggers_of=tuple(written),
        invalidated_by_writes_to=tuple(writers),
    )
