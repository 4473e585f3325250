"""The Lua state machine on a real Redis: every transition of the entry states
(docs/consistency.md, "How: locks, leases and a guarded publish").

These run the scripts through the same backend the cache uses, one transition per test, and
assert what the key holds afterwards. They are the ground truth the ORM-level tests build on:
a fill never lands over a writer's lock, a rollback restores only an uncontended entry of its
own, a publish never writes where its lock was lost, and a lost generation key cannot revive
old values.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from sqlalchemy_writethrough.backend import RedisBackend
from sqlalchemy_writethrough.breaker import CircuitBreaker
from sqlalchemy_writethrough.protocol import Fetch
from sqlalchemy_writethrough.stats import Counters

TTL = 60_000
LOCK = 30_000
LEASE = 10_000


@pytest.fixture
def backend(redis_client: redis.Redis) -> RedisBackend:
    return RedisBackend(redis_client, CircuitBreaker(), Counters())


@pytest.fixture
def keys(prefix: str) -> Iterator[tuple[str, str]]:
    tag = f"{prefix}:{{m:d:0}}"
    yield f"{tag}:1", tag


def state(client: redis.Redis, key: str) -> str | None:
    raw = client.get(key)
    return None if raw is None else {ord("V"): "V", ord("L"): "L", ord("E"): "E"}[raw[0]]


def seed_value(backend: RedisBackend, key: str, gen_key: str, payload: bytes = b"old") -> bytes:
    """Put a VALUE in place the way a reader does: fetch (lease), then fill."""
    reply = backend.fetch(key, gen_key, "seed", LEASE)
    assert reply is not None and reply[0] is Fetch.LEASED and reply[1] is not None
    assert backend.fill(key, gen_key, "seed", reply[1], payload, TTL) is True
    return reply[1]


def value_payload(client: redis.Redis, key: str) -> bytes:
    raw = client.get(key)
    assert raw is not None and raw[:1] == b"V"
    return raw[raw.index(b":") + 1 :]


# -- read side ---------------------------------------------------------------------------


def test_miss_grants_a_lease_and_creates_the_generation(backend, redis_client, keys):
    key, gen_key = keys
    status, gen = backend.fetch(key, gen_key, "r1", LEASE)
    assert status is Fetch.LEASED
    assert redis_client.get(gen_key) == gen
    assert redis_client.ttl(gen_key) == -1, "generation keys never expire"
    assert state(redis_client, key) == "E"
    assert 0 < redis_client.pttl(key) <= LEASE


def test_miss_without_lease_writes_nothing(backend, redis_client, keys):
    key, gen_key = keys
    assert backend.fetch(key, gen_key, "", LEASE) == (Fetch.MISS, None)
    assert redis_client.get(key) is None


def test_fill_over_own_lease_is_a_hit_with_ttl(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key, b"row")
    status, value = backend.fetch(key, gen_key, "r2", LEASE)
    assert status is Fetch.HIT and value is not None and value.endswith(b":row")
    assert LEASE < redis_client.pttl(key) <= TTL


def test_second_reader_sees_busy_and_cannot_fill(backend, redis_client, keys):
    key, gen_key = keys
    _, gen = backend.fetch(key, gen_key, "r1", LEASE)
    assert backend.fetch(key, gen_key, "r2", LEASE) == (Fetch.BUSY, b"E")
    assert backend.fill(key, gen_key, "r2", gen, b"x", TTL) is False
    assert state(redis_client, key) == "E"


def test_fill_refused_after_a_writer_locked(backend, redis_client, keys):
    """Facebook's lease: a reader that loaded before a writer's flush cannot fill after it."""
    key, gen_key = keys
    _, gen = backend.fetch(key, gen_key, "r1", LEASE)
    assert backend.lock([key, gen_key], "w1", LOCK)
    assert backend.fill(key, gen_key, "r1", gen, b"old", TTL) is False
    assert state(redis_client, key) == "L"


def test_fill_refused_after_invalidation(backend, redis_client, keys):
    key, gen_key = keys
    _, gen = backend.fetch(key, gen_key, "r1", LEASE)
    assert backend.invalidate([key, gen_key])
    assert backend.fill(key, gen_key, "r1", gen, b"old", TTL) is False
    assert redis_client.get(key) is None


def test_fill_refused_after_generation_change(backend, redis_client, keys):
    key, gen_key = keys
    _, gen = backend.fetch(key, gen_key, "r1", LEASE)
    assert backend.bump_generations([gen_key])
    assert backend.fill(key, gen_key, "r1", gen, b"old", TTL) is False
    assert redis_client.get(key) is None


def test_value_of_an_old_generation_is_a_miss(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.bump_generations([gen_key])
    status, _ = backend.fetch(key, gen_key, "r1", LEASE)
    assert status is Fetch.LEASED


def test_lost_generation_key_cannot_revive_old_entries(backend, redis_client, keys):
    """An evicted generation key is recreated with a new token, never "0" again."""
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    redis_client.delete(gen_key)
    status, _ = backend.fetch(key, gen_key, "r1", LEASE)
    assert status is Fetch.LEASED


def test_locked_entry_is_busy(backend, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    assert backend.fetch(key, gen_key, "r1", LEASE) == (Fetch.BUSY, b"L")


# -- write side --------------------------------------------------------------------------


def test_publish_writes_value_over_own_uncontended_lock(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    assert backend.publish([key, gen_key], "w1", [b"new", TTL]) == 1
    assert value_payload(redis_client, key) == b"new"


def test_publish_of_a_delete_leaves_a_miss(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    assert backend.publish([key, gen_key], "w1", [b"", 0]) == 0
    assert redis_client.get(key) is None


def test_rollback_restores_previous_value_and_its_ttl(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key, b"old")
    ttl_before = redis_client.pttl(key)
    backend.lock([key, gen_key], "w1", LOCK)
    assert backend.release([key, gen_key], "w1") == 1
    assert value_payload(redis_client, key) == b"old"
    assert ttl_before - 2000 < redis_client.pttl(key) <= ttl_before


def test_rollback_of_a_cold_key_leaves_a_miss(backend, redis_client, keys):
    key, gen_key = keys
    backend.lock([key, gen_key], "w1", LOCK)
    assert backend.release([key, gen_key], "w1") == 0
    assert redis_client.get(key) is None


def test_rollback_does_not_restore_a_value_older_than_a_generation_change(
    backend, redis_client, keys
):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    backend.bump_generations([gen_key])
    assert backend.release([key, gen_key], "w1") == 0
    assert redis_client.get(key) is None


def test_two_writers_leave_a_miss_whatever_the_order(backend, redis_client, keys):
    """Commit order across processes is unknown: contended keys end as a miss."""
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    backend.lock([key, gen_key], "w2", LOCK)
    assert backend.publish([key, gen_key], "w2", [b"two", TTL]) == 0
    assert state(redis_client, key) == "L", "w1 still owns it"
    assert backend.publish([key, gen_key], "w1", [b"one", TTL]) == 0
    assert redis_client.get(key) is None


def test_rollback_never_restores_over_another_writers_commit(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key, b"old")
    backend.lock([key, gen_key], "w1", LOCK)
    backend.lock([key, gen_key], "w2", LOCK)
    backend.publish([key, gen_key], "w2", [b"two", TTL])
    assert backend.release([key, gen_key], "w1") == 0
    assert redis_client.get(key) is None, "old must not come back over w2's commit"


def test_publish_after_lock_lost_deletes_whatever_is_there(backend, redis_client, keys):
    """The lock expired and a reader filled the old row meanwhile: publish leaves a miss."""
    key, gen_key = keys
    backend.lock([key, gen_key], "w1", 50)
    redis_client.delete(key)  # as if expired
    seed_value(backend, key, gen_key, b"old")
    assert backend.publish([key, gen_key], "w1", [b"new", TTL]) == 0
    assert redis_client.get(key) is None


def test_publish_after_lock_lost_marks_a_newer_lock_contended(backend, redis_client, keys):
    """w1's lock was lost and w2 locked with prev = w1's pre-commit value: w2 must not
    restore it on rollback."""
    key, gen_key = keys
    seed_value(backend, key, gen_key, b"old")
    backend.lock([key, gen_key], "w1", LOCK)
    redis_client.delete(key)  # w1's lock lost
    seed_value(backend, key, gen_key, b"old")  # a reader filled the pre-w1 row
    backend.lock([key, gen_key], "w2", LOCK)  # w2 keeps "old" as prev
    backend.publish([key, gen_key], "w1", [b"new", TTL])  # w1 committed "new"
    assert backend.release([key, gen_key], "w2") == 0
    assert redis_client.get(key) is None


def test_invalidate_on_a_lock_prevents_publish_and_restore(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w1", LOCK)
    backend.invalidate([key, gen_key])
    assert state(redis_client, key) == "L"
    assert backend.publish([key, gen_key], "w1", [b"new", TTL]) == 0
    assert redis_client.get(key) is None

    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "w2", LOCK)
    backend.invalidate([key, gen_key])
    assert backend.release([key, gen_key], "w2") == 0
    assert redis_client.get(key) is None


def test_a_replay_ends_only_the_locks_of_ended_owners(backend, redis_client, keys):
    """A journal replay names the transactions that ended while Redis was away: their locks
    go, and a lock a live transaction shares stays (contended: its publish writes nothing),
    so readers keep missing until that transaction ends."""
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "ended", LOCK)
    backend.lock([key, gen_key], "live", LOCK)
    backend.invalidate([key, gen_key], ["ended"])
    assert state(redis_client, key) == "L", "the live writer's lock must stay"
    reply = backend.fetch(key, gen_key, "reader", LEASE)
    assert reply is not None and reply[0] is Fetch.BUSY
    assert backend.publish([key, gen_key], "live", [b"new", TTL]) == 0
    assert redis_client.get(key) is None


def test_a_replay_leaves_a_live_owners_lock_alone(backend, redis_client, keys):
    """An ended owner that holds no lock here changes nothing but contention."""
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "live", LOCK)
    backend.invalidate([key, gen_key], ["someone-else"])
    assert state(redis_client, key) == "L"
    assert backend.release([key, gen_key], "live") == 0
    assert redis_client.get(key) is None


def test_a_replay_of_the_last_owner_leaves_a_miss(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key)
    backend.lock([key, gen_key], "ended", LOCK)
    backend.invalidate([key, gen_key], ["ended"])
    assert redis_client.get(key) is None


def test_reasserting_own_lock_extends_it_without_contention(backend, redis_client, keys):
    key, gen_key = keys
    seed_value(backend, key, gen_key, b"old")
    backend.lock([key, gen_key], "w1", 1000)
    backend.lock([key, gen_key], "w1", LOCK)
    assert redis_client.pttl(key) > 1000
    assert backend.release([key, gen_key], "w1") == 1
    assert value_payload(redis_client, key) == b"old"


def test_expired_lock_is_a_miss_and_reassert_takes_it_back(backend, redis_client, keys):
    """A long transaction's lock expired and a reader filled the old row; re-asserting before
    COMMIT replaces that fill by a lock again (so a crash after COMMIT leaves a miss)."""
    key, gen_key = keys
    backend.lock([key, gen_key], "w1", LOCK)
    redis_client.delete(key)
    seed_value(backend, key, gen_key, b"old")
    backend.lock([key, gen_key], "w1", LOCK)
    assert state(redis_client, key) == "L"
    assert backend.publish([key, gen_key], "w1", [b"new", TTL]) == 1
    assert value_payload(redis_client, key) == b"new"


@pytest.mark.parametrize(
    "before",
    ["same", "other", "absent", "lease", "other lock", "old generation"],
)
def test_a_lock_expecting_the_row_as_loaded_is_contended_unless_the_value_holds_it(
    backend, redis_client, keys, before
):
    """An UPDATE leaving loaded columns unwritten sends the row as loaded with its lock: the
    publish writes only when the VALUE the lock replaced held exactly that, else a miss."""
    key, gen_key = keys
    if before in ("same", "other", "old generation"):
        seed_value(backend, key, gen_key, b"loaded" if before != "other" else b"changed")
        if before == "old generation":
            backend.bump_generations([gen_key])
    elif before == "lease":
        backend.fetch(key, gen_key, "reader", LEASE)
    elif before == "other lock":
        backend.lock([key, gen_key], "w0", LOCK)
    backend.lock([key, gen_key], "w1", LOCK, [b"loaded"])
    backend.lock([key, gen_key], "w1", LOCK, [b"loaded"])  # re-asserted: no change
    written = backend.publish([key, gen_key], "w1", [b"new", TTL])
    if before == "same":
        assert written == 1 and value_payload(redis_client, key) == b"new"
    else:
        assert written == 0 and state(redis_client, key) in (None, "L")


def test_expectations_travel_with_their_pairs(backend, redis_client, prefix):
    """One lock call over several pairs: each pair is checked against its own row, and ''
    checks nothing (an INSERT, a DELETE, an UPDATE writing every column)."""
    pairs: list[str] = []
    for i in range(3):
        tag = f"{prefix}:{{m:d:{i}}}"
        pairs += (f"{tag}:1", tag)
        seed_value(backend, pairs[-2], tag, f"row{i}".encode())
    backend.lock(pairs, "w1", LOCK, [b"row0", b"stale", b""])
    assert backend.publish(pairs, "w1", [b"n0", TTL, b"n1", TTL, b"n2", TTL]) == 2
    assert value_payload(redis_client, pairs[0]) == b"n0"
    assert redis_client.get(pairs[2]) is None
    assert value_payload(redis_client, pairs[4]) == b"n2"


def test_one_call_handles_many_keys(backend, redis_client, prefix):
    pairs: list[str] = []
    for i in range(200):
        tag = f"{prefix}:{{m:d:{i % 7}}}"
        pairs += (f"{tag}:{i}", tag)
    assert backend.lock(pairs, "w1", LOCK)
    items: list[object] = []
    for i in range(200):
        items += (f"row{i}".encode(), TTL)
    assert backend.publish(pairs, "w1", items) == 200
    assert value_payload(redis_client, pairs[2 * 150]) == b"row150"


# -- a forgotten keyspace registry (lua/registry_whole.lua, see .siblings) -------------------


def _whole_keys(prefix: str) -> tuple[str, str, str]:
    from sqlalchemy_writethrough.keys import (
        registry_key,
        registry_recovery_key,
        registry_version_key,
    )

    return registry_key(prefix), registry_version_key(prefix), registry_recovery_key(prefix)


def test_only_generations_made_before_the_registry_are_replaced(backend, redis_client, prefix):
    """What a recovery replaces: the generations the server made before the registry was made
    again (an entry under one of those may predate the loss), not those made since (their
    entries were filled after a registration in this registry), and an absent generation
    stays absent."""
    old, new, absent = (f"{prefix}:{{m:d:{b}}}" for b in range(3))
    seed_value(backend, f"{old}:1", old)
    since = backend.registry_whole(_whole_keys(prefix), "begin", "me", LEASE)[1]
    seed_value(backend, f"{new}:1", new)
    old_gen, new_gen = redis_client.get(old), redis_client.get(new)
    assert backend.replace_generations_before([old, new, absent], since) == 1
    assert redis_client.get(old) != old_gen
    assert redis_client.get(new) == new_gen
    assert redis_client.get(absent) is None
    assert backend.peek(f"{new}:1", new) not in (None, False)
    assert backend.peek(f"{old}:1", old) is False  # a miss: its generation is gone


def test_a_registry_forgotten_again_during_its_recovery_is_not_called_whole(
    backend, redis_client, prefix
):
    keys = _whole_keys(prefix)
    registry = keys[0]
    assert backend.registry_whole(keys, "begin", "me", LEASE)[0] == 2
    assert backend.registry_whole(keys, "begin", "other", LEASE)[0] == 0  # the lease is mine
    redis_client.delete(registry)  # evicted again while "me" scans
    assert backend.registry_whole(keys, "renew", "me", LEASE)[0] == 0
    assert backend.registry_whole(keys, "end", "me", LEASE)[0] == 0
    assert not redis_client.hexists(registry, "~|whole|0")
    assert backend.registry_whole(keys, "begin", "me", LEASE)[0] == 2  # starts again
    version = redis_client.get(keys[1])
    assert backend.registry_whole(keys, "end", "me", LEASE)[0] == 1
    assert redis_client.hexists(registry, "~|whole|0")
    assert redis_client.get(keys[1]) != version  # lists are read again
    assert redis_client.get(keys[2]) is None  # the lease let go
    assert [f for f in redis_client.hkeys(registry) if b"recovering" in f] == []
    assert backend.registry_whole(keys, "begin", "other", LEASE)[0] == 1


def test_a_registry_made_by_a_registration_records_when(backend, redis_client, prefix):
    """Every registration that finds no '~|since|0' in the registry (a new one, a forgotten
    one, one made by a version before this field) records the server time it made it at."""
    from sqlalchemy_writethrough.keys import registry_key
    from sqlalchemy_writethrough.siblings import Siblings

    siblings = Siblings(prefix, lambda: ())
    before = int(redis_client.time()[0])
    registration = siblings.registration(("t|d:db|4",))
    assert backend.lock(
        [f"{prefix}:{{t:d:0}}:1", f"{prefix}:{{t:d:0}}"], "o", LOCK, None, registration
    )
    since = redis_client.hget(registry_key(prefix), "~|since|0")
    assert since is not None and int(since) // 1_000_000 >= before
    assert not redis_client.hexists(registry_key(prefix), "~|whole|0")


def test_a_recovery_under_way_when_the_registry_node_fails_over_is_not_called_whole(
    backend, redis_client, prefix
):
    """``forget`` (a new epoch on a Redis Cluster node serving the registry) gives the
    registry a new birth: a recovery begun before it replaces the generations made before the
    old one only, so its ``end`` must not mark the registry whole."""
    keys = _whole_keys(prefix)
    assert backend.registry_whole(keys, "begin", "me", LEASE)[0] == 2
    assert backend.registry_whole(keys, "forget", "epoch", LEASE)[0] == 1
    assert backend.registry_whole(keys, "end", "me", LEASE)[0] == 0
    assert not redis_client.hexists(keys[0], "~|whole|0")
    assert backend.registry_whole(keys, "begin", "me", LEASE)[0] == 2  # again, the new birth
    assert backend.registry_whole(keys, "end", "me", LEASE)[0] == 1


def test_a_recovery_begun_on_a_forgotten_registry_does_not_end_another_threads(
    backend, redis_client, prefix
):
    """Two threads (or tasks) of one process make the registry whole at once: they share
    the process's token and lease. The first began on a registry Redis then forgot, and
    replaces only the generations made before that registry's birth; the second began on
    the registry made again. When the first one's ``end`` came, it found the process's
    marker field there (the second's) and called the new registry whole, while a generation
    made between the two births was still in place: the first commit to return served an
    entry no commit going by the new list reaches. Each attempt now has a field of its own:
    the first one starts over, and returns only once that generation is replaced."""
    import threading

    from sqlalchemy_writethrough.keys import registry_key
    from sqlalchemy_writethrough.siblings import Siblings

    siblings = Siblings(prefix, lambda: ())
    registry = registry_key(prefix)

    def register() -> None:  # a lock with its registration, which makes the registry
        registration = siblings.registration(("t|d:db|4",))
        assert backend.lock(
            [f"{prefix}:{{t:d:0}}:1", f"{prefix}:{{t:d:0}}"], "o", LOCK, None, registration
        )

    register()
    scanning = {"first": threading.Event(), "second": threading.Event()}
    go = {"first": threading.Event(), "second": threading.Event()}
    scans: dict[str, int] = {}
    real_scan = backend.generation_keys

    def stalled_scan(*args, **kwargs):
        name = threading.current_thread().name
        scans[name] = scans.get(name, 0) + 1
        if scans[name] == 1:  # each thread's first scan waits for the test
            scanning[name].set()
            assert go[name].wait(10)
        return real_scan(*args, **kwargs)

    backend.generation_keys = stalled_scan
    results: dict[str, bool] = {}

    def recover() -> None:
        name = threading.current_thread().name
        results[name] = siblings.make_whole(backend)

    first = threading.Thread(target=recover, name="first")
    second = threading.Thread(target=recover, name="second")
    try:
        first.start()
        assert scanning["first"].wait(10)  # began on the registry as it is now
        # an entry under a generation made after that registry's birth (its keyspace
        # recorded there only), then Redis forgets the registry, and it is made again
        between = f"{prefix}:{{m:d:0}}"
        seed_value(backend, f"{between}:1", between)
        redis_client.delete(registry)
        register()
        second.start()
        assert scanning["second"].wait(10)  # began on the registry made again
        go["first"].set()
        first.join(10)
        assert results.get("first") is True
        # the first recovery returned: the entry under the generation made before the
        # registry's birth is not served any more
        assert backend.peek(f"{between}:1", between) is False
    finally:
        go["first"].set()
        go["second"].set()
        first.join(10)
        second.join(10)
    assert results.get("second") is True
    assert redis_client.hexists(registry, "~|whole|0")
    assert [f for f in redis_client.hkeys(registry) if b"recovering" in f] == []
