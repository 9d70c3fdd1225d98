"""Medical Segmentation Decathlon task folders: ``dataset.json``, item lists and splits.

A task folder holds ``dataset.json`` (name, modality, labels, training and test lists),
``imagesTr/``, ``labelsTr/`` and ``imagesTs/``. Items are plain dicts::

    {"case": "spleen_003", "image": "/abs/imagesTr/spleen_003.nii.gz", "label": "/abs/..."}

Training/validation splits are deterministic: by seed and fraction (or count), by seed into
cross-validation folds, or from an explicit split file (``split.json``, which
:func:`write_split_file` writes). The paper's split sizes (validation cases) are spleen 9 of 41,
heart 4 of 20 and liver 27 of 131: :data:`PAPER_VALIDATION_CASES`; which cases, the seed draws (the
paper does not list them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from tf_medseg.data.io import DataError, check_header, nifti_case
from tf_medseg.jsonio import write_json

#: Number of validation cases of the paper's splits, by MSD task folder name.
PAPER_VALIDATION_CASES = {"Task09_Spleen": 9, "Task02_Heart": 4, "Task03_Liver": 27}

CT_MODALITIES = ("CT",)


@dataclass(frozen=True)
class MSDTask:
    """One MSD-layout task.

    Attributes:
        root: Absolute path of the task folder.
        name: The task's name from dataset.json.
        modalities: Modality names by channel, e.g. ``("CT",)`` or ``("FLAIR", "T1w", ...)``.
        labels: Class names by integer label, background first.
        training: Labelled items.
        test: Unlabelled items.
    """

    root: str
    name: str
    modalities: tuple[str, ...]
    labels: tuple[str, ...]
    training: tuple[dict, ...] = field(repr=False)
    test: tuple[dict, ...] = field(repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Number of image channels (modalities)."""
        return len(self.modalities)

    @property
    def is_ct(self) -> bool:
        """Whether the (first) modality is CT, which selects the CT intensity normalisation."""
        return self.modalities[0].upper() in CT_MODALITIES

    @property
    def cache_dir(self) -> str:
        """The task's cache area (intensity statistics, on-disk prefix cache)."""
        return os.path.join(self.root, ".tf_medseg_cache")


def resolve_path(root: str, relative: str, source: str) -> str:
    """Resolves a path from dataset.json inside the task folder.

    The path is judged as written (lexically): absolute paths and ``..`` that climb out of the
    folder are refused, and the folder's own symlinks are followed wherever they lead
    (``imagesTr/`` linked to shared storage is the folder's own; dataset.json naming
    ``../x.nii.gz`` is not).

    Args:
        root: The task folder.
        relative: The path as written in dataset.json (``./imagesTr/x.nii.gz``).
        source: The file the path came from, for the error message.

    Returns:
        The absolute path inside ``root`` (symlinks not resolved).

    Raises:
        DataError: The path is absolute or leaves the task folder.
    """
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{source}: expected a relative file path, got {relative!r}")
    if os.path.isabs(relative):
        raise DataError(f"{source}: absolute path {relative!r} is not allowed; paths are relative")
    inside = os.path.normpath(relative)
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        raise DataError(f"{source}: path {relative!r} leads outside the data folder {root}")
    return os.path.join(os.path.abspath(root), inside)


def case_name(path: str) -> str:
    """The case identifier of a file: its name without ``.nii.gz`` / ``.nii``."""
    return nifti_case(path) or os.path.basename(path)


def _ordered_names(mapping: dict, what: str, source: str) -> tuple[str, ...]:
    try:
        keys = sorted(int(k) for k in mapping)
    except (TypeError, ValueError) as err:
        raise DataError(f"{source}: '{what}' keys must be integers, got {list(mapping)}") from err
    if keys != list(range(len(keys))):
        raise DataError(f"{source}: '{what}' keys must be 0..N-1, got {keys}")
    return tuple(str(mapping[str(k)] if str(k) in mapping else mapping[k]) for k in keys)


