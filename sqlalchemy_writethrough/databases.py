"""Which database a bind reads and writes: one part of every key, so two databases never share
an entry (one database per tenant, a model bound to several engines, horizontal shards), and one
database reached by two URLs never has two.

Entries are shared by every process and host, so a database is named by what every process
agrees on, never by an object of this one, and as far as possible by the server itself, not by
the URL that reached it (a pgbouncer port, ``localhost`` in one process and an IP address in
another, a DNS alias): a name that differed between two processes for one database would let a
commit through one leave the other's entries stale.

- PostgreSQL: the cluster's ``system_identifier`` (from ``pg_control_system()``, set at initdb)
  and ``current_database()``, and whether it is a replica (which shares its primary's
  identifier but lags behind it: its reads must not fill the primary's entries);
- MySQL / MariaDB: the server's ``@@hostname`` and ``@@port`` and ``DATABASE()``;
- asked once per engine pool and process (an engine and those ``execution_options()``
  derives share one), on a connection of its own (a pool recreated from the engine's: same
  ``connect_args``, creator and pool listeners, never one of the application's connections):
  per pool, not per URL, because those choose the schema an unqualified name reaches (with
  the catalog questions, MySQL's per schema reached: :data:`_PER_SCHEMA`);
  when the server cannot say (a permission, another backend), the URL's backend, host, port and
  database name, never the driver, user or password;
- a SQLite file by its absolute path; an in-memory SQLite database is unique to its engine's
  pool, so never shared;
- plus the ``schema_translate_map`` when set (it changes which tables are read): per model,
  only its entries that move the schemas of the model's tables (:func:`for_schemas`), and
  without those that send a schema where it already is: the server's default schema
  (PostgreSQL's ``current_schema()``, MySQL's ``DATABASE()``) stands for ``None``, so
  ``{None: "public"}`` names the rows no map names;
- plus that default schema (``search_path`` in ``connect_args`` or a "connect" listener; a
  ``USE`` there) when it is not the server's plain default (``public``; the URL's database),
  as the map entry ``{None: schema}`` that reaches the same tables, and only for models with
  a table of no schema: an engine on the default keeps the name earlier versions gave it (so
  a process of an older version shares its entries), a tenant chosen by ``search_path`` or
  by the map is one database, and a table that names its schema is shared by every tenant.
  A statement switching the schema mid-connection is :mod:`.dml`'s to see;
- or, explicitly, the engine's execution option ``writethrough_database``.

Those two options are read where SQLAlchemy reads them, the narrowest winning: a statement's
(``session.get(..., execution_options=...)``, ``select(...).execution_options(...)``, a
session's own in SQLAlchemy 2.1), then its connection's (``session.connection(
execution_options=...)``, a session bound to a Connection), then its engine's
(``create_engine(..., execution_options=...)``, ``engine.execution_options(...)``). A
``schema_translate_map`` chosen per tenant on a connection or a statement names that tenant's
rows, as it names the tables its SQL reads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from sqlalchemy.engine import URL, Connection

from . import _sa_compat, forks
from .codec import (
    MYSQL_WHOLE_UNICODE,
    declared_mysql_charset,
    driver_timezone,
)
from .exc import WritethroughError

log = logging.getLogger("sqlalchemy_writethrough")

#: the execution option naming a database explicitly
OPTION = "writethrough_database"

#: what a server says of itself; each query only reads functions and variables, so it cannot
#: fail for lack of a table privilege (the CASE skips a function the user may not execute)
_SERVER_QUERIES = {
    "postgresql": (
        "SELECT current_database(), CASE WHEN "
        "has_function_privilege('pg_control_system()', 'EXECUTE') "
        "THEN (SELECT system_identifier::text FROM pg_control_system()) "
        "|| CASE WHEN pg_is_in_recovery() THEN ':replica' ELSE '' END END, "
        "current_schema()"
    ),
    "mysql": "SELECT DATABASE(), CONCAT(@@hostname, ':', @@port), DATABASE()",
}

#: the relations whose rows the cache cannot serve, by backend: (schema, name, kind), kind
#: one of :data:`_UNSERVED_KINDS`. PostgreSQL's tables with row-level security enabled (which
#: rows a session sees depends on its role and settings, which the cache cannot know); views
#: and materialized views (their rows change with the tables they read, or at a ``REFRESH``,
#: and no commit of theirs says so); foreign tables (their rows change in another database),
#: and the tables one is a partition or an inheriting child of (loads of them read its rows).
#: Only catalogs every role may read (``pg_class``; ``information_schema.TABLES`` lists what
#: the user can see, ``sqlite_master``), the server's own schemas left out.
_UNSERVED_QUERIES = {
    "postgresql": (
        "WITH RECURSIVE found(rel, kind) AS ("
        "SELECT c.oid, CASE WHEN c.relrowsecurity THEN 's' ELSE c.relkind::text END "
        "FROM pg_catalog.pg_class c WHERE c.relrowsecurity OR c.relkind IN ('v', 'm', 'f') "
        # the tables a foreign table is a partition (or an inheriting child) of: their loads
        # read its rows too
        "UNION SELECT i.inhparent, 'F' FROM found "
        "JOIN pg_catalog.pg_inherits i ON i.inhrelid = found.rel WHERE found.kind IN ('f', 'F')) "
        "SELECT n.nspname, c.relname, found.kind FROM found "
        "JOIN pg_catalog.pg_class c ON c.oid = found.rel "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "ORDER BY 3 DESC"  # a relation's own kind first (lower case)
    ),
    # {schema}: the schema asked (MySQL's are asked one at a time: see :data:`_PER_SCHEMA`)
    "mysql": (
        "SELECT TABLE_SCHEMA, TABLE_NAME, 'v' FROM information_schema.TABLES "
        "WHERE TABLE_TYPE = 'VIEW' AND TABLE_SCHEMA = {schema}"
    ),
    # {schema}: a SQLite database's name, as a string literal, and {ident}: as an identifier
    # (its own, ``main``, or an attached one's: see :func:`_sqlite_catalog`)
    "sqlite": "SELECT {schema}, name, 'v' FROM {ident}.sqlite_master WHERE type = 'view'",
}

#: kind -> how a relation of that kind is described (``{}``: its schema-qualified name)
_UNSERVED_KINDS = {
    "s": "row-level security on {}",
    "v": "{} is a view",
    "m": "{} is a materialized view",
    "f": "{} is a foreign table",
    "F": "a partition or child table of {} is a foreign table",
}

#: the tables whose rows the database may rewrite as they are written, by backend: (schema,
#: name, kind), kind one of :data:`_REWRITING_KINDS`. A ``BEFORE`` row trigger on INSERT or
#: UPDATE may change the values the flush sent (``NEW.updated_at = now()``); on PostgreSQL so
#: may any other trigger on INSERT or UPDATE (an ``AFTER`` trigger that updates the row again,
#: the way to fill a materialized path, which needs the row's key; a statement trigger), and
#: which ones do cannot be told without reading their code; so does a MySQL column ``ON UPDATE
#: CURRENT_TIMESTAMP`` (MySQL's ``AFTER`` triggers cannot write their own table), and any
#: trigger of a SQLite table (an ``AFTER`` trigger that updates its own row is SQLite's way).
#: On PostgreSQL, a rule on INSERT or UPDATE too (``DO ALSO UPDATE`` the row just inserted),
#: and a partition's (or an inheriting child table's) trigger or rule counts for the tables
#: it belongs to: the flush writes the parent, the row lands in, or is updated in, the child.
#: Nothing tells the ORM, which keeps the values it sent: such a table's commits invalidate
#: instead of writing through. MySQL lists only the triggers of tables the user has the
#: TRIGGER privilege on.
_REWRITING_QUERIES = {
    "postgresql": (
        "WITH RECURSIVE found(rel, kind) AS ("
        # a trigger on INSERT (4) or UPDATE (16), of a row or a statement, before or after;
        # not switched off, nor one of a foreign key's
        "SELECT t.tgrelid, 't' FROM pg_catalog.pg_trigger t "
        "WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND t.tgtype & 20 <> 0 "
        # a rule on UPDATE (2) or INSERT (3), DO ALSO or DO INSTEAD
        "UNION SELECT r.ev_class, 'r' FROM pg_catalog.pg_rewrite r "
        "WHERE r.ev_type IN ('2', '3') AND r.ev_enabled <> 'D' "
        # the tables such a table is a partition (or an inheriting child) of: a write to
        # them is routed to it, an UPDATE of them reaches its rows
        "UNION SELECT i.inhparent, 'p' FROM found "
        "JOIN pg_catalog.pg_inherits i ON i.inhrelid = found.rel) "
        "SELECT DISTINCT n.nspname, c.relname, found.kind FROM found "
        "JOIN pg_catalog.pg_class c ON c.oid = found.rel "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "ORDER BY 3 DESC"  # a table's own trigger first, then its own rule
    ),
    "mysql": (
        "SELECT DISTINCT EVENT_OBJECT_SCHEMA, EVENT_OBJECT_TABLE, 't' "
        "FROM information_schema.TRIGGERS WHERE ACTION_TIMING = 'BEFORE' "
        "AND EVENT_MANIPULATION IN ('INSERT', 'UPDATE') AND EVENT_OBJECT_SCHEMA = {schema} "
        "UNION SELECT DISTINCT TABLE_SCHEMA, TABLE_NAME, 'u' FROM information_schema.COLUMNS "
        "WHERE EXTRA LIKE '%on update%' AND TABLE_SCHEMA = {schema} "
        "ORDER BY 3"  # a table's trigger first
    ),
    "sqlite": (
        "SELECT DISTINCT {schema}, tbl_name, 't' FROM {ident}.sqlite_master WHERE type = 'trigger'"
    ),
}

#: the generated columns (``GENERATED ALWAYS AS (...)``), by backend: (schema, table, column).
#: The database computes them as it writes the row; a model that maps one without declaring it
#: ``Computed(...)`` keeps the value it loaded before the flush (SQLAlchemy expires only the
#: columns it knows the database computes), so its commits must invalidate. PostgreSQL 12+;
#: MySQL's ``DEFAULT_GENERATED`` (an expression default) is no such column.
_GENERATED_QUERIES = {
    "postgresql": (
        "SELECT n.nspname, c.relname, a.attname FROM pg_catalog.pg_attribute a "
        "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.attgenerated <> '' AND a.attnum > 0 AND NOT a.attisdropped "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    ),
    "mysql": (
        "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE (EXTRA LIKE '%STORED GENERATED%' OR EXTRA LIKE '%VIRTUAL GENERATED%') "
        "AND TABLE_SCHEMA = {schema}"
    ),
    # hidden: 2 a virtual generated column, 3 a stored one (SQLite 3.31+)
    "sqlite": (
        "SELECT {schema}, m.name, p.name FROM {ident}.sqlite_master m "
        "JOIN pragma_table_xinfo(m.name, {schema}) p "
        "WHERE m.type = 'table' AND p.hidden IN (2, 3)"
    ),
}

#: MySQL's string columns in a character set that cannot hold every character (``latin1``,
#: ``utf8mb3``...: not utf8mb4, utf16 or utf32), when the pool's sessions run a ``sql_mode``
#: that is not strict: (schema, table, column, character set). There a character the set
#: cannot hold is stored as ``?`` instead of being refused, so a commit of such a column must
#: invalidate unless the model declares that character set (the column's ``charset`` or
#: ``collation``, the table's ``mysql_charset``), which lets the codec check each value. The
#: character set of a column the model does not declare one for is the table's, else the
#: database's, as it was when the table was created: only the catalog knows it.
_NARROW_CHARSET_QUERY = (
    "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME "
    "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {schema} "
    "AND CHARACTER_SET_NAME IS NOT NULL "
    f"AND CHARACTER_SET_NAME NOT IN ({', '.join(repr(c) for c in MYSQL_WHOLE_UNICODE)}) "
    "AND @@SESSION.sql_mode NOT LIKE '%STRICT_TRANS_TABLES%' "
    "AND @@SESSION.sql_mode NOT LIKE '%STRICT_ALL_TABLES%'"
)

#: the code of every trigger (and PostgreSQL rule) that runs on a write, by backend: (schema,
#: table it is on, code). A trigger that writes another table changes rows the cache may
#: hold, and nothing tells the ORM: the tables its code names are matched against the cached
#: models' (see :func:`_words` and :meth:`Databases.written_by`), so the cache can say which
#: models such triggers write and ask for ``also_invalidates``. MySQL gives the code only to
#: users with the TRIGGER privilege (MariaDB gives NULL to the others).
_TRIGGER_CODE_QUERIES = {
    "postgresql": (
        # a partition's trigger under its partitioned table's name: the table a model maps
        "SELECT n.nspname, c.relname, p.prosrc FROM pg_catalog.pg_trigger t "
        "JOIN pg_catalog.pg_class c "
        "ON c.oid = COALESCE(pg_catalog.pg_partition_root(t.tgrelid), t.tgrelid) "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
        "WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        # a rule on UPDATE (2), INSERT (3) or DELETE (4), as SQL
        "UNION SELECT n.nspname, c.relname, pg_catalog.pg_get_ruledef(r.oid) "
        "FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c "
        "ON c.oid = COALESCE(pg_catalog.pg_partition_root(r.ev_class), r.ev_class) "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE r.ev_type IN ('2', '3', '4') AND r.ev_enabled <> 'D' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    ),
    "mysql": (
        "SELECT EVENT_OBJECT_SCHEMA, EVENT_OBJECT_TABLE, ACTION_STATEMENT "
        "FROM information_schema.TRIGGERS WHERE ACTION_STATEMENT IS NOT NULL "
        "AND EVENT_OBJECT_SCHEMA NOT IN "
        "('information_schema', 'mysql', 'performance_schema', 'sys')"
    ),
    "sqlite": (
        "SELECT {schema}, tbl_name, sql FROM {ident}.sqlite_master "
        "WHERE type = 'trigger' AND sql IS NOT NULL"
    ),
}

#: the code of the functions (procedures) a trigger's code may call, by backend: (schema,
#: name, code). A trigger function that calls a helper to write a table writes it as surely
#: as one that says so itself: the helper's code counts as the trigger's (see
#: :func:`_trigger_code`). PostgreSQL's functions in SQL and PL/pgSQL (a C function's
#: ``prosrc`` is a symbol); MySQL's stored routines (their code only for their definer and
#: users with the right privileges). SQLite has none.
_FUNCTION_CODE_QUERIES = {
    "postgresql": (
        "SELECT n.nspname, p.proname, p.prosrc FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
        "WHERE l.lanname IN ('sql', 'plpgsql') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    ),
    "mysql": (
        "SELECT ROUTINE_SCHEMA, ROUTINE_NAME, ROUTINE_DEFINITION FROM information_schema.ROUTINES "
        "WHERE ROUTINE_DEFINITION IS NOT NULL "
        "AND ROUTINE_SCHEMA NOT IN ('information_schema', 'mysql', 'performance_schema', 'sys')"
    ),
}

#: kind -> how such a table is described (``{}``: its schema-qualified name)
_REWRITING_KINDS = {
    "t": "a trigger of {} may change the rows a flush writes",
    "u": "{} has a column ON UPDATE CURRENT_TIMESTAMP",
    "r": "a rule of {} may change the rows a flush writes",
    "p": (
        "a trigger or rule of a partition or child table of {} may change the rows a flush writes"
    ),
    "w": "a trigger or rule of {} writes its own table (its commits invalidate the model whole)",
}

#: the schema an unqualified name reaches on a PostgreSQL connection left to the server's
#: defaults (``"$user", public`` with no schema named after the user)
_PLAIN_DEFAULT_SCHEMA = "public"

#: a naming option of this module's own: the name for models whose tables all name their
#: schema, which the schema a connection chooses does not move
_QUALIFIED = "_writethrough_qualified"

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
_BACKENDS = {"mariadb": "mysql"}  # one server, reached by either dialect name


#: the execution options that name a database (see the module's docstring)
NAMING = (OPTION, "schema_translate_map")


def _translate(value: Any) -> dict[Any, Any] | None:
    """A ``schema_translate_map`` as it names a database: a copy, without the ``"_none"``
    alias of the ``None`` key that SQLAlchemy adds to a connection's map (in place, at its
    first statement)."""
    if not value:
        return None
    return {k: v for k, v in value.items() if k != "_none"}


def naming_of(engine: Any, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The naming options of ``options`` (a statement's or a connection's) where they name
    another database than ``engine``'s own options do, else None (the common case: a
    dictionary lookup or two)."""
    engine_options = engine.get_execution_options()
    if options is engine_options:
        return None
    explicit = options.get(OPTION, engine_options.get(OPTION))
    if "schema_translate_map" in options:
        translate = _translate(options["schema_translate_map"])
    else:
        translate = _translate(engine_options.get("schema_translate_map"))
    if explicit == engine_options.get(OPTION) and translate == _translate(
        engine_options.get("schema_translate_map")
    ):
        return None
    return {OPTION: explicit, "schema_translate_map": translate}


