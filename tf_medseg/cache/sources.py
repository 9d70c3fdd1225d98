"""Sources of the deterministic prefix's outputs for the training pipeline, one epoch at a time.

A *source* hands :class:`tf_medseg.pipeline.TrainStream` the cached items of an epoch
(:class:`Source`): the :class:`~tf_medseg.cache.SmartCache` (``cache="smart"``, or ``"full"``
with no replacement) or :class:`UncachedSource` (``"none"``: the prefix runs on every item every
epoch, the paper's baseline). :func:`make_source` builds one from a mode name. Under Horovod each
rank's source reads only its own part of the items (:func:`~tf_medseg.cache.rank_shard`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any, Protocol

from tf_medseg.cache.items import CachePrefixError, item_path
from tf_medseg.cache.persistent import PersistentPrefixCache
from tf_medseg.cache.schedule import RankWalk, smallest_shard
from tf_medseg.cache.smart_cache import SmartCache
from tf_medseg.choices import CACHE_MODES
from tf_medseg.planning.system import peak_rss_bytes

CachedItem = dict[str, Any]
Prefix = Callable[[Mapping[str, Any]], CachedItem]


class Source(Protocol):
    """What the pipeline and the training loop use of a source of cached items.

    Attributes:
        rank: This process's rank (its patches' seeds).
        shard_size: Items in this rank's shard.
        cache_num: Items held in memory (0: none held).
        wait_for_replacements: Whether an epoch boundary waits for every replacement.
    """

    rank: int
    shard_size: int
    cache_num: int
    wait_for_replacements: bool

    @property
    def epoch(self) -> int: ...

    def epoch_items(self) -> Sequence[tuple[int, CachedItem]] | Iterator[tuple[int, CachedItem]]:
        """``(item_index, cached_item)`` pairs of the current epoch."""

    def peek(self) -> CachedItem:
        """One cached item (to read the number of channels)."""

    def end_epoch(self) -> None: ...

    def fill(self) -> None:
        """Prepares what the first epoch needs (loads the cache), in the calling thread."""

    def stats(self) -> dict[str, Any]:
        """What the source did so far (swaps, late swaps, ...; empty when nothing to say)."""

    def state(self) -> dict[str, Any]:
        """Its position at the start of the current epoch (JSON), for a checkpoint."""

    def restore(self, state: Mapping[str, Any]) -> None:
        """Goes back to a :meth:`state`; ValueError when it cannot (another size or mode)."""

    def close(self, wait: bool = True) -> None: ...


class UncachedSource:
    """Applies the prefix to every item of this rank's shard every epoch (the baseline).

    A small thread pool prepares the next items ahead of the consumer, in order, as a plain
    (non-caching) data loader with workers would. It holds nothing (``cache_num`` 0), so there
    is nothing to fill, replace or wait for.

    Args:
        items: Item dicts.
        prefix: The deterministic prefix.
        shuffle: Shuffle (and re-deal across ranks) every epoch by seed.
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of ranks.
        num_workers: Threads applying the prefix.
        cache_dir: Optional on-disk prefix cache (then it is a disk cache, not the baseline).
    """

    cache_num = 0
    wait_for_replacements = False

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        prefix: Prefix,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        cache_dir: str | None = None,
    ):
        if not items:
            raise ValueError("UncachedSource needs at least one item")
        self._items = list(items)
        self._prefix = PersistentPrefixCache(cache_dir, prefix) if cache_dir else prefix
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        # Items per epoch, the same on every rank (the smallest rank's part; see ``rank_shard``):
        # each rank walks its own part in passes, so no two ranks ever read the same item.
        self._walk = RankWalk(len(self._items), self.seed, rank, world_size, shuffle)
        self.shard_size = smallest_shard(len(self._items), world_size)
        self._epoch = 0
        self._pool = futures.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="uncached")
        self._num_workers = max(1, num_workers)

    @property
    def epoch(self) -> int:
        """The epoch now being trained."""
        return self._epoch

    def _compute(self, index: int) -> CachedItem:
        item = self._items[index]
        try:
            return self._prefix(item)
        except Exception as exc:
            raise CachePrefixError(
                f"the deterministic prefix failed on {item_path(item)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def epoch_items(self) -> Iterator[tuple[int, CachedItem]]:
        """Computes this epoch's items lazily, a few ahead of the consumer, in order."""
        indices = [
            self._walk[p]
            for p in range(self._epoch * self.shard_size, (self._epoch + 1) * self.shard_size)
        ]
        ahead: collections.deque = collections.deque()
        position = 0
        try:
            while position < len(indices) or ahead:
                while position < len(indices) and len(ahead) <= self._num_workers:
                    index = int(indices[position])
                    ahead.append((index, self._pool.submit(self._compute, index)))
                    position += 1
                index, job = ahead.popleft()
                yield index, job.result()
        finally:
            for _, job in ahead:
                job.cancel()

    def peek(self) -> CachedItem:
        """The prefix output of the first item."""
        return self._compute(0)

    def end_epoch(self) -> None:
        """Moves to the next epoch."""
        self._epoch += 1

    def fill(self) -> None:
        """Nothing to load ahead: every epoch applies the prefix again."""

    def stats(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, int]:
        """The epoch, for a checkpoint."""
        return {"epoch": self._epoch}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Restores the epoch from ``state()``."""
        self._epoch = int(state["epoch"])

    def close(self, wait: bool = True) -> None:
        """Stops the worker threads."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> UncachedSource:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How a source holds and deals the items (the settings :func:`make_source` passes on).

    Args:
        cache_num: ``smart`` only: items held (None: ``cache_rate`` of the shard).
        cache_rate: ``smart`` only: fraction held when ``cache_num`` is not given.
        replace_rate: ``smart`` only: fraction replaced per epoch.
        num_workers: Threads of the initial fill (``none``: of the per-epoch loading; None:
            one per CPU for a fill, 2 for loading).
        num_replace_workers: ``smart`` only: threads preparing replacements.
        shuffle: Shuffle by seed.
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of ranks.
        memory_budget_bytes: ``smart``/``full``: memory the cache may use.
        wait_for_replacements: ``smart`` only: keep the strict schedule.
        cache_dir: Optional on-disk prefix cache.
        progress: Progress bar during the fill.
    """

    cache_num: int | None = None
    cache_rate: float = 1.0
    replace_rate: float = 0.1
    num_workers: int | None = None
    num_replace_workers: int = 1
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    memory_budget_bytes: int | None = None
    wait_for_replacements: bool = False
    cache_dir: str | None = None
    progress: bool = True


def make_source(
    mode: str,
    items: Sequence[Mapping[str, Any]],
    prefix: Prefix,
    options: SourceOptions | None = None,
    agree=None,
) -> SmartCache | UncachedSource:
    """Builds the source of a cache mode.

    Args:
        mode: ``"smart"`` (gradual replacement), ``"full"`` (every item of the shard cached, no
            replacement; a memory budget that cannot hold them all is an error) or ``"none"``
            (prefix every epoch; the baseline).
        items: Item dicts.
        prefix: The deterministic prefix.
        options: How the source holds and deals the items (what a mode does not use is
            ignored; None: the defaults).
        agree: ``smart``/``full`` with a memory budget: the workers' collective that makes
            the cache size the same on every worker (see :class:`SmartCache`).

    Returns:
        The source.

    Raises:
        ValueError: On an unknown mode.
    """
    o = options or SourceOptions()
    if mode == "none":
        return UncachedSource(
            items, prefix, o.shuffle, o.seed, o.rank, o.world_size, o.num_workers or 2, o.cache_dir
        )
    if mode not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; choose from {CACHE_MODES}")
    return SmartCache(
        items,
        prefix,
        cache_num=o.cache_num,
        cache_rate=o.cache_rate,
        replace_rate=o.replace_rate,
        num_init_workers=o.num_workers,
        num_replace_workers=o.num_replace_workers,
        shuffle=o.shuffle,
        seed=o.seed,
        rank=o.rank,
        world_size=o.world_size,
        memory_budget_bytes=o.memory_budget_bytes,
        wait_for_replacements=o.wait_for_replacements,
        cache_dir=o.cache_dir,
        progress=o.progress,
        agree=agree,
        whole=mode == "full",
    )


def patches_per_epoch(source: SmartCache | UncachedSource, num_samples: int) -> int:
    """Patches one epoch yields: the cached (or shard's) items times ``num_samples``."""
    if isinstance(source, SmartCache):
        return source.cache_num * num_samples
    return source.shard_size * num_samples


def source_summary(source: Source, mode: str) -> dict[str, Any]:
    """What a training source really did, for ``summary.json`` (this worker's figures).

    Returns:
        ``mode``; ``cache_num`` (items held in RAM; 0 for ``none``); ``items_in_shard`` (this
        worker's training items); ``items_replaced`` (swapped in at epoch boundaries);
        ``late_swaps`` (replacements not ready at their boundary); ``wait_for_replacements``
        (waited for them at each boundary); ``peak_rss_bytes`` of this process.
    """
    stats = source.stats()
    return {
        "mode": mode,
        "cache_num": int(source.cache_num),
        "items_in_shard": int(source.shard_size),
        "items_replaced": int(stats.get("swaps", 0)),
        "late_swaps": int(stats.get("late_swaps", 0)),
        "wait_for_replacements": bool(source.wait_for_replacements),
        "peak_rss_bytes": peak_rss_bytes(),
    }
