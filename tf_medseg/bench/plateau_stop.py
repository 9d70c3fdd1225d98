"""What the plateau stop saves, and what the schedule does with it: planned runs on synthetic tasks.

Each run is ``tf-medseg-train`` with no flags but the data, the workdir, the seed and the
configuration's (the plan decides everything else: spacing, network, patience...), in its own
process, under one of these configurations:

- ``decay``: the plateau stop, with the rate halved after half the patience without a gain
  (``--lr_schedule=plateau``);
- ``constant``: the plateau stop with a constant rate (``--lr_schedule=constant``, the plan's
  default): the schedule without its decay;
- ``reference``: no stop and a constant rate (``--patience=0 --lr_schedule=constant``), capped
  at ``--reference_minutes``: what a run without the stop does meanwhile, and the Dice it reaches.

A run without the stop lasts its cap (or its 1,000 epochs), so the time the stop saves is the
cap less the stopped run's wall time; the reference runs tell the Dice that time buys. With
``--liver``'s post-processing decisions (``postprocessing.json``) recorded where a run made them.

::

    python -m tf_medseg.bench.plateau_stop --tasks=spleen,heart --seeds=0,1,2 \\
        --configs=decay,constant,reference --json=runs/bench/plateau_stop.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

from tf_medseg import rundir
from tf_medseg.bench import provenance, run_training, write_json
from tf_medseg.rundir import RunDir

CONFIGS = {
    "decay": ["--lr_schedule=plateau"],
    "constant": ["--lr_schedule=constant"],
    "reference": ["--patience=0", "--lr_schedule=constant"],
}

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["spleen", "heart"], "Synthetic tasks (tf-medseg-synth --task).")
flags.DEFINE_list("configs", ["decay", "constant"], f"Of {sorted(CONFIGS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Run seeds (split, cache order, patches).")
flags.DEFINE_list("reference_seeds", ["0"], "Seeds of the reference runs.")
flags.DEFINE_float("reference_minutes", 10.0, "Wall-time cap of a reference run.")
flags.DEFINE_integer(
    "max_epochs",
    400,
    "Epoch bound of the other runs (a safety bound; a wall-time budget would make the plan "
    "anneal a cosine over it instead of stopping on a plateau).",
)
flags.DEFINE_integer("size", 96, "In-plane voxels of the generated cases.")
flags.DEFINE_integer("num_train", 16, "Generated training cases.")
flags.DEFINE_string("data_root", "data/plateau", "Where the generated tasks are kept.")
flags.DEFINE_string("runs_root", "runs/bench/plateau_stop", "Workdirs of the runs.")
flags.DEFINE_string("json", None, "Write every run's record here.")
flags.DEFINE_string(
    "from_json", None, "Print the tables of a recorded JSON (docs/bench/...) without running."
)


def generate(task: str) -> str:
    """The synthetic task's folder, generated once (seed 0)."""
    out = os.path.join(FLAGS.data_root, task)
    if not os.path.isfile(os.path.join(out, "dataset.json")):
        command = [sys.executable, "-m", "tf_medseg.cli.synth", f"--task={task}", f"--out={out}"]
        command += [f"--size={FLAGS.size}", f"--num_train={FLAGS.num_train}", "--seed=0"]
        subprocess.run(command, check=True)
    return out


