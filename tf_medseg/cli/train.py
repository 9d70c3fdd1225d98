"""``tf-medseg-train``: trains a segmentation model on an MSD-layout task.

Every setting is an absl flag (see ``--helpfull``); an experiment is a preset shipped with the
package (``--preset=NAME``, see ``tf_medseg.presets``) or a flagfile of one's own
(``--flagfile=PATH``), and flags given after it override it::

    tf-medseg-train --preset=msd_spleen --data_dir=/data/Task09_Spleen --workdir=runs/spleen

``--dry_run`` checks the data folder, resolves the configuration and the split, writes
``config.json`` and ``split.json`` to the workdir, prints the configuration and exits.

Writes to ``--workdir``: ``config.json`` (the resolved configuration), ``split.json`` (the
training and validation cases, readable by ``--split_file``), ``checkpoints/``,
``tensorboard/``, ``metrics.jsonl``, ``summary.json`` and ``best_model.keras``. Started again with
the same workdir, it resumes from the last checkpoint. Under ``horovodrun -np N`` it trains on N
workers.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

from tf_medseg.cli import handle_signals_from_the_start

if __name__ == "__main__":  # python -m tf_medseg.cli.train: from before the imports below
    handle_signals_from_the_start()

from absl import app, flags, logging  # noqa: E402

from tf_medseg import presets, rundir  # noqa: E402
from tf_medseg.rundir import RunDir  # noqa: E402
from tf_medseg.training.config import (  # noqa: E402
    PAPER_SAMPLER,
    TrainConfig,
    config_from_flags,
    define_flags,
    split_of,
)
from tf_medseg.training.interrupts import (  # noqa: E402
    EXIT_INTERRUPTED,
    Interrupts,
    TrainingInterrupted,
)
from tf_medseg.training.resume import resume_conflicts  # noqa: E402


def _flag_text(value) -> str:
    return ",".join(f"{v:.4g}" for v in value) if isinstance(value, tuple) else f"{value:.4g}"


def _sampler_flags(values: dict) -> str:
    return ", ".join(f"--{name}={_flag_text(values[name])}" for name in PAPER_SAMPLER)


define_flags()
flags.DEFINE_string(
    "preset",
    None,
    "A preset shipped with tf_medseg, by name (" + ", ".join(presets.names()) + "); its flags "
    "are read in place, like --flagfile, so that later flags override them.",
)
flags.DEFINE_bool(
    "dry_run",
    False,
    "Check the data folder, resolve the configuration and the split, write config.json and "
    "split.json to --workdir, print the configuration, and exit without training.",
)
flags.DEFINE_bool(
    "plan",
    None,
    "Plan the settings that no flag or flagfile gives for this data and this machine "
    "(tf-medseg-plan's rules; the plan is written to the workdir). Default: on when neither "
    "--preset nor --flagfile is given.",
)
flags.DEFINE_enum(
    "sampler",
    "default",
    ["default", "paper"],
    "The adaptive sampler's settings. default: equation 4 after a warm-up, damped, and at "
    "least a third of the patches foreground-centred (the flags' defaults, "
    + _sampler_flags({f.name: f.default for f in dataclasses.fields(TrainConfig)})
    + "). paper: the paper's update, undamped from the first validation, within a clamp of the "
    "package's (the paper states none), "
    + _sampler_flags(PAPER_SAMPLER)
    + " (a flag given with a different value is refused); add --nobalance_classes for the "
    "paper's pooled-foreground centres.",
)
flags.DEFINE_bool(
    "allow_cpu_float16",
    False,
    "Train under mixed_float16 although no GPU is visible (for testing: on a CPU it is slow and "
    "gains nothing; use float32, or mixed_bfloat16 where the CPU has native bfloat16).",
)
FLAGS = flags.FLAGS
_FROM_FILE = False  # whether the command line had a --preset or --flagfile (set by run())


def apply_plan(data_dir: str, workdir: str | None):
    """Plans for ``data_dir`` on this machine; returns the plan, whose values fill what no flag
    gives (:func:`~tf_medseg.training.config.config_from_flags`), and a line per value that a
    resumed run planned again.

    A run that resumes (``workdir`` holds checkpoints and ``plan.json``) keeps the planned flags
    of its ``plan.json``, but those that only fit it to the machine
    (:func:`tf_medseg.planning.rules.resumed_plan`).
    """
    from tf_medseg.data.msd import load_task
    from tf_medseg.planning import rules as planning

    task = load_task(data_dir)
    # Under horovodrun every worker plans (the same fingerprint, read from the task's cache once
    # stored); the RAM is shared by the workers of a node.
    result = planning.plan_for(
        task,
        fallback_dir=workdir,
        workers=int(os.environ.get("HOROVOD_SIZE", "1")),
        local_workers=int(os.environ.get("HOROVOD_LOCAL_SIZE", "1")),
        budget_minutes=FLAGS.budget_minutes,
    )
    lines = []
    run = RunDir(workdir or "")
    saved_path = run.plan if workdir else ""
    if workdir and run.has_checkpoint() and os.path.isfile(saved_path):
        try:
            saved = run.read_json(rundir.PLAN)
        except (OSError, ValueError) as err:
            logging.warning("%s is unreadable (%s): planning afresh", saved_path, err)
        else:
            result, lines = planning.resumed_plan(result, saved, saved_path)
    return result, lines


def apply_sampler(name: str) -> list[str]:
    """``--sampler=paper`` sets the sampler's flags to the paper's values; returns one line per
    flag that was given with another value (nothing is set then)."""
    if name != "paper":
        return []
    errors = []
    for flag, value in PAPER_SAMPLER.items():
        given = FLAGS[flag]
        if given.present and _flag_text(_parsed(given.value)) != _flag_text(value):
            errors.append(
                f"--sampler=paper sets --{flag}={_flag_text(value)}, but "
                f"--{flag}={_flag_text(_parsed(given.value))} was given"
            )
    if not errors:
        for flag, value in PAPER_SAMPLER.items():
            FLAGS[flag].parse(_flag_text(value))
    return errors


def _parsed(value):
    return tuple(float(v) for v in value) if isinstance(value, list) else value


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    planned, replanned = None, []
    if FLAGS.plan or (FLAGS.plan is None and not _FROM_FILE):
        if not FLAGS.data_dir:
            print("tf-medseg-train: --data_dir is required", file=sys.stderr)
            return 2
        from tf_medseg.data.io import DataError

        try:
            planned, replanned = apply_plan(FLAGS.data_dir, FLAGS.workdir or None)
        except DataError as err:
            print(f"tf-medseg-train: {err}", file=sys.stderr)
            return 2
    sampler_errors = apply_sampler(FLAGS.sampler)
    if sampler_errors:
        for line in sampler_errors:
            print(f"tf-medseg-train: {line}", file=sys.stderr)
        return 2
    config = config_from_flags(planned=planned.flags if planned is not None else None)
    errors = config.validate() + resume_conflicts(config)
    if not errors:
        errors = workdir_errors(config.workdir)
    if errors:
        for line in errors:
            print(f"tf-medseg-train: {line}", file=sys.stderr)
        return 2
    if planned is not None and os.environ.get("HOROVOD_RANK", "0") == "0":
        from tf_medseg.planning import rules as planning

        planning.write_plan(planned, RunDir(config.workdir).plan)
        print(planned.table())
        for line in replanned:
            print(line)
    if FLAGS.dry_run:
        return dry_run(config)
    if config.precision == "mixed_float16" and not FLAGS.allow_cpu_float16:
        from tf_medseg.planning import system

        if not system.gpus():
            print(
                "tf-medseg-train: --precision=mixed_float16 needs a GPU and none is visible: on "
                "a CPU it is slow and gains nothing. Use --precision=float32 (or mixed_bfloat16 "
                "on a CPU with native bfloat16), or --allow_cpu_float16 to train so anyway.",
                file=sys.stderr,
            )
            return 2
    # Installed before TensorFlow is imported (seconds), so that Ctrl-C is handled everywhere.
    with Interrupts(grace_s=config.interrupt_grace_s) as interrupts:
        try:
            return _train(config, interrupts)
        except BaseException:
            # Before the loop a signal raises KeyboardInterrupt wherever the main thread is;
            # inside TensorFlow's or Keras' context managers their clean-up may replace it with
            # an error of their own. Either way the stop was asked for and nothing is lost.
            if not interrupts.requested:
                raise
            print(
                "tf-medseg-train: interrupted outside the training loop; nothing new to save",
                file=sys.stderr,
            )
            # Nothing to save or close: end here. Interrupted inside an import (TensorFlow's
            # takes seconds), the normal exit was seen to end as killed by SIGINT (-2), 2 of
            # about 150 times, after this line.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)


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


def _train(config, interrupts: Interrupts) -> int:
    from tf_medseg.cache import CacheBudgetError, CachePrefixError
    from tf_medseg.data.io import DataError
    from tf_medseg.distributed import DistributionError
    from tf_medseg.training.course import NonFiniteLossError
    from tf_medseg.training.loop import Trainer
    from tf_medseg.training.records import WorkdirError

    try:
        trainer = Trainer(config)
    except (DataError, CacheBudgetError, CachePrefixError, DistributionError) as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 2
    except WorkdirError as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # Writing the run's first files (config.json, split.json, preprocessing.json...) on a
        # full disk or a read-only or lost mount: nothing was trained, nothing is lost.
        where = err.filename or config.workdir
        print(
            f"tf-medseg-train: cannot write {where}: {err.strerror or err}; nothing was trained: "
            "free space (or fix the folder) and run the same command again",
            file=sys.stderr,
        )
        return 1
    try:
        summary = trainer.fit(interrupts)
    except TrainingInterrupted as err:
        trainer.close(wait=False)
        logging.warning("%s; the checkpoint is saved, run the same command to resume", err)
        return EXIT_INTERRUPTED
    except (DataError, CachePrefixError, NonFiniteLossError, WorkdirError) as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.chief:
        print(result_table(summary, config))
    return 0


def dry_run(config) -> int:
    """Everything before training that can fail on the user's input, without TensorFlow: the
    task folder and every file's header, the split; writes ``config.json`` and ``split.json``."""
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import check_task_files, load_task, write_split_file

    try:
        task = load_task(config.data_dir)
        check_task_files(task)
        train, val = split_of(config, task)
    except DataError as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 2
    os.makedirs(config.workdir, exist_ok=True)
    config.save(config.workdir)
    write_split_file(RunDir(config.workdir).split, train, val)
    rows = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    width = max(len(name) for name, _ in rows)
    print(f"preset: {FLAGS.preset or '-'}")
    for name, value in rows:
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        print(f"  {name.ljust(width)}  {value}")
    print(
        f"task {task.name}: {len(task.training)} labelled cases ({len(train)} training, "
        f"{len(val)} validation), modalities {list(task.modalities)}, labels {list(task.labels)}"
    )
    if config.num_folds:
        print(
            f"cross-validation fold {config.fold} of {config.num_folds} (seed {config.seed}): "
            f"validation cases {', '.join(item['case'] for item in val)}"
        )
    print(f"estimated memory of a training step: {memory_estimate(config, task)}")
    if config.precision == "mixed_float16":
        print("note: mixed_float16 trains only where a GPU is visible (or --allow_cpu_float16)")
    print(f"dry run: wrote config.json and split.json to {config.workdir}; nothing trained")
    return 0


