"""The run state: what a training run knows about itself, in one place.

The loop and the hooks read and write it (the step, the epoch, the best Dice, the stop reason,
the losses), instead of setting attributes on the trainer. Its counters live on the host as
plain Python numbers, so that nothing reads a device variable per step; :meth:`RunState.store`
copies them into the ``tf.Variable`` s that a checkpoint saves, :meth:`RunState.load` back after
a restore.

What is checkpointed (besides the model, the optimiser and the sampler): ``step``; ``epoch`` (the
epoch being trained); ``epoch_step`` (steps of that epoch already taken: a run stopped in the
middle of an epoch resumes at the next batch, not at the epoch's first); ``elapsed_s`` (wall time
of the earlier sessions); the best validation Dice and when it was reached; the time and steps
to ``--target_dice``; the plateau stop's and decay's counts and the learning rate's scale
(:mod:`tf_medseg.training.plateau`); and ``cache_state``, the training source's position at the
start of the current epoch (JSON; every worker's with several).
"""

from __future__ import annotations

import time

import tensorflow as tf

#: The checkpointed counters: name -> (dtype, initial value).
SAVED = {
    "step": (tf.int64, 0),
    "epoch": (tf.int64, 0),
    "epoch_step": (tf.int64, 0),
    "elapsed_s": (tf.float64, 0.0),
    "best_dice": (tf.float64, -1.0),
    "best_step": (tf.int64, 0),
    "best_wall_s": (tf.float64, 0.0),
    "time_to_target_s": (tf.float64, -1.0),
    "steps_to_target": (tf.int64, 0),
    "cache_state": (tf.string, ""),
    "plateau_reference": (tf.float64, -1.0),
    "plateau_stale": (tf.int64, 0),
    "plateau_since_decay": (tf.int64, 0),
    "lr_scale": (tf.float64, 1.0),
}


#: Where a session's wall time goes (:meth:`RunState.time_split`); ``training`` is the training
#: loop's time (steps, input waits, per-step hooks), counted by :meth:`RunState.count_epoch`.
TIME_PARTS = (
    "cache_fill",
    "graph",
    "training",
    "validation",
    "checkpoints",
    "postprocessing",
    "native_validation",
)

#: Per-step losses a run state keeps (the last ones: a long run's would grow without bound).
RECENT_LOSSES = 10_000