def own_naming(engine: Any) -> dict[str, Any]:
    """An engine's own naming options, said explicitly (where None would mean "whatever the
    session's connection names")."""
    options = engine.get_execution_options()
    return {
        OPTION: options.get(OPTION),
        "schema_translate_map": _translate(options.get("schema_translate_map")),
    }


def for_schemas(naming: Mapping[str, Any], schemas: frozenset[str | None]) -> Mapping[str, Any]:
    """``naming`` as it names the rows of tables in ``schemas``: its ``schema_translate_map``
    cut to the entries that move one of them elsewhere. SQLAlchemy renders a table the map
    leaves alone (a schema it does not list, or maps to itself) in its own schema, so the rows
    it reads are the same with or without the map and must have the same entries: a tenant's
    commit to a table every tenant shares is then seen by every tenant. Tables that all name
    their schema are not moved by the schema a connection chooses (``search_path``, ``USE``)
    either."""
    translate = _translate(naming.get("schema_translate_map"))
    qualified = None not in schemas
    if translate:
        moved = {s: translate[s] for s in schemas if s in translate and translate[s] != s}
        if len(moved) != len(translate) or qualified:
            cut = {OPTION: naming.get(OPTION), "schema_translate_map": moved or None}
            return {**cut, _QUALIFIED: True} if qualified else cut
    elif qualified:
        return {**naming, _QUALIFIED: True}
    return naming


