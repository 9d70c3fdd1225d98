"""The serving graph's geometry: reorientation to RAS, resampling to the training grid, the crop
to the body, the normalisation, and the way back to the input's grid (steps 1-4 and 7 of
:mod:`tf_medseg.inference.serving`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_medseg.inference.serving.spec import ServingSpec


def orientation(affine: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """nibabel's ``io_orientation`` of an affine, in TensorFlow.

    Args:
        affine: float64 ``[4, 4]``.

    Returns:
        ``(axes, flips)``, int32 ``[3]`` each: input axis ``i`` becomes RAS axis ``axes[i]``,
        reversed where ``flips[i]`` is -1 (the two columns of nibabel's ``ornt``).
    """
    rzs = affine[:3, :3]
    zooms = tf.sqrt(tf.reduce_sum(rzs * rzs, axis=0))
    zooms = tf.where(zooms == 0, tf.ones_like(zooms), zooms)
    rs = rzs / zooms[None, :]
    s, u, v = tf.linalg.svd(rs)
    tol = tf.reduce_max(s) * 3.0 * np.finfo(np.float64).eps
    keep = tf.cast(s > tol, tf.float64)
    r = tf.matmul(u * keep[None, :], v, transpose_b=True)
    axes, flips = [], []
    for in_axis in range(3):
        column = r[:, in_axis]
        out_axis = tf.argmax(tf.abs(column), output_type=tf.int32)
        value = tf.gather(column, out_axis)
        tf.debugging.assert_greater(
            tf.abs(value), tf.constant(1e-8, tf.float64), message="degenerate affine directions"
        )
        axes.append(out_axis)
        flips.append(tf.where(value < 0, -1, 1))
        r = r * (1.0 - tf.one_hot(out_axis, 3, dtype=tf.float64))[:, None]  # R[out_axis, :] = 0
    return tf.stack(axes), tf.stack(flips)


def _stored_index(index: tf.Tensor, last: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """An index of the axis reversed where ``flip``, as an index of the stored axis."""
    return tf.where(flip, last - index, index)


def _linear_along(volume: tf.Tensor, axis: int, coords: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """SimpleITK's linear samples of ``volume`` along ``axis`` at continuous indices ``coords``
    of the axis (reversed first where ``flip``); the neighbour past the last voxel is the last
    voxel, and positions outside the buffer are clamped (:func:`_resample` replaces them)."""
    last = tf.shape(volume)[axis] - 1
    clipped = tf.clip_by_value(coords, 0.0, tf.cast(last, tf.float64))
    low = tf.floor(clipped)
    weight = tf.cast(clipped - low, volume.dtype)
    low = tf.cast(low, tf.int32)
    high = tf.minimum(low + 1, last)
    shape = [1] * len(volume.shape)
    shape[axis] = -1
    a = tf.gather(volume, _stored_index(low, last, flip), axis=axis)
    b = tf.gather(volume, _stored_index(high, last, flip), axis=axis)
    return a + (b - a) * tf.reshape(weight, shape)


def _nearest_along(volume: tf.Tensor, axis: int, coords: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """SimpleITK's nearest-neighbour samples along ``axis`` (rounding half up, clamped), as
    :func:`_linear_along` takes its positions."""
    last = tf.shape(volume)[axis] - 1
    nearest = tf.clip_by_value(tf.cast(tf.floor(coords + 0.5), tf.int32), 0, last)
    return tf.gather(volume, _stored_index(nearest, last, flip), axis=axis)


def _resample(volume: tf.Tensor, coords: Sequence[tf.Tensor], flips: tf.Tensor) -> tf.Tensor:
    """SimpleITK's linear resampling with the nearest-neighbour extrapolator, of the first three
    axes of ``volume`` at the given per-axis continuous indices (axis ``r`` reversed first where
    ``flips[r] < 0``): separable on an axis-aligned grid.

    SimpleITK interpolates linearly where the point is inside the buffer (``-0.5 <= c <
    n - 0.5`` on every axis) and takes the nearest voxel on all axes where it is outside on any.
    Three gathers (pairs) for the linear part; three more for the nearest part, only when some
    position is outside.
    """
    linear = volume
    outside = []
    for r in range(3):
        linear = _linear_along(linear, r, coords[r], flips[r] < 0)
        size = tf.cast(tf.shape(volume)[r], tf.float64)
        outside.append((coords[r] < -0.5) | (coords[r] >= size - 0.5))

    def with_nearest():
        nearest = volume
        for r in range(3):
            nearest = _nearest_along(nearest, r, coords[r], flips[r] < 0)
        mask = (
            outside[0][:, None, None, None]
            | outside[1][None, :, None, None]
            | outside[2][None, None, :, None]
        )
        return tf.where(mask, nearest, linear)

    any_outside = tf.reduce_any(tf.concat(outside, axis=0))
    return tf.cond(any_outside, with_nearest, lambda: linear)


def resampled_shape(
    shape: tf.Tensor, spacing: tf.Tensor, target: Sequence[float] | None
) -> tuple[tf.Tensor, tf.Tensor]:
    """The preprocessed grid's shape (int32 ``[3]``) by :class:`Resample`'s rule, and whether
    the resampling is skipped (the spacings agree as ``np.allclose`` with rtol 1e-4 says, or
    the chain does not resample): then the shape is the input's."""
    if target is None:
        return shape, tf.constant(True)
    target = tf.constant(target, tf.float64)
    same = tf.reduce_all(tf.abs(spacing - target) <= 1e-8 + 1e-4 * tf.abs(target))
    new = tf.round(tf.cast(shape, tf.float64) * spacing / target)
    new = tf.cast(tf.maximum(new, 1.0), tf.int32)
    return tf.where(same, shape, new), same


def _ratio(geometry: dict, target: Sequence[float] | None, forward: bool) -> tf.Tensor:
    """Per RAS axis, input voxels per preprocessed voxel (``forward``) or the inverse; 1 where
    nothing is resampled."""
    if target is None:
        return tf.ones([3], tf.float64)
    target = tf.constant(target, tf.float64)
    ratio = target / geometry["spacing"] if forward else geometry["spacing"] / target
    return tf.where(geometry["same"], tf.ones([3], tf.float64), ratio)


def to_preprocessed_grid(
    image: tf.Tensor, affine: tf.Tensor, target: Sequence[float] | None
) -> tuple[tf.Tensor, dict]:
    """Reorients ``image`` ``[X, Y, Z, C]`` to RAS and resamples it to ``target`` spacing.

    Returns:
        The float32 image on the new grid, and the geometry :func:`back_to_source_grid` needs
        (``axes``: the RAS axis of each input axis, ``flips`` and ``shape`` and ``spacing`` per
        RAS axis, ``new_shape``, ``same``: no resampling).
    """
    axes, flips = orientation(affine)
    ras_axes = tf.argsort(axes)  # RAS axis r is input axis ras_axes[r]
    zooms = tf.sqrt(tf.reduce_sum(affine[:3, :3] ** 2, axis=0))
    shape = tf.gather(tf.shape(image)[:3], ras_axes)
    spacing = tf.gather(zooms, ras_axes)
    new_shape, same = resampled_shape(shape, spacing, target)
    geometry = {
        "axes": axes,
        "flips": tf.gather(flips, ras_axes),
        "shape": shape,
        "spacing": spacing,
        "new_shape": new_shape,
        "same": same,
    }
    volume = tf.transpose(image, tf.concat([ras_axes, [3]], axis=0))
    ratio = _ratio(geometry, target, forward=True)
    coords = [tf.range(new_shape[r], dtype=tf.float64) * ratio[r] for r in range(3)]
    return _resample(volume, coords, geometry["flips"]), geometry


def body_box(
    volume: tf.Tensor, threshold: float | None, margin: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """:class:`CropForeground`'s box (``start``, ``stop``, int32 ``[3]``) of the voxels whose
    first channel exceeds ``threshold``, widened by ``margin``; the whole volume when there are
    none or there is no crop."""
    shape = tf.shape(volume)[:3]
    if threshold is None:
        return tf.zeros([3], tf.int32), shape
    body = volume[..., 0] > threshold
    starts, stops = [], []
    for axis in range(3):
        other = [a for a in range(3) if a != axis]
        hits = tf.reduce_any(body, axis=other)
        where = tf.cast(tf.where(hits)[:, 0], tf.int32)
        found = tf.size(where) > 0
        first = tf.where(found, tf.reduce_min(where), 0)  # empty: the whole axis
        last = tf.where(found, tf.reduce_max(where), shape[axis] - 1)
        starts.append(tf.where(found, tf.maximum(0, first - margin), 0))
        stops.append(tf.where(found, tf.minimum(shape[axis], last + 1 + margin), shape[axis]))
    return tf.stack(starts), tf.stack(stops)


def normalise(volume: tf.Tensor, spec: ServingSpec) -> tf.Tensor:
    """:class:`NormalizeCT` or :class:`NormalizeMRI` in TensorFlow (float32)."""
    if spec.normalise == "ct":
        lower = tf.constant(spec.ct_lower, tf.float32)
        upper = tf.constant(spec.ct_upper, tf.float32)
        return (tf.clip_by_value(volume, lower, upper) - lower) / (upper - lower)
    channels = []
    for c in range(spec.num_channels):
        channel = volume[..., c]
        nonzero = channel != 0
        values = tf.cast(tf.boolean_mask(channel, nonzero), tf.float64)
        mean = tf.reduce_mean(values)
        std = tf.math.reduce_std(values)
        tf.debugging.assert_greater(
            std,
            tf.constant(1e-8, tf.float64),
            message=f"channel {c} is all zero or has constant intensity",
        )
        scaled = tf.cast((tf.cast(channel, tf.float64) - mean) / std, tf.float32)
        channels.append(tf.where(nonzero, scaled, channel))
    return tf.stack(channels, axis=-1)


def back_to_source_grid(
    volume: tf.Tensor, geometry: dict, target: Sequence[float] | None
) -> tf.Tensor:
    """Puts a volume ``[*new_shape, ...]`` on the preprocessed grid back onto the input's grid:
    nearest neighbour (SimpleITK's rounding half up, edges clamped), flips and transposition
    undone (:func:`tf_medseg.transforms.spatial.invert_label`'s steps)."""
    shape, new_shape = geometry["shape"], geometry["new_shape"]
    ratio = _ratio(geometry, target, forward=False)
    for r in range(3):
        positions = tf.range(shape[r])
        positions = tf.where(geometry["flips"][r] < 0, shape[r] - 1 - positions, positions)
        index = tf.floor(tf.cast(positions, tf.float64) * ratio[r] + 0.5)
        index = tf.clip_by_value(tf.cast(index, tf.int32), 0, new_shape[r] - 1)
        volume = tf.gather(volume, index, axis=r)
    rest = tf.range(3, tf.rank(volume))
    return tf.transpose(volume, tf.concat([geometry["axes"], rest], axis=0))


# --------------------------------------------------------------------------------------------
# Sliding window and post-processing
