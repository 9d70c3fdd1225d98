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

from tf_medseg.cli import handle_signals_from_the_start

if __name__ == "__main__":  # python -m tf_medseg.cli.train: from before the imports below
    handle_signals_from_the_start()

from absl import app, flags, logging  # noqa: E402

from tf_medseg import presets  # noqa: E402
from tf_medseg.config import (  # noqa: E402
    PAPER_SAMPLER,
    TrainConfig,
    config_from_flags,
    define_flags,
    split_of,
)
from tf_medseg.rundir import RunDir  # noqa: E402
from tf_medseg.training.interrupts import (  # noqa: E402
    EXIT_INTERRUPTED,
    Interrupts,
    TrainingInterrupted,
)


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
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import load_task
    from tf_medseg.planning.rules import plan_of_run
    from tf_medseg.training.checks import ConfigError, check_run

    task, planned, replanned = None, None, []
    try:
        if FLAGS.plan or (FLAGS.plan is None and not _FROM_FILE):
            if not FLAGS.data_dir:
                raise ConfigError("--data_dir is required")
            task = load_task(FLAGS.data_dir)  # once: for the plan, the checks and the run
            planned, replanned = plan_of_run(task, FLAGS.workdir or "", FLAGS.budget_minutes)
        sampler_errors = apply_sampler(FLAGS.sampler)
        if sampler_errors:
            raise ConfigError("\n".join(sampler_errors))
        config = config_from_flags(planned=planned.settings if planned is not None else None)
        checked = check_run(config, task)
    except (ConfigError, DataError) as err:
        for line in str(err).splitlines():
            print(f"tf-medseg-train: {line}", file=sys.stderr)
        return 2
    if planned is not None and os.environ.get("HOROVOD_RANK", "0") == "0":
        from tf_medseg.planning.plan import write_plan

        write_plan(planned, RunDir(config.workdir).plan)
        print(planned.table())
        for line in replanned:
            print(line)
    if FLAGS.dry_run:
        return dry_run(checked)
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
            return _train(checked, interrupts)
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
            # takes seconds), the normal exit can still end as killed by SIGINT (-2) after this
            # line; os._exit gives the exit code promised.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)


def _train(checked, interrupts: Interrupts) -> int:
    from tf_medseg.cache import CacheBudgetError, CachePrefixError
    from tf_medseg.data.io import DataError
    from tf_medseg.distributed import DistributionError
    from tf_medseg.training import records
    from tf_medseg.training.course import NonFiniteLossError
    from tf_medseg.training.loop import Trainer
    from tf_medseg.training.records import WorkdirError

    config = checked.config
    try:
        trainer = Trainer(checked)
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
        print(records.result_table(summary, config.target_dice, config.workdir))
    return 0


def dry_run(checked) -> int:
    """Everything before training that can fail on the user's input, without TensorFlow (the
    checks are done: the task folder and every file's header, the resume); writes
    ``config.json`` and ``split.json``."""
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import write_split_file
    from tf_medseg.planning.rules import step_memory_text

    config, task = checked.config, checked.task
    try:
        train, val = split_of(config, task)
    except DataError as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 2
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
    memory = step_memory_text(config, task.num_channels, task.num_classes)
    print(f"estimated memory of a training step: {memory}")
    if config.precision == "mixed_float16":
        print("note: mixed_float16 trains only where a GPU is visible (or --allow_cpu_float16)")
    print(f"dry run: wrote config.json and split.json to {config.workdir}; nothing trained")
    return 0


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
