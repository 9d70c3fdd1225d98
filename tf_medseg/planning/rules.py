"""Planning a training configuration from the data and the machine (``tf-medseg-plan``).

A plan (:class:`tf_medseg.planning.plan.Plan`) is a set of typed training settings with a reason
for each. It is made from two descriptions, the
dataset's fingerprint (:mod:`tf_medseg.planning.fingerprint`) and the machine
(:func:`tf_medseg.planning.system.describe_machine`), by the rules of :func:`make_plan`, each
measured or taken from the paper:

* **Precision**: ``mixed_float16`` on GPUs of compute capability 7.x (tensor cores, loss
  scaling), ``mixed_bfloat16`` on 8.0 and later and on CPUs with native bfloat16 (AVX-512 BF16,
  AMX), ``float32`` elsewhere (bfloat16 emulated on an AVX2 CPU is many times slower).
* **Network and patch**: on a CPU, the sizes the CPU presets were tuned with (32^3 patches,
  batch 2, U-Net depth 3 with 8 filters: a step of about 0.1-0.2 s on 2 cores); on a GPU, the
  paper's U-Net (depth 4, 16 filters) and 112^3 x 6, or the largest patch, then batch, below
  it whose estimated memory (:func:`estimate_memory_gb`) fits 85% of the GPU's.
* **Spacing**: the paper's isotropic 1 mm, or the data's median in-plane spacing if coarser. On
  a CPU, whose patches are small, it is coarsened (x1.25 ... x4) until a patch spans 2.5 times the
  median foreground size (the README's planning section has the measurements behind it), but
  never so far that the foreground's smallest median extent drops below 8 voxels, nor a small
  class's size
  (:func:`tf_medseg.planning.fingerprint.class_diameters`) below 4.
* **Normalisation**: instance (the paper's) when the patch spans that context; batch when it
  cannot (instance norm over a patch with too little context stalls).
* **Validation**: windows of the patch size on a CPU (larger ones barely changed its time
  here), twice the patch on a GPU (the paper: 224 for 112); every so many epochs that validation
  takes about a third of the time, by a cost model (:data:`VALIDATION_COST`).
* **Cache**: the smart cache with a memory budget of half the available RAM per worker (the
  cache holds what fits, measured on the first items).
* **Small structures**: the smallest foreground class is *small* when it is under
  ``SMALL_CLASS_SHARE`` of the labelled foreground (a lesion in an organ) or under
  ``SMALL_CLASS_FRACTION`` of all voxels (a tumour on its own), over all labelled cases
  (:mod:`tf_medseg.planning.fingerprint`). Then the loss is Dice + cross-entropy (``dice_ce``):
  a batch with no voxel of the class gives the batch Dice of that class no gradient at all (its
  intersection is 0 whatever is predicted), so its false positives are never corrected, while the
  cross-entropy of every voxel is. Otherwise the paper's soft Dice. ``val_keep_largest`` only
  for a single organ: one class, not small, one connected component in most cases (for a
  lesion class it would delete every lesion but one).
"""

from __future__ import annotations

import math
import os

import numpy as np

from tf_medseg.planning.fingerprint import fingerprint, smallest_class
from tf_medseg.planning.plan import Plan
from tf_medseg.planning.system import describe_machine

#: A patch should span this multiple of the foreground's size (CPU plans).
CONTEXT_FACTOR = 2.5
#: The foreground's smallest extent keeps at least this many voxels.
MIN_OBJECT_VOXELS = 8
#: A small class (see :func:`smallest_class`) keeps at least this many voxels across.
MIN_SMALL_CLASS_VOXELS = 4
#: Validation of V voxels costs about this many training steps of B x P^3 voxels per V/(B P^3)
#: (a 2-core CPU's ratio; the README's planning section has the measurement).
VALIDATION_COST = 0.25
#: The plateau stop waits this many training steps without a gain (in validations: the steps
#: over the steps between validations, at least :data:`MIN_PATIENCE`).
PLATEAU_STEPS = 400
MIN_PATIENCE = 10
#: Peak memory of a training step over the stored activations counted below: the backward pass
#: holds gradient tensors beside them (the peak RSS of CPU steps over the estimate; the README's
#: planning section has the measurement, tests/test_plan.py checks it).
ACTIVATION_OVERHEAD = 1.5


