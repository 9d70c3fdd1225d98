"""``tf-medseg-train``: trains a segmentation model on an MSD-layout task.

Every setting is an absl flag (see ``--helpfull``); an experiment is a flagfile, and flags given
after it override it::

    tf-medseg-train --flagfile=experiments/msd_spleen.flags \
        --data_dir=/data/Task09_Spleen --workdir=runs/spleen

Writes to ``--workdir``: ``config.json`` (the resolved configuration), ``checkpoints/``,
``tensorboard/``, ``metrics.jsonl``, ``summary.json`` and ``best_model.keras``. Started again with
the same workdir, it resumes from the last checkpoint. Under ``horovodrun -np N`` it trains on N
workers.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from tf_medseg.training.config import config_from_flags, define_flags

define_flags()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    errors = config.validate()
    if errors:
        for line in errors:
            print(f"tf-medseg-train: {line}", file=sys.stderr)
        return 2
    from tf_medseg.data.io import DataError
    from tf_medseg.training.loop import Trainer

    try:
        trainer = Trainer(config)
    except DataError as err:
        print(f"tf-medseg-train: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        logging.warning("interrupted; the checkpoint is saved, run the same command to resume")
        return 130
    finally:
        trainer.close()
    if trainer.chief:
        print(json.dumps(summary, indent=2))
    return 0


def run() -> None:
    """Console entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
