"""The write path: lock before COMMIT, publish after it, restore after a rollback.

``before_flush``  the entries of rows the flush is about to write, as far as their keys are
                  known now (updated and deleted rows, inserts with their primary key set),
                  get their lock script *sent*; its reply is read in ``after_flush``, so the
                  Redis round trip runs while the database executes the flush.
``after_flush``   the rows a flush wrote are snapshotted from ``state.dict`` (never by reading
                  attributes, which could emit SQL) and their entries locked, before COMMIT.
                  Rows the database changes by itself (``ON DELETE CASCADE`` with
                  ``passive_deletes``, ``ON UPDATE CASCADE``, declared trigger effects) get
                  their whole model locked (:mod:`.dml` does the same for statements).
``before_commit`` locks that may have expired during a long transaction are taken again.
``after_commit``  the root transaction's entries are published in one round trip, and its
                  locked models get new generations (with ``publish="background"``, queued
                  for the cache's background worker instead: see :mod:`.background`).
``after_transaction_end``  a savepoint hands its changes to its parent; the root, if it did not
                  commit (rollback, failed flush, ``close()``), releases its locks, which restores
                  the previous values where nobody else touched them.

After the database COMMIT nothing here raises: the data is safe in the database, and an entry
whose publish failed is still locked, so readers go to the database; the keys are journaled with
the transaction's owner token, and the replay drops those locks when Redis answers again (a
process that dies first leaves them to expire into misses).
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.horizontal_shard import ShardedSession

from . import _sa_compat
from ._rng import random
from .background import Job, Publisher
from .codec import IMMUTABLE, EncodeError, FlushContext, pack_row
from .databases import connection_naming
from .dml import SWITCHED, StatementTracker
from .exc import CacheUnavailableError
from .protocol import Script, new_nonce
from .siblings import Known
from .stats import INVALIDATION_REASONS
from .tracing import record_span
from .tracking import Change, SessionTracker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, SessionTransaction

    from .backend import Registration
    from .keys import KeySpace
    from .model import ModelLayout
    from .runtime import Runtime

log = logging.getLogger("sqlalchemy_writethrough")

#: counts to add: ((model, counter name), n), see :meth:`.stats.Counters.add_many`
Tally = list[tuple[tuple[str, str], int]]

#: ``session.info`` key: when the running ``commit()`` began (its latency, and whether a
#: transaction that ends without committing was being committed)
_COMMIT_STARTED = "writethrough.commit_started"


class WritePath:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.statements = StatementTracker(runtime, self)
        #: generation key -> model name, for the per-model stats of a transaction's keys
        self._models: dict[str, str] = {}
        #: the background worker of ``publish="background"`` (set by the cache)
        self.publisher: Publisher | None = None
        self.retirement = runtime.retirement

    # -- flush ---------------------------------------------------------------------------

    def before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        tracker = self.runtime.tracker(session)
        tracker.in_flush = True
        # what the flush will write as far as the session knows now (before_flush listeners
        # added after this one are seen by after_flush, which reads the flush's own states)
        modified, deleted, new = _sa_compat.pending_states(session)
        if not (tracker.began or tracker.external) and (new or modified or deleted):
            # only a transaction's first database activity needs a look at its binds
            tracker.note_first_flush(session, (modified, deleted, new))
        if tracker.pending_lock is not None:  # the last flush stopped before after_flush
            self._finish_locks(tracker)
        if tracker.flush_keys:  # the last flush's (it stopped before after_flush)
            tracker.flush_keys = {}
        if (
            not tracker.reassert_on_flush
            # the transaction that will end (and finish the reply) if the flush never runs
            and session.get_transaction() is not None
        ):
            self._send_locks(session, tracker, (modified, deleted, new))

    def _send_locks(
        self, session: Session, tracker: SessionTracker, pending: tuple[list[Any], ...]
    ) -> None:
        """Send the locks of the entries this flush will write, as far as their keys are known
        before it runs; after_flush reads the reply and locks whatever else it wrote. A key
        locked here that the flush does not write after all ends as a miss.

        Each row's key is kept in ``tracker.flush_keys`` for after_flush, which reuses it when
        the row's key space and primary key are still the same (one key computed per row),
        and so is the row as loaded with its columns' stored values, where it is encoded
        here: after_flush's publish takes the stored value of each column still holding the
        very (immutable) object encoded here, one encode per column and row."""
        rt = self.runtime
        pairs: list[str] = []
        seen: set[str] = set()
        binds = FlushBinds(session)
        locked = tracker.locked
        renamed = tracker.renamed
        flush_keys: dict[Any, tuple[Any, Any, str, str, Any]] = {}
        tracker.flush_keys = flush_keys
        involved: set[ModelLayout] = set()
        # per class, in a session that is not sharded: its layout, key space, bind, the type
        # of its single-column key (else None) and the encoder of its rows as loaded (None:
        # not made yet; False: none), once
        per_mapper: dict[Any, list[Any] | None] = {}
        sharded = binds.sharded
        # the rows as loaded, of UPDATEs that leave loaded columns unwritten (see _loaded_row)
        expected: list[bytes] | None = None
        expected_rows = tracker.expected
        encoders: dict[tuple[Any, Any], Any] = {}
        # the keyspaces of the keys locked, recorded in the registry with their locks
        spaces: dict[str, None] = {}
        last: KeySpace | None = None
        for index, collection in enumerate(pending):
            updating = index == 0  # the modified rows (pending: modified, deleted, new)
            for state in collection:
                mapper = state.mapper
                found = per_mapper.get(mapper, _UNSEEN)
                if found is _UNSEEN:
                    found = None
                    model = rt.models.layout_for(mapper)
                    if model is not None:
                        bind = binds.of(state, choose=False)
                        if bind is not None:  # else its shard is chosen by the flush
                            found = [
                                model,
                                rt.models.keys(model, bind, renamed.get(bind)),
                                bind,
                                model.pk_types[0] if len(model.pk_types) == 1 else None,
                                # strategy="invalidate": no row as loaded goes with the lock
                                False if model.options.strategy == "invalidate" else None,
                            ]
                    if not sharded:
                        per_mapper[mapper] = found
                if found is None:
                    continue  # not cached, or after_flush locks it
                layout, keys, bind, pk_type, encode = found
                identity = state.key
                if identity is not None:
                    pk = identity[1]
                    if pk_type is not None:  # a single-column key: pk_is_cacheable inline
                        if type(pk[0]) is not pk_type and not layout.pk_is_cacheable(pk):
                            continue  # after_flush invalidates the model
                    elif not layout.pk_is_cacheable(pk):
                        continue  # a partly NULL key (allow_partial_pks): never cached
                else:
                    dict_ = state.dict
                    pk = tuple([dict_.get(a) for a in layout.pk_attrs])
                    if not layout.pk_is_cacheable(pk):  # None, a SQL expression: no key
                        continue  # the database assigns it: after_flush locks it
                key, gen_key = keys.pair(pk)
                if key in locked or key in seen:
                    flush_keys[state] = (keys, pk, key, gen_key, None)
                    continue
                if layout not in involved:
                    involved.add(layout)
                    self._involve(tracker, layout)
                seen.add(key)
                loaded = kept = None
                if updating and identity is not None and encode is not False:
                    if encode is None:
                        encode = encoders.get((mapper, bind))
                        if encode is None:
                            encode = encoders[(mapper, bind)] = _loaded_encoder(
                                session, layout, mapper, bind
                            )
                        found[4] = encode
                    if encode is not False:
                        loaded, kept = _loaded_row(state, encode)
                # kept: for after_flush's encode (see above)
                flush_keys[state] = (keys, pk, key, gen_key, kept)
                if loaded is not None:
                    expected_rows[key] = loaded
                    if expected is None:
                        expected = [b""] * (len(pairs) // 2)
                if expected is not None:
                    expected.append(loaded or b"")
                pairs += (key, gen_key)
                if keys is not last:
                    last = keys
                    spaces[keys.registry_field] = None
        if not pairs:
            return
        more = self._siblings(tracker, pairs)
        if more:
            pairs += more
            if expected is not None:
                expected += [b""] * (len(more) // 2)
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        tracker.spaces.update(spaces)
        tracker.pending_lock = rt.backend.send_lock(
            pairs,
            tracker.owner_token(),
            tracker.lock_ms,
            expected,
            rt.siblings.registration(tuple(spaces)),
        )

    def _finish_locks(self, tracker: SessionTracker, hold: bool = False) -> None:
        """Read the reply of the locks before_flush sent: after the flush's statements, or,
        when the flush stopped early (nothing to write after all, a listener raising, a
        failure), at the next flush, before COMMIT, or at the end of the transaction. A key
        locked for a row that was not written then ends as a miss, or is restored.

        ``hold``: the flush runs inside ``commit()`` and the publish will be synchronous:
        the lock's connection stays checked out for it (``tracker.held``), one pool checkout
        and release fewer. after_commit, or at the latest the end of the transaction, gives
        it back."""
        pending = tracker.pending_lock
        if pending is None:
            return
        tracker.pending_lock = None
        pairs = list(pending.keys)
        for i in range(0, len(pairs), 2):
            tracker.locked[pairs[i]] = pairs[i + 1]
        started = perf_counter()
        backend = self.runtime.backend
        if hold and tracker.held is None:
            ok = backend.finish(pending, True) is not None
            tracker.held = pending.held
        else:
            ok = backend.finish(pending) is not None
        rt = self.runtime
        sent = pending.register
        if sent is not None:
            self._registered(tracker, sent, backend.address)
        if not ok and rt.backend is not backend:
            # refused as only a Redis Cluster node refuses: the cache switched to the cluster
            # (the first command a plain client sends there may be these locks): once more
            args = pending.args
            register = None if sent is None else rt.siblings.registration(sent.fields)
            expected = list(args[2:]) if len(args) > 2 else None
            ok = rt.backend.lock(pairs, args[0], args[1], expected, register)
            if register is not None:
                self._registered(tracker, register, rt.backend.address)
        self._locked(tracker, pairs, started, ok)
        if not ok:
            self._lock_failed(tracker, pairs=pairs)

    def after_flush(self, session: Session, flush_context: Any) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        rt = self.runtime
        if rt.journal.pending:
            rt.journal_replayed()  # a process that only writes replays here
        tracker = rt.tracker(session)
        tracker.in_flush = False
        tracker.wrote = True
        if tracker.pending_lock is not None:
            # inside commit() (see before_commit), with a synchronous publish to come: the
            # lock's connection is kept for it
            self._finish_locks(
                tracker,
                hold=tracker.background is False
                and _COMMIT_STARTED in session.info
                and not tracker.external,
            )
        transaction = session.get_nested_transaction() or session.get_transaction()
        contexts: dict[Any, FlushContext] = {}
        # (key, generation key, keyspace) of every row the flush wrote
        touched: list[tuple[str, str, KeySpace]] = []
        # models whose every row may have changed, with the bind of the database they are in
        models: list[tuple[ModelLayout, Any]] = []
        binds = FlushBinds(session)

        announced: set[tuple[ModelLayout, Any]] = set()

        def context_for(bind: Any, layout: ModelLayout) -> FlushContext:
            ctx = contexts.get(bind)
            if ctx is None:
                ctx = contexts[bind] = FlushContext(
                    bind.dialect, lambda: session.connection(bind_arguments={"bind": bind})
                )
            if (layout, bind) not in announced:  # once per model, database and flush
                announced.add((layout, bind))
                layout.announce(ctx)
            return ctx

        changes = tracker.changes.setdefault(transaction, {})
        statement_keys = tracker.statement_keys
        # the keys before_flush computed for this flush's rows (see _send_locks)
        flush_keys = tracker.flush_keys
        if flush_keys:
            tracker.flush_keys = {}
        # once per model, database and flush: its key space
        involved: dict[tuple[ModelLayout, Any], KeySpace] = {}
        # once per model and flush: its TTL and the TTL's random spread (jitter), in ms
        ttls: dict[ModelLayout, tuple[float, float]] = {}

        def involve(layout: ModelLayout, bind: Any) -> KeySpace:
            """Once per model, database and flush: its options, the models its rows change
            too, and its key space."""
            self._involve(tracker, layout)
            models.extend((other, bind) for other in rt.models.also_invalidated(layout))
            keys = rt.models.keys(layout, bind, tracker.renamed.get(bind))
            if keys.self_written:  # its triggers write its table: maybe other rows
                models.append((layout, bind))
            involved[(layout, bind)] = keys
            if layout not in ttls:
                ttls[layout] = rt.ttl_spread(layout)
            return keys

        def record(
            keys: KeySpace,
            layout: ModelLayout,
            pk: Any,
            payload: bytes | None,
            reason: str,
        ) -> None:
            if not layout.pk_is_cacheable(pk):
                return  # a partly NULL key: no entry was ever made for it
            key, gen_key = keys.pair(pk)
            if key in statement_keys:
                payload, reason = None, "statement"
            ttl, spread = ttls[layout]
            # as Runtime.ttl_ms: less a random jitter, so entries written together do not
            # expire together
            changes[key] = Change(gen_key, payload, max(1, int(ttl - spread * random())), reason)
            touched.append((key, gen_key, keys))

        # what the unit of work wrote: the session's objects after every before_flush
        # listener, and the rows its relationships deleted or changed (orphans)
        deleted, inserted_states, updated = _sa_compat.flushed_states(session, flush_context)
        # once per class and database: the cached models its tables' triggers write
        triggered: set[tuple[Any, Any]] = set()

        def trigger_writes(mapper: Any, bind: Any) -> None:
            if (mapper, bind) not in triggered:
                triggered.add((mapper, bind))
                written = rt.models.trigger_written(mapper.tables, bind, tracker.renamed.get(bind))
                models.extend((other, bind) for other in written)

        for state in deleted:
            mapper = state.mapper
            bind = binds.of(state)
            cascades = rt.models.cascades(mapper.local_table, deleted=True, orm_handles=mapper)
            models += ((other, bind) for other in cascades)
            trigger_writes(mapper, bind)
            layout = rt.models.layout_for(mapper)
            if layout is None or state.key is None:
                continue
            keys = involved.get((layout, bind)) or involve(layout, bind)
            pk = state.key[1]
            if not layout.pk_is_cacheable(pk) and all(v is not None for v in pk):
                # a key of a value of another type than the column's (5.0 for 5, an IntEnum
                # member) may stand for a cached row no key we can name holds
                models.append((layout, bind))
                continue
            record(keys, layout, pk, None, "delete")

        # per class, in a session that is not sharded (the bind is then the model's): what
        # every row of it shares, looked up once per flush
        per_mapper: dict[Any, tuple[Any, ...]] = {}
        sharded = binds.sharded
        # the contexts before_flush encoded rows as loaded with, and whether what it kept of
        # them may be reused here (the same database, as this flush's context sees it)
        fits: dict[FlushContext, bool] = {}
        locked = tracker.locked
        expected_rows = tracker.expected
        for collection, inserted in ((inserted_states, True), (updated, False)):
            for state in collection:
                mapper = state.mapper
                found = per_mapper.get(mapper)
                if found is None:
                    layout = rt.models.layout_for(mapper)
                    bind = binds.of(state)
                    trigger_writes(mapper, bind)
                    if layout is None:
                        found = (None, bind, *([None] * 8), (0.0, 0.0))  # not cached
                    else:
                        keys = involved.get((layout, bind)) or involve(layout, bind)
                        variant = layout.variant(mapper)
                        assert variant is not None  # _layout_for rebuilds a layout missing a class
                        ctx = context_for(bind, layout)
                        row_codec = variant.row_codec(ctx.dialect)
                        # a single-column key (the common case) is read and checked inline
                        single = layout.pk_attrs[0] if len(layout.pk_attrs) == 1 else None
                        found = (
                            layout,
                            bind,
                            keys,
                            variant,
                            # None: strategy="invalidate", or the database may rewrite
                            # the row (a trigger), or nothing reads the entries (row-level
                            # security: a tenant's rows stay out of Redis; a view)
                            None
                            if layout.options.strategy == "invalidate"
                            or keys.rewritten
                            or not keys.served
                            else row_codec,
                            ctx,
                            row_codec.flushed,
                            _renumbered_at(layout, bind),
                            single,
                            layout.pk_types[0],
                            ttls[layout],
                        )
                    if not sharded:
                        per_mapper[mapper] = found
                (
                    layout,
                    bind,
                    keys,
                    variant,
                    encoder,
                    ctx,
                    flushed,
                    renumbered_at,
                    single,
                    pk_type,
                    (ttl, spread),
                ) = found
                old = state.key[1] if state.key is not None else None
                if layout is None:
                    if old is not None and _key_changed(state):
                        cascades = rt.models.cascades(
                            mapper.local_table, deleted=False, orm_handles=mapper
                        )
                        models += ((other, bind) for other in cascades)
                    continue
                if inserted:
                    dict_ = variant.inserted_values(state)
                else:
                    dict_ = _as_updated(state, variant.mutable)
                if single is not None:  # as the general case below, without its calls
                    value = dict_.get(single)
                    pk = [value]
                    moved = old is not None and (
                        len(old) != 1 or not _same_key_type(old[0], value) or bool(old[0] != value)
                    )
                    cacheable = type(value) is pk_type or layout.pk_is_cacheable(pk)
                else:
                    pk = [dict_.get(a) for a in layout.pk_attrs]
                    moved = old is not None and _moved(old, pk)
                    cacheable = layout.pk_is_cacheable(pk)
                if (
                    inserted
                    and renumbered_at is not None
                    and type(pk[renumbered_at]) is int
                    and pk[renumbered_at] == 0
                ):  # the server may have stored the row under another key
                    record(keys, layout, pk, None, "inexact")  # no row 0 for anybody
                    models.append((layout, bind))  # no key we can name holds this row
                    continue
                if moved:
                    assert old is not None
                    record(keys, layout, old, None, "delete")  # the primary key itself changed
                    cascades = rt.models.cascades(
                        layout.table, deleted=False, orm_handles=layout.mapper
                    )
                    models += ((other, bind) for other in cascades)
                if not cacheable:  # None, a SQL expression: no key
                    if old is None or moved or all(v is not None for v in old):
                        # no key we can name holds this row (a key of a value of another
                        # type than the column's, e.g. 5.0 for 5, may stand for a cached row)
                        models.append((layout, bind))
                    continue
                # what before_flush computed for this row: its key, and its row as loaded
                known = flush_keys.get(state) if flush_keys else None
                if encoder is None:  # strategy="invalidate"
                    payload, reason = None, "strategy"
                else:
                    reason = "inexact"
                    kept = None if known is None else known[4]
                    if kept is not None:  # (before ctx, row as loaded, its stored values)
                        fit = fits.get(kept[0])
                        if fit is None:
                            fit = fits[kept[0]] = kept[0].same_as(ctx)
                        if not fit:
                            kept = None
                    # the publish's encode: the generated flushed(), or with what before_flush
                    # kept flushed_again(), which encodes only the columns whose value is no
                    # longer the very object encoded then (see model._RowCodec)
                    try:
                        if kept is None:
                            values = flushed(dict_, ctx)
                        else:
                            values = encoder.flushed_again(dict_, ctx, kept[1], kept[2])
                        payload = None if values is None else pack_row(values)
                    except (KeyError, EncodeError):
                        payload = None
                    if (
                        payload is not None
                        and layout.checks_class
                        and not layout.picks(mapper, dict_)
                    ):
                        payload = None  # a load would build another class (see ModelLayout)
                # the key before_flush computed, when it is the same row's in the same key
                # space: the identity's own tuple (not moved), or an insert's equal key
                if (
                    known is not None
                    and known[0] is keys
                    and (
                        (known[1] is old and not moved)
                        if old is not None
                        else not _moved(known[1], pk)
                    )
                ):
                    key, gen_key = known[2], known[3]
                else:
                    key, gen_key = keys.pair(pk)
                if key in statement_keys:
                    payload, reason = None, "statement"
                elif (
                    payload is not None
                    and not inserted
                    and key not in locked
                    and key not in expected_rows
                    and variant.unwritten is not None
                ):  # locked below, not by before_flush: the row as loaded goes with the lock
                    loaded = _loaded_row(
                        state, (variant.unwritten, variant.attr_set, flushed, ctx, variant)
                    )[0]
                    if loaded is not None:
                        expected_rows[key] = loaded
                changes[key] = Change(
                    gen_key, payload, max(1, int(ttl - spread * random())), reason
                )
                touched.append((key, gen_key, keys))

        by_bind: dict[Any, list[ModelLayout]] = {}
        for layout, bind in models:
            by_bind.setdefault(bind, []).append(layout)
        for bind, layouts in by_bind.items():
            self.lock_models(tracker, layouts, bind)
        pairs: list[str] = []
        # the keyspaces of the keys locked here, recorded in the registry with the locks
        spaces: dict[str, None] = {}
        last: KeySpace | None = None
        for key, gen_key, keys in touched:
            if key not in locked:
                locked[key] = gen_key
                pairs += (key, gen_key)
                if keys is not last:
                    last = keys
                    spaces[keys.registry_field] = None
        if pairs:
            more = self._siblings(tracker, pairs)
            for i in range(0, len(more), 2):
                if more[i] not in locked:
                    locked[more[i]] = more[i + 1]
                    pairs += (more[i], more[i + 1])
        if tracker.reassert_on_flush:
            tracker.reassert_on_flush = False
            self._reassert(tracker, tuple(spaces))
            return
        if pairs:
            self._lock(tracker, pairs, tuple(spaces))
        if _COMMIT_STARTED in session.info and session.get_nested_transaction() is None:
            self._retake_aged_locks(tracker)

    def _registered(self, tracker: SessionTracker, register: Registration, address: str) -> None:
        """A lock's registration heard: refused, the transaction's publish leaves misses
        (see :meth:`.siblings.Siblings.registered`); a registry found not whole, the commit
        makes it whole (the locks went by an older list, which may lack what Redis lost:
        a Cluster failover of the registry's node loses registrations the process never
        learned)."""
        siblings = self.runtime.siblings
        if not siblings.registered(register, address):
            tracker.unregistered = True
        if not siblings.known.whole:
            tracker.partial_list = True

    def _retake_aged_locks(self, tracker: SessionTracker) -> None:
        """The flush inside ``commit()`` has run, and COMMIT comes next: locks older than
        half their timeout are taken again now. ``before_commit`` checked them before this
        flush, whose own locks were taken when it began: a flush whose statements waited
        (a row lock) longer than the locks live would otherwise COMMIT unlocked, and a
        reader could fill the row as it was before the COMMIT; the publish removes such a
        fill, but a process that dies between COMMIT and publish would leave it."""
        if tracker.pending_lock is None and _locks_aged(tracker):
            self._reassert(tracker)

    def _involve(self, tracker: SessionTracker, layout: ModelLayout) -> None:
        options = layout.options
        tracker.strict = tracker.strict or options.on_redis_error == "strict"
        # in the background only when every model the transaction wrote says so
        if options.publish == "background":
            if tracker.background is None:
                tracker.background = True
        else:
            tracker.background = False
        tracker.lock_ms = max(tracker.lock_ms, int(options.lock_timeout * 1000))

    # -- statements (called by .dml) -------------------------------------------------------

    def invalidate_rows(
        self,
        tracker: SessionTracker,
        layout: ModelLayout,
        keys: Iterable[Sequence[Any]],
        bind: Any,
        naming: dict[str, Any] | None = None,
    ) -> None:
        """Rows a statement about to run on ``bind`` changes, named by primary key: locked
        now, left as a miss at commit, restored by a rollback. (``naming``: as for
        :meth:`lock_models`.)"""
        self._involve(tracker, layout)
        transaction = tracker.current_transaction()
        ttl_ms = self.runtime.ttl_ms(layout)
        if naming is None:
            naming = tracker.renamed.get(bind)
        keyspace = self.runtime.models.keys(layout, bind, naming)
        pairs: list[str] = []
        for pk in keys:
            if not layout.pk_is_cacheable(pk):  # None, a SQL expression: no key
                self.lock_models(tracker, [layout], bind, naming)
                return
            key, gen_key = keyspace.pair(pk)
            tracker.statement_keys.add(key)
            tracker.record(transaction, key, Change(gen_key, None, ttl_ms, "statement"))
            if key not in tracker.locked:
                tracker.locked[key] = gen_key
                pairs += (key, gen_key)
        if pairs:
            more = self._siblings(tracker, pairs)
            for i in range(0, len(more), 2):
                if more[i] not in tracker.locked:
                    tracker.locked[more[i]] = more[i + 1]
                    pairs += (more[i], more[i + 1])
            self._lock(tracker, pairs, keyspace.fields)

    def _siblings(self, tracker: SessionTracker, pairs: list[str]) -> list[str]:
        """The keys of the rows of ``pairs`` in the other keyspaces of their tables (see
        :mod:`.siblings`), as the process's list of the registry names them now; the first
        list a transaction uses is the one its publish checks the registry's version against."""
        siblings = self.runtime.siblings
        known = siblings.known
        _went_by(tracker, known)
        return siblings.extra(pairs, known)

    def lock_models(
        self,
        tracker: SessionTracker,
        layouts: Iterable[ModelLayout],
        bind: Any,
        naming: dict[str, Any] | None = None,
    ) -> None:
        """Every row of these models in the database of ``bind`` may change: lock their
        generations until the end of the transaction, which replaces them (after COMMIT) or
        puts them back (after ROLLBACK). ``naming``: the statement's naming options where
        they name another database than its connection's (:func:`.databases.naming_of`)."""
        if naming is None:
            naming = tracker.renamed.get(bind)
        gen_keys: list[str] = []
        for layout in dict.fromkeys(layouts):
            self._involve(tracker, layout)
            for gen_key in self.runtime.models.keys(layout, bind, naming).generation_keys():
                if gen_key not in tracker.locked_gens:
                    tracker.locked_gens[gen_key] = None
                    gen_keys.append(gen_key)
        if not gen_keys:
            return
        siblings = self.runtime.siblings
        known = siblings.known
        _went_by(tracker, known)
        for gen_key in siblings.extra_buckets(gen_keys, known):
            if gen_key not in tracker.locked_gens:
                tracker.locked_gens[gen_key] = None
                gen_keys.append(gen_key)
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        started = perf_counter()
        ok = self.runtime.backend.lock_generations(gen_keys, tracker.owner_token(), tracker.lock_ms)
        self._locked(tracker, gen_keys, started, ok, models=True)
        if not ok:
            self._lock_failed(tracker, generations=gen_keys)

    # -- locks ------------------------------------------------------------------------------

    def before_commit(self, session: Session) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        if session.get_nested_transaction() is not None:
            return
        session.info[_COMMIT_STARTED] = perf_counter()
        tracker = self.runtime.peek_tracker(session)
        if tracker is None:
            return
        # a flush that stopped early left its locks' reply unread: they count from here,
        # and are acknowledged before COMMIT
        self._finish_locks(tracker)
        # locks older than half their timeout might expire before COMMIT: take them again
        if not _locks_aged(tracker):
            return
        if _sa_compat.session_is_clean(session):
            self._reassert(tracker)
        else:
            tracker.reassert_on_flush = True  # in the same round trip as the final flush

    def _reassert(self, tracker: SessionTracker, fields: tuple[str, ...] = ()) -> None:
        """Take the transaction's locks again (``fields``: keyspaces recorded in the registry
        with them, those of the keys a flush locks with them for the first time; those
        of the keys locked before are recorded again too, so that the publish, within a
        lock's timeout of this, is also within it of their registration)."""
        if tracker.locked:
            tracker.spaces.update(dict.fromkeys(fields))
            self._lock(tracker, _flatten(tracker.locked), tuple(tracker.spaces))
        if tracker.locked_gens:
            gen_keys = list(tracker.locked_gens)
            backend = self.runtime.backend
            started = perf_counter()
            ok = backend.lock_generations(gen_keys, tracker.owner_token(), tracker.lock_ms)
            self._locked(tracker, gen_keys, started, ok, models=True)
            if not ok:
                self._lock_failed(tracker, generations=gen_keys)

    def _lock(
        self, tracker: SessionTracker, pairs: list[str], fields: tuple[str, ...] = ()
    ) -> None:
        """Lock ``pairs``; ``fields``: the keyspaces recorded in the registry with the
        locks, in the same round trip (those of the keys locked for the first time: see
        :mod:`.siblings`)."""
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        started = perf_counter()
        expected: list[bytes] | None = None
        if tracker.expected:  # the rows as loaded go with every lock of their keys
            found = tracker.expected.get
            expected = [found(key, b"") for key in pairs[::2]]
            if not any(expected):
                expected = None
        rt = self.runtime
        if fields:
            tracker.spaces.update(dict.fromkeys(fields))
        for _ in range(2):
            backend = rt.backend
            register = rt.siblings.registration(fields) if fields else None
            ok = backend.lock(pairs, tracker.owner_token(), tracker.lock_ms, expected, register)
            if register is not None:
                self._registered(tracker, register, backend.address)
            if ok or rt.backend is backend:
                break
            # refused as only a Redis Cluster node refuses: the cache switched to the
            # cluster (the first command a plain client sends there may be these locks)
        self._locked(tracker, pairs, started, ok)
        if not ok:
            self._lock_failed(tracker, pairs=pairs)

    def _locked(
        self,
        tracker: SessionTracker,
        keys: Sequence[str],
        started: float,
        ok: bool,
        models: bool = False,
    ) -> None:
        """A lock round trip ended: its time counts in the transaction's cache share."""
        elapsed = perf_counter() - started
        tracker.cache_seconds += elapsed
        tracer = self.runtime.tracer
        debug = log.isEnabledFor(logging.DEBUG)
        if tracer is None and not debug:
            return
        gens = keys if models else keys[1::2]
        names = sorted({self._model_of(g) for g in gens} - {""})  # "": a sibling's
        count = len(keys) if models else len(keys) // 2
        what = "buckets" if models else "keys"
        if debug:
            log.debug(
                "writethrough: lock %s: %d %s, %s",
                ", ".join(names),
                count,
                what,
                "ok" if ok else "failed",
            )
        if tracer is not None:
            record_span(
                tracer,
                "writethrough.lock",
                ", ".join(names),
                elapsed,
                **{what: count, "result": "ok" if ok else "failed"},
            )

    def _model_of(self, gen_key: str) -> str:
        """The model (its base class name) whose bucket ``gen_key`` is."""
        found = self._models.get(gen_key)
        if found is None:
            for layout in self.runtime.models.cached_layouts():
                for keys in list(layout.keyspaces.values()):
                    for g in keys.generation_keys():
                        self._models[g] = layout.entity_name
            found = self._models.setdefault(gen_key, "")
        return found

    def _lock_failed(
        self, tracker: SessionTracker, pairs: Sequence[str] = (), generations: Sequence[str] = ()
    ) -> None:
        rt = self.runtime
        rt.counters.add("lock_failures")
        if tracker.strict:
            backend = rt.backend
            why = ("the circuit breaker is open after: " if backend.breaker.is_open else "") + (
                backend.last_error or f"Redis at {backend.address} did not answer"
            )
            raise CacheUnavailableError(
                "Redis could not lock the cache entries this transaction changes, and the model "
                f"is configured on_redis_error='strict'; the statement was not applied ({why})"
            )
        # degrade: the commit goes ahead; these keys are invalidated before this process
        # reads from Redis again (and once more after COMMIT: see after_commit)
        if pairs:
            rt.journal.add_pairs(pairs)
            tracker.unlocked += pairs
        if generations:
            rt.journal.add_buckets(generations)
            tracker.unlocked_gens += generations

    # -- end of transaction ----------------------------------------------------------------

    def after_commit(self, session: Session) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        tracker = self.runtime.peek_tracker(session)
        if tracker is None:
            return
        nested = session.get_nested_transaction()
        if nested is not None:
            tracker.released_savepoints.add(id(nested))
            return
        tracker.committed = True
        try:
            self._committed(session, tracker)
        finally:
            held = tracker.held
            if held is not None:  # the publish did not take the lock's connection
                tracker.held = None
                self._let_go(held)

    def _let_go(self, held: Any) -> None:
        try:
            self.runtime.backend.let_go(held)
        except Exception:  # never raise after COMMIT, nor while a transaction ends
            log.debug("writethrough: returning a connection to the pool failed", exc_info=True)

    def _committed(self, session: Session, tracker: SessionTracker) -> None:
        if tracker.pending_lock is not None:
            # the commit's own flush found nothing to write after all (it returned before
            # after_flush): no row changed under these locks; they end as misses
            try:
                self._finish_locks(tracker)
            except Exception:  # strict mode's error: never raise after COMMIT
                log.debug("writethrough: lock of an empty flush failed", exc_info=True)
        if tracker.external:
            # commit() did not COMMIT: the outer transaction may still roll back. The locks
            # stay and expire into misses (lock_timeout), which is all that is safe here.
            log.debug("writethrough: session joined an outer transaction; nothing published")
            self._make_registry_whole(tracker)
            return
        wrote = bool(tracker.locked or tracker.locked_gens)
        counters = self.runtime.counters
        # a transaction whose locks failed counts once as a failed cache write, now; a
        # failed publish counts when its reply is in (here, or on the background worker)
        failed = bool(tracker.unlocked or tracker.unlocked_gens)
        if failed:
            counters.add("cache_write_failures")
        tally: Tally = []
        try:
            if wrote:
                job = self._publish_job(session, tracker)
                job.counted = failed
                if tracker.background and self._submit(job):
                    started = perf_counter()
                    self._check_siblings_now(job)
                    tracker.cache_seconds += perf_counter() - started
                else:
                    started = perf_counter()
                    held, tracker.held = tracker.held, None
                    self.run_jobs([job], held, tally)
                    tracker.cache_seconds += perf_counter() - started
        except Exception:  # never raise after COMMIT: the locks expire into misses
            log.exception("writethrough: publish failed after commit")
            if wrote and not failed:
                counters.add("cache_write_failures")
        self._make_registry_whole(tracker)
        if wrote:
            began = session.info.pop(_COMMIT_STARTED, None)
            # the publish's counts, the commit and its latencies: one lock
            counters.committed(
                tally, tracker.cache_seconds, None if began is None else perf_counter() - began
            )
        if tracker.unlocked or tracker.unlocked_gens:
            # a reader may have filled these from the pre-commit rows after an early replay;
            # a lock taken without hearing the reply ends at the replay (the owner has ended)
            if tracker.unlocked:
                self.runtime.journal.add_pairs(tracker.unlocked, tracker.owner_token())
            if tracker.unlocked_gens:
                self.runtime.journal.add_buckets(tracker.unlocked_gens)

    def _make_registry_whole(self, tracker: SessionTracker) -> None:
        """A transaction whose locks went by the list of a registry Redis had forgotten (or
        by none) may have left other keyspaces' entries of its rows unlocked: they are
        replaced before ``commit()`` returns (see :mod:`.siblings`). One round trip when the
        registry is whole after all (the first commit of a process that read no list)."""
        if tracker.partial_list:  # an unread list is not whole either
            started = perf_counter()
            rt = self.runtime
            rt.siblings.make_whole(rt.backend)
            tracker.cache_seconds += perf_counter() - started

    def _submit(self, job: Job) -> bool:
        """Hand ``job`` to the background worker; False when its queue is full (the caller
        then runs it now)."""
        publisher = self.publisher
        if publisher is None:
            return False
        if publisher.submit(job):
            return True
        self.runtime.counters.add("background_overflows")
        return False

    def _publish_job(self, session: Session, tracker: SessionTracker) -> Job:
        """What a commit writes to Redis: the new VALUE (or a miss) of each locked entry, and
        the new generation of each locked bucket (built by :meth:`build`, where it runs)."""
        changes = tracker.changes.get(session.get_transaction()) if tracker.locked else None
        if changes and tracker.unregistered:
            # a lock's registration was refused: entries of keyspaces the registry may not
            # list are left as misses (see Siblings.registered)
            changes = {
                key: Change(change.gen_key, None, change.ttl_ms, "unregistered")
                for key, change in changes.items()
            }
        job = Job(True, tracker.owner_token(), tracker.locked, changes, list(tracker.locked_gens))
        # locks taken by no path that names siblings went by the oldest list: none read
        job.known = tracker.siblings_known or _UNREAD
        job.covered = tracker.siblings_covered
        return job

    def _release_job(self, tracker: SessionTracker) -> Job:
        """What a rollback writes to Redis: the previous values back where the locks are still
        ours alone, and the locked buckets released."""
        return Job(False, tracker.owner_token(), tracker.locked, None, list(tracker.locked_gens))

    def build(self, job: Job) -> None:
        """A job's script arguments and tallies, from the locks and changes its transaction
        left (which nothing changes any more: the tracker starts new ones): built by whoever
        runs the job, the background worker for ``publish="background"``."""
        locked = job.locked
        if locked is None:
            return
        job.locked = None
        pairs: list[str] = []
        if not job.committed:
            per_model: dict[str, int] = {}
            model_of = self._model_of
            for key, gen_key in locked.items():
                name = model_of(gen_key)
                if name:  # else another keyspace's (a sibling's): not counted
                    per_model[name] = per_model.get(name, 0) + 1
                pairs += (key, gen_key)
            job.pairs, job.intents = pairs, per_model
            return
        items: list[Any] = []
        # per model: rows written, rows to publish, and rows left as a miss by reason
        intents: dict[str, list[Any]] = {}
        if locked:
            changes = job.changes or {}
            job.changes = None
            get_change = changes.get
            # a transaction's keys share few buckets: each one's intent looked up once
            by_bucket: dict[str, list[Any]] = {}
            for key, gen_key in locked.items():
                change = get_change(key)
                pairs += (key, gen_key)
                intent = by_bucket.get(gen_key)
                if intent is None:
                    name = self._model_of(gen_key)
                    if not name:  # a sibling keyspace's key (see .siblings): not counted
                        intent = ["", 0, 0, {}]
                    else:
                        model_key = gen_key[: gen_key.rfind(":")]
                        intent = intents.get(model_key)
                        if intent is None:
                            intent = intents[model_key] = [name, 0, 0, {}]
                    by_bucket[gen_key] = intent
                intent[1] += 1
                if change is not None:
                    payload = change.payload
                    if payload is not None:
                        items += (payload, change.ttl_ms)
                        intent[2] += 1
                        continue
                    reason = change.reason
                else:
                    reason = "statement"
                items += (b"", 0)
                reasons = intent[3]
                reasons[reason] = reasons.get(reason, 0) + 1
        job.pairs, job.items, job.intents = pairs, items, intents

    def run_jobs(self, jobs: list[Job], held: Any = None, tally: Tally | None = None) -> bool:
        """Write ``jobs`` (publishes and restores, in order) to Redis and count them: one
        job with the backend's own call per script, several in one round trip. False when
        Redis did not complete one of them (journaled then, with its owner token).
        ``held``: a connection the commit's lock kept for one job's publish (see
        :meth:`_finish_locks`); given back here in any case. ``tally``: where one job's
        publish leaves its counts, for the caller to count with the commit's own."""
        backend = self.runtime.backend
        if held is not None and (len(jobs) != 1 or not (jobs[0].committed and jobs[0].locked)):
            backend.let_go(held)  # no publish of entries to run on it
            held = None
        done = True
        siblings = self.runtime.siblings
        if len(jobs) == 1:
            job = jobs[0]
            replies: list[Any] = []
            elapsed = 0.0
            # a commit reads the registry's version in its publish's round trip
            probe = siblings.probe() if job.committed else None
            try:
                self.build(job)
                if job.pairs:
                    started = perf_counter()
                    if job.committed:
                        replies.append(
                            backend.publish(job.pairs, job.owner, job.items, held, probe)
                        )
                    else:
                        replies.append(backend.release(job.pairs, job.owner))
                    elapsed = perf_counter() - started
            finally:
                if held is not None:  # the publish did not run on it (the breaker, a failure)
                    backend.let_go(held)
            if job.gen_keys:
                if probe is not None and not job.pairs:
                    flag = "1" if job.committed else "0"
                    call = (Script.RELEASE_GENS, job.gen_keys, (job.owner, flag, new_nonce()))
                    batch = backend.write_batch([call], probe)
                    replies.append(None if batch is None else 0)
                else:
                    ok = backend.release_generations(job.gen_keys, job.owner, job.committed)
                    replies.append(0 if ok else None)
            done = self._finish(job, replies, elapsed, tally)
            if probe is not None:
                self._check_siblings(job, probe)
            return done
        for job in jobs:
            self.build(job)
        calls: list[tuple[Script, Sequence[str], Sequence[Any]]] = []
        for job in jobs:
            if job.pairs:
                if job.committed:
                    calls.append((Script.PUBLISH, job.pairs, (job.owner, *job.items)))
                else:
                    calls.append((Script.RELEASE, job.pairs, (job.owner,)))
            if job.gen_keys:
                flag = "1" if job.committed else "0"
                calls.append((Script.RELEASE_GENS, job.gen_keys, (job.owner, flag, new_nonce())))
        started = perf_counter()
        probe = siblings.probe() if any(job.committed for job in jobs) else None
        batch = backend.write_batch(calls, probe)
        elapsed = (perf_counter() - started) / len(jobs)
        i = 0
        for job in jobs:
            n = bool(job.pairs) + bool(job.gen_keys)
            replies = [None] * n if batch is None else list(batch[i : i + n])
            i += n
            done = self._finish(job, replies, elapsed) and done
        if probe is not None:
            for job in jobs:
                if job.committed:
                    self._check_siblings(job, probe)
        return done

    def _check_siblings_now(self, job: Job) -> None:
        """``publish="background"``, once the job is queued: the publish's sibling check
        (below) runs before ``commit()`` returns, not only when the worker publishes: a
        keyspace registered between the transaction's locks and its COMMIT may hold the row
        as it was before the COMMIT, which no lock of the transaction reached, and is served
        until the check invalidates it (for good, if the process dies before its worker
        publishes). One round trip, the registry's version; the fields only when it changed.
        Never raises: the worker's publish checks again unless this one was done."""
        try:
            rt = self.runtime
            probe = rt.siblings.probe()
            rt.backend.probe_version(probe)
            if not probe.read:  # Redis failed: the worker's publish reads it again
                return
            if not rt.siblings.unchanged(job.known, probe, job.covered):
                locked = job.locked
                if locked is None:  # the worker built the job already: its check runs
                    return
                self._check_siblings(job, probe, _flatten(locked))
            job.checked = True
        except Exception:
            log.debug("writethrough: checking the keyspace registry failed", exc_info=True)

    def _check_siblings(self, job: Job, probe: Any, pairs: Sequence[str] | None = None) -> None:
        """After a commit's publish (or, ``publish="background"``, before ``commit()``
        returns, with ``pairs`` from the job's locks, not yet built): the rows' keys in
        keyspaces of their tables registered since the transaction's list of the registry
        was read are invalidated (see :mod:`.siblings`)."""
        if job.checked:  # before commit() returned (publish="background")
            return
        rt = self.runtime
        rt.siblings.check(
            rt.backend,
            job.known,
            probe,
            job.pairs if pairs is None else pairs,
            job.gen_keys,
            rt.journal,
            job.covered,
        )

    def _finish(
        self, job: Job, replies: list[Any], elapsed: float, tally: Tally | None = None
    ) -> bool:
        """Count a job's outcome (``replies``: one per script, None for a failure) and journal
        what Redis did not complete; False then."""
        rt = self.runtime
        counters = rt.counters
        done = True
        replies = list(replies)
        if job.pairs:
            reply = replies.pop(0)
            if job.committed:
                self._published(job, reply, elapsed, tally)
            else:
                self._restored(job, reply)
            if reply is None:
                done = False
                # the locks may still be there (or the values written): they end at the
                # journal's replay once Redis answers, not at lock_timeout
                rt.journal.add_pairs(job.pairs, job.owner)
        if job.gen_keys:
            if replies.pop(0) is None:
                if job.committed:  # the new generations are due: the replay bumps them
                    rt.journal.add_buckets(job.gen_keys)
                done = False
            elif job.committed:
                for name in sorted({self._model_of(g) for g in job.gen_keys} - {""}):
                    counters.invalidated("model", 1, name)
        if not done and not job.counted:
            job.counted = True
            counters.add("cache_write_failures")
        return done

    def _published(
        self, job: Job, written: int | None, elapsed: float, tally: Tally | None = None
    ) -> None:
        """Count a publish's outcome per model: into ``tally`` when given (the caller counts
        it with the commit, under one lock), else now."""
        rt = self.runtime
        intents: dict[str, list[Any]] = job.intents
        counts: Tally = [] if tally is None else tally
        # a publish that found its lock lost or contended left a miss: attributed to the
        # models in order when a transaction wrote several (the script returns one count)
        lost = 0 if written is None else sum(i[2] for i in intents.values()) - written
        for name, rows, to_publish, reasons in intents.values():
            if rows:
                counts.append(((name, "writes"), rows))
            if written is None:
                continue
            contended = min(lost, to_publish)
            lost -= contended
            if to_publish - contended:
                counts.append(((name, "publishes"), to_publish - contended))
            if contended:
                counts.append(((name, "invalidated:contended"), contended))
            for reason, n in reasons.items():
                counts.append(((name, _INVALIDATED.get(reason) or "invalidated:" + reason), n))
        if tally is None:
            rt.counters.add_many(counts)
        tracer = rt.tracer
        if tracer is not None or log.isEnabledFor(logging.DEBUG):
            names = ", ".join(sorted({i[0] for i in intents.values()}))
            log.debug(
                "writethrough: publish %s: %s of %d rows written",
                names,
                written,
                len(job.pairs) // 2,
            )
            if tracer is not None:
                record_span(
                    tracer,
                    "writethrough.publish",
                    names,
                    elapsed,
                    rows=len(job.pairs) // 2,
                    written=-1 if written is None else written,
                )

    def _restored(self, job: Job, restored: int | None) -> None:
        if restored is None:
            return
        # per model, in order (the script returns one count for the transaction)
        left = restored
        for name, n in job.intents.items():
            back = min(left, n)
            left -= back
            self.runtime.counters.add("restores", back, name)
            if n - back:
                self.runtime.counters.invalidated("rollback", n - back, name)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        if transaction.parent is None:  # a load the cache answered began this one
            _sa_compat.forget_deferred_begin(session)
        # a commit() under way when the root ends without committing is a failed commit
        committing = transaction.parent is None and (
            session.info.pop(_COMMIT_STARTED, None) is not None
        )
        tracker = self.runtime.peek_tracker(session)
        if tracker is None:
            return
        if tracker.pending_lock is not None:  # a flush failed before after_flush
            try:
                self._finish_locks(tracker)
            except Exception:  # strict mode's error: the transaction is ending anyway
                log.debug("writethrough: lock failed during a failed flush", exc_info=True)
        if transaction.nested:
            tracker.end_savepoint(transaction, transaction.parent)
            return
        if transaction.parent is not None:
            tracker.in_flush = False  # a flush's subtransaction (it may have failed)
            return
        try:
            if not tracker.committed and (tracker.locked or tracker.locked_gens):
                counters = self.runtime.counters
                counters.add("rollbacks")
                if committing:
                    counters.add("commit_failures")
                job = self._release_job(tracker)
                if tracker.unlocked or tracker.unlocked_gens:
                    counters.add("cache_write_failures")
                    job.counted = True
                if not (tracker.background and self._submit(job)):
                    self.run_jobs([job])  # a failure counts when its reply is in
                if tracker.unlocked:  # locks possibly taken unheard end at the replay
                    self.runtime.journal.add_pairs(tracker.unlocked, tracker.owner_token())
        except Exception:  # the locks expire into misses
            log.exception("writethrough: releasing locks after rollback failed")
        finally:
            held = tracker.held
            if held is not None:  # a rollback, a failed COMMIT, close(): never kept past the end
                tracker.held = None
                self._let_go(held)
            infos = tracker.infos
            tracker.reset()
            key = self.runtime.settings.info_key
            for info in infos:
                if info.get(key) is tracker.ref:
                    del info[key]

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        if self.retirement.any and self.retirement.retired_for(session):
            return  # uninstalled; the listener stays (see .retiring)
        rt = self.runtime
        tracker = rt.tracker(session)
        tracker.began = True
        if not isinstance(connection, Connection):
            return  # a stand-in (a test's mock): no statements of ours to track on it
        info = connection.info
        # weakly: the connection's info lives in the pool, and a session dropped without
        # close() must not be kept alive (with its objects attached) by its pooled connection
        info[rt.settings.info_key] = tracker.ref
        tracker.infos.append(info)
        self.statements.watch(connection.engine)
        naming = connection_naming(connection)
        if naming is not None:
            tracker.renamed[connection.engine] = naming
        if info.get(SWITCHED):  # a statement switched this connection's schema
            self.statements.begin_on(tracker, connection)