def connection_naming(connection: Connection) -> dict[str, Any] | None:
    """A connection's own naming options, where they differ from its engine's."""
    return naming_of(connection.engine, connection.get_execution_options())


def _moving(
    translate: Mapping[Any, Any], current: str | None, default: str | None
) -> dict[Any, Any]:
    """The entries of a map that send a schema elsewhere than a connection on the server's
    plain default reaches it: SQLAlchemy renders a table sent to its own schema (or, by name,
    to the schema an unqualified name reaches, or from it to None) where it is without the
    map, so those entries name no other rows. ``current``: the schema an unqualified name
    reaches on the engine's connections; ``default``: the one it reaches on the server's plain
    default (the name every process agrees on); None when unknown."""
    return {
        k: v
        for k, v in translate.items()
        if (k if k is not None else default) != (v if v is not None else current)
    }


def _schemas(translate: Mapping[Any, Any] | None) -> str:
    translate = _translate(translate)
    if not translate:
        return ""
    pairs = sorted((str(k or ""), str(v or "")) for k, v in translate.items())
    return "|schemas:" + ",".join(f"{k}={v}" for k, v in pairs)


def describe(url: URL, options: Mapping[str, Any], memory_id: str = "") -> str:
    """The readable identity of the database a URL (and its execution options) reaches;
    ``memory_id`` stands for an in-memory SQLite database."""
    explicit = options.get(OPTION)
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit:
            raise ValueError(f"execution option {OPTION} must be a non-empty string")
        name = f"named:{explicit}"
    else:
        backend = url.get_backend_name()
        backend = _BACKENDS.get(backend, backend)
        database = url.database or ""
        if backend == "sqlite":
            name = f"sqlite:{_sqlite_path(url) or 'memory:' + memory_id}"
        else:
            if not database and backend == "postgresql":
                database = url.username or ""  # libpq's default database
            host = (url.host or "").lower()
            port = url.port or _DEFAULT_PORTS.get(backend) or ""
            name = f"{backend}://{host}:{port}/{database}"
    return name + _schemas(options.get("schema_translate_map"))


def _sqlite_path(url: URL) -> str | None:
    """The absolute path of a SQLite file, or None for an in-memory database."""
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (``?uri=true``)
        path, _, query = database[5:].partition("?")
        if "mode=memory" in query or not path or path == ":memory:":
            return None
        return os.path.realpath(path)
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    return os.path.realpath(database)


def digest(identity: str) -> str:
    """The part of a key naming a database: 64 bits of a hash (readable names would need
    escaping and make every key longer)."""
    return hashlib.sha1(identity.encode()).hexdigest()[:16]


#: the catalog questions MySQL (and MariaDB) is asked per schema, as a pool's sessions first
#: reach one (its own schema with the pool's first question), rather than of the whole server:
#: ``information_schema.TABLES`` and ``COLUMNS`` list every database of the server, and one
#: holding a database per tenant, each reached by an engine of its own, had every engine's
#: first cached load read them all, and keep all they said, per pool. Triggers and routines,
#: few, are read whole: a trigger of any table may write a cached one.
_PER_SCHEMA = ("unserved", "rewriting", "generated", "narrow")


class _SchemaCatalog:
    """What a MySQL server said of the schemas a pool's sessions reached (the fields of
    :data:`_PER_SCHEMA`, as :class:`_Server` has them), growing as they reach more."""

    def __init__(self) -> None:
        #: the schemas asked (a schema whose questions failed too: warned of once)
        self.asked: set[str] = set()
        self.unserved: dict[tuple[str, str], str] = {}
        self.rewriting: dict[tuple[str, str], str] = {}
        self.generated: dict[tuple[str, str], frozenset[str]] = {}
        self.narrow: dict[tuple[str, str], dict[str, str]] = {}

    def add(self, schema: str, fields: Mapping[str, Any]) -> None:
        for which in _PER_SCHEMA:
            getattr(self, which).update(fields[which])
        self.asked.add(schema)


class _Server(NamedTuple):
    """What a server says of one pool's connections."""

    #: the database, by the server's name for itself (or by the URL when it cannot say)
    name: str
    #: the schema an unqualified table name reaches on the pool's connections
    schema: str | None
    #: the schema it reaches on the server's plain default
    default: str | None
    #: {(schema, name): kind} of the relations whose rows are not served (see
    #: :data:`_UNSERVED_QUERIES`)
    unserved: Mapping[tuple[str, str], str] = {}
    #: {(schema, name): kind} of the tables the database may rewrite rows of as they are
    #: written (see :data:`_REWRITING_QUERIES`)
    rewriting: Mapping[tuple[str, str], str] = {}
    #: the tzinfo the driver gives ``timestamptz`` values on a new connection of the pool
    #: (PostgreSQL; None when the driver cannot say)
    timezone: Any = None
    #: {(schema, table): its generated columns} (see :data:`_GENERATED_QUERIES`)
    generated: Mapping[tuple[str, str], frozenset[str]] = {}
    #: {(schema, table): {column: character set}} of MySQL's string columns a lenient
    #: ``sql_mode`` may store ``?`` in (see :data:`_NARROW_CHARSET_QUERY`)
    narrow: Mapping[tuple[str, str], Mapping[str, str]] = {}
    #: {(schema, table): the names its triggers' code uses} (see :data:`_TRIGGER_CODE_QUERIES`)
    trigger_words: Mapping[tuple[str, str], frozenset[str]] = {}
    #: {(schema, table): the tables its triggers' statements write, as they name them}
    #: (see :func:`_written`); the table itself among them: see :meth:`Databases.self_written`
    trigger_writes: Mapping[tuple[str, str], frozenset[str]] = {}
    #: {(schema, table): the columns by which each of its triggers' updates of the row
    #: written picks it (one set per update)} (see :data:`_ROW_UPDATE`): not in
    #: ``trigger_writes``
    trigger_row_keys: Mapping[tuple[str, str], frozenset[frozenset[str]]] = {}
    #: MySQL's: the fields of :data:`_PER_SCHEMA`, asked per schema (those above are empty)
    per_schema: _SchemaCatalog | None = None


def _catalog(fairy: Any, sql: str, by_url: str, what: str) -> list[tuple[str, ...]]:
    """The rows of one of the catalog queries above, on a pooled connection; none, with a
    warning saying ``what`` would follow, when the server cannot say (a PostgreSQL
    look-alike, a privilege)."""
    try:
        cursor = fairy.cursor()
        cursor.execute(sql)
        found = [tuple(str(v) for v in row) for row in cursor.fetchall()]
        cursor.close()
        return found
    except Exception as exc:
        log.warning(
            "writethrough: the database at %s could not say %s (%s: %s)",
            by_url,
            what,
            type(exc).__name__,
            exc,
        )
        return []
    finally:
        fairy.rollback()


