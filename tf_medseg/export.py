"""Serving export: the whole of ``tf-medseg-predict`` as TensorFlow ops in a SavedModel.

:func:`export_segmenter` writes a SavedModel whose ``serving_default`` signature takes

* ``image``: float32 ``[X, Y, Z, C]``, the NIfTI's data array as stored (nibabel's
  ``get_fdata``), and
* ``affine``: float64 ``[4, 4]``, the file's affine,

and returns ``labels`` (uint8 ``[X, Y, Z]``, the input's grid) and ``probabilities`` (float32
``[X, Y, Z, K]``). In between, every step of predict runs as TensorFlow ops, so TensorFlow Serving,
Triton's TensorFlow backend or a plain ``tf.saved_model.load`` runs it with neither tf_medseg nor
SimpleITK installed:

1. **Reorientation to RAS** as nibabel's ``io_orientation`` computes it (the nearest orthogonal
   matrix of the affine's direction part by SVD, then each input axis to its largest output
   axis): a transposition, and flips.
2. **Resampling** to the training spacing (skipped where nibabel-style ``allclose`` says the
   spacing already is the target's), shape ``round(shape * spacing / target)``, first voxel
   centre kept: SimpleITK's linear interpolation with the edge values extended, which on an
   axis-aligned grid is separable, three gathers with weights. The flips of step 1 are folded
   into the interpolation coordinates (the value at ``c`` of a flipped axis is the value at
   ``n - 1 - c``), so the image is transposed once and interpolated once.
3. **Crop** to the body (first channel above the saved threshold, with the margin).
4. **Normalisation** with the statistics stored in ``preprocessing.json`` (CT: clip to the
   training foreground's percentiles and scale; MRI: z-score of the non-zero voxels).
5. **Sliding window**: MONAI's window corners and blending (:mod:`tf_medseg.inference`), the
   importance map a constant, ``sw_batch_size`` windows per forward pass, the windows added up
   axis by axis with segment sums; several models (an ensemble) and the 8 mirrorings of
   test-time augmentation averaged before the argmax.
6. **Largest connected component** per class when the run asked for it, on the list of the
   class's voxels: each starts with its own number and takes the largest number among its 26
   neighbours, with pointer jumping, until nothing changes; the biggest component stays (ties:
   the first in C order, as SimpleITK's ``RelabelComponent``).
7. **The way back**: the crop padded (background outside), the resampling undone by nearest
   neighbour (rounding half up, SimpleITK's), the orientation undone, all of it one gather per
   axis and one transposition.

Differences from predict: interpolation in float32 here against double in SimpleITK, and
ties of nearest-neighbour rounding, move single voxels at boundaries; ``tests/test_export.py``
measures the agreement on the synthetic test volumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tf_medseg.inference import compute_importance_map, flip_combinations
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.intensity import NormalizeCT, NormalizeMRI
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.spatial import CropForeground, Orientation, Resample, ResampleAndCrop


class ExportError(ValueError):
    """The model or its preprocessing cannot be expressed as the serving graph."""


@dataclass(frozen=True)
class GraphPlan:
    """What the serving graph does, read off a preprocessing chain and the window settings.

    Attributes:
        num_channels: Image channels.
        num_classes: Classes, background included.
        spacing: Target voxel size (mm), or None when the chain does not resample.
        threshold: Body threshold of the crop, or None when the chain does not crop.
        margin: Voxels kept around the body's box.
        normalise: ``"ct"`` or ``"mri"``.
        ct_lower: Per-channel CT clip bounds (``"ct"``).
        ct_upper: Per-channel upper bounds.
        roi_size: Sliding-window size.
        overlap: Fraction in [0, 1) or int voxels.
        mode: Blending, ``constant`` or ``gaussian``.
        sw_batch_size: Windows per forward pass.
        keep_largest: Largest connected component per class.
        tta: Average over the 8 mirrorings of each window batch.
        largest_classes: The classes ``keep_largest`` applies to (None: every foreground
            class; chosen by validation, ``postprocessing.json``).
    """

    num_channels: int
    num_classes: int
    spacing: tuple[float, float, float] | None
    threshold: float | None
    margin: int
    normalise: str
    ct_lower: tuple[float, ...]
    ct_upper: tuple[float, ...]
    roi_size: tuple[int, int, int]
    overlap: float | int
    mode: str
    sw_batch_size: int
    keep_largest: bool
    tta: bool
    largest_classes: tuple[int, ...] | None = None


def plan_from_chain(chain: Compose, settings, tta: bool = False) -> GraphPlan:
    """Reads the serving graph's settings off predict's chain and window settings.

    Args:
        chain: The deterministic chain of ``preprocessing.json``: LoadImage, Orientation,
            ResampleAndCrop (or Resample, CropForeground), a normalisation, ForegroundIndices.
        settings: A :class:`tf_medseg.cli.predict.WindowSettings`.
        tta: Test-time augmentation by mirroring.

    Raises:
        ExportError: The chain holds a transform the graph does not have, or not in this order.
    """
    transforms = list(chain.transforms)
    names = [type(t).__name__ for t in transforms]
    if not transforms or not isinstance(transforms[0], LoadImage):
        raise ExportError(f"the chain must start with LoadImage, got {names}")
    load = transforms.pop(0)
    if transforms and isinstance(transforms[-1], ForegroundIndices):
        transforms.pop()  # training's sampling lists: nothing to do at inference
    if not transforms or not isinstance(transforms[0], Orientation):
        raise ExportError(f"the chain must reorient after loading, got {names}")
    transforms.pop(0)
    spacing = threshold = None
    margin = 0
    if transforms and isinstance(transforms[0], ResampleAndCrop):
        step = transforms.pop(0)
        spacing, threshold, margin = step.resample.spacing, step.crop.threshold, step.crop.margin
    else:
        if transforms and isinstance(transforms[0], Resample):
            spacing = transforms.pop(0).spacing
        if transforms and isinstance(transforms[0], CropForeground):
            crop = transforms.pop(0)
            threshold, margin = crop.threshold, crop.margin
    if len(transforms) != 1 or not isinstance(transforms[0], NormalizeCT | NormalizeMRI):
        raise ExportError(
            f"cannot export the chain {names}: expected LoadImage, Orientation, ResampleAndCrop "
            "(or Resample, CropForeground), NormalizeCT or NormalizeMRI, ForegroundIndices"
        )
    normalise = transforms[0]
    is_ct = isinstance(normalise, NormalizeCT)
    return GraphPlan(
        num_channels=int(load.num_channels),
        num_classes=int(load.num_classes),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        threshold=None if threshold is None else float(threshold),
        margin=int(margin),
        normalise="ct" if is_ct else "mri",
        ct_lower=tuple(normalise.lower) if is_ct else (),
        ct_upper=tuple(normalise.upper) if is_ct else (),
        roi_size=tuple(int(r) for r in settings.roi_size),
        overlap=settings.overlap,
        mode=settings.mode,
        sw_batch_size=int(settings.sw_batch_size),
        keep_largest=bool(settings.keep_largest),
        tta=bool(tta),
        largest_classes=settings.largest_classes,
    )


# --------------------------------------------------------------------------------------------
# Geometry, as TensorFlow ops


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


def normalise(volume: tf.Tensor, plan: GraphPlan) -> tf.Tensor:
    """:class:`NormalizeCT` or :class:`NormalizeMRI` in TensorFlow (float32)."""
    if plan.normalise == "ct":
        lower = tf.constant(plan.ct_lower, tf.float32)
        upper = tf.constant(plan.ct_upper, tf.float32)
        return (tf.clip_by_value(volume, lower, upper) - lower) / (upper - lower)
    channels = []
    for c in range(plan.num_channels):
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


def window_axis_starts(
    size: tf.Tensor, roi: Sequence[int], overlap: float | int
) -> list[tf.Tensor]:
    """:func:`tf_medseg.inference.window_starts` per axis in TensorFlow: int32 window starts
    along each axis of a (padded) volume of ``size`` >= ``roi``; the windows are their product."""
    per_axis = []
    for axis, window in enumerate(roi):
        if isinstance(overlap, int) and not isinstance(overlap, bool) and overlap != 0:
            interval = max(window - overlap, 1)
        else:
            interval = max(int(window * (1.0 - float(overlap))), 1)
        extra = size[axis] - window
        count = 1 + (extra + interval - 1) // interval
        per_axis.append(tf.minimum(tf.range(count) * interval, extra))
    return per_axis


def window_corners(size: tf.Tensor, roi: Sequence[int], overlap: float | int) -> tf.Tensor:
    """All window corners, int32 ``[N, 3]``, first axis slowest (as ``window_starts``)."""
    grids = tf.meshgrid(*window_axis_starts(size, roi, overlap), indexing="ij")
    return tf.stack([tf.reshape(g, [-1]) for g in grids], axis=1)


def _overlap_add(parts: tf.Tensor, starts: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Sums parts ``[n, r, ...]`` placed at ``starts`` (``[n]``) along a new first axis of
    ``size``: overlap-add along one axis, one segment sum (no volume-sized copy per part)."""
    r = tf.shape(parts)[1]
    ids = tf.reshape(starts[:, None] + tf.range(r)[None, :], [-1])
    flat = tf.reshape(parts, tf.concat([[-1], tf.shape(parts)[2:]], 0))
    return tf.math.unsorted_segment_sum(flat, ids, size)


