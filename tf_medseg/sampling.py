"""Adaptive positive/negative patch sampling (the paper's section 5, equations 4, 5 and 6).

Training starts with as many foreground-centred (positive) patches as background-centred
(negative) ones, r = 1:1. After each validation the false positive index r_FP and the false
negative index r_FN (equations 5 and 6, the improved forms with true positives added, so both
tend to 1 as the errors vanish) are computed from the validation confusion sums by
:func:`tf_medseg.metrics.fp_fn_from_sums`, and the ratio for the next epochs is

    r' = (r_FN / r_FP) ** gamma                                              (equation 4)

so that more false positives mean more negative patches and more false negatives more positive
ones. The pipeline samples a positive patch with probability ``r' / (1 + r')``, clamped to a
configurable range so that neither kind of patch disappears (the clamp is this package's: the
paper has none, and equation 4 alone reaches 0 or 1 when one kind of error vanishes). That
fraction lives in a non-trainable ``tf.Variable`` that the pipeline reads inside its
``tf.data`` map, so updating it in place changes sampling without rebuilding the pipeline, and
a ``tf.train.Checkpoint`` that tracks the :class:`AdaptiveSampler` saves and restores it.

Applied as written, equation 4 reacts to the first validation of an untrained model, which may
mark foreground nearly everywhere (r_FP near 1, r_FN near 0), and drives the fraction
to its lower bound at once; with a lower bound of 0.1 a small class (a lesion) is then rarely
seen and may never be learned. Three additions, each with a neutral value that gives the paper's
update (within the widest clamp, ``WIDE_BOUNDS``):

* **warm-up**: the fraction is not changed by the first ``warmup_validations`` validations, nor
  by any before one whose mean Dice reaches ``warmup_dice`` (once reached, the warm-up is over
  for good). Neutral: 0 and 0.
* **damping**: the fraction moves from its current value towards equation 4's (clamped) value
  by the fraction ``damping`` of the way, in log-odds: ``logit(f') = logit(f) + damping *
  (logit(f_eq4) - logit(f))``. Neutral: 1.
* **a floor that keeps the foreground**: the training configuration's lower bound is 1/3 (nnU-Net
  centres a third of its patches on foreground), not the 0.1 of ``WIDE_BOUNDS``, the widest
  clamp, which ``--sampler=paper`` keeps (the paper has no clamp). Neutral: 0.1.

The constructor's defaults are the neutral values (the paper's update, clamped to
``WIDE_BOUNDS``); the training configuration's defaults
(:class:`tf_medseg.config.TrainConfig`) are the additions'. The warm-up's state
(validations seen, warm-up over) is held in variables beside the fraction, so it is checkpointed
with it and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import metrics

#: The widest clamp of the positive fraction, the constructor's default and ``--sampler=paper``'s:
#: the paper has no clamp, but equation 4 alone gives 0 or 1 when one kind of error vanishes, and
#: either would leave one kind of patch out for good.
WIDE_BOUNDS = (0.1, 0.9)


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
    bounds: tuple[float, float] = WIDE_BOUNDS,
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


def damped_fraction(current: float, target: float, damping: float) -> float:
    """Moves a fraction towards a target by the share ``damping`` of the way, in log-odds.

    ``logit(result) = logit(current) + damping * (logit(target) - logit(current))``. The
    log-odds of a fraction ``r' / (1 + r')`` is ``log r'``, so the ratio moves geometrically,
    ``r'_new = r'_now ** (1 - damping) * r'_target ** damping``: from 1:1 towards 1:4 with
    damping 0.5 it goes to 1:2. ``damping == 1`` returns ``target`` exactly (the paper's
    update).

    Args:
        current: The fraction now, in (0, 1).
        target: Where equation 4 would put it, in (0, 1) (clamp it to the bounds first).
        damping: The share of the way to go, in (0, 1].

    Returns:
        The new fraction, between ``current`` and ``target``.

    Raises:
        ValueError: For a damping outside (0, 1] or fractions outside (0, 1).
    """
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    if not (0.0 < current < 1.0 and 0.0 < target < 1.0):
        raise ValueError(f"fractions must be in (0, 1), got {current} and {target}")
    if damping == 1.0:
        return float(target)
    logit = lambda f: np.log(f) - np.log1p(-f)  # noqa: E731
    moved = logit(current) + damping * (logit(target) - logit(current))
    return float(1.0 / (1.0 + np.exp(-moved)))


class AdaptiveSampler(tf.Module):
    """Holds the pipeline's positive patch fraction and updates it after each validation.

    Attributes:
        positive_fraction: Non-trainable float32 ``tf.Variable`` read by the pipeline.
        validations_seen: Non-trainable int64 ``tf.Variable``: validations reported so far.
        warmed_up: Non-trainable bool ``tf.Variable``: the warm-up is over (validations may
            change the fraction).
        gamma: Exponent of equation 4.
        bounds: ``(low, high)`` range of the fraction.
        adaptive: When False the fraction stays fixed (the "Non Ada." rows of Table 3), and
            updates only report the indices.
        warmup_validations: Validations at the start that never change the fraction.
        warmup_dice: Mean validation Dice that ends the warm-up (0: none needed).
        damping: Share of the way to equation 4's fraction taken per validation, in log-odds.
    """

    def __init__(
        self,
        initial_fraction: float = 0.5,
        gamma: float = 1.0,
        bounds: tuple[float, float] = WIDE_BOUNDS,
        adaptive: bool = True,
        warmup_validations: int = 0,
        warmup_dice: float = 0.0,
        damping: float = 1.0,
        name: str = "adaptive_sampler",
    ):
        """Creates the sampler. The defaults are the paper's update, clamped to ``WIDE_BOUNDS``.

        Args:
            initial_fraction: Positive fraction before the first update (0.5 is r = 1:1).
            gamma: Positive exponent of equation 4.
            bounds: ``(low, high)`` with ``0 < low <= high < 1``; ``initial_fraction`` must lie
                within them.
            adaptive: Whether validations change the fraction.
            warmup_validations: The first this many validations do not change the fraction
                (>= 0).
            warmup_dice: No validation changes the fraction before one whose mean Dice reaches
                this (in [0, 1]; 0: no condition).
            damping: Share of the way from the current fraction to equation 4's taken per
                update, in log-odds (in (0, 1]; 1: all of it, the paper).
            name: Name of the module (and scope of its variables).

        Raises:
            ValueError: For invalid bounds, gamma, warm-up or damping, or an initial fraction
                outside the bounds.
        """
        super().__init__(name=name)
        low, high = _check_bounds(bounds)
        if not low <= initial_fraction <= high:
            raise ValueError(f"initial_fraction {initial_fraction} is outside bounds {bounds}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if warmup_validations < 0:
            raise ValueError(f"warmup_validations must be >= 0, got {warmup_validations}")
        if not 0.0 <= warmup_dice <= 1.0:
            raise ValueError(f"warmup_dice must be in [0, 1], got {warmup_dice}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        self.gamma = float(gamma)
        self.bounds = (low, high)
        self.adaptive = bool(adaptive)
        self.warmup_validations = int(warmup_validations)
        self.warmup_dice = float(warmup_dice)
        self.damping = float(damping)
        # On the host: the input pipeline reads it per patch, on the CPU; on a GPU machine a
        # variable placed by default on the GPU would cost a device round trip per patch.
        with self.name_scope, tf.device("/CPU:0"):
            self.positive_fraction = tf.Variable(
                float(initial_fraction),
                dtype=tf.float32,
                trainable=False,
                name="positive_fraction",
            )
            self.validations_seen = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="validations_seen"
            )
            self.warmed_up = tf.Variable(False, dtype=tf.bool, trainable=False, name="warmed_up")

    def _warm_up(self, seen: int, mean_dice: float | None) -> bool:
        """Whether the warm-up is over after the ``seen``-th validation (1-based)."""
        if bool(self.warmed_up.numpy()):
            return True
        if seen <= self.warmup_validations:
            return False
        if self.warmup_dice > 0.0 and mean_dice is not None:
            if not float(mean_dice) >= self.warmup_dice:  # NaN: no case with foreground
                return False
        return True

    def update_from_sums(
        self, sums: metrics.ConfusionSums | np.ndarray, mean_dice: float | None = None
    ) -> dict:
        """Updates the positive fraction in place from validation confusion sums.

        Args:
            sums: Confusion sums over the whole validation set, as a ``ConfusionSums`` or as
                its ``to_array()`` form (e.g. after an all-reduce across workers).
            mean_dice: The validation's mean Dice, for the warm-up's Dice condition (None: the
                condition is not checked, only the count).

        Returns:
            ``r_fp``, ``r_fn`` (equations 5 and 6, averaged over the foreground classes);
            ``ratio``, r' of equation 4 (may be inf or NaN in degenerate cases);
            ``target_fraction``, equation 4's fraction clamped to the bounds;
            ``positive_fraction``, the value now in the variable; ``updated``, whether this
            validation changed it (adaptive and past the warm-up); ``warmed_up``, whether the
            warm-up is over.
        """
        if isinstance(sums, np.ndarray):
            sums = metrics.ConfusionSums.from_array(sums)
        r_fp, r_fn = (float(v) for v in metrics.fp_fn_from_sums(sums))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = float(np.power(np.float64(r_fn) / np.float64(r_fp), self.gamma))
        target = next_positive_fraction(r_fp, r_fn, self.gamma, self.bounds)
        seen = int(self.validations_seen.numpy()) + 1
        self.validations_seen.assign(seen)
        warm = self._warm_up(seen, mean_dice)
        self.warmed_up.assign(warm)
        updated = self.adaptive and warm
        if updated:
            current = min(
                max(float(self.positive_fraction.numpy()), self.bounds[0]), self.bounds[1]
            )
            self.positive_fraction.assign(damped_fraction(current, target, self.damping))
        fraction = float(self.positive_fraction.numpy())
        if not self.adaptive:
            note = " (fixed)"
        elif not warm:
            note = (
                f" (warm-up: validation {seen}, unchanged for {self.warmup_validations} and "
                f"until the mean Dice reaches {self.warmup_dice:g})"
            )
        else:
            note = ""
        logging.info(
            "adaptive sampler: r_fp=%.4f r_fn=%.4f r'=%.4f equation 4: %.4f, "
            "positive_fraction=%.4f%s",
            r_fp,
            r_fn,
            ratio,
            target,
            fraction,
            note,
        )
        return {
            "r_fp": r_fp,
            "r_fn": r_fn,
            "ratio": ratio,
            "target_fraction": target,
            "positive_fraction": fraction,
            "updated": updated,
            "warmed_up": warm,
        }


def _check_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """Validates ``(low, high)`` so that the fraction never reaches 0 or 1."""
    if len(bounds) != 2:
        raise ValueError(f"bounds must be (low, high), got {bounds}")
    low, high = float(bounds[0]), float(bounds[1])
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"bounds must satisfy 0 < low <= high < 1, got {bounds}")
    return low, high
