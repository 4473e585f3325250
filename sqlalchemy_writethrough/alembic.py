"""Alembic integration: a migration invalidates the cached tables it touches.

Schema changes need nothing: the schema digest in every key moves a changed model to a new
keyspace, so entries written under one schema are never decoded under another. Data changes
(``op.execute("UPDATE ...")``, ``op.bulk_insert``, a column backfill) do need invalidating, in
every keyspace the table has, including those of application versions still running during a
rolling deploy. In ``env.py``::

    from sqlalchemy_writethrough import WriteThroughCache
    from sqlalchemy_writethrough.alembic import invalidate_migrated_tables

    cache = WriteThroughCache(os.environ["REDIS_URL"], prefix="shop")

    def run_migrations_online() -> None:
        with connectable.connect() as connection:
            with invalidate_migrated_tables(cache, connection):
                context.configure(connection=connection, target_metadata=target_metadata)
                with context.begin_transaction():
                    context.run_migrations()

Every statement the migration runs is matched against the tables that hold entries (any
process's models, from the cache's keyspace registry). A table's entries are invalidated in
every database that holds some, not only in the migrated one: the migration may reach its
database by another URL than the application does (another host name, a direct connection
instead of a pooler), and a miss costs one load. Before the first statement that names a
table, every bucket of each of its keyspaces gets a generation lock, so nothing is served or
filled from the old rows while the migration runs; when the block exits (after the migration's
transaction ended) the generations are replaced. If the migration process dies, the locks
expire after ``lock_timeout`` and the buckets get new generations all the same.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import event

from .cache import WriteThroughCache
from .dml import table_name_pattern
from .keys import generation_keys_of

log = logging.getLogger("sqlalchemy_writethrough")

_READ_ONLY = re.compile(r"^\s*(?:select|show|explain|pragma|set|begin|commit|rollback)\b", re.I)


@contextlib.contextmanager
def invalidate_migrated_tables(
    cache: WriteThroughCache, connection: Any, *, lock_timeout: float = 3600.0
) -> Iterator[None]:
    """Lock what the migration run inside this block touches; invalidate it at the end.

    :param lock_timeout: seconds the generation locks survive a migration process that dies;
        readers of the touched tables go to the database meanwhile.
    """
    runtime = cache._runtime
    # the backend is looked up at each use: a plain client at a Redis Cluster node goes on
    # as the cluster at its first refusal (this read, as a rule)
    fields = cache._whole_registry(runtime)
    keyspaces: dict[str, list[str]] = {}
    for field in fields or ():
        _file_under(keyspaces, *generation_keys_of(cache.prefix, field))
    for layout in runtime.models.cached_layouts():  # this process's models, even unused
        gen_keys = runtime.models.keys(layout, connection).generation_keys()
        _file_under(keyspaces, layout.table.fullname, gen_keys)
    pattern = table_name_pattern(keyspaces)
    owner = secrets.token_hex(8)
    locked: dict[str, None] = {}
    #: the migration's statements that may write (distinct, up to _KEPT_STATEMENTS; None
    #: beyond): matched at the end against the tables the registry lists then
    statements: set[str] | None = set()
    ttl_ms = int(lock_timeout * 1000)

    def before_cursor_execute(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        nonlocal statements
        if _READ_ONLY.match(statement):
            return
        if statements is not None:
            statements.add(statement)
            if len(statements) > _KEPT_STATEMENTS:
                statements = None
        if pattern is None:
            return
        new: list[str] = []
        for match in pattern.finditer(statement):
            for gen_key in keyspaces.get(match.group(0).lower(), ()):
                if gen_key not in locked:
                    locked[gen_key] = None
                    new.append(gen_key)
        backend = runtime.backend
        if new and not backend.lock_generations(new, owner, ttl_ms):
            log.warning(
                "writethrough: could not lock %d buckets before a migration (%s)",
                len(new),
                backend.last_error,
            )

    if fields is None:
        log.warning(
            "writethrough: Redis unreachable; tables this migration touches are only "
            "invalidated if Redis answers when it ends"
        )
    event.listen(connection, "before_cursor_execute", before_cursor_execute)
    try:
        yield
    finally:
        event.remove(connection, "before_cursor_execute", before_cursor_execute)
        if locked:
            gen_keys = list(locked)
            backend = runtime.backend
            if backend.release_generations(gen_keys, owner, True):
                log.info("writethrough: invalidated %d buckets after the migration", len(gen_keys))
            else:
                log.error(
                    "writethrough: could not invalidate the tables this migration changed (%s); "
                    "their buckets stay locked until the lock expires (%s s)",
                    backend.last_error,
                    lock_timeout,
                )
        if statements is None or statements:
            _invalidate_late_keyspaces(cache, statements, locked)


def _file_under(by_name: dict[str, list[str]], table: str, gen_keys: Sequence[str]) -> None:
    """File a keyspace's generation keys under its table's names as a statement may write
    them: with its schema and without (lower case: the statements are matched so)."""
    if gen_keys:
        for name in {table.lower(), table.rsplit(".", 1)[-1].lower()}:
            by_name.setdefault(name, []).extend(gen_keys)


#: how many distinct statements a migration keeps for the end's second look at the registry;
#: beyond, every keyspace registered meanwhile is invalidated (a miss per row, never stale)
_KEPT_STATEMENTS = 10_000


def _invalidate_late_keyspaces(
    cache: WriteThroughCache, statements: set[str] | None, locked: dict[str, None]
) -> None:
    """Keyspaces of the migrated tables that the registry lists now but did not when the
    migration began (the next code version's first process started meanwhile, or a keyspace
    the registry had dropped came back, also of a table it listed none of then): their reads
    filled the rows as they were before the migration's COMMIT, under no lock of ours. Their
    buckets are replaced now; a fill still on its way carries the old generation and is
    refused. ``statements``: the migration's (None: too many kept, every such keyspace)."""
    runtime = cache._runtime
    by_name: dict[str, list[str]] = {}
    for field in cache._whole_registry(runtime) or ():
        table, gen_keys = generation_keys_of(cache.prefix, field)
        _file_under(by_name, table, [gen_key for gen_key in gen_keys if gen_key not in locked])
    late: dict[str, None] = {}
    if statements is None:
        for gen_keys in by_name.values():
            late.update(dict.fromkeys(gen_keys))
    elif (pattern := table_name_pattern(by_name)) is not None:
        for statement in statements:
            for match in pattern.finditer(statement):
                late.update(dict.fromkeys(by_name[match.group(0).lower()]))
    if not late:
        return
    backend = runtime.backend
    if backend.bump_generations(list(late)):
        log.info("writethrough: invalidated %d buckets registered during the migration", len(late))
    else:
        log.error(
            "writethrough: could not invalidate %d buckets of the migrated tables registered "
            "during the migration (%s); their entries may hold rows as they were before it "
            "until their TTL",
            len(late),
            backend.last_error,
        )
