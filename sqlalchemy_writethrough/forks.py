"""What a process forked after the cache was built must not inherit as it was.

A server that loads the application before forking its workers (``gunicorn --preload``, a
Celery parent) hands each child a copy of the cache, but none of the parent's threads: a lock
one of them held at the fork stays held for good in the child, and a flag saying that a
thread of the parent runs (the circuit breaker's prober) stays true with no thread behind it.
Objects that hold such state register here: their locks are made anew in the child, and
their ``_after_fork()`` (if any) resets the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

log = logging.getLogger("sqlalchemy_writethrough")

#: object -> the names of its lock attributes to make anew in a forked child
_objects: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()
_RLOCK = type(threading.RLock())


def renew_in_child(obj: Any, *locks: str) -> None:
    """In every process forked from this one from now on, make ``obj``'s ``locks`` (names of
    its attributes holding a ``threading.Lock`` or ``RLock``) anew, unheld, then call its
    ``_after_fork()`` if it has one."""
    _objects[obj] = locks


def _after_fork() -> None:
    for obj, locks in list(_objects.items()):
        try:
            for name in locks:
                held = getattr(obj, name)
                setattr(obj, name, threading.RLock() if type(held) is _RLOCK else threading.Lock())
            hook = getattr(obj, "_after_fork", None)
            if hook is not None:
                hook()
        except Exception:  # never stop a fork: the next operation finds what is left
            log.debug("writethrough: resetting %r after fork failed", obj, exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