def _kinds(rows: list[tuple[str, ...]]) -> dict[tuple[str, str], str]:
    """{(schema, name): kind} of a catalog query's (schema, name, kind) rows, the first
    kind of a relation listed twice."""
    found: dict[tuple[str, str], str] = {}
    for schema, name, kind in rows:
        found.setdefault((schema, name), kind)
    return found


def _query(queries: Mapping[str, str], backend: str, schema: str) -> str:
    """``backend``'s query of ``queries``; SQLite's about its database named ``schema``, and
    MySQL's of :data:`_PER_SCHEMA` about its schema ``schema``."""
    if backend == "postgresql":
        return queries[backend]
    # MySQL reads a backslash in a literal as an escape unless NO_BACKSLASH_ESCAPES: a name
    # with one (or a character SQL may not hold) is given as hex
    literal = "'" + schema.replace("'", "''") + "'"
    if backend == "mysql" and (not schema.isprintable() or "\\" in schema):
        literal = f"CONVERT(X'{schema.encode().hex()}' USING utf8mb4)"
    ident = '"' + schema.replace('"', '""') + '"'
    return queries[backend].format(schema=literal, ident=ident)


def _unserved(
    fairy: Any, backend: str, by_url: str, schema: str = "main"
) -> dict[tuple[str, str], str]:
    """:data:`_UNSERVED_QUERIES` of ``backend``, asked (of SQLite's database ``schema``)."""
    what = (
        "which of its tables are views or have row-level security; rows of such a relation "
        "would be served from the cache after it changed, or to sessions its policies hide "
        "them from"
        if backend == "postgresql"
        else "which of its tables are views; rows of a view would be served from the cache "
        "after the tables it reads changed"
    )
    return _kinds(_catalog(fairy, _query(_UNSERVED_QUERIES, backend, schema), by_url, what))


def _rewriting(
    fairy: Any, backend: str, by_url: str, schema: str = "main"
) -> dict[tuple[str, str], str]:
    """:data:`_REWRITING_QUERIES` of ``backend``, asked (of SQLite's database ``schema``)."""
    what = (
        "which of its tables have triggers that may rewrite a row as it is written; their "
        "commits would write the values the flush sent, not those stored (declare such a "
        'model strategy="invalidate")'
    )
    return _kinds(_catalog(fairy, _query(_REWRITING_QUERIES, backend, schema), by_url, what))


def _generated(
    fairy: Any, backend: str, by_url: str, schema: str = "main"
) -> dict[tuple[str, str], frozenset[str]]:
    """:data:`_GENERATED_QUERIES` of ``backend``, asked (of SQLite's database ``schema``):
    each table's generated columns."""
    what = (
        "which of its columns are generated; a model mapping one without declaring it "
        "Computed(...) would have its commits write the value the row had before"
    )
    columns: dict[tuple[str, str], set[str]] = {}
    sql = _query(_GENERATED_QUERIES, backend, schema)
    for name, table, column in _catalog(fairy, sql, by_url, what):
        columns.setdefault((name, table), set()).add(column)
    return {table: frozenset(names) for table, names in columns.items()}


#: a comment of SQL (``--`` to the end of the line, ``/* ... */``)
_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
#: a name, or two joined by a dot (``schema.table``, ``NEW.column``), quotes taken off first
_NAME = re.compile(r"[a-z_][a-z0-9_$]*(?:\s*\.\s*[a-z_][a-z0-9_$]*)?")


def _words(code: str, schema: str | None = None) -> frozenset[str]:
    """The names ``code`` (a trigger's or a rule's) uses, lower-cased: each name, and of a
    dotted one both ``schema.table`` and ``table``, except a column of the row being written
    (``NEW.x``, ``OLD.x``). A string literal's words count too (dynamic SQL). With
    ``schema`` (MySQL's: the database the code belongs to, see :func:`_in_schema`), every
    name is schema-qualified, a bare one with ``schema``."""
    found: set[str] = set()
    for match in _NAME.finditer(_reduced(code)):
        first, dot, second = match.group(0).partition(".")
        first, second = first.strip(), second.strip()
        if not dot:
            found.add(first if schema is None else f"{schema}.{first}")
        elif first not in ("new", "old"):
            found.add(f"{first}.{second}")
            if schema is None:
                found.add(second)
    return frozenset(found)


def _in_schema(names: Iterable[str], schema: str | None) -> frozenset[str]:
    """``names`` (lower-cased, bare or ``schema.table``), the bare ones qualified with
    ``schema``. MySQL's catalog lists the triggers and routines of every database of the
    server, and an unqualified name in their code is a table of their own database: read as
    any database's, two databases holding the same tables (one per tenant, two test runs)
    had each one's triggers count for the other's tables."""
    if schema is None:
        return frozenset(names)
    return frozenset(name if "." in name else f"{schema}.{name}" for name in names)


#: the table a statement of a trigger's code writes, first of a list: ``UPDATE [OR x]
#: [LOW_PRIORITY] [IGNORE] [ONLY] t``, ``INSERT`` and ``REPLACE`` ``[OR x] [LOW_PRIORITY |
#: DELAYED | HIGH_PRIORITY] [IGNORE] [INTO] t`` (MySQL's INTO is optional), ``DELETE
#: [LOW_PRIORITY] [QUICK] [IGNORE] [FROM] [ONLY] t`` (MySQL's ``DELETE t FROM ...`` names its
#: target first), ``MERGE INTO [ONLY] t``, ``TRUNCATE [TABLE] [ONLY] t`` (on text reduced as
#: :func:`_words` reduces it, a trigger's or rule's header taken off: :data:`_HEADER`, spaces
#: made one; ``FOR UPDATE``, ``DO UPDATE`` and ``KEY UPDATE`` assign or lock, they name no table)
_WRITES = re.compile(
    r"\b(?:(?<!for )(?<!do )(?<!key )update"
    r"(?:\s+or\s+[a-z]+)?(?:\s+(?:low_priority|ignore|only)\b)*"
    r"|(?:insert|replace)(?:\s+or\s+[a-z]+)?"
    r"(?:\s+(?:low_priority|delayed|high_priority|ignore)\b)*(?:\s+into\b)?"
    r"|delete(?:\s+(?:low_priority|quick|ignore)\b)*(?:\s+from\b)?(?:\s+only\b)?"
    r"|merge\s+into(?:\s+only)?|truncate(?:\s+table\b)?(?:\s+only\b)?)\s+"
    rf"({_NAME.pattern})"
)
#: a list of tables a statement writes, after its head: MySQL's multi-table ``UPDATE a JOIN b
#: ... SET`` and ``UPDATE a, b SET`` (every table joined counts: which of them the SET
#: assigns is not read), ``DELETE a, b FROM ...``, ``DELETE FROM a, b USING ...``, and
#: ``TRUNCATE a, b`` (a list stops at the end of its statement)
_LISTS = re.compile(
    r"\b(?:(?<!for )(?<!do )(?<!key )update(?:\s+(?:low_priority|ignore)\b)*\s+"
    r"(?P<u>(?:(?!\bset\b)[^;])+?)\s+set\b"
    r"|delete(?:\s+(?:low_priority|quick|ignore)\b)*\s+(?P<d>(?:(?!\bfrom\b)[^;])+?)\s+from\b"
    r"|delete(?:\s+(?:low_priority|quick|ignore)\b)*\s+from\s+"
    r"(?P<f>(?:(?!\b(?:using|where)\b)[^;])+?)\s+using\b"
    r"|truncate(?:\s+table\b)?\s+(?P<t>[^;]+))"
)
#: where a table of such a list is named: first, after a comma or a JOIN (``ONLY`` and an
#: opening parenthesis before it skipped)
_LISTED = re.compile(rf"(?:^|,|join\b)\s*\(*\s*(?:only\s+)?({_NAME.pattern})")
#: the header of a SQLite trigger (``CREATE TRIGGER ... ON t ... BEGIN``) and of a
#: PostgreSQL rule (``CREATE RULE ... ON UPDATE TO t ... DO``), as the catalog gives them:
#: its words are not statements (``AFTER UPDATE OF a, b ON t``)
_HEADER = re.compile(
    r"^\s*create\s+(?:(?:temp|temporary)\s+trigger\b|trigger\b|(?:or\s+replace\s+)?rule\b)"
    r".*?\b(?:begin|do)\b",
    re.DOTALL,
)


def _reduced(code: str) -> str:
    """``code`` lower-cased, its comments and its identifiers' quotes taken off."""
    text = _COMMENT.sub(" ", code).lower()
    for quote in '"`[]':
        text = text.replace(quote, "")
    return text


