"""3D U-Net (Cicek et al. 2016 after Ronneberger et al. 2015), the network the paper trains.

An encoder-decoder with skip connections: ``depth`` max-pooling steps, filters doubling at each
level from ``base_filters``, transposed-convolution upsampling, and two 3x3x3 convolutions per
level (optionally as a residual block). The normalisation is configurable because the paper
compares batch, instance, layer and weight normalisation (instance normalisation converged best;
batch normalisation is unstable at the batch sizes of 3D training).

With ``deep_supervision`` (nnU-Net's, after Lee et al. 2015) every decoder level below full
resolution gets its own 1x1x1 convolution and float32 softmax: the model then has ``depth``
outputs, the full-resolution probabilities first and the auxiliary ones after them, each half
the size of the one before (the bottleneck has no output, as in nnU-Net). That model is for
training only; :func:`tf_medseg.models.main_output_model` cuts the one-output model out of it
(the same layers) for validation, export and prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_medseg.models import blocks


def _level_block(
    x: tf.Tensor, filters: int, norm: str, act: str, residual: bool, groups: int, name: str
) -> tf.Tensor:
    """Two conv-norm-act layers, or the residual form ``act(conv-norm-act-conv-norm + skip)``."""
    if not residual:
        x = blocks.conv_norm_act(x, filters, 3, norm, act, f"{name}_a", groups=groups)
        return blocks.conv_norm_act(x, filters, 3, norm, act, f"{name}_b", groups=groups)
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = blocks.conv_norm_act(x, filters, 1, norm, None, f"{name}_proj", groups=groups)
    y = blocks.conv_norm_act(x, filters, 3, norm, act, f"{name}_a", groups=groups)
    y = blocks.conv_norm_act(y, filters, 3, norm, None, f"{name}_b", groups=groups)
    y = tf.keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return blocks.activation(act, f"{name}_out_act")(y)


def build_unet3d(
    num_classes: int,
    in_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    norm: str = "instance",
    residual: bool = False,
    activation: str = "relu",
    groups: int = 8,
    spatial_size: int | Sequence[int] | None = None,
    deep_supervision: bool = False,
    name: str = "unet3d",
) -> tf.keras.Model:
    """Builds a 3D U-Net returning per-voxel class probabilities.

    Args:
        num_classes: Output classes, background included (>= 2).
        in_channels: Input channels.
        depth: Number of downsampling steps; spatial sizes must be multiples of ``2**depth``.
        base_filters: Filters at full resolution, doubled at every level.
        norm: One of ``blocks.NORMS``: batch, instance, group, layer or weight.
        residual: Use residual blocks instead of plain double convolutions.
        activation: One of ``blocks.ACTIVATIONS``.
        groups: Groups for ``norm="group"``.
        spatial_size: Optional fixed input size (cube side or (D, H, W)); ``None`` for any size.
        deep_supervision: Add an auxiliary softmax output to each decoder level below full
            resolution (``depth - 1`` of them).
        name: Model name.

    Returns:
        A functional model mapping ``(N, D, H, W, in_channels)`` to float32 softmax probabilities
        ``(N, D, H, W, num_classes)``; with ``deep_supervision`` to the list of ``depth`` such
        outputs, output ``i`` of spatial size ``(D, H, W) / 2**i`` (the first is the model's
        prediction, named ``probs``; the others ``ds{i}_probs``).

    Raises:
        ValueError: On a non-positive depth or filters, an unknown norm or activation, or a
            fixed spatial size not divisible by ``2**depth``.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base_filters must be >= 1, got {depth}, {base_filters}")
    inputs, x = blocks.model_input(in_channels, 2**depth, spatial_size)
    skips = []
    for level in range(depth):
        x = _level_block(
            x, base_filters * 2**level, norm, activation, residual, groups, f"enc{level}"
        )
        skips.append(x)
        x = blocks.MaxPool3D(2, name=f"enc{level}_pool")(x)
    x = _level_block(x, base_filters * 2**depth, norm, activation, residual, groups, "bottleneck")
    auxiliary = []  # from the coarsest decoder level up
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = blocks.conv3d(x, filters, 2, norm, f"dec{level}_up", strides=2, transpose=True)
        x = tf.keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _level_block(x, filters, norm, activation, residual, groups, f"dec{level}")
        if deep_supervision and level > 0:
            auxiliary.append(blocks.softmax_head(x, num_classes, prefix=f"ds{level}_"))
    probs = blocks.softmax_head(x, num_classes)
    if not deep_supervision:
        return tf.keras.Model(inputs, probs, name=name)
    return tf.keras.Model(inputs, [probs, *reversed(auxiliary)], name=name)
