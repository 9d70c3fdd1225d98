"""The smart cache's schedule: which items it holds and prepares, in which order, epoch by epoch.

Everything here is a pure function of the seed and the settings, over item indices (ids): no
threads, no prefix, no arrays of items. :class:`~tf_medseg.cache.SmartCache` applies the prefix
to the ids this schedule names and holds the results.

With ``world_size > 1`` each rank walks its own part of the items (:func:`rank_shard`), dealt
once by seed: the ranks never hold the same item, in any epoch (a re-deal per pass would let two
ranks hold one item while their caches straddle the change of pass). The parts differ in size by
at most one item; every rank holds the same ``cache_num`` (sized on the smallest part,
:func:`smallest_shard`), so every rank takes the same number of steps per epoch.

A rank's cache holds ``cache_num`` ids, oldest first. ``replace_num`` more are *pending* (being
prepared); the cursor walks the rank's passes (:class:`RankWalk`) to pick them, skipping the ids
already cached or pending. At an epoch boundary the pending ids that are ready replace the
oldest cached ones (:meth:`CacheSchedule.swap`). ``state()`` / ``restore()`` carry the position
across a checkpoint as JSON.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 2  # 2: fixed per-rank parts (1 re-dealt the items on every pass)


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


def replace_count(cache_num: int, replace_rate: float, shard_size: int) -> int:
    """Replacements per epoch: ``ceil(cache_num * replace_rate)``, none when the cache holds the
    whole part, and never more than the items outside the cache."""
    if cache_num >= shard_size:
        return 0
    return min(math.ceil(cache_num * replace_rate), shard_size - cache_num)


class RankWalk:
    """One rank's endless walk through passes over its part of the items (:func:`rank_shard`):
    ``walk[position]`` is an item index. Only the current and the previous pass are kept.

    Args:
        num_items: Number of items in the whole list.
        seed: Run seed.
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks.
        shuffle: Whether to permute the items (the deal and each pass).

    Raises:
        ValueError: With fewer items than ranks (a rank would have none).
    """

    def __init__(self, num_items: int, seed: int, rank: int, world_size: int, shuffle: bool):
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.part_size = len(range(rank, num_items, world_size))
        self._passes = {0: rank_shard(num_items, seed, 0, rank, world_size, shuffle)}

    def __getitem__(self, position: int) -> int:
        pass_index, offset = divmod(position, self.part_size)
        if pass_index not in self._passes:
            shard = rank_shard(
                self.num_items, self.seed, pass_index, self.rank, self.world_size, self.shuffle
            )
            self._passes = {k: v for k, v in self._passes.items() if k >= pass_index - 1}
            self._passes[pass_index] = shard
        return int(self._passes[pass_index][offset])

    def head(self, count: int) -> list[int]:
        """The first ``count`` item indices of the walk (at most one pass)."""
        return [self[p] for p in range(min(count, self.part_size))]


def _digest(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


class CacheSchedule:
    """The ids one rank's smart cache holds and prepares, and its position in the walk.

    A fresh schedule holds the first ``cache_num`` ids of the walk (:meth:`initial_ids`), with
    none pending and the cursor just past them. Each epoch: :meth:`top_up` names the ids to
    prepare, :meth:`epoch_order` the order to train on the cached ones, :meth:`swap` the ready
    ones in (evicting the oldest), and :meth:`advance_epoch` moves to the next epoch. No id is
    ever both cached and pending.

    Args:
        walk: This rank's walk through its part of the items.
        cache_num: Ids held, in ``[1, walk.part_size]``.
        replace_num: Ids prepared per epoch (see :func:`replace_count`).
        names: The name of every item (its case), in order: a changed list of items changes
            the digest that :meth:`restore` checks.

    Raises:
        ValueError: On a size out of range, or names that do not match the walk's items.
    """

    def __init__(self, walk: RankWalk, cache_num: int, replace_num: int, names: Sequence[str]):
        if not 1 <= cache_num <= walk.part_size:
            raise ValueError(f"cache_num must be in [1, {walk.part_size}], got {cache_num}")
        if not 0 <= replace_num <= walk.part_size - cache_num:
            raise ValueError(
                f"replace_num must be in [0, {walk.part_size - cache_num}], got {replace_num}"
            )
        if len(names) != walk.num_items:
            raise ValueError(f"{len(names)} item names for a walk over {walk.num_items} items")
        self.walk = walk
        self.cache_num = cache_num
        self.replace_num = replace_num
        self.items_digest = _digest(names)
        self._cursor = cache_num
        self._epoch = 0
        self._cached = collections.deque(self.initial_ids())
        self._pending: list[int] = []

    @property
    def epoch(self) -> int:
        """Number of epoch boundaries passed."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """The walk position the next candidate is read from."""
        return self._cursor

    @property
    def cached(self) -> tuple[int, ...]:
        """The ids held, oldest first."""
        return tuple(self._cached)

    @property
    def pending(self) -> tuple[int, ...]:
        """The ids being prepared, in the order they were named."""
        return tuple(self._pending)

    def initial_ids(self) -> list[int]:
        """The ids a fresh schedule holds: the first ``cache_num`` of the walk."""
        return self.walk.head(self.cache_num)

    def next_candidates(self, count: int) -> list[int]:
        """Advances the cursor past ``count`` ids that are neither cached nor pending, and marks
        them pending.

        Returns:
            The ids, in walk order.

        Raises:
            RuntimeError: If the walk holds no such ids (a broken invariant).
        """
        taken = set(self._cached) | set(self._pending)
        chosen: list[int] = []
        # A full pass holds part_size distinct ids and at most part_size - 1 are taken, so two
        # passes always suffice; the bound turns a broken invariant into an error.
        for _ in range(2 * self.walk.part_size + self.cache_num + count):
            if len(chosen) == count:
                break
            index = self.walk[self._cursor]
            self._cursor += 1
            if index not in taken:
                taken.add(index)
                chosen.append(index)
        if len(chosen) != count:
            raise RuntimeError("smart cache schedule found no item outside the cache")
        self._pending.extend(chosen)
        return chosen

    def top_up(self) -> list[int]:
        """Names new ids to prepare until ``replace_num`` are pending.

        Returns:
            The newly pending ids (none when enough are pending already).
        """
        missing = self.replace_num - len(self._pending)
        return self.next_candidates(missing) if missing > 0 else []

    def swap(self, ready_ids: Iterable[int]) -> list[int]:
        """Moves the ready pending ids into the cache, each evicting the oldest cached id.

        Args:
            ready_ids: Pending ids now prepared; they enter in the order they became pending.

        Returns:
            The evicted ids, in eviction order.

        Raises:
            ValueError: If an id is not pending.
        """
        ready = set(ready_ids)
        if not ready <= set(self._pending):
            raise ValueError(f"ids {sorted(ready - set(self._pending))} are not pending")
        entering = [i for i in self._pending if i in ready]
        self._pending = [i for i in self._pending if i not in ready]
        evicted = []
        for index in entering:
            evicted.append(self._cached.popleft())
            self._cached.append(index)
        return evicted

    def advance_epoch(self) -> None:
        """Moves to the next epoch."""
        self._epoch += 1

    def epoch_order(self) -> list[int]:
        """The cached ids in this epoch's training order, shuffled by ``(seed, epoch, rank)``
        (oldest first without shuffling)."""
        ids = list(self._cached)
        if not self.walk.shuffle:
            return ids
        order = np.random.default_rng([self.walk.seed, 0xE90C, self._epoch, self.walk.rank])
        return [ids[i] for i in order.permutation(len(ids))]

    def _identity(self) -> dict[str, Any]:
        """The settings a saved position must match, in the order a mismatch names them."""
        return {
            "version": STATE_VERSION,
            "num_items": self.walk.num_items,
            "items": self.items_digest,
            "seed": self.walk.seed,
            "rank": self.walk.rank,
            "world_size": self.walk.world_size,
            "cache_num": self.cache_num,
        }

    def state(self) -> dict[str, Any]:
        """The position, JSON-serialisable, for a checkpoint.

        Returns:
            Dict with the epoch, the cursor, the cached and pending ids, and the settings that
            must match on ``restore``.
        """
        identity = self._identity()
        return {
            "version": identity.pop("version"),
            "epoch": self._epoch,
            "cursor": self._cursor,
            "cached": list(self._cached),
            "pending": list(self._pending),
            **identity,
            "replace_num": self.replace_num,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Puts the schedule at a saved position.

        Args:
            state: A dict from ``state()``.

        Raises:
            ValueError: If the state was saved with different items or settings; the one-line
                message names each change (``key saved -> now``). The schedule is then unchanged.
        """
        changed = [
            f"{key} {state.get(key)!r} -> {mine!r}"
            for key, mine in self._identity().items()
            if state.get(key) != mine
        ]
        if changed:
            raise ValueError(
                "the checkpoint's smart cache position is for another run ("
                + ", ".join(changed)
                + ")"
            )
        self._cached = collections.deque(int(i) for i in state["cached"])
        self._pending = [int(i) for i in state["pending"]]
        self._cursor = int(state["cursor"])
        self._epoch = int(state["epoch"])