#: a statement of a trigger's code that updates only the row being written: ``UPDATE t SET
#: ... WHERE c = NEW.c`` (SQLite's way to stamp a row, an ``AFTER`` trigger filling in a
#: materialized path), more conditions joined by ``AND`` allowed: when ``t`` is the trigger's
#: own table and the columns so equated hold its primary key (every column of a composite
#: one) or SQLite's rowid, such a trigger rewrites the rows written, as
#: :data:`_REWRITING_QUERIES` already takes every trigger of those databases to, and no other
#: (see :meth:`Databases.self_written`). Its WHERE is read by :func:`_row_keys`; a SET of
#: one of those columns, or a WHERE that is not such a conjunction, is a write of the table
#: (:data:`_WRITES`)
_ROW_UPDATE = re.compile(
    rf"\bupdate(?:\s+or\s+[a-z]+)?\s+({_NAME.pattern})"
    r"\s+set\s((?:(?!\bwhere\b)[^;])*?)\bwhere\s+([^;]+)"
)
#: one condition of such a WHERE: ``[t.]c = NEW.c`` or ``NEW.c = [t.]c``
_KEY_IS_NEW = re.compile(
    rf"(?:({_NAME.pattern})\s*\.\s*)?([a-z_][a-z0-9_$]*)\s*=\s*new\s*\.\s*([a-z_][a-z0-9_$]*)"
    rf"|new\s*\.\s*([a-z_][a-z0-9_$]*)\s*=\s*(?:({_NAME.pattern})\s*\.\s*)?([a-z_][a-z0-9_$]*)"
)


def _row_keys(table: str, where: str) -> frozenset[str] | None:
    """The columns ``c`` whose value ``where`` (an UPDATE's of ``table``) requires to be the
    written row's: its conditions outside parentheses are joined by ``AND`` alone, and those
    are the ones of the form ``c = NEW.c``, bare or qualified by the table's name (a
    condition in parentheses, a subquery's, never counts). None when there is none, or the
    WHERE is not such a conjunction."""
    if where.count("'") % 2:
        return None  # cut at a semicolon inside a string: the rest of it is unread
    depth, top = 0, []
    for char in where:
        if char == "(":
            depth += 1
            top.append(" ( ")
        elif char == ")":
            if depth == 0:
                return None
            depth -= 1
        elif depth == 0:
            top.append(char)
    if depth:
        return None
    conditions = [c.strip() for c in re.split(r"\band\b", "".join(top))]
    if re.search(r"\bor\b", " ".join(conditions)) or re.search(r"\bbetween\b", where):
        return None  # BETWEEN's AND joins no conditions
    names = {table, table.rsplit(".", 1)[-1]}
    found = set()
    for condition in conditions:
        match = _KEY_IS_NEW.fullmatch(condition)
        if match is None:
            continue
        owner, column, new, new_first, owner_second, column_second = match.groups()
        if column is None:
            column, new, owner = column_second, new_first, owner_second
        if column == new and (owner is None or re.sub(r"\s+", "", owner) in names):
            found.add(column)
    return frozenset(found) or None


#: the names of a SQLite table's rowid (an INTEGER PRIMARY KEY is one too)
_ROWIDS = frozenset({"rowid", "oid", "_rowid_"})


def _statements(code: str) -> str:
    """``code`` reduced (:func:`_reduced`), its spaces made one, a header taken off."""
    return _HEADER.sub(" ", re.sub(r"\s+", " ", _reduced(code)), count=1)


def _row_updates(text: str) -> tuple[str, frozenset[tuple[str, frozenset[str]]]]:
    """``text`` (:func:`_statements`) without its updates of only the row being written
    (:data:`_ROW_UPDATE`), and those: (table as named, lower-cased, the columns that pick
    the row)."""
    found: set[tuple[str, frozenset[str]]] = set()

    def taken(match: re.Match[str]) -> str:
        table, assigned, where = match.groups()
        table = re.sub(r"\s+", "", table)
        columns = _row_keys(table, where)
        if columns is None or any(
            re.search(rf"(?:^|,)\s*(?:\w+\s*\.\s*)?{re.escape(column)}\s*=", assigned)
            for column in columns
        ):
            return match.group(0)  # other rows (WHERE id = NEW.parent_id), or a new key
        found.add((table, columns))
        return " "

    return _ROW_UPDATE.sub(taken, text), frozenset(found)


def _written(code: str) -> frozenset[str]:
    """The tables ``code``'s statements write, lower-cased, as they are named (``table`` or
    ``schema.table``); a string's words count too (dynamic SQL)."""
    return _written_in(_statements(code))


def _written_in(text: str) -> frozenset[str]:
    """:func:`_written` of text :func:`_statements` made."""
    found = {match.group(1) for match in _WRITES.finditer(text)}
    for match in _LISTS.finditer(text):
        listed = next(group for group in match.groups() if group is not None)
        found.update(named.group(1) for named in _LISTED.finditer(listed.strip()))
    return frozenset(re.sub(r"\s+", "", name) for name in found)


def _function_rows(fairy: Any, backend: str, by_url: str) -> tuple[tuple[str, ...], ...]:
    """:data:`_FUNCTION_CODE_QUERIES` of ``backend``, asked: (schema, name, code) of each."""
    if backend not in _FUNCTION_CODE_QUERIES:
        return ()
    what = (
        "what the functions its triggers may call write; a trigger that writes a cached "
        "model's table through one would leave its entries stale (declare also_invalidates)"
    )
    return tuple(_catalog(fairy, _FUNCTION_CODE_QUERIES[backend], by_url, what))