# ----------------------------------------------------------------------------------- memory
def estimate_memory_gb(
    patch: int,
    batch: int,
    depth: int,
    base_filters: int,
    channels: int = 1,
    classes: int = 2,
    precision: str = "float32",
) -> float:
    """The training step's peak memory (GB) for the U-Net: stored activations plus weights,
    gradients and two optimizer slots.

    Per level ``l`` (``f = base * 2^l`` filters on ``(patch / 2^l)^3`` voxels) the encoder keeps
    six tensors (two convolutions, their normalisations and activations), the decoder nine
    (upsampling, concatenation, then six), the bottleneck six; the input, one-hot label and
    softmax add ``channels + 2 * classes`` per voxel. Under a mixed policy activations take 2
    bytes (the normalisations' statistics and the loss stay float32, a small share). The sum is
    multiplied by :data:`ACTIVATION_OVERHEAD`, measured on the CPU; on a GPU, cuDNN workspaces
    come on top (hence the plan's 85% of the GPU's memory).
    """
    elements = 0.0
    for level in range(depth + 1):
        voxels = (patch / 2**level) ** 3
        filters = base_filters * 2**level
        tensors = 6 if level == depth else 15
        elements += tensors * filters * voxels
    elements += (channels + 2 * classes) * patch**3
    bytes_per = (2 if precision.startswith("mixed") else 4) * ACTIVATION_OVERHEAD
    params = 0
    for level in range(depth + 1):
        f = base_filters * 2**level
        f_in = channels if level == 0 else f // 2
        params += 27 * (f_in * f + f * f)
        if level < depth:  # transposed conv up, and the decoder block on the concatenation
            params += 8 * 2 * f * f + 27 * (2 * f * f + f * f)
    weights = params * 4 * 4  # weights, gradients, two optimizer slots, float32
    return (batch * elements * bytes_per + weights) / 2**30


# ------------------------------------------------------------------------------------- rules
def _spacing_grid(base: float) -> list[float]:
    return [round(base * f, 3) for f in (1, 1.25, 1.5, 2, 2.5, 3, 4)]


def stopping(steps_per_validation: int, budget_minutes: float = 0.0) -> tuple[dict, dict]:
    """The planned schedule and stop (settings, reasons). A run of unknown length (no budget)
    keeps a constant rate and stops on a plateau (a decay on the plateau was measured, and gave
    no better Dice: the README's "When a run stops"); a run with a wall-time budget knows its
    length, and anneals a cosine over it."""
    if budget_minutes > 0:
        why = f"a budget of {budget_minutes:g} min: the cosine anneals over it"
        settings = {"lr_schedule": "cosine", "budget_minutes": float(budget_minutes), "patience": 0}
        return settings, {"lr_schedule": why, "budget_minutes": "given", "patience": why}
    patience = max(MIN_PATIENCE, math.ceil(PLATEAU_STEPS / max(1, steps_per_validation)))
    settings = {"lr_schedule": "constant", "patience": patience}
    reasons = {
        "lr_schedule": "constant: halving it on a plateau gave no better Dice",
        "patience": f"~{PLATEAU_STEPS} steps without a gain of --min_delta (at least "
        f"{MIN_PATIENCE} validations)",
    }
    return settings, reasons


