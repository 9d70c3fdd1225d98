"""Smart cache with gradual replacement (the paper's section on the smart cache).

The deterministic prefix of the transform chain (load, reorient, resample, normalise, crop,
foreground / background indices) is applied once per item and its output is held in RAM for
``cache_num`` items. Each epoch trains on the cached items only; while it trains, a thread pool
applies the prefix to the next ``ceil(cache_num * replace_rate)`` items not in the cache, and at
the epoch boundary those replace the oldest cached items. With ``replace_rate=0`` or
``cache_num`` covering the whole shard it is a plain full cache.

Beyond the paper's description (and MONAI's ``SmartCacheDataset``):

* the training thread never waits for late replacements unless ``wait_for_replacements=True``:
  the ready ones are swapped in, the late ones at a later boundary, and ``stats()`` counts them;
* with ``world_size > 1`` each rank caches its own part of the items, dealt once by seed: the
  ranks never hold the same item, in any epoch (a re-deal per pass would let two ranks hold one
  item while their caches straddle the change of pass). The parts differ in size by at most
  one item; every rank holds the same ``cache_num`` (sized on the smallest part), so every rank
  takes the same number of steps per epoch;
* ``memory_budget_bytes`` sizes the cache from the measured size of a prefix output, and a cache
  that would not fit is refused before the first epoch;
* an exception in a worker thread is re-raised in the training thread as ``CachePrefixError``
  naming the item's file;
* ``state()`` / ``restore()`` carry the cache position across a checkpoint.

The schedule of which items are cached at each epoch depends only on the seed (never on thread
timing) when ``wait_for_replacements=True`` or when every replacement is ready in time.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from tqdm import tqdm

from tf_medseg.cache.persistent import PersistentPrefixCache
from tf_medseg.system import cpu_count

logger = logging.getLogger(__name__)

Item = Mapping[str, Any]
CachedItem = dict[str, Any]
Prefix = Callable[[Item], CachedItem]
#: A collective over the workers: this worker's cache size in, the agreed one (the minimum) out.
Agree = Callable[[int], int]

# TensorFlow hands a NumPy buffer to a tensor without copying it only when the buffer is aligned
# to Eigen's maximum alignment (64 bytes covers every build).
_ALIGN_BYTES = 64
_STATE_VERSION = 2  # 2: fixed per-rank parts (1 re-dealt the items on every pass)


class CachePrefixError(RuntimeError):
    """The deterministic prefix failed on an item in a cache worker thread."""


class CacheBudgetError(ValueError):
    """The requested cache does not fit in the memory budget."""


def item_nbytes(item: Mapping[str, Any]) -> int:
    """Bytes held by the arrays of a cached item.

    Args:
        item: A cached item (prefix output).

    Returns:
        The sum of ``nbytes`` over the item's NumPy array values.
    """
    return int(sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray)))


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def item_path(item: Item) -> str:
    """The file that names an item in error messages (its image path, else its case)."""
    image = item.get("image")
    if isinstance(image, str):
        return image
    if isinstance(image, list | tuple) and image and isinstance(image[0], str):
        return ", ".join(image)
    return str(item.get("case", "<item without image path>"))


def rank_shard(
    num_items: int, seed: int, pass_index: int, rank: int, world_size: int, shuffle: bool
) -> np.ndarray:
    """The item indices one rank handles during one full pass over its part of the items.

    The items are permuted by ``seed`` (identity when ``shuffle`` is False) and dealt
    round-robin once for the whole run, so the ranks' parts are disjoint, differ in size by at
    most one, and together cover every item. Each pass visits the rank's part in a new order,
    permuted by ``(seed, pass_index, rank)``.

    Args:
        num_items: Number of items in the whole list.
        seed: Run seed.
        pass_index: Index of the full pass over the rank's part.
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks.
        shuffle: Whether to permute the items (the deal and each pass).

    Returns:
        int64 array of this rank's ``len(range(rank, num_items, world_size))`` distinct item
        indices.

    Raises:
        ValueError: With fewer items than ranks (a rank would have none).
    """
    if num_items < world_size:
        raise ValueError(
            f"{num_items} training items cannot give {world_size} workers one item each"
        )
    if not shuffle:
        return np.arange(rank, num_items, world_size, dtype=np.int64)
    deal = np.random.default_rng([seed, 0x5EED]).permutation(num_items)
    part = deal[rank::world_size].astype(np.int64)
    return np.random.default_rng([seed, 0x5EED, pass_index, rank]).permutation(part)


def smallest_shard(num_items: int, world_size: int) -> int:
    """The size of the smallest rank's part (what sizes ``cache_num`` on every rank)."""
    return num_items // world_size