def _went_by(tracker: SessionTracker, known: Known) -> None:
    """A lock of the transaction names the siblings ``known`` lists: the first list is
    the one the publish's version check compares the registry with, and the siblings every
    list named (``siblings_covered``) are the ones it need not invalidate; a list of a
    registry that is not whole makes ``commit()`` wait until it is whole again."""
    first = tracker.siblings_known
    if first is None:
        tracker.siblings_known = known
        tracker.siblings_covered = known.fields
    elif known is not first and tracker.siblings_covered is not None:
        tracker.siblings_covered &= known.fields
    if not known.whole:
        tracker.partial_list = True


class FlushBinds:
    """The bind each row of a flush is written to, as the unit of work picks it: the base
    mapper's bind (one ``get_bind()`` per model and flush), or in a sharded session the bind
    of the row's shard (its identity token)."""

    __slots__ = ("_found", "_session", "_sharded", "sharded")

    def __init__(self, session: Session) -> None:
        self._session = session
        #: a sharded session: a row's bind depends on the row (its shard), not only its model
        self.sharded = self._sharded = isinstance(session, ShardedSession)
        self._found: dict[Any, Any] = {}

    def of(self, state: Any, choose: bool = True) -> Any:
        """The row's bind. A sharded row whose shard is not chosen yet gets it chosen, as the
        flush does, or with ``choose=False`` None."""
        mapper = state.mapper.base_mapper
        token = state.identity_token if self._sharded else None
        if self._sharded and token is None:
            if not choose:
                return None
            return self._session.get_bind(mapper=mapper, instance=state.obj())
        found = self._found.get((mapper, token))
        if found is None:
            if self._sharded:
                found = self._session.get_bind(mapper=mapper, shard_id=token)
            else:
                found = self._session.get_bind(mapper=mapper)
            self._found[(mapper, token)] = found
        return found


