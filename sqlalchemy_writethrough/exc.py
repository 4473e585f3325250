"""Exceptions raised by sqlalchemy-writethrough.

::

    WritethroughError
     ├── ConfigurationError      a model or option the cache cannot keep exact; raised when the
     │                           mapper is configured or when the cache is built, never at a read
     └── CacheUnavailableError   ``on_redis_error="strict"`` only: a flush could not take its locks,
                                 so the flush (and the transaction) fails instead of risking a stale read

    UserWarning
     └── WriteThroughWarning     a model ``register_all()`` left out of the cache (once per model and
                                 cache), or a column whose commits cannot be written through exactly,
                                 so they invalidate its row (once per column); each names the model,
                                 why, and the remedy: filter this category to silence them

Nothing else ever reaches the caller: reads fall back to the database and, after the database
COMMIT, Redis errors are logged and counted, never raised.
"""

from __future__ import annotations


class WritethroughError(Exception):
    """Base class of every exception this package raises."""


class ConfigurationError(WritethroughError):
    """A model, column or option that the cache refuses, with a hint on what to do instead."""


class CacheUnavailableError(WritethroughError):
    """Redis could not take a writer's locks and the model is configured ``strict``."""


class WriteThroughWarning(UserWarning):
    """Something the cache does less well than asked, said once with its remedy: a model
    ``register_all()`` left out, or a column whose commits invalidate its row instead of writing it."""
