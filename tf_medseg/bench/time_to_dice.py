"""Time to a target Dice: the paper's Table 1 and its ablations, on this machine.

Each configuration is the task's synthetic preset (``synthetic_<task>`` in
``tf_medseg/presets``, the proposed configuration) with a few flags overridden, trained in its own
process (so the global mixed-precision policy and determinism settings cannot leak between runs)
on the same data, with the same seeds, model size and patch size, until it reaches
``--target_dice`` or its time cap.
With several ``--seeds`` every configuration runs once per seed and the table gives medians
(validation Dice of these small runs swings by several points between validations, so one seed
can move a time to target by 2x).
The table gives the best Dice, the wall time and steps to the target, patches/s, and the speed-up
over the baseline; a plot shows validation Dice against wall time for every configuration.

::

    python -m tf_medseg.bench.time_to_dice --task=spleen --configs=baseline,proposed \
        --json=runs/bench/time_to_dice_spleen.json --max_minutes_per_run=15

The baseline is the paper's "native" pipeline: no cache, Adam 1e-4, batch norm, fixed 1:1
sampling, float32. A run that never reaches the target counts with its cap, and the JSON says so.

``--sampler`` is the adaptive sampler of every run (``tf-medseg-train --sampler``): ``default``,
the package's (warm-up, damping, a floor of 1/3), or ``paper``, the paper's update, with which
the README's time-to-Dice tables were measured (the default before the package's); the JSON
records it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

from absl import app, flags, logging

from tf_medseg import presets
from tf_medseg.bench import provenance, run_training, write_json
from tf_medseg.bench.plots import plot_class_curves, plot_curves

#: The paper's baseline: each ingredient of the proposed preset turned off.
BASELINE = {
    "cache": "none",
    "optimizer": "adam",
    "learning_rate": "1e-4",
    "norm": "batch",
    "adaptive_sampling": "false",
    "precision": "float32",
}

#: One ingredient of the proposed preset, as flag overrides.
INGREDIENTS = {
    "cache": {"cache": "smart"},
    "novograd": {"optimizer": "novograd", "learning_rate": None},
    "instance_norm": {"norm": "instance"},
    "adaptive": {"adaptive_sampling": "true"},
    "bf16": {"precision": "mixed_bfloat16"},
}


def configurations(proposed_flags: dict[str, str]) -> dict[str, dict[str, str]]:
    """Every configuration the benchmark knows, as flag overrides of the proposed flagfile.

    ``baseline`` and ``proposed``; ``baseline+X`` adds ingredient X to the baseline and
    ``proposed-X`` removes it from the proposed preset (its baseline value). An ingredient the
    proposed flagfile leaves out (on a CPU without native bfloat16 the presets train in
    float32) gives ``proposed+X`` instead, the preset with it added.
    """
    configs = {"proposed": {}, "baseline": dict(BASELINE)}
    for name, change in INGREDIENTS.items():
        added = dict(BASELINE)
        for key, value in change.items():
            added[key] = proposed_flags.get(key, value) if value is None else value
        configs[f"baseline+{name}"] = added
        if all(value is None or proposed_flags.get(key) == value for key, value in change.items()):
            configs[f"proposed-{name}"] = {key: BASELINE[key] for key in change}
        else:
            configs[f"proposed+{name}"] = {k: v for k, v in change.items() if v is not None}
    return configs


def read_flagfile(path: str) -> dict[str, str]:
    """The ``--name=value`` flags a flagfile sets (nested flagfiles read in place, later
    lines overriding earlier ones)."""
    values = {}
    for arg in presets.expand_flagfiles(["", f"--flagfile={path}"])[1:]:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            values[key] = value
    return values


def run_config(
    name: str,
    overrides: dict[str, str],
    flagfile: str,
    data_dir: str,
    workdir: str,
    max_minutes: float,
    target: float,
    extra: list[str],
) -> dict:
    """Trains one configuration in a subprocess; returns its summary and validation curve."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "tf_medseg.cli.train",
        f"--flagfile={flagfile}",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        f"--budget_minutes={max_minutes}",
        f"--target_dice={target}",
        "--progress=false",
        *[f"--{k}={v}" for k, v in overrides.items()],
        *extra,
    ]
    logging.info("%s: %s", name, " ".join(command[3:]))
    start = time.time()
    summary, records = run_training(command, workdir, name)
    curve, class_curves = [], {}
    for entry in records:
        curve.append([entry["wall_s"], entry["mean_dice"], entry["step"]])
        for name, dice in (entry.get("dice") or {}).items():
            class_curves.setdefault(name, []).append([entry["wall_s"], dice, entry["step"]])
    reached = summary["time_to_target_s"] is not None
    ttt = summary["time_to_target_s"] if reached else 60.0 * max_minutes
    return {
        "overrides": overrides,
        "reached_target": reached,
        "time_to_target_s": ttt,
        "native_scoring_before_target_s": native_scoring_s(
            records, summary.get("steps_to_target") if reached else None
        ),
        "time_split": summary.get("time_split"),
        "validation_fraction": validation_fraction(summary),
        "native": summary.get("native"),
        "steps_to_target": summary.get("steps_to_target"),
        "best_dice": summary["best_dice"],
        "steps": summary["steps"],
        "patches_per_s": summary["patches_per_s"],
        "steady_patches_per_s": summary.get("steady_patches_per_s"),
        "wall_s": round(time.time() - start, 1),
        "curve": curve,
        "class_curves": class_curves,
        "best_class_dice": best_class_dice(class_curves),
        "cache": summary.get("cache"),
    }


