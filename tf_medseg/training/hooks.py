"""Hooks around the training loop: validation, sampler update, logging, checkpoints, stopping.

The loop (:mod:`tf_medseg.training.loop`) calls every hook's ``on_train_begin``, ``on_step_end``,
``on_epoch_end`` and ``on_train_end`` in order; hooks talk to each other through the ``logs``
dict of the call (validation puts its result there, the sampler hook reads it, the loggers write
it). What outlives a call (the step, the best Dice, the time to the target, the stop reason) is in
the run state, ``trainer.state`` (:class:`~tf_medseg.training.state.RunState`), which hooks read
and write instead of setting attributes on the trainer. Only the chief worker (rank 0) writes
files.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg.jsonio import dumps, write_text
from tf_medseg.optim import current_learning_rate, learning_rate_schedule
from tf_medseg.training import plateau


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


class ValidationHook(Hook):
    """Runs validation every ``every`` epochs (and at the end) and keeps the best model."""

    def __init__(self, every: int):
        self.every = every
        self.last_step = None

    def run(self, trainer, logs):
        state, target = trainer.state, trainer.config.target_dice
        start = time.time()
        result = trainer.validate()
        logs["validation"] = result
        logs["validation_s"] = time.time() - start
        self.last_step = state.step
        wall = state.wall_seconds()
        if np.isfinite(result.mean_dice) and result.mean_dice > state.best_dice:
            state.best_dice = float(result.mean_dice)
            state.best_step = state.step
            state.best_wall_s = wall
            trainer.export_best_model()
        if target and result.mean_dice >= target and not state.reached_target():
            state.time_to_target_s = wall
            state.steps_to_target = state.step

    def on_epoch_end(self, trainer, logs):
        if logs["epoch"] % self.every == 0:
            self.run(trainer, logs)

    def on_train_end(self, trainer, logs):
        # The last epoch may have been cut short (max steps, time): score the final weights.
        if self.last_step != trainer.state.step:
            self.run(trainer, logs)


class SamplerHook(Hook):
    """Updates the positive/negative sampling ratio from the validation sums (equations 4-6);
    the validation's mean Dice ends the sampler's warm-up."""

    def on_epoch_end(self, trainer, logs):
        if "validation" in logs:
            v = logs["validation"]
            logs["sampler"] = trainer.sampler.update_from_sums(v.sums, mean_dice=v.mean_dice)

    on_train_end = on_epoch_end


def _contour(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def contour_overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """An RGB uint8 slice: the image in grey, true contours red, predicted contours green."""
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[_contour(label > 0)] = [1.0, 0.0, 0.0]
    rgb[_contour(pred > 0)] = [0.0, 1.0, 0.0]
    # Axis 0 is x (left-right): show it horizontally, anterior up.
    return (np.transpose(rgb, (1, 0, 2))[::-1] * 255).astype(np.uint8)


class TensorBoardHook(Hook):
    """Scalars (loss, learning rate, loss scale, patches/s, Dice, FP/FN indices, sampler ratio,
    cache statistics) and a validation slice with contours, in ``workdir/tensorboard``. The
    per-step scalars are written at the loop's sync points (every ``--log_every`` steps)."""

    def __init__(self, logdir: str, images: bool = True):
        self.logdir = logdir
        self.images = images
        self.writer = None

    def on_train_begin(self, trainer):
        self.writer = tf.summary.create_file_writer(self.logdir)

    def on_step_end(self, trainer, logs):
        if not logs.get("synced"):  # the loss is read back every --log_every steps
            return
        with self.writer.as_default(step=trainer.state.step):
            tf.summary.scalar("train/loss", logs["loss"])
            tf.summary.scalar("train/learning_rate", current_learning_rate(trainer.optimizer))
            if hasattr(trainer.optimizer, "loss_scale"):
                tf.summary.scalar("train/loss_scale", float(trainer.optimizer.loss_scale))

    def on_epoch_end(self, trainer, logs):
        step = trainer.state.step
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/epoch_loss", logs["loss"])
            tf.summary.scalar("train/patches_per_s", logs["patches_per_s"])
            for key, value in trainer.cache_stats().items():
                if isinstance(value, int | float) and math.isfinite(value):
                    tf.summary.scalar(f"cache/{key}", value)
            if "validation" in logs:
                v = logs["validation"]
                tf.summary.scalar("val/mean_dice", v.mean_dice)
                for name, dice in zip(trainer.task.labels[1:], v.dice, strict=True):
                    tf.summary.scalar(f"val/dice_{name.replace(' ', '_')}", dice)
                for metric, values in v.surface.items():
                    for name, value in zip(trainer.task.labels[1:], values, strict=True):
                        tf.summary.scalar(f"val/{metric}_{name.replace(' ', '_')}", value)
                tf.summary.scalar("val/r_fp", v.r_fp)
                tf.summary.scalar("val/r_fn", v.r_fn)
                for name, r_fp, r_fn in zip(
                    trainer.task.labels[1:], v.r_fp_per_class, v.r_fn_per_class, strict=True
                ):
                    tf.summary.scalar(f"val/r_fp_{name.replace(' ', '_')}", r_fp)
                    tf.summary.scalar(f"val/r_fn_{name.replace(' ', '_')}", r_fn)
                tf.summary.scalar("val/seconds", logs["validation_s"])
                if self.images and v.example is not None:
                    overlay = contour_overlay(*v.example)
                    tf.summary.image("val/slice_true_red_pred_green", overlay[None], step=step)
            tf.summary.scalar(
                "sampler/positive_fraction", float(trainer.sampler.positive_fraction.numpy())
            )
            if "sampler" in logs:
                tf.summary.scalar("sampler/equation_4_fraction", logs["sampler"]["target_fraction"])
        self.writer.flush()

    def on_train_end(self, trainer, logs):
        if "validation" in logs:
            self.on_epoch_end(trainer, logs)
        self.writer.close()


