"""The tf.data input pipeline: source -> random tail as TF ops -> batch -> prefetch.

A *source* hands over the deterministic prefix's outputs (cached items) for one epoch:
:class:`~tf_medseg.cache.SmartCache` (``cache="smart"``, or ``"full"`` with no replacement) or
:class:`UncachedSource` (``"none"``: the prefix runs on every item every epoch, the baseline).
:func:`make_source` builds one from a mode name.

:func:`build_train_dataset` turns a source into a ``tf.data.Dataset`` of training batches. One
element per cached item enters TF through ``from_generator`` (the cache keeps its arrays 64-byte
aligned so TF takes them without a copy) and is repeated ``num_samples`` times by reference; a
``map(num_parallel_calls)`` then draws one patch per repetition with pure TF ops:

* a patch centre from the item's foreground voxel list with probability ``pos_fraction`` (a
  ``tf.Variable`` read inside the map, so the adaptive sampler's updates apply without
  rebuilding), otherwise from the background list; an empty list falls back to the other, and
  two empty lists to a uniform voxel;
* a crop of ``patch_size`` around it, the start clamped so that the patch stays inside the
  volume, zero-padded (label: background) symmetrically where the volume is smaller than the
  patch;
* a flip of each spatial axis with probability 1/2, and an intensity shift drawn uniformly from
  ``[-intensity_shift, intensity_shift]``.

Every draw is a ``tf.random.stateless_*`` op whose seed is folded from (run seed, epoch, rank,
item index, sample index), so batches are bit-identical whatever ``num_parallel_calls`` is.

The training loop takes its batches from a :class:`TrainStream`: one endless tf.data iterator
over all epochs, whose epoch ``e + 1`` is built once the loop has called
``stream.end_epoch()`` (which calls ``source.end_epoch()``: the smart cache swaps in its
replacements and the epoch folded into the seeds advances). A new iterator per epoch (what
iterating :func:`build_train_dataset` once per epoch does) costs 60-100 ms on a small CPU and
drains the pipeline at every boundary; with cached data and short epochs that halved the random
tail's throughput.

Labels come out as int32 class indices (not one-hot): the loss one-hots them on the device,
which moves ``num_classes`` times fewer bytes through the pipeline.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from tf_medseg.cache import (
    CachePrefixError,
    PersistentPrefixCache,
    SmartCache,
    item_path,
    rank_shard,
    smallest_shard,
)

CachedItem = dict[str, Any]
Prefix = Callable[[Mapping[str, Any]], CachedItem]

CACHE_MODES = ("smart", "full", "none")


class Source(Protocol):
    """What the pipeline needs from a source of cached items."""

    rank: int

    @property
    def epoch(self) -> int: ...

    def epoch_items(self) -> Sequence[tuple[int, CachedItem]] | Iterator[tuple[int, CachedItem]]:
        """``(item_index, cached_item)`` pairs of the current epoch."""

    def peek(self) -> CachedItem:
        """One cached item (to read the number of channels)."""

    def end_epoch(self) -> None: ...

    def close(self, wait: bool = True) -> None: ...


class UncachedSource:
    """Applies the prefix to every item of this rank's shard every epoch (the baseline).

    A small thread pool prepares the next items ahead of the consumer, in order, as a plain
    (non-caching) data loader with workers would.

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
        self.shard_size = smallest_shard(len(self._items), world_size)
        self._part_size = len(range(rank, len(self._items), world_size))
        if self.shard_size == 0:
            rank_shard(len(self._items), self.seed, 0, rank, world_size, shuffle)  # the error
        self._passes: dict[int, np.ndarray] = {}
        self._epoch = 0
        self._pool = futures.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="uncached")
        self._num_workers = max(1, num_workers)

    @property
    def epoch(self) -> int:
        """The epoch now being trained."""
        return self._epoch

    def _at(self, position: int) -> int:
        """The item at ``position`` of this rank's endless walk through passes of its part."""
        pass_index, offset = divmod(position, self._part_size)
        if pass_index not in self._passes:
            self._passes = {
                pass_index: rank_shard(
                    len(self._items),
                    self.seed,
                    pass_index,
                    self.rank,
                    self.world_size,
                    self.shuffle,
                ),
                **{k: v for k, v in self._passes.items() if k == pass_index - 1},
            }
        return int(self._passes[pass_index][offset])

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
            self._at(p)
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


