"""How ``uninstall()`` leaves a Session class the cache made, without touching its listeners.

SQLAlchemy keeps a Session class's listeners in a ``deque`` that every session of the class
iterates while it runs an event, and documents that a listener may not be removed while its
event runs: ``event.remove()`` while other threads' sessions flushed or loaded made them raise
``RuntimeError: deque mutated during iteration``. So ``uninstall()`` removes nothing from a
class ``install()`` made for a factory (a ``sessionmaker``'s subclass, an async factory's
``sync_session_class``): it marks the class, so that the cache's listeners, still there for
the sessions made before, do nothing for them (as if removed, at once, in every thread), and
gives the factory back the class it had once no cache's listeners on the made class are live,
so that new sessions run none of them. Another ``install()`` makes a new class: the factory's
class never grows a chain of retired ones. A Session class given to ``install()`` directly is
the application's, and its listeners are removed as before (install and uninstall it while no
thread uses it).
"""

from __future__ import annotations

from typing import Any

#: on a class install() made: the :class:`Retirement` of each cache whose listeners on it run
_LIVE = "_wt_live"
#: on a class install() made: the :class:`Retirement` of each cache uninstalled from it
_OFF = "_wt_off"
#: on a sessionmaker's class install() made: the class the factory had before
MADE_FROM = "_wt_made_from"


class Retirement:
    """One flavour of one cache, as its listeners ask whether it is still installed for a
    session. ``any`` stays False until the flavour is first uninstalled from a class made for
    it: until then a listener pays one attribute read."""

    __slots__ = ("any",)

    def __init__(self) -> None:
        self.any = False

    def retired_for(self, session: Any) -> bool:
        """Whether this flavour was uninstalled from a class ``session`` runs (its listeners
        are still on that class, for ``session`` and the sessions made before)."""
        return self.off_in(type(session)) is not None

    def off_in(self, cls: type) -> type | None:
        """The class of ``cls``'s lineage where this flavour's listeners are, turned off by
        an uninstall(): installed on it again, the cache turns them back on (:meth:`join`)
        rather than adding its listeners a second time, which SQLAlchemy would run twice."""
        for each in cls.__mro__:
            if self in each.__dict__.get(_OFF, ()):
                return each
        return None

    def join(self, cls: type) -> bool:
        """This flavour's listeners go on ``cls``, a class install() made; True when they
        are there already, turned off by an uninstall(), and now back on."""
        setattr(cls, _LIVE, (*cls.__dict__.get(_LIVE, ()), self))
        off = cls.__dict__.get(_OFF, ())
        if self not in off:
            return False
        setattr(cls, _OFF, tuple(each for each in off if each is not self))
        return True

    def retire(self, cls: type) -> bool:
        """Turn this flavour's listeners on ``cls`` off; whether no cache's are live there."""
        live = tuple(each for each in cls.__dict__.get(_LIVE, ()) if each is not self)
        setattr(cls, _LIVE, live)
        setattr(cls, _OFF, (*cls.__dict__.get(_OFF, ()), self))
        self.any = True
        return not live


def unused(cls: type) -> bool:
    """A class install() made whose caches were all uninstalled."""
    return _LIVE in cls.__dict__ and not cls.__dict__[_LIVE]


def live_base(cls: type) -> type:
    """The class to give a sessionmaker back when the class install() made for it (``cls``)
    is unused: the one it was made from, past each class another cache made and left in
    between."""
    base: type = cls.__dict__[MADE_FROM]
    while MADE_FROM in base.__dict__ and unused(base):
        base = base.__dict__[MADE_FROM]
    return base
