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

import time

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import distributed
from tf_medseg.cache.sources import source_summary
from tf_medseg.config import TrainConfig
from tf_medseg.jsonio import dumps
from tf_medseg.postprocessing import PostprocessingDecision
from tf_medseg.rundir import RunDir
from tf_medseg.training import hooks as hooks_lib
from tf_medseg.training import records, saving
from tf_medseg.training.build import (
    build_checkpoint,
    build_inputs,
    build_learner,
    restore_latest,
    source_state_json,
)
from tf_medseg.training.checks import CheckedRun, check_run
from tf_medseg.training.course import Course
from tf_medseg.training.interrupts import Interrupts, TrainingInterrupted
from tf_medseg.training.state import RunState
from tf_medseg.training.validation import ValidationResult, Validator


class Trainer:
    """One training run.

    Args:
        run: The run's settings, checked with their task (:func:`check_run`, as the CLI does),
            or a bare configuration, which is checked here.
        dist: The workers (default: :func:`tf_medseg.distributed.setup`).

    Raises:
        ConfigError: (a bare configuration) It is contradictory, or changes the network or
            optimiser of the run whose checkpoints are in the workdir (every problem listed).
        DataError: (a bare configuration) The data folder or a file in it is bad.
    """

    def __init__(self, run: CheckedRun | TrainConfig, dist: distributed.Distributed | None = None):
        start = time.time()  # the run's wall time counts the set-up
        run = run if isinstance(run, CheckedRun) else check_run(run)
        config, task = run.config, run.task
        self.config = config
        # Before any TensorFlow variable: tf.distribute configures its collectives at start-up.
        self.dist = dist or distributed.setup(config.fp16_allreduce, config.distribution)
        self.state = RunState(start)
        self.chief = self.dist.is_chief
        self.interrupts = Interrupts()  # fit() takes the CLI's installed handlers
        if config.deterministic:
            tf.keras.utils.set_random_seed(config.seed)
            tf.config.experimental.enable_op_determinism()
        tf.keras.mixed_precision.set_global_policy(config.precision)

        inputs = build_inputs(config, self.dist, task)
        self.task, self.sampler, self.stream = inputs.task, inputs.sampler, inputs.stream
        self.train_source, self.val_source = inputs.train_source, inputs.val_source
        self.num_val_cases = inputs.num_val_cases
        self.validator = Validator(
            config,
            self.task.num_classes,
            self.task.num_channels,
            self.val_source,
            self.num_val_cases,
            self.dist,
            files=inputs.val_items,
            prefix=inputs.prefix,
        )
        self.native = None  # the best model's validation in the labels' geometry (--val_native)
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
        fill_start = time.time()
        self.train_source.fill()
        self.state.add_seconds("cache_fill", time.time() - fill_start)
        self.stream.resume_at(min(self.state.epoch_step, self.steps_per_epoch))
        self.train_step = tf.function(
            self._train_step,
            input_signature=[
                tf.TensorSpec([None, *config.patch_size, self.task.num_channels], tf.float32),
                tf.TensorSpec([None, *config.patch_size], tf.uint8),
            ],
        )
        self.course = Course(config, self.state, self.dist, self.optimizer)
        self._validated_at: int | None = None  # the step of the last validation
        self.hooks = self._make_hooks()

    def _make_hooks(self) -> list[hooks_lib.Hook]:
        """The observers: progress, TensorBoard, the metrics log, the profiler (chief only)."""
        c = self.config
        hooks: list[hooks_lib.Hook] = []
        if self.chief:
            logdir = RunDir(c.workdir).tensorboard
            hooks += [
                hooks_lib.ProgressHook(bar=c.progress, val_every=c.val_every),
                records.TensorBoardHook(logdir, images=c.image_summaries),
                records.MetricsLogHook(c.workdir),
            ]
            if c.profile_steps:
                hooks.append(records.ProfileHook(logdir, *c.profile_steps))
        return hooks

    def _call(self, event: str, *log: hooks_lib.StepLog | hooks_lib.EpochLog) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *log)

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
        self.state.add_seconds("graph", time.time() - start)
        if self.chief:
            logging.info("built the training graph in %.1f s", time.time() - start)

    def fit(self, interrupts: Interrupts | None = None) -> dict:
        """Trains until a stop condition; returns the summary (also in ``summary.json``), on
        every worker.

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
        self.course.begin()
        self._call("on_train_begin")
        self.dist.broadcast_variables(self.train_model.variables)
        log = hooks_lib.EpochLog(epoch=state.epoch, step=state.step)
        with self.interrupts.deferred():
            try:
                while state.stop_reason is None and state.epoch < epochs:
                    log = self.train_epoch()
                    if state.stop_reason is None:
                        self.end_epoch(log)
            except KeyboardInterrupt as err:
                reason = str(err) or "interrupted"
                logging.warning("%s: saving a checkpoint at step %d", reason, state.step)
                self.save_checkpoint()
                raise
        # The run's end: the last epoch's training figures, and a validation of its own when
        # the last weights were not validated (an epoch cut short by steps or time).
        log = hooks_lib.EpochLog(state.epoch, state.step, log.loss, log.patches_per_s)
        state.stop(f"reached --epochs={epochs}")  # unless another reason came first
        if self._validated_at != state.step:
            self._validate_into(log)
        self._call("on_train_end", log)
        self.save_checkpoint()
        logging.info("stopped: %s", state.stop_reason)
        if self.config.choose_postprocessing:
            start = time.time()
            self.choose_postprocessing()
            self.state.add_seconds("postprocessing", time.time() - start)
        if self.config.val_native != "off":
            self.native = self.validator.native_of_best(self.config.workdir)
            if self.native is not None:
                self.state.add_seconds("native_validation", self.native.seconds)
        result = self.summary()
        if self.chief:  # with the post-processing choice's time, which came after the hooks'
            records.write_run_file(RunDir(self.config.workdir).summary, dumps(result) + "\n")
        return result

    def train_epoch(self) -> hooks_lib.EpochLog:
        """Trains the current epoch's remaining batches (all, unless resumed in its middle)
        until it ends or a hook stops the run; returns the epoch's log (not validated yet).

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
                self._call("on_step_end", hooks_lib.StepLog(loss, rate, synced))
                self.course.after_step(synced)
                self.check_interrupt(collective=synced)
                if state.stop_reason:
                    break
        finally:
            if pending:  # stopped between sync points
                self._sync(pending, losses)
            seconds = time.time() - start
            state.count_epoch(seconds, patches)
        return hooks_lib.EpochLog(
            epoch=state.epoch,
            step=state.step,
            loss=float(np.mean(losses)) if losses else float("nan"),
            patches_per_s=patches / max(seconds, 1e-9),
        )

    def end_epoch(self, log: hooks_lib.EpochLog) -> None:
        """Closes a complete epoch: the source's swap, the epoch counter and the source's
        position for the checkpoint; the validation the course asks for, the hooks'
        ``on_epoch_end``, the checkpoint, the stops."""
        state, c = self.state, self.config
        # When this boundary validates and the sampler adapts, the next epoch's patches wait
        # for the new positive fraction (else prefetched ones use the old one).
        hold = c.adaptive_sampling and (state.epoch + 1) % c.val_every == 0
        self.stream.end_epoch(start_next=not hold)
        state.epoch += 1
        state.epoch_step = 0
        state.cache_state = source_state_json(self.train_source, self.dist)
        log.epoch = state.epoch
        if self.course.validates_after(state.epoch):
            self.course.after_validation(self._validate_into(log), log.native)
        self._call("on_epoch_end", log)
        if self.course.checkpoints_after(state.epoch):
            self.save_checkpoint()
        self.course.after_epoch()
        self.stream.start_next_epoch()
        self.check_interrupt()

    def _validate_into(self, log: hooks_lib.EpochLog) -> ValidationResult:
        """Validates, records the result (the best model saved, the sampler updated) and puts
        it in ``log`` for the hooks."""
        start = time.time()
        result = self.validate()
        log.validation, log.validation_s = result, time.time() - start
        self.state.add_seconds("validation", log.validation_s)
        self._validated_at = self.state.step
        if self.config.val_native == "every":
            log.native = self.validator.native(self.model)
            self.state.add_seconds("native_validation", log.native.seconds)
        if self.course.record(result, log.native):
            self.export_best_model()
        log.sampler = self.sampler.update_from_sums(result.sums, mean_dice=result.mean_dice)
        return result

    def _sync(self, pending: list[tf.Tensor], losses: list[float]) -> float:
        """Reads the steps' losses back in one copy, checks them, records them; returns the
        last (the losses of the last ``len(pending)`` steps, in order)."""
        values = tf.stack(pending).numpy().astype(float).tolist()
        first = self.state.step - len(values) + 1
        for offset, value in enumerate(values):
            self.course.check_loss(value, first + offset)
        losses.extend(values)
        self.state.record_losses(values)
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

    # ------------------------------------------------------------------ used by hooks
    def validate(self) -> ValidationResult:
        """Scores the current weights on the validation set, shared out across the workers.

        Returns:
            The combined result, the same on every worker.
        """
        return self.validator.score(
            self.model,
            # One worker stops between cases; several only at the loop's collective check.
            check_interrupt=self.interrupts.check if self.dist.size == 1 else None,
            progress=self.config.progress and self.chief,
        )

    def validation_items(self) -> list[dict]:
        """This worker's preprocessed validation items, in case order."""
        return self.validator.items()

    def cache_stats(self) -> dict:
        return self.train_source.stats()

    def cache_summary(self) -> dict:
        """What the training cache really did (:func:`tf_medseg.cache.sources.source_summary`)."""
        return source_summary(self.train_source, self.config.cache)

    def save_checkpoint(self) -> None:
        """Saves a checkpoint (chief only; :func:`tf_medseg.training.saving.save_checkpoint`).

        Raises:
            WorkdirError: The checkpoint could not be written; the message names it, the
                reason, and the checkpoint left.
        """
        if not self.chief:
            return
        start = time.time()
        self.state.store()
        saving.save_checkpoint(self.manager, self.state.step)
        self.state.add_seconds("checkpoints", time.time() - start)

    def export_best_model(self) -> None:
        """Writes the model to ``workdir/best_model.keras`` atomically (chief only).

        Raises:
            WorkdirError: The model could not be written; the previous best model is kept.
        """
        if self.chief:
            saving.export_model(self.model, RunDir(self.config.workdir).best_model)

    def choose_postprocessing(self) -> PostprocessingDecision | None:
        """The largest-component choice of the best model
        (:meth:`~tf_medseg.training.validation.Validator.choose_postprocessing`)."""
        return self.validator.choose_postprocessing(self.config.workdir, self.chief)

    def summary(self) -> dict:
        """The run's result so far (what ``summary.json`` holds), on every worker; the cache's
        figures are this worker's."""
        return {
            **self.state.summary(self.config.target_dice),
            "precision": self.config.precision,
            "workers": self.dist.size,
            "cache": self.cache_summary(),
            "native": self.native.to_json(self.task.labels[1:]) if self.native else None,
        }

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