def load_task(root: str, check_files: bool = True) -> MSDTask:
    """Reads an MSD task folder's ``dataset.json``.

    Args:
        root: The task folder.
        check_files: Also check that every listed file exists.

    Returns:
        The task.

    Raises:
        DataError: dataset.json is missing, not JSON, lacks keys, lists no training items, names a
            path outside the folder or (with ``check_files``) a missing file.
    """
    root = os.path.abspath(root)
    source = os.path.join(root, "dataset.json")
    if not os.path.isfile(source):
        raise DataError(f"{source}: not found; is {root} an MSD task folder?")
    try:
        with open(source) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{source}: expected a JSON object at the top level")
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        raise DataError(f"{source}: missing key(s) {missing}")
    modalities = _ordered_names(meta["modality"], "modality", source)
    labels = _ordered_names(meta["labels"], "labels", source)
    if len(labels) < 2:
        raise DataError(f"{source}: 'labels' needs background and at least one class")
    if not isinstance(meta["training"], list) or not meta["training"]:
        raise DataError(f"{source}: 'training' lists no items")

    training = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{source}: training item {i} needs 'image' and 'label', got {entry!r}")
        image = resolve_path(root, entry["image"], source)
        label = resolve_path(root, entry["label"], source)
        training.append({"case": case_name(image), "image": image, "label": label})
    test = []
    for entry in meta.get("test", []):
        rel = entry["image"] if isinstance(entry, dict) else entry
        image = resolve_path(root, rel, source)
        test.append({"case": case_name(image), "image": image})
    cases = [item["case"] for item in training]
    if len(set(cases)) != len(cases):
        raise DataError(f"{source}: training cases are not unique")
    if check_files:
        for item in training + test:
            for key in ("image", "label"):
                if key in item and not os.path.isfile(item[key]):
                    raise DataError(f"{item[key]}: file not found (listed in {source})")
    return MSDTask(
        root=root,
        name=str(meta.get("name", os.path.basename(root))),
        modalities=modalities,
        labels=labels,
        training=tuple(training),
        test=tuple(test),
    )


def check_task_files(task: MSDTask) -> None:
    """Reads the header of every file the task lists (training images and labels, test images)
    and checks that each file is complete and each label has its image's shape: milliseconds a
    file, so that a cut or corrupt file is named before training, not at the first validation
    minutes in (nor, for a test file, after training).

    Raises:
        DataError: The first bad file, named with its problem.
    """
    for item in (*task.training, *task.test):
        shape = check_header(item["image"])
        if "label" in item:
            label_shape = check_header(item["label"])
            if label_shape[3:] == (1,):  # (X, Y, Z, 1) is read as (X, Y, Z)
                label_shape = label_shape[:3]
            if label_shape != shape[:3]:
                raise DataError(
                    f"{item['label']}: label shape {label_shape} differs from image shape "
                    f"{shape[:3]} ({item['image']})"
                )