def make_source(
    mode: str,
    items: Sequence[Mapping[str, Any]],
    prefix: Prefix,
    *,
    cache_num: int | None = None,
    cache_rate: float = 1.0,
    replace_rate: float = 0.1,
    num_workers: int | None = None,
    num_replace_workers: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    memory_budget_bytes: int | None = None,
    wait_for_replacements: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
    agree=None,
) -> SmartCache | UncachedSource:
    """Builds the source of a cache mode.

    Args:
        mode: ``"smart"`` (gradual replacement), ``"full"`` (every item of the shard cached, no
            replacement) or ``"none"`` (prefix every epoch; the baseline).
        items: Item dicts.
        prefix: The deterministic prefix.
        cache_num: ``smart`` only: items held.
        cache_rate: ``smart`` only: fraction held when ``cache_num`` is not given.
        replace_rate: ``smart`` only: fraction replaced per epoch.
        num_workers: Threads of the initial fill (``none``: of the per-epoch loading).
        num_replace_workers: ``smart`` only: threads preparing replacements.
        shuffle: Shuffle by seed.
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of ranks.
        memory_budget_bytes: ``smart``/``full``: memory the cache may use.
        wait_for_replacements: ``smart`` only: keep the strict schedule.
        cache_dir: Optional on-disk prefix cache.
        progress: Progress bar during the fill.
        agree: ``smart``/``full`` with a memory budget: the workers' collective that makes
            the cache size the same on every worker (see :class:`SmartCache`).

    Returns:
        The source.

    Raises:
        ValueError: On an unknown mode.
    """
    if mode == "none":
        return UncachedSource(
            items, prefix, shuffle, seed, rank, world_size, num_workers or 2, cache_dir
        )
    if mode not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; choose from {CACHE_MODES}")
    full = mode == "full"
    return SmartCache(
        items,
        prefix,
        cache_num=None if full else cache_num,
        cache_rate=1.0 if full else cache_rate,
        replace_rate=0.0 if full else replace_rate,
        num_init_workers=num_workers,
        num_replace_workers=num_replace_workers,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        memory_budget_bytes=memory_budget_bytes,
        wait_for_replacements=wait_for_replacements,
        cache_dir=cache_dir,
        progress=progress,
        agree=agree,
    )


# ---------------------------------------------------------------- random tail (TF ops)
def sample_seed(seed: int, epoch: tf.Tensor, rank: int, index: tf.Tensor, sample: int) -> tf.Tensor:
    """The stateless seed of one patch, folded from run, epoch, rank, item and sample.

    Returns:
        int64 tensor of shape (2,).
    """
    fold = tf.random.experimental.stateless_fold_in
    key = tf.constant([seed, 0x3D3D], tf.int64)
    for value in (epoch, rank, index, sample):
        key = fold(key, tf.cast(value, tf.int64))
    return key


