"""The Redis side of the protocol: the Lua scripts and what their replies mean.

Every state change of an entry is one atomic script (``lua/*.lua``; each file's header lists its
KEYS, ARGV and reply). The scripts take (entity key, generation key) pairs that share a hash tag,
so they run unchanged on Redis Cluster, one call per slot. Nothing here does I/O: the sync
backend (and, later, the asyncio one) run these texts with their own clients.

Entry states (see DESIGN.md):

=========  ==================================  =============================================
state      written by                          a reader sees
=========  ==================================  =============================================
VALUE      publish after COMMIT, or a fill     a hit, if its generation is current
LOCK       a writer at flush, before COMMIT    a miss; no fill
LEASE      a reader at a miss                  a miss; only the lease holder may fill
absent     TTL, eviction, restart              a miss; the reader takes a lease
=========  ==================================  =============================================

A bucket's generation key holds a token, or a GENERATION LOCK while a transaction changes rows
of the model that it cannot name (every entry of the bucket is then a miss, and no fill lands).
"""

from __future__ import annotations

import enum
from importlib import resources
from typing import Any, Literal

_LUA = resources.files(__package__) / "lua"


def _script(name: str) -> str:
    common = (_LUA / "_common.lua").read_text(encoding="utf-8")
    return common + "\n" + (_LUA / f"{name}.lua").read_text(encoding="utf-8")


class Script(enum.Enum):
    FETCH = "fetch"
    FILL = "fill"
    LOCK = "lock"
    PUBLISH = "publish"
    RELEASE = "release"
    INVALIDATE = "invalidate"
    LOCK_GENS = "lock_gens"
    RELEASE_GENS = "release_gens"
    BUMP_GENS = "bump_gens"

    @property
    def source(self) -> str:
        return _SOURCES[self]


_SOURCES = {s: _script(s.value) for s in Script}


class Fetch(enum.IntEnum):
    """First element of a FETCH reply."""

    LEASED = 0  # miss; the caller holds a lease and may fill; second element: generation
    HIT = 1  # second element: the whole VALUE ('V' gen ':' payload)
    BUSY = 2  # miss; locked by a writer or leased to another reader
    MISS = 3  # miss; no lease was asked for
    DAMAGED = 4  # miss; a damaged entry was replaced (by a lease if asked: second element gen)


def current_payload(value: Any, gen: Any) -> memoryview | Literal[False]:
    """The row payload of an entry when it is a VALUE of generation ``gen`` (both as MGET
    returned them); False for anything else (a lock, a lease, another generation, absent)."""
    if type(value) is not bytes or type(gen) is not bytes or value[:1] != b"V":
        return False
    sep = value.find(b":", 1)
    if sep < 0 or value[1:sep] != gen:
        return False
    return memoryview(value)[sep + 1 :]


def payload_of(value: bytes) -> memoryview:
    """The row payload inside a VALUE entry ('V' <generation> ':' <payload>)."""
    return memoryview(value)[value.index(b":", 1) + 1 :]
