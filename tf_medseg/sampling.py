"""Adaptive positive/negative patch sampling (the paper's section 5, equations 4, 5 and 6).

Training starts with as many foreground-centred (positive) patches as background-centred
(negative) ones, r = 1:1. After each validation the false positive index r_FP and the false
negative index r_FN (equations 5 and 6, the improved forms with true positives added, so both
tend to 1 as the errors vanish) are computed from the validation confusion sums by
:func:`tf_medseg.metrics.fp_fn_from_sums`, and the ratio for the next epochs is

    r' = (r_FN / r_FP) ** gamma                                              (equation 4)

so that more false positives mean more negative patches and more false negatives more positive
ones. The pipeline samples a positive patch with probability ``r' / (1 + r')``, clamped to a
configurable range so that neither kind of patch disappears. That fraction lives in a
non-trainable ``tf.Variable`` that the pipeline reads inside its ``tf.data`` map, so updating it
in place changes sampling without rebuilding the pipeline, and a ``tf.train.Checkpoint`` that
tracks the :class:`AdaptiveSampler` saves and restores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import metrics

DEFAULT_BOUNDS = (0.1, 0.9)


def fp_fn_indices(
    pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int
) -> tuple[float, float]:
    """Computes the false positive and false negative indices of a prediction.

    Args:
        pred_labels: Integer predicted labels.
        true_labels: Integer ground-truth labels of the same shape.
        num_classes: Number of classes including background.

    Returns:
        ``(r_fp, r_fn)``, equations 5 and 6 averaged over the foreground classes.
    """
    sums = metrics.confusion_sums(pred_labels, true_labels, num_classes)
    r_fp, r_fn = metrics.fp_fn_from_sums(sums)
    return float(r_fp), float(r_fn)


def next_positive_fraction(
    r_fp: float,
    r_fn: float,
    gamma: float = 1.0,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
) -> float:
    """Returns the probability of sampling a positive patch after a validation.

    ``r' = (r_fn / r_fp) ** gamma`` (equation 4) turned into the fraction ``r' / (1 + r')``,
    computed as ``sigmoid(gamma * (log r_fn - log r_fp))`` so that the limits are exact: no
    predicted foreground (``r_fp == 0``) gives the upper bound, no ground-truth foreground
    (``r_fn == 0``) the lower bound. Undefined cases (NaN, 0/0, inf/inf) give 0.5, the
    balanced ratio. The result is clamped to ``bounds``.

    Args:
        r_fp: False positive index (equation 5), >= 0.
        r_fn: False negative index (equation 6), >= 0.
        gamma: Positive exponent controlling the magnitude of changes (the paper uses 1).
        bounds: ``(low, high)`` with ``0 < low <= high < 1``.

    Returns:
        The positive fraction, a float in ``bounds``.

    Raises:
        ValueError: For negative indices, a non-positive gamma or invalid bounds.
    """
    low, high = _check_bounds(bounds)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    r_fp, r_fn = float(r_fp), float(r_fn)
    if r_fp < 0 or r_fn < 0:
        raise ValueError(f"r_fp and r_fn must be >= 0, got r_fp={r_fp}, r_fn={r_fn}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logit = gamma * (np.log(r_fn) - np.log(r_fp))
        fraction = 0.5 if np.isnan(logit) else float(1.0 / (1.0 + np.exp(-logit)))
    return min(max(fraction, low), high)


class AdaptiveSampler(tf.Module):
    """Holds the pipeline's positive patch fraction and updates it after each validation.

    Attributes:
        positive_fraction: Non-trainable float32 ``tf.Variable`` read by the pipeline.
        gamma: Exponent of equation 4.
        bounds: ``(low, high)`` range of the fraction.
        adaptive: When False the fraction stays fixed (the "Non Ada." rows of Table 3), and
            updates only report the indices.
    """

    def __init__(
        self,
        initial_fraction: float = 0.5,
        gamma: float = 1.0,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
        adaptive: bool = True,
        name: str = "adaptive_sampler",
    ):
        """Creates the sampler.

        Args:
            initial_fraction: Positive fraction before the first validation (0.5 is r = 1:1).
            gamma: Positive exponent of equation 4.
            bounds: ``(low, high)`` with ``0 < low <= high < 1``; ``initial_fraction`` must lie
                within them.
            adaptive: Whether validations change the fraction.
            name: Name of the module (and scope of its variable).

        Raises:
            ValueError: For invalid bounds, gamma, or an initial fraction outside the bounds.
        """
        super().__init__(name=name)
        low, high = _check_bounds(bounds)
        if not low <= initial_fraction <= high:
            raise ValueError(f"initial_fraction {initial_fraction} is outside bounds {bounds}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = float(gamma)
        self.bounds = (low, high)
        self.adaptive = bool(adaptive)
        # On the host: the input pipeline reads it per patch, on the CPU; on a GPU machine a
        # variable placed by default on the GPU would cost a device round trip per patch.
        with self.name_scope, tf.device("/CPU:0"):
            self.positive_fraction = tf.Variable(
                float(initial_fraction),
                dtype=tf.float32,
                trainable=False,
                name="positive_fraction",
            )

    def update_from_sums(self, sums: metrics.ConfusionSums | np.ndarray) -> dict[str, float]:
        """Updates the positive fraction in place from validation confusion sums.

        Args:
            sums: Confusion sums over the whole validation set, as a ``ConfusionSums`` or as
                its ``to_array()`` form (e.g. after an all-reduce across workers).

        Returns:
            ``{"r_fp", "r_fn", "ratio", "positive_fraction"}`` as floats; ``ratio`` is r' of
            equation 4 (may be inf or NaN in degenerate cases) and ``positive_fraction`` the
            value now in the variable.
        """
        if isinstance(sums, np.ndarray):
            sums = metrics.ConfusionSums.from_array(sums)
        r_fp, r_fn = (float(v) for v in metrics.fp_fn_from_sums(sums))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = float(np.power(np.float64(r_fn) / np.float64(r_fp), self.gamma))
        if self.adaptive:
            self.positive_fraction.assign(
                next_positive_fraction(r_fp, r_fn, self.gamma, self.bounds)
            )
        fraction = float(self.positive_fraction.numpy())
        logging.info(
            "adaptive sampler: r_fp=%.4f r_fn=%.4f r'=%.4f positive_fraction=%.4f%s",
            r_fp,
            r_fn,
            ratio,
            fraction,
            "" if self.adaptive else " (fixed)",
        )
        return {"r_fp": r_fp, "r_fn": r_fn, "ratio": ratio, "positive_fraction": fraction}


def _check_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """Validates ``(low, high)`` so that the fraction never reaches 0 or 1."""
    if len(bounds) != 2:
        raise ValueError(f"bounds must be (low, high), got {bounds}")
    low, high = float(bounds[0]), float(bounds[1])
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"bounds must satisfy 0 < low <= high < 1, got {bounds}")
    return low, high
