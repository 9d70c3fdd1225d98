"""``tf-medseg-plan``: plans a training configuration for an MSD-layout task on this machine.

Examples::

    tf-medseg-plan --data_dir=/data/Task02_Heart                    # print the plan
    tf-medseg-plan --data_dir=/data/Task09_Spleen --json=plan.json --out=plan.flags
    tf-medseg-train --flagfile=plan.flags --data_dir=/data/Task09_Spleen --workdir=runs/spleen
    # For a GPU node, from a machine without one:
    tf-medseg-plan --data_dir=/data/Task03_Liver --target=gpu --gpu_memory_gb=16

``tf-medseg-train`` without a preset or flagfile plans the same way by itself (see ``--plan``).
The rules are in :mod:`tf_medseg.planning.rules`.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MSD-layout task folder.", required=True)
flags.DEFINE_enum("target", "auto", ["auto", "cpu", "gpu"], "Plan for: auto (this machine).")
flags.DEFINE_float("gpu_memory_gb", None, "Memory of each GPU (default: from nvidia-smi).")
flags.DEFINE_integer("workers", 1, "Training workers (GPUs, or Horovod processes).", lower_bound=1)
flags.DEFINE_float(
    "budget_minutes", 0.0, "The run's wall-time budget (0: none): a cosine anneals over it."
)
flags.DEFINE_string("json", None, "Write the plan (settings, reasons, fingerprint) as JSON here.")
flags.DEFINE_string("out", None, "Write the plan as a flagfile here.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import load_task
    from tf_medseg.planning import rules as plan
    from tf_medseg.planning.plan import write_plan

    try:
        task = load_task(FLAGS.data_dir)
        result = plan.plan_for(
            task,
            FLAGS.target,
            FLAGS.gpu_memory_gb,
            workers=FLAGS.workers,
            budget_minutes=FLAGS.budget_minutes,
        )
    except DataError as err:
        print(f"tf-medseg-plan: {err}", file=sys.stderr)
        return 2
    fp = result.fingerprint
    print(
        f"{fp['task']}: {fp['num_cases']} labelled cases, {', '.join(fp['modalities'])}, "
        f"median spacing {', '.join(f'{s:.2f}' for s in fp['median_spacing'])} mm, median "
        f"foreground {' x '.join(f'{e:.0f}' for e in fp['median_foreground_extent_mm'])} mm"
    )
    m = result.machine
    where = (
        ", ".join(f"{g['name']} ({g.get('memory_gb') or '?'} GB)" for g in m["gpus"])
        if m["kind"] == "gpu"
        else f"CPU, {m['cpu_cores']} cores, {m['ram_available_gb']:g} of {m['ram_gb']:g} GB free"
    )
    print(f"machine: {where}")
    print(result.table())
    write_plan(result, FLAGS.json, FLAGS.out)
    return 0


def run() -> None:
    """Console entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
