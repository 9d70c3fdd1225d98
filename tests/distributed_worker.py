"""One worker of the multi-worker tests, started by ``horovodrun -np 2 --gloo`` or by
``tf-medseg-launch --num_workers=2`` (tf.distribute): ``... python tests/distributed_worker.py``.

Trains with the real :class:`tf_medseg.training.loop.Trainer` (Horovod and Gloo, or
MultiWorkerMirroredStrategy's ring all-reduce, underneath) and
writes what ``tests/test_distributed.py`` compares into ``--out``:

* ``pid.<rank>``: this process's id, written first (the kill test signals it);
* ``rank<rank>.start.json``: the checkpoint restored and the step it starts from, written
  before training (a killed job still leaves it);
* ``rank<rank>.json``: steps, per-step losses, stop reason, collective votes, after training;
* ``rank<rank>.npz``: final weights ``w<i>`` (of the training model: with deep supervision its
  auxiliary heads too; their names are in ``rank<rank>.json``), validation ``case_dice`` /
  ``sums``, and with ``--record`` the initial weights ``init<i>`` and every batch this rank
  trained on (``images``, ``labels``, stacked by step).
"""

from __future__ import annotations

import argparse
import json
import os


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="TrainConfig as a JSON file.")
    parser.add_argument("--out", required=True, help="Folder for this worker's dumps.")
    parser.add_argument("--record", action="store_true", help="Keep batches, initial weights.")
    parser.add_argument(
        "--skew_clock_rank",
        type=int,
        default=-1,
        help="Fault injection: this rank's wall clock runs one hour ahead (the others' do not).",
    )
    args = parser.parse_args()
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    rank = int(os.environ.get("HOROVOD_RANK") or tf_config.get("task", {}).get("index", 0))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pid.{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(args.out, f"pid.{rank}.tmp"), os.path.join(args.out, f"pid.{rank}"))

    import numpy as np
    import tensorflow as tf

    # Two workers share two cores: one compute thread each avoids oversubscription.
    tf.config.threading.set_intra_op_parallelism_threads(1)

    from tf_medseg.config import TrainConfig
    from tf_medseg.training.loop import Trainer

    with open(args.config) as f:
        config = TrainConfig.from_json(f.read())
    trainer = Trainer(config)
    dist = trainer.dist
    start_step = trainer.state.step
    _write_json(
        os.path.join(args.out, f"rank{rank}.start.json"),
        {"restored_from": trainer.restored_from, "start_step": start_step, "size": dist.size},
    )
    if rank == args.skew_clock_rank:
        trainer.state.elapsed_s += 3600.0

    arrays: dict[str, np.ndarray] = {}
    if args.record:
        images, labels = [], []
        train_step = trainer.train_step

        def recording_step(batch_images, batch_labels):
            if not images:  # after fit()'s broadcast from rank 0, before the first update
                for i, v in enumerate(trainer.train_model.weights):
                    arrays[f"init{i}"] = v.numpy()
            images.append(batch_images.numpy())
            labels.append(batch_labels.numpy())
            return train_step(batch_images, batch_labels)

        recording_step.get_concrete_function = train_step.get_concrete_function
        trainer.train_step = recording_step
    summary = {}
    try:
        summary = trainer.fit()
        votes = {
            "rank1_true": dist.any_rank(dist.rank == 1, "vote_rank1"),
            "none_true": dist.any_rank(False, "vote_none"),
        }
        local_items = trainer.validation_items()
        result = trainer.validate()
    finally:
        trainer.close()
    if args.record:
        arrays["images"] = np.stack(images)
        arrays["labels"] = np.stack(labels)
    for i, v in enumerate(trainer.train_model.weights):
        arrays[f"w{i}"] = v.numpy()
    arrays["case_dice"] = result.case_dice
    arrays["sums"] = result.sums.to_array()
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **arrays)
    _write_json(
        os.path.join(args.out, f"rank{rank}.json"),
        {
            "rank": dist.rank,
            "size": dist.size,
            "backend": dist.backend,
            "start_step": start_step,
            "step": trainer.state.step,
            "losses": trainer.state.losses,
            "stop_reason": trainer.state.stop_reason,
            "summary": {k: summary.get(k) for k in ("steps", "best_dice", "workers")},
            "votes": votes,
            "local_val_cases": [item["case"] for item in local_items],
            "mean_dice": result.mean_dice,
            "weight_names": [v.name for v in trainer.train_model.weights],
        },
    )


if __name__ == "__main__":
    main()
