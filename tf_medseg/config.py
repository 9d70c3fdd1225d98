"""The typed configuration of a training run, and its absl flags.

One frozen dataclass holds every setting; each field's ``metadata["help"]`` is its flag's help,
so :func:`define_flags` declares one absl flag per field and :func:`config_from_flags` builds the
dataclass back. Experiments are flagfiles: the presets in ``tf_medseg/presets`` (``--preset``)
or a user's own; the resolved configuration is written beside the checkpoints
(``workdir/config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tf_medseg import rundir
from tf_medseg.rundir import RunDir

#: The paper's adaptive update (equation 4 from the first validation, undamped): the neutral values
#: of the warm-up and the damping, and the wide clamp [0.1, 0.9] instead of the floor of 1/3 (the
#: paper states no clamp; ``dataclasses.replace(config, **PAPER_SAMPLER)``; ``tf-medseg-train
#: --sampler=paper``). The paper's pooled-foreground centres are ``balance_classes=False`` too.
PAPER_SAMPLER = {
    "sampler_warmup_validations": 0,
    "sampler_warmup_dice": 0.0,
    "sampler_damping": 1.0,
    "pos_fraction_bounds": (0.1, 0.9),
}


#: Flags renamed: old name -> new name (read in an older run's ``config.json``).
RENAMED = {"max_minutes": "budget_minutes", "cache_strict": "wait_for_replacements"}


def _f(default, help_text: str, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. See each field's help, or ``tf-medseg-train --helpfull``."""

    # Data
    data_dir: str = _f("", "MSD-layout task folder (dataset.json, imagesTr/, labelsTr/).")
    workdir: str = _f("", "Output folder: checkpoints, TensorBoard, metrics, best model.")
    finetune_from: str = _f(
        "",
        "The workdir of a finished or stopped run whose model weights start this one (a "
        "fine-tune, e.g. on another split, seed or fold, which its --workdir cannot resume): "
        "give a new --workdir; the step count, best Dice, optimiser and sampler start afresh. "
        "Read only while --workdir holds no checkpoint of its own (then the run resumes from "
        "those). The network flags must be that run's, the data's channels and classes too.",
    )
    split_file: str = _f("", "Optional JSON split {'train': [cases], 'validation': [cases]}.")
    num_val: int = _f(
        0, "Validation cases (0: the paper's count for MSD tasks, else val_fraction)."
    )
    val_fraction: float = _f(
        0.2, "Validation fraction when num_val is 0 and no paper split applies."
    )
    num_folds: int = _f(
        0,
        "Cross-validation folds K (0: no folds): the cases, permuted by --seed, are dealt into "
        "K disjoint validation sets; --fold picks the one to validate on. Not with --split_file "
        "or --num_val.",
    )
    fold: int = _f(0, "The cross-validation fold to validate on, in [0, num_folds).")
    spacing: tuple[float, ...] = _f((1.0, 1.0, 1.0), "Target voxel spacing in mm (paper: 1.0).")
    ct_percentiles: tuple[float, ...] = _f(
        (5.0, 95.0),
        "Foreground percentiles of the CT range, LOW,HIGH, two of 0.5, 5, 50, 95, 99.5 (the "
        "percentiles the dataset's intensity statistics hold; paper: 5, 95).",
    )
    crop_margin: int = _f(8, "Voxels kept around the body's bounding box.")
    # Input pipeline
    cache: str = _f("smart", "Cache mode: smart (gradual replacement), full, or none (baseline).")
    cache_rate: float = _f(1.0, "Fraction of the training items held by the smart cache.")
    cache_num: int = _f(0, "Items held by the smart cache (0: from cache_rate).")
    replace_rate: float = _f(0.1, "Fraction of the smart cache replaced each epoch.")
    cache_workers: int = _f(0, "Threads filling the cache (0: number of CPUs).")
    memory_budget_gb: float = _f(0.0, "RAM the training cache may use (0: no limit).")
    wait_for_replacements: bool = _f(
        False,
        "Smart cache: wait at each epoch boundary for every replacement (the paper's schedule) "
        "instead of swapping late ones in at a later boundary. Implied by --deterministic.",
    )
    disk_cache: bool = _f(False, "Keep prefix outputs on disk in the data folder's cache area.")
    patch_size: tuple[int, ...] = _f((112, 112, 112), "Training patch size (paper: 112^3).")
    batch_size: int = _f(6, "Patches per batch per worker (paper: 6).")
    num_samples: int = _f(3, "Patches drawn from each cached volume per epoch.")
    intensity_shift: float = _f(0.1, "Maximum random intensity shift (0: off).")
    flip: bool = _f(True, "Random flips of the spatial axes.")
    balance_classes: bool = _f(
        True,
        "A foreground-centred patch picks its class uniformly among the item's foreground "
        "classes, then a voxel of it (a small class such as a lesion is not drowned by the organ "
        "around it); false draws from the pooled foreground voxels (the paper's sampler).",
    )
    # Adaptive sampling (paper section 5). The defaults add a warm-up, damping and a floor of
    # 1/3 to the paper's update; PAPER_SAMPLER, or --sampler=paper, is the paper's.
    adaptive_sampling: bool = _f(True, "Update the positive/negative ratio after each validation.")
    pos_fraction: float = _f(0.5, "Initial positive (foreground-centred) patch fraction (1:1).")
    sampling_gamma: float = _f(1.0, "Exponent gamma of the ratio update, equation 4.")
    pos_fraction_bounds: tuple[float, ...] = _f(
        (1 / 3, 0.9),
        "Clamp of the positive fraction, LOW,HIGH. Default 1/3,0.9: at least a third of the "
        "patches foreground-centred, as nnU-Net, so a small class is never starved; the paper: "
        "0.1,0.9.",
    )
    sampler_warmup_validations: int = _f(
        1,
        "The first N validations do not change the positive fraction (the first validation "
        "sees an untrained model, which may mark foreground everywhere). The paper: 0.",
    )
    sampler_warmup_dice: float = _f(
        0.1,
        "No validation changes the positive fraction before one whose mean Dice reaches this "
        "(once reached, the warm-up is over for good). The paper: 0 (no condition).",
    )
    sampler_damping: float = _f(
        0.5,
        "Share of the way from the current positive fraction to equation 4's that a validation "
        "moves it, in log-odds (0.5: the ratio r' goes to the geometric mean of the two), in "
        "(0, 1]. The paper: 1 (straight to equation 4's value).",
    )
    # Model
    model: str = _f("unet3d", "Network: unet3d, segresnet or vnet.")
    base_filters: int = _f(16, "Filters of the first level.")
    depth: int = _f(4, "Downsampling steps; patch and window sizes must divide by 2^depth.")
    norm: str = _f("instance", "Normalisation: instance, batch, group, layer or weight.")
    residual: bool = _f(False, "Residual blocks in the U-Net.")
    deep_supervision: bool = _f(
        False,
        "U-Net only: train with an auxiliary softmax output on each decoder level below full "
        "resolution, the loss the weighted sum over the outputs (weights 1/2^i, normalised; "
        "labels downsampled by nearest neighbour), as nnU-Net. Validation, the best model and "
        "prediction use the full-resolution output alone.",
    )
    # Optimisation
    optimizer: str = _f("novograd", "Optimizer: novograd (paper), adam (baseline) or sgd.")
    learning_rate: float = _f(5e-4, "Peak learning rate (paper: NovoGrad 5e-4, Adam 1e-4).")
    lr_schedule: str = _f(
        "constant",
        "Learning-rate schedule: constant; cosine, annealed over the run's known length (the "
        "--epochs or --max_steps bound, or --budget_minutes of wall time if that ends first); "
        "or plateau: multiplied by --lr_decay_factor after every --lr_decay_patience "
        "validations without a gain (for runs whose length a --patience stop decides).",
    )
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "NovoGrad's decoupled weight decay.")
    loss: str = _f("dice", "Loss: dice (equation 1), dice_ce or ce.")
    loss_batch: bool = _f(
        True,
        "Dice sums over the whole batch rather than per patch. Per patch, a patch without a "
        "class gives that class no gradient, so background-centred patches never teach the "
        "network to remove false positives.",
    )
    loss_include_background: bool = _f(False, "Include the background class in the Dice loss.")
    precision: str = _f("float32", "Policy: float32, mixed_bfloat16 (CPU/A100) or mixed_float16.")
    scale_lr: bool = _f(False, "Multiply the learning rate by the number of workers.")
    fp16_allreduce: bool = _f(False, "Send the gradient all-reduce as float16 (either backend).")
    distribution: str = _f(
        "auto",
        "Multi-worker backend: horovod (started by horovodrun), tf (tf.distribute "
        "MultiWorkerMirroredStrategy; cluster from TF_CONFIG, e.g. from tf-medseg-launch, or "
        "SLURM), none (one process), or auto: horovod under horovodrun, tf when TF_CONFIG is "
        "set, else none.",
    )
    # Schedule and stopping
    epochs: int = _f(1000, "Upper bound of epochs.")
    max_steps: int = _f(0, "Stop after this many training steps (0: no bound).")
    budget_minutes: float = _f(
        0.0,
        "Wall-time budget: stop after this many minutes, set-up included (0: no bound). A "
        "cosine schedule anneals over it.",
    )
    patience: int = _f(
        0,
        "Plateau stop: end the run after this many validations without a gain of more than "
        "--min_delta in mean Dice (0: never; planned runs get one, see tf-medseg-plan).",
    )
    min_delta: float = _f(0.001, "The rise in mean validation Dice that counts as a gain.")
    lr_decay_patience: int = _f(
        0,
        "--lr_schedule=plateau: validations without a gain before each decay (0: half of "
        "--patience).",
    )
    lr_decay_factor: float = _f(0.5, "--lr_schedule=plateau: each decay's multiplier.")
    target_dice: float = _f(0.0, "Stop when the mean validation Dice reaches this (0: never).")
    val_every: int = _f(1, "Validate every N epochs.")
    val_roi_size: tuple[int, ...] = _f((224, 224, 224), "Sliding-window size (paper: 224^3).")
    val_overlap: float = _f(32.0, "Window overlap: a fraction < 1, or voxels >= 1 (paper: 32).")
    val_mode: str = _f("constant", "Window blending: constant or gaussian.")
    val_sw_batch_size: int = _f(1, "Windows per forward pass in validation.")
    val_keep_largest: bool = _f(False, "Keep the largest connected component before scoring.")
    val_metrics: str = _f(
        "dice",
        "Validation metrics, comma-separated: dice, and any of the Decathlon's surface metrics "
        "nsd, hd95, assd (tf_medseg.surface_metrics; millimetres on the training grid's "
        "--spacing; slower than Dice). In metrics.jsonl and TensorBoard; Dice decides the best "
        "model and the target.",
    )
    val_nsd_tolerance_mm: float = _f(
        2.0, "NSD tolerance (mm) of --val_metrics=...,nsd, one for every class."
    )
    choose_postprocessing: bool = _f(
        True,
        "After training, decide per class from the validation cases whether keeping only its "
        "largest connected component raises the best model's mean Dice (nnU-Net's rule), and "
        "write the choice to postprocessing.json, which tf-medseg-predict and tf-medseg-export "
        "apply (instead of --val_keep_largest for every class).",
    )
    val_native: str = _f(
        "best",
        "Score the validation cases in their own geometry, as tf-medseg-predict segments them "
        "(from their files: resampled back, the chosen post-processing) and "
        "tf-medseg-evaluate scores them: best (the best model, after training; in "
        "summary.json), every (each validation too, and --target_dice is judged on it; "
        "metrics.jsonl and TensorBoard; for benchmarks) or off.",
    )
    val_tta: bool = _f(
        False,
        "Validate with test-time augmentation: the mean over the 8 flips of the three axes.",
    )
    checkpoint_every: int = _f(1, "Checkpoint every N epochs (and at the end).")
    log_every: int = _f(
        10,
        "Read the training loss back from the device, check it is finite, log it to "
        "TensorBoard, and (with several workers) agree on time and interrupt stops every N "
        "steps and at each epoch end; between those the loop does no per-step host work.",
    )
    keep_checkpoints: int = _f(3, "Checkpoints kept.")
    interrupt_grace_s: float = _f(
        120.0,
        "Seconds after Ctrl-C or SIGTERM before a run that has not stopped cleanly is ended "
        "without a checkpoint, its threads' stacks printed (0: wait forever). A second Ctrl-C "
        "always ends the run at once.",
    )
    # Reproducibility and logging
    seed: int = _f(0, "Run seed: split, cache order, patches.")
    deterministic: bool = _f(False, "Seed everything and enable TensorFlow op determinism.")
    profile_steps: tuple[int, ...] = _f(
        (),
        "Two step numbers START,END: trace steps START+1..END with tf.profiler into "
        "workdir/tensorboard/plugins/profile (TensorBoard's Profile tab; summarised by "
        "python -m tf_medseg.bench.step_profile).",
    )
    progress: bool = _f(True, "Progress bars.")
    image_summaries: bool = _f(True, "Validation slice with contours in TensorBoard.")

    def validate(self) -> list[str]:
        """Contradictions and out-of-range values, one line each (empty when valid)."""
        from tf_medseg.training.checks import config_errors

        return config_errors(self)

    def plateau_rule(self):
        """The plateau stop and decay of these flags (:mod:`tf_medseg.training.plateau`)."""
        from tf_medseg.training.plateau import PlateauRule

        decay = 0
        if self.lr_schedule == "plateau":
            decay = self.lr_decay_patience or max(1, self.patience // 2)
        return PlateauRule(self.patience, self.min_delta, decay, self.lr_decay_factor)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        for old, new in RENAMED.items():  # a config.json written before the rename
            if old in values:
                values.setdefault(new, values.pop(old))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items() if k in known})

    def save(self, workdir: str) -> str:
        """Writes ``workdir/config.json`` atomically; returns its path."""
        return RunDir(workdir).write_text(rundir.CONFIG, self.to_json())