def _function_code(
    rows: Iterable[tuple[str, ...]], qualified: bool = False
) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Each function's (of :func:`_function_rows`) names used and tables written
    (:func:`_words`, :func:`_written`), by lower-cased name, bare and schema-qualified
    (overloads and namesakes in other schemas merged); only schema-qualified, and so are
    the names, when ``qualified`` (MySQL's: see :func:`_in_schema`)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for schema, name, code in rows:
        own = schema.lower() if qualified else None
        words, written = _words(code, own), _in_schema(_written(code), own)
        keys = (
            (f"{schema}.{name}".lower(),)
            if qualified
            else (name.lower(), f"{schema}.{name}".lower())
        )
        for key in keys:
            entry = found.setdefault(key, (set(), set()))
            entry[0].update(words)
            entry[1].update(written)
    return {key: (frozenset(w), frozenset(t)) for key, (w, t) in found.items()}


def _called(
    words: frozenset[str],
    written: frozenset[str],
    functions: Mapping[str, tuple[frozenset[str], frozenset[str]]],
) -> tuple[frozenset[str], frozenset[str]]:
    """``words`` and ``written`` (a trigger's) with those of every function they name, and of
    the functions those name, and so on: a helper's writes are the trigger's."""
    if not functions:
        return words, written
    all_words, all_written = set(words), set(written)
    pending = [w for w in words if w in functions]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        more, wrote = functions[name]
        all_written.update(wrote)
        for word in more - all_words:
            all_words.add(word)
            if word in functions:
                pending.append(word)
    return frozenset(all_words), frozenset(all_written)


def _trigger_code(fairy: Any, backend: str, by_url: str, schema: str = "main") -> dict[str, Any]:
    """:data:`_TRIGGER_CODE_QUERIES` of ``backend``, asked (of SQLite's database ``schema``):
    the names each table's triggers use (``trigger_words``), and the tables their statements
    write (``trigger_writes``), the code of the functions they call included."""
    what = (
        "what its triggers' code writes; a trigger that writes a cached model's table would "
        "leave its entries stale without a word (declare also_invalidates)"
    )
    rows = _catalog(fairy, _query(_TRIGGER_CODE_QUERIES, backend, schema), by_url, what)
    functions = _function_rows(fairy, backend, by_url) if rows else ()
    # sorted: the catalog lists them in no set order, and an answer is kept by its rows
    return _read_trigger_code(
        tuple(sorted(rows)), tuple(sorted(functions)), qualified=backend == "mysql"
    )


#: how many distinct answers of the triggers' code :func:`_read_trigger_code` keeps
_TRIGGER_CODE_KEPT = 16


@functools.lru_cache(maxsize=_TRIGGER_CODE_KEPT)
def _read_trigger_code(
    rows: tuple[tuple[str, ...], ...],
    function_rows: tuple[tuple[str, ...], ...],
    qualified: bool = False,
) -> dict[str, Any]:
    """:func:`_trigger_code` of the catalog's rows. The same rows give the same mappings,
    shared, never changed: MySQL's triggers and routines are read for the whole server, so
    an engine per tenant database (one pool each) would otherwise parse every tenant's
    triggers again and keep its own copy of what they say, per pool. ``qualified``
    (MySQL's): the names a trigger's code uses are of its own database unless it says
    otherwise (:func:`_in_schema`)."""
    functions = _function_code(function_rows, qualified)
    codes: dict[tuple[str, str], set[str]] = {}
    writes: dict[tuple[str, str], set[str]] = {}
    row_keys: dict[tuple[str, str], set[frozenset[str]]] = {}
    for name, table, code in rows:
        own = {table.lower(), f"{name}.{table}".lower()}
        text, updated = _row_updates(_statements(code))
        # an update of only the row written counts as one if it is of this table (a helper
        # function's always writes: see _function_code)
        row_keys.setdefault((name, table), set()).update(c for t, c in updated if t in own)
        written = _written_in(text) | {t for t, _ in updated if t not in own}
        schema = name.lower() if qualified else None
        words, written = _called(_words(code, schema), _in_schema(written, schema), functions)
        codes.setdefault((name, table), set()).update(words)
        if written:
            writes.setdefault((name, table), set()).update(written)
    return {
        "trigger_words": {table: frozenset(words) for table, words in codes.items()},
        "trigger_writes": {table: frozenset(names) for table, names in writes.items()},
        "trigger_row_keys": {table: frozenset(keys) for table, keys in row_keys.items() if keys},
    }


def _catalog_fields(fairy: Any, backend: str, by_url: str, schema: str = "main") -> dict[str, Any]:
    """The :class:`_Server` fields the catalog questions answer (``unserved``, ``rewriting``,
    ``generated``, ``trigger_words``, ``trigger_writes``), asked on ``fairy`` (of SQLite's
    database ``schema``; MySQL's ``per_schema``, of its schema ``schema`` so far)."""
    if backend == "mysql":
        per_schema = _SchemaCatalog()
        per_schema.add(schema, _schema_fields(fairy, backend, by_url, schema))
        return {"per_schema": per_schema, **_trigger_code(fairy, backend, by_url)}
    return {
        **_schema_fields(fairy, backend, by_url, schema),
        **_trigger_code(fairy, backend, by_url, schema),
    }


def _schema_fields(fairy: Any, backend: str, by_url: str, schema: str) -> dict[str, Any]:
    """The fields of :data:`_PER_SCHEMA`, asked on ``fairy`` (of SQLite's database, or
    MySQL's schema, ``schema``)."""
    return {
        "unserved": _unserved(fairy, backend, by_url, schema),
        "rewriting": _rewriting(fairy, backend, by_url, schema),
        "generated": _generated(fairy, backend, by_url, schema),
        "narrow": _narrow(fairy, backend, by_url, schema),
    }


def _mapped_column(table: Any, name: str) -> Any:
    """The column of ``table`` the catalog names ``name``: by name, not by key; case-blind
    too (MySQL's column names ignore case). None when the table does not map it."""
    exact = next((c for c in table.columns if c.name == name), None)
    if exact is not None:
        return exact
    return next((c for c in table.columns if c.name.lower() == name.lower()), None)


def _narrow(
    fairy: Any, backend: str, by_url: str, schema: str
) -> dict[tuple[str, str], dict[str, str]]:
    """:data:`_NARROW_CHARSET_QUERY`, asked of MySQL's schema ``schema``: each table's string
    columns a lenient ``sql_mode`` may store ``?`` in, with their character sets."""
    if backend != "mysql":
        return {}
    what = (
        "the character sets of its columns; a commit of a character one cannot hold, which a "
        "lenient sql_mode stores as '?', would be served as written"
    )
    columns: dict[tuple[str, str], dict[str, str]] = {}
    sql = _query({"mysql": _NARROW_CHARSET_QUERY}, backend, schema)
    for name, table, column, charset in _catalog(fairy, sql, by_url, what):
        columns.setdefault((name, table), {})[column] = charset.lower()
    return columns


def _sqlite_catalog(engine: Any, by_url: str) -> dict[str, Any]:
    """The :class:`_Server` fields a SQLite file's catalog gives (:func:`_catalog_fields`). A
    file is read on a connection of the engine's own (its creator and "connect" listeners
    run), so the databases those ATTACH, and the TEMP views and triggers they make, are read
    too (:func:`_sqlite_databases`). An asyncio driver's (aiosqlite) connections must be
    awaited: so they are where the question comes from SQLAlchemy's greenlet (an
    AsyncSession's loads and flushes); asked from plain sync code (``cache.models()``
    first), its ``main`` database is read alone, on a read-only connection of the standard
    library's own. A file not made yet has none."""
    path = _sqlite_path(engine.url)
    if path is None or not os.path.exists(path):
        return {}
    if not engine.dialect.is_async or _sa_compat.in_greenlet():
        try:
            return _sqlite_databases(engine, by_url)
        except Exception as exc:
            log.warning(
                "writethrough: could not connect to the SQLite file %s to read its catalog "
                "(%s: %s); its main database is read alone",
                by_url,
                type(exc).__name__,
                exc,
            )
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=1.0)
    except Exception as exc:
        log.warning("writethrough: could not read the SQLite file %s (%s)", by_url, exc)
        return {}
    try:
        return _catalog_fields(conn, "sqlite", by_url)
    finally:
        conn.close()


@contextlib.contextmanager
def _own_connection(engine: Any) -> Iterator[Any]:
    """A connection of a pool recreated from the engine's (its creator, ``connect_args``
    and pool listeners, none of its connections), closed and its pool disposed after: the
    catalog is never asked on one of the application's connections."""
    pool = engine.pool.recreate()
    try:
        fairy = pool.connect()
        try:
            yield fairy
        finally:
            fairy.close()
    finally:
        pool.dispose()


def _sqlite_databases(engine: Any, by_url: str) -> dict[str, Any]:
    """:func:`_sqlite_catalog` on a connection of a pool like the engine's: every database
    it has (``PRAGMA database_list``: ``main``, those its "connect" listeners ATTACH, and
    ``temp``), each under its own name. A TEMP view or trigger counts for every database: an
    unqualified name reaches ``temp`` first, and a TEMP trigger may be on a table of any."""
    with _own_connection(engine) as fairy:
        cursor = fairy.cursor()
        cursor.execute("PRAGMA database_list")
        names = [str(row[1]) for row in cursor.fetchall()]
        cursor.close()
        if "temp" not in names:
            names.append("temp")
        found: dict[str, dict[Any, Any]] = {}
        for name in names:
            for field, entries in _catalog_fields(fairy, "sqlite", by_url, name).items():
                found.setdefault(field, {}).update(entries)
    for listed in found.values():
        for (schema, table), entry in list(listed.items()):
            if schema == "temp":
                for name in names:
                    listed.setdefault((name, table), entry)
    return found


def _timezone(engine: Any, fairy: Any) -> Any:
    """:func:`.codec.driver_timezone` of a pooled connection; None when it cannot say."""
    try:
        return driver_timezone(engine.dialect, fairy)
    except Exception:
        return None


class DatabaseUnknown(WritethroughError):
    """The database could not be asked which server it is (it refused a connection): a read
    goes to the database without the cache; a flush fails, as its own connection would."""


