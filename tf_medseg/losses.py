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
``loss(labels_onehot, probs) -> scalar``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

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
