"""Hooks around the training loop: what observes a run (progress; what it records as it goes is
in :mod:`tf_medseg.training.records`).

The loop (:mod:`tf_medseg.training.loop`) calls every hook's ``on_train_begin``,
``on_step_end``, ``on_epoch_end`` and ``on_train_end`` in order, after it has decided and done
what the step or epoch asks (validation, the best model, the sampler, the learning rate,
checkpoints and stops are the loop's, by its :class:`~tf_medseg.training.course.Course`). A
hook reads the typed log of the call (:class:`StepLog`, :class:`EpochLog`) and the run state,
``trainer.state`` (:class:`~tf_medseg.training.state.RunState`); it changes neither. Only the
chief worker (rank 0) has hooks that write files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

from absl import logging

if TYPE_CHECKING:
    from tf_medseg.training.validation import NativeResult, ValidationResult


@dataclasses.dataclass(frozen=True)
class StepLog:
    """A training step, for ``on_step_end``.

    Attributes:
        loss: The last loss read back from the device (every ``--log_every`` steps and at the
            epoch's end; NaN before the epoch's first read-back).
        patches_per_s: Training patches per second in this epoch so far.
        synced: Whether this step read the losses back (``loss`` is this step's).
    """

    loss: float
    patches_per_s: float
    synced: bool


@dataclasses.dataclass
class EpochLog:
    """An epoch's end (or the run's), for ``on_epoch_end`` and ``on_train_end``: the epoch's
    training figures, and what its validation gave when it validated.

    Attributes:
        epoch: Epochs done.
        step: Training steps done.
        loss: The epoch's mean loss (NaN when no step ran).
        patches_per_s: The epoch's training patches per second.
        validation: The validation on the training grid (None: no validation here).
        validation_s: Its seconds.
        native: The validation in the labels' geometry (``--val_native=every``).
        sampler: The adaptive sampler's update from the validation
            (:meth:`tf_medseg.sampling.AdaptiveSampler.update_from_sums`).
    """

    epoch: int
    step: int
    loss: float = float("nan")
    patches_per_s: float = 0.0
    validation: ValidationResult | None = None
    validation_s: float = 0.0
    native: NativeResult | None = None
    sampler: dict | None = None


class Hook:
    """Does nothing; subclasses override what they need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, log: StepLog) -> None:
        pass

    def on_epoch_end(self, trainer, log: EpochLog) -> None:
        pass

    def on_train_end(self, trainer, log: EpochLog) -> None:
        pass


def steps_to_validation(epoch: int, step_in_epoch: int, steps_per_epoch: int, every: int) -> int:
    """Training steps left before the next validation, from inside 1-based ``epoch`` after
    ``step_in_epoch`` of its steps (validation runs after epochs that are multiples of
    ``every``)."""
    next_validation = -(-epoch // every) * every
    return (next_validation - epoch) * steps_per_epoch + max(0, steps_per_epoch - step_in_epoch)


class ProgressHook(Hook):
    """A progress bar per epoch with the step, loss, patches/s and the time left to the next
    validation, and a log line per epoch.

    Args:
        bar: Show the bar (the log line is written either way).
        val_every: Epochs between validations (for the time to the next one).
    """

    def __init__(self, bar: bool = True, val_every: int = 1):
        self.show_bar = bar
        self.val_every = max(1, int(val_every))
        self.bar = None
        self.epoch_start = None
        self.last_loss = None  # the last loss read back from the device

    def on_step_end(self, trainer, log):
        if not self.show_bar:
            return
        # The loop reads the loss back only every --log_every steps and at each epoch's end
        # (NaN before an epoch's first read-back): show the last value read.
        if log.synced or not math.isnan(log.loss):
            self.last_loss = log.loss
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.steps_per_epoch,
                initial=trainer.state.epoch_step - 1,  # a resumed epoch starts in its middle
                desc=f"epoch {trainer.state.epoch + 1}",
                leave=False,
                dynamic_ncols=True,
            )
            self.epoch_start = time.time()
        done = self.bar.n - self.bar.initial + 1  # steps timed in this bar (before update())
        left = steps_to_validation(
            trainer.state.epoch + 1,
            trainer.state.epoch_step,
            trainer.steps_per_epoch,
            self.val_every,
        )
        per_step = (time.time() - self.epoch_start) / done
        # Drawn on an epoch's first step; after that update() draws it at the bar's own rate
        # limit instead of on every step.
        self.bar.set_postfix(
            step=trainer.state.step,
            loss="-" if self.last_loss is None else f"{self.last_loss:.4f}",
            patches_s=f"{log.patches_per_s:.1f}",
            to_val=_duration(left * per_step),
            refresh=done == 1,
        )
        self.bar.update(1)

    def on_epoch_end(self, trainer, log):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        message = (
            f"epoch {log.epoch} step {log.step} loss {log.loss:.4f} "
            f"{log.patches_per_s:.1f} patches/s"
        )
        if log.validation is not None:
            v = log.validation
            message += f" | val dice {v.mean_dice:.4f} (best {trainer.state.best_dice:.4f})"
        logging.info(message)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds / 3600:.1f} h"