class RunState(tf.Module):
    """A run's counters (checkpointed) and this session's tallies (not checkpointed).

    Attributes:
        step, epoch, epoch_step, elapsed_s, best_dice, best_step, best_wall_s,
            time_to_target_s, steps_to_target, plateau_reference, plateau_stale,
            plateau_since_decay, lr_scale, cache_state: the checkpointed counters (see the
            module docstring); ``best_dice`` is -1 and ``time_to_target_s`` -1 until set.
        variables_by_name: The ``tf.Variable`` s a checkpoint saves, by the names above.
        stop_reason: Why the run stops (None: it goes on).
        losses: This session's last :data:`RECENT_LOSSES` per-step training losses, in order.
        train_seconds, train_patches: Training-loop time and patches of this session.
        steady_seconds, steady_patches: The same without this session's first epoch.
        epochs_run: Epochs (complete or not) this session ran.
    """

    def __init__(self, start: float | None = None):
        """Args: start: When this session started (``time.time()``; default: now)."""
        super().__init__(name="run_state")
        self.variables_by_name = {
            name: tf.Variable(initial, dtype=dtype, trainable=False, name=name)
            for name, (dtype, initial) in SAVED.items()
        }
        for name, (_, initial) in SAVED.items():
            setattr(self, name, initial)
        self.stop_reason: str | None = None
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.train_patches = 0
        self.steady_seconds = 0.0
        self.steady_patches = 0
        self.epochs_run = 0
        self._session_start = time.time() if start is None else float(start)
        self._started = self._session_start
        self.seconds = dict.fromkeys(TIME_PARTS, 0.0)

    # ------------------------------------------------------------------ checkpoint
    def store(self) -> None:
        """Copies the counters into their variables (before a checkpoint is written); the
        wall time so far is added to ``elapsed_s``."""
        now = time.time()
        self.elapsed_s += now - self._session_start
        self._session_start = now
        for name, variable in self.variables_by_name.items():
            variable.assign(getattr(self, name))

    def load(self) -> None:
        """Reads the counters back from their variables (after a checkpoint is restored)."""
        for name, variable in self.variables_by_name.items():
            value = variable.numpy()
            kind = SAVED[name][0]
            setattr(
                self,
                name,
                value.decode()
                if kind == tf.string
                else int(value)
                if kind.is_integer
                else float(value),
            )

    # ------------------------------------------------------------------ the loop's tallies
    def stop(self, reason: str) -> None:
        """Ends the run after the current step (the first reason given is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def record_losses(self, values: list[float]) -> None:
        """Adds steps' losses, keeping the last :data:`RECENT_LOSSES`."""
        self.losses.extend(values)
        del self.losses[:-RECENT_LOSSES]

    def add_seconds(self, part: str, seconds: float) -> None:
        """Counts ``seconds`` of this session in one of :data:`TIME_PARTS`."""
        self.seconds[part] += seconds

    def time_split(self) -> dict[str, float]:
        """This session's wall time by part (:data:`TIME_PARTS`), and ``other``: the rest
        (set-up, reading the data, the epoch boundaries' swaps and logs)."""
        split = {part: round(value, 3) for part, value in self.seconds.items()}
        split["other"] = round(
            max(0.0, time.time() - self._started - sum(self.seconds.values())), 3
        )
        return split

    def count_epoch(self, seconds: float, patches: int) -> None:
        """Adds an epoch's (or its part's) training time and patches to the tallies."""
        self.seconds["training"] += seconds
        self.train_seconds += seconds
        self.train_patches += patches
        if self.epochs_run:
            self.steady_seconds += seconds
            self.steady_patches += patches
        self.epochs_run += 1

    def wall_seconds(self) -> float:
        """Wall time of the run, including earlier sessions it resumed, set-up and cache fill."""
        return self.elapsed_s + time.time() - self._session_start

    def patches_per_s(self) -> float:
        """Training patches per second of training-loop time (validation excluded)."""
        return self.train_patches / self.train_seconds if self.train_seconds else 0.0

    def steady_patches_per_s(self) -> float | None:
        """As :meth:`patches_per_s` without this session's first epoch, whose graph tracing and
        optimisation take seconds; None before a second epoch has run."""
        return self.steady_patches / self.steady_seconds if self.steady_seconds else None

    def plateau(self):
        """The plateau counters as a :class:`~tf_medseg.training.plateau.PlateauState`."""
        from tf_medseg.training.plateau import PlateauState

        return PlateauState(
            self.plateau_reference, self.plateau_stale, self.plateau_since_decay, self.lr_scale
        )

    def set_plateau(self, plateau) -> None:
        self.plateau_reference = plateau.reference
        self.plateau_stale = plateau.stale
        self.plateau_since_decay = plateau.since_decay
        self.lr_scale = plateau.scale

    def summary(self, target_dice: float = 0.0) -> dict:
        """What the run has reached so far, for ``summary.json`` (numbers rounded; None where
        not reached)."""
        steady = self.steady_patches_per_s()
        reached = self.reached_target()
        return {
            "best_dice": round(self.best_dice, 6) if self.best_dice >= 0 else None,
            "best_step": self.best_step,
            "best_wall_s": round(self.best_wall_s, 3),
            "target_dice": target_dice or None,
            "time_to_target_s": round(self.time_to_target_s, 3) if reached else None,
            "steps_to_target": self.steps_to_target if reached else None,
            "steps": self.step,
            "epochs": self.epoch,
            "wall_s": round(self.wall_seconds(), 3),
            "patches_per_s": round(self.patches_per_s(), 3),
            "steady_patches_per_s": None if steady is None else round(steady, 3),
            "stop_reason": self.stop_reason,
            "learning_rate_scale": round(self.lr_scale, 6),
            "time_split": self.time_split(),
        }

    def reached_target(self) -> bool:
        return self.time_to_target_s >= 0
