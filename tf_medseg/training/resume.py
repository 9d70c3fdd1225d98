"""Whether a run may resume in its workdir, or start from another run's weights.

A workdir with checkpoints resumes only what it was trained for: the same network and optimiser
(:data:`CHECKPOINT_FIELDS`), the same split (:data:`SPLIT_FIELDS`, the seed and the data
folder), the same channels and classes. :func:`resume_conflicts` and :func:`finetune_conflicts`
list what stands in the way, one line each, before anything is built. No TensorFlow here.
"""

from __future__ import annotations

import os

from tf_medseg import rundir
from tf_medseg.config import TrainConfig, flag_text, split_of
from tf_medseg.rundir import RunDir

#: The settings that shape the checkpoint's variables (the network and the optimiser's slots): a
#: run resumes only with the values its checkpoints were written with.
CHECKPOINT_FIELDS = (
    "model",
    "base_filters",
    "depth",
    "norm",
    "residual",
    "deep_supervision",
    "optimizer",
)
#: The settings that choose the run's training and validation cases. A resumed run that changes
#: them would validate on cases its weights trained on, and compare its Dice with a best Dice of
#: other cases: refused when they change the split saved in ``workdir/split.json``.
SPLIT_FIELDS = ("split_file", "num_val", "val_fraction", "num_folds", "fold")


def _saved_config(workdir: str) -> TrainConfig | None:
    try:
        return TrainConfig.from_json(RunDir(workdir).read_text(rundir.CONFIG))
    except (OSError, ValueError, TypeError):
        return None


def _differs(name: str, config: TrainConfig, saved: TrainConfig, whose: str, rest: str) -> str:
    return (
        f"--{name}={flag_text(getattr(config, name))} differs from the "
        f"--{name}={flag_text(getattr(saved, name))} of {whose}: {rest}"
    )


def resume_conflicts(config: TrainConfig, task=None) -> list[str]:
    """What keeps ``config`` from resuming the run whose checkpoints are in
    ``workdir/checkpoints``, one line each; empty when it may (or there are no checkpoints, or no
    readable ``config.json`` beside them). Without checkpoints, :func:`finetune_conflicts`.

    Refused, each naming the flag with its old and new values (from ``workdir/config.json``):

    * a setting of :data:`CHECKPOINT_FIELDS`, or ``--precision=mixed_float16`` after another
      precision (its ``LossScaleOptimizer`` expects a loss scale those checkpoints do not hold;
      the other way round resumes, the loss scale dropped). Without this check the restore fails
      on every checkpoint with TensorFlow's shape or object-matching errors, which do not name
      the flag;
    * another ``--seed`` or ``--data_dir``, or a setting of :data:`SPLIT_FIELDS` that changes
      the split of ``workdir/split.json`` (the validation cases); a split that changed with the
      same flags (an edited ``dataset.json`` or split file) is named too;
    * a data folder of other channels or classes than ``workdir/task.json``'s.

    Reads ``dataset.json`` (unless given its ``task``) and a split file, not the images; no
    TensorFlow.
    """
    if not config.workdir:
        return []
    if not RunDir(config.workdir).has_checkpoint():
        return finetune_conflicts(config, task)
    saved = _saved_config(config.workdir)
    if saved is None:
        return []
    whose = f"the run whose checkpoints are in {os.path.join(config.workdir, 'checkpoints')}"
    changed = [name for name in CHECKPOINT_FIELDS if getattr(config, name) != getattr(saved, name)]
    if config.precision == "mixed_float16" != saved.precision:
        changed.append("precision")
    lines = [
        _differs(
            name, config, saved, whose, "resume with that value, or train in another --workdir"
        )
        for name in changed
    ]
    task = task if task is not None else _task_or_none(config.data_dir)
    lines += _split_conflicts(config, saved, task, whose)
    lines += _data_conflicts(
        config, task, config.workdir, whose, "give its data folder, or train in another --workdir"
    )
    return lines


def _task_or_none(data_dir: str):
    """The task of ``data_dir``, or None when it cannot be read (the run reports that)."""
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import load_task

    try:
        return load_task(data_dir)
    except DataError:
        return None


