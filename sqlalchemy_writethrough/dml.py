"""Invalidation for every statement that changes rows outside the unit of work.

ORM bulk ``update()``/``delete()``, bulk UPDATE by primary key, ``bulk_save_objects`` and the
``bulk_*_mappings``, Core DML and ``text()`` run through a session (``session.execute`` or
``session.connection()``) all reach the database cursor, and that is where this module looks at
them, in ``before_cursor_execute``, *before* they run:

* when the WHERE clause names primary keys (``pk = x``, ``pk IN (...)``, one row per
  executemany parameter set), exactly those entries are locked, and the commit leaves them as
  misses (a rollback restores them);
* otherwise every bucket of the model gets a generation lock, replaced by a new generation after
  COMMIT: O(1) in the number of cached rows, effective for every reader at once;
* a raw SQL string is matched against the cached tables' names; a statement whose effect cannot
  be told (a procedure call) makes its own transaction read from the database until it ends.

Raw SQL that switches the schema unqualified names reach on its connection (``SET
search_path``, ``set_config('search_path', ...)``, ``USE``) is seen here too, on any connection
of an engine a session used: keys name the schema an engine's connections start on
(:mod:`.databases`), so the connection is marked and every transaction on it reads from the
database and invalidates every cached model at its commit; a warning says how to name tenants
instead. Only raw SQL pays for the check: compiled SELECTs leave before it.

Statements of the ORM's own flush are left to ``after_flush``, which knows their rows exactly;
SQL a listener runs while the session flushes (a mapper event's ``connection.execute``, an
``after_flush`` listener's ``session.execute``) is not the flush's and is handled here.
A statement on a connection that belongs to no session is not seen: call ``cache.invalidate()``.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import TextClause

from . import _sa_compat, engine_events
from .databases import OPTION, naming_of, own_naming

if TYPE_CHECKING:
    from .model import ModelLayout
    from .runtime import Runtime
    from .tracking import SessionTracker
    from .writing import WritePath

log = logging.getLogger("sqlalchemy_writethrough")

_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)+", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
#: statements that cannot change rows
_READ_ONLY = frozenset(
    {"select", "show", "explain", "describe", "desc", "values", "table", "pragma", "set",
     "begin", "start", "commit", "rollback", "savepoint", "release", "prepare", "deallocate",
     "listen", "unlisten", "notify", "use", "analyze", "vacuum", "checkpoint", "lock",
     "grant", "revoke", "comment", "discard", "reset",
     # MySQL's two-phase commit (a Session with twophase=True): XA START, END, PREPARE, COMMIT
     "xa"}
)  # fmt: skip
#: statements that may change rows of the tables they name
_NAMING = frozenset(
    {"insert", "update", "delete", "replace", "merge", "truncate", "alter", "drop", "create",
     "copy", "load", "upsert", "with", "rename", "refresh"}
)  # fmt: skip
#: a statement choosing the schema unqualified names reach for the rest of its connection
_SWITCH = re.compile(
    r"(?:set\s+(?:session\s+|(local\s+))?search_path\b|use\s"
    r"|select\b.*\bset_config\s*\(\s*'search_path')",
    re.I | re.S,
)
#: the connection's info (its pool entry's, kept while the DBAPI connection lives) once a
#: statement switched its schema
SWITCHED = "writethrough_schema_switched"
_UPSERT = re.compile(r"\bon\s+(?:conflict|duplicate\s+key)\b", re.I)
#: ``EXPLAIN`` and its options: with ANALYZE, PostgreSQL (and MySQL) run the statement
_EXPLAIN = re.compile(
    r"explain\b((?:\s*\([^)]*\)|\s+(?:analy[sz]e|verbose|extended|partitions|format\s*=?\s*\w+)"
    r"\b)*)\s*",
    re.I,
)
_ANALYZE = re.compile(r"\banaly[sz]e\b", re.I)
#: the statements MariaDB's ``ANALYZE`` runs (rather than analysing a table)
_ANALYZED = _NAMING | {"select"}
#: MariaDB's ``SET STATEMENT var=value[, ...] FOR <statement>`` runs the statement
_SET_STATEMENT = re.compile(r"set\s+statement\b.*?\bfor\s+", re.I | re.S)
_REPLACE = re.compile(r"\breplace\b", re.I)


def _statement_run_by(word: str, text: str) -> str | None:
    """The statement a read-only-looking one runs, or None: ``EXPLAIN ANALYZE <statement>``
    (PostgreSQL, MySQL), ``ANALYZE <statement>`` (MariaDB; ``ANALYZE <table>`` gathers
    statistics) and ``SET STATEMENT ... FOR <statement>`` (MariaDB). ``word``: the text's
    first word, lower-cased."""
    if word == "explain":
        explained = _EXPLAIN.match(text)
        if explained is not None and _ANALYZE.search(explained.group(1)):
            return text[explained.end() :]
    elif word == "set":
        statement_for = _SET_STATEMENT.match(text)
        if statement_for is not None:
            return text[statement_for.end() :]
    elif word in ("analyze", "analyse"):
        rest = _LEADING_NOISE.sub("", text[len(word) :])
        inner = _FIRST_WORD.match(rest)
        if inner is not None and inner.group(0).lower() in _ANALYZED:
            return rest
    return None


def _statements(sql: str) -> list[str]:
    """The statements of raw SQL that may hold several (``SET LOCAL ...; UPDATE ...``: psycopg
    runs them all), split at every semicolon. One inside a literal or a comment splits too:
    its fragments read as statements of no known kind (every cached model invalidated), so a
    statement is never missed, at the cost of invalidating too much for such rare SQL."""
    if ";" not in sql:
        return [sql]
    parts = [part for part in sql.split(";") if _LEADING_NOISE.sub("", part).strip()]
    return parts or [sql]


class StatementTracker:
    """The ``before_cursor_execute`` listener, added once to every engine a session uses."""

    def __init__(self, runtime: Runtime, write: WritePath) -> None:
        self.runtime = runtime
        self.write = write
        #: the engines watch() was given (weak keys: an engine is never kept)
        self._watched: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._names: re.Pattern[str] | None = None
        self._names_for: int = -1
        #: the names of the last tables-whose-triggers-write-cached-models seen, and a pattern
        #: of them (names: no model is kept alive here)
        self._writers: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)
        #: engines already warned of a switched schema (ids: never kept alive)
        self._warned: set[int] = set()

    def watch(self, engine: Any) -> None:
        """Look at the statements of every connection of ``engine`` (once per engine): through
        the listener on the ``Engine`` class (:mod:`.engine_events`: never one added to an
        engine in use), which holds this tracker weakly; :meth:`unwatch` stops it."""
        if engine in self._watched:
            return
        engine_events.statements.add(engine, self.before_cursor_execute)
        self._watched[engine] = True

    def unwatch(self) -> None:
        """Stop watching the engines :meth:`watch` was given (the cache was uninstalled from
        its last target)."""
        watched = list(self._watched)
        self._watched.clear()
        for engine in watched:
            engine_events.statements.discard(engine, self.before_cursor_execute)

    def before_cursor_execute(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if context is None:
            return
        compiled = context.compiled
        dml = context.isinsert or context.isupdate or context.isdelete
        if compiled is not None and not dml and not isinstance(compiled.statement, TextClause):
            return  # a compiled SELECT (or DDL): the hot path leaves here
        ref = conn.info.get(self.runtime.settings.info_key)
        tracker: SessionTracker | None = ref() if ref is not None else None
        if tracker is None:
            if not dml:
                self._switches(conn, statement)  # remembered for the sessions it serves next
            return
        if tracker.in_flush:
            if not _sa_compat.session_is_flushing(tracker.session_ref()):
                tracker.in_flush = False  # that flush stopped before after_flush
            elif dml and compiled is not None and _sa_compat.emitted_by_unit_of_work(context):
                return  # the unit of work's own statement: after_flush tracks it
            # else a listener's statement during the flush: tracked as any other
        tracker.wrote = True
        # the database the statement's tables are in: its engine, or the one its execution
        # options name (a schema_translate_map of the statement or of its connection)
        engine = conn.engine
        options = context.execution_options
        naming = naming_of(engine, options)
        if naming is None and tracker.renamed:
            naming = own_naming(engine)  # not the session's connection's: the statement's
        declared = options.get("writethrough_invalidates")
        if declared is not None:
            # the caller says which models this statement changes
            layouts = self.runtime.models.declared_layouts(declared)
            for each in _with_and_without_schemas(engine, naming):
                self.write.lock_models(tracker, layouts, engine, each)
            return
        if dml and compiled is not None:
            self._compiled_dml(tracker, engine, naming, context, compiled)
        else:
            parts = _statements(statement)
            if any([self._switches(conn, part) for part in parts]):
                tracker.untracked_write = True
                layouts = self.runtime.models.cached_layouts()
            else:
                found = {
                    id(lay): lay
                    for part in (parts if len(parts) > 1 else [statement])
                    for lay in self._text(tracker, part, engine, naming)
                }
                layouts = list(found.values())
            if layouts:
                for each in _with_and_without_schemas(engine, naming):
                    self.write.lock_models(tracker, layouts, engine, each)

    # -- a schema switched mid-connection ------------------------------------------------

    def _switches(self, conn: Any, statement: str) -> bool:
        """Whether raw SQL chooses the schema unqualified names reach on its connection
        (``SET search_path``, ``set_config('search_path', ...)``, ``USE``): the keys of its
        rows are named by the schema the engine's connections start on, so the connection is
        marked (:data:`SWITCHED`; not for ``SET LOCAL``, which ends with the transaction),
        and the engine warned of once."""
        switch = _SWITCH.match(_LEADING_NOISE.sub("", statement, count=1))
        if switch is None:
            return False
        if switch.group(1) is None:  # not SET LOCAL: the switch outlives the transaction
            conn.info[SWITCHED] = True
        engine = conn.engine
        if id(engine) not in self._warned:
            self._warned.add(id(engine))
            log.warning(
                "writethrough: %r switched the schema of a connection of %s mid-connection; "
                "the cache names a database by the schema its connections start on, so every "
                "transaction on that connection reads from the database and invalidates every "
                "cached model when it commits. Choose the tenant with "
                "execution_options(schema_translate_map={None: schema}) (per engine, "
                "connection or statement), connect_args or a pool 'connect' listener, or "
                "name it with the execution option %s",
                statement[:80],
                engine.url.render_as_string(hide_password=True),
                OPTION,
            )
        return True

    def begin_on(self, tracker: SessionTracker, conn: Any) -> None:
        """A transaction begins on a connection whose schema a statement switched: it reads
        from the database, and its commit invalidates every cached model (its rows may come
        from another schema than its keys name)."""
        tracker.untracked_write = True
        tracker.wrote = True
        layouts = self.runtime.models.cached_layouts()
        if layouts:
            naming = naming_of(conn.engine, conn.get_execution_options())
            for each in _with_and_without_schemas(conn.engine, naming):
                self.write.lock_models(tracker, layouts, conn.engine, each)

    # -- compiled DML --------------------------------------------------------------------

    def _compiled_dml(
        self,
        tracker: SessionTracker,
        engine: Any,
        naming: dict[str, Any] | None,
        context: Any,
        compiled: Any,
    ) -> None:
        rt = self.runtime
        stmt = compiled.statement
        table = getattr(stmt, "table", None)
        if table is None:
            return
        layouts = rt.models.layouts_for_table(table)
        whole: list[ModelLayout] = []
        if context.isinsert:
            if getattr(stmt, "_post_values_clause", None) is not None or _replaces(stmt):
                whole += layouts  # an upsert may change existing rows, by any unique key
        else:
            if context.isdelete:
                whole += rt.models.cascades(table, deleted=True, orm_handles=())
            elif _sets_referenced_key(stmt, context, table):
                whole += rt.models.cascades(table, deleted=False, orm_handles=())
            if layouts:
                extra = bool(getattr(stmt, "_extra_froms", None))
                for layout in layouts:
                    keys = None if extra else _pk_values(stmt, layout, compiled, context)
                    if keys is None:
                        whole.append(layout)
                    else:
                        self.write.invalidate_rows(tracker, layout, keys, engine, naming)
        for layout in layouts:
            whole += rt.models.also_invalidated(layout)
            if rt.models.keys(layout, engine, naming).self_written:
                whole.append(layout)  # its triggers write its table: maybe other rows
        # the cached models its triggers write (its own model cached or not)
        base = table._deannotate() if hasattr(table, "_deannotate") else table
        if hasattr(base, "fullname"):  # a Table (not an alias, a text target)
            whole += rt.models.trigger_written((base,), engine, naming)
        if whole:
            self.write.lock_models(tracker, whole, engine, naming)

    # -- raw SQL -------------------------------------------------------------------------

    def _text(
        self,
        tracker: SessionTracker,
        statement: str,
        engine: Any,
        naming: dict[str, Any] | None,
    ) -> list[ModelLayout]:
        """The cached models raw SQL may change (read once, locked in each database it may
        reach by the caller)."""
        text = _LEADING_NOISE.sub("", statement)
        match = _FIRST_WORD.match(text)
        word = match.group(0).lower() if match else ""
        runs = _statement_run_by(word, text)
        if runs is not None:
            return self._text(tracker, runs, engine, naming)
        if word in _READ_ONLY:
            if word == "select" and " into " not in text.lower():
                return []
            if word != "select":
                return []
        rt = self.runtime
        if word == "insert" and not _UPSERT.search(text) and not _REPLACE.search(text):
            # a plain INSERT cannot change a row the cache holds, but its table's triggers
            # may: those declared (also_invalidates: a counter kept on another table), and
            # those found writing the table itself (Models.self_written)
            found = self._trigger_written(text, engine, naming)
            for layout in self._named_layouts(text):
                found += rt.models.also_invalidated(layout)
                if rt.models.keys(layout, engine, naming).self_written:
                    found.append(layout)
            return found
        if word not in _NAMING:
            # a procedure call, a DO block...: nothing says which rows it changes, so every
            # cached model is invalidated; execution_options(writethrough_invalidates=[...])
            # names the models instead
            tracker.untracked_write = True
            log.info(
                "writethrough: a %r statement may change any table; invalidating every cached "
                "model (name them with execution_options(writethrough_invalidates=[...]))",
                word.upper(),
            )
            return rt.models.cached_layouts()
        layouts = self._named_layouts(text)
        whole = list(layouts)
        for layout in layouts:
            whole += rt.models.also_invalidated(layout)
        whole += self._trigger_written(text, engine, naming)
        parents = rt.models.cascade_parent_names()
        pattern = table_name_pattern(parents)
        if pattern is not None:
            for name in {m.group(0).lower() for m in pattern.finditer(text)}:
                for deleted in (True, False):
                    whole += rt.models.cascades(parents[name], deleted=deleted, orm_handles=())
        return whole

    def _trigger_written(
        self, text: str, engine: Any, naming: dict[str, Any] | None
    ) -> list[ModelLayout]:
        """The cached models the triggers of the tables raw SQL names write (see
        :meth:`.Models.trigger_written`), those tables cached or not."""
        writers, scope = self.runtime.models.trigger_writer_names(engine, naming)
        if not writers:
            return []
        known, pattern = self._writers
        if known != writers.keys():
            pattern = table_name_pattern(writers)
            self._writers = (frozenset(writers), pattern)
        if pattern is None:
            return []
        found: list[ModelLayout] = []
        for name in {m.group(0).lower() for m in pattern.finditer(text)}:
            # a bare name is a table of the scope's schema only (MySQL's database)
            anywhere = scope is None or "." in name
            found += [layout for schema, layout in writers[name] if anywhere or schema == scope]
        return found

    def _named_layouts(self, text: str) -> list[ModelLayout]:
        by_name = self.runtime.models.layouts_by_table_name()
        if not by_name:
            return []
        if self._names is None or self._names_for != len(by_name):
            self._names = table_name_pattern(by_name)
            self._names_for = len(by_name)
        found: list[ModelLayout] = []
        assert self._names is not None
        for match in self._names.finditer(text):
            for layout in by_name.get(match.group(0).lower(), ()):
                if layout not in found:
                    found.append(layout)
        return found


_MISSING: Any = object()


def _replaces(stmt: Any) -> bool:
    """INSERT OR REPLACE (SQLite) and REPLACE-style prefixes replace existing rows."""
    return any("replace" in str(prefix).lower() for prefix, _ in getattr(stmt, "_prefixes", ()))


def _sets_referenced_key(stmt: Any, context: Any, table: Any) -> bool:
    """Whether an UPDATE may set a column that foreign keys can reference (ON UPDATE CASCADE
    then changes other tables); True when the SET columns cannot be told."""
    referenced = {c.key for c in table.columns if c.primary_key or c.unique}
    keys: set[str] = set()
    for column in getattr(stmt, "_values", None) or {}:
        keys.add(column if isinstance(column, str) else getattr(column, "key", str(column)))
    if not keys:
        params = context.compiled_parameters
        if not params:
            return True
        keys = set(params[0])
    return bool(referenced & keys)


def table_name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern finding any of these table names as whole words (quoted or not)."""
    alternatives = sorted({re.escape(n) for n in names}, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile(rf"(?<![\w$])(?:{'|'.join(alternatives)})(?![\w$])", re.I)


def _pk_values(
    stmt: Any, layout: ModelLayout, compiled: Any, context: Any
) -> list[list[Any]] | None:
    """Primary keys named by the WHERE clause, one list per row, or None when the clause is
    anything but equalities (or IN lists) on the whole primary key."""
    where = getattr(stmt, "whereclause", None)
    if where is None:
        return None
    width = len(layout.pk_index)
    terms = _sa_compat.pk_terms(
        [where], lambda t: t is not None and _same_table(t, layout.table), layout.pk_index
    )
    if terms is None:
        return None
    columns: list[list[Any]] = []
    for operator, right in terms:
        name = compiled.bind_names.get(right)
        if name is None:
            return None
        # values come from this execution only: the compiled statement is SQLAlchemy's cached
        # one, whose bound values belong to whichever statement was compiled first
        if operator is operators.eq and not right.expanding:
            values = [params.get(name, _MISSING) for params in context.compiled_parameters]
            if any(v is _MISSING for v in values):
                return None
            columns.append(values)
        elif operator is operators.in_op and right.expanding and width == 1:
            expanded = _sa_compat.expanded_parameter_names(context, name)
            params = context.compiled_parameters
            if expanded is None or len(params) != 1:
                return None
            try:
                columns.append([params[0][n] for n in expanded])
            except KeyError:
                return None
        else:
            return None
    if width == 1:
        return [[v] for v in columns[0]]
    rows = list(zip(*columns, strict=True))  # type: ignore[misc,unused-ignore]
    return [list(r) for r in rows]


def _same_table(a: Any, b: Any) -> bool:
    return a is b or (getattr(a, "fullname", None) == b.fullname and _base(a) is _base(b))


def _base(table: Any) -> Any:
    deannotate = getattr(table, "_deannotate", None)
    return deannotate() if deannotate is not None else table


def _with_and_without_schemas(
    engine: Any, naming: dict[str, Any] | None
) -> list[dict[str, Any] | None]:
    """The databases raw SQL (or a statement that names its models itself) may change: a
    ``schema_translate_map`` translates the tables of compiled statements only, so the SQL
    text reaches the tables its own names (and the ``search_path``) say: the database named
    without the map as well as the one named with it."""
    options = naming if naming is not None else engine.get_execution_options()
    if not options.get("schema_translate_map"):
        return [naming]
    plain = {OPTION: options.get(OPTION), "schema_translate_map": None}
    return [naming, naming_of(engine, plain) or own_naming(engine)]
