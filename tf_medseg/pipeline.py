"""The tf.data input pipeline: source -> random tail as TF ops -> batch -> prefetch.

A *source* (:mod:`tf_medseg.cache.sources`) hands over the deterministic prefix's outputs
(cached items) for one epoch: :class:`~tf_medseg.cache.SmartCache` (``cache="smart"``, or
``"full"`` with no replacement) or ``UncachedSource`` (``"none"``: the prefix runs on every
item every epoch, the baseline). The random tail's TF ops are in
:mod:`tf_medseg.transforms.random`.

:class:`TrainStream` turns a source into a stream of training batches. One
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
replacements and the epoch folded into the seeds advances). A new iterator per epoch costs tens
of milliseconds on a small CPU and drains the pipeline at every boundary; with cached data and
short epochs that halved the random tail's throughput.

Labels come out as uint8 class indices (not one-hot, not int32): the train step one-hots them
on the device, which moves ``4 * num_classes`` times fewer label bytes through the pipeline and
to a GPU. On a GPU machine :class:`TrainStream` prefetches the batches to the GPU
(``prefetch_device``), so the copy overlaps the previous step.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from tf_medseg.cache.sources import Source, patches_per_epoch
from tf_medseg.transforms.random import sample_patch, sample_seed


@dataclasses.dataclass(frozen=True)
class TailOptions:
    """How patches are cut from the cached items and batched: the random tail's settings.

    Args:
        batch_size: Patches per batch (paper: 6 of 112^3).
        patch_size: (pd, ph, pw) patch shape in voxels.
        num_samples: Patches drawn from each item per epoch.
        seed: Run seed of the random tail.
        flip: Random flips of the three spatial axes.
        intensity_shift: Maximum absolute intensity offset (0 turns it off).
        num_parallel_calls: Parallelism of the random tail's map.
        drop_remainder: Drop the last incomplete batch of each epoch.
        prefetch: Batches prepared ahead.
        prefetch_device: A device (``/gpu:0``) the batches are copied to ahead of the step
            (``tf.data.experimental.prefetch_to_device``; :class:`TrainStream` only); None keeps
            them on the host.
        balance_classes: Draw a foreground centre's class uniformly among the classes the
            item has, then a voxel of it (else a voxel of the pooled foreground).

    Raises:
        ValueError: On a patch size that is not three positive sizes, or a batch size or
            sample count below 1.
    """

    batch_size: int
    patch_size: tuple[int, int, int]
    num_samples: int
    seed: int = 0
    flip: bool = True
    intensity_shift: float = 0.1
    num_parallel_calls: int = tf.data.AUTOTUNE
    drop_remainder: bool = False
    prefetch: int = tf.data.AUTOTUNE
    prefetch_device: str | None = None
    balance_classes: bool = False

    def __post_init__(self):
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes, got {self.patch_size}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be at least 1")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    def steps(self, patches: int) -> int:
        """Batches of an epoch of ``patches`` patches."""
        if self.drop_remainder:
            return patches // self.batch_size
        return math.ceil(patches / self.batch_size)


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
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.int64),
        tf.TensorSpec([], tf.int64),
    )


def _item_elements(source: Source, epoch: int) -> Iterator[tuple]:
    """One epoch of the source's items as ``(image, label, fg, bg, fg_counts, epoch, index)``
    arrays (``fg_counts`` as :class:`~tf_medseg.transforms.indices.ForegroundIndices` stores
    it; :func:`foreground_counts` for items without it)."""
    for index, item in source.epoch_items():
        if "label" not in item:
            raise ValueError(f"training item {item.get('case')} has no label")
        fg = np.asarray(item["fg_indices"], np.int32)
        counts = item.get("fg_counts")
        counts = foreground_counts(item["label"], fg) if counts is None else counts
        yield (
            np.asarray(item["image"], np.float32),
            np.asarray(item["label"], np.uint8),
            fg,
            np.asarray(item["bg_indices"], np.int32),
            np.asarray(counts, np.int32),
            np.int64(epoch),
            np.int64(index),
        )


def foreground_counts(label: np.ndarray, fg_indices: np.ndarray) -> np.ndarray:
    """The rows of each class in a foreground list that holds its classes one after the other;
    one entry (the pooled draw) when the classes are mixed. For items made without
    ``fg_counts`` (by hand, or cached before it was stored)."""
    classes = np.asarray(label)[tuple(np.asarray(fg_indices).T)] if len(fg_indices) else []
    classes = np.asarray(classes, np.int64)
    if classes.size and np.all(np.diff(classes) >= 0):
        return np.bincount(classes)[np.unique(classes)].astype(np.int32)
    return np.array([classes.size], np.int32)


def _patch_batches(
    items: tf.data.Dataset,
    options: TailOptions,
    pos_fraction: tf.Variable | float,
    rank: int,
    skip_patches: int | tf.Tensor = 0,
    with_epoch: bool = False,
) -> tf.data.Dataset:
    """Items -> ``num_samples`` random patches each (the random tail) -> batches.

    The first ``skip_patches`` patches are left out before any is cut (a resumed epoch; their
    seeds, which depend on the item and sample only, are not drawn), so the batches that follow
    are those of the whole epoch from the same position on.
    """
    num_samples = options.num_samples

    def samples(*element):
        # One element per (item, sample) that shares the item's tensors (no copy), so the map
        # below parallelises over patches and its graph holds the random tail once.
        repeated = tf.data.Dataset.from_tensors(element).repeat(num_samples)
        return tf.data.Dataset.zip((repeated, tf.data.Dataset.range(num_samples)))

    def patch(element, sample):
        image, label, fg_indices, bg_indices, fg_counts, epoch, index = element
        image_patch, label_patch = sample_patch(
            image,
            label,
            fg_indices,
            bg_indices,
            pos_fraction,
            sample_seed(options.seed, epoch, rank, index, sample),
            options.patch_size,
            options.flip,
            options.intensity_shift,
            fg_counts if options.balance_classes else None,
        )
        return (image_patch, label_patch, epoch) if with_epoch else (image_patch, label_patch)

    dataset = items.flat_map(samples).skip(tf.cast(skip_patches, tf.int64))
    dataset = dataset.map(patch, num_parallel_calls=options.num_parallel_calls, deterministic=True)
    return dataset.batch(options.batch_size, drop_remainder=options.drop_remainder)


def _deterministic() -> tf.data.Options:
    """Deterministic order; no autotuning thread.

    tf.data's autotuning runs a model thread that an iterator's destructor must join; in the
    middle of an optimisation pass that can take seconds on a small CPU, so a run stopped by
    Ctrl-C would hang that long in ``TrainStream.close``. Without it, ``AUTOTUNE`` parallelism
    is the number of CPUs and prefetch buffers grow by tf.data's own rule, at no lower steady
    rate on the demo preset.
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


