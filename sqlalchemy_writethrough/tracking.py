"""What one session's transaction changed, per savepoint, until it commits or rolls back.

Changes are recorded per :class:`~sqlalchemy.orm.SessionTransaction` (the root or a savepoint).
A released savepoint hands its changes to its parent; a rolled-back one leaves its keys as
misses in the parent (the row is back to an earlier state that the parent may or may not have
seen); only the root's commit publishes, and the root's end releases whatever it locked.
"""

from __future__ import annotations

import itertools
import os
import secrets
import weakref
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import Session

from . import _sa_compat

#: ``Session.get_bind`` itself: a subclass's own may route each class elsewhere
_PLAIN_GET_BIND = Session.get_bind


class Change:
    """The fate of one entry at commit: a payload to publish, or None for a miss (and why:
    one of :data:`.stats.INVALIDATION_REASONS`, for the stats)."""

    __slots__ = ("gen_key", "payload", "reason", "ttl_ms")

    def __init__(
        self, gen_key: str, payload: bytes | None, ttl_ms: int, reason: str = "rollback"
    ) -> None:
        self.gen_key = gen_key
        self.payload = payload
        self.ttl_ms = ttl_ms
        self.reason = reason


# Lock owners and lease tokens: a random prefix per process and a counter (a syscall per
# transaction for secrets.token_hex showed in the commit profile); a forked child (gunicorn,
# Celery prefork) draws a prefix of its own, or its tokens would repeat its parent's.
_token_prefix = secrets.token_hex(8) + "."
_token_counter = itertools.count()


def unique_token() -> str:
    """A token no other transaction or reader, in any process, holds."""
    return f"{_token_prefix}{next(_token_counter)}"


def _new_token_prefix() -> None:
    global _token_prefix
    _token_prefix = secrets.token_hex(8) + "."


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_token_prefix)


