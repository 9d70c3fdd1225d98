"""The random tail of the training transforms, as TensorFlow ops inside the tf.data map.

Each draw is a ``tf.random.stateless_*`` op whose seed (:func:`sample_seed`) is folded from
(run seed, epoch, rank, item index, sample index), so batches are bit-identical whatever the
map's parallelism: the patch centre (foreground with probability ``pos_fraction``, else
background), the crop with padding, the flips and the intensity shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


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
    fg_counts: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws a patch centre: foreground with probability ``pos_fraction``, else background.

    A foreground centre is a uniform draw from ``fg_indices``, or, given ``fg_counts`` (the
    rows of each class, the list holding the classes one after the other, as
    :class:`~tf_medseg.transforms.indices.ForegroundIndices` stores them), first a class drawn
    uniformly among the classes of the list and then a row of that class (class-balanced: a
    small class such as a lesion inside an organ gets as many foreground-centred patches as the
    organ, as nnU-Net samples). With one class it is the pooled draw, the same row for the same
    seed. The classes were counted once, in the deterministic prefix: here is only the draw.

    Args:
        shape: int32 (3,) spatial shape of the volume.
        fg_indices: int32 (Nf, 3) foreground voxels.
        bg_indices: int32 (Nb, 3) background voxels.
        pos_fraction: Probability of a foreground centre, ``pos / (pos + neg)``.
        seed: Stateless seed, shape (2,).
        fg_counts: int32 (M,) rows per class of ``fg_indices``, in order; None draws from the
            pooled list.

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
    if fg_counts is not None:
        balanced = use_fg & (tf.size(fg_counts) > 1)
        pick = tf.cond(balanced, lambda: _balanced_pick(fg_counts, pick_seed), lambda: pick)
    uniform = tf.random.stateless_uniform(
        [3], voxel_seed, minval=0, maxval=tf.int32.max, dtype=tf.int32
    ) % tf.maximum(shape, 1)
    centre = tf.cond(size > 0, lambda: tf.gather(pool, pick), lambda: uniform)
    return tf.cast(centre, tf.int32), use_fg


def _balanced_pick(fg_counts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A row of a foreground list holding ``fg_counts[k]`` rows of its k-th class after those of
    the classes before: the class uniform, then the row uniform within the class."""
    class_seed, row_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    k = tf.random.stateless_uniform(
        [], class_seed, minval=0, maxval=tf.size(fg_counts), dtype=tf.int32
    )
    first = tf.gather(tf.math.cumsum(fg_counts, exclusive=True), k)
    count = tf.maximum(tf.gather(fg_counts, k), 1)
    return first + tf.random.stateless_uniform([], row_seed, minval=0, maxval=count, dtype=tf.int32)


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
    fg_counts: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The random tail for one patch: centre (class-balanced given ``fg_counts``, see
    :func:`choose_centre`), crop (with padding), flips, intensity shift.

    Returns:
        (image patch float32 (pd, ph, pw, C), label patch int32 (pd, ph, pw)).
    """
    centre_seed, flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(label, out_type=tf.int32)
    centre, _ = choose_centre(shape, fg_indices, bg_indices, pos_fraction, centre_seed, fg_counts)
    image_patch, label_patch = crop_with_padding(image, label, centre, patch_size)
    if flip:
        image_patch, label_patch = random_flip(image_patch, label_patch, flip_seed)
    if intensity_shift:
        image_patch = random_intensity_shift(image_patch, intensity_shift, shift_seed)
    return image_patch, label_patch  # uint8 class indices: a quarter of int32's bytes


# ------------------------------------------------------------------------- datasets
