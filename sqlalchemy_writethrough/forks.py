"""What a process forked after the cache was built must not inherit as it was.

A server that loads the application before forking its workers (``gunicorn --preload``, a
Celery parent) hands each child a copy of the cache, but none of the parent's threads: a lock
one of them held at the fork stays held for good in the child, and a flag saying that a
thread of the parent runs (the circuit breaker's prober) stays true with no thread behind it.
Objects that hold such state register here, and their ``_after_fork()`` runs in the child.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

log = logging.getLogger("sqlalchemy_writethrough")

_objects: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_in_child(obj: Any) -> None:
    """Have ``obj._after_fork()`` called in every process forked from this one from now on."""
    _objects.add(obj)


def _after_fork() -> None:
    for obj in list(_objects):
        try:
            obj._after_fork()
        except Exception:  # never stop a fork: the next operation finds what is left
            log.debug("writethrough: resetting %r after fork failed", obj, exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
