"""Caches of the deterministic prefix's outputs: in RAM with gradual replacement, and on disk."""

from tf_medseg.cache.persistent import PersistentPrefixCache, item_key
from tf_medseg.cache.smart_cache import (
    CacheBudgetError,
    CachePrefixError,
    SmartCache,
    item_nbytes,
    item_path,
    rank_shard,
    smallest_shard,
)

__all__ = [
    "CacheBudgetError",
    "CachePrefixError",
    "PersistentPrefixCache",
    "SmartCache",
    "item_key",
    "item_nbytes",
    "item_path",
    "rank_shard",
    "smallest_shard",
]
