"""V-Net (Milletari, Navab and Ahmadi 2016), the network that introduced the soft Dice loss.

A residual encoder-decoder with 5x5x5 convolutions and PReLU activations. Each level learns a
residual: ``act(convs(x) + x)``. The input stage adds the image, repeated across channels, to
its first convolution; the encoder goes down with 2x2x2 stride-2 convolutions doubling the
filters, and the decoder up with 2x2x2 transposed convolutions, concatenating the encoder
features of the same level. Levels hold 1, 2, 3, 3, ... convolutions from the top, the same on
the way up. Batch normalisation by default, as in common re-implementations; any of
``blocks.NORMS`` can be chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_medseg.models import blocks


def _convs_at(level: int) -> int:
    """Number of convolutions in a level: 1, 2, then 3 for every deeper level."""
    return min(level + 1, 3)


def _residual_stage(
    x: tf.Tensor, count: int, kernel_size: int, norm: str, act: str, name: str
) -> tf.Tensor:
    """``count`` conv-norm-act layers whose output is added to ``x`` before the activation."""
    y = x
    for index in range(count):
        last = index == count - 1
        y = blocks.conv_norm_act(
            y, x.shape[-1], kernel_size, norm, None if last else act, f"{name}_{index}"
        )
    y = tf.keras.layers.Add(name=f"{name}_add")([y, x])
    return blocks.activation(act, f"{name}_out_act")(y)


def _input_stage(x: tf.Tensor, filters: int, kernel_size: int, norm: str, act: str) -> tf.Tensor:
    """First convolution plus the input repeated (or projected) to ``filters`` channels."""
    y = blocks.conv_norm_act(x, filters, kernel_size, norm, None, "input_0")
    channels = x.shape[-1]
    if filters % channels == 0:
        repeats = filters // channels
        shortcut = (
            x if repeats == 1 else tf.keras.layers.Concatenate(name="input_repeat")([x] * repeats)
        )
    else:
        shortcut = blocks.conv3d(x, filters, 1, norm, "input_proj")
    y = tf.keras.layers.Add(name="input_add")([y, shortcut])
    return blocks.activation(act, "input_out_act")(y)


def build_vnet(
    num_classes: int,
    in_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    kernel_size: int = 5,
    norm: str = "batch",
    activation: str = "prelu",
    spatial_size: int | Sequence[int] | None = None,
    name: str = "vnet",
) -> tf.keras.Model:
    """Builds V-Net returning per-voxel class probabilities.

    Args:
        num_classes: Output classes, background included (>= 2).
        in_channels: Input channels.
        depth: Number of downsampling steps; spatial sizes must be multiples of ``2**depth``.
        base_filters: Filters of the input stage, doubled at each level (16 in the paper).
        kernel_size: Side of the convolution kernels inside the stages (5 in the paper).
        norm: One of ``blocks.NORMS``.
        activation: One of ``blocks.ACTIVATIONS`` (PReLU in the paper).
        spatial_size: Optional fixed input size (cube side or (D, H, W)); ``None`` for any size.
        name: Model name.

    Returns:
        A functional model mapping ``(N, D, H, W, in_channels)`` to float32 softmax probabilities
        ``(N, D, H, W, num_classes)``.

    Raises:
        ValueError: On a non-positive depth or filters, an unknown norm or activation, or a
            fixed spatial size not divisible by ``2**depth``.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base_filters must be >= 1, got {depth}, {base_filters}")
    inputs, x = blocks.model_input(in_channels, 2**depth, spatial_size)
    x = _input_stage(x, base_filters, kernel_size, norm, activation)
    skips = [x]
    for level in range(1, depth + 1):
        x = blocks.conv_norm_act(
            x, base_filters * 2**level, 2, norm, activation, f"down{level}", strides=2
        )
        x = _residual_stage(x, _convs_at(level), kernel_size, norm, activation, f"enc{level}")
        skips.append(x)
    for level in reversed(range(depth)):
        x = blocks.conv3d(
            x, base_filters * 2**level, 2, norm, f"up{level}_conv", strides=2, transpose=True
        )
        x = blocks.norm_act(x, norm, activation, f"up{level}")
        x = tf.keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _residual_stage(x, _convs_at(level), kernel_size, norm, activation, f"dec{level}")
    return tf.keras.Model(inputs, blocks.softmax_head(x, num_classes), name=name)