def train(task: str, data: str, config: str, seed: int) -> dict:
    """One run in its own process; its summary, plan, curve and post-processing decision."""
    workdir = os.path.join(FLAGS.runs_root, f"{task}-{config}-seed{seed}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    command = [sys.executable, "-m", "tf_medseg.cli.train", f"--data_dir={data}"]
    command += [f"--workdir={workdir}", f"--seed={seed}", "--noprogress"]
    if config == "reference":
        command.append(f"--budget_minutes={FLAGS.reference_minutes:g}")
    else:
        command.append(f"--epochs={FLAGS.max_epochs}")
    command += CONFIGS[config]
    logging.info("%s %s seed %d: %s", task, config, seed, " ".join(command[3:]))
    start = time.time()
    summary, records = run_training(command, workdir, f"{task} {config} seed {seed}")
    curve = [[r["wall_s"], r["mean_dice"], r["step"]] for r in records]
    run = RunDir(workdir)
    plan = run.read_json(rundir.PLAN)
    return {
        "task": task,
        "config": config,
        "seed": seed,
        "command": " ".join(command[1:]),
        "planned": {k: plan.get(k) for k in ("lr_schedule", "patience", "val_every")},
        "stop_reason": summary["stop_reason"],
        "wall_s": summary["wall_s"],
        "process_s": round(time.time() - start, 1),
        "best_dice": summary["best_dice"],
        "best_wall_s": summary["best_wall_s"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "learning_rate_scale": summary.get("learning_rate_scale"),
        "curve": curve,
        "postprocessing": (
            run.read_json(rundir.POSTPROCESSING) if os.path.isfile(run.postprocessing) else None
        ),
    }


def best_by(curve: list, seconds: float) -> float | None:
    """The best validation Dice of a curve up to ``seconds`` of wall time."""
    values = [dice for wall, dice, _ in curve if wall <= seconds and dice is not None]
    return max(values) if values else None


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mid = round(statistics.median(values), digits)
    return f"{mid}" if len(values) == 1 else f"{mid} ({min(values)}-{max(values)})"


def table(records: list[dict], reference_minutes: float) -> str:
    """Per task and configuration: medians (ranges) of wall time and best Dice, and the time
    saved against a run without the stop capped at ``reference_minutes``; then the reference
    runs' best Dice at each stopped run's wall time and at their cap."""
    rows = ["task     config     runs  wall s (range)        best Dice (range)        saved s"]
    keys = sorted({(r["task"], r["config"]) for r in records})
    for task, config in keys:
        runs = [r for r in records if (r["task"], r["config"]) == (task, config)]
        wall = [round(r["wall_s"]) for r in runs]
        dice = [round(r["best_dice"], 4) for r in runs]
        saved = "-"
        if config != "reference":
            saved = _spread([round(60 * reference_minutes - w) for w in wall], 0)
        rows.append(
            f"{task:8s} {config:10s} {len(runs):4d}  {_spread(wall, 0):20s}  "
            f"{_spread(dice, 4):23s}  {saved}"
        )
    rows += ["", "reference run: best Dice by the stopped runs' wall time, and at its cap"]
    for ref in (r for r in records if r["config"] == "reference"):
        stopped = [
            r
            for r in records
            if r["task"] == ref["task"] and r["config"] != "reference" and r["seed"] == ref["seed"]
        ]
        by = ", ".join(
            f"{r['config']} {r['wall_s']:.0f} s: {best_by(ref['curve'], r['wall_s']):.4f} "
            f"(stopped run {r['best_dice']:.4f})"
            for r in stopped
        )
        rows.append(
            f"{ref['task']} seed {ref['seed']}: {by}; at {ref['wall_s']:.0f} s: "
            f"{ref['best_dice']:.4f}"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.from_json:
        with open(FLAGS.from_json) as f:
            recorded = json.load(f)
        print(f"{recorded['command']}\n{recorded['cpu']}, {recorded['date']}")
        print(table(recorded["runs"], recorded["reference_minutes"]))
        return
    records = []
    for task in FLAGS.tasks:
        data = generate(task)
        for config in FLAGS.configs:
            seeds = FLAGS.reference_seeds if config == "reference" else FLAGS.seeds
            for seed in seeds:
                records.append(train(task, data, config, int(seed)))
                r = records[-1]
                print(
                    f"{task} {config} seed {seed}: {r['wall_s']:.0f} s, best Dice "
                    f"{r['best_dice']:.4f} at {r['best_wall_s']:.0f} s; {r['stop_reason']}",
                    flush=True,
                )
    print(table(records, FLAGS.reference_minutes))
    if FLAGS.json:
        write_json(
            FLAGS.json,
            {
                **provenance(),
                "reference_minutes": FLAGS.reference_minutes,
                "runs": records,
            },
        )


if __name__ == "__main__":
    app.run(main)
