"""The reference the tests hold :class:`tf_medseg.pipeline.TrainStream` to: one ``tf.data``
pass per epoch over the same random tail, which gives the same batches from a new iterator each
epoch (a training loop would drain and rebuild the pipeline every epoch)."""

from __future__ import annotations

import tensorflow as tf

from tf_medseg.cache.sources import Source
from tf_medseg.pipeline import (
    TailOptions,
    _deterministic,
    _item_elements,
    _item_signature,
    _num_channels,
    _patch_batches,
)


def build_train_dataset(
    source: Source,
    options: TailOptions,
    pos_fraction: tf.Variable | float,
    num_channels: int | None = None,
) -> tf.data.Dataset:
    """One epoch's training dataset: ``num_samples`` random patches per cached item, batched.

    Iterate it once per epoch and call ``source.end_epoch()`` between epochs. Every pass
    creates a tf.data iterator and drains the pipeline at its end; a training loop should use
    :class:`TrainStream`, which gives the same batches from one iterator.

    Args:
        source: A :class:`SmartCache` or :class:`UncachedSource` (see :func:`make_source`).
        options: The random tail's and the batching's settings.
        pos_fraction: Probability of a foreground-centred patch, ``pos / (pos + neg)``; pass
            the adaptive sampler's ``tf.Variable`` so updates apply without rebuilding.
        num_channels: Image channels; read from one cached item when not given.

    Returns:
        Dataset of ``(image float32 (B, pd, ph, pw, C), label uint8 (B, pd, ph, pw))``.
    """
    channels = _num_channels(source, num_channels)

    def generate():
        yield from _item_elements(source, source.epoch)

    items = tf.data.Dataset.from_generator(generate, output_signature=_item_signature(channels))
    dataset = _patch_batches(items, options, pos_fraction, rank=int(source.rank))
    return dataset.prefetch(options.prefetch).with_options(_deterministic())
