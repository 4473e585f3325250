"""One stress worker process: ``python -m stress.worker CONFIG.json``.

It builds its own engine, ``WriteThroughCache`` and session factories (one per isolation level,
the cache installed on each), then runs random operations on a few hot rows until the deadline
in its configuration, recording every read and commit (see :mod:`stress.history`):

* reads: ``session.get``, ``select(...).options(from_cache())``, a many-to-one lazy load
  (``item.parent``), batch reads of 2-8 rows (``select(M).where(M.id.in_(ids))`` or the legacy
  ``session.query(M).filter(M.id.in_(ids))``, with ``from_cache()``; hot rows writers are
  changing, sometimes a row that does not exist), and, under REPEATABLE READ, a read in a
  transaction whose snapshot began earlier; each in a fresh session, so the identity map
  never answers. Whether the cache served
  it is the change of ``cache.stats().hits`` around it (one thread per process, so exact);
* writes: every update reads the row ``FOR UPDATE`` and writes ``next_value`` of it; inserts
  and deletes of rows whose ids no other worker uses; explicit rollbacks after a flush;
  savepoints released or rolled back; with ``db_errors``, transactions locking two hot rows in
  random order (deadlocks; under REPEATABLE READ PostgreSQL raises serialization failures),
  retried up to three times;
* with ``kill_prob``, the worker SIGKILLs itself with that probability at each flush before
  COMMIT and after each COMMIT before the cache publishes (a listener inserted before the
  cache's own ``after_commit``), recording where it died first;
* with ``tenants`` (``--tenants N``), every operation picks one of the tenants' schemas and
  reaches it in one of the ways users choose a ``schema_translate_map`` (chosen at random per
  session, among those that apply to the operation; see ``WAYS``). Every event of the
  operation records the tenant and the way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import case, create_engine, event, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_writethrough import (
    CacheUnavailableError,
    NearCacheOptions,
    WriteThroughCache,
    from_cache,
)
from sqlalchemy_writethrough.near import Copy
from sqlalchemy_writethrough.protocol import PAIR_SCRIPTS, Scripts

from .history import Recorder, now
from .models import (
    EXTRA_COLUMN,
    ITEM_TABLE,
    KEY_TYPES,
    PARENT_TABLE,
    SHADOWS,
    VERSIONS,
    StItem,
    StShadow,
    first_value,
    key_part_id,
    next_value,
)

SNAPSHOT = "REPEATABLE READ"

#: operation weights of a "mixed" worker; db_errors adds "pair"
MIXED = {
    "get": 25,
    "select": 18,
    "batch": 12,
    "lazy": 14,
    "rr_read": 8,
    "update": 14,
    "savepoint": 6,
    "rollback": 5,
    "insert": 4,
    "delete": 3,
    "update_extra": 3,
}
READER = {"get": 40, "select": 30, "batch": 20, "lazy": 20, "rr_read": 10}
WRITER = {"update": 1}
SIMPLE = {"get": 35, "select": 25, "lazy": 20, "update": 20}
#: weight of "batch" in a "simple" worker (the outage scenario's), unless ``--no-batch-reads``
SIMPLE_BATCH_WEIGHT = 12
ROLES = {"mixed": MIXED, "reader": READER, "writer": WRITER, "simple": SIMPLE}
#: the unit-of-work writes a "statements" worker replaces with statement-level ones ("stmt")
UNIT_WRITES = ("update", "savepoint", "rollback", "update_extra")
#: weight of "stmt" in a "mixed"-paths worker
STMT_WEIGHT = 12
#: the statement-level write paths of ``op_stmt``
STMT_PATHS = (
    "bulk_pk",  # session.execute(update(M), [{"id": .., "counter": ..}, ...])
    "where_eq",  # update(M).where(M.id == i).values(counter=v), one statement per row
    "in_case",  # update(M).where(M.id.in_(ids)).values(counter=CASE id WHEN .. THEN ..)
    "range",  # update(M).where(M.id.between(a, b)).values(counter=CASE ...): rows unnamed
    "text",  # session.execute(text("UPDATE t SET counter = :v WHERE id = :id"), ...)
    "text_conn",  # the same through session.connection().execute(...)
    "mappings",  # session.bulk_update_mappings(M, [{"id": .., "counter": ..}])
)


#: how an operation reaches its tenant's schema, as users do:
WAYS = (
    "bind",  # the shared sessionmaker, called with bind=engine.execution_options(map)
    "maker",  # a sessionmaker per tenant, bound to engine.execution_options(map)
    "connection",  # session.connection(execution_options=map) at the start of the transaction
    "execute",  # session.get / session.execute(..., execution_options=map) for every statement
    "statement",  # stmt.execution_options(map) (session.get's execution_options for a get)
)
#: the ways that put the map on the session's bind or connection: only these reach the
#: tenant from the unit of work's flush, lazy loads, refreshes and bulk_update_mappings
SESSION_WAYS = ("bind", "maker", "connection")
#: the operations that reach their tenant through statements only (any way applies)
STATEMENT_OPS = frozenset({"get", "select", "batch", "rr_read", "stmt"})
#: ids no row ever has (between the hot rows and the inserted ones): a batch read asks for one
#: now and then, which must come back without it
ABSENT_IDS = range(900_000, 901_000)


def op_weights(role: str, paths: str, db_errors: bool, batch_reads: bool = True) -> dict[str, int]:
    """The operation mix of a worker: its role's, with the write paths ``paths`` asks for
    (and without batch reads when ``batch_reads`` is false: ``--no-batch-reads``)."""
    weights = dict(ROLES[role])
    if not batch_reads:
        weights.pop("batch", None)
    elif role == "simple":
        weights["batch"] = SIMPLE_BATCH_WEIGHT  # not in SIMPLE: never in the outage's baseline
    if role == "mixed" and paths != "unit":
        if paths == "statements":
            weights["stmt"] = sum(weights.pop(k) for k in UNIT_WRITES)
        else:
            weights["stmt"] = STMT_WEIGHT
    if db_errors:
        weights["pair"] = 6
    return weights


#: rows one incarnation of a worker may insert (``op_insert`` stops there), and incarnations
#: one worker slot may have: their ids are disjoint within ``EXTRA_IDS_PER_SLOT``
EXTRAS_PER_INCARNATION = 10_000
INCARNATIONS_PER_SLOT = 1_000
EXTRA_IDS_PER_SLOT = EXTRAS_PER_INCARNATION * INCARNATIONS_PER_SLOT


def extra_id(slot: int, incarnation: int, n: int) -> int:
    """Ids of rows a worker inserts: disjoint per worker slot and incarnation, never reused
    (the checker knows a row by its id: an id inserted again after its delete would read as
    a row that came back from the dead). A long run respawns a worker more than ten times:
    with 100,000 ids per slot its 11th incarnation inserted the next slot's first ids."""
    if not (0 <= n < EXTRAS_PER_INCARNATION and 0 <= incarnation < INCARNATIONS_PER_SLOT):
        raise ValueError(f"no extra id for incarnation {incarnation}, row {n}")
    id_ = 1_000_000 + slot * EXTRA_IDS_PER_SLOT + incarnation * EXTRAS_PER_INCARNATION + n
    if id_ >= 2**31:
        raise ValueError(f"worker slot {slot}: its rows' ids pass the INTEGER column's range")
    return id_


def error_class(exc: BaseException) -> str:
    if isinstance(exc, CacheUnavailableError):
        return "cache-unavailable"
    if isinstance(exc, DBAPIError):
        text = str(exc.orig).lower()
        if any(
            s in text
            for s in ("deadlock", "serializ", "lock wait timeout", "lock timeout", "concurrent")
        ):
            return "db-conflict"
    return "unexpected"


