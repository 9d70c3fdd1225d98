"""The custom training loop: a ``tf.function`` step inside a short sequence of hooks.

:class:`Trainer` puts the parts together (data split, deterministic prefix, caches, the random
tail, model, loss, optimiser, adaptive sampler, checkpoint) and :meth:`Trainer.fit` reads::

    for each epoch:
        for each batch: train step; hooks.on_step_end
        stream.end_epoch()                      # smart cache swaps in its replacements
        hooks.on_epoch_end                      # validate, update sampler, log, checkpoint, stop
    hooks.on_train_end

The step runs the forward pass under the global mixed-precision policy, the loss in float32,
dynamic loss scaling under ``mixed_float16`` only, and Horovod's ``DistributedGradientTape``
when several workers run.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import distributed, jsonio
from tf_medseg.cache.smart_cache import peak_rss_bytes
from tf_medseg.data.msd import load_task, task_split
from tf_medseg.inference import overlap_from_flag
from tf_medseg.jsonio import write_json
from tf_medseg.losses import get_loss
from tf_medseg.models import MODELS, build_model
from tf_medseg.optim import build_optimizer
from tf_medseg.pipeline import TrainStream, make_source
from tf_medseg.sampling import AdaptiveSampler
from tf_medseg.training import hooks as hooks_lib
from tf_medseg.training.config import TrainConfig, steps_upper_bound
from tf_medseg.training.interrupts import Interrupts, TrainingInterrupted
from tf_medseg.training.validation import ValidationResult, make_window_predictor, validate
from tf_medseg.transforms.preprocessing import PreprocessingConfig, build_preprocessing

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
        ConfigError: The configuration is contradictory (every problem listed).
        DataError: The data folder or a file in it is bad.
    """

    def __init__(self, config: TrainConfig, dist: distributed.Distributed | None = None):
        errors = config.validate()
        if errors:
            raise ConfigError("\n".join(errors))
        self._start = time.time()
        self.config = config
        self.dist = dist or distributed.setup(config.fp16_allreduce, config.distribution)
        self.chief = self.dist.is_chief
        self._stop_reason = None
        self._train_seconds = 0.0
        self._train_patches = 0
        # The same without this process's first epoch (graph tracing and optimisation).
        self._epochs_run = 0
        self._steady_seconds = 0.0
        self._steady_patches = 0
        self.losses: list[float] = []  # per-step training losses of this session
        self.interrupts = Interrupts()  # fit() takes the CLI's installed handlers
        self._window_predictor = None
        if config.deterministic:
            tf.keras.utils.set_random_seed(config.seed)
            tf.config.experimental.enable_op_determinism()
        tf.keras.mixed_precision.set_global_policy(config.precision)
        os.makedirs(config.workdir, exist_ok=True)

        self.task = load_task(config.data_dir)
        train_items, val_items = task_split(
            self.task,
            split_file=config.split_file or None,
            num_val=config.num_val or None,
            val_fraction=config.val_fraction,
            seed=config.seed,
        )
        self.num_val_cases = len(val_items)
        self.prefix = build_preprocessing(
            self.task,
            train_items,
            PreprocessingConfig(
                spacing=tuple(config.spacing),
                ct_percentiles=tuple(config.ct_percentiles),
                crop_margin=config.crop_margin,
                seed=config.seed,
            ),
            progress=config.progress and self.chief,
            dist=self.dist,
            fallback_dir=config.workdir,
            num_workers=config.cache_workers or None,
        )
        if self.chief:
            config.save(config.workdir)
            write_json(os.path.join(config.workdir, "preprocessing.json"), self.prefix.config())
            write_json(
                os.path.join(config.workdir, "task.json"),
                {"modalities": self.task.modalities, "labels": self.task.labels},
            )
        disk = _disk_cache_dir(self.task.cache_dir, config.workdir) if config.disk_cache else None
        budget = int(config.memory_budget_gb * 2**30) or None
        self.train_source = make_source(
            config.cache,
            train_items,
            self.prefix,
            cache_num=config.cache_num or None,
            cache_rate=config.cache_rate,
            replace_rate=config.replace_rate,
            num_workers=config.cache_workers or None,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.size,
            memory_budget_bytes=budget,
            wait_for_replacements=config.cache_strict or config.deterministic,
            cache_dir=disk,
            progress=config.progress and self.chief,
            # A budget sizes each worker's cache on its own items: all take the smallest.
            agree=lambda n: min(self.dist.allgather_object(n, "cache_num")),
        )
        # Validation volumes are dealt round-robin to the workers, never padded (no case twice);
        # a worker beyond the number of cases has none and contributes zero sums.
        my_val_items = val_items[self.dist.rank :: self.dist.size]
        self.val_source = (
            make_source(
                "none" if config.cache == "none" else "full",
                my_val_items,
                self.prefix,
                shuffle=False,
                seed=config.seed,
                cache_dir=disk,
                progress=False,
            )
            if my_val_items
            else None
        )

        self.sampler = AdaptiveSampler(
            config.pos_fraction,
            config.sampling_gamma,
            tuple(config.pos_fraction_bounds),
            adaptive=config.adaptive_sampling,
        )
        self.stream = TrainStream(
            self.train_source,
            config.batch_size,
            config.patch_size,
            config.num_samples,
            self.sampler.positive_fraction,
            seed=config.seed,
            flip=config.flip,
            intensity_shift=config.intensity_shift,
            num_channels=self.task.num_channels,
            # One GPU per worker (distributed pins it): batches are copied there ahead of time.
            prefetch_device="/gpu:0" if tf.config.list_logical_devices("GPU") else None,
        )
        self.patches_per_epoch = self.stream.patches_per_epoch
        self.steps_per_epoch = self.stream.steps_per_epoch
        # A rank with a longer epoch would wait forever in a gradient all-reduce: fail now.
        self.dist.check_same(self.steps_per_epoch, "steps per epoch")

        self.model = build_model(
            config.model, self.task.num_classes, self.task.num_channels, **_model_options(config)
        )
        dice_options = {
            "batch": config.loss_batch,
            "include_background": config.loss_include_background,
        }
        self.loss_fn = get_loss(config.loss, **({} if config.loss == "ce" else dice_options))
        lr = self.dist.scaled_learning_rate(
            config.learning_rate, config.scale_lr, config.warmup_steps
        )
        self.optimizer = build_optimizer(
            config.optimizer,
            lr,
            steps_upper_bound(config, self.patches_per_epoch),
            config.lr_schedule,
            config.warmup_steps,
            config.weight_decay,
            mixed_float16=config.precision == "mixed_float16",
        )
        self._build_optimizer_slots()

        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.elapsed_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.best_dice = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.best_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best_wall_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.time_to_target_s = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.steps_to_target = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.cache_state = tf.Variable("", dtype=tf.string, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            sampler=self.sampler,
            step=self.step,
            epoch=self.epoch,
            elapsed_s=self.elapsed_s,
            best_dice=self.best_dice,
            best_step=self.best_step,
            best_wall_s=self.best_wall_s,
            time_to_target_s=self.time_to_target_s,
            steps_to_target=self.steps_to_target,
            cache_state=self.cache_state,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            os.path.join(config.workdir, "checkpoints"),
            max_to_keep=config.keep_checkpoints,
        )
        self.restored_from = self._restore()
        self.dist.check_same(int(self.step.numpy()), "restored step (is --workdir shared?)")
        # The first fill runs here, in this thread, not lazily inside tf.data: a bad file stops
        # the run with its one-line error before training, Ctrl-C during the fill is a plain
        # KeyboardInterrupt, and the fill's seconds are not counted in the first epoch.
        fill = getattr(self.train_source, "fill", None)
        if callable(fill):
            fill()
        self.host_step = int(self.step.numpy())  # the step counter's value, kept on the host
        self.train_step = tf.function(
            self._train_step,
            input_signature=[
                tf.TensorSpec([None, *config.patch_size, self.task.num_channels], tf.float32),
                tf.TensorSpec([None, *config.patch_size], tf.uint8),
            ],
        )
        self.hooks = self._make_hooks()

    # ------------------------------------------------------------------ set-up helpers
    def _make_hooks(self) -> list[hooks_lib.Hook]:
        c = self.config
        hooks = [
            hooks_lib.ValidationHook(c.val_every),
            hooks_lib.SamplerHook(),
        ]
        if self.chief:
            hooks += [
                hooks_lib.ProgressHook(bar=c.progress, val_every=c.val_every),
                hooks_lib.TensorBoardHook(
                    os.path.join(c.workdir, "tensorboard"), images=c.image_summaries
                ),
                hooks_lib.MetricsLogHook(c.workdir),
            ]
            if c.profile_steps:
                logdir = os.path.join(c.workdir, "tensorboard")
                hooks.append(hooks_lib.ProfileHook(logdir, *c.profile_steps))
        hooks += [hooks_lib.CheckpointHook(c.checkpoint_every), hooks_lib.StopHook()]
        return hooks

    def _build_optimizer_slots(self) -> None:
        """Creates the optimiser's slot variables now, so a restore fills them immediately."""
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if hasattr(inner, "_create_all_weights"):
            inner._create_all_weights(self.model.trainable_variables)

    def _restore(self) -> str | None:
        """Restores the newest readable checkpoint; a corrupt one falls back to the previous."""
        for path in reversed(self.manager.checkpoints):
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as err:  # noqa: BLE001  (truncated files raise IndexError, too)
                logging.warning(
                    "checkpoint %s is unreadable (%s); trying the previous one", path, err
                )
                continue
            state = _rank_state(self.cache_state.numpy().decode(), self.dist)
            if state and hasattr(self.train_source, "restore"):
                try:
                    self.train_source.restore(state)
                except ValueError as err:  # a changed cache size, seed, split or cache mode
                    logging.warning("%s: the cache starts afresh", err)
            logging.info(
                "resumed from %s at step %d, epoch %d",
                path,
                int(self.step.numpy()),
                int(self.epoch.numpy()),
            )
            return path
        if self.manager.checkpoints:
            raise RuntimeError(
                f"no readable checkpoint in {self.manager.directory} (tried "
                f"{len(self.manager.checkpoints)}); move it away to start afresh"
            )
        return None

    # ------------------------------------------------------------------ the loop
    def _train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """One optimisation step on a batch; returns the float32 loss (a device tensor).

        ``self.train_step`` is this as a ``tf.function`` with an input signature whose batch
        dimension is free: a short last batch reuses the graph instead of tracing another.
        Labels are uint8 class indices, one-hot encoded here, on the device.
        """
        onehot = tf.one_hot(labels, self.task.num_classes, dtype=tf.float32)
        fp16 = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            probs = self.model(images, training=True)
            loss = self.loss_fn(onehot, tf.cast(probs, tf.float32))
            scaled = self.optimizer.get_scaled_loss(loss) if fp16 else loss
        tape = self.dist.gradient_tape(tape)
        variables = self.model.trainable_variables
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
        """
        self.interrupts = interrupts or Interrupts()  # not installed: never records a signal
        self.trace_train_step()
        for hook in self.hooks:
            hook.on_train_begin(self)
        self.dist.broadcast_variables(self.model.variables)
        with self.interrupts.deferred():
            logs = self._loop()
        logs.pop("validation", None)
        logs.setdefault("step", self.host_step)
        logs.setdefault("epoch", int(self.epoch.numpy()))
        for hook in self.hooks:
            hook.on_train_end(self, logs)
        logging.info("stopped: %s", self._stop_reason or "reached --epochs")
        return self.summary()

    def _loop(self) -> dict:
        """The epochs; returns the last logs. An interrupt saves a checkpoint and re-raises.

        Per step the loop only runs the step and counts it: the losses stay on the device and
        are read back (one copy), checked and logged every ``--log_every`` steps and at each
        epoch's end (:meth:`_sync`), where multi-worker stop votes are taken too.
        """
        c = self.config
        logs = {"loss": float("nan"), "patches_per_s": 0.0, "epoch": int(self.epoch.numpy())}
        self._bad_steps = 0
        try:
            while self._stop_reason is None and self.epoch.numpy() < c.epochs:
                losses, pending, epoch_start, patches = [], [], time.time(), 0
                loss = float("nan")
                for in_epoch, (images, labels) in enumerate(self.stream.epoch(), 1):
                    pending.append(self.train_step(images, labels))
                    if self.host_step == 0:
                        self.dist.broadcast_variables(self.optimizer.variables())
                    self.step.assign_add(1)
                    self.host_step += 1
                    patches += int(images.shape[0])
                    synced = self.host_step % c.log_every == 0 or in_epoch == self.steps_per_epoch
                    if synced:
                        loss = self._sync(pending, losses)
                        pending = []
                    seconds = time.time() - epoch_start
                    logs = {
                        "loss": loss,
                        "patches_per_s": patches / max(seconds, 1e-9),
                        "synced": synced,
                    }
                    for hook in self.hooks:
                        hook.on_step_end(self, logs)
                    self.check_interrupt(collective=synced)
                    if self._stop_reason:
                        break
                if pending:  # stopped between sync points
                    self._sync(pending, losses)
                seconds = time.time() - epoch_start
                self._train_seconds += seconds
                self._train_patches += patches
                if self._epochs_run:
                    self._steady_seconds += seconds
                    self._steady_patches += patches
                self._epochs_run += 1
                epoch_complete = self._stop_reason is None
                # When this boundary validates and the sampler adapts, the next epoch's patches
                # wait for the new positive fraction (else prefetched ones use the old one).
                hold = c.adaptive_sampling and ((int(self.epoch.numpy()) + 1) % c.val_every == 0)
                if epoch_complete:
                    self.stream.end_epoch(start_next=not hold)
                    self.epoch.assign_add(1)
                    self.cache_state.assign(_state_json(self.train_source, self.dist))
                logs = {
                    "epoch": int(self.epoch.numpy()),
                    "step": self.host_step,
                    "loss": float(np.mean(losses)) if losses else float("nan"),
                    "patches_per_s": patches / max(time.time() - epoch_start, 1e-9),
                }
                if epoch_complete:
                    for hook in self.hooks:
                        hook.on_epoch_end(self, logs)
                    self.stream.start_next_epoch()
                    self.check_interrupt()
        except KeyboardInterrupt as err:
            reason = str(err) or "interrupted"
            logging.warning("%s: saving a checkpoint at step %d", reason, self.host_step)
            self.save_checkpoint()
            raise
        return logs

    def _sync(self, pending: list[tf.Tensor], losses: list[float]) -> float:
        """Reads the steps' losses back in one copy, checks them, records them; returns the
        last (the losses of the last ``len(pending)`` steps, in order)."""
        values = tf.stack(pending).numpy().astype(float).tolist()
        first = self.host_step - len(values) + 1
        for offset, value in enumerate(values):
            self._bad_steps = self._check_loss(value, self._bad_steps, first + offset)
        losses.extend(values)
        self.losses.extend(values)
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

    def _check_loss(self, loss: float, bad_steps: int, step: int) -> int:
        if math.isfinite(loss):
            return 0
        if self.config.precision == "mixed_float16" and bad_steps < 20:
            logging.warning("non-finite loss at step %d: skipped by loss scaling", step)
            return bad_steps + 1
        raise NonFiniteLossError(
            f"loss became {loss} at step {step}; stopping (the last checkpoint and the best "
            f"model are from before it). Try a lower --learning_rate or --precision=float32."
        )

    # ------------------------------------------------------------------ used by hooks
    def stop(self, reason: str) -> None:
        """Ends the run after the current step."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def wall_seconds(self) -> float:
        """Wall time of the run, including earlier runs it resumed, set-up and cache fill."""
        return float(self.elapsed_s.numpy()) + time.time() - self._start

    def patches_per_s(self) -> float:
        """Training patches per second of training-loop time (validation excluded)."""
        return self._train_patches / self._train_seconds if self._train_seconds else 0.0

    def steady_patches_per_s(self) -> float | None:
        """As :meth:`patches_per_s` without this process's first epoch, whose graph tracing and
        optimisation take seconds; None before a second epoch has run."""
        return self._steady_patches / self._steady_seconds if self._steady_seconds else None

    def validate(self) -> ValidationResult:
        """Scores the current weights on the validation set, shared out across the workers.

        Returns:
            The combined result, the same on every worker.
        """
        c = self.config
        if self._window_predictor is None:
            self._window_predictor = make_window_predictor(
                self.model, c.val_roi_size, self.task.num_channels, c.val_sw_batch_size
            )
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
        )

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
        """Saves a checkpoint (chief only); the index file is replaced atomically by TF."""
        if not self.chief:
            return
        now = time.time()
        self.elapsed_s.assign_add(now - self._start)
        self._start = now
        self.manager.save(checkpoint_number=int(self.step.numpy()))

    def export_best_model(self) -> None:
        """Writes the model to ``workdir/best_model.keras`` atomically (chief only)."""
        if not self.chief:
            return
        path = os.path.join(self.config.workdir, BEST_MODEL)
        tmp = os.path.join(self.config.workdir, "best_model.tmp.keras")
        self.model.save(tmp)
        os.replace(tmp, path)

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