class SessionTracker:
    """Per-session state, kept in ``session.info`` under the cache's own key."""

    __slots__ = (
        "__weakref__",
        "background",
        "began",
        "cache_seconds",
        "changes",
        "committed",
        "expected",
        "external",
        "first_lock_at",
        "flush_keys",
        "held",
        "in_flush",
        "infos",
        "lock_ms",
        "locked",
        "locked_gens",
        "owner",
        "partial_list",
        "pending_lock",
        "reassert_on_flush",
        "ref",
        "released_savepoints",
        "renamed",
        "session_ref",
        "siblings_covered",
        "siblings_known",
        "spaces",
        "statement_keys",
        "strict",
        "unlocked",
        "unlocked_gens",
        "unregistered",
        "untracked_write",
        "wrote",
    )

    def __init__(self, session: Any) -> None:
        self.session_ref = weakref.ref(session)
        #: what a connection's ``info`` holds while the session uses it (never the tracker)
        self.ref = weakref.ref(self)
        self.reset()

    def reset(self) -> None:
        self.owner: str = ""
        #: the lock script before_flush sent, whose reply after_flush reads (see .writing)
        self.pending_lock: Any = None
        #: the connection a lock inside ``commit()`` kept checked out for the publish (a
        #: transport handle, see :meth:`.ScriptBackend.finish`); given back at the latest
        #: when the transaction ends (see .writing)
        self.held: Any = None
        #: the running flush's rows whose keys before_flush computed: state -> (key space,
        #: primary key, entity key, generation key, what it kept of the row as loaded or
        #: None: see writing.Kept), for after_flush to reuse; replaced at each before_flush
        self.flush_keys: dict[Any, tuple[Any, Any, str, str, Any]] = {}
        #: entity key -> generation key, for every key this root transaction locked (or tried to)
        self.locked: dict[str, str] = {}
        #: entity key -> the row's payload as this transaction loaded it, for the keys of rows
        #: it UPDATEs leaving loaded columns unwritten: each lock of the key (the first, and a
        #: re-assertion) is contended unless the VALUE it replaces holds exactly this (see
        #: lua/lock.lua); ``b"!"`` (never a payload) where the loaded row could not be encoded
        self.expected: dict[str, bytes] = {}
        self.lock_ms = 0
        #: the registry fields of the keyspaces this root transaction locked keys in: each
        #: lock of the transaction records them again (see :mod:`.siblings`), so that its
        #: publish comes within a lock's timeout of a registration of its keyspaces
        self.spaces: dict[str, None] = {}
        #: the keyspace registry as the first lock of the transaction that named siblings
        #: saw it (a :class:`.siblings.Known`), which the publish's version check goes by
        self.siblings_known: Any = None
        #: the registry fields every list the transaction's locks went by named: a later
        #: lock may go by a shorter list than the first (Redis forgot the registry in
        #: between, and a registration brought the one made again), and missed a sibling
        #: the first list named; the publish's check invalidates every sibling not in here
        self.siblings_covered: frozenset[str] | None = None
        #: a lock of the transaction went by a list of a registry that was not whole (Redis
        #: forgot it, or no list was read yet): ``commit()`` returns once it is whole again
        self.partial_list = False
        #: a registration sent with one of this transaction's locks was refused: its
        #: publish leaves every entry as a miss (see :meth:`.siblings.Siblings.registered`)
        self.unregistered = False
        self.changes: dict[Any, dict[str, Change]] = {}
        self.released_savepoints: set[int] = set()
        #: the transaction wrote (flush or DML): its reads are not fresh enough to fill
        self.wrote = False
        #: the transaction ran DML or text() whose rows the cache cannot name: until it ends,
        #: its reads bypass Redis (a cached row may be older than what it wrote)
        self.untracked_write = False
        #: a database connection began in this transaction (a snapshot may predate a lease)
        self.began = False
        self.committed = False
        #: the session joined a transaction begun outside it (Session(bind=connection)): its
        #: reads may see that transaction's uncommitted rows or an old snapshot, and its
        #: commit() does not COMMIT, so it never fills and never publishes
        self.external = False
        self.reassert_on_flush = False
        #: engine -> the naming options of this transaction's connection to it, where they
        #: name another database than the engine's (a schema_translate_map given to
        #: ``session.connection(execution_options=...)``): its loads and flushes use them
        self.renamed: dict[Any, dict[str, Any]] = {}
        #: monotonic time of this transaction's first lock (0.0: none yet)
        self.first_lock_at = 0.0
        #: a model involved is configured on_redis_error="strict"
        self.strict = False
        #: True when every model involved says publish="background" (None: none yet)
        self.background: bool | None = None
        #: generation keys this root transaction locked: whole models it changed without
        #: naming the rows (range DML, raw SQL, database cascades)
        self.locked_gens: dict[str, None] = {}
        #: before_flush ran and after_flush has not: the flush's statements are tracked by
        #: after_flush, not one by one (trusted only while the session is still flushing: a
        #: flush can stop between the two)
        self.in_flush = False
        #: entity keys and generation keys whose locks could not be taken: journaled again
        #: after COMMIT, since a journal replay during the transaction may have come too early
        self.unlocked: list[str] = []
        #: entries a statement changed in this transaction: a later flush of the same row
        #: only knows the attributes it set, so these are left as misses at commit
        self.statement_keys: set[str] = set()
        self.unlocked_gens: list[str] = []
        #: the DBAPI-connection info dicts that point statements at this tracker
        self.infos: list[dict[Any, Any]] = []
        #: seconds this transaction spent on Redis writes (locks, publish): the stats
        self.cache_seconds = 0.0

    def note_first_read(self, bind: Any) -> None:
        """Called before a read that is the transaction's first statement, with the bind it
        reads: was that connection already in a transaction that the session did not begin?"""
        if not (self.began or self.external):
            self._note_binds((bind,))

    def note_first_flush(self, session: Any, pending: Iterable[Iterable[Any]]) -> None:
        """Called by a flush before the transaction's first statement, with the states it
        will write: is any database they go to reached through a connection already in a
        transaction that the session did not begin? Each class's bind is looked at
        (``binds={Model: connection}``), and in a sharded session every shard's."""
        if self.began or self.external:
            return
        if isinstance(session, ShardedSession):
            binds = _sa_compat.shard_binds(session)
        elif type(session).get_bind is _PLAIN_GET_BIND and not getattr(
            session, _sa_compat.SESSION_BINDS_ATTR
        ):
            binds = [session.bind]  # what get_bind() answers for every class
        else:
            binds = []
            # the unit of work asks get_bind() for each row's base mapper
            for mapper in {state.mapper.base_mapper for states in pending for state in states}:
                try:
                    binds.append(session.get_bind(mapper=mapper))
                except UnboundExecutionError:  # the flush raises it, if it writes the class
                    continue
        self._note_binds(binds)

    def _note_binds(self, binds: Iterable[Any]) -> None:
        if any(isinstance(bind, Connection) and bind.in_transaction() for bind in binds):
            self.external = True
            self.wrote = True

    def current_transaction(self) -> Any:
        session = self.session_ref()
        if session is None:
            return None
        return session.get_nested_transaction() or session.get_transaction()

    def owner_token(self) -> str:
        if not self.owner:
            self.owner = unique_token()
        return self.owner

    def record(self, transaction: Any, key: str, change: Change) -> None:
        self.changes.setdefault(transaction, {})[key] = change

    def end_savepoint(self, savepoint: Any, parent: Any) -> None:
        child = self.changes.pop(savepoint, None)
        released = id(savepoint) in self.released_savepoints
        self.released_savepoints.discard(id(savepoint))
        if not child:
            return
        target = self.changes.setdefault(parent, {})
        if released:
            target.update(child)
            return
        for key, change in child.items():
            if key not in target:  # the row may now hold an earlier value of the transaction
                target[key] = Change(change.gen_key, None, change.ttl_ms, "rollback")


def _untouched() -> SessionTracker:
    class _Gone:
        pass

    tracker = SessionTracker.__new__(SessionTracker)
    tracker.session_ref = weakref.ref(_Gone())  # dead at once: no session
    tracker.ref = weakref.ref(tracker)
    tracker.reset()
    return tracker


#: what a read sees of a session whose transaction has not touched a database yet (no
#: tracker exists): a fresh tracker's state, shared and never written to, so that a session
#: made for one cached get does not pay for building one
UNTOUCHED: SessionTracker = _untouched()
