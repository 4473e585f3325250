"""What tests need to look at the cache from outside: keys, entry states, decoded rows."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import inspect

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.keys import KeySpace
from sqlalchemy_writethrough.protocol import payload_of


def keyspace(cache: WriteThroughCache, model: type, bind: Any = None) -> KeySpace:
    """The keys of ``model``'s rows in the database of ``bind`` (an Engine or Connection).
    Without ``bind``, a test on one database: the bind of the sessionmaker the cache is
    installed on, else the one database the model was used with."""
    layout = cache._layout_for(inspect(model))
    assert layout is not None, f"{model.__name__} is not cached"
    if bind is None:
        targets = [ref() for ref, _, _ in cache._installed]
        binds = {
            cache._databases.of(b): b
            for t in targets
            if (b := getattr(t, "kw", {}).get("bind")) is not None
        }
        if len(binds) == 1:
            bind = next(iter(binds.values()))
    if bind is not None:
        return cache._keys(layout, bind)
    known = list(layout.keyspaces.values())
    assert len(known) == 1, f"{model.__name__}: which database? pass bind="
    return known[0]


def entry_key(cache: WriteThroughCache, model: type, *pk: Any, bind: Any = None) -> str:
    """The Redis key of one row of ``model`` (in the database of ``bind``, see keyspace)."""
    return keyspace(cache, model, bind).pair(list(pk))[0]


def entry_state(client: redis.Redis, key: str) -> str | None:
    """``"value"``, ``"lock"``, ``"lease"``, ``"other"`` or None (absent)."""
    raw = client.get(key)
    if raw is None:
        return None
    return {ord("V"): "value", ord("L"): "lock", ord("E"): "lease"}.get(raw[0], "other")


def cached_values(
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    *pk: Any,
    dialect: Any,
    bind: Any = None,
) -> dict[str, Any] | None:
    """The attribute values Redis holds for a row (None unless the entry is a VALUE)."""
    key = entry_key(cache, model, *pk, bind=bind)
    raw = client.get(key)
    if raw is None or raw[:1] != b"V":
        return None
    layout = cache._layout_for(inspect(model))
    assert layout is not None
    return layout.decode(payload_of(raw), dialect)


def prefix_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))
