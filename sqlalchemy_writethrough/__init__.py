"""sqlalchemy-writethrough: a Redis write-through cache of SQLAlchemy ORM entities.

::

    from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

    cache = WriteThroughCache("redis://localhost:6379/0", prefix="shop", ttl=3600)
    cache.install(Session)

    class Product(Base, CachedModel):
        __tablename__ = "product"
        ...

Every commit mirrors the committed rows into Redis; a rollback leaves Redis as it was;
``session.get()``, many-to-one lazy loads and ``select()`` with ``from_cache()`` are served from
Redis. See ``docs/`` for the consistency model.
"""

from __future__ import annotations

from .cache import WriteThroughCache as WriteThroughCache
from .config import ModelOptionsDict as ModelOptionsDict
from .config import NearCacheOptions as NearCacheOptions
from .exc import CacheUnavailableError as CacheUnavailableError
from .exc import ConfigurationError as ConfigurationError
from .exc import WritethroughError as WritethroughError
from .exc import WriteThroughWarning as WriteThroughWarning
from .model import CachedModel as CachedModel
from .options import FromCache as FromCache
from .options import from_cache as from_cache
from .report import CachedModels as CachedModels
from .report import InexactColumn as InexactColumn
from .report import LeftOutModel as LeftOutModel
from .report import ModelInfo as ModelInfo
from .stats import CacheStats as CacheStats
from .stats import Latency as Latency
from .stats import ModelStats as ModelStats
from .stats import Recommendation as Recommendation

__version__ = "0.1.0"

__all__ = [
    "CacheStats",
    "CacheUnavailableError",
    "CachedModel",
    "CachedModels",
    "ConfigurationError",
    "FromCache",
    "InexactColumn",
    "Latency",
    "LeftOutModel",
    "ModelInfo",
    "ModelOptionsDict",
    "ModelStats",
    "NearCacheOptions",
    "Recommendation",
    "WriteThroughCache",
    "WriteThroughWarning",
    "WritethroughError",
    "__version__",
    "from_cache",
]