class RankWalk:
    """One rank's endless walk through passes over its part of the items (:func:`rank_shard`):
    ``walk[position]`` is an item index. Only the current and the previous pass are kept.

    Raises:
        ValueError: With fewer items than ranks (a rank would have none).
    """

    def __init__(self, num_items: int, seed: int, rank: int, world_size: int, shuffle: bool):
        self._args = (num_items, seed, rank, world_size, shuffle)
        self.part_size = len(range(rank, num_items, world_size))
        self._passes = {0: rank_shard(num_items, seed, 0, rank, world_size, shuffle)}

    def __getitem__(self, position: int) -> int:
        pass_index, offset = divmod(position, self.part_size)
        if pass_index not in self._passes:
            num_items, seed, rank, world_size, shuffle = self._args
            shard = rank_shard(num_items, seed, pass_index, rank, world_size, shuffle)
            self._passes = {k: v for k, v in self._passes.items() if k >= pass_index - 1}
            self._passes[pass_index] = shard
        return int(self._passes[pass_index][offset])


def _aligned(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` C-contiguous and 64-byte aligned, copying only when it is not."""
    if array.flags.c_contiguous and array.ctypes.data % _ALIGN_BYTES == 0:
        return array
    buffer = np.empty(array.nbytes + _ALIGN_BYTES, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % _ALIGN_BYTES
    out = buffer[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _lower_thread_priority(nice: int) -> None:
    """Raises the calling thread's nice value by ``nice`` (Linux: nice is per thread).

    Replacement threads run at a lower priority than the training and input threads, so that
    preparing replacements takes the CPU time training leaves idle instead of slowing training
    (what is not ready at an epoch boundary is swapped in later). Elsewhere a no-op.
    """
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + nice)
    except OSError as exc:  # e.g. a seccomp profile that forbids it: keep the default priority
        logging.warning("could not lower the replacement thread's priority: %s", exc)


def _replace_count(cache_num: int, replace_rate: float, shard_size: int) -> int:
    if cache_num >= shard_size:
        return 0
    return min(math.ceil(cache_num * replace_rate), shard_size - cache_num)


class SmartCache:
    """Holds the prefix output of ``cache_num`` items and replaces a fraction every epoch.

    Use it as the source of ``tf_medseg.pipeline.build_train_dataset``: each epoch call
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
    ):
        if not items:
            raise ValueError("SmartCache needs at least one item")
        if not 0.0 <= replace_rate <= 1.0:
            raise ValueError(f"replace_rate must be in [0, 1], got {replace_rate}")
        if not 0.0 < cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        if cache_num is not None and cache_num < 1:
            raise ValueError(f"cache_num must be at least 1, got {cache_num}")
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
        # This rank's part, and the smallest part, which sizes the cache the same on every rank.
        self._walk = RankWalk(len(self._items), self.seed, rank, world_size, shuffle)
        self.shard_size = self._walk.part_size
        smallest = smallest_shard(len(self._items), world_size)
        self._num_init_workers = num_init_workers or max(1, cpu_count())
        self._num_replace_workers = num_replace_workers
        self.replace_nice = int(replace_nice)
        self.budget_items = max(1, int(budget_items))

        self._cursor = 0
        self._epoch = 0
        self._cached: collections.deque[tuple[int, CachedItem]] = collections.deque()
        self._pending: collections.deque[tuple[int, futures.Future]] = collections.deque()
        self._precomputed: dict[int, CachedItem] = {}
        self._fill_ids: list[int] | None = None
        self._restored_pending: list[int] = []
        self._filled = False
        self._closed = False
        self._replace_pool: futures.ThreadPoolExecutor | None = None
        self._stats = {"swaps": 0, "late_swaps": 0, "wait_s_total": 0.0, "wait_s_max": 0.0}
        self._fill_s = 0.0
        self.item_bytes: int | None = None
        self.memory_budget_bytes = memory_budget_bytes

        wanted = cache_num if cache_num is not None else max(1, int(smallest * cache_rate))
        wanted = min(wanted, smallest)
        if memory_budget_bytes is not None:
            wanted = self._fit_budget(wanted, explicit=cache_num is not None, agree=agree)
        self.cache_num = wanted
        self.replace_num = _replace_count(self.cache_num, self.replace_rate, self.shard_size)

    # ----------------------------------------------------------------- schedule
    def _stream(self, position: int) -> int:
        """The item index at ``position`` of this rank's endless sequence of passes."""
        return self._walk[position]

    def _next_candidates(self, count: int) -> list[int]:
        """Advances the cursor past ``count`` items that are neither cached nor pending."""
        taken = {i for i, _ in self._cached} | {i for i, _ in self._pending}
        chosen: list[int] = []
        # A full pass holds shard_size distinct items and at most shard_size - 1 are taken, so
        # two passes always suffice; the bound turns a broken invariant into an error.
        for _ in range(2 * self.shard_size + self.cache_num + count):
            if len(chosen) == count:
                break
            index = self._stream(self._cursor)
            self._cursor += 1
            if index not in taken:
                taken.add(index)
                chosen.append(index)
        if len(chosen) != count:
            raise RuntimeError("smart cache schedule found no item outside the cache")
        return chosen

    # ------------------------------------------------------------------ prefix
    def _compute(self, index: int) -> CachedItem:
        item = self._items[index]
        try:
            out = self._prefix(item)
        except Exception as exc:
            raise CachePrefixError(
                f"the deterministic prefix failed on {item_path(item)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return {k: _aligned(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}

    def _measure_items(self) -> list[int]:
        """Applies the prefix to the first ``budget_items`` items of the schedule (in parallel;
        the fill reuses them) and sets ``item_bytes`` to the largest."""
        sample = [self._stream(p) for p in range(min(self.budget_items, self.shard_size))]
        todo = [i for i in sample if i not in self._precomputed]
        workers = max(1, min(self._num_init_workers, len(todo)))
        with futures.ThreadPoolExecutor(workers, thread_name_prefix="smart-cache-measure") as pool:
            for index, item in zip(todo, pool.map(self._compute, todo), strict=True):
                self._precomputed[index] = item
        self.item_bytes = max(1, max(item_nbytes(self._precomputed[i]) for i in sample))
        return sample

    def _fit_budget(self, wanted: int, explicit: bool, agree: Agree | None) -> int:
        """The number of items the memory budget holds (with the replacements in flight),
        sized on the largest of a few measured items and, with ``agree``, the same on every
        worker (each worker's items differ in size; a worker whose budget fails makes all fail,
        instead of leaving the others waiting for it)."""
        largest = max(self._measure_items(), key=lambda i: item_nbytes(self._precomputed[i]))
        budget = int(self.memory_budget_bytes)
        fits = budget // self.item_bytes

        def need(n: int) -> int:
            return n + _replace_count(n, self.replace_rate, self.shard_size)

        best = max((n for n in range(1, wanted + 1) if need(n) <= fits), default=0)
        mine = -1 if explicit and best < wanted else best
        agreed = agree(mine) if agree is not None else mine
        mb = 2**20
        if agreed < 0:
            raise CacheBudgetError(
                f"a smart cache of {wanted} items (+{need(wanted) - wanted} replacements in "
                f"flight) of up to {self.item_bytes / mb:.1f} MB each needs "
                f"{need(wanted) * self.item_bytes / mb:.1f} MB, above the memory budget of "
                f"{budget / mb:.1f} MB"
                + (" (on another worker)" if mine >= 0 else "")
                + ": lower cache_num or raise memory_budget_bytes"
            )
        if agreed == 0:
            raise CacheBudgetError(
                f"the memory budget of {budget / mb:.1f} MB cannot hold one cached item of "
                f"about {self.item_bytes / mb:.1f} MB ({item_path(self._items[largest])})"
                + (" on another worker" if mine > 0 else "")
            )
        return agreed

    def _result(self, index: int, future: futures.Future) -> CachedItem:
        """The worker's output, with its exception re-raised here in the calling thread."""
        try:
            return future.result()
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
                initializer=_lower_thread_priority,
                initargs=(self.replace_nice,),
            )
        return self._replace_pool

    def _schedule(self, indices: Sequence[int]) -> None:
        pool = self._pool()
        for index in indices:
            self._pending.append((index, pool.submit(self._compute, index)))

    def _top_up(self) -> None:
        """Keeps ``replace_num`` replacements in flight."""
        missing = self.replace_num - len(self._pending)
        if missing > 0:
            self._schedule(self._next_candidates(missing))

    # --------------------------------------------------------------- lifecycle
    def fill(self) -> None:
        """Applies the prefix to the initial cache items (once) and starts the replacements.

        Raises:
            CachePrefixError: If the prefix fails on an item; the message names its file.
        """
        if self._closed:
            raise RuntimeError("the smart cache is closed")
        if self._filled:
            return
        start = time.perf_counter()
        if self._fill_ids is None:
            self._fill_ids = [self._stream(p) for p in range(self.cache_num)]
            self._cursor = self.cache_num
        ids = self._fill_ids
        results: dict[int, CachedItem] = {
            i: self._precomputed[i] for i in ids if i in self._precomputed
        }
        todo = [i for i in ids if i not in results]
        bar = tqdm(
            total=len(ids),
            initial=len(results),
            desc=f"smart cache fill (rank {self.rank})",
            unit="item",
            disable=not self.progress,
        )
        with futures.ThreadPoolExecutor(
            min(self._num_init_workers, max(1, len(todo))), thread_name_prefix="smart-cache-fill"
        ) as pool:
            jobs = {pool.submit(self._compute, i): i for i in todo}
            try:
                for job in futures.as_completed(jobs):
                    results[jobs[job]] = job.result()
                    bar.update(1)
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
            finally:
                bar.close()
        self._precomputed.clear()
        self._cached = collections.deque((i, results[i]) for i in ids)
        self._filled = True
        self._fill_s = time.perf_counter() - start
        if self.item_bytes is None:
            self.item_bytes = item_nbytes(self._cached[0][1])
        self._schedule(self._restored_pending)
        self._restored_pending = []
        self._top_up()

    @property
    def epoch(self) -> int:
        """Number of epoch boundaries passed (the epoch now being trained)."""
        return self._epoch

    def epoch_items(self) -> list[tuple[int, CachedItem]]:
        """The cached items for the current epoch, shuffled by ``(seed, epoch, rank)``.

        Returns:
            ``(item_index, cached_item)`` pairs; ``item_index`` indexes the ``items`` given to
            the constructor (the pipeline folds it into the random tail's seeds).
        """
        self.fill()
        entries = list(self._cached)
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0xE90C, self._epoch, self.rank])
            entries = [entries[i] for i in order.permutation(len(entries))]
        return entries

    def peek(self) -> CachedItem:
        """One cached item (the oldest), filling the cache if needed; e.g. for its channels."""
        self.fill()
        return self._cached[0][1]

    def end_epoch(self) -> None:
        """Swaps in the prepared replacements for the oldest items and starts the next ones.

        Without ``wait_for_replacements`` only the replacements already prepared are swapped
        in; the others stay in flight and count as late. The time this call waits is recorded.

        Raises:
            CachePrefixError: If preparing a replacement failed; the message names its file.
        """
        self.fill()
        start = time.perf_counter()
        if self.wait_for_replacements:
            ready = list(self._pending)
            self._pending.clear()
        else:
            ready = [(i, f) for i, f in self._pending if f.done()]
            self._pending = collections.deque((i, f) for i, f in self._pending if not f.done())
            self._stats["late_swaps"] += len(self._pending)
        for index, future in ready:
            result = self._result(index, future)
            self._cached.popleft()
            self._cached.append((index, result))
        waited = time.perf_counter() - start
        self._stats["swaps"] += len(ready)
        self._stats["wait_s_total"] += waited
        self._stats["wait_s_max"] = max(self._stats["wait_s_max"], waited)
        self._epoch += 1
        self._top_up()

    def stats(self) -> dict[str, Any]:
        """Counters for logs and benchmarks.

        Returns:
            Dict with ``epoch``, ``cache_num``, ``replace_num``, ``swaps`` (replacements swapped
            in), ``late_swaps`` (replacements not ready at their boundary, summed over
            boundaries), ``wait_s_total`` / ``wait_s_max`` (training-thread time spent in
            ``end_epoch``), ``in_flight`` / ``ready`` (replacements being prepared / prepared
            now), ``fill_s``, ``cache_bytes`` and ``item_bytes``.
        """
        return {
            "epoch": self._epoch,
            "cache_num": self.cache_num,
            "replace_num": self.replace_num,
            **self._stats,
            "in_flight": len(self._pending),
            "ready": sum(f.done() for _, f in self._pending),
            "fill_s": self._fill_s,
            "cache_bytes": sum(item_nbytes(item) for _, item in self._cached),
            "item_bytes": self.item_bytes,
        }

    def _items_digest(self) -> str:
        """A short digest of the items' case names, in order (a changed split changes it)."""
        names = "\n".join(str(item.get("case", i)) for i, item in enumerate(self._items))
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def cached_indices(self) -> list[int]:
        """Item indices now in the cache, oldest first."""
        return [i for i, _ in self._cached]

    # -------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        """The cache position, JSON-serialisable, for a checkpoint.

        Returns:
            Dict with the epoch, the replacement cursor, the cached and in-flight item indices,
            and the settings that must match on ``restore``.
        """
        if self._filled:
            cached = self.cached_indices()
            pending = [i for i, _ in self._pending]
        else:
            cached = list(self._fill_ids or [self._stream(p) for p in range(self.cache_num)])
            pending = list(self._restored_pending)
        cursor = self._cursor if (self._filled or self._fill_ids) else self.cache_num
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "cursor": cursor,
            "cached": cached,
            "pending": pending,
            "num_items": len(self._items),
            "items": self._items_digest(),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "cache_num": self.cache_num,
            "replace_num": self.replace_num,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Puts the cache at a saved position; the cache refills on next use.

        Items already cached and still wanted are kept; the others are recomputed.

        Args:
            state: A dict from ``state()``.

        Raises:
            ValueError: If the state was saved with different items or settings.
        """
        expected = {
            "version": _STATE_VERSION,
            "num_items": len(self._items),
            "items": self._items_digest(),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "cache_num": self.cache_num,
        }
        changed = [
            f"{key} {state.get(key)!r} -> {mine!r}"
            for key, mine in expected.items()
            if state.get(key) != mine
        ]
        if changed:
            raise ValueError(
                "the checkpoint's smart cache position is for another run ("
                + ", ".join(changed)
                + ")"
            )
        for _, future in self._pending:
            future.cancel()
        keep = {i: item for i, item in self._cached}
        self._precomputed = {i: keep[i] for i in state["cached"] if i in keep}
        self._cached.clear()
        self._pending.clear()
        self._fill_ids = [int(i) for i in state["cached"]]
        self._restored_pending = [int(i) for i in state["pending"]]
        self._cursor = int(state["cursor"])
        self._epoch = int(state["epoch"])
        self._filled = False

    def close(self, wait: bool = True) -> None:
        """Stops the worker threads and frees the cached items.

        Args:
            wait: Wait for replacements already running (queued ones are cancelled).
        """
        self._closed = True
        if self._replace_pool is not None:
            self._replace_pool.shutdown(wait=wait, cancel_futures=True)
            self._replace_pool = None
        self._cached.clear()
        self._pending.clear()
        self._precomputed.clear()

    def __enter__(self) -> SmartCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error a replacement may be stuck on the failing input: do not wait for it.
        self.close(wait=exc_type is None)

    def __len__(self) -> int:
        return self.cache_num
