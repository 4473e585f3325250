"""Cache-aside query caching with dogpile.cache, the way SQLAlchemy's documentation shows it.

Written for this benchmark from the description of SQLAlchemy's ``examples/dogpile_caching``
(the "Dogpile Caching" section of the ORM examples): a ``do_orm_execute`` session hook, a
``FromCache`` user-defined option naming a dogpile region, and a ``RelationshipCache`` variant
that applies to lazy loads of chosen relationships. On a miss the statement runs and its
``FrozenResult`` is stored in the region (dogpile pickles it); on a hit the frozen result is
merged into the session with ``merge_frozen_result(load=False)``. The key is the statement's
offline cache key string plus its parameters (as in the example), boiled down to an md5 by the
region's key mangler.

What the recipe does not do, by design: nothing happens at flush or commit (cached results go
stale until they expire or are invalidated by hand), and a query is cached as a whole (a
``WHERE id IN (...)`` result is one entry for that exact list).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, loading
from sqlalchemy.orm.interfaces import UserDefinedOption


def md5_key_mangler(prefix: str) -> Callable[[str], str]:
    """Long statement keys become ``prefix`` + an md5 hex digest."""

    def mangle(key: str) -> str:
        return prefix + hashlib.md5(key.encode("utf-8")).hexdigest()

    return mangle


class ORMCache:
    """Serve statements that carry a :class:`FromCache` option from a dogpile region."""

    def __init__(self, regions: dict[str, CacheRegion]) -> None:
        self.regions = regions
        self._statement_cache: dict[Any, str] = {}

    def listen_on_session(self, session_factory: Any) -> None:
        event.listen(session_factory, "do_orm_execute", self._do_orm_execute)

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        for opt in orm_context.user_defined_options:
            if isinstance(opt, RelationshipCache):
                found = opt.for_lazy_load(orm_context)
                if found is None:
                    continue
                opt = found
            if isinstance(opt, FromCache):
                region = self.regions[opt.region]
                key = opt.cache_key(orm_context.statement, orm_context.parameters or {}, self)

                def create() -> Any:
                    return orm_context.invoke_statement().freeze()

                frozen = region.get_or_create(key, create, expiration_time=opt.expiration_time)
                if frozen is NO_VALUE:
                    raise KeyError(key)
                result = loading.merge_frozen_result(
                    orm_context.session, orm_context.statement, frozen, load=False
                )
                return result()
        return None

    def invalidate(self, statement: Any, parameters: Any, opt: FromCache) -> None:
        """Forget the cached result of ``statement`` with ``parameters``."""
        statement = statement.__clause_element__()
        key = opt.cache_key(statement, parameters, self)
        self.regions[opt.region].delete(key)


class FromCache(UserDefinedOption):
    """Load this statement's result from a cache region (cache-aside)."""

    propagate_to_loaders = False

    def __init__(
        self,
        region: str = "default",
        cache_key: str | None = None,
        expiration_time: int | None = None,
    ) -> None:
        super().__init__()
        self.region = region
        self.key_suffix = cache_key
        self.expiration_time = expiration_time

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> None:
        return None  # not part of SQLAlchemy's compiled-statement cache key

    def cache_key(self, statement: Any, parameters: Any, orm_cache: ORMCache) -> str:
        statement_key = statement._generate_cache_key()
        return statement_key.to_offline_string(
            orm_cache._statement_cache, statement, parameters
        ) + repr(self.key_suffix)


class RelationshipCache(FromCache):
    """Load lazy loads of the given relationship(s) from a cache region."""

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: Any,
        region: str = "default",
        cache_key: str | None = None,
        expiration_time: int | None = None,
    ) -> None:
        super().__init__(region, cache_key, expiration_time)
        prop = attribute.property
        self._relationships: dict[tuple[type, str], RelationshipCache] = {
            (prop.parent.class_, prop.key): self
        }

    def for_lazy_load(self, orm_context: ORMExecuteState) -> RelationshipCache | None:
        path = orm_context.loader_strategy_path
        if path:
            mapper, prop = path[-2:]
            for cls in mapper.class_.__mro__:
                found = self._relationships.get((cls, prop.key))
                if found is not None:
                    return found
        return None

    def and_(self, other: RelationshipCache) -> RelationshipCache:
        """Chain another relationship into this option."""
        self._relationships.update(other._relationships)
        return self