def surface_metric_names(val_metrics: str) -> tuple[str, ...]:
    """The surface metrics (nsd, hd95, assd) a ``--val_metrics`` value asks for, in its order."""
    return tuple(
        name.strip() for name in val_metrics.split(",") if name.strip() and name.strip() != "dice"
    )


def _coerce(cls, name, value):
    kind = typing.get_type_hints(cls)[name]
    if typing.get_origin(kind) is tuple:
        (inner,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        values = [inner(v) for v in (value if isinstance(value, list | tuple) else [value])]
        return (
            tuple(values * 3)
            if len(values) == 1 and name != "pos_fraction_bounds"
            else tuple(values)
        )
    return kind(value)


def define_flags(flag_values=None) -> None:
    """Declares one absl flag per :class:`TrainConfig` field, defaulting to the field's default."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = hints[f.name], f.metadata["help"]
        if f.name in flag_values:
            continue
        if kind is bool:
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)
        else:
            default = [str(v) for v in f.default]
            flags.DEFINE_list(f.name, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values=None, planned: Mapping[str, Any] | None = None) -> TrainConfig:
    """Builds the configuration from parsed flags (a list flag of one value means isotropic):
    :func:`resolve_config` of the flags that were given (by a preset, a flagfile or the
    command line, which absl has already put in their order) over ``planned``."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    given = {
        f.name: flag_values[f.name].value
        for f in dataclasses.fields(TrainConfig)
        if flag_values[f.name].present
    }
    return resolve_config(given, planned)


