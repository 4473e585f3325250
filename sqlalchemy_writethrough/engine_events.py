"""The cache's engine listeners: one per event on the ``Engine`` class, added at import.

SQLAlchemy keeps an engine's listeners in a deque that its dispatch iterates without a lock,
and documents that a listener cannot be added while its event runs: ``event.listen()`` on an
engine another thread is executing on makes that thread's statement raise ``RuntimeError:
deque mutated during iteration``. The cache meets an engine at its first transaction or load,
while the application's threads use it, so it never adds a listener to an engine: these
class-level listeners hand each statement (and each ``dispose()``) to whatever watches that
engine, kept here in maps the cache changes under a lock and the listeners only read. The
engines nobody watches (the application's others, or one before its first cached session) do
not run their statements' events at all, as if the library were not imported.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import _sa_compat

_Watchers = tuple["weakref.WeakMethod[Callable[..., None]]", ...]


class EngineWatchers:
    """Bound methods to call for one event of an engine, held weakly (a watcher, a cache's
    part, never kept alive by an engine that outlives it)."""

    def __init__(self, on_add: Callable[[Any], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_engine: weakref.WeakKeyDictionary[Any, _Watchers] = weakref.WeakKeyDictionary()
        self._on_add = on_add

    def add(self, engine: Any, method: Callable[..., None]) -> None:
        with self._lock:
            current = self._by_engine.get(engine, ())
            alive = tuple(w for w in current if w() is not None)
            if any(w() == method for w in alive):
                return
            self._by_engine[engine] = (*alive, weakref.WeakMethod(method))
        if self._on_add is not None:
            self._on_add(engine)

    def discard(self, engine: Any, method: Callable[..., None]) -> None:
        with self._lock:
            current = self._by_engine.get(engine)
            if current is None:
                return
            kept = tuple(w for w in current if w() is not None and w() != method)
            if kept:
                self._by_engine[engine] = kept
            else:
                del self._by_engine[engine]

    def of(self, engine: Any) -> _Watchers:
        return self._by_engine.get(engine, ())


#: ``before_cursor_execute`` of an engine's connections: a derived engine's
#: (``execution_options()``) statements reach its parents' watchers too, as a listener on
#: the parent would have been run for them. Only a watched engine's connections run their
#: events (the class listener leaves every other engine on SQLAlchemy's fast path): a watch
#: turns them on, for good, as a listener added to the engine would
statements = EngineWatchers(on_add=_sa_compat.run_engine_events)
#: ``engine_disposed``: that engine's own dispose only, as its own listener would be
disposals = EngineWatchers()


def _before_cursor_execute(
    conn: Any,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    engine = conn.engine
    if getattr(engine, "_proxied", None) is None:  # not derived by execution_options()
        for ref in statements.of(engine):
            method = ref()
            if method is not None:
                method(conn, cursor, statement, parameters, context, executemany)
        return
    # a derived engine's statements reach its parents' watchers too, each watcher once
    methods: dict[Callable[..., None], None] = {}
    for each in _sa_compat.engine_lineage(engine):
        for ref in statements.of(each):
            method = ref()
            if method is not None:
                methods.setdefault(method, None)
    for method in methods:
        method(conn, cursor, statement, parameters, context, executemany)


def _engine_disposed(engine: Any) -> None:
    for ref in disposals.of(engine):
        method = ref()
        if method is not None:
            method(engine)


def listen() -> None:
    """Add the class-level listeners, unless they are there (a program that clears the
    ``Engine`` class's listeners, as SQLAlchemy's own test suite does, may call it again)."""
    if not event.contains(Engine, "before_cursor_execute", _before_cursor_execute):
        _sa_compat.listen_on_engine_class("before_cursor_execute", _before_cursor_execute)
    if not event.contains(Engine, "engine_disposed", _engine_disposed):
        # run by dispose() whatever the engine's flag (see _sa_compat.listen_on_engine_class)
        _sa_compat.listen_on_engine_class("engine_disposed", _engine_disposed)


listen()