class TrainStream:
    """Every epoch's training batches from one tf.data iterator.

    The batches are those of one tf.data pass per epoch (same seeds, same order; the tests'
    reference), without its two costs at every epoch boundary: creating an iterator (tens of
    milliseconds on a small CPU, where its functions are instantiated) and draining the pipeline.
    The dataset is endless: an outer generator hands out epoch numbers and each epoch's batches are
    built inside a ``flat_map``. Epoch ``e + 1`` is built as soon as ``end_epoch()`` has been called
    for epoch ``e`` (the smart cache's contents for ``e + 1`` are known only then); the prefetched
    last batches of ``e`` are still being consumed while its first patches are cut.

    Use::

        with TrainStream(source, TailOptions(2, (96, 96, 96), 4), sampler_fraction) as stream:
            for _ in range(epochs):
                for images, labels in stream.epoch():
                    ...
                stream.end_epoch()

    An epoch left early is allowed: ``end_epoch()`` then drops the iterator and the next epoch
    starts a fresh one, so every epoch still yields its own batches from the first. A resumed
    run starts in the middle of an epoch with :meth:`resume_at`.

    Args:
        source: A source (see :func:`make_source`); :meth:`end_epoch` calls its ``end_epoch()``.
        options: The random tail's and the batching's settings (with ``prefetch_device``).
        pos_fraction: Probability of a foreground-centred patch (a ``tf.Variable`` to adapt).
        num_channels: Image channels; read from one cached item when not given.

    Raises:
        ValueError: On an epoch holding no full batch with ``drop_remainder``.
    """

    def __init__(
        self,
        source: Source,
        options: TailOptions,
        pos_fraction: tf.Variable | float,
        num_channels: int | None = None,
    ):
        channels = _num_channels(source, num_channels)
        self.source = source
        self.options = options
        self.patches_per_epoch = patches = patches_per_epoch(source, options.num_samples)
        self.steps_per_epoch = options.steps(patches)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch of {patches} patches holds no full batch of {options.batch_size} "
                "with drop_remainder"
            )
        self._changed = threading.Condition()
        self._generation = 0
        self._released = source.epoch  # the newest epoch whose batches may be cut
        self._closed = False
        self._iterator: Iterator | None = None
        self._position = 0  # batches of the current epoch taken (or skipped on resume)
        signature = _item_signature(channels)
        rank = int(source.rank)

        def tickets(generation, first_epoch, skip_batches):
            # (epoch, patches to skip) of the epochs to build, each once the consumer has ended
            # the one before; only the first may skip. A stale generator (closed stream, or an
            # iterator dropped mid-epoch) returns within 0.1 s.
            epoch, skip = int(first_epoch), int(skip_batches)
            while True:
                with self._changed:
                    while not self._stale(generation) and self._released < epoch:
                        self._changed.wait(timeout=0.1)
                if self._stale(generation):
                    return
                yield np.int64(epoch), np.int64(skip * options.batch_size)
                epoch, skip = epoch + 1, 0

        def epoch_items(epoch):
            yield from _item_elements(self.source, int(epoch))

        def epoch_batches(epoch, skip_patches):
            items = tf.data.Dataset.from_generator(
                epoch_items, args=(epoch,), output_signature=signature
            )
            return _patch_batches(items, options, pos_fraction, rank, skip_patches, True)

        def dataset_of(generation: int, skip_batches: int = 0) -> tf.data.Dataset:
            # The first epoch is the source's now, not when the generator first runs (lazily,
            # at the first batch asked for).
            epochs = tf.data.Dataset.from_generator(
                tickets,
                args=(generation, self.source.epoch, skip_batches),
                output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)),
            )
            dataset = epochs.flat_map(epoch_batches).prefetch(options.prefetch)
            dataset = dataset.with_options(_deterministic())
            if options.prefetch_device:  # must be the last transformation
                device = options.prefetch_device
                dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device))
            return dataset

        self._dataset_of = dataset_of

    def resume_at(self, batches: int) -> None:
        """Starts the current epoch after its first ``batches`` batches (a run resumed from a
        checkpoint taken in the middle of an epoch): the batches that follow are those the
        epoch would have given from there. Call before :meth:`epoch`.

        Raises:
            RuntimeError: Once the epoch has started.
            ValueError: For a position outside the epoch.
        """
        if self._iterator is not None or self._position:
            raise RuntimeError("resume_at() must come before the epoch starts")
        if not 0 <= batches <= self.steps_per_epoch:
            raise ValueError(f"batch {batches} is outside an epoch of {self.steps_per_epoch}")
        self._position = int(batches)

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
            if self._position >= self.steps_per_epoch:  # resumed after the epoch's last batch
                return
            self._released = self.source.epoch
            self._iterator = iter(self._dataset_of(self._generation, self._position))
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