class ProfileHook(Hook):
    """Traces the steps after ``start`` up to ``end`` with ``tf.profiler`` into ``logdir``.

    The trace holds the train step's ops and the input pipeline's threads; TensorBoard shows it
    under Profile (with the profile plugin installed) and ``python -m
    tf_medseg.bench.step_profile`` prints its most expensive ops.
    """

    def __init__(self, logdir: str, start: int, end: int):
        self.logdir = logdir
        self.start, self.end = int(start), int(end)
        self.running = False

    def _stop(self) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False
            logging.info("profile of steps %d-%d in %s", self.start + 1, self.end, self.logdir)

    def _start_at(self, step: int) -> None:
        if step == self.start and not self.running:
            tf.profiler.experimental.start(self.logdir)
            self.running = True

    def on_train_begin(self, trainer):
        self._start_at(trainer.state.step)

    def on_step_end(self, trainer, logs):
        step = trainer.state.step
        if step >= self.end:
            self._stop()
        else:
            self._start_at(step)

    def on_train_end(self, trainer, logs):
        self._stop()


class WorkdirError(RuntimeError):
    """A file of the run's workdir cannot be written (a full disk, a quota, a read-only folder)
    or read back (a corrupt ``metrics.jsonl``); the message names the file and the reason."""


def write_run_file(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (the old file stays whole until the new one is
    complete on disk).

    Raises:
        WorkdirError: The write failed; the message names the file and the system's reason.
    """
    try:
        write_text(path, text)
    except OSError as err:
        raise WorkdirError(
            f"cannot write {path}: {err.strerror or err} (the last checkpoint is intact: free "
            "space, or make the folder writable, and run the same command to resume)"
        ) from err


def read_metrics_lines(path: str) -> list[tuple[dict, str]]:
    """The validation records of a ``metrics.jsonl`` with their lines.

    A last line that is not a whole record (a run killed while writing it, before writes were
    atomic) is dropped with a warning naming the file and the line; a bad line before it is an
    error, since the records after it are a run's and dropping them would lose them.

    Returns:
        ``(record, line)`` pairs in the file's order, each line ending in a newline; none when
        there is no file.

    Raises:
        WorkdirError: A line other than the last is not a record, or the file cannot be read.
    """
    if not os.path.lexists(path):
        return []
    try:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as err:
        raise WorkdirError(f"cannot read {path}: {err}") from err
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError as err:  # also json.JSONDecodeError
            if n == numbered[-1][0]:
                logging.warning("%s: line %d is incomplete (%s): dropped", path, n, err)
                break
            raise WorkdirError(
                f"{path}: line {n} is not JSON with a step ({err}); the lines after it are "
                "validations of this run: repair or delete that line, then run again"
            ) from err
        records.append((record, line if line.endswith("\n") else line + "\n"))
    return records


class MetricsLogHook(Hook):
    """``workdir/metrics.jsonl`` (a line per validation) and ``workdir/summary.json``, both
    rewritten atomically (:func:`write_run_file`): a kill or a full disk leaves the previous
    file whole, never a cut line."""

    def __init__(self, workdir: str):
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.summary_path = os.path.join(workdir, "summary.json")

    def on_train_begin(self, trainer):
        """Keeps the lines of the steps the restored checkpoint has seen: those after it (of a
        run killed after its last checkpoint) are dropped and will be validated again, so that
        a resumed run's file reads as one run's."""
        if not os.path.lexists(self.metrics_path):
            return
        records = read_metrics_lines(self.metrics_path)
        kept = [line for record, line in records if record["step"] <= trainer.state.step]
        if len(kept) != len(records):
            logging.info(
                "metrics.jsonl: %d validation(s) after step %d dropped (a run stopped after its "
                "last checkpoint)",
                len(records) - len(kept),
                trainer.state.step,
            )
        write_run_file(self.metrics_path, "".join(kept))  # whole lines only, from here on

    def on_epoch_end(self, trainer, logs):
        if "validation" in logs:
            v = logs["validation"]
            sampler = logs.get("sampler", {})
            names = trainer.task.labels[1:]

            def per_class(values):
                return {n: _num(x) for n, x in zip(names, values, strict=True)}

            line = {
                "step": trainer.state.step,
                "epoch": trainer.state.epoch,
                "wall_s": round(trainer.state.wall_seconds(), 3),
                "dice": per_class(v.dice),
                "mean_dice": _num(v.mean_dice),
                "r_fp": _num(v.r_fp),
                "r_fn": _num(v.r_fn),
                "r_fp_per_class": per_class(v.r_fp_per_class),
                "r_fn_per_class": per_class(v.r_fn_per_class),
                "positive_fraction": _num(sampler.get("positive_fraction")),
                "ratio": _num(sampler.get("ratio")),
                "equation_4_fraction": _num(sampler.get("target_fraction")),
                "sampler_updated": sampler.get("updated"),
                "validation_s": round(logs["validation_s"], 3),
            }
            for metric, values in v.surface.items():  # --val_metrics: NaN null, inf "inf"
                line[metric] = {n: _distance(x) for n, x in zip(names, values, strict=True)}
            # The whole file again, atomically (a line per validation: a few kB): appending
            # could leave a cut line behind, which would stop every later resume.
            lines = [text for _, text in read_metrics_lines(self.metrics_path)]
            write_run_file(self.metrics_path, "".join(lines) + json.dumps(line) + "\n")
        self.write_summary(trainer)

    def on_train_end(self, trainer, logs):
        self.on_epoch_end(trainer, logs)

    def write_summary(self, trainer):
        state = trainer.state
        steady = state.steady_patches_per_s()
        reached = state.reached_target()
        summary = {
            "best_dice": _num(state.best_dice) if state.best_dice >= 0 else None,
            "best_step": state.best_step,
            "best_wall_s": round(state.best_wall_s, 3),
            "target_dice": trainer.config.target_dice or None,
            "time_to_target_s": round(state.time_to_target_s, 3) if reached else None,
            "steps_to_target": state.steps_to_target if reached else None,
            "steps": state.step,
            "epochs": state.epoch,
            "wall_s": round(state.wall_seconds(), 3),
            "patches_per_s": round(state.patches_per_s(), 3),
            "steady_patches_per_s": None if steady is None else round(steady, 3),
            "stop_reason": state.stop_reason,
            "learning_rate_scale": _num(state.lr_scale),
            "precision": trainer.config.precision,
            "workers": trainer.dist.size,
            "cache": trainer.cache_summary(),
        }
        write_run_file(self.summary_path, dumps(summary) + "\n")


def _distance(value):
    """A surface metric for JSON: None where undefined (NaN), "inf" where a class was missed."""
    value = float(value)
    return "inf" if math.isinf(value) else _num(value)


def _num(value):
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


class ScheduleHook(Hook):
    """Keeps the learning rate where the run is, and stops a run whose Dice has stopped rising.

    After each validation, :func:`tf_medseg.training.plateau.advance` updates the checkpointed
    plateau counters: the plateau schedule's decay is applied to the optimiser's learning rate,
    and ``--patience`` validations without a gain stop the run. At each epoch end, the
    cosine schedule learns the part of ``--budget_minutes`` spent (the workers' mean, so that
    all apply the same rate). Runs before the checkpoint hook, so a checkpoint holds the counts
    of the validation it follows.
    """

    def __init__(self, trainer):
        self.rule = trainer.config.plateau_rule()
        self.schedule = learning_rate_schedule(trainer.optimizer)

    def on_train_begin(self, trainer):
        if self.schedule is not None:  # a resumed run's decays
            self.schedule.set_scale(trainer.state.lr_scale)
        self._budget(trainer)

    def on_epoch_end(self, trainer, logs):
        v, state = logs.get("validation"), trainer.state
        if v is not None:
            step = plateau.advance(self.rule, state.plateau(), float(v.mean_dice))
            state.set_plateau(step.state)
            if step.decayed and self.schedule is not None:
                self.schedule.set_scale(step.state.scale)
                logging.info(
                    "plateau: %d validations without a gain: learning rate x%g (now %.3g)",
                    self.rule.decay_patience,
                    self.rule.decay_factor,
                    current_learning_rate(trainer.optimizer),
                )
            if step.stop:
                state.stop(
                    plateau.stop_line(self.rule, step.state, state.best_dice, state.best_step)
                )
        self._budget(trainer)

    def _budget(self, trainer):
        minutes = trainer.config.budget_minutes
        if self.schedule is None or not minutes or trainer.config.lr_schedule != "cosine":
            return
        fraction = trainer.state.wall_seconds() / (60.0 * minutes)
        if trainer.dist.size > 1:
            fraction = trainer.dist.allreduce_mean(fraction, "lr_time_fraction")
        self.schedule.set_time_fraction(min(1.0, fraction))


class CheckpointHook(Hook):
    """Saves model, optimizer, counters, sampler ratio and cache position every N epochs."""

    def __init__(self, every: int):
        self.every = every

    def on_epoch_end(self, trainer, logs):
        if logs["epoch"] % self.every == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer, logs):
        trainer.save_checkpoint()


class StopHook(Hook):
    """Stops at the target Dice, the step bound or the time budget (the plateau stop is the
    :class:`ScheduleHook`'s)."""

    def on_step_end(self, trainer, logs):
        c, state = trainer.config, trainer.state
        if c.max_steps and state.step >= c.max_steps:
            state.stop("reached --max_steps")
        # Each worker has its own clock: all stop as soon as one is past the bound, or the
        # others would wait for it in the next all-reduce. The vote is taken at the loop's sync
        # points (every --log_every steps) and epoch ends, which all workers reach together.
        elif trainer.dist.size > 1 and not logs.get("synced", True):
            return
        elif c.budget_minutes and trainer.dist.any_rank(
            state.wall_seconds() >= 60.0 * c.budget_minutes, "stop_budget_minutes"
        ):
            state.stop(f"reached --budget_minutes={c.budget_minutes:g}")

    def on_epoch_end(self, trainer, logs):
        v = logs.get("validation")
        target = trainer.config.target_dice
        if target and v is not None and v.mean_dice >= target:
            trainer.state.stop(f"validation Dice {v.mean_dice:.4f} reached --target_dice {target}")
        self.on_step_end(trainer, logs)
