"""Planning a training configuration from the data and the machine (``tf-medseg-plan``).

A plan is a set of training flags with a reason for each. It is made from two descriptions:

* the dataset's **fingerprint** (:func:`fingerprint`): per labelled case its shape and spacing,
  the extent of its foreground (mm), the number of sizeable connected foreground components,
  the class voxel counts and the foreground intensity percentiles. The cases are read by a pool
  of threads, and the result is stored beside the intensity statistics (the task's cache area,
  or a fallback folder), keyed by the files, so a second plan reads it back in milliseconds.
* the **machine** (:func:`describe_machine`): the GPUs TensorFlow sees (name, compute capability,
  memory from ``nvidia-smi``), or the CPU's cores, instruction sets and RAM.

The rules (:func:`make_plan`), each measured or taken from the paper:

* **Precision**: ``mixed_float16`` on GPUs of compute capability 7.x (tensor cores, loss
  scaling), ``mixed_bfloat16`` on 8.0 and later and on CPUs with native bfloat16 (AVX-512 BF16,
  AMX), ``float32`` elsewhere (emulated bfloat16 on an AVX2 CPU trained at 0.95 patches/s
  against 15 in float32).
* **Network and patch**: on a CPU, the sizes the CPU presets were tuned with (32^3 patches,
  batch 2, U-Net depth 3 with 8 filters: a step of about 0.1-0.2 s on 2 cores); on a GPU, the
  paper's U-Net (depth 4, 16 filters) and 112^3 x 6, or the largest patch, then batch, below
  it whose estimated memory (:func:`estimate_memory_gb`) fits 85% of the GPU's.
* **Spacing**: the paper's isotropic 1 mm, or the data's median in-plane spacing if coarser. On
  a CPU, whose patches are small, it is coarsened (x1.25 ... x4) until a patch spans 2.5 times the
  median foreground size (measured here: the synthetic heart's 32^3 patches oscillated between
  Dice 0 and 0.9 at 48 mm and passed 0.95 at 80 mm, 2.5-3 times the atrium), but never so far
  that the foreground's smallest median extent drops below 8 voxels, nor a small class's size
  (:func:`class_diameters`) below 4.
* **Normalisation**: instance (the paper's) when the patch spans that context; batch when it
  cannot (at MSD size on a CPU instance norm stalled at Dice 0.3 with 64 mm patches).
* **Validation**: windows of the patch size on a CPU (larger ones barely changed its time
  here), twice the patch on a GPU (the paper: 224 for 112); every so many epochs that validation
  takes about a third of the time, by a cost model calibrated on this CPU.
* **Cache**: the smart cache with a memory budget of half the available RAM per worker (the
  cache holds what fits, measured on the first items).
* **Small structures** (issue #19): the smallest foreground class is *small* when it is under
  :data:`SMALL_CLASS_SHARE` of the labelled foreground (a lesion in an organ) or under
  :data:`SMALL_CLASS_FRACTION` of all voxels (a tumour on its own), over all labelled cases
  (:func:`class_fractions`). Then the loss is Dice + cross-entropy (``dice_ce``): a batch with
  no voxel of the class gives the batch Dice of that class no gradient at all (its intersection
  is 0 whatever is predicted), so its false positives are never corrected, while the
  cross-entropy of every voxel is. Otherwise the paper's soft Dice. ``val_keep_largest`` only
  for a single organ: one class, not small, one connected component in most cases (for a
  lesion class it would delete every lesion but one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tf_medseg import system
from tf_medseg.data.io import read_nifti, spacing_from_affine
from tf_medseg.data.stats import in_order, stored_or_computed

FINGERPRINT_FILE = "fingerprint.json"
#: The planned settings a resumed run plans again (:func:`resumed_plan`): they fit the run to the
#: machine it runs on (RAM, windows per forward pass) without changing what it learns. The
#: others (network, patch, spacing, precision, loss, ...) are the run's, kept from its plan.
REPLANNED = ("memory_budget_gb", "val_sw_batch_size")
#: A patch should span this multiple of the foreground's size (CPU plans).
CONTEXT_FACTOR = 2.5
#: The foreground's smallest extent keeps at least this many voxels.
MIN_OBJECT_VOXELS = 8
#: A small class (see :func:`smallest_class`) keeps at least this many voxels across.
MIN_SMALL_CLASS_VOXELS = 4
#: A component counts when it holds at least this fraction of a case's foreground.
COMPONENT_FRACTION = 0.05
#: Validation of V voxels costs about this many training steps of B x P^3 voxels per V/(B P^3),
#: on this CPU (6 MSD-size spleens at 2 mm: 26 s, as long as ~144 steps of 2 x 32^3).
VALIDATION_COST = 0.25
#: A foreground class under this share of the labelled foreground is small (liver lesions: a few
#: percent of the liver; the synthetic liver's lesions: 0.6-1.1% of it).
SMALL_CLASS_SHARE = 0.1
#: A foreground class under this fraction of all voxels is small (spleens and left atria: 0.3-0.8%
#: in the MSD-size phantoms, sized as the Decathlon's; lung and colon tumours are typically far
#: smaller).
SMALL_CLASS_FRACTION = 0.001
#: The plateau stop waits this many training steps without a gain (in validations: the steps
#: over the steps between validations, at least :data:`MIN_PATIENCE`).
PLATEAU_STEPS = 400
MIN_PATIENCE = 10
#: Peak memory of a training step over the stored activations counted below: the backward pass
#: holds gradient tensors beside them. Measured on this CPU (2 x 64^3 and 2 x 96^3, U-Net depth 3
#: with 8 filters, peak RSS less a 16^3 run's): 1.56 and 1.52.
ACTIVATION_OVERHEAD = 1.5


# ------------------------------------------------------------------------------ fingerprint
def _case_facts(item: dict) -> dict:
    label = read_nifti(item["label"])
    image = read_nifti(item["image"])
    spacing = [float(s) for s in spacing_from_affine(label.affine)]
    data = np.asarray(label.data)
    fg = data > 0
    extent, components = [0.0, 0.0, 0.0], 0
    if fg.any():
        for axis in range(3):
            hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
            extent[axis] = float((hit[-1] - hit[0] + 1) * spacing[axis])
        import SimpleITK as sitk

        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(fg.astype(np.uint8)))
        sizes = np.bincount(sitk.GetArrayViewFromImage(cc).ravel())[1:]
        components = int(np.sum(sizes >= COMPONENT_FRACTION * fg.sum()))
    first = np.asarray(image.data)
    first = first[..., 0] if first.ndim == 4 else first
    values = first[fg] if fg.any() else first.ravel()
    p05, p50, p95 = (float(v) for v in np.percentile(values, [5, 50, 95]))
    return {
        "case": item["case"],
        "shape": [int(n) for n in data.shape[:3]],
        "spacing": spacing,
        "foreground_extent_mm": extent,
        "components": components,
        "class_voxels": np.bincount(data.ravel().astype(np.int64)).tolist(),
        "foreground_percentiles": [p05, p50, p95],
    }


def fingerprint(task, folders: list[str] | None = None, num_workers: int | None = None) -> dict:
    """The dataset's fingerprint over its labelled cases, stored in the first of ``folders``
    that can be written (default: the task's cache area) and read back while the files are the
    same.

    Returns:
        ``{"task", "modalities", "labels", "num_cases", "cases": [per-case facts]}`` with the
        medians :func:`summarise` adds.
    """
    items = list(task.training)
    folders = folders if folders is not None else [task.cache_dir]

    def compute() -> dict:
        workers = max(1, num_workers or system.cpu_count())
        return summarise(
            {
                "task": task.name,
                "modalities": list(task.modalities),
                "labels": list(task.labels),
                "num_cases": len(items),
                "cases": list(in_order(_case_facts, items, workers)),
            }
        )

    # Summarised again: a fingerprint stored by an earlier version lacks the newer summaries.
    return summarise(stored_or_computed(items, folders, FINGERPRINT_FILE, compute))


def class_fractions(fp: dict) -> dict[str, dict[str, float]]:
    """Each foreground class's voxels over all labelled cases, as a fraction of all their
    voxels (``of_image``) and of their foreground voxels (``of_foreground``).

    Returns:
        ``{"of_image": {label: fraction}, "of_foreground": {label: fraction}}`` for the
        foreground labels (0 for a class no case contains).
    """
    labels = fp["labels"]
    counts = np.zeros(len(labels), np.float64)
    for case in fp["cases"]:
        voxels = np.asarray(case["class_voxels"], np.float64)[: len(labels)]
        counts[: len(voxels)] += voxels  # bincount: a case without the last classes is short
    total, foreground = max(counts.sum(), 1.0), max(counts[1:].sum(), 1.0)
    named = list(zip(labels[1:], counts[1:], strict=True))
    return {
        "of_image": {n: float(c / total) for n, c in named},
        "of_foreground": {n: float(c / foreground) for n, c in named},
    }


def smallest_class(fp: dict) -> tuple[str, bool, str]:
    """The smallest foreground class, whether it is small (the module's rule), and why."""
    fractions = class_fractions(fp)
    of_image, of_foreground = fractions["of_image"], fractions["of_foreground"]
    name = min(of_image, key=of_image.get)
    share, fraction = of_foreground[name], of_image[name]
    small = share < SMALL_CLASS_SHARE or fraction < SMALL_CLASS_FRACTION
    why = (
        f"smallest class {name!r}: {100 * share:.2g}% of the foreground, "
        f"{100 * fraction:.2g}% of the voxels ("
        + ("small" if small else "not small")
        + f": under {100 * SMALL_CLASS_SHARE:g}% or {100 * SMALL_CLASS_FRACTION:g}% is small)"
    )
    return name, small, why


def class_diameters(fp: dict) -> dict[str, float]:
    """Each foreground class's size (mm): per case, the diameter of the sphere of its voxels'
    volume, the median over the cases that contain it (0 for a class no case contains). A case
    with several lesions counts them as one: the figure bounds the single lesion's from above.
    """
    labels = fp["labels"]
    per_class: list[list[float]] = [[] for _ in labels[1:]]
    for case in fp["cases"]:
        voxel_mm3 = float(np.prod(case["spacing"]))
        for c, count in enumerate(case["class_voxels"][1 : len(labels)]):
            if count > 0:
                per_class[c].append((6.0 * count * voxel_mm3 / np.pi) ** (1.0 / 3.0))
    return {
        name: float(np.median(sizes)) if sizes else 0.0
        for name, sizes in zip(labels[1:], per_class, strict=True)
    }


def summarise(fp: dict) -> dict:
    """Adds the medians and class fractions the rules use to a fingerprint's per-case facts."""
    cases = fp["cases"]

    def median(key):
        return [float(v) for v in np.median(np.array([c[key] for c in cases], float), axis=0)]

    spacing = median("spacing")
    shape = median("shape")
    total = sum(sum(c["class_voxels"]) for c in cases)
    fg = sum(sum(c["class_voxels"][1:]) for c in cases)
    return {
        **fp,
        "median_spacing": spacing,
        "median_shape": shape,
        "median_extent_mm": [n * s for n, s in zip(shape, spacing, strict=True)],
        "median_foreground_extent_mm": median("foreground_extent_mm"),
        "median_components": float(np.median([c["components"] for c in cases])),
        "foreground_fraction": fg / max(total, 1),
        "class_fractions": class_fractions(fp),
        "class_diameters_mm": class_diameters(fp),
    }


# ---------------------------------------------------------------------------------- machine
def describe_machine(target: str = "auto", gpu_memory_gb: float | None = None) -> dict:
    """The machine the plan is for. ``target``: ``auto`` (a GPU if TensorFlow sees one), ``cpu``
    or ``gpu`` (planning for a GPU node from elsewhere needs ``gpu_memory_gb``)."""
    total, available = system.ram_bytes()
    flags = system.cpu_flags()
    machine = {
        "kind": "cpu",
        "cpu_cores": system.cpu_count(),
        "cpu_bf16_native": system.cpu_bf16_native(flags),
        "cpu_avx512": "avx512f" in flags,
        "ram_gb": round(total / 2**30, 1),
        "ram_available_gb": round(available / 2**30, 1),
        "gpus": [],
    }
    if target in ("auto", "gpu"):
        found = system.gpus() if target == "auto" or gpu_memory_gb is None else []
        if found:
            machine["gpus"] = found
        elif target == "gpu":
            machine["gpus"] = [{"name": "GPU", "compute_capability": None, "memory_gb": None}]
    if machine["gpus"]:
        machine["kind"] = "gpu"
        if gpu_memory_gb:
            for gpu in machine["gpus"]:
                gpu["memory_gb"] = float(gpu_memory_gb)
    return machine


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


# ------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """Training flags (``flags``: name -> value as on the command line) and their reasons."""

    flags: dict[str, str]
    reasons: dict[str, str]
    estimated_memory_gb: float
    machine: dict
    fingerprint: dict

    def to_json(self) -> dict:
        fp = {k: v for k, v in self.fingerprint.items() if k != "cases"}
        return {
            **{k: _typed(v) for k, v in self.flags.items()},
            "estimated_memory_gb": round(self.estimated_memory_gb, 3),
            "flags": self.flags,
            "reasons": self.reasons,
            "machine": self.machine,
            "fingerprint": fp,
        }

    def flagfile(self) -> str:
        lines = [f"# tf-medseg-plan for {self.fingerprint['task']} on this {self.machine['kind']}"]
        lines += [f"--{k}={v}" for k, v in self.flags.items()]
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        width = max(len(k) for k in self.flags)
        vwidth = max(len(v) for v in self.flags.values())
        rows = [f"{'setting'.ljust(width)}  {'value'.ljust(vwidth)}  reason"]
        rows += [
            f"{k.ljust(width)}  {v.ljust(vwidth)}  {self.reasons.get(k, '')}"
            for k, v in self.flags.items()
        ]
        rows.append(f"estimated memory of a training step: {self.estimated_memory_gb:.2f} GB")
        return "\n".join(rows)


def _typed(value: str) -> Any:
    parts = value.split(",")
    try:
        numbers = [float(p) if "." in p or "e" in p else int(p) for p in parts]
    except ValueError:
        return value if value not in ("true", "false") else value == "true"
    return numbers if len(numbers) > 1 else numbers[0]


def _spacing_grid(base: float) -> list[float]:
    return [round(base * f, 3) for f in (1, 1.25, 1.5, 2, 2.5, 3, 4)]


def stopping(steps_per_validation: int, budget_minutes: float = 0.0) -> tuple[dict, dict]:
    """The planned schedule and stop (flags, reasons). A run of unknown length (no budget)
    lowers its learning rate on a plateau and stops on a longer one; a run with a wall-time
    budget knows its length, and anneals a cosine over it."""
    if budget_minutes > 0:
        why = f"a budget of {budget_minutes:g} min: the cosine anneals over it"
        flags = {"lr_schedule": "cosine", "budget_minutes": f"{budget_minutes:g}", "patience": "0"}
        return flags, {"lr_schedule": why, "budget_minutes": "given", "patience": why}
    patience = max(MIN_PATIENCE, math.ceil(PLATEAU_STEPS / max(1, steps_per_validation)))
    flags = {"lr_schedule": "plateau", "patience": str(patience)}
    reasons = {
        "lr_schedule": f"halved after {patience // 2} validations without a gain",
        "patience": f"~{PLATEAU_STEPS} steps without a gain of --min_delta (at least "
        f"{MIN_PATIENCE} validations)",
    }
    return flags, reasons


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
    reasons: dict[str, str] = {}
    flags: dict[str, str] = {}
    gpu = machine["kind"] == "gpu"
    channels, classes = len(fp["modalities"]), len(fp["labels"])
    ct = fp["modalities"][0].upper() == "CT"

    # Precision.
    if gpu:
        cc = machine["gpus"][0].get("compute_capability")
        major = cc[0] if isinstance(cc, list | tuple) else None
        precision = "mixed_bfloat16" if major and major >= 8 else "mixed_float16"
        reasons["precision"] = f"GPU compute capability {cc or 'unknown'}"
    elif machine.get("cpu_bf16_native"):
        precision, reasons["precision"] = "mixed_bfloat16", "CPU with native bfloat16"
    else:
        precision = "float32"
        reasons["precision"] = "CPU without native bfloat16 (emulated: many times slower)"

    # Network, patch and batch.
    if gpu:
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
        reasons["patch_size"] = (
            f"the paper's 112^3 x 6 or the largest below it within 85% of {memory:g} GB"
        )
    else:
        depth, base_filters, patch, batch = 3, 8, 32, 2
        reasons["patch_size"] = "CPU: the tuned CPU sizes (a step of ~0.1-0.2 s on 2 cores)"

    # Spacing.
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
    reasons["spacing"] = (
        f"base {base:g} mm; patch {context:.0f} mm vs foreground ~{obj_size:.0f} mm"
        + ("" if gpu else f" (wants {CONTEXT_FACTOR:g}x, >= {MIN_OBJECT_VOXELS} voxels across)")
        + small_note
    )
    instance = gpu or context >= CONTEXT_FACTOR * obj_size * 0.95
    reasons["norm"] = (
        "the paper's instance norm"
        if instance
        else f"patch spans {context / obj_size:.1f}x the foreground: too little for instance norm"
    )

    # Validation.
    shape = [n * s / spacing for n, s in zip(fp["median_shape"], fp["median_spacing"], strict=True)]
    volume_voxels = float(np.prod(shape))
    num_val = max(1, int(round(0.2 * fp["num_cases"])))
    val_roi = min(2 * patch, 224) if gpu else patch
    train_cases = fp["num_cases"] - num_val
    steps_per_epoch = max(1, math.ceil(train_cases / workers * 2 / batch))
    val_steps = VALIDATION_COST * num_val * volume_voxels / (batch * patch**3)
    val_every = max(1, int(round(2 * val_steps / steps_per_epoch)))
    reasons["val_every"] = (
        f"validation of {num_val} volumes of ~{volume_voxels / 1e6:.1f}M voxels costs ~"
        f"{val_steps:.0f} steps: about a third of the time"
    )

    # Cache.
    budget = max(0.5, math.floor(machine["ram_available_gb"] / 2 / local_workers * 2) / 2)
    reasons["memory_budget_gb"] = (
        f"half of {machine['ram_available_gb']:g} GB available RAM over {local_workers} worker(s)"
    )
    # Small structures.
    _, small, why_small = smallest_class(fp)
    single = classes == 2 and fp["median_components"] <= 1 and not small
    if single:
        reasons["val_keep_largest"] = "a single organ: one class, one component in most cases"
    elif classes > 2:
        reasons["val_keep_largest"] = "several classes: largest-component only for single organs"
    else:
        reasons["val_keep_largest"] = (
            "a small class (largest-component only for single organs)"
            if small
            else "several components in most cases"
        )
    reasons["loss"] = (
        f"soft Dice + cross-entropy: {why_small}; a batch without it gives its Dice no gradient"
        if small
        else f"the paper's soft Dice (equation 1): {why_small}"
    )

    flags.update(
        spacing=f"{spacing:g}",
        patch_size=str(patch),
        batch_size=str(batch),
        num_samples="2",
        model="unet3d",
        depth=str(depth),
        base_filters=str(base_filters),
        norm="instance" if instance else "batch",
        precision=precision,
        optimizer="novograd",
        learning_rate="5e-4" if gpu else "5e-3",
        loss="dice_ce" if small else "dice",
        cache="smart",
        cache_rate="1.0",
        memory_budget_gb=f"{budget:g}",
        replace_rate="0.25",
        adaptive_sampling="true",
        val_every=str(val_every),
        val_roi_size=str(val_roi),
        val_overlap="0.25",
        val_sw_batch_size="4" if gpu else "8",
        val_keep_largest="true" if single else "false",
    )
    if ct:
        flags["ct_percentiles"] = "5,95"
        reasons["ct_percentiles"] = "the paper's CT normalisation"
    reasons["learning_rate"] = "NovoGrad at the paper's 5e-4" if gpu else "NovoGrad, CPU presets"
    same = "with the patch size"
    reasons.update(
        {
            "batch_size": reasons["patch_size"],
            "num_samples": "two patches per cached item per epoch, as the presets",
            "model": "the paper's U-Net",
            "depth": same,
            "base_filters": same,
            "optimizer": "the paper's NovoGrad",
            "cache": "the paper's smart cache",
            "cache_rate": "as much as the memory budget holds",
            "replace_rate": "a quarter of the cache per epoch (gradual replacement)",
            "adaptive_sampling": "the paper's FP/FN-driven sampling (equations 4-6)",
            "val_roi_size": "twice the patch (the paper: 224 for 112)"
            if gpu
            else "the patch (larger windows barely changed validation time on the CPU)",
            "val_overlap": "a quarter of the window",
            "val_sw_batch_size": "windows per forward pass",
        }
    )
    stop_flags, stop_reasons = stopping(steps_per_epoch * val_every, budget_minutes)
    flags.update(stop_flags)
    reasons.update(stop_reasons)
    memory = estimate_memory_gb(patch, batch, depth, base_filters, channels, classes, precision)
    return Plan(flags, reasons, memory, machine, fp)


def plan_for(task, target: str = "auto", gpu_memory_gb: float | None = None, **kw) -> Plan:
    """Fingerprints ``task`` (stored/reused) and plans for this machine."""
    machine = describe_machine(target, gpu_memory_gb)
    fallback = kw.pop("fallback_dir", None)
    folders = [task.cache_dir] + ([fallback] if fallback else [])
    return make_plan(fingerprint(task, folders), machine, **kw)


def resumed_plan(fresh: Plan, saved: dict, source: str) -> tuple[Plan, list[str]]:
    """The plan of a resumed run: the flags of the plan it started with, but those in
    :data:`REPLANNED`, which take ``fresh``'s values (this machine's).

    A run planned without a preset and resumed on another machine (or after the data's
    fingerprint or the rules changed) would otherwise get another network or precision than its
    checkpoints, or train on with other settings than its results so far.

    Args:
        fresh: The plan for this machine (:func:`plan_for`).
        saved: The run's ``plan.json`` (:meth:`Plan.to_json`).
        source: Where ``saved`` was read from, for the lines.

    Returns:
        The plan, and one line per re-planned value that changed.
    """
    given = saved.get("flags") if isinstance(saved, dict) else None
    old = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
    if not old:  # not a plan.json of ours: nothing to keep
        return fresh, []
    flags, reasons = dict(old), dict(saved.get("reasons", {}))
    lines = []
    for name in REPLANNED:
        if name not in fresh.flags:
            continue
        flags[name], reasons[name] = fresh.flags[name], fresh.reasons.get(name, "")
        if old.get(name) != flags[name]:
            lines.append(
                f"--{name}={old.get(name, '(not planned)')} -> {flags[name]}: re-planned for "
                f"this machine ({reasons[name]}); the other planned flags are {source}'s"
            )
    memory = float(saved.get("estimated_memory_gb", fresh.estimated_memory_gb))
    return Plan(flags, reasons, memory, fresh.machine, fresh.fingerprint), lines


def write_plan(plan: Plan, json_path: str | None = None, flags_path: str | None = None) -> None:
    """Writes the plan as JSON and/or as a flagfile (atomically)."""
    from tf_medseg.jsonio import write_json, write_text

    if json_path:
        write_json(json_path, plan.to_json())
    if flags_path:
        write_text(flags_path, plan.flagfile())
