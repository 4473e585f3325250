"""Which flavour an ``install()`` target is, and where the session events of an async one go.

SQLAlchemy's session events exist on ``Session`` classes and ``sessionmaker``/``scoped_session``
only: an ``AsyncSession`` delegates to a sync ``Session`` (its ``sync_session_class``) that runs
in a greenlet, and that is where the cache listens. For an ``async_sessionmaker`` (or the one
behind an ``async_scoped_session``) and for an ``AsyncSession`` subclass, the cache gives the
factory a ``Session`` subclass of its own (of the class it already used), so that its listeners
reach only the sessions of that factory, as a ``sessionmaker``'s do. Given the asyncio
flavour's read path, that subclass is also the get path before the statement
(:mod:`.session`), unless the class it is made from changes how a get loads.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .session import overrides_get_path, plain_subclass, session_class

if TYPE_CHECKING:
    from .loading import ReadPath

#: marks the ``Session`` subclasses this module made, so that installing twice reuses one
_MADE = "__writethrough_sync_session__"
#: on a class made here: the ``sync_session_class`` its target named before (None: none)
_NAMED_BEFORE = "_wt_named_before"


def _async_api() -> Any:
    """SQLAlchemy's asyncio extension if the application imported it, else None: an async
    target cannot exist without it, and importing it needs greenlet, which SQLAlchemy 2.1 no
    longer installs (a sync-only application must not need it)."""
    return sys.modules.get("sqlalchemy.ext.asyncio")


def is_async_session(target: Any) -> bool:
    """A single ``AsyncSession`` (install() wants its factory)."""
    api = _async_api()
    return api is not None and isinstance(target, api.AsyncSession)


def is_async_target(target: Any) -> bool:
    """An ``async_sessionmaker``, ``async_scoped_session`` or ``AsyncSession`` subclass."""
    api = _async_api()
    if api is None:
        return False
    if isinstance(target, (api.async_sessionmaker, api.async_scoped_session)):
        return True
    return isinstance(target, type) and issubclass(target, api.AsyncSession)


def planned_sync_session_class(target: Any) -> tuple[type[Session], bool]:
    """The class :func:`sync_session_class` would return for an async ``target``, without
    making it: the class itself, or (``True``) the class a new subclass would derive from.

    A class made here is the target's own only where the target itself names it (a factory's
    ``sync_session_class`` keyword, an AsyncSession subclass's own attribute): one inherited
    (``AsyncSession.sync_session_class`` after an install on ``AsyncSession``) belongs to
    another target, and a factory of it gets a subclass of its own, as siblings do."""
    api = _async_api()
    if isinstance(target, api.async_scoped_session):
        target = target.session_factory
    own = _named(target)
    if isinstance(target, api.async_sessionmaker):
        current = own or target.class_.sync_session_class
    else:  # an AsyncSession subclass
        current = target.sync_session_class
    return current, not (own is not None and own.__dict__.get(_MADE))


def sync_session_class(target: Any, read: ReadPath | None = None) -> type[Session]:
    """The ``Session`` class the sessions of an async ``target`` run, made the factory's own
    on first call: the class the cache's listeners go on. With ``read``, its plain gets are
    answered by ``read`` before the statement (made so, or given ``read`` again after an
    uninstall), unless the class it was made from loads gets its own way."""
    api = _async_api()
    if isinstance(target, api.async_scoped_session):
        target = target.session_factory
    current, make = planned_sync_session_class(target)
    if make:
        before = _named(target)
        current = _subclass(current, read)
        setattr(current, _NAMED_BEFORE, before)
        if isinstance(target, api.async_sessionmaker):
            target.configure(sync_session_class=current)
        else:
            target.sync_session_class = current
    elif read is not None and "_wt_read" in current.__dict__:
        current._wt_read = read  # type: ignore[attr-defined]
    return current


def give_back(target: Any, made: type) -> None:
    """Name again the ``sync_session_class`` an async ``target`` named before
    :func:`sync_session_class` made ``made`` (none: the class's own), if it still names
    ``made``: ``uninstall()``, once no cache's listeners on ``made`` are live (see
    :mod:`.retiring`)."""
    api = _async_api()
    if isinstance(target, api.async_scoped_session):
        target = target.session_factory
    if _named(target) is not made:
        return
    before = made.__dict__.get(_NAMED_BEFORE)
    if isinstance(target, api.async_sessionmaker):
        if before is None:
            del target.kw["sync_session_class"]
        else:
            target.kw["sync_session_class"] = before
    elif before is None:
        delattr(target, "sync_session_class")
    else:
        target.sync_session_class = before


def _named(target: Any) -> type[Session] | None:
    """The ``sync_session_class`` an async factory or AsyncSession subclass names itself."""
    api = _async_api()
    if isinstance(target, api.async_sessionmaker):
        named: type[Session] | None = target.kw.get("sync_session_class")
    else:
        named = target.__dict__.get("sync_session_class")
    return named


def made_here(cls: type) -> bool:
    """Whether :func:`sync_session_class` made ``cls``."""
    return bool(cls.__dict__.get(_MADE))


def _subclass(base: type[Session], read: ReadPath | None) -> type[Session]:
    if read is not None and not overrides_get_path(base):
        return session_class(base, read, {_MADE: True})
    return plain_subclass(base, {_MADE: True})