#: the stats' counter name of each reason a row is left as a miss, made once
_INVALIDATED = {reason: "invalidated:" + reason for reason in INVALIDATION_REASONS}

#: a class not looked at yet in this flush
_UNSEEN: Any = object()

#: the keyspace registry as nobody read it yet
_UNREAD = Known("", (), None, False)


def _renumbered_at(layout: ModelLayout, bind: Any) -> int | None:
    """The position in the primary key of the column to which MySQL and MariaDB give the next
    value when a row is inserted with 0 in it (its ``AUTO_INCREMENT``, unless ``sql_mode`` has
    ``NO_AUTO_VALUE_ON_ZERO``, which we cannot see), or None: SQLAlchemy, which sent the 0,
    does not read the new value back, so that row's key is not known."""
    if bind.dialect.name not in ("mysql", "mariadb"):
        return None
    column = layout.table.autoincrement_column
    for at, pk_column in enumerate(layout.pk_columns):
        if pk_column is column:  # (a Column's == builds SQL)
            return at
    return None


def _moved(old: tuple[Any, ...], pk: list[Any]) -> bool:
    """Whether a row's primary key changed; a SQL expression assigned to it (evaluated by the
    database) counts as a change, and is never compared (its ``==`` builds SQL)."""
    if len(old) != len(pk):
        return True
    if len(pk) == 1:  # no generator for the common case (once per flushed row)
        a, b = old[0], pk[0]
        return not _same_key_type(a, b) or bool(a != b)
    return any(not _same_key_type(a, b) or a != b for a, b in zip(old, pk, strict=True))