def _same_path(a: str, b: str) -> bool:
    """The same folder or file: the same text (a relative path resumed from the same place), or
    the same place on disk."""
    return a == b or bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _split_conflicts(config: TrainConfig, saved: TrainConfig, task, whose: str) -> list[str]:
    """Another seed or data folder, or split settings that change the saved split."""
    way = (
        "resume with that value, or train in another --workdir "
        f"(--finetune_from={config.workdir} starts it from this run's weights)"
    )
    lines = []
    if config.seed != saved.seed:
        why = "the seed draws the split, the cache order and the patches"
        lines.append(_differs("seed", config, saved, whose, f"{why}; {way}"))
    if not _same_path(config.data_dir, saved.data_dir):
        why = "the cases under the trained weights would be another folder's"
        lines.append(_differs("data_dir", config, saved, whose, f"{why}; {way}"))
    same = _same_split(config, task)
    if same or lines:  # the seed or data folder named: their split is theirs
        return lines
    names = [
        name
        for name in SPLIT_FIELDS
        if not (
            _same_path(config.split_file, saved.split_file)
            if name == "split_file"
            else getattr(config, name) == getattr(saved, name)
        )
    ]
    why = "the validation cases would change under the trained weights (split.json)"
    lines = [_differs(name, config, saved, whose, f"{why}; {way}") for name in names]
    if not lines and same is False:
        lines.append(
            f"the split of --data_dir={config.data_dir} differs from "
            f"{os.path.join(config.workdir, 'split.json')} of {whose} with the same flags (its "
            "dataset.json or split file changed): restore them, or train in another --workdir "
            f"(--finetune_from={config.workdir} starts it from this run's weights)"
        )
    return lines


def _same_split(config: TrainConfig, task) -> bool | None:
    """Whether the split ``config`` gives is the workdir's ``split.json`` (the same cases in
    training and in validation); None when either is unknown."""
    from tf_medseg.data.io import DataError

    try:
        stored = RunDir(config.workdir).read_json(rundir.SPLIT)
        old = (sorted(stored["train"]), sorted(stored["validation"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if task is None:
        return None
    try:
        train, val = split_of(config, task)
    except DataError:
        return None
    return old == (sorted(i["case"] for i in train), sorted(i["case"] for i in val))


def _data_conflicts(config: TrainConfig, task, run_dir: str, whose: str, way: str) -> list[str]:
    """The data's channels and classes against those ``run_dir/task.json`` was trained on (its
    checkpoints' input and output layers)."""
    path = RunDir(run_dir).task
    try:
        stored = RunDir(run_dir).read_json(rundir.TASK)
        old = (list(stored["modalities"]), list(stored["labels"]))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    new = (list(task.modalities), list(task.labels)) if task is not None else old
    if new == old:
        return []
    return [
        f"--data_dir={config.data_dir} has channels {new[0]} and classes {new[1]}, {whose} was "
        f"trained on channels {old[0]} and classes {old[1]} ({path}): {way}"
    ]


def finetune_conflicts(config: TrainConfig, task=None) -> list[str]:
    """What keeps ``--finetune_from`` from starting ``config``'s run, one line each (empty
    without it): a folder with no checkpoint, another network than its run's (the settings of
    :data:`CHECKPOINT_FIELDS` but the optimiser, which starts afresh), other channels or
    classes than its ``task.json``'s."""
    source = config.finetune_from
    if not source:
        return []
    if not RunDir(source).has_checkpoint():
        return [
            f"--finetune_from={source} holds no checkpoint "
            f"({os.path.join(source, 'checkpoints')}): give a training workdir"
        ]
    where = f"the run in --finetune_from={source}"
    saved = _saved_config(source)
    network = [name for name in CHECKPOINT_FIELDS if name != "optimizer"]
    lines = [
        _differs(
            name,
            config,
            saved,
            where,
            "a fine-tune starts from that network's weights; give its value",
        )
        for name in network
        if saved is not None and getattr(config, name) != getattr(saved, name)
    ]
    task = task if task is not None else _task_or_none(config.data_dir)
    return lines + _data_conflicts(
        config, task, source, where, "a fine-tune needs the same channels and classes"
    )
