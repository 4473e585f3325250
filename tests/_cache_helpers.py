"""What tests need to look at the cache from outside: keys, entry states, decoded rows."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import inspect

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.protocol import payload_of


def entry_key(cache: WriteThroughCache, model: type, *pk: Any) -> str:
    """The Redis key of one row of ``model``."""
    layout = cache._layout_for(inspect(model))
    assert layout is not None, f"{model.__name__} is not cached"
    return layout.keys.pair(list(pk))[0]


def entry_state(client: redis.Redis, key: str) -> str | None:
    """``"value"``, ``"lock"``, ``"lease"``, ``"other"`` or None (absent)."""
    raw = client.get(key)
    if raw is None:
        return None
    return {ord("V"): "value", ord("L"): "lock", ord("E"): "lease"}.get(raw[0], "other")


def cached_values(
    cache: WriteThroughCache, client: redis.Redis, model: type, *pk: Any, dialect: Any
) -> dict[str, Any] | None:
    """The attribute values Redis holds for a row (None unless the entry is a VALUE)."""
    key = entry_key(cache, model, *pk)
    raw = client.get(key)
    if raw is None or raw[:1] != b"V":
        return None
    layout = cache._layout_for(inspect(model))
    assert layout is not None
    return layout.decode(payload_of(raw), dialect)


def prefix_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))