def error_text(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        name += "/" + type(exc.orig).__name__
    return f"{name}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.name: str = config["worker"]
        self.slot: int = config["slot"]
        self.incarnation: int = config["incarnation"]
        self.rng = random.Random(config.get("seed"))
        self.rec = Recorder(config["history"], self.name)
        #: the model version this process maps the tables with ("A", or "B" with the extra
        #: column: ``--model-versions 2``, a rolling deploy); its reads are recorded with it
        self.model_version: str = config.get("model_version") or "A"
        models = VERSIONS[self.model_version]
        #: "int", or "uuid" (``--key-type uuid``): the models keyed by Uuid columns. Ids stay
        #: ints everywhere else (histories, hot lists); ``key`` maps one to the value the ORM
        #: takes, ``unkey`` a loaded ``obj.id`` / ``obj.parent_id`` back
        self.key_type: str = config.get("key_type") or "int"
        self.key: Callable[[int], Any]
        self.unkey: Callable[[Any], int]
        keyed, self.key, self.unkey = KEY_TYPES[self.key_type]
        if self.key_type != "int":
            if self.model_version != "A":
                raise ValueError("key_type uuid has one model version")
            models = keyed
        self.Parent: Any = models[PARENT_TABLE]
        self.Item: Any = models[ITEM_TABLE]
        #: does this version map (and so write) the extra column?
        self.writes_extra = hasattr(self.Item, EXTRA_COLUMN)
        if self.model_version != "A":
            self.rec.model_version = self.model_version
        self.deadline: int = config["deadline"]
        self.isolations: list[str] = config["isolations"]
        self.kill_prob: float = config.get("kill_prob", 0.0)
        self.hot_items: list[int] = config["hot_items"]
        self.parents: list[int] = config["parents"]
        self.slots: int = config.get("slots", 1)
        weights = op_weights(
            config.get("role", "mixed"),
            config.get("paths", "unit"),
            bool(config.get("db_errors")),
            bool(config.get("batch_reads", True)),
        )
        self.ops = list(weights)
        self.weights = list(weights.values())
        self.tx_seq = 0
        self.next_extra = 0
        self._extras: dict[str | None, list[int]] = {}
        #: the tenants' schemas (empty: one database, as without --tenants), and the ways
        #: operations may reach them
        self.tenants: list[str] = list(config.get("tenants") or [])
        self.tenant_ways: list[str] = list(config.get("tenant_ways") or WAYS)
        #: "path:way" pairs of statement-level writes never used (a known defect set aside)
        self.avoid: set[str] = set(config.get("avoid") or ())
        self.op_tenant: str | None = None
        self.baseline: list[int] | None = config.get("baseline")
        self.baseline_items: list[int] = config.get("baseline_items", [])
        self.baseline_parents: list[int] = config.get("baseline_parents", [])
        #: the shadow rows the sibling trigger writes (``--sibling-trigger``), as (model, id):
        #: read, never written by a worker
        mode = config.get("shadows")
        shadows = [SHADOWS[mode](ITEM_TABLE, i) for i in self.hot_items] if mode else []
        self.shadows: list[tuple[Any, int]] = [
            (StShadow if table != ITEM_TABLE else None, id_) for table, id_ in filter(None, shadows)
        ]
        self.op_in_baseline = False

        #: "sync", or "asyncio": AsyncSessions on the database's asyncio driver and a
        #: redis.asyncio client; the ops then run in one greenlet on an event loop, on each
        #: AsyncSession's sync session, as ``AsyncSession.run_sync`` runs code
        self.flavour: str = config.get("flavour", "sync")
        self.async_engine: Any = None
        if self.flavour == "asyncio":
            from sqlalchemy.ext.asyncio import create_async_engine

            self.async_engine = create_async_engine(
                async_url(config["db_url"]), pool_size=2, max_overflow=2
            )
            self.engine = self.async_engine.sync_engine
            _session_settings(self.engine)
        else:
            self.engine = make_engine(config["db_url"], pool_size=2)
        self.cache = WriteThroughCache(
            redis_client(config, asynchronous=self.flavour == "asyncio"),
            prefix=config["prefix"],
            ttl=config.get("ttl", 600),
            lock_timeout=config.get("lock_timeout", 2.0),
            lease_timeout=config.get("lease_timeout", 2.0),
            on_redis_error=config.get("on_redis_error", "strict"),
            publish=config.get("publish", "sync"),
            near_cache=near_options(config, self.flavour),
            **({"buckets": config["buckets"]} if config.get("buckets") else {}),
        )
        # the flavour this worker's sessions use: an asyncio worker's never reach the other
        sabotage(self.cache, config.get("sabotage"), self.flavour)
        #: the transaction ``commit()`` is committing now (its background publish's ``tx``)
        self.committing: str | None = None
        #: whether that commit queued its publish for the background worker
        self.queued = False
        #: per thread: the number of the journal's latest add this thread made
        self._journaled = threading.local()
        self._watch_background_publishes()
        self._watch_publish_failures()
        #: where each key of the latest IN-list read came from (see ``_watch_batch_reads``)
        self.batch_sources: dict[str, str] = {}
        self.batch_keys: list[str] = []
        self._watched_backend: Any = None
        self._watched_near: Any = None
        self.sessions: dict[str, Callable[[], Session]] = {}
        self.plain: dict[str, Callable[[], Session]] = {}
        #: per level: the shared cached maker, called with another bind (the "bind" way)
        self.rebound: dict[str, Callable[[Any], Session]] = {}
        #: per (level, tenant): the tenant's engine (the "bind" way) and maker ("maker")
        self.tenant_binds: dict[tuple[str, str], Any] = {}
        self.tenant_makers: dict[tuple[str, str], Callable[[], Session]] = {}
        for level in self.isolations:
            if self.async_engine is not None:
                self.sessions[level], self.plain[level], self.rebound[level] = (
                    self._async_factories(level)
                )
                base = self.async_engine.execution_options(isolation_level=level)
                for tenant in self.tenants:
                    tenant_bind = base.execution_options(schema_translate_map={None: tenant})
                    self.tenant_binds[(level, tenant)] = tenant_bind
                    self.tenant_makers[(level, tenant)] = self._async_factories(level, tenant_bind)[
                        0
                    ]
                continue
            bound = self.engine.execution_options(isolation_level=level)
            factory: sessionmaker[Session] = sessionmaker(bound, expire_on_commit=False)
            self.cache.install(factory)
            self._hooks(factory)
            self.sessions[level] = factory
            self.rebound[level] = functools.partial(_rebind, factory)
            plain: sessionmaker[Session] = sessionmaker(bound, expire_on_commit=False)
            event.listen(plain, "after_begin", _mark_begin)
            self.plain[level] = plain
            for tenant in self.tenants:
                tenant_bind = bound.execution_options(schema_translate_map={None: tenant})
                self.tenant_binds[(level, tenant)] = tenant_bind
                own: sessionmaker[Session] = sessionmaker(tenant_bind, expire_on_commit=False)
                self.cache.install(own)
                self._hooks(own)
                self.tenant_makers[(level, tenant)] = own

    def _async_factories(
        self, level: str, bind: Any = None
    ) -> tuple[Callable[[], Session], Callable[[], Session], Callable[[Any], Session]]:
        """(cached, plain, cached with another bind) session makers of the asyncio flavour:
        each makes an AsyncSession and hands out its sync session (used from the worker's
        greenlet). ``bind``: a tenant's engine instead of the worker's."""
        from sqlalchemy.ext.asyncio import async_sessionmaker

        from sqlalchemy_writethrough import flavours

        bound = bind or self.async_engine.execution_options(isolation_level=level)
        cached: Any = async_sessionmaker(bound, expire_on_commit=False)
        self.cache.install(cached)
        self._hooks(flavours.sync_session_class(cached))
        plain: Any = async_sessionmaker(bound, expire_on_commit=False)
        event.listen(flavours.sync_session_class(plain), "after_begin", _mark_begin)
        return (
            (lambda: cached().sync_session),
            (lambda: plain().sync_session),
            (lambda other: cached(bind=other).sync_session),
        )

    # -- hooks ---------------------------------------------------------------------------

    def _watch_batch_reads(self) -> None:
        """Record where every key of an IN-list read came from: "near" (a copy in memory),
        "cache" (a VALUE in the MGET's reply) or "db" (loaded), by key, in
        ``batch_sources``; and the keys read (a fresh session's: every id's, in the order the
        cache reads them), in ``batch_keys``. Stress instrumentation around the two calls a
        batch read makes (``NearCache.read_many``, which asks ``Backend.peek_many`` for the keys not
        in memory): the stats count hits per batch, not which row was one, and the checker
        allows a read from memory its bound. Installed again when the cache replaced its
        backend (as a switch to Cluster does)."""
        backend = self._write_path().runtime.backend
        if backend is not self._watched_backend:
            self._watched_backend = backend
            peek_many = backend.peek_many

            def watched_peek_many(pairs: Any) -> Any:
                found = peek_many(pairs)
                self._note(pairs, found)
                return found

            backend.peek_many = watched_peek_many  # type: ignore[method-assign]
        near = self.cache._near
        if near is not None and near is not self._watched_near:
            self._watched_near = near
            read_many = near.read_many

            def watched_read_many(backend: Any, pairs: Any) -> Any:
                read = read_many(backend, pairs)
                self._note(pairs, None if read is None else read[0])
                return read

            near.read_many = watched_read_many  # type: ignore[method-assign]

    def _write_path(self) -> Any:
        """The write path of the cache's flavour that this worker's sessions use. An asyncio
        worker's cache is given the server's URL, which makes the synchronous flavour the
        cache's first; its AsyncSessions use the asyncio one (made at first need: here).
        Watching the first one recorded no publish of an asyncio worker, and the checker took
        its commits' publishes to land when ``commit()`` returned."""
        if self.flavour == "asyncio":
            return self.cache._async_flavour().write
        return self.cache._write

    def _watch_background_publishes(self) -> None:
        """Record when the cache's background worker wrote each commit's publish
        (``published``): until then, an entry whose lock Redis evicted may hold a value a
        reader filled before the COMMIT (docs/consistency.md, "Eviction of locks"), which the
        checker tells apart only while the publish is pending. Stress instrumentation around
        the queue's two ends, as ``--sabotage unlocked-background-publish`` wraps them."""
        write = self._write_path()
        publisher = write.publisher
        if publisher is None:
            return
        submit, run = write._submit, publisher._run
        queued: dict[int, str] = {}

        def tagged_submit(job: Any) -> bool:
            if job.committed and self.committing is not None:
                queued[id(job)] = self.committing
            taken = submit(job)
            if not taken:
                queued.pop(id(job), None)  # the queue was full: published before cend
            elif job.committed:
                self.queued = True  # cend says so: a death before the publish loses it
            return taken

        def logged_run(jobs: Any) -> object:
            self._journaled.last = None
            done: bool | None = None
            try:
                done = bool(run(jobs))
                return done
            finally:
                txs = [tx for job in jobs if (tx := queued.pop(id(job), None)) is not None]
                if txs:
                    self._log_published(txs, done)

        write._submit = tagged_submit  # type: ignore[method-assign]
        publisher._run = logged_run

    def _watch_publish_failures(self) -> None:
        """Record the commits whose publish Redis did not complete (``published`` with
        ``"ok": false``; on the committing thread here, on the background worker in
        :meth:`_watch_background_publishes`) and every journal replay (``replayed``): such a
        publish lands at its writer's next replay, which invalidates the keys it journaled
        (docs/consistency.md, "Eviction of locks"). Stress instrumentation, as above."""
        write = self._write_path()
        journal = write.runtime.journal
        run_now, replay = write.run_jobs, journal.replay
        add_pairs, add_buckets = journal.add_pairs, journal.add_buckets

        def noted(add: Callable[..., None]) -> Callable[..., None]:
            def journal_add(*args: Any) -> None:
                add(*args)
                self._journaled.last = journal._adds  # this thread's latest add

            return journal_add

        def logged_run_now(jobs: Any, held: Any = None, tally: Any = None) -> bool:
            self._journaled.last = None
            done = run_now(jobs, held, tally)
            if not done and self.committing is not None and any(j.committed for j in jobs):
                self._log_published([self.committing], False)
            return done

        def logged_replay(*args: Any) -> bool:
            pending, before = journal.pending, journal._adds
            replayed = replay(*args)
            if pending and replayed:
                # nothing is left journaled: every add up to ``before`` has been replayed
                self.rec.log({"e": "replayed", "js": before, "t": now()})
            return replayed

        write.run_jobs = logged_run_now  # type: ignore[method-assign]
        journal.replay = logged_replay  # type: ignore[method-assign]
        journal.add_pairs = noted(add_pairs)  # type: ignore[method-assign]
        journal.add_buckets = noted(add_buckets)  # type: ignore[method-assign]

    def _log_published(self, txs: list[str], done: bool | None) -> None:
        """``done``: False when Redis did not complete the publish (its keys journaled, by
        the add ``js``: the first replay that began after it removes what it would have);
        None when it raised (nothing journaled: taken as landed now, so a value it left is
        reported)."""
        event: dict[str, Any] = {"e": "published", "txs": txs, "t": now()}
        if done is False:
            event["ok"] = False
            event["js"] = self._journaled.last
        self.rec.log(event)

    def _note(self, pairs: Any, found: Any) -> None:
        if found is None:
            return
        self.batch_keys = [key for key, _ in pairs]
        for (key, _), entry in zip(pairs, found, strict=True):
            self.batch_sources[key] = "near" if type(entry) is Copy else "cache" if entry else "db"

    def _hooks(self, factory: Any) -> None:
        event.listen(factory, "after_begin", _mark_begin)
        # before the cache's own before_flush, which sends the flush's locks
        event.listen(factory, "before_flush", _mark_write, insert=True)
        if self.kill_prob <= 0:
            return

        def after_flush(session: Session, flush_context: Any) -> None:
            if session.info.get("armed") is None:
                return
            if self.rng.random() < self.kill_prob:
                self._die("after_flush", session.info["armed"] or None)

        def after_commit(session: Session) -> None:
            if not session.info.get("armed") or session.get_nested_transaction() is not None:
                return
            if self.rng.random() < self.kill_prob:
                self._die("after_commit", session.info["armed"], session.info.get("t_write"))

        event.listen(factory, "after_flush_postexec", after_flush)
        # inserted before the cache's own after_commit, so it runs before the publish
        event.listen(factory, "after_commit", after_commit, insert=True)

    def _die(self, where: str, tx: str | None, t_write: int | None = None) -> None:
        event: dict[str, Any] = {"e": "kill", "where": where, "tx": tx, "t": now()}
        if t_write is not None:
            event["tw"] = t_write  # the transaction's first write (see commit())
        self.rec.log(event)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # pragma: no cover

    # -- helpers -------------------------------------------------------------------------

    def session(
        self, level: str | None = None, ways: tuple[str, ...] = SESSION_WAYS
    ) -> tuple[Session, str]:
        """A fresh session; with tenants, on the operation's tenant, reached in one of
        ``ways`` (those that apply to what the caller does with it), picked at random."""
        level = level or self.rng.choice(self.isolations)
        if self.in_baseline():
            return self.plain[level](), level
        tenant = self.op_tenant
        if tenant is None:
            return self.sessions[level](), level
        way = self.rng.choice([w for w in self.tenant_ways if w in ways])
        self.rec.way = way
        if way == "bind":
            return self.rebound[level](self.tenant_binds[(level, tenant)]), level
        if way == "maker":
            return self.tenant_makers[(level, tenant)](), level
        s = self.sessions[level]()
        if way == "connection":
            s.connection(execution_options=self.translate())
        return s, level

    def translate(self) -> dict[str, Any]:
        """The execution options naming the operation's tenant."""
        return {"schema_translate_map": {None: self.op_tenant}}

    def by_statement(self) -> bool:
        """Does the current session reach its tenant through each statement's options?"""
        return self.op_tenant is not None and self.rec.way in ("execute", "statement")

    def get(self, s: Session, model: Any, id_: int, **kw: Any) -> Any:
        """``s.get``, with the tenant's map when the session's way is per statement."""
        if self.by_statement():
            kw["execution_options"] = self.translate()
        return s.get(model, self.key(id_), **kw)

    def execute(self, s: Any, stmt: Any, params: Any = None) -> Any:
        """``s.execute`` (a Session or a Connection), with the tenant's map in the call's
        ``execution_options`` or on the statement, when the session's way says so."""
        if self.by_statement():
            if self.rec.way == "statement":
                stmt = stmt.execution_options(**self.translate())
            else:
                return s.execute(stmt, params, execution_options=self.translate())
        return s.execute(stmt, params)

    def table_name(self, table: str) -> str:
        """A table as raw SQL names it: ``text()`` is not translated by a map, so a tenant's
        table is named with its schema, as users write it."""
        preparer = self.engine.dialect.identifier_preparer
        if self.op_tenant is None:
            return str(preparer.quote(table))
        return f"{preparer.quote_schema(self.op_tenant)}.{preparer.quote(table)}"

    @property
    def extras(self) -> list[int]:
        """The rows this worker inserted (and did not delete) in the operation's tenant."""
        return self._extras.setdefault(self.op_tenant, [])

    def in_baseline(self) -> bool:
        """Is the current operation part of the database-only baseline? (Decided once per
        operation: its rows and its sessions must agree.)"""
        return self.op_in_baseline

    def item_ids(self) -> list[int]:
        return self.baseline_items if self.in_baseline() else self.hot_items

    def parent_ids(self) -> list[int]:
        return self.baseline_parents if self.in_baseline() else self.parents

    def read(
        self,
        s: Session,
        level: str,
        table: str,
        id_: int,
        load: Callable[[], Any],
        locked: bool = False,
    ) -> Any:
        hits = self.cache.stats().hits
        near = self.cache._near
        near_hits = near.hits if near is not None else 0
        t0 = now()
        obj = load()
        t1 = now()
        served = self.cache.stats().hits - hits
        from_memory = near is not None and near.hits > near_hits
        src = "near" if from_memory else "cache" if served else "locked" if locked else "db"
        value = None if obj is None else obj.counter
        self.rec.log(
            {
                "e": "read",
                "tb": table,
                "id": id_,
                "v": value,
                "src": src,
                "t0": t0,
                "t1": t1,
                "iso": level,
                "tx": s.info.get("t_begin"),
            }
        )
        return obj

    def get_locked(self, s: Session, level: str, model: Any, id_: int) -> Any:
        """Load a row ``FOR UPDATE`` for a write: by ``session.get``, or (as often) by a plain
        ``select()``, whose loaded identity holds the driver's own values (asyncpg's UUID
        class, with ``--key-type uuid``), which the write path must key like the column's
        type: a write of such an object once skipped its entry (stale reads)."""
        if self.rng.random() < 0.5:
            load = lambda: self.get(s, model, id_, with_for_update=True)  # noqa: E731
        else:
            stmt = (
                select(model)
                .where(model.id == self.key(id_))
                .with_for_update()
                .execution_options(populate_existing=True)  # as get's with_for_update
            )
            load = lambda: self.execute(s, stmt).scalar_one_or_none()  # noqa: E731
        return self.read(s, level, model.__tablename__, id_, load, locked=True)

    def commit(
        self,
        s: Session,
        writes: list[list[Any]],
        lock_failures_before: int,
        path: str | None = None,
    ) -> str:
        self.tx_seq += 1
        tx = f"{self.name}:{self.tx_seq}"
        start: dict[str, Any] = {"e": "cstart", "tx": tx, "writes": writes, "t": now()}
        if s.info.get("t_begin") is not None:
            start["tb"] = s.info["t_begin"]  # its database transaction began (before its locks)
        if path is not None:
            start["path"] = path  # the statement-level write path (op_stmt)
        self.rec.log(start)
        s.info["armed"] = tx
        if s.info.pop("stmt_written", False) and self.rng.random() < self.kill_prob:
            # statement-level writes run no flush: die here, between them and COMMIT
            self._die("after_flush", tx)
        outcome = "ok"
        error: BaseException | None = None
        self.committing, self.queued = tx, False
        try:
            s.commit()
        except CacheUnavailableError as exc:  # raised at flush, before COMMIT
            outcome, error = "failed", exc
        except DBAPIError as exc:
            outcome = "maybe" if exc.connection_invalidated else "failed"
            error = exc
        except Exception as exc:
            outcome, error = "maybe", exc
        finally:
            s.info.pop("armed", None)
            self.committing = None
        lf = self.cache.stats().lock_failures - lock_failures_before
        end: dict[str, Any] = {"e": "cend", "tx": tx, "outcome": outcome, "t": now(), "lf": lf}
        if s.info.get("t_write") is not None:
            end["tw"] = s.info["t_write"]  # its first write began (before its locks): often
            # commit()'s own flush, after cstart
        if self.queued:
            end["q"] = True
        self.rec.log(end)
        if error is not None:
            raise error
        return outcome

    def write_extra(self, obj: Any) -> None:
        """Version B writes its extra column too (who wrote the row last, and when): its
        UPDATE then changes a column version A's entries do not hold. The checker never
        reads it (reads compare ``counter``); at quiescence version B's entries are compared
        with the row as version B loads it, extra column included."""
        if self.writes_extra:
            setattr(obj, EXTRA_COLUMN, f"{self.name}@{now()}")

    def pick_model(self) -> tuple[Any, int]:
        if self.rng.random() < 0.2:
            return self.Parent, self.rng.choice(self.parent_ids())
        return self.Item, self.rng.choice(self.item_ids())

    def any_extra(self) -> int:
        if self.extras and self.rng.random() < 0.5:
            return self.rng.choice(self.extras)
        return extra_id(
            self.rng.randrange(self.slots), self.rng.randrange(2), self.rng.randrange(30)
        )

    def read_target(self) -> tuple[Any, int]:
        if self.shadows and self.rng.random() < 0.2:
            model, id_ = self.rng.choice(self.shadows)
            return model or self.Item, id_
        roll = self.rng.random()
        if roll < 0.15 and not self.in_baseline():
            return self.Item, self.any_extra()
        if roll < 0.3:
            return self.Parent, self.rng.choice(self.parent_ids())
        return self.Item, self.rng.choice(self.item_ids())

    # -- operations ----------------------------------------------------------------------

    def op_get(self) -> None:
        model, id_ = self.read_target()
        s, level = self.session(ways=WAYS)
        with s:
            self.read(s, level, model.__tablename__, id_, lambda: self.get(s, model, id_))

    def op_select(self) -> None:
        model, id_ = self.read_target()
        s, level = self.session(ways=WAYS)
        stmt = select(model).where(model.id == self.key(id_)).options(from_cache())
        with s:
            self.read(
                s,
                level,
                model.__tablename__,
                id_,
                lambda: self.execute(s, stmt).scalar_one_or_none(),
            )

    def batch_ids(self, model: Any) -> list[int]:
        """2-8 distinct ids of ``model`` for an IN-list read: hot rows (the ones writers are
        changing), sometimes a row inserted or deleted by a worker, sometimes one that never
        existed."""
        n = self.rng.randint(2, 8)
        ids: list[int] = []
        if self.rng.random() < 0.25:
            ids.append(self.rng.choice(ABSENT_IDS))
        if model is self.Item and not self.in_baseline() and self.rng.random() < 0.3:
            ids.append(self.any_extra())
        pool = self.parent_ids() if model is self.Parent else self.item_ids()
        ids += self.rng.sample(pool, max(0, min(n - len(ids), len(pool))))
        if len(ids) < 2:
            ids.append(self.rng.choice(ABSENT_IDS))
        self.rng.shuffle(ids)
        return list(dict.fromkeys(ids))

    def op_batch(self) -> None:
        """An IN-list read with ``from_cache()`` (one MGET, the misses in one query), as a 2.0
        ``select`` or a legacy ``Query``; one read event per id asked for (``v`` None: not in
        the result), each with the batch's times and where that row came from."""
        model = self.Parent if self.rng.random() < 0.15 else self.Item
        ids = self.batch_ids(model)
        s, level = self.session(ways=WAYS)
        legacy = self.rng.random() < 0.3
        with s:
            if legacy:
                wanted = [self.key(i) for i in ids]
                query = s.query(model).filter(model.id.in_(wanted)).options(from_cache())
                if self.by_statement():
                    query = query.execution_options(**self.translate())
                load: Callable[[], list[Any]] = query.all
            else:
                stmt = select(model).where(model.id.in_([self.key(i) for i in ids]))
                stmt = stmt.options(from_cache())
                load = lambda: list(self.execute(s, stmt).scalars())  # noqa: E731
            self._watch_batch_reads()
            self.batch_sources.clear()
            self.batch_keys = []
            t0 = now()
            rows = load()
            t1 = now()
            keys = self.batch_keys  # the outermost call's (the near cache's) are the last
            # by id, from each key's primary-key part: the cache reads them in its own order
            # (an int key's sorted), not the list's
            by_id = {
                key_part_id(key.rpartition("}:")[2], self.key_type): self.batch_sources[key]
                for key in keys
            }
            sources = by_id if len(keys) == len(ids) and all(i in by_id for i in ids) else None
            values = {self.unkey(obj.id): obj.counter for obj in rows}
            for id_ in ids:
                self.rec.log(
                    {
                        "e": "read",
                        "tb": model.__tablename__,
                        "id": id_,
                        "v": values.get(id_),
                        "src": "db" if sources is None else sources[id_],
                        "t0": t0,
                        "t1": t1,
                        "iso": level,
                        "tx": s.info.get("t_begin"),
                        "batch": len(ids),
                        "q": "query" if legacy else "select",
                    }
                )

    def op_lazy(self) -> None:
        id_ = self.rng.choice(self.item_ids())
        s, level = self.session()
        with s:
            item = self.read(s, level, ITEM_TABLE, id_, lambda: self.get(s, self.Item, id_))
            if item is not None:
                pid = self.unkey(item.parent_id)
                self.read(s, level, PARENT_TABLE, pid, lambda: item.parent)

    def op_rr_read(self) -> None:
        """A read inside a REPEATABLE READ transaction whose snapshot began a moment before."""
        if SNAPSHOT not in self.isolations:
            return self.op_get()
        s, level = self.session(SNAPSHOT, ways=WAYS)
        with s:
            pid = self.rng.choice(self.parent_ids())
            # not from_cache: the database
            stmt = select(self.Parent).where(self.Parent.id == self.key(pid))
            self.read(
                s, level, PARENT_TABLE, pid, lambda: self.execute(s, stmt).scalar_one_or_none()
            )
            time.sleep(self.rng.uniform(0, 0.01))
            model, id_ = self.read_target()
            if model is self.Parent and id_ == pid:
                return None
            self.read(s, level, model.__tablename__, id_, lambda: self.get(s, model, id_))
        return None

    def op_update(self, model: Any = None, id_: int | None = None) -> None:
        if model is None or id_ is None:
            model, id_ = self.pick_model()
        lf = self.cache.stats().lock_failures
        s, level = self.session()
        with s:
            obj = self.get_locked(s, level, model, id_)
            if obj is None:
                return
            obj.counter = next_value(obj.counter, self.rng)
            self.write_extra(obj)
            self.commit(s, [[model.__tablename__, id_, obj.counter]], lf)

    def op_update_extra(self) -> None:
        if not self.extras:
            return self.op_insert()
        return self.op_update(self.Item, self.rng.choice(self.extras))

    def op_pair(self) -> None:
        """Two hot rows locked in random order: deadlocks and serialization failures."""
        a, b = self.rng.sample(self.hot_items, 2)
        for attempt in range(3):
            lf = self.cache.stats().lock_failures
            s, level = self.session()
            try:
                with s:
                    x = self.get_locked(s, level, self.Item, a)
                    time.sleep(self.rng.uniform(0, 0.01))
                    y = self.get_locked(s, level, self.Item, b)
                    x.counter = next_value(x.counter, self.rng)
                    y.counter = next_value(y.counter, self.rng)
                    self.write_extra(x)
                    self.commit(s, [[ITEM_TABLE, a, x.counter], [ITEM_TABLE, b, y.counter]], lf)
                return
            except DBAPIError as exc:
                if error_class(exc) != "db-conflict" or attempt == 2:
                    raise
                self.rec.log({"e": "retry", "t": now(), "err": error_text(exc)})

    def op_rollback(self) -> None:
        model, id_ = self.pick_model()
        s, level = self.session()
        with s:
            obj = self.get_locked(s, level, model, id_)
            if obj is None:
                return
            obj.counter = next_value(obj.counter, self.rng)
            self.rec.log({"e": "aborted", "writes": [[model.__tablename__, id_, obj.counter]]})
            s.info["armed"] = ""
            s.flush()
            time.sleep(self.rng.uniform(0, 0.005))
            if self.rng.random() < 0.5:
                s.rollback()
            # else: close() with the transaction open (a rollback without the event)

    def op_savepoint(self) -> None:
        model, id_ = self.pick_model()
        lf = self.cache.stats().lock_failures
        s, level = self.session()
        with s:
            obj = self.get_locked(s, level, model, id_)
            if obj is None:
                return
            inner = next_value(obj.counter, self.rng)
            s.info["armed"] = ""
            sp = s.begin_nested()
            obj.counter = inner
            s.flush()
            if self.rng.random() < 0.5:
                sp.commit()
                final = inner
            else:
                self.rec.log({"e": "aborted", "writes": [[model.__tablename__, id_, inner]]})
                sp.rollback()
                if self.rng.random() < 0.5:
                    s.info.pop("armed", None)
                    s.commit()  # nothing to publish: the savepoint's key is left a miss
                    return
                final = next_value(obj.counter, self.rng)  # reloads the row (expired)
                obj.counter = final
            s.info.pop("armed", None)
            self.commit(s, [[model.__tablename__, id_, final]], lf)

    def op_stmt(self, path: str | None = None) -> None:
        """Change 1-3 rows through a statement-level write path instead of the unit of work.

        Every row is first read ``FOR UPDATE`` (in id order) and gets ``next_value`` of what
        was read, so the history stays exact; the commit is recorded like ``op_update``'s.
        Sometimes the transaction is rolled back (or closed open) instead, its values logged
        as aborted, like ``op_rollback``.
        """
        path = path or self.rng.choice(STMT_PATHS)
        if path == "mappings" and not set(self.tenant_ways) & set(SESSION_WAYS):
            path = "bulk_pk"  # bulk_update_mappings takes no execution options
        ways: tuple[str, ...] = SESSION_WAYS if path == "mappings" else WAYS
        ways = tuple(w for w in ways if f"{path}:{w}" not in self.avoid) or SESSION_WAYS
        lf = self.cache.stats().lock_failures
        s, level = self.session(ways=ways)
        with s:
            # the locked rows, held: the identity map is weak, and a later s.get() of a row
            # it let go would be a cache read, whose value the write would then be based on
            if path == "range":
                model, locked = self._stmt_range(s, level)
            else:
                model, ids = self._stmt_targets()
                locked = {}
                for i in ids:
                    obj = self.get_locked(s, level, model, i)
                    if obj is not None:
                        locked[i] = obj
            if not locked:
                return
            table = model.__tablename__
            # the rows' current values: what the FOR UPDATE reads just returned
            values = {i: next_value(obj.counter, self.rng) for i, obj in locked.items()}
            key = self.key
            rows = [{"id": key(i), "counter": v} for i, v in values.items()]
            tbl = self.table_name(table)
            raw = text(f"UPDATE {tbl} SET counter = :v WHERE id = :id")
            params = [{"v": v, "id": key(i)} for i, v in values.items()]
            by_id = case({key(i): v for i, v in values.items()}, value=model.id)
            s.info["armed"] = ""
            s.info.setdefault("t_write", now())  # before the statements' locks
            if path == "bulk_pk":
                self.execute(s, update(model), rows)
            elif path == "where_eq":
                for i, v in values.items():
                    self.execute(s, update(model).where(model.id == key(i)).values(counter=v))
            elif path == "in_case":
                self.execute(
                    s,
                    update(model)
                    .where(model.id.in_([key(i) for i in values]))
                    .values(counter=by_id),
                )
            elif path == "range":
                lo, hi = key(min(values)), key(max(values))
                self.execute(s, update(model).where(model.id.between(lo, hi)).values(counter=by_id))
            elif path == "text":
                self.execute(s, raw, params if len(params) > 1 else params[0])
            elif path == "text_conn":
                self.execute(s.connection(), raw, params if len(params) > 1 else params[0])
            elif path == "mappings":
                s.bulk_update_mappings(model, rows)
            else:  # pragma: no cover
                raise ValueError(path)
            writes: list[list[Any]] = [[table, i, v] for i, v in values.items()]
            if self.rng.random() < 0.15:
                self.rec.log({"e": "aborted", "writes": writes, "path": path})
                time.sleep(self.rng.uniform(0, 0.005))
                if self.rng.random() < 0.5:
                    s.rollback()
                return  # else: close() with the transaction open
            s.info["stmt_written"] = True
            self.commit(s, writes, lf, path)

    def _stmt_targets(self) -> tuple[Any, list[int]]:
        """1-3 rows of one table for a statement write, in id order (fewer deadlocks)."""
        if self.extras and self.rng.random() < 0.15:
            return self.Item, [self.rng.choice(self.extras)]
        if self.rng.random() < 0.2:
            pool, model = self.parent_ids(), self.Parent
        else:
            pool, model = self.item_ids(), self.Item
        n = self.rng.randint(1, min(3, len(pool)))
        return model, sorted(self.rng.sample(pool, n))

    def _stmt_range(self, s: Session, level: str) -> tuple[Any, dict[int, Any]]:
        """Lock every row of a random id range ``[a, b]`` of hot items (2-3 ids wide) with one
        ``SELECT ... FOR UPDATE``, each row logged as a locked read; returns them by id."""
        pool = sorted(self.item_ids())
        width = self.rng.randint(2, 3)
        start = self.rng.randrange(len(pool) - width + 1)
        lo, hi = pool[start], pool[start + width - 1]
        t0 = now()
        stmt = (
            select(self.Item)
            .where(self.Item.id.between(self.key(lo), self.key(hi)))
            .order_by(self.Item.id)
            .with_for_update()
        )
        found = list(self.execute(s, stmt).scalars())
        t1 = now()
        for obj in found:
            self.rec.log(
                {
                    "e": "read",
                    "tb": ITEM_TABLE,
                    "id": self.unkey(obj.id),
                    "v": obj.counter,
                    "src": "locked",
                    "t0": t0,
                    "t1": t1,
                    "iso": level,
                    "tx": s.info.get("t_begin"),
                }
            )
        return self.Item, {self.unkey(obj.id): obj for obj in found}

    def op_insert(self) -> None:
        if self.next_extra >= EXTRAS_PER_INCARNATION or self.incarnation >= INCARNATIONS_PER_SLOT:
            return
        id_ = extra_id(self.slot, self.incarnation, self.next_extra)
        self.next_extra += 1
        value = first_value(self.rng)
        lf = self.cache.stats().lock_failures
        s, _level = self.session()
        with s:
            parent = self.key(self.rng.choice(self.parents))
            item = self.Item(id=self.key(id_), counter=value, parent_id=parent)
            self.write_extra(item)
            s.add(item)
            outcome = self.commit(s, [[ITEM_TABLE, id_, value]], lf)
        if outcome == "ok":
            self.extras.append(id_)

    def op_delete(self) -> None:
        if len(self.extras) < 3:
            return self.op_insert()
        id_ = self.extras.pop(0)
        lf = self.cache.stats().lock_failures
        s, level = self.session()
        with s:
            obj = self.get_locked(s, level, self.Item, id_)
            if obj is None:
                return None
            s.delete(obj)
            self.commit(s, [[ITEM_TABLE, id_, None]], lf)
        return None

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> None:
        if self.async_engine is None:
            self._run()
            return
        from sqlalchemy_writethrough._sa_compat import greenlet_spawn

        async def main() -> None:
            try:
                await greenlet_spawn(self._run)
            finally:
                await self.cache.aclose()
                await self.async_engine.dispose()

        asyncio.run(main())

    def _wait_for_start(self, parent: int) -> None:
        """Say ready, then take the deadline (and, in the outage scenario, the database-only
        baseline's span) from the runner's start file (written once every first worker is
        ready; a respawned worker finds it there)."""
        start_file = self.config.get("start_file")
        if not start_file:
            return
        with open(self.config["ready"], "w", encoding="utf-8") as f:
            f.write("ready")
        give_up = time.monotonic() + 150
        while not os.path.exists(start_file):
            if time.monotonic() > give_up or os.getppid() != parent:
                self.deadline = 0
                return
            time.sleep(0.02)
        with open(start_file, encoding="utf-8") as f:
            times = [int(t) for t in f.read().split()]
        self.deadline = times[0]
        if len(times) == 3:
            self.baseline = times[1:]

    def _idle(self) -> None:
        """``--idle-second-version``: in the second half of every period (shared by the
        version's workers: the monotonic clock is the machine's), do nothing at all."""
        idle_ns = int(self.config.get("idle", 0.0) * 1e9)
        if not idle_ns:
            return
        phase = now() % (2 * idle_ns)
        if phase >= idle_ns:
            resume = now() + 2 * idle_ns - phase
            while now() < min(resume, self.deadline):
                time.sleep(0.05)

    def _run(self) -> None:
        parent = os.getppid()
        self._wait_for_start(parent)
        while now() < self.deadline and os.getppid() == parent:
            self._idle()
            if now() >= self.deadline:
                break
            kind = self.rng.choices(self.ops, self.weights)[0]
            self.op_in_baseline = bool(
                self.baseline and self.baseline[0] <= now() < self.baseline[1]
            )
            if self.op_in_baseline and kind not in SIMPLE:
                kind = "get"
            self.op_tenant = self.rng.choice(self.tenants) if self.tenants else None
            self.rec.tenant, self.rec.way = self.op_tenant, None
            if (
                self.op_tenant is not None
                and kind not in STATEMENT_OPS
                and not set(self.tenant_ways) & set(SESSION_WAYS)
            ):
                kind = "get"  # a unit-of-work write cannot reach a tenant per statement
            t0 = now()
            err = ec = None
            try:
                getattr(self, f"op_{kind}")()
            except Exception as exc:
                err, ec = error_text(exc), error_class(exc)
            self.rec.log({"e": "op", "k": kind, "t0": t0, "t1": now(), "err": err, "ec": ec})
        counts = {k: v for k, v in vars(self.cache.stats()).items() if type(v) is int}
        self.rec.tenant = None
        self.rec.log({"e": "stop", "t": now(), "stats": counts})
        self.rec.close()
        if self.async_engine is None:
            self.engine.dispose()


def near_options(config: dict[str, Any], flavour: str) -> NearCacheOptions | bool:
    """``--near-cache``: every worker's near cache, sync and asyncio alike."""
    staleness = config.get("near_cache")
    if staleness is None:
        return False
    return NearCacheOptions(staleness=staleness)


def redis_client(config: dict[str, Any], asynchronous: bool = False) -> Any:
    """What the worker gives the cache: the URL of the run's server, a Sentinel-managed
    primary, or a Redis Cluster, configured as docs/running-redis.md advises; for an asyncio
    worker, the ``redis.asyncio`` twin of the Sentinel or Cluster client (a URL serves both)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if config.get("sentinels"):
        from .sentinel import SERVICE

        if asynchronous:
            from redis.asyncio.retry import Retry as AsyncRetry
            from redis.asyncio.sentinel import Sentinel as AsyncSentinel

            sentinel_class: Any = AsyncSentinel
            retry: Any = AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        else:
            from redis.retry import Retry
            from redis.sentinel import Sentinel

            sentinel_class = Sentinel
            retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        sentinel = sentinel_class(
            [tuple(a) for a in config["sentinels"]],
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        return sentinel.master_for(
            SERVICE,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=retry,
            retry_on_error=[RedisConnectionError],
        )
    if config.get("cluster"):
        if asynchronous:
            from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
            from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

            return AsyncRedisCluster(
                startup_nodes=[AsyncClusterNode(h, p) for h, p in config["cluster"]],
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
            )
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in config["cluster"]],
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
    return config["redis_url"]


SABOTAGES = (
    "unguarded-fill",
    "stale-snapshot-fill",
    "no-epoch-check",
    "unlocked-background-publish",
    "deaf-near-cache",
    "tenant-blind-keys",
    "unguarded-batch-fill",
    "deaf-near-batch",
    "deaf-own-near",
    "blind-triggers",
    "blind-self-writers",
)


#: the flavours of a cache ``sabotage`` can break: the one sync sessions use, and the one
#: AsyncSessions use (``cache._async_flavour()``)
FLAVOURS = ("sync", "asyncio")


def sabotage(cache: WriteThroughCache, name: str | None, flavour: str = "sync") -> None:
    """Break the cache on purpose, to show the checker catches what a naive cache does.

    ``flavour``: whose hooks break, "sync" (the cache's first flavour, which sync sessions
    use) or "asyncio" (the one AsyncSessions use, made now if not yet): an asyncio worker's
    sessions never reach the other, so a sabotage of it would prove nothing. The patches go
    through the flavour's backend and transport (``transport.command``, ``transport.sleep``),
    which await Redis and ``asyncio.sleep`` inside SQLAlchemy's greenlet for the asyncio
    flavour: one patch serves both. The near cache and the modules ``stale-snapshot-fill``
    and ``tenant-blind-keys`` patch are shared by both flavours: one call breaks them for both
    (a second call, for the other flavour, would patch the near cache twice).

    ``unguarded-fill``       a fill writes whatever it loaded, even over a lock or a newer
                             value (no lease check), a few milliseconds after the load;
    ``stale-snapshot-fill``  a REPEATABLE READ transaction fills from its old snapshot;
    ``no-epoch-check``       the cache's Redis connections are never checked against the
                             prefix's epoch (the backend is built without it), so a Redis that
                             went back in time serves what it remembers;
    ``unlocked-background-publish``  with ``--publish background``: a commit gives its locks
                             up (the previous values come back) before queuing its publish, as
                             a naive asynchronous cache would, and the worker runs a few
                             milliseconds late.
    ``deaf-near-cache``      with ``--near-cache``: the near cache ignores every invalidation
                             message and its copies live 10 times the bound.
    ``tenant-blind-keys``    with ``--tenants``: a database is named without its
                             ``schema_translate_map``, so every tenant's row shares one entry.
    ``unguarded-batch-fill`` the fills of an IN-list read's misses write whatever was loaded,
                             over a lock or a newer value (no lease check), a few milliseconds
                             late; single-row fills are left alone.
    ``deaf-near-batch``      with ``--near-cache``: the copies an IN-list read keeps are filed
                             under keys no invalidation message names (as if the batch path
                             spelled its keys differently) and live 10 times the bound; the
                             single-row path is left alone.
    ``deaf-own-near``        with ``--near-cache``: the near cache does not drop its copies of
                             the keys its own process writes (it leaves them to the messages)
                             and ignores the messages naming a key it wrote itself within the
                             bound (as a cache filtering out its own messages would; a key
                             counts as written when its script is sent): a
                             process may read from memory what it has just replaced, other
                             processes' commits are still heard; copies expire as usual.
    ``blind-triggers``       with ``--rewriting-trigger``: the cache takes no table as one the
                             database rewrites rows of (triggers, generated columns), and
                             writes through what the flush sent (shared by both flavours: the
                             registry is one).
    ``blind-self-writers``   with ``--sibling-trigger``: the cache takes no table as one its
                             own or another table's triggers write, so a write of a hot item
                             invalidates that row alone and its shadow's entry (in the same
                             table, or another with ``other``) is left as it was.
    """
    if not name:
        return
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose from {FLAVOURS}")
    if flavour == "asyncio":
        hooks = cache._async_flavour()
        runtime, write = hooks.runtime, hooks.write
    else:
        runtime, write = cache._runtime, cache._write
    #: the flavour's backend as it is now (``no-epoch-check`` replaces it)
    backend: Any = runtime.backend
    if name == "deaf-near-cache":
        near = cache._near
        if near is None:
            raise ValueError("deaf-near-cache needs --near-cache")
        hear, store = near._handle, near._store

        def deaf_handle(message: dict[str, Any]) -> None:
            kind = message["type"]
            if (kind.decode() if isinstance(kind, bytes) else kind) != "message":
                hear(message)

        def long_store(key: str, gen_key: str, payload: Any, seq: int, expires: float) -> None:
            store(key, gen_key, payload, near._seq, expires + 9 * near.staleness)

        near._handle = deaf_handle  # type: ignore[method-assign]
        near._store = long_store  # type: ignore[method-assign]
        return
    if name == "blind-triggers":
        cache._models.rewritten = lambda *args, **kwargs: []  # type: ignore[method-assign]
        return
    if name == "blind-self-writers":
        cache._models.self_written = lambda *args, **kwargs: False  # type: ignore[method-assign]
        cache._models.trigger_written = lambda *args, **kwargs: []  # type: ignore[method-assign]
        cache._models.trigger_writer_names = lambda *args, **kwargs: {}  # type: ignore[method-assign]
        return
    if name == "deaf-own-near":
        near = cache._near
        if near is None:
            raise ValueError("deaf-own-near needs --near-cache")
        wrote, drop = near.wrote, near.drop
        #: key -> when this process last wrote it (monotonic seconds)
        mine: dict[str, float] = {}

        def mark(keys: Any) -> None:
            at = time.monotonic()
            for key in keys[0::2]:
                mine[key] = at

        class MarkingScripts(Scripts):
            """The backend's scripts, marking the keys a write script names when it is SENT:
            its message may be handled before its reply is read (a flush's LOCK travels
            during the flush's SQL and its reply is read after it: marked on the reply, the
            LOCK's own message dropped the copy first and this sabotage was inert)."""

            __slots__ = ()

            def call(self, script: Any, keys: Any, args: Any) -> tuple[Any, ...]:
                if script in PAIR_SCRIPTS:
                    mark(keys)
                return super().call(script, keys, args)

        scripts, marking = backend._scripts, MarkingScripts()
        marking.source, marking.sha, marking.channel = scripts.source, scripts.sha, scripts.channel
        backend._scripts = marking

        def own_wrote(script: Any, keys: Any) -> None:
            if script not in PAIR_SCRIPTS:
                wrote(script, keys)  # buckets and epochs as before
                return
            mark(keys)

        def deaf_drop(keys: Any) -> None:
            since = time.monotonic() - near.staleness
            drop([key for key in keys if mine.get(key, float("-inf")) < since])

        near.wrote = own_wrote  # type: ignore[method-assign]
        near.drop = deaf_drop  # type: ignore[method-assign]
        return
    if name == "unguarded-batch-fill":
        fill_many = backend.fill_many

        def unguarded_fill_many(items: Any) -> list[Any]:
            # a slow reader: the race window is wider (awaited on the loop for asyncio)
            backend.transport.sleep(random.uniform(0, 0.01))
            done: list[Any] = []
            for item in items:
                key, _gen_key, _lease, gen, payload, ttl_ms = item
                if not payload:  # giving a lease up
                    done.extend(fill_many([item]) or [None])
                    continue
                backend.transport.command("SET", key, b"V" + gen + b":" + payload, "PX", ttl_ms)
                done.append(True)
            return done

        backend.fill_many = unguarded_fill_many
        return
    if name == "deaf-near-batch":
        near = cache._near
        if near is None:
            raise ValueError("deaf-near-batch needs --near-cache")
        read_many, store_many = near.read_many, near._store_many
        tag = "batch|"

        class Untagged:
            """The backend, asked for the real keys of the tagged ones."""

            def __init__(self, backend: Any) -> None:
                self.backend = backend

            def peek_many(self, pairs: Any) -> Any:
                return self.backend.peek_many([(key[len(tag) :], g) for key, g in pairs])

        def long_store(copies: Any, seq: int, expires: float) -> None:
            store_many(copies, seq, expires + 9 * near.staleness)

        def deaf_read_many(backend: Any, pairs: Any) -> Any:
            near._store_many = long_store  # type: ignore[method-assign]
            try:
                return read_many(Untagged(backend), [(tag + key, g) for key, g in pairs])
            finally:
                near._store_many = store_many  # type: ignore[method-assign]

        near.read_many = deaf_read_many  # type: ignore[method-assign]
        return
    if name == "tenant-blind-keys":
        from sqlalchemy_writethrough import databases

        databases._schemas = lambda translate: ""
        return
    if name == "unguarded-fill":
        original = backend.fill

        def fill(
            key: str, gen_key: str, lease: str, gen: bytes, payload: bytes, ttl_ms: int
        ) -> bool | None:
            if not payload:  # giving a lease up
                return original(key, gen_key, lease, gen, payload, ttl_ms)
            # a slow reader: the race window is wider (awaited on the loop for asyncio)
            backend.transport.sleep(random.uniform(0, 0.01))
            backend.transport.command("SET", key, b"V" + gen + b":" + payload, "PX", ttl_ms)
            return True

        backend.fill = fill
    elif name == "no-epoch-check":
        checked = backend
        # the same kind of backend (sync, asyncio, Cluster) on the same client, without the
        # prefix that turns the epoch check on
        unchecked = type(checked)(checked.client, checked.breaker, runtime.counters)
        unchecked.on_recovery = checked.on_recovery
        unchecked.on_cluster_node = checked.on_cluster_node
        cache._tell_near(unchecked)  # its writes still tell the near caches
        runtime.backend = unchecked
    elif name == "unlocked-background-publish":
        publisher = write.publisher
        assert publisher is not None
        submit, run = write._submit, publisher._run

        def unlocked_submit(job: Any) -> bool:
            # a queued job carries its locks as the transaction left them (``locked``: entity
            # key -> generation key); ``pairs`` is only filled once the worker builds it
            pairs = job.pairs or [k for pair in (job.locked or {}).items() for k in pair]
            if job.committed and pairs:
                runtime.backend.release(pairs, job.owner)
            return submit(job)

        def late_run(jobs: Any) -> object:
            # on the worker thread, or in the asyncio worker's greenlet: awaited on the loop
            current: Any = runtime.backend
            current.transport.sleep(random.uniform(0.002, 0.02))
            return run(jobs)

        write._submit = unlocked_submit  # type: ignore[method-assign]
        publisher._run = late_run
    elif name == "stale-snapshot-fill":
        from sqlalchemy_writethrough import loading

        loading._read_was_fresh = lambda *args: True  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown sabotage {name!r}; choose from {SABOTAGES}")


def _rebind(factory: sessionmaker[Session], bind: Any) -> Session:
    """A session of ``factory`` on another bind (the "bind" way to a tenant)."""
    return factory(bind=bind)


def _mark_begin(session: Session, transaction: Any, connection: Any) -> None:
    session.info.setdefault("t_begin", now())


def _mark_write(session: Session, flush_context: Any, instances: Any) -> None:
    """When the session's first write began: its locks in Redis come after it."""
    session.info.setdefault("t_write", now())


def make_engine(url: str, pool_size: int = 2) -> Engine:
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
    _session_settings(engine)
    return engine


def async_url(url: str) -> str:
    """The same database through its asyncio driver (asyncpg, aiomysql)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    driver = {"postgresql": "asyncpg", "mysql": "aiomysql", "mariadb": "aiomysql"}[backend]
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    return parsed.set(drivername=f"{backend}+{driver}", query=query).render_as_string(
        hide_password=False
    )


def _session_settings(engine: Engine) -> None:
    """Short lock waits on every new database connection (the sync core of an async engine
    too: its listener runs in the greenlet that connects)."""

    @event.listens_for(engine, "connect")
    def _settings(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("SET deadlock_timeout = '100ms'")
            cursor.execute("SET lock_timeout = '5s'")
        else:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 5")
        cursor.close()
        dbapi_connection.commit()


# ------------------------------------------------------------------------ herd


def herd(config: dict[str, Any]) -> None:
    """Threads of one process read one cold row at the same instants; report SQL per round.

    After warming up it writes its ``ready`` file and waits for the runner's ``go`` file (the
    first round's monotonic start); round ``i`` reads ``ids[i]`` at ``start + i * round_ns``.
    One line per round goes to the history file: how many of this process's readers loaded the
    row from the database, and the cache's hits, misses and fills.
    """
    threads: int = config["threads"]
    engine = make_engine(config["db_url"], pool_size=threads + 1)
    options: dict[str, Any] = {}
    if config.get("fill_wait") is not None:
        options["fill_wait"] = config["fill_wait"]
    cache = WriteThroughCache(
        config["redis_url"],
        prefix=config["prefix"],
        lock_timeout=config.get("lock_timeout", 2.0),
        lease_timeout=config.get("lease_timeout", 2.0),
        **options,
    )
    factory: sessionmaker[Session] = sessionmaker(engine)
    cache.install(factory)
    loads = 0
    lock = threading.Lock()

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal loads
        if ITEM_TABLE in statement and statement.lstrip().upper().startswith("SELECT"):
            with lock:
                loads += 1

    rec = Recorder(config["history"], config["worker"])
    # warm up: connections open, mapper configured, statements compiled
    conns = [engine.connect() for _ in range(threads)]
    for c in conns:
        c.close()
    with factory() as s:
        s.get(StItem, config["warm_id"])
    errors: list[str] = []
    # ready; wait (bounded) for the runner's go file, which holds the first round's start
    with open(config["ready"], "w", encoding="utf-8") as f:
        f.write("ready")
    give_up = time.monotonic() + 60
    while not os.path.exists(config["go"]):
        if time.monotonic() > give_up:
            return
        time.sleep(0.01)
    with open(config["go"], encoding="utf-8") as f:
        base = int(f.read())
    rounds = [(base + i * int(config["round_ns"]), id_) for i, id_ in enumerate(config["ids"])]

    def reader(id_: int, start: int) -> None:
        wait = (start - now()) / 1e9 - 0.002
        if wait > 0:
            time.sleep(min(wait, 30))
        while now() < start:  # the last two milliseconds: spin, so all threads start together
            pass
        try:
            with factory() as s:
                s.get(StItem, id_)
        except Exception as exc:
            errors.append(error_text(exc))

    for start, id_ in rounds:
        before = cache.stats()
        loads = 0
        pool = [threading.Thread(target=reader, args=(id_, start)) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(30)
        after = cache.stats()
        rec.log(
            {
                "e": "herd",
                "id": id_,
                "loads": loads,
                "hits": after.hits - before.hits,
                "misses": after.misses - before.misses,
                "fills": after.fills - before.fills,
                "errors": len(errors),
                "t": now(),
            }
        )
        errors.clear()
    rec.close()
    engine.dispose()


def _stamp(record: logging.LogRecord) -> bool:
    record.created_ns = time.monotonic_ns()
    return True


def main(argv: list[str]) -> int:
    # the warnings the cache logs (epochs, nodes down), each with its history time
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(created_ns)s %(message)s"))
    handler.addFilter(_stamp)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    with open(argv[1], encoding="utf-8") as f:
        config = json.load(f)
    if config.get("scenario") == "herd":
        herd(config)
    else:
        Worker(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
