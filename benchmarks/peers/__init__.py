"""The caches a user would pick instead, measured on the same tables, Redis and rounds.

Each peer module has ``build(env) -> PeerRows``. A peer that cannot be imported or set up is
reported with the reason, and the run goes on. Where a peer cannot do an operation, its row
says so instead of a time.

The peers are installed by the ``bench`` nox session (``sqlmodel-cache``, ``sqlacache`` with
``cashews[redis]`` and ``greenlet``, ``dogpile.cache``); none of them is a dependency of the
library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..harness import Variant

#: (display name, module, distributions whose versions the report prints)
PEERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("dogpile.cache recipe", "dogpile_peer", ("dogpile.cache",)),
    ("sqlmodel-cache", "sqlmodel_cache_peer", ("sqlmodel-cache", "sqlmodel", "pydantic")),
    ("sqlacache", "sqlacache_peer", ("sqlacache", "cashews", "greenlet")),
    # not a peer: this library's asyncio flavour, measured in the same rounds (see the module)
    ("ours (asyncio)", "ours_asyncio", ("asyncpg", "greenlet")),
)


@dataclass
class PeerRows:
    name: str
    versions: dict[str, str | None] = field(default_factory=dict)
    unavailable: str | None = None
    rows: dict[str, list[Variant]] = field(default_factory=dict)
    """group key -> rows"""
    capabilities: list[str] = field(default_factory=list)
    """what the peer could and could not do, for the report"""
    memory: Callable[[int], dict[str, Any] | None] | None = None
    """bytes this peer stores for one row (``strlen``, ``memory_usage``, ``keys``)"""
    close: Callable[[], None] = lambda: None
    setup_s: float = 0.0


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_peers(env: Any, log: Callable[[str], None] = print) -> list[PeerRows]:
    import time

    peers: list[PeerRows] = []
    for name, module_name, dists in PEERS:
        versions = {d: distribution_version(d) for d in dists}
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
            peer: PeerRows = module.build(env)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            missing = [d for d, v in versions.items() if v is None]
            if missing:
                reason = f"not installed ({', '.join(missing)}); {reason}"
            log(f"  ! peer {name} unavailable: {reason}")
            if not missing:
                traceback.print_exc(limit=4)
            peer = PeerRows(name=name, unavailable=reason)
        peer.versions = versions
        peer.setup_s = time.perf_counter() - started
        peers.append(peer)
        log(
            f"  peer {name}: {'unavailable' if peer.unavailable else 'ready'} ({peer.setup_s:.1f} s)"
        )
    return peers
