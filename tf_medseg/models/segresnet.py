"""SegResNet: the residual encoder-decoder of Myronenko (2018), without the VAE branch.

NVIDIA's BraTS 2018 winning network, shipped by Clara Train beside the U-Net. The encoder is an
initial 3x3x3 convolution followed by levels of pre-activation residual blocks
(norm-ReLU-conv-norm-ReLU-conv plus identity), each level after the first entered through a
strided 3x3x3 convolution that doubles the filters. The lighter decoder halves the filters with
a 1x1x1 convolution, upsamples by 2, adds the encoder features of that level and applies
residual blocks. Group normalisation (8 groups) as in the paper by default.

Myronenko upsamples trilinearly; Keras 2 has no trilinear 3D upsampling layer, so ``upsample``
is nearest-neighbour (after the 1x1x1 convolution, which is what learns) or a transposed
convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_medseg.models import blocks

UPSAMPLING = ("nearest", "deconv")
# Residual blocks per encoder level in the paper; deeper levels (depth > 3) get 4 as well.
PAPER_BLOCKS_DOWN = (1, 2, 2, 4)


def _residual_block(x: tf.Tensor, norm: str, groups: int, name: str) -> tf.Tensor:
    """Pre-activation residual block keeping the number of channels."""
    filters = x.shape[-1]
    y = blocks.norm_act(x, norm, "relu", f"{name}_1", groups)
    y = blocks.conv3d(y, filters, 3, norm, f"{name}_1_conv")
    y = blocks.norm_act(y, norm, "relu", f"{name}_2", groups)
    y = blocks.conv3d(y, filters, 3, norm, f"{name}_2_conv")
    return tf.keras.layers.Add(name=f"{name}_add")([y, x])


def build_segresnet(
    num_classes: int,
    in_channels: int,
    *,
    base_filters: int = 8,
    depth: int = 3,
    blocks_down: Sequence[int] | None = None,
    blocks_up: Sequence[int] | None = None,
    norm: str = "group",
    groups: int = 8,
    dropout: float = 0.0,
    upsample: str = "nearest",
    spatial_size: int | Sequence[int] | None = None,
    name: str = "segresnet",
) -> tf.keras.Model:
    """Builds SegResNet returning per-voxel class probabilities.

    Args:
        num_classes: Output classes, background included (>= 2).
        in_channels: Input channels.
        base_filters: Filters of the first level, doubled at each following level.
        depth: Number of downsampling steps; spatial sizes must be multiples of ``2**depth``.
        blocks_down: Residual blocks per encoder level, ``depth + 1`` entries; by default the
            paper's ``(1, 2, 2, 4)``, cut or extended with 4 to the depth.
        blocks_up: Residual blocks per decoder level, deepest first, ``depth`` entries; one
            each by default.
        norm: One of ``blocks.NORMS``.
        groups: Groups for ``norm="group"``.
        dropout: Spatial dropout rate after the initial convolution (0 disables it).
        upsample: ``nearest`` or ``deconv`` (transposed convolution).
        spatial_size: Optional fixed input size (cube side or (D, H, W)); ``None`` for any size.
        name: Model name.

    Returns:
        A functional model mapping ``(N, D, H, W, in_channels)`` to float32 softmax probabilities
        ``(N, D, H, W, num_classes)``.

    Raises:
        ValueError: On ``blocks_down`` / ``blocks_up`` inconsistent with ``depth``, an unknown
            ``upsample`` or norm, or a fixed spatial size not divisible by ``2**depth``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if blocks_down is None:
        blocks_down = (PAPER_BLOCKS_DOWN + (4,) * depth)[: depth + 1]
    blocks_up = (1,) * depth if blocks_up is None else blocks_up
    if len(blocks_down) != depth + 1 or len(blocks_up) != depth:
        raise ValueError(
            f"depth={depth} needs {depth + 1} blocks_down and {depth} blocks_up entries; got "
            f"blocks_down={tuple(blocks_down)}, blocks_up={tuple(blocks_up)}"
        )
    if upsample not in UPSAMPLING:
        raise ValueError(f"unknown upsample {upsample!r}; expected one of {UPSAMPLING}")
    inputs, x = blocks.model_input(in_channels, 2**depth, spatial_size)
    x = blocks.conv3d(x, base_filters, 3, norm, "stem")
    if dropout > 0:
        x = tf.keras.layers.SpatialDropout3D(dropout, name="stem_dropout")(x)
    skips = []
    for level, count in enumerate(blocks_down):
        if level > 0:
            x = blocks.conv3d(x, base_filters * 2**level, 3, norm, f"down{level}", strides=2)
        for index in range(count):
            x = _residual_block(x, norm, groups, f"enc{level}_block{index}")
        skips.append(x)
    for step, count in enumerate(blocks_up):
        level = depth - 1 - step
        filters = base_filters * 2**level
        if upsample == "deconv":
            x = blocks.conv3d(x, filters, 2, norm, f"up{level}", strides=2, transpose=True)
        else:
            x = blocks.conv3d(x, filters, 1, norm, f"up{level}_reduce")
            x = tf.keras.layers.UpSampling3D(2, name=f"up{level}")(x)
        x = tf.keras.layers.Add(name=f"up{level}_add")([x, skips[level]])
        for index in range(count):
            x = _residual_block(x, norm, groups, f"dec{level}_block{index}")
    x = blocks.norm_act(x, norm, "relu", "head", groups)
    return tf.keras.Model(inputs, blocks.softmax_head(x, num_classes), name=name)