def native_scoring_s(records: list[dict], until_step: int | None) -> float:
    """Seconds the run spent scoring validations in the labels' geometry
    (``--val_native=every``, the benchmark's, not a user's run) up to and including the
    validation at ``until_step`` (None: all of them): what the time to target would be without
    them is the difference."""
    return round(
        sum(
            (r.get("native") or {}).get("seconds") or 0.0
            for r in records
            if until_step is None or r["step"] <= until_step
        ),
        3,
    )


def validation_fraction(summary: dict) -> float | None:
    """The share of the run's time spent validating on the training grid (``time_split``)."""
    split = summary.get("time_split") or {}
    total = sum(split.values())
    return round(split.get("validation", 0.0) / total, 4) if total else None


def best_class_dice(class_curves: dict[str, list]) -> dict[str, float | None]:
    """Each class's best validation Dice over a run (None where it was never scored)."""
    best = {}
    for name, points in class_curves.items():
        values = [dice for _, dice, _ in points if dice is not None]
        best[name] = max(values) if values else None
    return best


def aggregate(per_seed: dict[int, dict]) -> dict:
    """One configuration's runs over seeds: medians of time to target (a capped run counts with
    its cap), steps to target, best Dice and patches/s, with every seed's run kept."""
    runs = list(per_seed.values())

    def median(key):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        return float(statistics.median(values)) if values else None

    steps = median("steps_to_target")
    classes = {name: None for r in runs for name in r.get("best_class_dice", {})}
    for name in classes:
        values = [r["best_class_dice"].get(name) for r in runs]
        values = [v for v in values if v is not None]
        classes[name] = float(statistics.median(values)) if values else None
    times = [r["time_to_target_s"] for r in runs]
    return {
        "time_to_target_s": median("time_to_target_s"),
        "time_to_target_range_s": [min(times), max(times)],
        "validation_fraction": median("validation_fraction"),
        "reached_target": all(r["reached_target"] for r in runs),
        "reached_count": sum(r["reached_target"] for r in runs),
        "steps_to_target": None if steps is None else round(steps),
        "best_dice": median("best_dice"),
        "best_class_dice": classes,
        "steps": median("steps"),
        "patches_per_s": median("patches_per_s"),
        "cache": runs[0].get("cache"),
        "seeds": sorted(per_seed),
        "per_seed": {str(seed): run for seed, run in per_seed.items()},
        # The first seed's curve for the plot; every seed's curve is in per_seed.
        "curve": runs[0]["curve"],
        "class_curves": runs[0].get("class_curves", {}),
    }