def _disk_cache_dir(task_cache_dir: str, workdir: str) -> str | None:
    """The on-disk prefix cache's folder: the task's cache area, or the workdir's when the data
    folder cannot be written (a read-only mount); None, with a warning, if neither can."""
    for folder in (os.path.join(task_cache_dir, "prefix"), os.path.join(workdir, "prefix_cache")):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                return folder
        except OSError as err:
            logging.warning("cannot write the prefix cache in %s (%s)", folder, err)
    logging.warning("--disk_cache is off: no folder for it can be written")
    return None


def _model_options(config: TrainConfig) -> dict:
    """The model options the chosen builder accepts."""
    wanted = {
        "depth": config.depth,
        "base_filters": config.base_filters,
        "norm": config.norm,
        "residual": config.residual,
    }
    accepted = inspect.signature(MODELS[config.model]).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def _state_json(source, dist: distributed.Distributed) -> str:
    """The cache position to checkpoint; with several workers every rank's, in rank order."""
    state = source.state() if hasattr(source, "state") else {}
    if dist.size > 1:
        state = {"ranks": dist.allgather_object(state, "cache_state")}
    return jsonio.dumps(state, indent=None)


def _rank_state(text: str, dist: distributed.Distributed) -> dict | None:
    """This rank's part of a checkpointed cache position (None: nothing to restore)."""
    if not text:
        return None
    state = json.loads(text)
    ranks = state["ranks"] if "ranks" in state else [state]
    if len(ranks) != dist.size:
        logging.warning(
            "the checkpoint's cache position is for %d workers, this run has %d: the cache "
            "starts afresh",
            len(ranks),
            dist.size,
        )
        return None
    return ranks[dist.rank]
