"""Building a training run: its inputs, its model and optimiser, and its checkpoint.

:class:`~tf_medseg.training.loop.Trainer` calls these in order; nothing here trains. The parts
are plain objects (:class:`Inputs`, :class:`Learner`) so that a test or a benchmark can build
one without the loop.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile

import tensorflow as tf
from absl import logging

from tf_medseg import distributed, jsonio, rundir
from tf_medseg.cache.sources import Source, SourceOptions, make_source
from tf_medseg.config import TrainConfig, split_of, steps_upper_bound
from tf_medseg.data.msd import MSDTask, write_split_file
from tf_medseg.losses import deep_supervision_loss, get_loss
from tf_medseg.models import MODELS, build_model, main_output_model
from tf_medseg.optim import build_optimizer
from tf_medseg.pipeline import TailOptions, TrainStream
from tf_medseg.rundir import RunDir
from tf_medseg.sampling import AdaptiveSampler
from tf_medseg.training.state import RunState
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.intensity import NormalizeCT
from tf_medseg.transforms.preprocessing import PreprocessingConfig, build_preprocessing


@dataclasses.dataclass
class Inputs:
    """The data side of a run: task, preprocessing, sources, sampler, stream.

    Attributes:
        task: The task (``dataset.json``).
        num_val_cases: Validation cases of the whole run (all workers).
        val_items: This worker's validation cases as files (``image``, ``label``).
        prefix: The deterministic preprocessing (fitted on the data folder's labelled cases).
        train_source: This worker's training source (cache).
        val_source: This worker's validation cases, cached (None: it has none).
        sampler: The adaptive positive/negative sampler.
        stream: The training batches.
    """

    task: MSDTask
    num_val_cases: int
    val_items: list[dict]
    prefix: Compose
    train_source: Source
    val_source: Source | None
    sampler: AdaptiveSampler
    stream: TrainStream


def build_sampler(config: TrainConfig) -> AdaptiveSampler:
    """The adaptive positive/negative sampler the configuration describes."""
    return AdaptiveSampler(
        config.pos_fraction,
        config.sampling_gamma,
        tuple(config.pos_fraction_bounds),
        adaptive=config.adaptive_sampling,
        warmup_validations=config.sampler_warmup_validations,
        warmup_dice=config.sampler_warmup_dice,
        damping=config.sampler_damping,
    )


def build_inputs(config: TrainConfig, dist: distributed.Distributed, task: MSDTask) -> Inputs:
    """Splits the task, fits the prefix, and builds the sources and the stream.

    The chief writes ``config.json``, ``split.json``, ``preprocessing.json`` and ``task.json`` to
    the workdir. The training cache is not filled here (see :meth:`Trainer.__init__`).
    """
    chief = dist.is_chief
    train_items, val_items = split_of(config, task)
    # The CT statistics are the data folder's, over all its labelled cases (as nnU-Net's
    # fingerprint): every split and fold of the folder shares them, and so its preprocessing,
    # which the models of an ensemble must share.
    prefix = build_preprocessing(
        task,
        list(task.training),
        PreprocessingConfig(
            spacing=tuple(config.spacing),
            ct_percentiles=tuple(config.ct_percentiles),
            crop_margin=config.crop_margin,
            seed=config.seed,
        ),
        progress=config.progress and chief,
        dist=dist,
        fallback_dir=config.workdir,
        num_workers=config.cache_workers or None,
    )
    prefix = keep_trained_ct_range(prefix, config.workdir)
    if chief:
        run = RunDir(config.workdir)
        config.save(run.path)
        write_split_file(run.split, train_items, val_items)
        run.write_json(rundir.PREPROCESSING, prefix.config())
        run.write_json(rundir.TASK, {"modalities": task.modalities, "labels": task.labels})
    disk = disk_cache_dir(task.cache_dir, config.workdir) if config.disk_cache else None
    budget = int(config.memory_budget_gb * 2**30) or None
    options = SourceOptions(
        cache_num=config.cache_num or None,
        cache_rate=config.cache_rate,
        replace_rate=config.replace_rate,
        num_workers=config.cache_workers or None,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.size,
        memory_budget_bytes=budget,
        wait_for_replacements=config.wait_for_replacements or config.deterministic,
        cache_dir=disk,
        progress=config.progress and chief,
    )
    # A budget sizes each worker's cache on its own items: all take the smallest.
    agree = lambda n: min(dist.allgather_object(n, "cache_num"))  # noqa: E731
    train_source = make_source(config.cache, train_items, prefix, options, agree)
    # Validation volumes are dealt round-robin to the workers, never padded (no case twice);
    # a worker beyond the number of cases has none and contributes zero sums.
    my_val_items = val_items[dist.rank :: dist.size]
    val_source = None
    if my_val_items:
        val_options = SourceOptions(shuffle=False, seed=config.seed, cache_dir=disk, progress=False)
        val_mode = "none" if config.cache == "none" else "full"
        val_source = make_source(val_mode, my_val_items, prefix, val_options)
    sampler = build_sampler(config)
    tail = TailOptions(
        config.batch_size,
        tuple(config.patch_size),
        config.num_samples,
        seed=config.seed,
        flip=config.flip,
        intensity_shift=config.intensity_shift,
        balance_classes=config.balance_classes,
        # One GPU per worker (distributed pins it): batches are copied there ahead of time.
        prefetch_device="/gpu:0" if tf.config.list_logical_devices("GPU") else None,
    )
    stream = TrainStream(
        train_source, tail, sampler.positive_fraction, num_channels=task.num_channels
    )
    return Inputs(
        task, len(val_items), my_val_items, prefix, train_source, val_source, sampler, stream
    )


def keep_trained_ct_range(prefix: Compose, workdir: str) -> Compose:
    """``prefix`` with the CT range of ``workdir/preprocessing.json`` when the run resumes and
    the two differ: a run keeps the normalisation its checkpoints were trained with.

    They differ for a run begun before the statistics were the data folder's (over its training
    cases only, then), or when the data's files changed since.
    """
    run = RunDir(workdir)
    path = run.preprocessing
    if not run.has_checkpoint() or not os.path.isfile(path):
        return prefix
    try:
        transforms = run.read_json(rundir.PREPROCESSING)["transforms"]
        saved = [t for t in transforms if t.get("name") == "NormalizeCT"]
        trained = NormalizeCT(saved[0]["lower"], saved[0]["upper"]) if saved else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return prefix
    for i, transform in enumerate(prefix.transforms):
        if isinstance(transform, NormalizeCT) and trained is not None:
            if transform.config() == trained.config():
                return prefix
            logging.warning(
                "%s: the resumed run keeps the CT range it was trained with, %s to %s (the data "
                "folder's statistics now give %s to %s)",
                path,
                trained.lower,
                trained.upper,
                transform.lower,
                transform.upper,
            )
            return Compose([*prefix.transforms[:i], trained, *prefix.transforms[i + 1 :]])
    return prefix


@dataclasses.dataclass
class Learner:
    """The model, its loss and its optimiser (with its slots built).

    Attributes:
        model: The one-output model: validation, ``best_model.keras``, prediction.
        train_model: The model the training step runs, the optimiser updates and the checkpoint
            saves: ``model`` itself, or with ``--deep_supervision`` the U-Net with its auxiliary
            outputs, on the same layers as ``model``.
        loss_fn: ``loss(labels_onehot, train_model's output) -> float32 scalar``.
        optimizer: The optimiser, its slots built for ``train_model``'s variables.
    """

    model: tf.keras.Model
    loss_fn: object
    optimizer: tf.keras.optimizers.Optimizer
    train_model: tf.keras.Model


def build_learner(
    config: TrainConfig, task: MSDTask, dist: distributed.Distributed, patches_per_epoch: int
) -> Learner:
    """Builds the model, the loss and the optimiser (learning rate scaled for the workers)."""
    train_model = build_model(
        config.model, task.num_classes, task.num_channels, **model_options(config)
    )
    model = main_output_model(train_model)
    dice_options = {
        "batch": config.loss_batch,
        "include_background": config.loss_include_background,
    }
    loss_fn = get_loss(config.loss, **({} if config.loss == "ce" else dice_options))
    if config.deep_supervision:
        loss_fn = deep_supervision_loss(loss_fn, len(train_model.outputs))
    lr = dist.scaled_learning_rate(config.learning_rate, config.scale_lr, config.warmup_steps)
    optimizer = build_optimizer(
        config.optimizer,
        lr,
        steps_upper_bound(config, patches_per_epoch),
        config.lr_schedule,
        config.warmup_steps,
        config.weight_decay,
        mixed_float16=config.precision == "mixed_float16",
    )
    # The slot variables now, so that a restore fills them at once.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(inner, "_create_all_weights"):
        inner._create_all_weights(train_model.trainable_variables)
    return Learner(model, loss_fn, optimizer, train_model)


def build_checkpoint(
    config: TrainConfig, learner: Learner, sampler: AdaptiveSampler, state: RunState
) -> tf.train.CheckpointManager:
    """The checkpoint of model, optimiser, sampler and run state, in ``workdir/checkpoints``.

    With ``--finetune_from`` and no checkpoint of the run's own yet, the model's weights are
    read here from that run's newest readable checkpoint (a fine-tune): the rest (step, best
    Dice, optimiser, sampler) keeps its initial values, and the restore that follows finds
    nothing to resume.
    """
    checkpoint = tf.train.Checkpoint(
        model=learner.train_model,  # the auxiliary heads too: a resumed run goes on training them
        optimizer=learner.optimizer,
        sampler=sampler,
        **state.variables_by_name,
    )
    manager = tf.train.CheckpointManager(
        checkpoint,
        RunDir(config.workdir).checkpoints,
        max_to_keep=config.keep_checkpoints,
    )
    if config.finetune_from and not manager.checkpoints:
        restore_weights(learner.train_model, RunDir(config.finetune_from).checkpoints)
    return manager


def restore_weights(model: tf.keras.Model, directory: str) -> str:
    """Reads the model's weights alone from the newest readable checkpoint in ``directory``
    (a corrupt one falls back to the previous); returns its path.

    Raises:
        RuntimeError: No checkpoint there holds this model's weights.
    """
    found = tf.train.get_checkpoint_state(directory)
    paths = list(found.all_model_checkpoint_paths) if found else []
    for path in reversed(paths):
        try:
            tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()
        except Exception as err:  # noqa: BLE001  (truncated files raise IndexError, too)
            logging.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            continue
        logging.info(
            "fine-tuning from the weights of %s; the step count, best Dice, optimiser and "
            "sampler start afresh",
            path,
        )
        return path
    raise RuntimeError(f"no checkpoint in {directory} holds this model's weights")


def restore_latest(
    manager: tf.train.CheckpointManager,
    state: RunState,
    source: Source,
    dist: distributed.Distributed,
) -> str | None:
    """Restores the newest readable checkpoint (a corrupt one falls back to the previous) into
    the run state, and puts the training source at the saved position.

    A source saved by another cache (changed cache size or mode, or worker count) is not
    restored: one warning says what changed, and the cache starts afresh. (Another seed or split
    does not get here: :func:`~tf_medseg.training.resume.resume_conflicts` refuses it.)

    Returns:
        The checkpoint's path, or None when there is none.

    Raises:
        RuntimeError: When checkpoints exist and none is readable.
    """
    for path in reversed(manager.checkpoints):
        try:
            _restore(manager.checkpoint, path, state)
        except Exception as err:  # noqa: BLE001  (truncated files raise IndexError, too)
            logging.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            continue
        state.load()
        saved = rank_state(state.cache_state, dist)
        if saved:
            try:
                source.restore(saved)
            except ValueError as err:  # a changed cache size or cache mode
                logging.warning("%s: the cache starts afresh", err)
        logging.info(
            "resumed from %s at step %d, epoch %d%s",
            path,
            state.step,
            state.epoch,
            f" (after its step {state.epoch_step})" if state.epoch_step else "",
        )
        return path
    if manager.checkpoints:
        raise RuntimeError(
            f"no readable checkpoint in {manager.directory} (tried "
            f"{len(manager.checkpoints)}); move it away to start afresh"
        )
    return None


#: The variable of the sampler's warm-up state (absent from checkpoints written before it).
_WARMUP_KEY = "sampler/warmed_up/.ATTRIBUTES/VARIABLE_VALUE"


def _restore(checkpoint: tf.train.Checkpoint, path: str, state: RunState) -> None:
    """Restores ``path`` into ``checkpoint`` (every object must be matched). A checkpoint
    written before the sampler kept its warm-up state is restored without it: the warm-up
    starts again, with a warning."""
    if _WARMUP_KEY in {name for name, _ in tf.train.list_variables(path)}:
        checkpoint.restore(path).assert_existing_objects_matched()
        return
    sampler = tf.train.Checkpoint(positive_fraction=checkpoint.sampler.positive_fraction)
    older = tf.train.Checkpoint(
        model=checkpoint.model,
        optimizer=checkpoint.optimizer,
        sampler=sampler,
        **state.variables_by_name,
    )
    older.restore(path).assert_existing_objects_matched()
    logging.warning(
        "%s holds no sampler warm-up state (written before it was saved): the warm-up starts "
        "again",
        path,
    )


def source_state_json(source: Source, dist: distributed.Distributed) -> str:
    """The source's position to checkpoint; with several workers every rank's, in rank order."""
    state = source.state()
    if dist.size > 1:
        state = {"ranks": dist.allgather_object(state, "cache_state")}
    return jsonio.dumps(state, indent=None)


def rank_state(text: str, dist: distributed.Distributed) -> dict | None:
    """This rank's part of a checkpointed source position (None: nothing to restore)."""
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


def disk_cache_dir(task_cache_dir: str, workdir: str) -> str | None:
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


def model_options(config: TrainConfig) -> dict:
    """The model options the chosen builder accepts."""
    wanted = {
        "depth": config.depth,
        "base_filters": config.base_filters,
        "norm": config.norm,
        "residual": config.residual,
        "deep_supervision": config.deep_supervision,
    }
    accepted = inspect.signature(MODELS[config.model]).parameters
    return {k: v for k, v in wanted.items() if k in accepted}
