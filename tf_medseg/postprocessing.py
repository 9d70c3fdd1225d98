"""Post-processing chosen by validation: keep a class's largest component only where it helps.

Keeping the largest connected component removes a class's stray islands: right for a single
organ, wrong for a class with several true components (lesions, vessels) and useless for a model
whose islands are rare. As nnU-Net does, the decision is taken per class from the validation
cases' predictions: for each foreground class, the mean Dice over the cases where the class is
labelled, with and without its largest component kept (the other classes untouched); the class
is post-processed when that raises its mean Dice by more than ``min_gain``. The decision and the
figures it rests on are a small JSON file of the run folder (``postprocessing.json``), which
predict, ensembles and the serving export read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np

from tf_medseg import metrics, rundir
from tf_medseg.inference.window import keep_largest_component
from tf_medseg.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class PostprocessingDecision:
    """Which classes keep only their largest component, and why.

    Attributes:
        keep_largest: The foreground classes to post-process, ascending.
        dice_without: Per foreground class (index ``c - 1``), the mean validation Dice of the
            raw predictions (NaN where the class is labelled in no case).
        dice_with: The same with only that class's largest component kept.
        cases: The validation cases the decision rests on.
        min_gain: The Dice gain a class needed.
    """

    keep_largest: tuple[int, ...]
    dice_without: tuple[float, ...]
    dice_with: tuple[float, ...]
    cases: int
    min_gain: float = 0.0

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        for key in ("dice_without", "dice_with"):
            values[key] = [None if np.isnan(v) else float(v) for v in values[key]]
        values["keep_largest"] = list(self.keep_largest)
        return json.dumps(values, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PostprocessingDecision:
        values = json.loads(text)
        for key in ("dice_without", "dice_with"):
            values[key] = tuple(np.nan if v is None else float(v) for v in values[key])
        values["keep_largest"] = tuple(int(c) for c in values["keep_largest"])
        return cls(**values)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with the chosen classes' largest components kept (a copy)."""
        if not self.keep_largest:
            return np.array(labels, copy=True)
        return keep_largest_component(labels, classes=self.keep_largest)

    def describe(self) -> str:
        """One line per foreground class: its Dice without and with, and the choice."""
        lines = []
        for c, (without, with_) in enumerate(
            zip(self.dice_without, self.dice_with, strict=True), start=1
        ):
            verdict = "kept largest component" if c in self.keep_largest else "left as predicted"
            lines.append(
                f"class {c}: validation Dice {without:.4f} as predicted, {with_:.4f} with its "
                f"largest component only ({self.cases} cases): {verdict}"
            )
        return "\n".join(lines)


def case_dice(
    prediction: np.ndarray, label: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One case's per-class Dice as predicted, and with each class's largest component kept
    (that class alone); NaN where the class is not labelled.

    Returns:
        Two float64 arrays ``(num_classes - 1,)``: without and with.
    """
    prediction = np.asarray(prediction)
    without = metrics.dice_per_class(prediction, label, num_classes)
    with_ = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        cleaned = keep_largest_component(prediction, classes=[c])
        with_[c - 1] = metrics.dice_per_class(cleaned, label, num_classes)[c - 1]
    return without, with_


def decide_from_dice(
    without: np.ndarray, with_: np.ndarray, min_gain: float = 0.0
) -> PostprocessingDecision:
    """The decision from per-case Dice rows (:func:`case_dice`), ``(num_cases, num_classes - 1)``
    each: a class is post-processed where its mean Dice with is above its mean without by more
    than ``min_gain``.

    Raises:
        ValueError: When there are no cases.
    """
    without, with_ = np.atleast_2d(without), np.atleast_2d(with_)
    if without.size == 0:
        raise ValueError("no validation cases to decide the post-processing on")
    mean_without = metrics.mean_dice_per_class(without)
    mean_with = metrics.mean_dice_per_class(with_)
    chosen = tuple(
        c + 1
        for c in range(len(mean_without))
        if not np.isnan(mean_without[c]) and mean_with[c] > mean_without[c] + min_gain
    )
    return PostprocessingDecision(
        keep_largest=chosen,
        dice_without=tuple(float(v) for v in mean_without),
        dice_with=tuple(float(v) for v in mean_with),
        cases=len(without),
        min_gain=float(min_gain),
    )


def decide(
    cases: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, min_gain: float = 0.0
) -> PostprocessingDecision:
    """Decides per class whether keeping its largest component raises the mean Dice.

    Args:
        cases: ``(prediction, label)`` integer volumes of the same shape, per validation case.
        num_classes: Classes including background.
        min_gain: The mean Dice gain a class needs (0: any gain).

    Returns:
        The decision.

    Raises:
        ValueError: When there are no cases.
    """
    rows = [case_dice(prediction, label, num_classes) for prediction, label in cases]
    if not rows:
        raise ValueError("no validation cases to decide the post-processing on")
    without, with_ = (np.stack(column) for column in zip(*rows, strict=True))
    return decide_from_dice(without, with_, min_gain)


def write_decision(folder: str, decision: PostprocessingDecision) -> str:
    """Writes the decision to the run folder (atomically); returns its path."""
    return RunDir(folder).write_text(rundir.POSTPROCESSING, decision.to_json())


def read_decision(folder: str) -> PostprocessingDecision | None:
    """The decision in a run folder, or None when it has none.

    Raises:
        ValueError: The file is there but unreadable (one line naming it).
    """
    path = RunDir(folder).postprocessing
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return PostprocessingDecision.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: not a readable post-processing choice ({type(err).__name__}: {err}); "
            "remove it (predict then uses the run's --val_keep_largest) or train again"
        ) from err
