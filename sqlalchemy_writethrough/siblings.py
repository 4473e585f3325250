"""The other keyspaces of a table: what a commit must invalidate besides its own entries.

A row's key names its model's digest and bucket count (:mod:`.keys`). During a rolling deploy
two code versions share a prefix with two models of one table (a column added, ``buckets``
changed): two keyspaces, each holding its own entry of the row. A commit by one must not leave
the other's entry as it was, so every keyspace of the table in the same database that the
keyspace registry lists (a *sibling*) gets the committed row's key locked with the row's own,
and left as a miss by the publish (another digest's format cannot be encoded here), or restored
by a rollback.

Which siblings exist is read from the registry, whose version (a nonce the registration of a
new field replaces, :func:`.keys.registry_version_key`) every publish reads in its own round
trip. When it is not the version the commit's list was read at, the registry is read again
and the rows' keys in the siblings found since are invalidated (``invalidate.lua``: values
deleted, leases voided, other locks contended) before ``commit()`` returns. This relies on a
keyspace being in the registry before any of its entries can be filled or published: every
lease's fetch (:mod:`.loading`) and every commit's lock (:mod:`.writing`) records its
keyspaces in the same round trip (:meth:`Siblings.registration`; pipelined behind the fetch
or lock: :class:`.backend.Registration` says why), so a sibling registered after the publish
read the version can only have read the row after COMMIT. Every
time, not once per process: Redis may have forgotten the registry since (a ``FLUSHALL``,
another process's ``cache.clear()``) while the entries written after that are there.

Redis can forget the registry while the entries it listed stay: evicted under an
``allkeys-*`` policy, deleted by hand, or missing from a snapshot taken meanwhile. The next
registration makes a new one listing only the keyspaces registered since, and the others'
entries, read by hits (which record nothing), would outlive commits that no longer lock them.
A registry is *whole* while it holds the field :data:`.keys.REGISTRY_WHOLE`, which goes with
it. A transaction whose list lacked the field (a forgotten registry, or none read yet), or
whose lock's registration found the registry without it, does not return from ``commit()``
before the registry is whole again (:meth:`Siblings.make_whole`):
one process replaces every generation key of the prefix (found by ``SCAN``) and marks the
registry whole, the others wait for it, so no entry filled before the loss is served after
such a commit. Entries filled since were registered first, and reached as above.

Reading the registry never raises: a failure falls back to the commit's own keyspace (logged
once).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .backend import Registration, VersionProbe
from .keys import (
    REGISTRY_WHOLE,
    KeySpace,
    registry_key,
    registry_pruning_key,
    registry_recovery_key,
    registry_version_key,
)

if TYPE_CHECKING:
    from .backend import Backend
    from .journal import Journal

log = logging.getLogger("sqlalchemy_writethrough")

#: seconds after which a list is read again even if the version did not change (a process of
#: a version before this one registers without changing it)
_MAX_AGE = 60.0
#: how long the lease of a process making the registry whole lasts (renewed between its
#: steps): another process takes over this long after it died
_WHOLE_LEASE_MS = 10_000
#: how long a commit waits for another process to make the registry whole, at most
_WHOLE_WAIT = 30.0
#: generation keys replaced per script call while making the registry whole
_WHOLE_BATCH = 500
#: seconds of SCAN between two renewals of that lease (and of its marker field)
_WHOLE_RENEW = 2.0


class Known:
    """The registry as one read found it: its version and fields, each table's keyspaces
    (by database), and the siblings of this process's generation keys, made as asked."""

    __slots__ = (
        "at",
        "by_table",
        "fields",
        "read",
        "registering",
        "siblings",
        "version",
        "whole",
    )

    def __init__(self, prefix: str, fields: Iterable[str], version: Any, read: bool) -> None:
        self.version = version
        #: whether this is a registry read (False: nothing read yet, or it failed)
        self.read = read
        self.at = time.monotonic()
        self.fields = frozenset(fields)
        #: whether this list is one of a whole registry (see the module's docstring): a
        #: transaction that went by another does not return before the registry is whole
        self.whole = read and REGISTRY_WHOLE in self.fields
        #: (table, database digest) -> [(field, keyspace)]
        self.by_table: dict[tuple[str, str], list[tuple[str, KeySpace]]] = {}
        for field in sorted(self.fields):
            try:
                table, digest, buckets = field.rsplit("|", 2)
                keys = KeySpace(prefix, table, digest, int(buckets))
            except ValueError:  # not one of ours
                continue
            if not keys.generation_keys():  # a marker (REGISTRY_WHOLE...), not a keyspace
                continue
            self.by_table.setdefault((table, database_of(digest)), []).append((field, keys))
        #: own generation key -> its keyspace's siblings (filled by Siblings._lookup)
        self.siblings: dict[str, tuple[tuple[str, KeySpace], ...]] = {}
        #: registry fields -> the arguments of their registration against this version
        self.registering: dict[tuple[str, ...], tuple[str | bytes, ...]] = {}


