"""The largest connected component per class in TensorFlow ops (step 6 of
:mod:`tf_medseg.inference.serving`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

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
    """:func:`tf_medseg.inference.window.keep_largest_component` over the given foreground classes
    (None: every one)."""
    out = labels
    for value in range(1, num_classes) if classes is None else classes:
        mask = labels == value
        keep = largest_component(mask)
        out = tf.where(mask & ~keep, tf.zeros_like(out), out)
    return out


# --------------------------------------------------------------------------------------------
# The module
