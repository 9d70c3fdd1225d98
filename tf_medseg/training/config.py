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
import os
import typing
from dataclasses import dataclass, field

from tf_medseg.jsonio import write_text

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
#: The learning-rate schedules: :data:`tf_medseg.optim.SCHEDULES` (named here without importing
#: TensorFlow; a test keeps the two equal).
SCHEDULES = ("constant", "cosine", "plateau")
DISTRIBUTIONS = ("auto", "horovod", "tf", "none")  # tf_medseg.distributed.BACKENDS
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


#: The settings that shape the checkpoint's variables (the network and the optimiser's slots): a
#: run resumes only with the values its checkpoints were written with.
CHECKPOINT_FIELDS = (
    "model",
    "base_filters",
    "depth",
    "norm",
    "residual",
    "deep_supervision",
    "optimizer",
)
#: The settings that choose the run's training and validation cases. A resumed run that changes
#: them would validate on cases its weights trained on, and compare its Dice with a best Dice of
#: other cases: refused when they change the split saved in ``workdir/split.json``.
SPLIT_FIELDS = ("split_file", "num_val", "val_fraction", "num_folds", "fold")


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
    cache_strict: bool = _f(
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
    # 1/3 to the paper's update (issue #19); PAPER_SAMPLER, or --sampler=paper, is the paper's.
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
        errors = []
        if not self.data_dir:
            errors.append("--data_dir is required")
        if not self.workdir:
            errors.append("--workdir is required")
        if self.cache not in ("smart", "full", "none"):
            errors.append(f"--cache must be smart, full or none, got {self.cache!r}")
        if not 0.0 <= self.replace_rate <= 1.0:
            errors.append(f"--replace_rate must be in [0, 1], got {self.replace_rate}")
        if not 0.0 < self.cache_rate <= 1.0:
            errors.append(f"--cache_rate must be in (0, 1], got {self.cache_rate}")
        if self.precision not in POLICIES:
            errors.append(f"--precision must be one of {POLICIES}, got {self.precision!r}")
        for name in ("patch_size", "val_roi_size", "spacing"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) <= 0:
                errors.append(f"--{name} needs 1 or 3 positive values, got {list(value)}")
        if len(self.patch_size) == 3 and len(self.val_roi_size) == 3:
            if any(p > r for p, r in zip(self.patch_size, self.val_roi_size, strict=True)):
                errors.append(
                    f"--patch_size {list(self.patch_size)} is larger than the validation window "
                    f"--val_roi_size {list(self.val_roi_size)}"
                )
            step = 2**self.depth
            for name in ("patch_size", "val_roi_size"):
                if any(s % step for s in getattr(self, name)):
                    errors.append(
                        f"--{name} {list(getattr(self, name))} must be divisible by {step} "
                        f"(2^depth for --depth={self.depth})"
                    )
        lo, hi = (self.pos_fraction_bounds + (None, None))[:2]
        if lo is None or hi is None or not 0.0 < lo <= hi < 1.0:
            errors.append(f"--pos_fraction_bounds must satisfy 0 < lo <= hi < 1, got {lo}, {hi}")
        elif not lo <= self.pos_fraction <= hi:
            errors.append(
                f"--pos_fraction={self.pos_fraction} is outside --pos_fraction_bounds={lo:g},{hi:g}"
            )
        if not 0.0 <= self.pos_fraction <= 1.0:
            errors.append(f"--pos_fraction must be in [0, 1], got {self.pos_fraction}")
        if self.sampler_warmup_validations < 0:
            errors.append(
                f"--sampler_warmup_validations must be >= 0, got {self.sampler_warmup_validations}"
            )
        if not 0.0 <= self.sampler_warmup_dice <= 1.0:
            errors.append(
                f"--sampler_warmup_dice must be in [0, 1], got {self.sampler_warmup_dice}"
            )
        if not 0.0 < self.sampler_damping <= 1.0:
            errors.append(f"--sampler_damping must be in (0, 1], got {self.sampler_damping}")
        if self.val_overlap < 0 or (1.0 <= self.val_overlap and self.val_overlap % 1):
            errors.append("--val_overlap must be a fraction in [0, 1) or whole voxels >= 1")
        if self.batch_size < 1 or self.num_samples < 1 or self.val_every < 1:
            errors.append("--batch_size, --num_samples and --val_every must be at least 1")
        if self.log_every < 1:
            errors.append(f"--log_every must be at least 1, got {self.log_every}")
        if self.interrupt_grace_s < 0:
            errors.append(f"--interrupt_grace_s must be >= 0, got {self.interrupt_grace_s}")
        if self.distribution not in DISTRIBUTIONS:
            errors.append(
                f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                f"{self.distribution!r}"
            )
        if self.num_folds < 0 or self.num_folds == 1:
            errors.append(f"--num_folds must be 0 (no folds) or at least 2, got {self.num_folds}")
        if self.fold and not self.num_folds:
            errors.append(f"--fold={self.fold} needs --num_folds")
        if self.num_folds >= 2 and not 0 <= self.fold < self.num_folds:
            errors.append(
                f"--fold must be in [0, {self.num_folds}) for --num_folds={self.num_folds}, "
                f"got {self.fold}"
            )
        if self.num_folds and self.split_file:
            errors.append("--num_folds and --split_file both choose the split; give one")
        if self.num_folds and self.num_val:
            errors.append(
                f"--num_folds and --num_val={self.num_val} both choose the validation cases; "
                "give --num_val=0 with --num_folds (a preset may set --num_val)"
            )
        if self.deep_supervision and self.model != "unet3d":
            errors.append(
                "--deep_supervision is implemented for --model=unet3d only (auxiliary outputs on "
                f"its decoder levels), not for --model={self.model}"
            )
        elif self.deep_supervision and self.depth < 2:
            errors.append(
                f"--deep_supervision needs --depth >= 2 (with --depth={self.depth} no decoder "
                "level is below full resolution)"
            )
        if self.memory_budget_gb < 0:
            errors.append(f"--memory_budget_gb must be >= 0, got {self.memory_budget_gb}")
        errors += self.plateau_rule().errors() + self._schedule_errors()
        if self.budget_minutes < 0:
            errors.append(f"--budget_minutes must be >= 0, got {self.budget_minutes}")
        if not 0.0 <= self.target_dice <= 1.0:
            errors.append(f"--target_dice must be in [0, 1], got {self.target_dice}")
        errors += _percentile_errors(self.ct_percentiles)
        errors += _val_metrics_errors(self.val_metrics, self.val_nsd_tolerance_mm)
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 0 <= self.profile_steps[0] < self.profile_steps[1]
        ):
            errors.append(
                f"--profile_steps must be two steps START < END, got {list(self.profile_steps)}"
            )
        return errors

    def plateau_rule(self):
        """The plateau stop and decay of these flags (:mod:`tf_medseg.training.plateau`)."""
        from tf_medseg.training.plateau import PlateauRule

        decay = 0
        if self.lr_schedule == "plateau":
            decay = self.lr_decay_patience or max(1, self.patience // 2)
        return PlateauRule(self.patience, self.min_delta, decay, self.lr_decay_factor)

    def _schedule_errors(self) -> list[str]:
        if self.lr_schedule not in SCHEDULES:
            return [f"--lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"]
        if self.lr_schedule == "plateau" and not (self.patience or self.lr_decay_patience):
            return ["--lr_schedule=plateau needs --lr_decay_patience or --patience"]
        return []

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        if "max_minutes" in values:  # the flag's name before --budget_minutes
            values.setdefault("budget_minutes", values.pop("max_minutes"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items() if k in known})

    def save(self, workdir: str) -> str:
        """Writes ``workdir/config.json`` atomically; returns its path."""
        return write_text(os.path.join(workdir, "config.json"), self.to_json())


def surface_metric_names(val_metrics: str) -> tuple[str, ...]:
    """The surface metrics (nsd, hd95, assd) a ``--val_metrics`` value asks for, in its order."""
    return tuple(
        name.strip() for name in val_metrics.split(",") if name.strip() and name.strip() != "dice"
    )


def _val_metrics_errors(val_metrics: str, tolerance_mm: float) -> list[str]:
    from tf_medseg.surface_metrics import METRICS

    unknown = [n for n in surface_metric_names(val_metrics) if n not in METRICS]
    errors = []
    if unknown:
        errors.append(
            f"--val_metrics={val_metrics}: unknown {', '.join(unknown)}; choose from "
            f"{', '.join(METRICS)}"
        )
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        errors.append(f"--val_nsd_tolerance_mm must be a finite value >= 0, got {tolerance_mm}")
    return errors


def _percentile_errors(percentiles: tuple[float, ...]) -> list[str]:
    """``--ct_percentiles`` must name two of the percentiles the statistics hold, low first."""
    from tf_medseg.data.stats import PERCENTILES

    if len(percentiles) == 2 and percentiles[0] < percentiles[1]:
        if all(float(p) in PERCENTILES for p in percentiles):
            return []
    held = [f"{p:g}" for p in PERCENTILES]
    return [
        f"--ct_percentiles={_flag_value(tuple(percentiles))}: the intensity statistics hold the "
        f"percentiles {', '.join(held[:-1])} and {held[-1]}; give two of them, low before high"
    ]


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


def config_from_flags(flag_values=None) -> TrainConfig:
    """Builds the configuration from parsed flags (a list flag of one value means isotropic)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    values = {}
    for f in dataclasses.fields(TrainConfig):
        raw = flag_values[f.name].value
        values[f.name] = _coerce(TrainConfig, f.name, raw)
    return TrainConfig(**values)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a checkpoint (TensorFlow's index of them)."""
    return bool(workdir) and os.path.isfile(os.path.join(workdir, "checkpoints", "checkpoint"))


def _saved_config(workdir: str) -> TrainConfig | None:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return TrainConfig.from_json(f.read())
    except (OSError, ValueError, TypeError):
        return None


def _differs(name: str, config: TrainConfig, saved: TrainConfig, whose: str, rest: str) -> str:
    return (
        f"--{name}={_flag_value(getattr(config, name))} differs from the "
        f"--{name}={_flag_value(getattr(saved, name))} of {whose}: {rest}"
    )


def resume_conflicts(config: TrainConfig) -> list[str]:
    """What keeps ``config`` from resuming the run whose checkpoints are in
    ``workdir/checkpoints``, one line each; empty when it may (or there are no checkpoints, or no
    readable ``config.json`` beside them). Without checkpoints, :func:`finetune_conflicts`.

    Refused, each naming the flag with its old and new values (from ``workdir/config.json``):

    * a setting of :data:`CHECKPOINT_FIELDS`, or ``--precision=mixed_float16`` after another
      precision (its ``LossScaleOptimizer`` expects a loss scale those checkpoints do not hold;
      the other way round resumes, the loss scale dropped). Without this check the restore fails
      on every checkpoint with TensorFlow's shape or object-matching errors, which do not name
      the flag;
    * another ``--seed`` or ``--data_dir``, or a setting of :data:`SPLIT_FIELDS` that changes
      the split of ``workdir/split.json`` (the validation cases); a split that changed with the
      same flags (an edited ``dataset.json`` or split file) is named too;
    * a data folder of other channels or classes than ``workdir/task.json``'s.

    Reads ``dataset.json`` (and a split file), not the images; no TensorFlow.
    """
    if not config.workdir:
        return []
    if not has_checkpoint(config.workdir):
        return finetune_conflicts(config)
    saved = _saved_config(config.workdir)
    if saved is None:
        return []
    whose = f"the run whose checkpoints are in {os.path.join(config.workdir, 'checkpoints')}"
    changed = [name for name in CHECKPOINT_FIELDS if getattr(config, name) != getattr(saved, name)]
    if config.precision == "mixed_float16" != saved.precision:
        changed.append("precision")
    lines = [
        _differs(
            name, config, saved, whose, "resume with that value, or train in another --workdir"
        )
        for name in changed
    ]
    task = _task_or_none(config.data_dir)
    lines += _split_conflicts(config, saved, task, whose)
    lines += _data_conflicts(
        config, task, config.workdir, whose, "give its data folder, or train in another --workdir"
    )
    return lines


def _task_or_none(data_dir: str):
    """The task of ``data_dir``, or None when it cannot be read (the run reports that)."""
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import load_task

    try:
        return load_task(data_dir)
    except DataError:
        return None


def _same_path(a: str, b: str) -> bool:
    """The same folder or file: the same text (a relative path resumed from the same place), or
    the same place on disk."""
    return a == b or bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _split_conflicts(config: TrainConfig, saved: TrainConfig, task, whose: str) -> list[str]:
    """Another seed or data folder, or split settings that change the saved split."""
    way = (
        "resume with that value, or train in another --workdir "
        f"(--finetune_from={config.workdir} starts it from this run's weights)"
    )
    lines = []
    if config.seed != saved.seed:
        why = "the seed draws the split, the cache order and the patches"
        lines.append(_differs("seed", config, saved, whose, f"{why}; {way}"))
    if not _same_path(config.data_dir, saved.data_dir):
        why = "the cases under the trained weights would be another folder's"
        lines.append(_differs("data_dir", config, saved, whose, f"{why}; {way}"))
    same = _same_split(config, task)
    if same or lines:  # the seed or data folder named: their split is theirs
        return lines
    names = [
        name
        for name in SPLIT_FIELDS
        if not (
            _same_path(config.split_file, saved.split_file)
            if name == "split_file"
            else getattr(config, name) == getattr(saved, name)
        )
    ]
    why = "the validation cases would change under the trained weights (split.json)"
    lines = [_differs(name, config, saved, whose, f"{why}; {way}") for name in names]
    if not lines and same is False:
        lines.append(
            f"the split of --data_dir={config.data_dir} differs from "
            f"{os.path.join(config.workdir, 'split.json')} of {whose} with the same flags (its "
            "dataset.json or split file changed): restore them, or train in another --workdir "
            f"(--finetune_from={config.workdir} starts it from this run's weights)"
        )
    return lines


def _same_split(config: TrainConfig, task) -> bool | None:
    """Whether the split ``config`` gives is the workdir's ``split.json`` (the same cases in
    training and in validation); None when either is unknown."""
    from tf_medseg.data.io import DataError

    try:
        with open(os.path.join(config.workdir, "split.json")) as f:
            stored = json.load(f)
        old = (sorted(stored["train"]), sorted(stored["validation"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if task is None:
        return None
    try:
        train, val = split_of(config, task)
    except DataError:
        return None
    return old == (sorted(i["case"] for i in train), sorted(i["case"] for i in val))


def _data_conflicts(config: TrainConfig, task, run_dir: str, whose: str, way: str) -> list[str]:
    """The data's channels and classes against those ``run_dir/task.json`` was trained on (its
    checkpoints' input and output layers)."""
    path = os.path.join(run_dir, "task.json")
    try:
        with open(path) as f:
            stored = json.load(f)
        old = (list(stored["modalities"]), list(stored["labels"]))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    new = (list(task.modalities), list(task.labels)) if task is not None else old
    if new == old:
        return []
    return [
        f"--data_dir={config.data_dir} has channels {new[0]} and classes {new[1]}, {whose} was "
        f"trained on channels {old[0]} and classes {old[1]} ({path}): {way}"
    ]


def finetune_conflicts(config: TrainConfig) -> list[str]:
    """What keeps ``--finetune_from`` from starting ``config``'s run, one line each (empty
    without it): a folder with no checkpoint, another network than its run's (the settings of
    :data:`CHECKPOINT_FIELDS` but the optimiser, which starts afresh), other channels or
    classes than its ``task.json``'s."""
    source = config.finetune_from
    if not source:
        return []
    if not has_checkpoint(source):
        return [
            f"--finetune_from={source} holds no checkpoint "
            f"({os.path.join(source, 'checkpoints')}): give a training workdir"
        ]
    where = f"the run in --finetune_from={source}"
    saved = _saved_config(source)
    network = [name for name in CHECKPOINT_FIELDS if name != "optimizer"]
    lines = [
        _differs(
            name,
            config,
            saved,
            where,
            "a fine-tune starts from that network's weights; give its value",
        )
        for name in network
        if saved is not None and getattr(config, name) != getattr(saved, name)
    ]
    task = _task_or_none(config.data_dir)
    return lines + _data_conflicts(
        config, task, source, where, "a fine-tune needs the same channels and classes"
    )


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
