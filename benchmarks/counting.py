"""What counting costs: the cached ``session.get`` row again, on a cache whose counters do
nothing (docs/operations.md says counting is cheap enough to leave on; this row is the
evidence). Same client, same prefix and entries as the ``get.cached`` row; only the counters
differ, so the difference between the two rows is what the counters, the latency histogram
and the per-model breakdown cost a cached read."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import sessionmaker

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.stats import Counters

from .context import Env
from .harness import Variant
from .models import Item
from .peers.common import timed_read


class NoCounters(Counters):
    """Counters that count nothing."""

    __slots__ = ()

    def add(self, name: str, n: int = 1, model: str = "") -> None:
        pass

    def invalidated(self, reason: str, n: int = 1, model: str = "") -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def observe(self, histogram: str, seconds: float) -> None:
        pass

    def observe_read(
        self, seconds: float, model: str = "", hits: int = 0, near_hits: int = 0
    ) -> None:
        pass

    def add_many(self, counts: Any) -> None:
        pass

    def committed(self, counts: Any, cache_seconds: float, commit_seconds: float | None) -> None:
        pass


def uncounted(cache: WriteThroughCache) -> WriteThroughCache:
    """``cache`` with its counters replaced by :class:`NoCounters` everywhere they are read."""
    nothing = NoCounters()
    runtime: Any = cache._runtime  # private: the hooks' counters
    runtime.counters = nothing
    backend: Any = runtime.backend
    backend._counters = nothing
    return cache


def _get_one(s: Any, pk: int) -> Any:
    return s.get(Item, pk)


def uncounted_variant(env: Env) -> Variant:
    cache = uncounted(WriteThroughCache(env.redis, prefix=env.prefix, stats_interval=None))
    maker = sessionmaker(env.engine)
    cache.install(maker)
    return Variant(
        "get.cached.uncounted",
        "session.get, our cache (warm), counting switched off",
        "ours",
        timed_read(maker, env.read_pk, _get_one),
        note=(
            "the get.cached row on a cache whose counters do nothing: the difference is "
            "what counting costs (counters, latency histogram, per-model breakdown)"
        ),
    )