def _same_key_type(a: Any, b: Any) -> bool:
    """Whether two key values are of one type: a ``uuid.UUID`` and asyncpg's subclass (a row
    inserted with ``uuid4()`` and reloaded through asyncpg) are."""
    return type(a) is type(b) or (isinstance(a, uuid.UUID) and isinstance(b, uuid.UUID))


def _as_updated(state: Any, mutable: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The row as the UPDATE left it: SQLAlchemy leaves out of the UPDATE an attribute whose
    new value equals the old one (``-0.0`` over ``0.0``, ``1.500`` over ``1.5``), so the
    database keeps the old value's form, which is what a load returns.

    A container (a JSON document, an ARRAY) the UPDATE did not write may have been changed in
    place, unseen by the ORM, and the database holds what it held: it is left out, so the row
    is invalidated rather than published with a value the database does not hold."""
    dict_: dict[str, Any] = state.dict
    committed = state.committed_state
    kept: dict[str, Any] | None = None
    for key in mutable:
        if key not in committed and key in dict_ and not _immutable(dict_[key]):
            if kept is None:
                kept = dict(dict_)
            del kept[key]
    if not committed:
        return dict_ if kept is None else kept
    for key, old in committed.items():
        # (one lookup a key: NO_VALUE for a key not in the row, which is skipped as an old
        # value set without being loaded is)
        new = dict_.get(key, _NO_VALUE)
        if old is new or old is _NO_VALUE or new is _NO_VALUE:
            continue
        try:
            unchanged = bool(old == new)
        except Exception:  # an uncomparable value: the UPDATE sent it
            continue
        if not unchanged:
            continue
        if kept is None:
            kept = dict(dict_)
        kept[key] = old
    return dict_ if kept is None else kept


_NO_VALUE = _sa_compat.NO_VALUE


def _immutable(value: Any) -> bool:
    return type(value) in IMMUTABLE or isinstance(value, enum.Enum)


def _key_changed(state: Any) -> bool:
    """Whether a flushed row's primary key changed (history is intact at after_flush)."""
    mapper = state.mapper
    for column in mapper.primary_key:
        if state.attrs[mapper.get_property_by_column(column).key].history.deleted:
            return True
    return False


#: an expected payload no VALUE holds (a payload starts with its format version, then
#: msgpack): the lock is contended, where the row as loaded cannot be encoded
_UNKNOWN_ROW = b"!"


def _loaded_encoder(session: Session, layout: ModelLayout, mapper: Any, bind: Any) -> Any:
    """What :func:`_loaded_row` needs for the rows of one class on one database: (the
    class's columns an UPDATE may leave unwritten, all its columns, the publish's generated
    ``flushed``, its context, the class layout), or False when the class has no column an
    UPDATE may leave unwritten."""
    variant = layout.variant(mapper)
    if variant is None or variant.unwritten is None:
        return False
    dialect = bind.dialect
    ctx = FlushContext(dialect, lambda: session.connection(bind_arguments={"bind": bind}))
    return (variant.unwritten, variant.attr_set, variant.row_codec(dialect).flushed, ctx, variant)


#: what before_flush keeps of a row it encoded as loaded, for after_flush's publish: (the
#: context it was encoded with, the row as loaded, its stored values as ``flushed`` made them)
Kept = tuple[FlushContext, dict[str, Any], list[Any]]


def _loaded_row(
    state: Any, encoder: tuple[tuple[str, ...], frozenset[str], Any, FlushContext, Any]
) -> tuple[bytes | None, Kept | None]:
    """The row as this transaction loaded it, encoded as the publish encodes (its pre-flush
    values), when its UPDATE leaves a loaded column unwritten: the publish takes those from
    memory, so it may write only if the cache still holds this when the key is locked (see
    lua/lock.lua). None when the UPDATE writes every loaded column (or none is loaded: the
    publish then leaves a miss); :data:`_UNKNOWN_ROW` when a column's pre-flush value is
    unknown (set without being loaded).

    For a row the publish's encoder refuses (a value whose stored form a write cannot
    predict, as a FLOAT on MariaDB) the fill's encoder: the values here are loaded ones, and
    either encoding matches an entry only if the entry holds exactly these values.

    With the payload, what the publish may reuse (:data:`Kept`) when the publish's encoder
    made it, else None."""
    unwritten, columns, flushed, ctx, variant = encoder
    committed = state.committed_state
    dict_ = state.dict
    for attr in unwritten:
        if attr not in committed and attr in dict_:
            break
    else:
        return None, None
    loaded = dict(dict_)
    for attr, old in committed.items():
        if old is _sa_compat.NO_VALUE:  # set without being loaded
            if attr in columns:
                return _UNKNOWN_ROW, None
            continue  # a relationship: not in the row
        loaded[attr] = old
    try:
        values = flushed(loaded, ctx)
        if values is not None:
            return pack_row(values), (ctx, loaded, values)
    except (KeyError, EncodeError):
        pass
    payload: bytes | None = variant.encode_loaded(loaded, ctx.dialect)
    return (_UNKNOWN_ROW if payload is None else payload), None


def _locks_aged(tracker: SessionTracker) -> bool:
    """Whether the transaction holds locks older than half their timeout, which might expire
    before its COMMIT."""
    return bool(tracker.locked or tracker.locked_gens) and (
        time.monotonic() - tracker.first_lock_at >= tracker.lock_ms / 2000
    )


def _flatten(locked: dict[str, str]) -> list[str]:
    pairs: list[str] = []
    for key, gen_key in locked.items():
        pairs += (key, gen_key)
    return pairs
