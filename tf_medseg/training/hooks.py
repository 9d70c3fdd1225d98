"""Hooks around the training loop: what observes a run (progress; what it records as it goes is
in :mod:`tf_medseg.training.records`).

The loop (:mod:`tf_medseg.training.loop`) calls every hook's ``on_train_begin``,
``on_step_end``, ``on_epoch_end`` and ``on_train_end`` in order, after it has decided and done
what the step or epoch asks (validation, the best model, the sampler, the learning rate,
checkpoints and stops are the loop's, by its :class:`~tf_medseg.training.course.Course`). A
hook reads the ``logs`` of the call (the loss, patches/s, the validation result and the
sampler's update) and the run state, ``trainer.state``
(:class:`~tf_medseg.training.state.RunState`); it changes neither. Only the chief worker (rank
0) has hooks that write files.
"""

from __future__ import annotations

import math
import time

from absl import logging


class Hook:
    """Does nothing; subclasses override what they need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, logs: dict) -> None:
        pass

    def on_epoch_end(self, trainer, logs: dict) -> None:
        pass

    def on_train_end(self, trainer, logs: dict) -> None:
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

    def on_step_end(self, trainer, logs):
        if not self.show_bar:
            return
        # The loop reads the loss back only every --log_every steps and at each epoch's end
        # (NaN before an epoch's first read-back): show the last value read.
        if logs.get("synced") or not math.isnan(logs["loss"]):
            self.last_loss = logs["loss"]
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
            patches_s=f"{logs['patches_per_s']:.1f}",
            to_val=_duration(left * per_step),
            refresh=done == 1,
        )
        self.bar.update(1)

    def on_epoch_end(self, trainer, logs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        message = (
            f"epoch {logs['epoch']} step {logs['step']} loss {logs['loss']:.4f} "
            f"{logs['patches_per_s']:.1f} patches/s"
        )
        if "validation" in logs:
            v = logs["validation"]
            message += f" | val dice {v.mean_dice:.4f} (best {trainer.state.best_dice:.4f})"
        logging.info(message)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds / 3600:.1f} h"
