"""Alembic environment of the example project, with the cache integration.

The only lines a project adds to its env.py are the cache construction and the
``invalidate_migrated_tables`` block around the migration run.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.alembic import invalidate_migrated_tables

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)
database_url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
redis_url = os.environ.get("REDIS_URL") or config.get_main_option("writethrough.redis_url")
prefix = os.environ.get("WRITETHROUGH_PREFIX") or config.get_main_option("writethrough.prefix")
version_table = os.environ.get("ALEMBIC_VERSION_TABLE", "alembic_version")
assert database_url and redis_url and prefix


def run_migrations_offline() -> None:
    """--sql mode writes a script; the cache is not involved (invalidate after running it)."""
    context.configure(url=database_url, literal_binds=True, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    cache = WriteThroughCache(redis_url, prefix=prefix)
    engine = create_engine(database_url)
    with engine.connect() as connection, invalidate_migrated_tables(cache, connection):
        context.configure(connection=connection, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
