"""What makes a training run contradictory or out of range, one line each.

:func:`check_run` is every check a run passes before it starts, done once (by the CLI, or by
:class:`~tf_medseg.training.loop.Trainer` when it is given a bare configuration): the
configuration's own (:func:`config_errors`, also ``TrainConfig.validate()``: every problem, in
the flags' own names, so that a user fixes all at once), what a resume or a fine-tune may not
change (:mod:`tf_medseg.training.resume`), the workdir, and the task folder with the header of
every file it lists. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

from tf_medseg.choices import BACKENDS, CACHE_MODES, NATIVE_VALIDATION, POLICIES, SCHEDULES
from tf_medseg.config import TrainConfig, flag_text, surface_metric_names
from tf_medseg.data.io import DataError
from tf_medseg.data.msd import MSDTask, check_task_files, load_task


class ConfigError(ValueError):
    """Contradictory or out-of-range settings, or a resume that would change its run; one
    problem per line."""


@dataclasses.dataclass(frozen=True)
class CheckedRun:
    """A run's configuration that passed :func:`check_run`, with its task (loaded once, for the
    checks and the run)."""

    config: TrainConfig
    task: MSDTask


def check_run(config: TrainConfig, task: MSDTask | None = None) -> CheckedRun:
    """Every check of a run before it starts: the configuration's own, then (when it has none)
    the workdir, what a resume or a fine-tune may not change, and every file the task lists.

    Args:
        config: The run's configuration.
        task: ``config.data_dir``'s task when the caller has loaded it already (the planner's).

    Raises:
        ConfigError: Every problem of the configuration (or of its resume), one per line.
        DataError: The data folder or a file it lists is bad (one line naming it).
    """
    from tf_medseg.training.resume import resume_conflicts

    errors = config_errors(config)
    if task is None and config.data_dir:
        try:
            task = load_task(config.data_dir)
        except DataError:
            if errors:  # the flags' problems first: the data folder may be one of them
                raise ConfigError("\n".join(errors)) from None
            raise
    errors = errors or workdir_errors(config.workdir)
    if errors:
        raise ConfigError("\n".join(errors))
    errors = resume_conflicts(config, task)
    if errors:
        raise ConfigError("\n".join(errors))
    check_task_files(task)
    return CheckedRun(config, task)


def workdir_errors(workdir: str) -> list[str]:
    """Why ``workdir`` cannot be created and written, in one line (empty: it can). Checked
    before anything is read or trained, so that a bad path is not a traceback later."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".tf_medseg_write_check"):
            pass
    except OSError as err:
        why = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        return [
            f"--workdir={workdir} cannot be written ({why}): give a folder that can be "
            "created and written"
        ]
    return []


def config_errors(config: TrainConfig) -> list[str]:
    """Contradictions and out-of-range values, one line each (empty when valid)."""
    return [
        *_data_errors(config),
        *_shape_errors(config),
        *_sampler_errors(config),
        *_loop_errors(config),
        *_split_errors(config),
        *_model_and_stop_errors(config),
    ]


def _data_errors(config: TrainConfig) -> list[str]:
    """The data, the cache and the precision."""
    errors = []
    if not config.data_dir:
        errors.append("--data_dir is required")
    if not config.workdir:
        errors.append("--workdir is required")
    if config.cache not in CACHE_MODES:
        errors.append(f"--cache must be one of {', '.join(CACHE_MODES)}, got {config.cache!r}")
    if not 0.0 <= config.replace_rate <= 1.0:
        errors.append(f"--replace_rate must be in [0, 1], got {config.replace_rate}")
    if not 0.0 < config.cache_rate <= 1.0:
        errors.append(f"--cache_rate must be in (0, 1], got {config.cache_rate}")
    if config.precision not in POLICIES:
        errors.append(f"--precision must be one of {POLICIES}, got {config.precision!r}")
    return errors


def _shape_errors(config: TrainConfig) -> list[str]:
    """Patch, window and spacing sizes."""
    errors = []
    for name in ("patch_size", "val_roi_size", "spacing"):
        value = getattr(config, name)
        if len(value) != 3 or min(value) <= 0:
            errors.append(f"--{name} needs 1 or 3 positive values, got {list(value)}")
    if len(config.patch_size) == 3 and len(config.val_roi_size) == 3:
        if any(p > r for p, r in zip(config.patch_size, config.val_roi_size, strict=True)):
            errors.append(
                f"--patch_size {list(config.patch_size)} is larger than the validation window "
                f"--val_roi_size {list(config.val_roi_size)}"
            )
        step = 2**config.depth
        for name in ("patch_size", "val_roi_size"):
            if any(s % step for s in getattr(config, name)):
                errors.append(
                    f"--{name} {list(getattr(config, name))} must be divisible by {step} "
                    f"(2^depth for --depth={config.depth})"
                )
    return errors


