"""Segmentation losses: the soft Dice loss of the paper (equation 1) and Dice + cross-entropy.

Equation 1 of the paper (after Milletari et al. 2016), for one class with probabilities ``p``
and one-hot ground truth ``g`` over the ``N`` voxels summed::

    l_dice = 1 - 2 * sum(p * g) / (sum(p^2) + sum(g^2) + smooth)

``smooth`` (1e-5) sits in the denominator only, so the 0/0 corner (an empty class predicted
empty) is finite: its Dice term is 0 and its loss term 1, with zero gradient. Such a class
therefore adds a constant to the loss and nothing to the gradient. The loss is computed per
class (foreground classes unless ``include_background``) and averaged, in float32 whatever the
mixed-precision policy of the model that produced ``probs``.

``LOSSES`` is the registry (a plain dict); ``get_loss`` binds options and returns a callable
``loss(labels_onehot, probs) -> scalar``. ``deep_supervision_loss`` wraps such a loss for a
model with auxiliary lower-resolution outputs (nnU-Net's deep supervision): the weighted sum of
the same loss at every output, against the labels taken at that output's resolution.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import tensorflow as tf

_CE_EPSILON = 1e-7


def _select_classes(
    labels_onehot: tf.Tensor, probs: tf.Tensor, include_background: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Casts both tensors to float32 and drops channel 0 unless the background is included."""
    labels = tf.cast(labels_onehot, tf.float32)
    probs = tf.cast(probs, tf.float32)
    if labels.shape.rank is not None and labels.shape.rank < 3:
        raise ValueError(f"expected (N, spatial..., C) tensors, got labels of shape {labels.shape}")
    labels.shape.assert_is_compatible_with(probs.shape)
    if not include_background:
        if labels.shape[-1] is not None and labels.shape[-1] < 2:
            raise ValueError(
                f"include_background=False needs >= 2 channels, got {labels.shape[-1]}"
            )
        labels, probs = labels[..., 1:], probs[..., 1:]
    return labels, probs


def soft_dice_loss(
    labels_onehot: tf.Tensor,
    probs: tf.Tensor,
    include_background: bool = False,
    batch: bool = False,
    smooth: float = 1e-5,
) -> tf.Tensor:
    """Soft Dice loss of equation 1, averaged over classes (and samples).

    Args:
        labels_onehot: One-hot ground truth ``(N, D, H, W, C)`` (any float or int dtype; any
            number of spatial axes).
        probs: Predicted probabilities of the same shape (e.g. a softmax output).
        include_background: Also score channel 0.
        batch: ``False``: sums over the spatial axes of each sample, one Dice per sample and
            class, then the mean. ``True``: sums over the batch and spatial axes, one Dice per
            class over the whole batch, then the mean over classes.
        smooth: Added to the denominator only.

    Returns:
        The float32 scalar loss, in [0, 1] for probabilities in [0, 1].

    Raises:
        ValueError: If the shapes differ, the rank is below 3, or no class is left to score.
    """
    labels, probs = _select_classes(labels_onehot, probs, include_background)
    axes = list(range(0 if batch else 1, labels.shape.rank - 1))
    intersection = tf.reduce_sum(probs * labels, axis=axes)
    denominator = tf.reduce_sum(tf.square(probs), axis=axes) + tf.reduce_sum(
        tf.square(labels), axis=axes
    )
    dice = 2.0 * intersection / (denominator + smooth)
    return 1.0 - tf.reduce_mean(dice)