def database_of(digest: str) -> str:
    """The database part of a keyspace's digest (``<schema digest>:<database>``)."""
    return digest.split(":", 1)[1] if ":" in digest else ""


class Siblings:
    """This process's list of the registry, and the sibling keys of the keys it locks."""

    def __init__(
        self,
        prefix: str,
        own: Callable[[], Iterable[KeySpace]],
        lifetime_ms: Callable[[tuple[str, ...]], int] = lambda fields: 0,
        lifetime_stamp: Callable[[], Hashable] = lambda: None,
        on_made_whole: Callable[[], object] = lambda: None,
    ) -> None:
        self.prefix = prefix
        self._own = own
        #: the milliseconds after a registration of some keyspaces during which an entry of
        #: one (or a near-cache copy of one) may exist: what a registration asks the registry
        #: to keep their fields for; worked out again when ``lifetime_stamp()`` changes (a
        #: model built or registered again, a near cache added), never shorter than before
        self._lifetime = lifetime_ms
        self._stamp = lifetime_stamp
        self._lifetime_stamp: Hashable = ()
        self._lifetimes: dict[str, int] = {}
        self._registry = registry_key(prefix)
        self._version_key = registry_version_key(prefix)
        self.known = Known(prefix, (), None, False)
        self._logged = False
        self._register_logged = False
        self._keys = (self._registry, self._version_key, registry_pruning_key(prefix))
        self._whole_keys = (self._registry, self._version_key, registry_recovery_key(prefix))
        self._whole_logged = False
        #: called when this process made a forgotten registry whole, buckets replaced
        self._on_made_whole = on_made_whole
        #: part of the version a registration of this process sets when it adds a field
        self._token = secrets.token_hex(6)
        #: this process's token in the lease of making the registry whole: one for all its
        #: attempts, so that the lease an attempt left behind (Redis failed after 'begin'
        #: took it, or refused the rest of the script) never makes a later commit of this
        #: process wait for its expiry; its threads' attempts may overlap (each replaces
        #: generations, the first 'end' makes it whole, the others see that at 'renew'), each
        #: with a marker field of its own (see _make_whole); so may those of processes forked
        #: from one that had made this object (a server's preloaded app)
        self._whole_token = secrets.token_hex(8)
        #: Redis may have forgotten the registry since this process last saw it whole (a new
        #: epoch, ``clear()``): registrations go ahead of their calls too until it is seen so
        self._doubted = False

    def registration(self, fields: tuple[str, ...]) -> Registration:
        """The registration of keyspaces (their registry fields) that a lease's fetch or a
        commit's lock sends with it; :meth:`registered` reads its reply. The version
        this process knows goes with it: the reply lists the registry's fields only when the
        version is another."""
        known = self.known
        stamp = self._stamp()
        if stamp != self._lifetime_stamp:  # a model built since, a near cache added
            self._lifetime_stamp = stamp
            known.registering.clear()
        args = known.registering.get(fields)
        if args is None:
            # never shorter than before: entries made under a longer one may still be there
            lifetimes = self._lifetimes
            lifetime = max([self._lifetime(fields), *(lifetimes.get(f, 0) for f in fields)])
            for field in fields:
                lifetimes[field] = lifetime
            args = known.registering[fields] = (
                self._token,
                known.version or "",
                str(lifetime),
                *fields,
            )
        lead = self._doubted or not known.whole
        return Registration(self._keys, args, fields, not known.read, lead)

    def doubt(self) -> None:
        """Redis may have forgotten the registry (see ``_doubted``)."""
        self._doubted = True

    def registered(self, registration: Registration, address: str) -> bool:
        """What a registration's reply says: the registry as it found it, when its version
        is not the one this process knows. False when Redis refused it (an ACL without
        HSET, an out-of-memory server): no entry of these keyspaces may then be filled or
        published, since a commit of another code version would not find them to invalidate
        (logged once; a round trip that failed says so itself, and fills and locks nothing)."""
        reply = registration.reply
        if reply is None:
            if registration.error is None:
                return True
            if not self._register_logged:
                self._register_logged = True
                log.warning(
                    "writethrough: Redis at %s: recording a keyspace in the registry failed "
                    "(%s); until it succeeds, reads and commits of its models leave misses: "
                    "a commit of another code version could not find its entries to "
                    "invalidate them (rolling deploys: see docs/consistency.md; the ACL: "
                    "docs/running-redis.md)",
                    address,
                    registration.error,
                )
            return False
        if type(reply) is list and len(reply) > 1:  # else 0: the version this process knows
            fields = [f.decode() if isinstance(f, bytes) else str(f) for f in reply[1]]
            self.learn(fields, reply[0])
        if self._doubted and self.known.whole:
            self._doubted = False
        return True

    def probe(self) -> VersionProbe:
        """What a publish (or ``Backend.probe_version``) fills with the registry's version."""
        return VersionProbe(self._version_key)

    @staticmethod
    def unchanged(known: Known, probe: VersionProbe, covered: frozenset[str] | None) -> bool:
        """Whether ``probe`` found the registry as ``known`` (the commit's first list) had
        it, and every list the commit's locks went by named what it named: then
        :meth:`check` has nothing to do. The common case, so cheap: one comparison of
        versions and an identity test (the covered fields are the first list's own set
        until a lock goes by another list)."""
        return (
            known.read
            and probe.value == known.version
            and (covered is None or covered is known.fields or covered == known.fields)
            and time.monotonic() - known.at < _MAX_AGE
        )

    # -- lock time -------------------------------------------------------------------------------

    def extra(
        self, pairs: Sequence[str], known: Known | None = None, only: frozenset[str] | None = None
    ) -> list[str]:
        """(entity key, generation key) pairs of the rows of ``pairs`` in their keyspaces'
        siblings (``only``: those with these registry fields), none already in ``pairs``."""
        if known is None:
            known = self.known
        if not known.by_table:
            return []
        siblings = known.siblings
        found: dict[str, tuple[tuple[str, KeySpace], ...]] = {}
        for gen_key in set(pairs[1::2]):
            of = siblings.get(gen_key)
            if of is None:
                of = self._lookup(known, gen_key)
            if only is not None:
                of = tuple(s for s in of if s[0] in only)
            if of:
                found[gen_key] = of
        if not found:
            return []
        seen = set(pairs[0::2])
        extra: list[str] = []
        for i in range(0, len(pairs), 2):
            of = found.get(pairs[i + 1])
            if of is None:
                continue
            part = pairs[i][len(pairs[i + 1]) + 1 :]
            for _, keys in of:
                key, gen_key = keys.pair_of_part(part)
                if key not in seen:
                    seen.add(key)
                    extra += (key, gen_key)
        return extra

    def extra_buckets(
        self,
        gen_keys: Sequence[str],
        known: Known | None = None,
        only: frozenset[str] | None = None,
    ) -> list[str]:
        """Every generation key of the siblings of the keyspaces of ``gen_keys`` (a bucket's
        rows fall in any bucket of a sibling with another bucket count)."""
        if known is None:
            known = self.known
        if not known.by_table:
            return []
        seen = set(gen_keys)
        extra: list[str] = []
        for gen_key in gen_keys:
            of = known.siblings.get(gen_key)
            if of is None:
                of = self._lookup(known, gen_key)
            for field, keys in of:
                if only is not None and field not in only:
                    continue
                for g in keys.generation_keys():
                    if g not in seen:
                        seen.add(g)
                        extra.append(g)
        return extra

    def _lookup(self, known: Known, gen_key: str) -> tuple[tuple[str, KeySpace], ...]:
        """The siblings of the keyspace whose bucket ``gen_key`` is, recorded for each of its
        buckets; none for a key of no keyspace of this process (a sibling's own)."""
        siblings = known.siblings
        for keys in self._own():
            field = keys.registry_field
            table, digest, _ = field.rsplit("|", 2)
            of = tuple(
                s for s in known.by_table.get((table, database_of(digest)), ()) if s[0] != field
            )
            for g in keys.generation_keys():
                siblings[g] = of
        return siblings.setdefault(gen_key, ())

    # -- after COMMIT ----------------------------------------------------------------------------

    def learn(self, fields: Iterable[str], version: Any) -> None:
        """The registry as another read (a registration's) found it."""
        known = self.known
        if known.read and known.version == version and known.fields.issuperset(fields):
            known.at = time.monotonic()  # still what it was: kept, with its siblings found
            return
        self.known = Known(self.prefix, fields, version, True)

    def refresh(self, backend: Backend) -> Known | None:
        """Read the registry again (None when it could not be read: logged once)."""
        # no lock held across I/O: an asyncio flavour's sessions share this thread (two
        # reads at once are harmless, the last one stays)
        read = backend.read_registry_version(self._registry)
        if read is None:
            self._cannot_read(backend.address, None)
            return None
        fields, version = read
        known = self.known = Known(self.prefix, fields, version, True)
        return known

    def _cannot_read(self, address: str, error: BaseException | None) -> None:
        """Log, once per process, that the registry (or its version) could not be read."""
        if self._logged:
            return
        self._logged = True
        log.warning(
            "writethrough: Redis at %s: the keyspace registry could not be read%s; commits "
            "invalidate their own keyspaces only until it can (rolling deploys: see "
            "docs/consistency.md)",
            address,
            "" if error is None else f" ({error})",
        )

    def check(
        self,
        backend: Backend,
        known: Known,
        probe: VersionProbe | None,
        pairs: Sequence[str],
        gen_keys: Sequence[str],
        journal: Journal | None = None,
        covered: frozenset[str] | None = None,
    ) -> None:
        """After a publish: when the registry changed since ``known`` (the list the commit's
        first lock used), read it again and invalidate the rows (and buckets) of the commit in
        the siblings not in ``covered`` (the fields every list its locks went by named;
        ``known``'s by default): found since, or missing from a later lock's list
        (journaled when Redis fails meanwhile). Never raises."""
        if probe is None or not probe.read:
            # the publish failed (journaled), or Redis refused the version's read
            if probe is not None and probe.error is not None:
                self._cannot_read(backend.address, probe.error)
            return
        if self.unchanged(known, probe, covered):
            return
        if covered is None:
            covered = known.fields
        now = time.monotonic()
        try:
            current = self.known
            if not (
                current.read
                and current.version == probe.value
                and current is not known
                and now - current.at < _MAX_AGE
            ):
                found = self.refresh(backend)
                if found is None:
                    return
                current = found
            if not current.whole:
                # Redis forgot the registry since this commit's locks went by a whole one: a
                # keyspace registered meanwhile (whose entry may hold the row as it was before
                # the COMMIT) may be gone from it with the rest
                self.make_whole(backend)
            new = current.fields - covered
            if not new:
                return
            extra = self.extra(pairs, current, new)
            if extra and not backend.invalidate(extra) and journal is not None:
                journal.add_pairs(extra)
            buckets = self.extra_buckets(gen_keys, current, new) if gen_keys else []
            if buckets and not backend.bump_generations(buckets) and journal is not None:
                journal.add_buckets(buckets)
        except Exception:  # never raise after COMMIT
            log.debug("writethrough: checking the keyspace registry failed", exc_info=True)

    # -- a forgotten registry --------------------------------------------------------------------

    def make_whole(self, backend: Backend, wait: bool = True) -> bool:
        """Return once the registry is whole (see the module's docstring): made whole by this
        process (every generation key of the prefix replaced), or by another one meanwhile.
        False when Redis failed or another process took longer than ``_WHOLE_WAIT`` (logged
        once), or at once when another process is at it and ``wait`` is False (a journal
        replay: that process's recovery covers its rows). Never raises: it runs after
        COMMIT."""
        try:
            return self._make_whole(backend, wait)
        except Exception:
            log.debug("writethrough: making the keyspace registry whole failed", exc_info=True)
            return False

    def _make_whole(self, backend: Backend, wait: bool) -> bool:
        keys, token = self._whole_keys, self._whole_token
        # the process's threads and tasks share its token and lease; each call's steps are
        # told apart by this (see lua/registry_whole.lua: one begun on a registry Redis then
        # forgot must not end another's recovery of the registry made again)
        attempt = secrets.token_hex(4)
        deadline = time.monotonic() + _WHOLE_WAIT
        pause = 0.002
        step = 0
        while True:
            if time.monotonic() > deadline:  # however it got here: never forever
                break
            step, detail = backend.registry_whole(keys, "begin", token, _WHOLE_LEASE_MS, attempt)
            if step == 1:
                self._learn_whole(detail)
                return True
            if step == 2:
                since: str = detail
                replaced = self._replace_generations(backend, keys, token, since, attempt)
                if replaced is None:
                    break
                if replaced < 0:  # forgotten again meanwhile
                    continue
                step, detail = backend.registry_whole(keys, "end", token, _WHOLE_LEASE_MS, attempt)
                if step < 0:
                    break
                if step == 1:
                    self._learn_whole(detail)
                    self._made_whole(backend.address, replaced)
                    return True
                continue
            if not wait and step == 0:
                return False
            if step < 0:
                break
            backend.transport.sleep(pause)  # another process is at it
            pause = min(pause * 2, 0.05)
        if not self._whole_logged:
            self._whole_logged = True
            log.warning(
                "writethrough: Redis at %s: the keyspace registry was forgotten (evicted?) and "
                "could not be made whole again%s; until it is, a commit may leave entries of "
                "other code versions' keyspaces as they were (docs/running-redis.md, eviction)",
                backend.address,
                "" if step < 0 else f" within {_WHOLE_WAIT:.0f} s",
            )
        return False

    def _replace_generations(
        self, backend: Backend, keys: Sequence[str], token: str, since: str, attempt: str
    ) -> int | None:
        """Replace the prefix's generations made before the registry (``since``), renewing
        the lease as it goes (every ``_WHOLE_RENEW`` seconds of the SCAN, and between
        batches): how many, -1 when the registry was forgotten again meanwhile, None when
        Redis failed."""

        def renew() -> bool:
            return backend.registry_whole(keys, "renew", token, _WHOLE_LEASE_MS, attempt)[0] == 2

        found = backend.generation_keys(self.prefix, renew, _WHOLE_RENEW)
        if found is None:
            return None
        if found is False:
            return -1
        replaced = 0
        for start in range(0, len(found), _WHOLE_BATCH):
            if start and not renew():  # forgotten again, or Redis failed: begin again
                return -1
            n = backend.replace_generations_before(found[start : start + _WHOLE_BATCH], since)
            if n is None:
                return None
            replaced += n
        return replaced

    def _learn_whole(self, registry: tuple[Any, list[str]] | None) -> None:
        """The registry as a step that found it whole read it: the next commit's locks go
        by a whole list (none of its own to make whole again)."""
        if registry is not None:
            version, fields = registry
            self.learn(fields, version)

    def _made_whole(self, address: str, replaced: int) -> None:
        if replaced:  # a new prefix, a flushed server: nothing was there to replace
            self._on_made_whole()
            log.warning(
                "writethrough: Redis at %s: the keyspace registry had been forgotten (evicted "
                "under an allkeys-* policy, deleted by cache.clear() or FLUSHALL, or restored "
                "without it): %d bucket generations replaced, so no entry of a keyspace it no "
                "longer listed is served again (docs/running-redis.md, eviction)",
                address,
                replaced,
            )
        else:
            log.debug("writethrough: Redis at %s: the keyspace registry was made", address)
