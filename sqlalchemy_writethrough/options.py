"""``from_cache()``: the statement option that opts a ``select()`` in (or a load out)."""

from __future__ import annotations

from sqlalchemy.orm import UserDefinedOption


class FromCache(UserDefinedOption):
    """Serve this primary-key ``select()`` from the cache, or with ``enabled=False`` never.

    ``session.get()`` and many-to-one lazy loads of cached models use the cache without it; a
    ``select()`` uses it only when asked, because its caller may rely on reading the database.
    The option is not part of SQLAlchemy's statement cache key and does not propagate to lazy
    loads of the loaded objects.
    """

    propagate_to_loaders = False

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.enabled = enabled

    def __repr__(self) -> str:
        return f"from_cache({self.enabled!r})"


def from_cache(enabled: bool = True) -> FromCache:
    """Option for ``select(...).options(from_cache())`` or ``get(..., options=[from_cache(False)])``.

    :param enabled: ``False`` sends this one load to the database without asking Redis.
    """
    return FromCache(enabled)
