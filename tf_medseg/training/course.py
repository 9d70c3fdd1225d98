"""A run's course: when it validates, checkpoints and stops, and what a validation changes.

The training loop (:mod:`tf_medseg.training.loop`) asks a :class:`Course` at each step and each
epoch's end, and applies the answers; the hooks (:mod:`tf_medseg.training.hooks`) only observe.
What a validation changes is decided here, once: the best Dice (and whether the model is saved
as the best), the time to ``--target_dice``, the plateau's counts and the learning rate
(:mod:`tf_medseg.training.plateau`), and the stops. Everything it decides lives in the run state
(:class:`~tf_medseg.training.state.RunState`), which checkpoints hold.

Several workers decide alike: a validation's result is all-reduced, so every worker reaches
the same best, counts and rate; each has its own clock, so the wall-time budget is voted on
(all stop when one is past it) at the loop's sync points, which all reach together, and the
cosine's share of the budget is the workers' mean.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from tf_medseg.optim import current_learning_rate, learning_rate_schedule
from tf_medseg.training import plateau


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


class Course:
    """The decisions of one run.

    Args:
        config: The run's configuration.
        state: The run state the decisions are written to.
        dist: The workers.
        optimizer: The optimiser whose learning-rate schedule the plateau lowers and the
            budget anneals.
    """

    def __init__(self, config, state, dist, optimizer):
        self.config, self.state, self.dist, self.optimizer = config, state, dist, optimizer
        self.rule = config.plateau_rule()
        self.schedule = learning_rate_schedule(optimizer)
        self.bad_steps = 0  # consecutive non-finite losses

    # ------------------------------------------------------------------ when
    def validates_after(self, epoch: int) -> bool:
        """Whether the run validates at the end of 1-based ``epoch``."""
        return epoch % self.config.val_every == 0

    def checkpoints_after(self, epoch: int) -> bool:
        return epoch % self.config.checkpoint_every == 0

    # ------------------------------------------------------------------ what a validation changes
    def begin(self) -> None:
        """Puts a resumed run's learning rate back where its decays and budget left it."""
        if self.schedule is not None:
            self.schedule.set_scale(self.state.lr_scale)
        self._budget_fraction()

    def record(self, result, native=None) -> bool:
        """Records a validation's best Dice and time to the target; True when it is a new best
        (the loop saves the model then). With ``native`` (``--val_native=every``) the target is
        judged on the Dice in the labels' own geometry; the best model on the grid's."""
        state, target = self.state, self.config.target_dice
        wall = state.wall_seconds()
        reached = (native if native is not None else result).mean_dice
        best = bool(np.isfinite(result.mean_dice) and result.mean_dice > state.best_dice)
        if best:
            state.best_dice = float(result.mean_dice)
            state.best_step = state.step
            state.best_wall_s = wall
        if target and reached >= target and not state.reached_target():
            state.time_to_target_s = wall
            state.steps_to_target = state.step
        return best

    def after_validation(self, result, native=None) -> None:
        """An epoch's validation: the plateau's counts, the decay, the plateau and target
        stops (the target on ``native``'s Dice where given, as :meth:`record`)."""
        state, target = self.state, self.config.target_dice
        reached = (native if native is not None else result).mean_dice
        step = plateau.advance(self.rule, state.plateau(), float(result.mean_dice))
        state.set_plateau(step.state)
        if step.decayed and self.schedule is not None:
            self.schedule.set_scale(step.state.scale)
            logging.info(
                "plateau: %d validations without a gain: learning rate x%g (now %.3g)",
                self.rule.decay_patience,
                self.rule.decay_factor,
                current_learning_rate(self.optimizer),
            )
        if step.stop:
            state.stop(plateau.stop_line(self.rule, step.state, state.best_dice, state.best_step))
        if target and reached >= target:
            where = " in the labels' geometry" if native is not None else ""
            state.stop(f"validation Dice{where} {reached:.4f} reached --target_dice {target}")

    # ------------------------------------------------------------------ stops
    def check_loss(self, loss: float, step: int) -> None:
        """Counts the non-finite losses that loss scaling skips (up to 20 in a row under
        ``mixed_float16``); raises on any other.

        Raises:
            NonFiniteLossError: The loss is NaN or infinite (the message names the step).
        """
        if math.isfinite(loss):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        if self.config.precision == "mixed_float16" and self.bad_steps <= 20:
            logging.warning("non-finite loss at step %d: skipped by loss scaling", step)
            return
        raise NonFiniteLossError(
            f"loss became {loss} at step {step}; stopping (the last checkpoint and the best "
            f"model are from before it). Try a lower --learning_rate or --precision=float32."
        )

    def after_step(self, synced: bool = True) -> None:
        """The step bound, and the time budget at the sync points (every ``--log_every``
        steps and the epoch's end, which all workers reach together)."""
        c, state = self.config, self.state
        if c.max_steps and state.step >= c.max_steps:
            state.stop("reached --max_steps")
        elif self.dist.size > 1 and not synced:
            return
        elif c.budget_minutes and self.dist.any_rank(
            state.wall_seconds() >= 60.0 * c.budget_minutes, "stop_budget_minutes"
        ):
            state.stop(f"reached --budget_minutes={c.budget_minutes:g}")

    def after_epoch(self) -> None:
        """The cosine's share of the budget, then the stops of :meth:`after_step`."""
        self._budget_fraction()
        self.after_step()

    def _budget_fraction(self) -> None:
        c = self.config
        if self.schedule is None or not c.budget_minutes or c.lr_schedule != "cosine":
            return
        fraction = self.state.wall_seconds() / (60.0 * c.budget_minutes)
        if self.dist.size > 1:
            fraction = self.dist.allreduce_mean(fraction, "lr_time_fraction")
        self.schedule.set_time_fraction(min(1.0, fraction))