def resolve_config(
    given: Mapping[str, Any], planned: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A run's configuration, in one order: the defaults < the plan < the preset < the
    command line.

    Args:
        given: The values a preset, a flagfile or the command line set (absl resolves those
            in place: a flag after ``--preset`` overrides it, one before is overridden).
        planned: The plan's typed values (:attr:`tf_medseg.planning.plan.Plan.settings`; an
            isotropic size may be one number).
    """
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values.update({name: field_value(name, value) for name, value in (planned or {}).items()})
    values.update(given)
    return TrainConfig(**{k: _coerce(TrainConfig, k, v) for k, v in values.items()})


def field_value(name: str, value: Any) -> Any:
    """``value`` as the field ``name`` holds it, from a typed value, a JSON one (a list) or its
    command-line text (``"true"``, ``"5,95"``)."""
    if isinstance(value, str) and typing.get_type_hints(TrainConfig)[name] is not str:
        value = parse_value(name, value)
    return _coerce(TrainConfig, name, value)


def parse_value(name: str, text: str) -> Any:
    """A field's value from its command-line text (as absl parses the field's flag)."""
    kind = typing.get_type_hints(TrainConfig)[name]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name}={text}: not true or false")
        return text.lower() in ("true", "1")
    if typing.get_origin(kind) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    return kind(text)


def flag_text(value) -> str:
    """A value as it is written on the command line (``true``, ``1,2,3``, ``0.5``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def steps_upper_bound(config: TrainConfig, patches_per_epoch: int) -> int:
    """Training steps the run would take without early stopping (for the cosine schedule)."""
    per_epoch = max(1, math.ceil(patches_per_epoch / config.batch_size))
    steps = per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps


def split_of(config: TrainConfig, task) -> tuple[list[dict], list[dict]]:
    """The run's train/validation split of ``task`` (:func:`tf_medseg.data.msd.task_split`
    with the run's split file, folds, count or fraction, and seed).

    Raises:
        DataError: A split the task's cases cannot give (too many folds or validation cases, a
            split file naming unknown cases), one line naming the data folder.
    """
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import task_split

    try:
        return task_split(
            task,
            split_file=config.split_file or None,
            num_val=config.num_val or None,
            val_fraction=config.val_fraction,
            seed=config.seed,
            num_folds=config.num_folds,
            fold=config.fold,
        )
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"{config.data_dir}: {err}") from err