def sliding_window(volume: tf.Tensor, predict, plan: GraphPlan) -> tf.Tensor:
    """Blended window predictions of ``volume`` ``[D, H, W, C]`` as
    :func:`tf_medseg.inference.sliding_window_inference` (constant padding with 0 where the
    volume is smaller than the window, split low/high as MONAI), float32 ``[D, H, W, K]``.

    The windows are the product of per-axis starts, so the weighted predictions are added up
    axis by axis: the windows of a row (fixed x and y start; ``sw_batch_size`` per forward
    pass, the row's last pass padded) along z, the rows of a slab (fixed x start) along y, the
    slabs along x, each by one segment sum. A scatter into one volume-sized sum would copy the
    volume for every window batch (TensorFlow does not update a loop's tensor in place), which
    was 3 times predict's time at Decathlon size.
    """
    roi = plan.roi_size
    batch = plan.sw_batch_size
    k1 = plan.num_classes + 1  # the classes, and the weight
    size = tf.shape(volume)[:3]
    padded = tf.maximum(size, roi)
    low = (padded - size) // 2
    paddings = tf.concat([tf.stack([low, padded - size - low], axis=1), [[0, 0]]], axis=0)
    volume = tf.pad(volume, paddings)
    s0, s1, s2 = window_axis_starts(padded, roi, plan.overlap)
    n1, n2 = tf.size(s1), tf.size(s2)
    passes = (n2 + batch - 1) // batch  # forward passes per row
    weights = compute_importance_map(roi, plan.mode)[..., None]
    weight_channel = np.broadcast_to(weights[None], (batch, *roi, 1))
    slot_ids = tf.minimum(tf.range(passes * batch), n2 - 1)  # a padded slot repeats the last

    def row(x, y):
        """The weighted predictions of one row, added along z: ``[P2, r0, r1, K + 1]``."""

        def one_pass(p, out):
            slots = p * batch + tf.range(batch)
            valid = tf.cast(slots < n2, tf.float32)[:, None, None, None, None]
            z = tf.gather(s2, tf.minimum(slots, n2 - 1))
            windows = tf.stack(
                [
                    tf.slice(volume, tf.stack([x, y, z[j], 0]), [*roi, plan.num_channels])
                    for j in range(batch)
                ]
            )
            update = tf.concat([predict(windows) * weights[None], weight_channel], -1) * valid
            return p + 1, out.write(p, update)

        preds = tf.TensorArray(tf.float32, size=passes, element_shape=[batch, *roi, k1])
        _, preds = tf.while_loop(lambda p, _: p < passes, one_pass, (0, preds))
        preds = tf.reshape(preds.stack(), [passes * batch, *roi, k1])
        along_z = tf.transpose(preds, [0, 3, 1, 2, 4])  # [slot, r2, r0, r1, K + 1]
        return _overlap_add(along_z, tf.gather(s2, slot_ids), padded[2])

    def slab(i, slabs):
        """The rows of one x start added along y: ``[P1, P2, r0, K + 1]``."""
        x = s0[i]

        def add_row(j, rows):
            return j + 1, rows.write(j, row(x, s1[j]))

        rows = tf.TensorArray(tf.float32, size=n1, element_shape=[None, roi[0], roi[1], k1])
        _, rows = tf.while_loop(lambda j, _: j < n1, add_row, (0, rows))
        along_y = tf.transpose(rows.stack(), [0, 3, 1, 2, 4])  # [n1, r1, P2, r0, K + 1]
        return i + 1, slabs.write(i, _overlap_add(along_y, s1, padded[1]))

    slabs = tf.TensorArray(tf.float32, size=tf.size(s0), element_shape=[None, None, roi[0], k1])
    _, slabs = tf.while_loop(lambda i, _: i < tf.size(s0), slab, (0, slabs))
    along_x = tf.transpose(slabs.stack(), [0, 3, 1, 2, 4])  # [n0, r0, P1, P2, K + 1]
    total = _overlap_add(along_x, s0, padded[0])
    out = total[..., :-1] / total[..., -1:]
    return tf.slice(out, tf.concat([low, [0]], 0), tf.concat([size, [-1]], 0))