def _precision(machine: dict) -> tuple[str, str]:
    """The precision policy for the device, and why."""
    if machine["kind"] == "gpu":
        cc = machine["gpus"][0].get("compute_capability")
        major = cc[0] if isinstance(cc, list | tuple) else None
        policy = "mixed_bfloat16" if major and major >= 8 else "mixed_float16"
        return policy, f"GPU compute capability {cc or 'unknown'}"
    if machine.get("cpu_bf16_native"):
        return "mixed_bfloat16", "CPU with native bfloat16"
    return "float32", "CPU without native bfloat16 (emulated: many times slower)"


def _network(machine: dict, channels: int, classes: int, precision: str) -> tuple[tuple, str]:
    """``(depth, base_filters, patch, batch)`` for the device, and why."""
    if machine["kind"] != "gpu":
        return (3, 8, 32, 2), "CPU: the tuned CPU sizes (a step of ~0.1-0.2 s on 2 cores)"
    depth, base_filters = 4, 16
    memory = machine["gpus"][0].get("memory_gb") or 16.0
    fits = [
        (p, b)
        for p in (112, 96, 80, 64)
        for b in (6, 4, 3, 2)
        if estimate_memory_gb(p, b, depth, base_filters, channels, classes, precision)
        <= 0.85 * memory
    ]
    patch, batch = max(fits, key=lambda pb: (pb[0], pb[1]), default=(64, 1))
    why = f"the paper's 112^3 x 6 or the largest below it within 85% of {memory:g} GB"
    return (depth, base_filters, patch, batch), why


def _spacing(fp: dict, patch: int, gpu: bool) -> tuple[float, dict]:
    """The training grid's spacing, and the reasons for it and for the normalisation."""
    in_plane = sorted(fp["median_spacing"])[:2]
    base = max(1.0, round(float(np.median(in_plane)), 2))
    obj = [e for e in fp["median_foreground_extent_mm"] if e > 0] or fp["median_extent_mm"]
    obj_size = float(np.exp(np.mean(np.log(obj))))
    coarsest = min(obj) / MIN_OBJECT_VOXELS
    # A small class (a lesion) keeps MIN_SMALL_CLASS_VOXELS across, whatever the organ's size.
    small_name, small, _ = smallest_class(fp)
    small_size = fp["class_diameters_mm"].get(small_name, 0.0)
    small_note = ""
    if small and small_size > 0:
        coarsest = min(coarsest, small_size / MIN_SMALL_CLASS_VOXELS)
        small_note = (
            f"; smallest class {small_name!r} ~{small_size:.0f} mm across "
            f"(>= {MIN_SMALL_CLASS_VOXELS} voxels)"
        )
    spacing = base
    if not gpu:
        wanted = CONTEXT_FACTOR * obj_size / patch
        allowed = [s for s in _spacing_grid(base) if s <= max(coarsest, base)]
        spacing = next((s for s in allowed if s >= wanted), allowed[-1])
    context = patch * spacing
    reasons = {
        "spacing": f"base {base:g} mm; patch {context:.0f} mm vs foreground ~{obj_size:.0f} mm"
        + ("" if gpu else f" (wants {CONTEXT_FACTOR:g}x, >= {MIN_OBJECT_VOXELS} voxels across)")
        + small_note
    }
    instance = gpu or context >= CONTEXT_FACTOR * obj_size * 0.95
    reasons["norm"] = (
        "the paper's instance norm"
        if instance
        else f"patch spans {context / obj_size:.1f}x the foreground: too little for instance norm"
    )
    return spacing, reasons


def _validation(fp: dict, spacing: float, patch: int, batch: int, workers: int) -> dict:
    """The validation interval and the training steps per epoch, with the interval's reason."""
    shape = [n * s / spacing for n, s in zip(fp["median_shape"], fp["median_spacing"], strict=True)]
    volume_voxels = float(np.prod(shape))
    num_val = max(1, int(round(0.2 * fp["num_cases"])))
    train_cases = fp["num_cases"] - num_val
    steps_per_epoch = max(1, math.ceil(train_cases / workers * 2 / batch))
    val_steps = VALIDATION_COST * num_val * volume_voxels / (batch * patch**3)
    val_every = max(1, int(round(2 * val_steps / steps_per_epoch)))
    why = (
        f"validation of {num_val} volumes of ~{volume_voxels / 1e6:.1f}M voxels costs ~"
        f"{val_steps:.0f} steps: about a third of the time"
    )
    return {"val_every": val_every, "steps_per_epoch": steps_per_epoch, "why": why}