def split_items(
    items: list[dict] | tuple[dict, ...],
    num_val: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Splits items into training and validation, deterministically by seed.

    Args:
        items: The labelled items.
        num_val: Number of validation items; overrides ``val_fraction``.
        val_fraction: Fraction of items for validation (rounded, at least 1).
        seed: The split's seed; the same seed and items give the same split.

    Returns:
        (train, validation) lists, each sorted by case.

    Raises:
        ValueError: The requested validation size leaves no training item.
    """
    items = sorted(items, key=lambda item: item["case"])
    n = len(items)
    if num_val is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        num_val = max(1, int(round(n * val_fraction)))
    if not 0 < num_val < n:
        raise ValueError(f"cannot take {num_val} validation cases from {n} items")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:num_val].tolist())
    train = [item for i, item in enumerate(items) if i not in val_idx]
    val = [item for i, item in enumerate(items) if i in val_idx]
    return train, val


def read_split_file(path: str, items: list[dict] | tuple[dict, ...]) -> tuple[list, list]:
    """Reads an explicit split: JSON ``{"train": [cases], "validation": [cases]}``.

    Args:
        path: The split file.
        items: The task's labelled items.

    Returns:
        (train, validation) item lists in the file's order.

    Raises:
        DataError: The file is unreadable, or names a case the task does not have, or uses a
            case twice.
    """
    try:
        with open(path) as f:
            split = json.load(f)
        train_cases, val_cases = list(split["train"]), list(split["validation"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: expected JSON with 'train' and 'validation' lists ({err})"
        ) from err
    by_case = {item["case"]: item for item in items}
    unknown = [c for c in train_cases + val_cases if c not in by_case]
    if unknown:
        raise DataError(f"{path}: unknown case(s) {unknown[:5]}")
    if set(train_cases) & set(val_cases):
        raise DataError(f"{path}: case(s) in both train and validation")
    return [by_case[c] for c in train_cases], [by_case[c] for c in val_cases]


def fold_split(
    items: list[dict] | tuple[dict, ...], num_folds: int, fold: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Fold ``fold`` of a K-fold cross-validation, deterministically by seed.

    The items, sorted by case, are permuted by ``seed`` and dealt into ``num_folds`` folds in
    turn, so fold sizes differ by at most one. The K validation sets are disjoint and together
    hold every item; fold k trains on the other K - 1 folds.

    Args:
        items: The labelled items.
        num_folds: Number of folds K, from 2 to the number of items.
        fold: The fold to validate on, in [0, K).
        seed: The folds' seed; the same seed and items give the same folds.

    Returns:
        (train, validation) lists, each sorted by case.

    Raises:
        ValueError: K < 2, K > the number of items, or ``fold`` outside [0, K).
    """
    items = sorted(items, key=lambda item: item["case"])
    n = len(items)
    if num_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got num_folds={num_folds}")
    if num_folds > n:
        raise ValueError(f"cannot deal {n} cases into {num_folds} folds: at most {n} folds")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}) for {num_folds} folds, got {fold}")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[fold::num_folds].tolist())
    train = [item for i, item in enumerate(items) if i not in val_idx]
    val = [item for i, item in enumerate(items) if i in val_idx]
    return train, val


def write_split_file(path: str, train: list[dict], validation: list[dict]) -> str:
    """Writes a split as :func:`read_split_file` reads it, atomically; returns the path.

    Args:
        path: The file to write (``workdir/split.json``).
        train: The training items.
        validation: The validation items.

    Returns:
        ``path``: JSON ``{"train": [cases], "validation": [cases]}`` in the lists' order.
    """
    split = {
        "train": [item["case"] for item in train],
        "validation": [item["case"] for item in validation],
    }
    return write_json(path, split)


def task_split(
    task: MSDTask,
    split_file: str | None = None,
    num_val: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_folds: int = 0,
    fold: int = 0,
) -> tuple[list[dict], list[dict]]:
    """The task's train/validation split.

    In order of precedence: a split file; cross-validation fold ``fold`` of ``num_folds``
    (:func:`fold_split`); an explicit count; the paper's count for the named MSD tasks; a
    fraction.

    Args:
        task: The task.
        split_file: An explicit split (:func:`read_split_file`); None: none.
        num_val: Number of validation cases; None: the paper's count or ``val_fraction``.
        val_fraction: Fraction of validation cases when no count applies.
        seed: The split's (or the folds') seed.
        num_folds: Number of cross-validation folds; 0: no folds.
        fold: The fold to validate on, in [0, num_folds).

    Returns:
        (train, validation) item lists.

    Raises:
        DataError: The split file is unreadable or names unknown cases.
        ValueError: Impossible folds or validation size.
    """
    if split_file:
        return read_split_file(split_file, task.training)
    if num_folds:
        return fold_split(task.training, num_folds, fold, seed=seed)
    if num_val is None:
        num_val = PAPER_VALIDATION_CASES.get(os.path.basename(task.root))
        if num_val is not None and num_val >= len(task.training):
            num_val = None
    return split_items(task.training, num_val=num_val, val_fraction=val_fraction, seed=seed)