#: The 26 neighbours of a voxel.
_NEIGHBOURS = np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], np.int32) - np.int32(1)


def largest_component(mask: tf.Tensor) -> tf.Tensor:
    """The largest 26-connected component of a boolean ``[D, H, W]`` mask (empty stays empty),
    as SimpleITK's ``ConnectedComponent`` and ``RelabelComponent`` find it (ties of size: the
    component that comes first in C order).

    Works on the list of the mask's voxels, not the volume: each voxel's 26 neighbours are
    looked up once in a volume of list positions, then every voxel starts with its own number
    and takes the largest number among its neighbours and then the number of the voxel its
    number names (pointer jumping: a number crosses a component in a few rounds rather than
    its length), until nothing changes; every component then carries one number.
    """
    shape = tf.shape(mask)
    coords = tf.cast(tf.where(mask), tf.int32)  # row-major: C order
    count = tf.shape(coords)[0]
    numbers = tf.range(1, count + 1)
    positions = tf.scatter_nd(coords, numbers, shape)  # 0: not in the mask
    neighbours = []
    for offset in _NEIGHBOURS:
        near = coords + offset
        inside = tf.reduce_all((near >= 0) & (near < shape), axis=1)
        found = tf.gather_nd(positions, tf.clip_by_value(near, 0, shape - 1))
        neighbours.append(tf.where(inside, found, 0))
    neighbours = tf.stack(neighbours, axis=1)  # [N, 26] numbers, 0: none

    def step(labels, _):
        table = tf.concat([[0], labels], 0)
        grown = tf.maximum(labels, tf.reduce_max(tf.gather(table, neighbours), axis=1))
        for _ in range(2):
            grown = tf.gather(tf.concat([[0], grown], 0), grown)
        return grown, tf.reduce_any(grown != labels)

    labels, _ = tf.while_loop(
        lambda _, changed: changed, step, (numbers, count > 0), parallel_iterations=1
    )
    ids = labels - 1
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, count)
    firsts = tf.math.unsorted_segment_min(tf.range(count), ids, count)
    biggest = sizes == tf.reduce_max(tf.concat([sizes, [0]], 0))
    first = tf.minimum(tf.reduce_min(tf.where(biggest, firsts, count)), count)
    winner = tf.gather(tf.concat([labels, [0]], 0), first)
    keep = tf.cast(labels == winner, tf.int32)
    return tf.scatter_nd(coords, keep, shape) > 0