def _small_structures(fp: dict, classes: int) -> tuple[dict, dict]:
    """The loss and the largest-component rule (settings, reasons)."""
    _, small, why_small = smallest_class(fp)
    single = classes == 2 and fp["median_components"] <= 1 and not small
    if single:
        keep = "a single organ: one class, one component in most cases"
    elif classes > 2:
        keep = "several classes: largest-component only for single organs"
    elif small:
        keep = "a small class (largest-component only for single organs)"
    else:
        keep = "several components in most cases"
    loss = (
        f"soft Dice + cross-entropy: {why_small}; a batch without it gives its Dice no gradient"
        if small
        else f"the paper's soft Dice (equation 1): {why_small}"
    )
    settings = {"loss": "dice_ce" if small else "dice", "val_keep_largest": single}
    return settings, {"val_keep_largest": keep, "loss": loss}


#: Reasons of the settings that follow from the others or are the paper's.
_FIXED_REASONS = {
    "num_samples": "two patches per cached item per epoch, as the presets",
    "model": "the paper's U-Net",
    "optimizer": "the paper's NovoGrad",
    "cache": "the paper's smart cache",
    "cache_rate": "as much as the memory budget holds",
    "replace_rate": "a quarter of the cache per epoch (gradual replacement)",
    "adaptive_sampling": "the paper's FP/FN-driven sampling (equations 4-6)",
    "val_overlap": "a quarter of the window",
    "val_sw_batch_size": "windows per forward pass",
}


def make_plan(
    fp: dict,
    machine: dict,
    workers: int = 1,
    local_workers: int | None = None,
    budget_minutes: float = 0.0,
) -> Plan:
    """The configuration for this data on this machine (the module's rules).

    Args:
        fp: The fingerprint (:func:`fingerprint`).
        machine: The machine (:func:`describe_machine`).
        workers: Training workers in all (they share the training cases).
        local_workers: Workers on this machine, which share its RAM (default: ``workers``).
        budget_minutes: The run's wall-time budget (0: none), for the schedule and the stop
            (:func:`stopping`).
    """
    local_workers = local_workers or workers
    gpu = machine["kind"] == "gpu"
    channels, classes = len(fp["modalities"]), len(fp["labels"])
    reasons: dict[str, str] = dict(_FIXED_REASONS)
    precision, reasons["precision"] = _precision(machine)
    (depth, base_filters, patch, batch), reasons["patch_size"] = _network(
        machine, channels, classes, precision
    )
    for name in ("batch_size", "depth", "base_filters"):
        reasons[name] = reasons["patch_size"] if name == "batch_size" else "with the patch size"
    spacing, spacing_reasons = _spacing(fp, patch, gpu)
    reasons.update(spacing_reasons)
    validation = _validation(fp, spacing, patch, batch, workers)
    reasons["val_every"] = validation["why"]
    budget = max(0.5, math.floor(machine["ram_available_gb"] / 2 / local_workers * 2) / 2)
    reasons["memory_budget_gb"] = (
        f"half of {machine['ram_available_gb']:g} GB available RAM over {local_workers} worker(s)"
    )
    small_settings, small_reasons = _small_structures(fp, classes)
    reasons.update(small_reasons)
    settings = dict(
        spacing=float(spacing),
        patch_size=patch,
        batch_size=batch,
        num_samples=2,
        model="unet3d",
        depth=depth,
        base_filters=base_filters,
        norm="instance" if reasons["norm"] == "the paper's instance norm" else "batch",
        precision=precision,
        optimizer="novograd",
        learning_rate=5e-4 if gpu else 5e-3,
        loss=small_settings["loss"],
        cache="smart",
        cache_rate=1.0,
        memory_budget_gb=float(budget),
        replace_rate=0.25,
        adaptive_sampling=True,
        val_every=validation["val_every"],
        val_roi_size=min(2 * patch, 224) if gpu else patch,
        val_overlap=0.25,
        val_sw_batch_size=4 if gpu else 8,
        val_keep_largest=small_settings["val_keep_largest"],
    )
    if fp["modalities"][0].upper() == "CT":
        settings["ct_percentiles"] = (5.0, 95.0)
        reasons["ct_percentiles"] = "the paper's CT normalisation"
    reasons["learning_rate"] = "NovoGrad at the paper's 5e-4" if gpu else "NovoGrad, CPU presets"
    reasons["val_roi_size"] = (
        "twice the patch (the paper: 224 for 112)"
        if gpu
        else "the patch (larger windows barely changed validation time on the CPU)"
    )
    steps_per_validation = validation["steps_per_epoch"] * validation["val_every"]
    stop_settings, stop_reasons = stopping(steps_per_validation, budget_minutes)
    settings.update(stop_settings)
    reasons.update(stop_reasons)
    memory = estimate_memory_gb(patch, batch, depth, base_filters, channels, classes, precision)
    return Plan(settings, reasons, memory, machine, fp)


