"""The custom training loop: a ``tf.function`` step inside a short sequence of hooks.

:class:`Trainer` builds a run (:mod:`tf_medseg.training.build`: inputs, model and optimiser,
checkpoint; the counters in one :class:`~tf_medseg.training.state.RunState`) and
:meth:`Trainer.fit` reads::

    while not stopped and epoch < epochs:
        train_epoch()       # per batch: train step; hooks.on_step_end (losses read every N)
        end_epoch()         # the cache swaps in its replacements; hooks.on_epoch_end:
                            # validate, update the sampler, log, checkpoint, stop
    hooks.on_train_end

The hooks read and write the run state (``trainer.state``), not the trainer. The step runs the
forward pass under the global mixed-precision policy, the loss in float32, dynamic loss scaling
under ``mixed_float16`` only, and the workers' gradient averaging when several run.

A checkpoint holds the position in the epoch (``state.epoch_step``) and the training source's
position at the epoch's start, so a run stopped in the middle of an epoch resumes at its next
batch: with ``--deterministic`` its losses and validation metrics are those of a run that never
stopped.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import distributed
from tf_medseg.cache.smart_cache import peak_rss_bytes
from tf_medseg.data.msd import check_task_files, load_task
from tf_medseg.inference import mean_predictor, overlap_from_flag
from tf_medseg.postprocessing import PostprocessingDecision, decide_from_dice, write_decision
from tf_medseg.training import hooks as hooks_lib
from tf_medseg.training.build import (
    build_checkpoint,
    build_inputs,
    build_learner,
    restore_latest,
    source_state_json,
)
from tf_medseg.training.config import TrainConfig, resume_conflicts, surface_metric_names
from tf_medseg.training.hooks import WorkdirError
from tf_medseg.training.interrupts import Interrupts, TrainingInterrupted
from tf_medseg.training.state import RunState
from tf_medseg.training.validation import (
    SurfaceOptions,
    ValidationResult,
    make_window_predictor,
    postprocessing_dice,
    validate,
)

BEST_MODEL = "best_model.keras"


class ConfigError(ValueError):
    """Contradictory or out-of-range settings; one problem per line."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