class Databases:
    """A bind's database digest, computed once per Engine (weakly held: engines made per
    request, as ``engine.execution_options(...)`` does, are not kept alive); what a server
    says of itself, once per pool (shared by an engine and those it derives)."""

    def __init__(self) -> None:
        #: engine -> (whether the model has a table of no schema -> digest)
        self._engines: weakref.WeakKeyDictionary[Any, dict[bool, str]] = weakref.WeakKeyDictionary()
        #: engine -> (naming options of a connection or statement -> digest)
        self._renamed: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()
        self._memory: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        #: pool -> what its server says (see _Server): per pool, not per URL, because the
        #: engine's connect_args and "connect" listeners choose the schema unqualified names
        #: reach, and two engines on one URL may choose two
        self._servers: weakref.WeakKeyDictionary[Any, _Server] = weakref.WeakKeyDictionary()
        self._asking = threading.Lock()
        forks.renew_in_child(self, "_asking")

    def of(self, bind: Any, unqualified: bool = True) -> str:
        """The digest of the database an Engine (or a Connection's Engine) reads and writes;
        ``unqualified``: for a model with a table of no schema (the only tables the schema an
        engine's connections choose moves)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        per_engine = self._engines.get(engine)
        if per_engine is None:
            per_engine = self._engines[engine] = {}
        found = per_engine.get(unqualified)
        if found is None:
            if unqualified:
                found = digest(self.identity(engine))
            else:  # no table the connection's schema moves: the engine's name without it
                options = engine.get_execution_options()
                found = digest(self.identity(engine, {**options, _QUALIFIED: True}))
            per_engine[unqualified] = found
        return found

    def renamed(self, bind: Any, naming: Mapping[str, Any]) -> str:
        """The digest of the database that ``naming`` (from :func:`naming_of`, cut by
        :func:`for_schemas`) names on the engine of ``bind``: once per engine and naming."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        translate = _translate(naming.get("schema_translate_map"))
        hashable = (
            naming.get(OPTION),
            None if translate is None else tuple(sorted(translate.items(), key=repr)),
            bool(naming.get(_QUALIFIED)),
        )
        per_engine = self._renamed.get(engine)
        if per_engine is None:
            per_engine = self._renamed[engine] = {}
        found = per_engine.get(hashable)
        if found is None:
            found = per_engine[hashable] = digest(self.identity(engine, naming))
        return found

    def identity(self, bind: Any, naming: Mapping[str, Any] | None = None) -> str:
        """The readable identity of a bind's database (what :meth:`of` hashes), or of the
        database ``naming`` names on its engine.

        The schema an unqualified name reaches on the engine's connections is part of it
        only when it is not the server's plain default (PostgreSQL's ``public``, the URL's
        database on MySQL), written as the ``schema_translate_map`` entry ``None: schema``
        that would reach the same tables: an engine on the default keeps the name earlier
        versions gave it, and a tenant chosen by ``search_path`` or ``USE`` is one database
        with the same tenant chosen by the map."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        options = engine.get_execution_options() if naming is None else naming
        memory = self._memory_id(engine)
        backend = _BACKENDS.get(engine.url.get_backend_name(), engine.url.get_backend_name())
        if options.get(OPTION) is not None or backend not in _SERVER_QUERIES:
            return describe(engine.url, options, memory)
        server = self._server(engine, backend)
        translate = _translate(options.get("schema_translate_map")) or {}
        if server.schema is not None and not options.get(_QUALIFIED) and None not in translate:
            translate[None] = server.schema  # where the connection sends unqualified names
        return server.name + _schemas(_moving(translate, server.schema, server.default))

    def _server(self, engine: Any, backend: str) -> _Server:
        """What the server of ``engine``'s pool says of itself: asked once per pool. Threads
        ask one at a time (the others wait for its answer); an AsyncSession's ask holds no
        lock: it awaits the driver in SQLAlchemy's greenlet, giving the event loop to other
        sessions, whose first loads would block the loop's thread on that lock for good (a
        lock held across an ``await`` cannot be waited for in the same thread). Sessions
        whose first loads come at once each ask; the answers are the same."""
        pool = engine.pool
        found = self._servers.get(pool)
        if found is None:
            with self._one_at_a_time():
                found = self._servers.get(pool)
                if found is None:
                    found = self._ask_and_keep(engine, backend, pool)
        return found

    def _one_at_a_time(self) -> contextlib.AbstractContextManager[Any]:
        """The lock threads ask the catalog under; none in SQLAlchemy's greenlet (see
        :meth:`_server`)."""
        return contextlib.nullcontext() if _sa_compat.in_greenlet() else self._asking

    def _ask_and_keep(self, engine: Any, backend: str, pool: Any) -> _Server:
        by_url = describe(engine.url, {}, self._memory_id(engine))
        try:
            asked = self._ask_server(engine, backend, by_url)
        except Exception as exc:
            raise DatabaseUnknown(
                f"could not ask the database at {by_url} which server it is "
                f"({type(exc).__name__}: {exc}); set the engine option {OPTION} "
                "to name it"
            ) from exc
        return self._servers.setdefault(pool, asked)

    def _ask_server(self, engine: Any, backend: str, by_url: str) -> _Server:
        """The server's own name for the database, on a connection of its own; the URL's
        name when the server cannot say. Raises when it could not be asked (nothing
        remembered: asked again next time)."""
        if backend == "sqlite":  # named by its file, asked only for its views and triggers
            return _Server(by_url, "main", "main", **_sqlite_catalog(engine, by_url))
        with _own_connection(engine) as fairy:
            cursor = fairy.cursor()
            cursor.execute(_SERVER_QUERIES[backend])
            row = cursor.fetchone()
            cursor.close()
            fairy.rollback()
            # MySQL's schema: the one the pool's unqualified names reach (see _PER_SCHEMA)
            own = str(row[2] if row and row[2] is not None else engine.url.database or "")
            fields = _catalog_fields(fairy, backend, by_url, own)
            timezone = _timezone(engine, fairy) if backend == "postgresql" else None
        database, server, schema = (row[0], row[1], row[2]) if row else (None, None, None)
        url_database = engine.url.database or ""
        if backend == "mysql":
            # a schema is a database: a connection that USEs another than the URL's is named
            # by the URL's database and the schema its unqualified names reach
            default: str | None = url_database or schema
            if url_database:
                database = url_database
        else:
            default = _PLAIN_DEFAULT_SCHEMA
        if not server:
            log.warning(
                "writethrough: the database at %s does not say which server it is (%s); it is "
                "named by its URL, so every process must reach it by the same host, port and "
                "database name, or name it with the engine option %s",
                by_url,
                "pg_control_system() may not be executed"
                if backend == "postgresql"
                else "no identity",
                OPTION,
            )
            name = by_url
        else:
            name = f"{backend}:server={server}/{database or url_database}"
        # the schema an unqualified table name reaches (None when the server cannot say:
        # then taken to be the default)
        return _Server(
            name,
            schema if schema is not None else default,
            default,
            timezone=timezone,
            **fields,
        )

    def timezone(self, bind: Any) -> Any:
        """The tzinfo ``bind``'s driver gives ``timestamptz`` values on a new connection of
        its pool (its ``connect_args`` and "connect" listeners applied), asked once per pool;
        None when the driver cannot say."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        return self._server(engine, "postgresql").timezone

    def unserved(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> list[str]:
        """Why loads of rows of ``tables`` in the database of ``bind`` (as ``naming``, a
        connection's or statement's naming options, sends them) cannot be served: one
        description per table that is a view (``info={"is_view": True}`` says so too, as
        SQLAlchemy-Utils' ``create_view`` marks it), a materialized view or a foreign table,
        or has row-level security (see :data:`_UNSERVED_QUERIES`), asked once per pool. An
        in-memory SQLite database is not asked (a connection of its own would be another
        database)."""
        tables = list(tables)
        found = [_UNSERVED_KINDS["v"].format(t.fullname) for t in tables if t.info.get("is_view")]
        asked = [t for t in tables if not t.info.get("is_view")]
        found += (
            _UNSERVED_KINDS[k].format(n) for n, k in self._listed(bind, naming, asked, "unserved")
        )
        return sorted(found)

    def rewritten(
        self,
        bind: Any,
        naming: Mapping[str, Any] | None,
        tables: Iterable[Any],
        rows: bool = True,
    ) -> list[str]:
        """Why commits of rows of ``tables`` in the database of ``bind`` must invalidate
        rather than write through: one description per table the database may rewrite rows
        of as they are written (see :data:`_REWRITING_QUERIES`), or whose triggers write it
        (:meth:`self_written`: only those, without ``rows``), asked once per pool."""
        tables = list(tables)
        reasons = [
            _REWRITING_KINDS["w"].format(name) for name in self._self_writing(bind, naming, tables)
        ]
        if not rows:
            return reasons
        found = self._listed(bind, naming, tables, "rewriting")
        reasons += [_REWRITING_KINDS[kind].format(name) for name, kind in found]
        for table, name, columns in self._found(bind, naming, tables, "generated"):
            for column in sorted(columns):
                mapped = _mapped_column(table, column)
                if mapped is not None and mapped.computed is None:
                    reasons.append(
                        f"{name}.{column} is a generated column the model does not declare "
                        "Computed(...)"
                    )
        for table, name, charsets in self._found(bind, naming, tables, "narrow"):
            for column, charset in sorted(charsets.items()):
                mapped = _mapped_column(table, column)
                if mapped is None:
                    continue
                # the same set only: a narrower one holds no character the column cannot,
                # but a TEXT's bytes are counted in the declared set (ascii on ucs2: half)
                if declared_mysql_charset(mapped, bind.dialect) != charset:
                    reasons.append(
                        f"{name}.{column} is stored in {charset} and the session's sql_mode is "
                        f"not strict: a character {charset} cannot hold is stored as '?' "
                        f"(declare it, charset={charset!r} on the column's type or "
                        "mysql_charset on the table, and only such values invalidate; or make "
                        "sql_mode strict)"
                    )
        return sorted(reasons)

    def self_written(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> bool:
        """Whether a trigger (or PostgreSQL rule) of one of ``tables`` in the database of
        ``bind`` writes its own table (see :data:`_WRITES`): it may change rows the flush did
        not write (the other addresses of a user, when one becomes the primary), so every
        write of those tables must invalidate them whole. Asked once per pool."""
        return bool(self._self_writing(bind, naming, tables))

    def _self_writing(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> list[str]:
        """The schema-qualified names of those of ``tables`` whose triggers' statements
        write them (:meth:`self_written`)."""
        tables = list(tables)
        found = [
            name
            for table, name, writes in self._found(bind, naming, tables, "trigger_writes")
            if not writes.isdisjoint((table.name.lower(), name.lower()))
        ]
        engine = bind.engine if isinstance(bind, Connection) else bind
        rowids = _ROWIDS if engine.url.get_backend_name() == "sqlite" else frozenset()
        for table, name, updates in self._found(bind, naming, tables, "trigger_row_keys"):
            primary = frozenset(c.name.lower() for c in table.primary_key.columns)
            if name not in found and not all(
                (primary and primary <= columns) or not rowids.isdisjoint(columns)
                for columns in updates
            ):
                found.append(name)  # not by its whole key: maybe other rows
        return found

    def trigger_writes(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> frozenset[str]:
        """The tables the statements of the triggers (and PostgreSQL rules) of ``tables``
        write, in the database of ``bind``, lower-cased as the code names them (``table`` or
        ``schema.table``; see :func:`_written`). Asked once per pool."""
        found = self._found(bind, naming, tables, "trigger_writes")
        if not found:
            return frozenset()
        return frozenset().union(*(names for _, _, names in found))

    def trigger_writers(
        self, bind: Any, naming: Mapping[str, Any] | None
    ) -> tuple[Mapping[tuple[str, str], frozenset[str]], str | None]:
        """Every table of the database of ``bind`` whose triggers' statements write tables:
        ``{(schema, table): the tables they write}`` (raw SQL names such a table, cached or
        not); and, on MySQL, the schema (database) a table raw SQL names without one is in
        (that listing is of the whole server), else None (any schema's table may be it)."""
        asked = self._asked(bind, naming)
        if asked is None:
            return {}, None
        server = asked[0]
        scope = (server.schema or server.default) if server.per_schema is not None else None
        return server.trigger_writes, scope

    def _listed(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any], which: str
    ) -> list[tuple[str, str]]:
        """(schema-qualified name, kind) of those of ``tables`` in the server's list
        ``which`` (``unserved`` or ``rewriting``), each table named as ``naming`` sends it."""
        return [(name, kind) for _, name, kind in self._found(bind, naming, tables, which)]

    def _found(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any], which: str
    ) -> list[tuple[Any, str, Any]]:
        """(table, schema-qualified name, entry) of those of ``tables`` in the server's list
        ``which`` (``unserved``, ``rewriting``, ``generated`` or ``trigger_writes``), each
        table named as ``naming`` sends it."""
        asked = self._asked(bind, naming)
        if asked is None:
            return []
        server, schema_of = asked
        listed: Mapping[tuple[str, str], Any] = getattr(server, which)
        if server.per_schema is not None and which in _PER_SCHEMA:
            tables = list(tables)
            self._ask_schemas(bind, server.per_schema, {schema_of(t) for t in tables})
            listed = getattr(server.per_schema, which)
        if not listed:
            return []
        found = []
        for table in tables:
            schema = schema_of(table)
            entry = listed.get((schema, table.name))
            if entry is not None:
                found.append((table, f"{schema}.{table.name}", entry))
        return found

    def written_by(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> list[str]:
        """The tables (schema-qualified) of the database of ``bind`` whose triggers' code (or
        a PostgreSQL rule's) names one of ``tables``, as ``naming`` sends them, but not in a
        statement the cache reads as a write of it (:meth:`writers_of`: those are acted on):
        such a trigger may write their rows through dynamic SQL built from pieces,
        which the cache does not see (see :data:`_TRIGGER_CODE_QUERIES`). Their own triggers
        are left out (see :meth:`rewritten` and :meth:`self_written`). Asked once per pool;
        a name is matched as a word, so a column or a string of the same name counts too."""
        return self._named_by(bind, naming, tables, written=False)

    def writers_of(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any]
    ) -> list[str]:
        """The tables (schema-qualified) of the database of ``bind`` whose triggers' (or a
        PostgreSQL rule's) statements write one of ``tables`` (see :func:`_written`), but
        for ``tables`` themselves: every write of them invalidates the models of ``tables``
        whole (:meth:`.Models.trigger_written`). Asked once per pool."""
        return self._named_by(bind, naming, tables, written=True)

    def _named_by(
        self, bind: Any, naming: Mapping[str, Any] | None, tables: Iterable[Any], written: bool
    ) -> list[str]:
        """:meth:`writers_of` (``written``), or :meth:`written_by`."""
        asked = self._asked(bind, naming)
        if asked is None:
            return []
        server, schema_of = asked
        if not server.trigger_words:
            return []
        own: set[tuple[str, str]] = set()
        names: set[str] = set()
        for table in tables:
            schema = schema_of(table)
            own.add((schema, table.name))
            names.update((table.name.lower(), f"{schema}.{table.name}".lower()))
        writes = server.trigger_writes
        return sorted(
            f"{schema}.{table}"
            for (schema, table), words in server.trigger_words.items()
            if (schema, table) not in own
            and not names.isdisjoint(words)
            and written != names.isdisjoint(writes.get((schema, table), ()))
        )

    def _ask_schemas(self, bind: Any, catalog: _SchemaCatalog, schemas: set[str]) -> None:
        """Ask MySQL's catalog about those of ``schemas`` it was not asked about for this
        pool (see :data:`_PER_SCHEMA`), on a connection of its own, as :meth:`_server` asks:
        threads one at a time, an AsyncSession's without the lock. Raises
        :class:`DatabaseUnknown` when it cannot connect (nothing remembered: asked again
        next time)."""
        if schemas <= catalog.asked:
            return
        engine = bind.engine if isinstance(bind, Connection) else bind
        with self._one_at_a_time():
            missing = sorted(schemas - catalog.asked)
            if missing:
                self._ask_schemas_now(engine, catalog, missing)

    def _ask_schemas_now(self, engine: Any, catalog: _SchemaCatalog, missing: list[str]) -> None:
        by_url = describe(engine.url, {}, "")
        try:
            with _own_connection(engine) as fairy:
                for schema in missing:
                    catalog.add(schema, _schema_fields(fairy, "mysql", by_url, schema))
        except Exception as exc:
            raise DatabaseUnknown(
                f"could not ask the database at {by_url} about its schema "
                f"{', '.join(missing)} ({type(exc).__name__}: {exc})"
            ) from exc

    def _asked(
        self, bind: Any, naming: Mapping[str, Any] | None
    ) -> tuple[_Server, Callable[[Any], str]] | None:
        """What the server of ``bind`` said of its pool, and the schema each table is in as
        ``naming`` sends it; None for a database that is not asked (an in-memory SQLite one,
        a backend with no catalog questions)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        backend = _BACKENDS.get(engine.url.get_backend_name(), engine.url.get_backend_name())
        if backend not in _UNSERVED_QUERIES or self._memory_id(engine):
            return None
        server = self._server(engine, backend)
        options = engine.get_execution_options() if naming is None else naming
        translate = _translate(options.get("schema_translate_map")) or {}

        def schema_of(table: Any) -> str:
            schema = translate.get(table.schema, table.schema)
            return str(schema if schema is not None else server.schema or server.default)

        return server, schema_of

    def _memory_id(self, engine: Any) -> str:
        """A name unique to an in-memory SQLite database: its pool (shared by an engine and
        the engines ``execution_options()`` derives from it) lives as long as it does."""
        if engine.url.get_backend_name() != "sqlite" or _sqlite_path(engine.url) is not None:
            return ""
        pool = engine.pool
        found = self._memory.get(pool)
        if found is None:
            found = self._memory[pool] = uuid.uuid4().hex
        return found