def keep_largest(
    labels: tf.Tensor, num_classes: int, classes: tuple[int, ...] | None = None
) -> tf.Tensor:
    """:func:`tf_medseg.inference.keep_largest_component` over the given foreground classes
    (None: every one)."""
    out = labels
    for value in range(1, num_classes) if classes is None else classes:
        mask = labels == value
        keep = largest_component(mask)
        out = tf.where(mask & ~keep, tf.zeros_like(out), out)
    return out


# --------------------------------------------------------------------------------------------
# The module


class ServingModule(tf.Module):
    """The serving graph around one model or an ensemble (see the module's docstring).

    Args:
        models: Keras models (channels-last input, softmax output), one input and output shape.
        plan: What the graph does.
    """

    def __init__(self, models: Sequence[tf.keras.Model], plan: GraphPlan):
        super().__init__(name="tf_medseg_serving")
        self.models = list(models)
        self.plan = plan
        self.flips = flip_combinations() if plan.tta else [()]
        spec_image = tf.TensorSpec([None, None, None, plan.num_channels], tf.float32, "image")
        spec_affine = tf.TensorSpec([4, 4], tf.float64, "affine")
        self.serve = tf.function(self._serve, input_signature=[spec_image, spec_affine])

    def predict_windows(self, windows: tf.Tensor) -> tf.Tensor:
        """Mean softmax of the models (and mirrorings) for a window batch, float32."""
        total = None
        for model in self.models:
            for axes in self.flips:
                mirrored = tf.reverse(windows, axis=list(axes)) if axes else windows
                out = tf.cast(model(mirrored, training=False), tf.float32)
                out = tf.reverse(out, axis=list(axes)) if axes else out
                total = out if total is None else total + out
        return total / float(len(self.models) * len(self.flips))

    def preprocess(self, image: tf.Tensor, affine: tf.Tensor) -> tuple[tf.Tensor, dict]:
        """The image on the preprocessed grid (cropped, normalised) and its geometry."""
        plan = self.plan
        volume, geometry = to_preprocessed_grid(image, affine, plan.spacing)
        start, stop = body_box(volume, plan.threshold, plan.margin)
        volume = tf.slice(volume, tf.concat([start, [0]], 0), tf.concat([stop - start, [-1]], 0))
        geometry.update(start=start, stop=stop)
        return normalise(volume, plan), geometry

    def check_inputs(self, image: tf.Tensor, affine: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The inputs, checked as predict checks a file: the channels the models take, finite
        intensities, and a finite affine whose 3x3 part is invertible.

        A loaded signature does not enforce the image's declared shape, and neither NaN
        intensities nor a singular affine stop the graph on their own: without these checks
        they come back as labels of garbage.

        Raises:
            tf.errors.InvalidArgumentError: When the graph runs, naming the input at fault.
        """
        channels = self.plan.num_channels
        checks = [
            tf.debugging.Assert(
                tf.equal(tf.shape(image)[-1], channels),
                [
                    f"image must be [X, Y, Z, {channels}]: the model takes {channels} "
                    "channel(s) on the last axis (one modality: a last axis of size 1); got "
                    "an image of shape",
                    tf.shape(image),
                ],
                summarize=4,
            ),
            tf.debugging.assert_all_finite(
                image, "image holds NaN or infinite intensities; replace them before serving"
            ),
            tf.debugging.assert_all_finite(affine, "affine holds NaN or infinite values"),
        ]
        with tf.control_dependencies(checks):
            rzs = affine[:3, :3]
            # Relative to the columns' lengths (the voxel sizes), so that the test does not
            # depend on the units: 0 for a singular matrix, 1 for an orthogonal one.
            scale = tf.reduce_prod(tf.sqrt(tf.reduce_sum(rzs * rzs, axis=0)))
            independence = tf.abs(tf.linalg.det(rzs)) / tf.maximum(scale, 1e-300)
            invertible = tf.debugging.Assert(
                independence > 1e-6,
                [
                    "affine is not invertible: its 3x3 part (voxel axes to mm) must map the "
                    "three voxel axes to independent directions; got",
                    affine,
                ],
                summarize=16,
            )
        with tf.control_dependencies([invertible]):
            return tf.identity(image), tf.identity(affine)

    def _serve(self, image: tf.Tensor, affine: tf.Tensor) -> dict[str, tf.Tensor]:
        plan = self.plan
        image, affine = self.check_inputs(image, affine)
        volume, geometry = self.preprocess(image, affine)
        probs = sliding_window(volume, self.predict_windows, plan)
        labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
        if plan.keep_largest:
            labels = keep_largest(labels, plan.num_classes, plan.largest_classes)
        start, stop = geometry["start"], geometry["stop"]
        pads = tf.stack([start, geometry["new_shape"] - stop], axis=1)
        labels = tf.pad(labels, pads)
        background = tf.pad(probs[..., :1], tf.concat([pads, [[0, 0]]], 0), constant_values=1.0)
        foreground = tf.pad(probs[..., 1:], tf.concat([pads, [[0, 0]]], 0))
        probs = tf.concat([background, foreground], axis=-1)
        labels = back_to_source_grid(labels, geometry, plan.spacing)
        probs = back_to_source_grid(probs, geometry, plan.spacing)
        return {"labels": tf.cast(labels, tf.uint8), "probabilities": probs}


def export_segmenter(segmenter, out: str) -> str:
    """Writes a :class:`tf_medseg.cli.predict.Segmenter` as a SavedModel at ``out``.

    Args:
        segmenter: Loaded models, their preprocessing and window settings (``tta`` included).
        out: The SavedModel folder (created; must not hold a SavedModel already).

    Returns:
        ``out``.

    Raises:
        ExportError: The chain cannot be expressed as the graph, or ``out`` is taken.
    """
    if os.path.exists(os.path.join(out, "saved_model.pb")):
        raise ExportError(f"{out} already holds a SavedModel; remove it or choose another --out")
    plan = plan_from_chain(segmenter.preprocessing, segmenter.settings, segmenter.tta)
    module = ServingModule(segmenter.models, plan)
    tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
    return out