class Trainer:
    """One training run.

    Args:
        config: The run's settings.
        dist: The workers (default: :func:`tf_medseg.distributed.setup`).

    Raises:
        ConfigError: The configuration is contradictory, or changes the network or optimiser of
            the run whose checkpoints are in the workdir (every problem listed).
        DataError: The data folder or a file in it is bad.
    """

    def __init__(self, config: TrainConfig, dist: distributed.Distributed | None = None):
        errors = config.validate() + resume_conflicts(config)
        if errors:
            raise ConfigError("\n".join(errors))
        start = time.time()  # the run's wall time counts the set-up
        self.config = config
        # Before any TensorFlow variable: tf.distribute configures its collectives at start-up.
        self.dist = dist or distributed.setup(config.fp16_allreduce, config.distribution)
        self.state = RunState(start)
        self.chief = self.dist.is_chief
        self.interrupts = Interrupts()  # fit() takes the CLI's installed handlers
        self._window_predictor = None
        self._bad_steps = 0  # consecutive non-finite losses
        if config.deterministic:
            tf.keras.utils.set_random_seed(config.seed)
            tf.config.experimental.enable_op_determinism()
        tf.keras.mixed_precision.set_global_policy(config.precision)
        os.makedirs(config.workdir, exist_ok=True)
        # Every listed file's header first (milliseconds each): a cut validation or test file
        # is named now, not at the first validation minutes in, nor after training.
        check_task_files(load_task(config.data_dir))

        inputs = build_inputs(config, self.dist)
        self.task, self.sampler, self.stream = inputs.task, inputs.sampler, inputs.stream
        self.train_source, self.val_source = inputs.train_source, inputs.val_source
        self.num_val_cases = inputs.num_val_cases
        self.patches_per_epoch = self.stream.patches_per_epoch
        self.steps_per_epoch = self.stream.steps_per_epoch
        # A rank with a longer epoch would wait forever in a gradient all-reduce: fail now.
        self.dist.check_same(self.steps_per_epoch, "steps per epoch")

        learner = build_learner(config, self.task, self.dist, self.patches_per_epoch)
        self.model, self.loss_fn, self.optimizer = learner.model, learner.loss_fn, learner.optimizer
        self.train_model = learner.train_model  # self.model, or it with deep supervision's outputs
        self.manager = build_checkpoint(config, learner, self.sampler, self.state)
        self.restored_from = restore_latest(self.manager, self.state, self.train_source, self.dist)
        self.dist.check_same(self.state.step, "restored step (is --workdir shared?)")
        # The first fill runs here, in this thread, not lazily inside tf.data: a bad file stops
        # the run with its one-line error before training, Ctrl-C during the fill is a plain
        # KeyboardInterrupt, and the fill's seconds are not counted in the first epoch.
        fill = getattr(self.train_source, "fill", None)
        if callable(fill):
            fill()
        self.stream.resume_at(min(self.state.epoch_step, self.steps_per_epoch))
        self.train_step = tf.function(
            self._train_step,
            input_signature=[
                tf.TensorSpec([None, *config.patch_size, self.task.num_channels], tf.float32),
                tf.TensorSpec([None, *config.patch_size], tf.uint8),
            ],
        )
        self.hooks = self._make_hooks()

    def _make_hooks(self) -> list[hooks_lib.Hook]:
        c = self.config
        hooks = [
            hooks_lib.ValidationHook(c.val_every),
            hooks_lib.SamplerHook(),
            hooks_lib.ScheduleHook(self),
        ]
        if self.chief:
            logdir = os.path.join(c.workdir, "tensorboard")
            hooks += [
                hooks_lib.ProgressHook(bar=c.progress, val_every=c.val_every),
                hooks_lib.TensorBoardHook(logdir, images=c.image_summaries),
                hooks_lib.MetricsLogHook(c.workdir),
            ]
            if c.profile_steps:
                hooks.append(hooks_lib.ProfileHook(logdir, *c.profile_steps))
        hooks += [hooks_lib.CheckpointHook(c.checkpoint_every), hooks_lib.StopHook()]
        return hooks

    def _call(self, event: str, *logs: dict) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *logs)

    # ------------------------------------------------------------------ the loop
    def _train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """One optimisation step on a batch; returns the float32 loss (a device tensor).

        ``self.train_step`` is this as a ``tf.function`` with an input signature whose batch
        dimension is free: a short last batch reuses the graph instead of tracing another.
        Labels are uint8 class indices, one-hot encoded here, on the device. With deep
        supervision the model's outputs are a list and the loss their weighted sum
        (:func:`tf_medseg.losses.deep_supervision_loss`); the losses compute in float32.
        """
        onehot = tf.one_hot(labels, self.task.num_classes, dtype=tf.float32)
        fp16 = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            outputs = self.train_model(images, training=True)
            loss = self.loss_fn(onehot, outputs)
            scaled = self.optimizer.get_scaled_loss(loss) if fp16 else loss
        tape = self.dist.gradient_tape(tape)
        variables = self.train_model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if fp16:
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        # The global batch's loss, identical on every rank (so is the non-finite-loss decision).
        return self.dist.mean_in_graph(loss, "train_loss")

    def trace_train_step(self) -> None:
        """Traces the step before the loop starts (the loop's calls reuse it).

        Tracing takes seconds on a small CPU; done here, an interrupt (Ctrl-C) cannot land in
        the middle of it once training runs, where it would leave the half-built graph behind
        and the checkpoint saved on the way out could fail.
        """
        if self.chief:
            logging.info("building the training graph...")
        start = time.time()
        self.train_step.get_concrete_function()
        if self.chief:
            logging.info("built the training graph in %.1f s", time.time() - start)

    def fit(self, interrupts: Interrupts | None = None) -> dict:
        """Trains until a stop condition; returns the summary (also in ``summary.json``).

        Args:
            interrupts: Installed signal handlers (the CLI's). While the loop runs, a signal is
                only recorded there and the loop stops at its next safe point (after a step,
                between validation cases) with a checkpoint. Without them, Python's own
                ``KeyboardInterrupt`` is caught wherever it lands and a checkpoint saved.

        Raises:
            KeyboardInterrupt: (:class:`TrainingInterrupted` with ``interrupts``) after the
                checkpoint is saved.
            WorkdirError: A checkpoint, ``best_model.keras``, ``metrics.jsonl`` or
                ``summary.json`` could not be written (the last checkpoint is intact), or
                ``metrics.jsonl`` has a corrupt line before its last.
        """
        self.interrupts = interrupts or Interrupts()  # not installed: never records a signal
        state, epochs = self.state, self.config.epochs
        # A KeyboardInterrupt raised inside TensorFlow's C code while it traces is turned into
        # a SystemError that TensorFlow prints and goes past: trace with the signal deferred,
        # then leave before training as an interrupt outside the loop (nothing new to save).
        with self.interrupts.deferred():
            self.trace_train_step()
        if self.interrupts.requested:
            raise KeyboardInterrupt(f"{self.interrupts.reason()} while building the graph")
        self._call("on_train_begin")
        self.dist.broadcast_variables(self.train_model.variables)
        logs = {"loss": float("nan"), "patches_per_s": 0.0}
        with self.interrupts.deferred():
            try:
                while state.stop_reason is None and state.epoch < epochs:
                    logs = self.train_epoch()
                    if state.stop_reason is None:
                        self.end_epoch(logs)
            except KeyboardInterrupt as err:
                reason = str(err) or "interrupted"
                logging.warning("%s: saving a checkpoint at step %d", reason, state.step)
                self.save_checkpoint()
                raise
        logs.pop("validation", None)
        logs.update(step=state.step, epoch=state.epoch)
        state.stop(f"reached --epochs={epochs}")  # unless another reason came first
        self._call("on_train_end", logs)
        logging.info("stopped: %s", state.stop_reason)
        if self.config.choose_postprocessing:
            self.choose_postprocessing()
        return self.summary()

    def train_epoch(self) -> dict:
        """Trains the current epoch's remaining batches (all, unless resumed in its middle)
        until it ends or a hook stops the run; returns the epoch's logs.

        Per step only the step runs and is counted: the losses stay on the device and are read
        back (one copy), checked and logged every ``--log_every`` steps and at the epoch's end
        (:meth:`_sync`), where multi-worker stop votes are taken too.
        """
        state, log_every = self.state, self.config.log_every
        losses, pending, start, patches, loss = [], [], time.time(), 0, float("nan")
        try:
            for images, labels in self.stream.epoch():
                pending.append(self.train_step(images, labels))
                if state.step == 0:
                    self.dist.broadcast_variables(self.optimizer.variables())
                state.step += 1
                state.epoch_step += 1
                patches += int(images.shape[0])
                synced = state.step % log_every == 0 or state.epoch_step == self.steps_per_epoch
                if synced:
                    loss, pending = self._sync(pending, losses), []
                rate = patches / max(time.time() - start, 1e-9)
                self._call("on_step_end", {"loss": loss, "patches_per_s": rate, "synced": synced})
                self.check_interrupt(collective=synced)
                if state.stop_reason:
                    break
        finally:
            if pending:  # stopped between sync points
                self._sync(pending, losses)
            seconds = time.time() - start
            state.count_epoch(seconds, patches)
        return {
            "epoch": state.epoch,
            "step": state.step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "patches_per_s": patches / max(seconds, 1e-9),
        }

    def end_epoch(self, logs: dict) -> None:
        """Closes a complete epoch: the source's swap, the epoch counter and the source's
        position for the checkpoint, then the hooks' ``on_epoch_end`` (validation, sampler,
        logs, checkpoint, stop)."""
        state, c = self.state, self.config
        # When this boundary validates and the sampler adapts, the next epoch's patches wait
        # for the new positive fraction (else prefetched ones use the old one).
        hold = c.adaptive_sampling and (state.epoch + 1) % c.val_every == 0
        self.stream.end_epoch(start_next=not hold)
        state.epoch += 1
        state.epoch_step = 0
        state.cache_state = source_state_json(self.train_source, self.dist)
        logs["epoch"] = state.epoch
        self._call("on_epoch_end", logs)
        self.stream.start_next_epoch()
        self.check_interrupt()

    def _sync(self, pending: list[tf.Tensor], losses: list[float]) -> float:
        """Reads the steps' losses back in one copy, checks them, records them; returns the
        last (the losses of the last ``len(pending)`` steps, in order)."""
        values = tf.stack(pending).numpy().astype(float).tolist()
        first = self.state.step - len(values) + 1
        for offset, value in enumerate(values):
            self._check_loss(value, first + offset)
        losses.extend(values)
        self.state.losses.extend(values)
        return values[-1]

    def check_interrupt(self, collective: bool = True) -> None:
        """Raises :class:`TrainingInterrupted` at a safe point once a stop signal arrived.

        With several workers the decision is collective (one scalar all-reduce), so that every
        worker leaves at the same step instead of waiting for the others in an all-reduce; it
        is taken only where ``collective`` (the loop's sync points, which every worker reaches
        at the same step), not after every step.
        """
        requested = self.interrupts.requested
        if self.dist.size > 1:
            if not collective:
                return
            requested = self.dist.any_rank(requested, "interrupt")
        if requested:
            mine = self.interrupts.requested
            raise TrainingInterrupted(
                self.interrupts.reason() if mine else "interrupted on another worker"
            )

    def _check_loss(self, loss: float, step: int) -> None:
        """Counts the non-finite losses that loss scaling skips; raises on any other."""
        if math.isfinite(loss):
            self._bad_steps = 0
            return
        self._bad_steps += 1
        if self.config.precision == "mixed_float16" and self._bad_steps <= 20:
            logging.warning("non-finite loss at step %d: skipped by loss scaling", step)
            return
        raise NonFiniteLossError(
            f"loss became {loss} at step {step}; stopping (the last checkpoint and the best "
            f"model are from before it). Try a lower --learning_rate or --precision=float32."
        )

    # ------------------------------------------------------------------ used by hooks
    def validate(self) -> ValidationResult:
        """Scores the current weights on the validation set, shared out across the workers.

        Returns:
            The combined result, the same on every worker.
        """
        c = self.config
        if self._window_predictor is None:
            self._window_predictor = self._predictor_of(self.model)
        return validate(
            self._window_predictor,
            self.validation_items(),
            self.task.num_classes,
            c.val_roi_size,
            overlap_from_flag(c.val_overlap),
            c.val_mode,
            c.val_sw_batch_size,
            c.val_keep_largest,
            self.dist,
            case_offset=self.dist.rank,
            num_cases=self.num_val_cases,
            # One worker stops between cases; several only at the loop's collective check.
            check_interrupt=self.interrupts.check if self.dist.size == 1 else None,
            progress=c.progress and self.chief,
            surface=self._surface_options(),
        )

    def _surface_options(self) -> SurfaceOptions | None:
        """What ``--val_metrics`` asks of validation besides Dice (None: nothing)."""
        c = self.config
        names = surface_metric_names(c.val_metrics)
        if not names:
            return None
        return SurfaceOptions(names, tuple(float(s) for s in c.spacing), c.val_nsd_tolerance_mm)

    def _predictor_of(self, model: tf.keras.Model):
        """The validation's window predictor of ``model`` (traced once per window shape)."""
        c = self.config
        window = make_window_predictor(
            model, c.val_roi_size, self.task.num_channels, c.val_sw_batch_size
        )
        return mean_predictor([window], tta=c.val_tta)

    def validation_items(self):
        """This worker's preprocessed validation items, in case order."""
        if self.val_source is None:
            return []
        entries = self.val_source.epoch_items()
        return [item for _, item in sorted(entries, key=lambda e: e[0])]

    def cache_stats(self) -> dict:
        stats = getattr(self.train_source, "stats", None)
        return stats() if callable(stats) else {}

    def cache_summary(self) -> dict:
        """What the training cache really did, for ``summary.json`` (this worker's figures).

        Returns:
            ``mode``; ``cache_num`` (items held in RAM; 0 for ``none``);
            ``items_in_shard`` (this worker's training items); ``items_replaced`` (swapped in
            at epoch boundaries); ``late_swaps`` (replacements not ready at their boundary);
            ``strict`` (waited for replacements); ``peak_rss_bytes`` of this process.
        """
        stats = self.cache_stats()
        source = self.train_source
        return {
            "mode": self.config.cache,
            "cache_num": int(getattr(source, "cache_num", 0)),
            "items_in_shard": int(source.shard_size),
            "items_replaced": int(stats.get("swaps", 0)),
            "late_swaps": int(stats.get("late_swaps", 0)),
            "strict": bool(getattr(source, "wait_for_replacements", False)),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def save_checkpoint(self) -> None:
        """Saves a checkpoint (chief only).

        TensorFlow writes the checkpoint's files under temporary names and names it in the
        ``checkpoint`` index file (replaced atomically) only once they are complete: after a
        failed save the index still names the previous checkpoint, which the next run resumes
        from. The failed save's files are removed here, so that they hold no space.

        Raises:
            WorkdirError: The checkpoint could not be written (a full disk, a quota, a
                read-only folder); the message names it, the reason, and the checkpoint left.
        """
        if not self.chief:
            return
        self.state.store()
        try:
            self.manager.save(checkpoint_number=self.state.step)
        except (tf.errors.OpError, OSError) as err:
            prefix = os.path.join(self.manager.directory, f"ckpt-{self.state.step}")
            # What the next run resumes from is what the index file on disk names.
            saved = tf.train.get_checkpoint_state(self.manager.directory)
            last = saved.model_checkpoint_path if saved else None
            for temporary in glob.glob(f"{glob.escape(prefix)}_temp*"):  # the shards' folder
                shutil.rmtree(temporary, ignore_errors=True)
            if last is None or os.path.basename(last) != os.path.basename(prefix):
                for leftover in glob.glob(f"{glob.escape(prefix)}.*"):
                    with contextlib.suppress(OSError):
                        os.remove(leftover)
            after = (
                f"the last checkpoint, {last}, is intact: free space and run the same command "
                "to resume from it"
                if last
                else "there is no earlier checkpoint: free space and run the same command"
            )
            raise WorkdirError(
                f"cannot write the checkpoint {prefix}: {_write_failure(err)}; {after}"
            ) from err

    def export_best_model(self) -> None:
        """Writes the model to ``workdir/best_model.keras`` atomically (chief only): complete
        and on disk under a temporary name, then renamed over the previous best model.

        Raises:
            WorkdirError: The model could not be written; the previous best model is kept.
        """
        if not self.chief:
            return
        path = os.path.join(self.config.workdir, BEST_MODEL)
        tmp = os.path.join(self.config.workdir, "best_model.tmp.keras")
        try:
            self.model.save(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise WorkdirError(
                f"cannot write {path}: {_write_failure(err)} (the previous best model and the "
                "last checkpoint are intact: free space, or make the folder writable, and run "
                "the same command to resume)"
            ) from err

    def choose_postprocessing(self) -> PostprocessingDecision | None:
        """Decides per class whether keeping its largest component raises the best model's
        mean validation Dice (:mod:`tf_medseg.postprocessing`), on the validation cases as
        preprocessed (the training grid), shared out across the workers like validation; the
        chief writes ``postprocessing.json`` and logs one line per class.

        Returns:
            The decision, or None without validation cases or a best model.
        """
        c = self.config
        path = os.path.join(c.workdir, BEST_MODEL)
        if not self.num_val_cases or not os.path.isfile(path):
            return None
        best = tf.keras.models.load_model(path, compile=False)
        without, with_ = postprocessing_dice(
            self._predictor_of(best),
            self.validation_items(),
            self.task.num_classes,
            c.val_roi_size,
            overlap_from_flag(c.val_overlap),
            c.val_mode,
            c.val_sw_batch_size,
            self.dist,
            case_offset=self.dist.rank,
            num_cases=self.num_val_cases,
        )
        decision = decide_from_dice(without, with_)
        if self.chief:
            try:
                write_decision(c.workdir, decision)
            except OSError as err:
                raise WorkdirError(
                    f"cannot write the post-processing choice to {c.workdir}: "
                    f"{_write_failure(err)} (the model is saved; tf-medseg-predict then uses "
                    "--val_keep_largest's setting)"
                ) from err
            for line in decision.describe().splitlines():
                logging.info("post-processing: %s", line)
        return decision

    def summary(self) -> dict:
        path = os.path.join(self.config.workdir, "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def close(self, wait: bool = True) -> None:
        """Stops the input stream and the caches' threads, and frees their memory.

        Args:
            wait: Wait for the replacements being prepared (``False`` after an interrupt:
                queued ones are cancelled and a running one is not waited for here).
        """
        self.stream.close()
        for source in (self.train_source, self.val_source):
            if source is not None:
                source.close(wait=wait)


def _write_failure(err: BaseException) -> str:
    """The system's reason for a failed write (``No space left on device``), from an OSError or
    from TensorFlow's error, whose message ends ``<file>; <reason> [Op:SaveV2]``."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = getattr(err, "message", None) or str(err)
    text = re.sub(r"^\{\{.*?\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\]\s*$", "", text)
    return text.rsplit("; ", 1)[-1].strip() or type(err).__name__