def plan_for(task, target: str = "auto", gpu_memory_gb: float | None = None, **kw) -> Plan:
    """Fingerprints ``task`` (stored/reused) and plans for this machine."""
    machine = describe_machine(target, gpu_memory_gb)
    fallback = kw.pop("fallback_dir", None)
    folders = [task.cache_dir] + ([fallback] if fallback else [])
    return make_plan(fingerprint(task, folders), machine, **kw)


def plan_of_run(task, workdir: str = "", budget_minutes: float = 0.0) -> tuple[Plan, list[str]]:
    """The plan of a training run on this machine (``tf-medseg-train`` without a preset), and a
    line per value that a resumed run planned again.

    A run that resumes (``workdir`` holds checkpoints and ``plan.json``) keeps the planned
    settings of its ``plan.json``, but those that only fit it to the machine
    (:func:`tf_medseg.planning.plan.resumed_plan`). Under ``horovodrun`` every worker plans (the
    same fingerprint, read from the task's cache once stored); the RAM is shared by the workers
    of a node.
    """
    from absl import logging

    from tf_medseg import rundir
    from tf_medseg.planning.plan import resumed_plan

    result = plan_for(
        task,
        fallback_dir=workdir or None,
        workers=int(os.environ.get("HOROVOD_SIZE", "1")),
        local_workers=int(os.environ.get("HOROVOD_LOCAL_SIZE", "1")),
        budget_minutes=budget_minutes,
    )
    run = rundir.RunDir(workdir)
    if not workdir or not run.has_checkpoint() or not os.path.isfile(run.plan):
        return result, []
    try:
        saved = run.read_json(rundir.PLAN)
    except (OSError, ValueError) as err:
        logging.warning("%s is unreadable (%s): planning afresh", run.plan, err)
        return result, []
    return resumed_plan(result, saved, run.plan)


def step_memory_text(config, num_channels: int, num_classes: int) -> str:
    """The training step's estimated peak memory for ``config`` (a ``TrainConfig``), as a line."""
    if config.model != "unet3d":
        return f"not estimated for --model={config.model}"
    patch = round(float(sum(config.patch_size)) / len(config.patch_size))
    gb = estimate_memory_gb(
        patch,
        config.batch_size,
        config.depth,
        config.base_filters,
        num_channels,
        num_classes,
        config.precision,
    )
    return f"{gb:.2f} GB ({'per GPU' if config.precision == 'mixed_float16' else 'host'})"