def choose_centre(
    shape: tf.Tensor,
    fg_indices: tf.Tensor,
    bg_indices: tf.Tensor,
    pos_fraction: tf.Tensor | tf.Variable | float,
    seed: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws a patch centre: foreground with probability ``pos_fraction``, else background.

    Args:
        shape: int32 (3,) spatial shape of the volume.
        fg_indices: int32 (Nf, 3) foreground voxels.
        bg_indices: int32 (Nb, 3) background voxels.
        pos_fraction: Probability of a foreground centre, ``pos / (pos + neg)``.
        seed: Stateless seed, shape (2,).

    Returns:
        (centre int32 (3,), from_foreground bool scalar). An empty list falls back to the other;
        two empty lists give a uniform voxel (``from_foreground`` False).
    """
    coin_seed, pick_seed, voxel_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    num_fg = tf.shape(fg_indices)[0]
    num_bg = tf.shape(bg_indices)[0]
    want_fg = tf.random.stateless_uniform([], coin_seed) < tf.cast(pos_fraction, tf.float32)
    use_fg = (num_fg > 0) & (want_fg | (num_bg == 0))
    pool = tf.cond(use_fg, lambda: fg_indices, lambda: bg_indices)
    size = tf.shape(pool)[0]
    pick = tf.random.stateless_uniform(
        [], pick_seed, minval=0, maxval=tf.maximum(size, 1), dtype=tf.int32
    )
    uniform = tf.random.stateless_uniform(
        [3], voxel_seed, minval=0, maxval=tf.int32.max, dtype=tf.int32
    ) % tf.maximum(shape, 1)
    centre = tf.cond(size > 0, lambda: tf.gather(pool, pick), lambda: uniform)
    return tf.cast(centre, tf.int32), use_fg


def crop_with_padding(
    image: tf.Tensor, label: tf.Tensor, centre: tf.Tensor, patch_size: Sequence[int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crops a patch around ``centre``, clamped inside the volume, padded where it is smaller.

    The patch starts at ``centre - patch_size // 2``, clamped to ``[0, dim - patch]`` per axis;
    along an axis shorter than the patch the whole axis is taken and zero-padded evenly (the
    extra voxel after), label padding being background.

    Args:
        image: (D, H, W, C) volume.
        label: (D, H, W) labels.
        centre: int32 (3,) voxel.
        patch_size: (pd, ph, pw).

    Returns:
        (image patch (pd, ph, pw, C), label patch (pd, ph, pw)).
    """
    patch = tf.constant(patch_size, tf.int32)
    shape = tf.shape(label, out_type=tf.int32)
    size = tf.minimum(shape, patch)
    start = tf.clip_by_value(centre - patch // 2, 0, tf.maximum(shape - patch, 0))
    image_patch = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([size, [-1]], 0))
    label_patch = tf.slice(label, start, size)
    before = (patch - size) // 2
    paddings = tf.stack([before, patch - size - before], axis=1)
    image_patch, label_patch = tf.cond(
        tf.reduce_any(size < patch),
        lambda: (
            tf.pad(image_patch, tf.concat([paddings, [[0, 0]]], 0)),
            tf.pad(label_patch, paddings),
        ),
        lambda: (image_patch, label_patch),
    )
    channels = image.shape[-1]
    image_patch = tf.ensure_shape(image_patch, [*patch_size, channels])
    label_patch = tf.ensure_shape(label_patch, list(patch_size))
    return image_patch, label_patch


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Flips each spatial axis with probability 1/2 (image and label together)."""
    flips = tf.random.stateless_uniform([3], seed) < 0.5
    # One reverse over the drawn axes: a single pass over the patch instead of one per axis.
    axes = tf.boolean_mask(tf.range(3), flips)
    if image.shape[-1] == 1:
        # TensorFlow's CPU reverse is about 6x slower on (D, H, W, 1) than on the same voxels
        # as (D, H, W) (1.9 vs 0.3 ms for a 96^3 patch here), so a single channel is reversed
        # as a 3D view (reshapes do not copy).
        flipped = tf.reverse(tf.squeeze(image, -1), axes)
        return tf.expand_dims(flipped, -1), tf.reverse(label, axes)
    return tf.reverse(image, axes), tf.reverse(label, axes)


def random_intensity_shift(image: tf.Tensor, max_shift: float, seed: tf.Tensor) -> tf.Tensor:
    """Adds one offset drawn uniformly from ``[-max_shift, max_shift]`` to the whole patch."""
    offset = tf.random.stateless_uniform([], seed, -max_shift, max_shift)
    return image + offset


def sample_patch(
    image: tf.Tensor,
    label: tf.Tensor,
    fg_indices: tf.Tensor,
    bg_indices: tf.Tensor,
    pos_fraction: tf.Tensor | tf.Variable | float,
    seed: tf.Tensor,
    patch_size: Sequence[int],
    flip: bool = True,
    intensity_shift: float = 0.1,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The random tail for one patch: centre, crop (with padding), flips, intensity shift.

    Returns:
        (image patch float32 (pd, ph, pw, C), label patch int32 (pd, ph, pw)).
    """
    centre_seed, flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(label, out_type=tf.int32)
    centre, _ = choose_centre(shape, fg_indices, bg_indices, pos_fraction, centre_seed)
    image_patch, label_patch = crop_with_padding(image, label, centre, patch_size)
    if flip:
        image_patch, label_patch = random_flip(image_patch, label_patch, flip_seed)
    if intensity_shift:
        image_patch = random_intensity_shift(image_patch, intensity_shift, shift_seed)
    return image_patch, tf.cast(label_patch, tf.int32)


# ------------------------------------------------------------------------- datasets
def _num_channels(source: Source, num_channels: int | None) -> int:
    if num_channels is not None:
        return int(num_channels)
    return int(source.peek()["image"].shape[-1])


def _item_signature(channels: int) -> tuple[tf.TensorSpec, ...]:
    """The signature of one cached item entering TF (see :func:`_item_elements`)."""
    return (
        tf.TensorSpec([None, None, None, channels], tf.float32),
        tf.TensorSpec([None, None, None], tf.uint8),
        tf.TensorSpec([None, 3], tf.int32),
        tf.TensorSpec([None, 3], tf.int32),
        tf.TensorSpec([], tf.int64),
        tf.TensorSpec([], tf.int64),
    )


def _item_elements(source: Source, epoch: int) -> Iterator[tuple]:
    """One epoch of the source's items as ``(image, label, fg, bg, epoch, index)`` arrays."""
    for index, item in source.epoch_items():
        if "label" not in item:
            raise ValueError(f"training item {item.get('case')} has no label")
        yield (
            np.asarray(item["image"], np.float32),
            np.asarray(item["label"], np.uint8),
            np.asarray(item["fg_indices"], np.int32),
            np.asarray(item["bg_indices"], np.int32),
            np.int64(epoch),
            np.int64(index),
        )


def _check_train_args(
    patch_size: Sequence[int], num_samples: int, batch_size: int
) -> tuple[int, int, int]:
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three positive sizes, got {patch_size}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be at least 1")
    return tuple(int(p) for p in patch_size)


def _patch_batches(
    items: tf.data.Dataset,
    *,
    rank: int,
    batch_size: int,
    patch_size: tuple[int, int, int],
    num_samples: int,
    pos_fraction: tf.Variable | float,
    seed: int,
    flip: bool,
    intensity_shift: float,
    num_parallel_calls: int,
    drop_remainder: bool,
    with_epoch: bool = False,
) -> tf.data.Dataset:
    """Items -> ``num_samples`` random patches each (the random tail) -> batches."""

    def samples(*element):
        # One element per (item, sample) that shares the item's tensors (no copy), so the map
        # below parallelises over patches and its graph holds the random tail once.
        repeated = tf.data.Dataset.from_tensors(element).repeat(num_samples)
        return tf.data.Dataset.zip((repeated, tf.data.Dataset.range(num_samples)))

    def patch(element, sample):
        image, label, fg_indices, bg_indices, epoch, index = element
        image_patch, label_patch = sample_patch(
            image,
            label,
            fg_indices,
            bg_indices,
            pos_fraction,
            sample_seed(seed, epoch, rank, index, sample),
            patch_size,
            flip,
            intensity_shift,
        )
        return (image_patch, label_patch, epoch) if with_epoch else (image_patch, label_patch)

    dataset = items.flat_map(samples)
    dataset = dataset.map(patch, num_parallel_calls=num_parallel_calls, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


def _deterministic() -> tf.data.Options:
    """Deterministic order; no autotuning thread.

    tf.data's autotuning runs a model thread that an iterator's destructor must join; in the
    middle of an optimisation pass (measured: during training with validation every epoch,
    after about 20 epochs) that took up to 10 s on this project's 2-core CPU, so a run stopped
    by Ctrl-C hung that long in ``TrainStream.close``. Without it, ``AUTOTUNE`` parallelism is
    the number of CPUs and prefetch buffers grow by tf.data's own rule; the demo preset's steady
    rate was not lower (13.3 and 13.4 against 9.8 and 12.9 patches/s with it, two runs each).
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def build_train_dataset(
    source: Source,
    batch_size: int,
    patch_size: Sequence[int],
    num_samples: int,
    pos_fraction: tf.Variable | float,
    seed: int,
    flip: bool = True,
    intensity_shift: float = 0.1,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    num_channels: int | None = None,
    drop_remainder: bool = False,
    prefetch: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """One epoch's training dataset: ``num_samples`` random patches per cached item, batched.

    Iterate it once per epoch and call ``source.end_epoch()`` between epochs. Every pass
    creates a tf.data iterator and drains the pipeline at its end; a training loop should use
    :class:`TrainStream`, which gives the same batches from one iterator.

    Args:
        source: A :class:`SmartCache` or :class:`UncachedSource` (see :func:`make_source`).
        batch_size: Patches per batch (paper: 6 of 112^3).
        patch_size: (pd, ph, pw) patch shape in voxels.
        num_samples: Patches drawn from each item per epoch.
        pos_fraction: Probability of a foreground-centred patch, ``pos / (pos + neg)``; pass
            the adaptive sampler's ``tf.Variable`` so updates apply without rebuilding.
        seed: Run seed of the random tail.
        flip: Random flips of the three spatial axes.
        intensity_shift: Maximum absolute intensity offset (0 turns it off).
        num_parallel_calls: Parallelism of the random tail's map.
        num_channels: Image channels; read from one cached item when not given.
        drop_remainder: Drop the last incomplete batch of an epoch.
        prefetch: Batches prepared ahead.

    Returns:
        Dataset of ``(image float32 (B, pd, ph, pw, C), label int32 (B, pd, ph, pw))``.
    """
    patch_size = _check_train_args(patch_size, num_samples, batch_size)
    channels = _num_channels(source, num_channels)

    def generate():
        yield from _item_elements(source, source.epoch)

    items = tf.data.Dataset.from_generator(generate, output_signature=_item_signature(channels))
    dataset = _patch_batches(
        items,
        rank=int(getattr(source, "rank", 0)),
        batch_size=batch_size,
        patch_size=patch_size,
        num_samples=num_samples,
        pos_fraction=pos_fraction,
        seed=seed,
        flip=flip,
        intensity_shift=intensity_shift,
        num_parallel_calls=num_parallel_calls,
        drop_remainder=drop_remainder,
    )
    return dataset.prefetch(prefetch).with_options(_deterministic())


class TrainStream:
    """Every epoch's training batches from one tf.data iterator.

    The batches are those of :func:`build_train_dataset` (same seeds, same order), without its
    two costs at every epoch boundary: creating an iterator (60-100 ms on a 2-core CPU, where
    its functions are instantiated) and draining the pipeline. The dataset is endless: an outer
    generator hands out epoch numbers and each epoch's batches are built inside a
    ``flat_map``. Epoch ``e + 1`` is built as soon as ``end_epoch()`` has been called for epoch
    ``e`` (the smart cache's contents for ``e + 1`` are known only then); the prefetched last
    batches of ``e`` are still being consumed while its first patches are cut.

    Use::

        with TrainStream(source, ...) as stream:
            for _ in range(epochs):
                for images, labels in stream.epoch():
                    ...
                stream.end_epoch()

    An epoch left early is allowed: ``end_epoch()`` then drops the iterator and the next epoch
    starts a fresh one, so every epoch still yields its own batches from the first.

    Args:
        source: A source (see :func:`make_source`); :meth:`end_epoch` calls its ``end_epoch()``.
        batch_size: Patches per batch.
        patch_size: (pd, ph, pw) patch shape in voxels.
        num_samples: Patches drawn from each item per epoch.
        pos_fraction: Probability of a foreground-centred patch (a ``tf.Variable`` to adapt).
        seed: Run seed of the random tail.
        flip: Random flips of the three spatial axes.
        intensity_shift: Maximum absolute intensity offset (0 turns it off).
        num_parallel_calls: Parallelism of the random tail's map.
        num_channels: Image channels; read from one cached item when not given.
        drop_remainder: Drop the last incomplete batch of each epoch.
        prefetch: Batches prepared ahead.

    Raises:
        ValueError: On bad sizes, or an epoch holding no full batch with ``drop_remainder``.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        patch_size: Sequence[int],
        num_samples: int,
        pos_fraction: tf.Variable | float,
        seed: int,
        flip: bool = True,
        intensity_shift: float = 0.1,
        num_parallel_calls: int = tf.data.AUTOTUNE,
        num_channels: int | None = None,
        drop_remainder: bool = False,
        prefetch: int = tf.data.AUTOTUNE,
    ):
        patch_size = _check_train_args(patch_size, num_samples, batch_size)
        channels = _num_channels(source, num_channels)
        self.source = source
        self.patches_per_epoch = patches = patches_per_epoch(source, num_samples)
        self.steps_per_epoch = (
            patches // batch_size if drop_remainder else math.ceil(patches / batch_size)
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch of {patches} patches holds no full batch of {batch_size} "
                "with drop_remainder"
            )
        self._changed = threading.Condition()
        self._generation = 0
        self._released = source.epoch  # the newest epoch whose batches may be cut
        self._closed = False
        self._iterator: Iterator | None = None
        self._position = 0  # batches of the current epoch taken from the iterator
        signature = _item_signature(channels)
        rank = int(getattr(source, "rank", 0))

        def tickets(generation):
            # The epochs to build, each once the consumer has ended the one before. A stale
            # generator (closed stream, or an iterator dropped mid-epoch) returns within 0.1 s.
            epoch = self.source.epoch
            while True:
                with self._changed:
                    while not self._stale(generation) and self._released < epoch:
                        self._changed.wait(timeout=0.1)
                if self._stale(generation):
                    return
                yield np.int64(epoch)
                epoch += 1

        def epoch_items(epoch):
            yield from _item_elements(self.source, int(epoch))

        def epoch_batches(epoch):
            items = tf.data.Dataset.from_generator(
                epoch_items, args=(epoch,), output_signature=signature
            )
            return _patch_batches(
                items,
                rank=rank,
                batch_size=batch_size,
                patch_size=patch_size,
                num_samples=num_samples,
                pos_fraction=pos_fraction,
                seed=seed,
                flip=flip,
                intensity_shift=intensity_shift,
                num_parallel_calls=num_parallel_calls,
                drop_remainder=drop_remainder,
                with_epoch=True,
            )

        def dataset_of(generation: int) -> tf.data.Dataset:
            epochs = tf.data.Dataset.from_generator(
                tickets, args=(generation,), output_signature=tf.TensorSpec([], tf.int64)
            )
            dataset = epochs.flat_map(epoch_batches).prefetch(prefetch)
            return dataset.with_options(_deterministic())

        self._dataset_of = dataset_of

    def _stale(self, generation) -> bool:
        return self._closed or int(generation) != self._generation

    def _restart(self) -> None:
        """Drops the iterator (its ticket generator returns); the next epoch makes a new one."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
        self._iterator = None
        self._position = 0

    def epoch(self) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        """The current epoch's remaining ``(images, labels)`` batches."""
        if self._closed:
            raise RuntimeError("the train stream is closed")
        if self._iterator is None:
            self._released = self.source.epoch
            self._iterator = iter(self._dataset_of(self._generation))
        while self._position < self.steps_per_epoch:
            images, labels, epochs = next(self._iterator)
            self._position += 1
            if int(epochs[0]) != self.source.epoch:
                raise RuntimeError(
                    f"a batch of epoch {int(epochs[0])} in epoch {self.source.epoch}: the "
                    "source's epoch was changed without TrainStream.end_epoch()"
                )
            yield images, labels

    def end_epoch(self, start_next: bool = True) -> None:
        """Ends the epoch: ``source.end_epoch()`` (the smart cache's swap).

        Args:
            start_next: Let the next epoch's patches be cut now, overlapping whatever the
                caller does before it asks for them. ``False`` holds them until
                :meth:`start_next_epoch`: after a validation that changes the sampling
                fraction, so that every patch of the next epoch is drawn with the new one.
        """
        complete = self._iterator is not None and self._position == self.steps_per_epoch
        self.source.end_epoch()
        if complete:
            self._position = 0
        else:
            self._restart()
        if start_next:
            self.start_next_epoch()

    def start_next_epoch(self) -> None:
        """Lets the batches of the source's current epoch be cut (see :meth:`end_epoch`)."""
        with self._changed:
            self._released = self.source.epoch
            self._changed.notify_all()

    def close(self) -> None:
        """Stops the stream's generators and drops its iterator (the source stays open)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._iterator = None

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def build_eval_dataset(
    source: Source, num_channels: int | None = None, prefetch: int = 1
) -> tf.data.Dataset:
    """Whole preprocessed volumes with their labels, for validation.

    Iterates one epoch of ``source`` (use a ``"full"`` source: the paper caches the whole
    validation set) in item order, so validation is the same every time.

    Args:
        source: A source (see :func:`make_source`).
        num_channels: Image channels; read from one cached item when not given.
        prefetch: Volumes prepared ahead.

    Returns:
        Dataset of dicts ``{"case": string, "image": float32 (D, H, W, C),
        "label": int32 (D, H, W)}``, one per volume (unbatched: volumes differ in shape).
    """
    channels = _num_channels(source, num_channels)

    def generate():
        entries = source.epoch_items()
        if isinstance(entries, list):
            entries = sorted(entries, key=lambda entry: entry[0])
        for _, item in entries:
            if "label" not in item:
                raise ValueError(f"validation item {item.get('case')} has no label")
            yield {
                "case": item["case"],
                "image": np.asarray(item["image"], np.float32),
                "label": np.asarray(item["label"], np.uint8),
            }

    signature = {
        "case": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, None, channels], tf.float32),
        "label": tf.TensorSpec([None, None, None], tf.uint8),
    }
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.map(lambda e: {**e, "label": tf.cast(e["label"], tf.int32)})
    return dataset.prefetch(prefetch)


def patches_per_epoch(source: SmartCache | UncachedSource, num_samples: int) -> int:
    """Patches one epoch yields: the cached (or shard's) items times ``num_samples``."""
    if isinstance(source, SmartCache):
        return source.cache_num * num_samples
    return source.shard_size * num_samples
