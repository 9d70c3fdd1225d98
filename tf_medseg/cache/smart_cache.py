"""Smart cache with gradual replacement (the paper's section on the smart cache).

The deterministic prefix of the transform chain (load, reorient, resample, normalise, crop,
foreground / background indices) is applied once per item and its output is held in RAM for
``cache_num`` items. Each epoch trains on the cached items only; while it trains, a thread pool
applies the prefix to the next ``ceil(cache_num * replace_rate)`` items not in the cache, and at
the epoch boundary those replace the oldest cached items. With ``replace_rate=0`` or
``cache_num`` covering the whole shard it is a plain full cache. Which items, in which order, on
which rank, and the position a checkpoint saves are the seeded schedule's
(:class:`~tf_medseg.cache.schedule.CacheSchedule`); the cache holds and computes what it names.

Beyond the paper's description (and MONAI's ``SmartCacheDataset``): the training thread never
waits for late replacements unless ``wait_for_replacements=True`` (the ready ones are swapped
in, the late ones at a later boundary, and ``stats()`` counts them; the schedule then depends on
thread timing); ``memory_budget_bytes`` sizes the cache from the measured size of a prefix
output, and a cache that would not fit is refused before the first epoch; an exception in a
worker thread is re-raised in the calling thread as ``CachePrefixError`` naming the item's file.

Threads and the lock: the public methods may be called from several threads (the pipeline reads
``epoch_items()`` in a tf.data generator thread while the training thread calls ``end_epoch()``
and ``state()``). Every public method that reads or changes the schedule or the item store holds
the cache's one re-entrant lock for its whole call. Worker threads (fill, budget measurement,
replacements) take no lock and touch neither: each applies the prefix to the one item it is
handed and returns the result through its future, which a caller holding the lock stores.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any, TypeVar

from tqdm import tqdm

from tf_medseg.cache.items import (
    Agree,
    CachedItem,
    CachePrefixError,
    Item,
    Prefix,
    budget_cache_num,
    check_cache_arguments,
    item_nbytes,
    item_path,
    lower_thread_priority,
    prepare,
    warn_fixed_subset,
)
from tf_medseg.cache.persistent import PersistentPrefixCache
from tf_medseg.cache.schedule import CacheSchedule, RankWalk, replace_count, smallest_shard
from tf_medseg.planning.system import cpu_count

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """Runs ``method`` holding its cache's lock (the rule in the module docstring)."""

    @functools.wraps(method)
    def holding_lock(self: SmartCache, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return holding_lock  # type: ignore[return-value]


class SmartCache:
    """Holds the prefix output of ``cache_num`` items and replaces a fraction every epoch.

    Use it as the source of a ``tf_medseg.pipeline.TrainStream``: each epoch call
    ``epoch_items()`` (the cached items, shuffled by seed and epoch) and then ``end_epoch()``
    (which swaps in the replacements prepared meanwhile). The cache fills on first use, or
    explicitly with ``fill()``.

    Args:
        items: Item dicts (``{"case", "image", "label"}``), the whole training list; the cache
            takes this rank's shard of it.
        prefix: The deterministic prefix, ``prefix(item) -> cached item``.
        cache_num: Number of items to hold; by default ``int(shard_size * cache_rate)`` or what
            fits in ``memory_budget_bytes``. Capped at the shard size.
        cache_rate: Fraction of the shard to hold when ``cache_num`` is not given.
        replace_rate: Fraction of ``cache_num`` replaced per epoch (0 keeps the cache fixed).
        num_init_workers: Threads for the initial fill (default: one per CPU).
        num_replace_workers: Threads preparing replacements during training.
        shuffle: Shuffle the items (the deal across ranks and each epoch's order) by seed.
        seed: Run seed; the schedule is a function of it.
        rank: This process's rank.
        world_size: Number of ranks sharing the item list.
        memory_budget_bytes: Bytes the cache may hold, counting the replacements in flight;
            an item's size is the largest of the first ``budget_items`` prefix outputs.
        wait_for_replacements: Wait at the epoch boundary for every replacement (the strict
            schedule) instead of swapping in only those that are ready.
        cache_dir: Optional folder for an on-disk cache of prefix outputs
            (``PersistentPrefixCache``); the prefix must then have ``config_fingerprint()``.
        progress: Show a progress bar during the initial fill.
        replace_nice: How much lower than the training threads the replacement threads run
            (a nice increment, Linux only; 0 keeps the same priority). A training step that
            needs the CPU (CPU training, or a CPU-bound random tail) then runs at full speed
            while replacements use the time it leaves idle; replacements that are late at an
            epoch boundary are counted in ``stats()["late_swaps"]``.
        budget_items: Items measured to size the cache from ``memory_budget_bytes``.
        agree: With several workers, a collective that takes this worker's cache size (0: the
            budget holds none; -1: the requested ``cache_num`` does not fit) and returns the one
            every worker uses, the minimum (see ``tf_medseg.distributed``).
        whole: Hold every item of the shard (``--cache=full``): ``cache_num`` and
            ``cache_rate`` are ignored, nothing is replaced, and a memory budget that cannot hold
            them all is a :class:`CacheBudgetError`, not a smaller cache.

    Raises:
        ValueError: On an empty item list or an out-of-range argument.
        CacheBudgetError: When ``memory_budget_bytes`` cannot hold the requested cache.
        CachePrefixError: When the prefix fails on the item measured for the budget.
    """

    def __init__(
        self,
        items: Sequence[Item],
        prefix: Prefix,
        cache_num: int | None = None,
        cache_rate: float = 1.0,
        replace_rate: float = 0.1,
        num_init_workers: int | None = None,
        num_replace_workers: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        memory_budget_bytes: int | None = None,
        wait_for_replacements: bool = False,
        cache_dir: str | None = None,
        progress: bool = True,
        replace_nice: int = 10,
        budget_items: int = 3,
        agree: Agree | None = None,
        whole: bool = False,
    ):
        if whole:
            cache_num, replace_rate = None, 0.0
        check_cache_arguments(items, cache_num, cache_rate, replace_rate, rank, world_size)
        if num_replace_workers < 1:
            raise ValueError(f"num_replace_workers must be at least 1, got {num_replace_workers}")
        self._items = list(items)
        self._prefix = PersistentPrefixCache(cache_dir, prefix) if cache_dir else prefix
        self.replace_rate = float(replace_rate)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.wait_for_replacements = wait_for_replacements
        self.progress = progress
        walk = RankWalk(len(self._items), self.seed, rank, world_size, shuffle)
        self.shard_size = walk.part_size
        self._num_init_workers = num_init_workers or max(1, cpu_count())
        self._num_replace_workers = num_replace_workers
        self.replace_nice = int(replace_nice)
        self.budget_items = max(1, int(budget_items))

        self._lock = threading.RLock()
        self._store: dict[int, CachedItem] = {}
        self._futures: dict[int, futures.Future] = {}
        self._precomputed: dict[int, CachedItem] = {}
        self._filled = False
        self._closed = False
        self._replace_pool: futures.ThreadPoolExecutor | None = None
        self._stats = {"swaps": 0, "late_swaps": 0, "wait_s_total": 0.0, "wait_s_max": 0.0}
        self._late: set[int] = set()  # pending ids already counted in late_swaps
        self._fill_s = 0.0
        self.item_bytes: int | None = None
        self.memory_budget_bytes = memory_budget_bytes

        smallest = smallest_shard(len(self._items), world_size)
        wanted = cache_num if cache_num is not None else max(1, int(smallest * cache_rate))
        wanted = smallest if whole else min(wanted, smallest)
        if memory_budget_bytes is not None:
            sample = walk.head(self.budget_items)
            explicit = cache_num is not None
            wanted = self._fit_budget(sample, wanted, explicit, agree, whole)
        self.cache_num = wanted
        self.replace_num = replace_count(self.cache_num, self.replace_rate, self.shard_size)
        if self.replace_num == 0 and self.cache_num < walk.part_size:
            warn_fixed_subset(self.cache_num, walk.part_size, world_size)
        names = [str(item.get("case", i)) for i, item in enumerate(self._items)]
        self._schedule = CacheSchedule(walk, self.cache_num, self.replace_num, names)

    # ------------------------------------------------------------------ prefix
    def _prepare_all(
        self, ids: Sequence[int], done: dict[int, CachedItem], pool_name: str, bar: tqdm | None
    ) -> None:
        """Applies the prefix to the ``ids`` not in ``done`` in a pool of fill workers, adding
        each result to ``done`` as it comes (a failure cancels the rest and is re-raised)."""
        todo = [i for i in ids if i not in done]
        workers = max(1, min(self._num_init_workers, len(todo)))
        with futures.ThreadPoolExecutor(workers, thread_name_prefix=pool_name) as pool:
            jobs = {pool.submit(prepare, self._prefix, self._items[i]): i for i in todo}
            try:
                for job in futures.as_completed(jobs):
                    done[jobs[job]] = job.result()
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise

    def _fit_budget(
        self,
        sample: Sequence[int],
        wanted: int,
        explicit: bool,
        agree: Agree | None,
        whole: bool = False,
    ) -> int:
        """Measures the ``sample`` items (the first the fill takes, which it then reuses), sets
        ``item_bytes`` to the largest, and returns the cache size the budget holds."""
        self._prepare_all(sample, self._precomputed, "smart-cache-measure", None)
        largest = max(sample, key=lambda i: item_nbytes(self._precomputed[i]))
        self.item_bytes = max(1, item_nbytes(self._precomputed[largest]))
        return budget_cache_num(
            wanted,
            explicit=explicit,
            item_bytes=self.item_bytes,
            budget_bytes=int(self.memory_budget_bytes),
            replace_rate=self.replace_rate,
            shard_size=self.shard_size,
            largest_path=item_path(self._items[largest]),
            agree=agree,
            whole=whole,
        )

    def _result(self, index: int) -> CachedItem:
        """The replacement's output, with its worker's exception re-raised in this thread."""
        try:
            return self._futures[index].result()
        except futures.CancelledError as exc:
            raise CachePrefixError(
                f"replacement of {item_path(self._items[index])} was cancelled (cache closed?)"
            ) from exc

    def _pool(self) -> futures.ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("the smart cache is closed")
        if self._replace_pool is None:
            self._replace_pool = futures.ThreadPoolExecutor(
                self._num_replace_workers,
                thread_name_prefix="smart-cache-replace",
                initializer=lower_thread_priority,
                initargs=(self.replace_nice,),
            )
        return self._replace_pool

    def _start_replacements(self) -> None:
        """Tops the schedule's pending ids up and starts a worker on each that has none."""
        self._schedule.top_up()
        pool = self._pool()
        for index in self._schedule.pending:
            if index not in self._futures:
                self._futures[index] = pool.submit(prepare, self._prefix, self._items[index])

    # --------------------------------------------------------------- lifecycle
    @_locked
    def fill(self) -> None:
        """Applies the prefix to the cache's items (once) and starts the replacements.

        Raises:
            CachePrefixError: If the prefix fails on an item; the message names its file.
        """
        if self._closed:
            raise RuntimeError("the smart cache is closed")
        if self._filled:
            return
        start = time.perf_counter()
        ids = self._schedule.cached
        done = {i: self._precomputed[i] for i in ids if i in self._precomputed}
        bar = tqdm(
            total=len(ids),
            initial=len(done),
            desc=f"smart cache fill (rank {self.rank})",
            unit="item",
            disable=not self.progress,
        )
        try:
            self._prepare_all(ids, done, "smart-cache-fill", bar)
        finally:
            bar.close()
        self._precomputed.clear()
        self._store = {i: done[i] for i in ids}
        self._filled = True
        self._fill_s = time.perf_counter() - start
        if self.item_bytes is None:
            self.item_bytes = item_nbytes(self._store[ids[0]])
        self._start_replacements()

    @property
    @_locked
    def epoch(self) -> int:
        """Number of epoch boundaries passed (the epoch now being trained)."""
        return self._schedule.epoch

    @_locked
    def epoch_items(self) -> list[tuple[int, CachedItem]]:
        """The cached items for the current epoch, shuffled by ``(seed, epoch, rank)``.

        Returns:
            ``(item_index, cached_item)`` pairs; ``item_index`` indexes the ``items`` given to
            the constructor (the pipeline folds it into the random tail's seeds).
        """
        self.fill()
        return [(i, self._store[i]) for i in self._schedule.epoch_order()]

    @_locked
    def peek(self) -> CachedItem:
        """One cached item (the oldest), filling the cache if needed; e.g. for its channels."""
        self.fill()
        return self._store[self._schedule.cached[0]]

    @_locked
    def end_epoch(self) -> None:
        """Swaps in the prepared replacements for the oldest items and starts the next ones.

        Without ``wait_for_replacements`` only the replacements already prepared are swapped
        in; the others stay in flight and count as late. The time this call waits is recorded.

        Raises:
            CachePrefixError: If preparing a replacement failed; the message names its file.
        """
        self.fill()
        start = time.perf_counter()
        pending = self._schedule.pending
        ready = [i for i in pending if self.wait_for_replacements or self._futures[i].done()]
        results = {i: self._result(i) for i in ready}
        for index in self._schedule.swap(ready):
            del self._store[index]
        for index in ready:
            self._store[index] = results[index]
            del self._futures[index]
        waited = time.perf_counter() - start
        self._stats["swaps"] += len(ready)
        # A replacement that misses several boundaries is one late replacement: count the ids
        # late now that were not late at the previous boundary already.
        late = set(pending) - set(ready)
        self._stats["late_swaps"] += len(late - self._late)
        self._late = late
        self._stats["wait_s_total"] += waited
        self._stats["wait_s_max"] = max(self._stats["wait_s_max"], waited)
        self._schedule.advance_epoch()
        self._start_replacements()

    @_locked
    def stats(self) -> dict[str, Any]:
        """Counters for logs and benchmarks.

        Returns:
            Dict with ``epoch``, ``cache_num``, ``replace_num``, ``swaps`` (replacements swapped
            in), ``late_swaps`` (replacements not ready at the boundary they were prepared
            for, each counted once however many boundaries it misses), ``wait_s_total`` /
            ``wait_s_max`` (training-thread time spent in ``end_epoch``), ``in_flight`` /
            ``ready`` (replacements being prepared / prepared now), ``fill_s``,
            ``cache_bytes`` and ``item_bytes``.
        """
        return {
            "epoch": self._schedule.epoch,
            "cache_num": self.cache_num,
            "replace_num": self.replace_num,
            **self._stats,
            "in_flight": len(self._futures),
            "ready": sum(f.done() for f in self._futures.values()),
            "fill_s": self._fill_s,
            "cache_bytes": sum(item_nbytes(item) for item in self._store.values()),
            "item_bytes": self.item_bytes,
        }

    @_locked
    def cached_indices(self) -> list[int]:
        """Item indices now in the cache, oldest first (none before the fill)."""
        return list(self._schedule.cached) if self._filled else []

    # -------------------------------------------------------------- checkpoint
    @_locked
    def state(self) -> dict[str, Any]:
        """The cache position, JSON-serialisable, for a checkpoint.

        Returns:
            Dict with the epoch, the replacement cursor, the cached and in-flight item indices,
            and the settings that must match on ``restore`` (see ``CacheSchedule.state``).
        """
        return self._schedule.state()

    @_locked
    def restore(self, state: Mapping[str, Any]) -> None:
        """Puts the cache at a saved position; the cache refills on next use.

        Items already cached and still wanted are kept; the others are recomputed.

        Args:
            state: A dict from ``state()``.

        Raises:
            ValueError: If the state was saved with different items or settings.
        """
        self._schedule.restore(state)
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._late = set()  # the restored pending ids start again
        self._precomputed = {i: self._store[i] for i in self._schedule.cached if i in self._store}
        self._store.clear()
        self._filled = False

    @_locked
    def close(self, wait: bool = True) -> None:
        """Stops the worker threads and frees the cached items.

        Args:
            wait: Wait for replacements already running (queued ones are cancelled).
        """
        self._closed = True
        if self._replace_pool is not None:
            self._replace_pool.shutdown(wait=wait, cancel_futures=True)
            self._replace_pool = None
        self._store.clear()
        self._futures.clear()
        self._precomputed.clear()
        self._filled = False

    def __enter__(self) -> SmartCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error a replacement may be stuck on the failing input: do not wait for it.
        self.close(wait=exc_type is None)

    def __len__(self) -> int:
        return self.cache_num