def memory_estimate(config, task) -> str:
    """The training step's estimated peak memory (the U-Net's; tf_medseg.planning.rules)."""
    from tf_medseg.planning.rules import estimate_memory_gb

    if config.model != "unet3d":
        return f"not estimated for --model={config.model}"
    patch = round(float(sum(config.patch_size)) / len(config.patch_size))
    gb = estimate_memory_gb(
        patch,
        config.batch_size,
        config.depth,
        config.base_filters,
        task.num_channels,
        task.num_classes,
        config.precision,
    )
    return f"{gb:.2f} GB ({'per GPU' if config.precision == 'mixed_float16' else 'host'})"


def result_table(summary: dict, config) -> str:
    """A short, human-readable table of a run's summary.json."""

    def fmt(value, unit=""):
        if value is None:
            return "not reached"
        return f"{value:.4f}" if isinstance(value, float) and not unit else f"{value}{unit}"

    ttt = summary.get("time_to_target_s")
    native = (summary.get("native") or {}).get("mean_dice")
    rows = [
        ("best mean Dice, training grid", fmt(summary.get("best_dice"))),
        (
            "  in the labels' geometry",
            "-" if native is None else f"{native:.4f} (as tf-medseg-predict and -evaluate)",
        ),
        ("at step", fmt(summary.get("best_step"))),
        ("at wall time", f"{summary.get('best_wall_s', 0):.1f} s"),
        (
            f"time to Dice {config.target_dice:g}" if config.target_dice else "time to target",
            "no target" if not config.target_dice else (f"{ttt:.1f} s" if ttt else "not reached"),
        ),
        ("steps", fmt(summary.get("steps"))),
        ("training patches/s", f"{summary.get('patches_per_s', 0):.2f}"),
        (
            "  after epoch 1",
            "-" if (steady := summary.get("steady_patches_per_s")) is None else f"{steady:.2f}",
        ),
        ("total wall time", f"{summary.get('wall_s', 0):.1f} s"),
        ("precision, workers", f"{summary.get('precision')}, {summary.get('workers')}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'result'.ljust(width)}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    split = summary.get("time_split") or {}
    if split:
        total = sum(split.values()) or 1.0
        parts = ", ".join(
            f"{name.replace('_', ' ')} {seconds:.1f} s ({100 * seconds / total:.0f}%)"
            for name, seconds in split.items()
            if seconds >= 0.05
        )
        lines.append(f"this session's time: {parts}")
    if summary.get("stop_reason"):
        lines.append(f"stopped: {summary['stop_reason']}")
    lines.append(f"(summary.json, metrics.jsonl, TensorBoard logs in {config.workdir})")
    return "\n".join(lines)


def run() -> None:
    """Entry point (the console script starts at :func:`tf_medseg.cli.train`, which handles
    signals before this module's imports)."""
    handle_signals_from_the_start()
    global _FROM_FILE
    _FROM_FILE = any(a.startswith(("--preset", "--flagfile")) for a in sys.argv[1:] if a != "--")
    try:
        argv = presets.expand_flagfiles(sys.argv)
    except presets.PresetError as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
