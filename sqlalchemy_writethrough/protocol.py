"""The Redis side of the protocol: the Lua scripts and what their replies mean.

Every state change of an entry is one atomic script (``lua/*.lua``; each file's header lists its
KEYS, ARGV and reply). The scripts take (entity key, generation key) pairs that share a hash tag,
so they run unchanged on Redis Cluster, one call per slot (:func:`split_by_hash_tag`). Nothing
here does I/O: :mod:`.backend` runs these texts over a transport (sync, asyncio or Cluster).

Entry states (docs/consistency.md, "How: locks, leases and a guarded publish"):

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
import hashlib
import secrets
from collections.abc import Sequence
from importlib import resources
from itertools import repeat
from operator import getitem, itemgetter
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
    EPOCH_CHECK = "epoch_check"
    EPOCH_BUMP = "epoch_bump"
    EPOCH_GENS = "epoch_gens"
    REGISTER = "register"
    REGISTRY_WHOLE = "registry_whole"

    @property
    def source(self) -> str:
        return _SOURCES[self]


_SOURCES = {s: _script(s.value) for s in Script}


def new_nonce() -> str:
    """A fresh bucket generation's random part (``BUMP_GENS``, ``RELEASE_GENS``)."""
    return secrets.token_hex(4)


class Scripts:
    """Every script's text and SHA1, as of when the backend was built (``EVALSHA`` runs a
    script by its SHA1; ``SCRIPT LOAD`` of the text after a ``NOSCRIPT`` reply)."""

    __slots__ = ("channel", "sha", "source")

    def __init__(self) -> None:
        self.source = {s: s.source for s in Script}
        self.sha = {s: hashlib.sha1(text.encode()).hexdigest() for s, text in self.source.items()}
        #: the near cache's invalidation channel, which the scripts that change entries
        #: publish on (see :mod:`.near`); '' publishes nothing
        self.channel = ""

    def call(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        """The ``EVALSHA`` command running ``script`` over ``keys`` and ``args`` (and, for a
        script that changes entries, the near cache's channel as its last argument)."""
        if script in NOTIFYING_SCRIPTS:
            return ("EVALSHA", self.sha[script], len(keys), *keys, *args, self.channel)
        return ("EVALSHA", self.sha[script], len(keys), *keys, *args)


#: scripts whose KEYS are (entity key, generation key) pairs, any number of them
PAIR_SCRIPTS = frozenset({Script.LOCK, Script.PUBLISH, Script.RELEASE, Script.INVALIDATE})
#: scripts whose KEYS are generation keys, any number of them
GENERATION_SCRIPTS = frozenset({Script.LOCK_GENS, Script.RELEASE_GENS, Script.BUMP_GENS})
#: scripts that change entries or generations, and tell the near cache (their last ARGV)
NOTIFYING_SCRIPTS = PAIR_SCRIPTS | GENERATION_SCRIPTS | {Script.EPOCH_BUMP}


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first ``{`` and the next ``}``
    when that is not empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def split_by_hash_tag(
    script: Script, keys: Sequence[str], args: Sequence[Any]
) -> list[tuple[list[str], list[Any]]]:
    """A multi-key call of ``script`` as one call per hash tag (for Redis Cluster, where a
    script may touch one slot only), in the order of first appearance. Every such script
    replies with a count, so the replies of the parts add up to the whole call's.
    ``PUBLISH``'s per-pair arguments (payload, ttl) travel with their pair, as do ``LOCK``'s
    expected payloads (one a pair, after owner and ttl, when given)."""
    groups: dict[str, tuple[list[str], list[Any]]] = {}
    if script in PAIR_SCRIPTS:
        per_pair = script is Script.PUBLISH
        expecting = script is Script.LOCK and len(args) > 2
        common = list(args[:1] if per_pair else args[:2] if expecting else args)
        for i in range(0, len(keys), 2):
            group = groups.get(hash_tag(keys[i]))
            if group is None:
                group = groups[hash_tag(keys[i])] = ([], list(common))
            group[0].extend((keys[i], keys[i + 1]))
            if per_pair:
                group[1].extend(args[1 + i : 3 + i])
            elif expecting:
                group[1].append(args[2 + i // 2])
    elif script in GENERATION_SCRIPTS:
        for key in keys:
            group = groups.get(hash_tag(key))
            if group is None:
                group = groups[hash_tag(key)] = ([], list(args))
            group[0].append(key)
    else:
        return [(list(keys), list(args))]
    return list(groups.values())


class Epoch(enum.IntEnum):
    """First element of an EPOCH_CHECK / EPOCH_BUMP reply."""

    NOT_PRIMARY = 0  # second element: the server's role
    VALID = 1  # second element: the epoch key's value
    NEW = 2  # second element: the server's identity; third: the epoch key's value ('' absent)
    MOVED = 3  # the epoch key changed between check and bump: check again


class Fetch(enum.IntEnum):
    """First element of a FETCH reply."""

    LEASED = 0  # miss; the caller holds a lease and may fill; second element: generation
    HIT = 1  # second element: the whole VALUE ('V' gen ':' payload)
    BUSY = 2  # miss; locked by a writer or leased to another reader
    MISS = 3  # miss; no lease was asked for
    DAMAGED = 4  # miss; a damaged entry was replaced (by a lease if asked: second element gen)


def generation_made_us(token: Any) -> int:
    """The server time (microseconds) a generation token was made at (``'t'`` or ``'n'``,
    seconds, ``'.'``, microseconds: ``lua/_common.lua``); 0 for anything else (a generation
    lock, an empty reply), which counts as made long ago."""
    if type(token) is not bytes or token[:1] not in (b"t", b"n"):
        return 0
    seconds, _, rest = token[1:].partition(b".")
    micros = rest.partition(b".")[0]
    if not (seconds.isdigit() and micros.isdigit()):
        return 0
    return int(seconds) * 1_000_000 + int(micros)


def generations_made(calls: Sequence[tuple[Script, Any, Any]], replies: Sequence[Any]) -> list[int]:
    """The server times (microseconds) the generations that FETCH calls leasing an entry,
    and LOCK calls (their newest), replied with were made at (0: of no known form)."""
    made = []
    for (script, _, _), reply in zip(calls, replies, strict=False):  # a registration last
        if type(reply) is not list or len(reply) < 2:
            continue
        if script is Script.LOCK:
            made.append(int(reply[1]))
        elif script is Script.FETCH and reply[0] in (Fetch.LEASED, Fetch.DAMAGED):
            made.append(generation_made_us(reply[1]))
    return made


def locked_count(reply: Any) -> int:
    """The number of keys a script call locked or changed: a LOCK reply's first element, the
    others' whole reply."""
    return int(reply[0]) if type(reply) is list else int(reply)


def current_payload(value: Any, gen: Any) -> memoryview | Literal[False]:
    """The row payload of an entry when it is a VALUE of generation ``gen`` (both as MGET
    returned them); False for anything else (a lock, a lease, another generation, absent)."""
    if type(value) is not bytes or type(gen) is not bytes or value[:1] != b"V":
        return False
    sep = value.find(b":", 1)
    if sep < 0 or value[1:sep] != gen:
        return False
    return memoryview(value)[sep + 1 :]


def current_payloads(values: Sequence[Any], gens: Sequence[Any]) -> list[Any]:
    """:func:`current_payload` of each value against the generation at the same index, in one
    loop; ``values`` may be longer (the generations MGET returned). Each payload is bytes of
    its own here, not a view (see :func:`payloads_after`)."""
    return payloads_after(values, [value_prefix(gen) for gen in gens])


def value_prefix(gen: Any) -> bytes | None:
    """What a VALUE of generation ``gen`` (as MGET returned it) starts with, up to its
    payload: ``'V' gen ':'``; None when no entry can be a current VALUE (no generation, or
    one holding ':', which a generation lock may: :func:`current_payload` never finds the
    payload of such a generation's VALUE current, as its separator is the first ':')."""
    if type(gen) is not bytes or b":" in gen:
        return None
    return b"V" + gen + b":"


def payloads_after(values: Sequence[Any], prefixes: Sequence[bytes | None]) -> list[Any]:
    """The payload of each value that starts with the :func:`value_prefix` of its
    generation (at the same index), else False: :func:`current_payload`'s answer, for the
    batch read path. One ``startswith`` an entry rather than a search for the separator and
    two comparisons; the payload is a slice of the reply's bytes (a copy of a few hundred
    bytes costs fewer instructions than a memoryview and its view, and decoding slices it
    again).

    When every value (of those with a prefix: an MGET's reply ends with the generations) is
    bytes that starts with its own prefix, the values' heads, each sliced at its prefix's
    length, are the prefixes: compared as lists, then the payloads sliced, each in C
    (``map``), with no Python loop per entry (``bytes.startswith`` parses its arguments as a
    tuple: about 1,000 instructions a call). Prefixes of one length (the buckets'
    generations alike) take one ``itemgetter`` of a slice; of several (a generation is a
    timestamp: ``t1.5`` beside ``t1.25``), a slice each. Anything else (a null, an entry of
    another generation or none) takes the loop."""
    count = len(prefixes)
    held: Any = prefixes
    try:
        lengths = list(map(len, held))
    except TypeError:  # a bucket without a current generation (None)
        lengths = []
    if lengths:
        values = values[:count]
        try:
            if lengths.count(lengths[0]) == count:
                size = lengths[0]
                if list(map(itemgetter(slice(None, size)), values)) == held:
                    return list(map(itemgetter(slice(size, None)), values))
            elif list(map(getitem, values, map(slice, lengths))) == held:
                return list(map(getitem, values, map(slice, lengths, repeat(None))))
        except TypeError:  # a null
            pass
    found: list[Any] = []
    append = found.append
    for value, prefix in zip(values, prefixes, strict=False):
        if prefix is not None and type(value) is bytes and value.startswith(prefix):
            append(value[len(prefix) :])
        else:
            append(False)
    return found


def payload_of(value: bytes) -> memoryview:
    """The row payload inside a VALUE entry ('V' <generation> ':' <payload>)."""
    return memoryview(value)[value.index(b":", 1) + 1 :]
