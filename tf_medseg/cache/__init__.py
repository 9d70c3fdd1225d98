"""Caches of the deterministic prefix's outputs: in RAM with gradual replacement, and on disk."""

from tf_medseg.cache.items import CacheBudgetError, CachePrefixError, item_nbytes, item_path
from tf_medseg.cache.persistent import PersistentPrefixCache, item_key
from tf_medseg.cache.schedule import CacheSchedule, rank_shard, smallest_shard
from tf_medseg.cache.smart_cache import SmartCache

__all__ = [
    "CacheBudgetError",
    "CachePrefixError",
    "CacheSchedule",
    "PersistentPrefixCache",
    "SmartCache",
    "item_key",
    "item_nbytes",
    "item_path",
    "rank_shard",
    "smallest_shard",
]