def markdown_table(
    results: dict, baseline: str, target: float, base_time_s: float | None = None
) -> str:
    """The results as a markdown table, with the speed-up over ``baseline`` (or over
    ``base_time_s``, a baseline time to target measured in another invocation)."""
    base = base_time_s or results.get(baseline, {}).get("time_to_target_s")
    lines = [
        f"| configuration | best Dice | best Dice per class | time to Dice {target:g} (s) "
        "| steps to target | patches/s | speed-up vs baseline | what the cache did |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        seeds = r.get("per_seed", {})
        if len(seeds) > 1:
            each = ", ".join(
                f"{run['time_to_target_s']:.0f}{'' if run['reached_target'] else ' cap'}"
                for run in seeds.values()
            )
            ttt = f"{r['time_to_target_s']:.0f} (median of {each})"
        else:
            ttt = f"{r['time_to_target_s']:.0f}" + (
                "" if r["reached_target"] else " (cap, not reached)"
            )
        speedup = f"{base / r['time_to_target_s']:.2f}x" if base else "-"
        if base and not r["reached_target"] and name != baseline:
            speedup = "<= " + speedup  # the cap stands for a longer time
        per_class = ", ".join(
            f"{c} {d:.4f}" if d is not None else f"{c} -"
            for c, d in r.get("best_class_dice", {}).items()
        )
        lines.append(
            f"| {name} | {r['best_dice']:.4f} | {per_class or '-'} | {ttt} "
            f"| {r['steps_to_target'] or '-'} "
            f"| {r['patches_per_s']:.2f} | {speedup} | {cache_label(r.get('cache'))} |"
        )
    return "\n".join(lines)


def cache_label(cache: dict | None) -> str:
    """What a run's cache really did, from its summary's ``cache`` block."""
    if not cache:
        return "-"
    if cache["mode"] == "none":
        return "none (prefix every epoch)"
    held = f"{cache['cache_num']} of {cache['items_in_shard']} items held"
    if cache["mode"] == "full" or cache["cache_num"] >= cache["items_in_shard"]:
        return f"{cache['mode']}: {held}, nothing to replace"
    late = f", {cache['late_swaps']} late" if cache.get("late_swaps") else ""
    return f"smart: {held}, {cache['items_replaced']} replaced{late}"


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("task", "spleen", ["spleen", "heart", "liver"], "Synthetic task.")
    flags.DEFINE_enum(
        "geometry",
        "size",
        ["size", "msd"],
        "size: 16 phantoms of 96 voxels in-plane with the synthetic_<task> preset; msd: "
        "30 volumes at the real task's geometry (512 x 512 x 31-168 for the spleen) with "
        "the synthetic_<task>_msd preset.",
    )
    flags.DEFINE_list("configs", ["baseline", "proposed"], "Configurations to run, in order.")
    flags.DEFINE_string("json", "runs/bench/time_to_dice.json", "Output JSON (PNG, .md beside).")
    flags.DEFINE_float("max_minutes_per_run", 15.0, "Time cap of each run.")
    flags.DEFINE_float("target_dice", 0.0, "Target Dice (0: the flagfile's).")
    flags.DEFINE_string("data_dir", None, "Task folder (default: generated synthetic task).")
    flags.DEFINE_string("workdir", "runs/bench/time_to_dice", "Where the runs write.")
    flags.DEFINE_list("seeds", ["0"], "Run seeds; each configuration runs once per seed.")
    flags.DEFINE_string(
        "baseline_json",
        None,
        "A previous output whose baseline time to target gives the speed-up column (for "
        "ablations run without the baseline).",
    )
    flags.DEFINE_list("extra", [], "Extra flags for every run, e.g. --extra=--val_every=4.")
    flags.DEFINE_enum(
        "on",
        "native",
        ["native", "grid"],
        "What the target is judged on: native, the validation Dice in the labels' own geometry "
        "(as tf-medseg-predict and -evaluate give it; configurations at different spacings "
        "compare on one measurement), or grid, the training grid's (faster).",
    )
    flags.DEFINE_enum(
        "sampler",
        "default",
        ["default", "paper"],
        "The adaptive sampler of every run (tf-medseg-train --sampler): default, the package's "
        "(warm-up, damping, a floor of 1/3); paper, the paper's update, with which the README's "
        "time-to-Dice tables were measured.",
    )


def run_flags(extra: list[str], sampler: str, seed: int, native: bool = False) -> list[str]:
    """The flags every run of one seed gets after its configuration's: ``extra`` (with or
    without its leading ``--``), the sampler and the seed; with ``native``, the target judged
    on the Dice in the labels' own geometry at every validation (``--val_native=every``)."""
    given = [e if e.startswith("--") else f"--{e}" for e in extra]
    return [*given, f"--sampler={sampler}", f"--seed={seed}"] + (
        ["--val_native=every"] if native else []
    )


def generated_task(msd: bool, suffix: str) -> str:
    """The benchmark's synthetic task in the workdir, generated once."""
    from tf_medseg.data.synthetic import generate_task

    data_dir = os.path.join(FLAGS.workdir, f"data_{FLAGS.task}{suffix}")
    if os.path.isfile(os.path.join(data_dir, "dataset.json")):
        return data_dir
    if msd:  # 24 training and 6 validation volumes (the preset's --num_val)
        options = dict(num_train=30, num_test=0, seed=0, geometry="msd", progress=True)
    else:
        options = dict(num_train=16, num_test=2, size=96, seed=0)
    generate_task(FLAGS.task, data_dir, **options)
    return data_dir


def output_of(results: dict, target: float, seeds: list[int], complete: bool) -> dict:
    """The benchmark's JSON: where it ran, its settings, and each configuration's runs."""
    return {
        **provenance(),
        "complete": complete,
        "task": FLAGS.task,
        "geometry": FLAGS.geometry,
        "target_dice": target,
        "max_minutes_per_run": FLAGS.max_minutes_per_run,
        "seeds": seeds,
        "sampler": FLAGS.sampler,
        "target_on": FLAGS.on,
        "extra": list(FLAGS.extra),
        "machine": f"{os.cpu_count()}-core CPU",
        "runs": results,
    }


def main(argv: list[str]) -> None:
    del argv
    msd = FLAGS.geometry == "msd"
    suffix = "_msd" if msd else ""
    flagfile = presets.path(f"synthetic_{FLAGS.task}{suffix}")
    proposed = read_flagfile(flagfile)
    target = FLAGS.target_dice or float(proposed.get("target_dice", 0.9))
    data_dir = FLAGS.data_dir or generated_task(msd, suffix)
    known = configurations(proposed)
    unknown = [c for c in FLAGS.configs if c not in known]
    if unknown:
        raise app.UsageError(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
    seeds = [int(seed) for seed in FLAGS.seeds]
    results = {}
    for name in FLAGS.configs:
        per_seed = {}
        for seed in seeds:
            run_name = name.replace("+", "_plus_")
            per_seed[seed] = run_config(
                f"{name} seed {seed}",
                known[name],
                flagfile,
                data_dir,
                os.path.join(FLAGS.workdir, FLAGS.task + suffix, run_name, f"seed{seed}"),
                FLAGS.max_minutes_per_run,
                target,
                run_flags(FLAGS.extra, FLAGS.sampler, seed, native=FLAGS.on == "native"),
            )
            r = per_seed[seed]
            fraction = r["validation_fraction"]
            print(
                f"{name} seed {seed}: best Dice {r['best_dice']}, time to target "
                f"{r['time_to_target_s']:.0f} s{'' if r['reached_target'] else ' (cap)'}, "
                f"{r['patches_per_s']:.2f} patches/s, validation "
                f"{'-' if fraction is None else f'{100 * fraction:.0f}%'} of the run",
                flush=True,
            )
            # After every run, the runs so far (an hour-long benchmark stopped halfway keeps
            # them; "complete" says whether every configuration and seed ran).
            results[name] = aggregate(per_seed)
            write_json(FLAGS.json, output_of(results, target, seeds, complete=False))
    output = output_of(results, target, seeds, complete=True)
    if "baseline" in results and "proposed" in results:
        output["speedup"] = (
            results["baseline"]["time_to_target_s"] / results["proposed"]["time_to_target_s"]
        )
        output["baseline_capped"] = not results["baseline"]["reached_target"]
    stem = os.path.splitext(FLAGS.json)[0]
    base_time_s = None
    if FLAGS.baseline_json and "baseline" not in results:
        with open(FLAGS.baseline_json) as f:
            base_time_s = json.load(f)["runs"]["baseline"]["time_to_target_s"]
        output["baseline_time_to_target_s"] = base_time_s
        output["baseline_from"] = FLAGS.baseline_json
    write_json(FLAGS.json, output)
    table = markdown_table(results, "baseline", target, base_time_s)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    title = f"synthetic {FLAGS.task}{' (MSD geometry)' if msd else ''}, {os.cpu_count()}-core CPU"
    plot_curves(results, stem + ".png", title)
    plot_class_curves(results, stem + "_classes.png", title)
    print(table)
    if "speedup" in output:
        capped = " (baseline capped: a lower bound)" if output["baseline_capped"] else ""
        print(f"speed-up, baseline over proposed time to target: {output['speedup']:.2f}x{capped}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
