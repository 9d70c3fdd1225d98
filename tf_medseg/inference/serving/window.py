"""The serving graph's sliding window (step 5 of :mod:`tf_medseg.inference.serving`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_medseg.inference.serving.spec import ServingSpec
from tf_medseg.inference.window import compute_importance_map


def window_axis_starts(
    size: tf.Tensor, roi: Sequence[int], overlap: float | int
) -> list[tf.Tensor]:
    """:func:`tf_medseg.inference.window.window_starts` per axis in TensorFlow: int32 window starts
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


def sliding_window(volume: tf.Tensor, predict, spec: ServingSpec) -> tf.Tensor:
    """Blended window predictions of ``volume`` ``[D, H, W, C]`` as
    :func:`tf_medseg.inference.window.sliding_window_inference` (constant padding with 0 where the
    volume is smaller than the window, split low/high as MONAI), float32 ``[D, H, W, K]``.

    The windows are the product of per-axis starts, so the weighted predictions are added up
    axis by axis: the windows of a row (fixed x and y start; ``sw_batch_size`` per forward
    pass, the row's last pass padded) along z, the rows of a slab (fixed x start) along y, the
    slabs along x, each by one segment sum. A scatter into one volume-sized sum would copy the
    volume for every window batch (TensorFlow does not update a loop's tensor in place), which
    was 3 times predict's time at Decathlon size.
    """
    roi = spec.window.roi_size
    batch = spec.window.sw_batch_size
    k1 = spec.num_classes + 1  # the classes, and the weight
    size = tf.shape(volume)[:3]
    padded = tf.maximum(size, roi)
    low = (padded - size) // 2
    paddings = tf.concat([tf.stack([low, padded - size - low], axis=1), [[0, 0]]], axis=0)
    volume = tf.pad(volume, paddings)
    s0, s1, s2 = window_axis_starts(padded, roi, spec.window.overlap)
    n1, n2 = tf.size(s1), tf.size(s2)
    passes = (n2 + batch - 1) // batch  # forward passes per row
    weights = compute_importance_map(roi, spec.window.mode)[..., None]
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
                    tf.slice(volume, tf.stack([x, y, z[j], 0]), [*roi, spec.num_channels])
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