def cross_entropy_loss(labels_onehot: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """Mean categorical cross-entropy of probabilities over all voxels and samples, in float32.

    Probabilities are clipped to ``[1e-7, 1]`` before the logarithm.

    Args:
        labels_onehot: One-hot ground truth ``(N, spatial..., C)``.
        probs: Predicted probabilities of the same shape.

    Returns:
        The float32 scalar loss.
    """
    labels, probs = _select_classes(labels_onehot, probs, include_background=True)
    log_probs = tf.math.log(tf.clip_by_value(probs, _CE_EPSILON, 1.0))
    return tf.reduce_mean(-tf.reduce_sum(labels * log_probs, axis=-1))


def dice_ce_loss(
    labels_onehot: tf.Tensor,
    probs: tf.Tensor,
    include_background: bool = False,
    batch: bool = False,
    smooth: float = 1e-5,
    ce_weight: float = 1.0,
) -> tf.Tensor:
    """Soft Dice loss (equation 1) plus ``ce_weight`` times the cross-entropy over all classes.

    Args:
        labels_onehot: One-hot ground truth ``(N, spatial..., C)``.
        probs: Predicted probabilities of the same shape.
        include_background: Passed to ``soft_dice_loss`` (the cross-entropy uses all classes).
        batch: Passed to ``soft_dice_loss``.
        smooth: Passed to ``soft_dice_loss``.
        ce_weight: Weight of the cross-entropy term.

    Returns:
        The float32 scalar loss.
    """
    dice = soft_dice_loss(labels_onehot, probs, include_background, batch, smooth)
    return dice + ce_weight * cross_entropy_loss(labels_onehot, probs)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights of the outputs of a deep-supervision model.

    Output ``i`` (0: full resolution, ``i``: ``2**i`` times coarser) weighs ``1 / 2**i``; the
    weights are normalised to sum to 1, so the loss stays on the scale of the one-output loss.
    (nnU-Net v2 also sets the weight of its coarsest decoder output to 0; here every output the
    model has counts.)

    Args:
        num_outputs: Outputs of the model, the full-resolution one included (>= 1).

    Returns:
        ``num_outputs`` weights, halving from one to the next, that sum to 1.

    Raises:
        ValueError: If ``num_outputs < 1``.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    raw = [0.5**i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def nearest_downsample(labels_onehot: tf.Tensor, factor: int) -> tf.Tensor:
    """One-hot labels at ``1 / factor`` of their spatial size, by nearest neighbour.

    Every ``factor``-th voxel along each spatial axis, starting at ``factor // 2``: the voxel at
    (or just after) the centre of each ``factor``-cube, which is what nnU-Net v2 takes
    (``torch.nn.functional.interpolate(mode="nearest-exact")``). Nearest neighbour rather than
    a max-pool of the one-hot: a max-pool marks a block that holds several classes with all of
    them (a liver voxel and a lesion voxel make both 1), a target no softmax can reach, which
    biases the Dice towards dilated masks and gives the cross-entropy a target that sums to more
    than 1. Nearest neighbour keeps one class per voxel, at the price that a structure thinner
    than ``factor`` voxels may vanish from that level (whose weight is small).

    Args:
        labels_onehot: ``(N, spatial..., C)``, spatial sizes divisible by ``factor``.
        factor: The downsampling factor (1: unchanged).

    Returns:
        ``(N, spatial / factor..., C)``.
    """
    if factor == 1:
        return labels_onehot
    spatial = (slice(factor // 2, None, factor),) * (len(labels_onehot.shape) - 2)
    return labels_onehot[(slice(None), *spatial, slice(None))]


def _weighted_over_outputs(
    labels_onehot: tf.Tensor,
    outputs: Sequence[tf.Tensor],
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    weights: Sequence[float],
) -> tf.Tensor:
    if len(outputs) != len(weights):
        raise ValueError(
            f"deep supervision over {len(weights)} outputs got {len(outputs)} "
            "(the model's outputs, full resolution first)"
        )
    terms = [
        weight * loss(nearest_downsample(labels_onehot, 2**level), probs)
        for level, (weight, probs) in enumerate(zip(weights, outputs, strict=True))
    ]
    return tf.add_n(terms)


def deep_supervision_loss(
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], num_outputs: int
) -> Callable[[tf.Tensor, Sequence[tf.Tensor]], tf.Tensor]:
    """``loss`` over the outputs of a deep-supervision model, weighted as nnU-Net weighs them.

    The returned callable takes the full-resolution one-hot labels and the model's list of
    outputs (full resolution first, output ``i`` at ``1 / 2**i`` of it) and returns
    ``sum_i w_i * loss(nearest_downsample(labels, 2**i), outputs[i])`` with the weights of
    :func:`deep_supervision_weights`: the same loss (Dice, Dice + CE or CE, with its options)
    at every level, in float32.

    Args:
        loss: A loss from :func:`get_loss`.
        num_outputs: The model's outputs, the full-resolution one included.

    Returns:
        A callable ``loss(labels_onehot, outputs) -> float32 scalar``.
    """
    weights = tuple(deep_supervision_weights(num_outputs))
    return functools.partial(_weighted_over_outputs, loss=loss, weights=weights)


LOSSES: dict[str, Callable[..., tf.Tensor]] = {
    "dice": soft_dice_loss,
    "dice_ce": dice_ce_loss,
    "ce": cross_entropy_loss,
}


def get_loss(name: str, **options) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Returns the registered loss ``name`` with ``options`` bound.

    Args:
        name: A key of ``LOSSES``: ``dice``, ``dice_ce`` or ``ce``.
        **options: Keyword options of that loss (e.g. ``include_background``, ``batch``).

    Returns:
        A callable ``loss(labels_onehot, probs) -> float32 scalar``.

    Raises:
        ValueError: If ``name`` is unknown or an option is not a parameter of the loss.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    loss = LOSSES[name]
    accepted = set(inspect.signature(loss).parameters) - {"labels_onehot", "probs"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"loss {name!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}"
        )
    return functools.partial(loss, **options)