def _sampler_errors(config: TrainConfig) -> list[str]:
    """The adaptive sampler's settings."""
    errors = []
    lo, hi = (config.pos_fraction_bounds + (None, None))[:2]
    if lo is None or hi is None or not 0.0 < lo <= hi < 1.0:
        errors.append(f"--pos_fraction_bounds must satisfy 0 < lo <= hi < 1, got {lo}, {hi}")
    elif not lo <= config.pos_fraction <= hi:
        errors.append(
            f"--pos_fraction={config.pos_fraction} is outside --pos_fraction_bounds={lo:g},{hi:g}"
        )
    if not 0.0 <= config.pos_fraction <= 1.0:
        errors.append(f"--pos_fraction must be in [0, 1], got {config.pos_fraction}")
    if config.sampler_warmup_validations < 0:
        errors.append(
            f"--sampler_warmup_validations must be >= 0, got {config.sampler_warmup_validations}"
        )
    if not 0.0 <= config.sampler_warmup_dice <= 1.0:
        errors.append(f"--sampler_warmup_dice must be in [0, 1], got {config.sampler_warmup_dice}")
    if not 0.0 < config.sampler_damping <= 1.0:
        errors.append(f"--sampler_damping must be in (0, 1], got {config.sampler_damping}")
    return errors


def _loop_errors(config: TrainConfig) -> list[str]:
    """Validation windows, batches, logging, interrupts, workers."""
    errors = []
    if config.val_native not in NATIVE_VALIDATION:
        errors.append(
            f"--val_native must be one of {', '.join(NATIVE_VALIDATION)}, got "
            f"{config.val_native!r}"
        )
    if config.val_overlap < 0 or (1.0 <= config.val_overlap and config.val_overlap % 1):
        errors.append("--val_overlap must be a fraction in [0, 1) or whole voxels >= 1")
    if config.batch_size < 1 or config.num_samples < 1 or config.val_every < 1:
        errors.append("--batch_size, --num_samples and --val_every must be at least 1")
    if config.log_every < 1:
        errors.append(f"--log_every must be at least 1, got {config.log_every}")
    if config.interrupt_grace_s < 0:
        errors.append(f"--interrupt_grace_s must be >= 0, got {config.interrupt_grace_s}")
    if config.distribution not in BACKENDS:
        errors.append(
            f"--distribution must be one of {', '.join(BACKENDS)}, got " f"{config.distribution!r}"
        )
    return errors


def _split_errors(config: TrainConfig) -> list[str]:
    """Folds and the split."""
    errors = []
    if config.num_folds < 0 or config.num_folds == 1:
        errors.append(f"--num_folds must be 0 (no folds) or at least 2, got {config.num_folds}")
    if config.fold and not config.num_folds:
        errors.append(f"--fold={config.fold} needs --num_folds")
    if config.num_folds >= 2 and not 0 <= config.fold < config.num_folds:
        errors.append(
            f"--fold must be in [0, {config.num_folds}) for --num_folds={config.num_folds}, "
            f"got {config.fold}"
        )
    if config.num_folds and config.split_file:
        errors.append("--num_folds and --split_file both choose the split; give one")
    if config.num_folds and config.num_val:
        errors.append(
            f"--num_folds and --num_val={config.num_val} both choose the validation cases; "
            "give --num_val=0 with --num_folds (a preset may set --num_val)"
        )
    return errors


def _model_and_stop_errors(config: TrainConfig) -> list[str]:
    """The model, the memory budget, the schedule and the stops, metrics, profiling."""
    errors = []
    if config.deep_supervision and config.model != "unet3d":
        errors.append(
            "--deep_supervision is implemented for --model=unet3d only (auxiliary outputs on "
            f"its decoder levels), not for --model={config.model}"
        )
    elif config.deep_supervision and config.depth < 2:
        errors.append(
            f"--deep_supervision needs --depth >= 2 (with --depth={config.depth} no decoder "
            "level is below full resolution)"
        )
    if config.memory_budget_gb < 0:
        errors.append(f"--memory_budget_gb must be >= 0, got {config.memory_budget_gb}")
    errors += config.plateau_rule().errors() + _schedule_errors(config)
    if config.budget_minutes < 0:
        errors.append(f"--budget_minutes must be >= 0, got {config.budget_minutes}")
    if not 0.0 <= config.target_dice <= 1.0:
        errors.append(f"--target_dice must be in [0, 1], got {config.target_dice}")
    errors += _percentile_errors(config.ct_percentiles)
    errors += _val_metrics_errors(config.val_metrics, config.val_nsd_tolerance_mm)
    if config.profile_steps and (
        len(config.profile_steps) != 2 or not 0 <= config.profile_steps[0] < config.profile_steps[1]
    ):
        errors.append(
            f"--profile_steps must be two steps START < END, got {list(config.profile_steps)}"
        )
    return errors


def _schedule_errors(config: TrainConfig) -> list[str]:
    if config.lr_schedule not in SCHEDULES:
        return [f"--lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}"]
    if config.lr_schedule == "plateau" and not (config.patience or config.lr_decay_patience):
        return ["--lr_schedule=plateau needs --lr_decay_patience or --patience"]
    return []


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
        f"--ct_percentiles={flag_text(tuple(percentiles))}: the intensity statistics hold the "
        f"percentiles {', '.join(held[:-1])} and {held[-1]}; give two of them, low before high"
    ]
