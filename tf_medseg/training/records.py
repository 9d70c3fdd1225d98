"""What a training run records as it goes: TensorBoard, the profiler's trace, ``metrics.jsonl``
and ``summary.json`` (hooks of :mod:`tf_medseg.training.hooks`' kind; only the chief worker
writes). Every file is rewritten atomically, and a write that fails is one
:class:`WorkdirError` naming the file and the reason.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg.jsonio import dumps, write_text
from tf_medseg.optim import current_learning_rate
from tf_medseg.rundir import RunDir
from tf_medseg.training.hooks import Hook


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

    def on_step_end(self, trainer, log):
        if not log.synced:  # the loss is read back every --log_every steps
            return
        with self.writer.as_default(step=trainer.state.step):
            tf.summary.scalar("train/loss", log.loss)
            tf.summary.scalar("train/learning_rate", current_learning_rate(trainer.optimizer))
            if hasattr(trainer.optimizer, "loss_scale"):
                tf.summary.scalar("train/loss_scale", float(trainer.optimizer.loss_scale))

    def on_epoch_end(self, trainer, log):
        step = trainer.state.step
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/epoch_loss", log.loss)
            tf.summary.scalar("train/patches_per_s", log.patches_per_s)
            for key, value in trainer.cache_stats().items():
                if isinstance(value, int | float) and math.isfinite(value):
                    tf.summary.scalar(f"cache/{key}", value)
            if log.validation is not None:
                v = log.validation
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
                tf.summary.scalar("val/seconds", log.validation_s)
                if log.native is not None:  # --val_native=every: in the labels' own geometry
                    native = log.native
                    tf.summary.scalar("val/native_mean_dice", native.mean_dice)
                    for name, dice in zip(trainer.task.labels[1:], native.dice, strict=True):
                        tf.summary.scalar(f"val/native_dice_{name.replace(' ', '_')}", dice)
                if self.images and v.example is not None:
                    overlay = contour_overlay(*v.example)
                    tf.summary.image("val/slice_true_red_pred_green", overlay[None], step=step)
            tf.summary.scalar(
                "sampler/positive_fraction", float(trainer.sampler.positive_fraction.numpy())
            )
            if log.sampler is not None:
                tf.summary.scalar("sampler/equation_4_fraction", log.sampler["target_fraction"])
        self.writer.flush()

    def on_train_end(self, trainer, log):
        if log.validation is not None:
            self.on_epoch_end(trainer, log)
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

    def on_step_end(self, trainer, log):
        step = trainer.state.step
        if step >= self.end:
            self._stop()
        else:
            self._start_at(step)

    def on_train_end(self, trainer, log):
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
        self.metrics_path = RunDir(workdir).metrics
        self.summary_path = RunDir(workdir).summary

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

    def on_epoch_end(self, trainer, log):
        if log.validation is not None:
            v = log.validation
            sampler = log.sampler or {}
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
                "validation_s": round(log.validation_s, 3),
            }
            for metric, values in v.surface.items():  # --val_metrics: NaN null, inf "inf"
                line[metric] = {n: _distance(x) for n, x in zip(names, values, strict=True)}
            if log.native is not None:  # --val_native=every
                line["native"] = log.native.to_json(names)
            # The whole file again, atomically (a line per validation: a few kB): appending
            # could leave a cut line behind, which would stop every later resume.
            lines = [text for _, text in read_metrics_lines(self.metrics_path)]
            write_run_file(self.metrics_path, "".join(lines) + json.dumps(line) + "\n")
        self.write_summary(trainer)

    def on_train_end(self, trainer, log):
        self.on_epoch_end(trainer, log)

    def write_summary(self, trainer):
        write_run_file(self.summary_path, dumps(trainer.summary()) + "\n")


def _distance(value):
    """A surface metric for JSON: None where undefined (NaN), "inf" where a class was missed."""
    value = float(value)
    return "inf" if math.isinf(value) else _num(value)


def _num(value):
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def result_table(summary: dict, target_dice: float, workdir: str) -> str:
    """The closing table of ``tf-medseg-train``: a run's summary (:meth:`Trainer.summary`), with
    ``--target_dice`` and the ``--workdir`` it names."""

    def fmt(value, unit=""):
        if value is None:
            return "not reached"
        return f"{value:.4f}" if isinstance(value, float) and not unit else f"{value}{unit}"

    ttt = summary.get("time_to_target_s")
    native = (summary.get("native") or {}).get("mean_dice")
    rows = [
        ("best mean Dice, training grid", fmt(summary.get("best_dice"))),
        (
            "  in the labels' geometry",
            "-" if native is None else f"{native:.4f} (as tf-medseg-predict and -evaluate)",
        ),
        ("at step", fmt(summary.get("best_step"))),
        ("at wall time", f"{summary.get('best_wall_s', 0):.1f} s"),
        (
            f"time to Dice {target_dice:g}" if target_dice else "time to target",
            "no target" if not target_dice else (f"{ttt:.1f} s" if ttt else "not reached"),
        ),
        ("steps", fmt(summary.get("steps"))),
        ("training patches/s", f"{summary.get('patches_per_s', 0):.2f}"),
        (
            "  after epoch 1",
            "-" if (steady := summary.get("steady_patches_per_s")) is None else f"{steady:.2f}",
        ),
        ("total wall time", f"{summary.get('wall_s', 0):.1f} s"),
        ("precision, workers", f"{summary.get('precision')}, {summary.get('workers')}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'result'.ljust(width)}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    split = summary.get("time_split") or {}
    if split:
        total = sum(split.values()) or 1.0
        parts = ", ".join(
            f"{name.replace('_', ' ')} {seconds:.1f} s ({100 * seconds / total:.0f}%)"
            for name, seconds in split.items()
            if seconds >= 0.05
        )
        lines.append(f"this session's time: {parts}")
    if summary.get("stop_reason"):
        lines.append(f"stopped: {summary['stop_reason']}")
    lines.append(f"(summary.json, metrics.jsonl, TensorBoard logs in {workdir})")
    return "\n".join(lines)
