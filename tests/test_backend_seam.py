"""The seam a Cluster transport plugs into: multi-key script calls split per hash tag.

A Redis Cluster runs a script only over keys of one slot. A transport that says it is clustered
gets every multi-key call of the backend split into one call per hash tag, sent as one batch;
the counts the parts reply add up to what one call would reply. Shown here with a transport
that records what it sends, over a real standalone Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from sqlalchemy_writethrough.backend import ScriptBackend
from sqlalchemy_writethrough.breaker import CircuitBreaker
from sqlalchemy_writethrough.diagnostics import redis_address
from sqlalchemy_writethrough.protocol import Script, hash_tag, split_by_hash_tag
from sqlalchemy_writethrough.redis_sync import SyncTransport
from sqlalchemy_writethrough.stats import Counters

TTL = 60_000


def test_hash_tag_is_what_cluster_hashes() -> None:
    assert hash_tag("wt:{item:abc:db:3}:42") == "item:abc:db:3"
    assert hash_tag("wt:{item:abc:db:3}") == "item:abc:db:3"
    assert hash_tag("plain") == "plain"
    assert hash_tag("a{}b{c}") == "a{}b{c}"  # an empty tag: the whole key


def test_publish_is_split_with_its_per_pair_arguments() -> None:
    keys = ["p:{a}:1", "p:{a}", "p:{b}:2", "p:{b}", "p:{a}:3", "p:{a}"]
    args = ["owner", b"one", 10, b"two", 20, b"three", 30]
    assert split_by_hash_tag(Script.PUBLISH, keys, args) == [
        (["p:{a}:1", "p:{a}", "p:{a}:3", "p:{a}"], ["owner", b"one", 10, b"three", 30]),
        (["p:{b}:2", "p:{b}"], ["owner", b"two", 20]),
    ]


def test_pair_and_generation_scripts_share_their_arguments() -> None:
    keys = ["p:{a}:1", "p:{a}", "p:{b}:2", "p:{b}"]
    assert split_by_hash_tag(Script.LOCK, keys, ["w", 5]) == [
        (["p:{a}:1", "p:{a}"], ["w", 5]),
        (["p:{b}:2", "p:{b}"], ["w", 5]),
    ]
    assert split_by_hash_tag(Script.BUMP_GENS, ["p:{a}", "p:{b}", "p:{a}"], ["n"]) == [
        (["p:{a}", "p:{a}"], ["n"]),
        (["p:{b}"], ["n"]),
    ]
    single = split_by_hash_tag(Script.FETCH, ["p:{a}:1", "p:{a}"], ["lease", 1])
    assert single == [(["p:{a}:1", "p:{a}"], ["lease", 1])]


class ClusteredRecorder(SyncTransport):
    """A standalone Redis's transport that says it is clustered, and records its scripts."""

    clustered = True

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, redis_address(client))
        self.scripts: list[list[str]] = []

    def _note(self, command: Sequence[Any]) -> None:
        if command[0] == "EVALSHA":
            self.scripts.append([str(k) for k in command[3 : 3 + int(command[2])]])

    def command(self, *args: Any) -> Any:
        self._note(args)
        return super().command(*args)

    def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        for command in commands:
            self._note(command)
        return super().batch(commands)


def test_a_clustered_transport_gets_one_script_per_hash_tag(
    redis_client: redis.Redis, prefix: str
) -> None:
    transport = ClusteredRecorder(redis_client)
    backend = ScriptBackend(transport, CircuitBreaker(), Counters())
    pairs: list[str] = []
    items: list[Any] = []
    for i in range(30):
        tag = f"{prefix}:{{m:d:{i % 4}}}"
        pairs += (f"{tag}:{i}", tag)
        items += (f"row{i}".encode(), TTL)
    assert backend.send_lock(pairs, "w1", TTL) is None  # never overlapped: the sync lock splits
    assert backend.lock(pairs, "w1", TTL)
    assert backend.publish(pairs, "w1", items) == 30
    assert backend.lock_generations(pairs[1::2], "w2", TTL)
    assert backend.release_generations(pairs[1::2], "w2", True)
    assert transport.scripts
    for keys in transport.scripts:
        assert len({hash_tag(k) for k in keys}) == 1, keys
    raw = redis_client.get(pairs[2 * 17])
    assert raw is not None and raw.endswith(b":row17")
