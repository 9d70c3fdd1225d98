"""Tests of tf-medseg-evaluate on NIfTI files written with nibabel into tmp dirs."""

import csv
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tf_medseg.cli import evaluate
from tf_medseg.data.io import DataError

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def dice(pred, true, c):
    """Hand Dice: 2|P and G| / (|P| + |G|), NaN when the class is absent from G."""
    p, g = pred == c, true == c
    return np.nan if not g.any() else 2 * np.count_nonzero(p & g) / (p.sum() + g.sum())


def make_cases(root, shape=(12, 10, 8)):
    """Three cases with classes 1 and 2; case_b has no class 2 in its label."""
    rng = np.random.default_rng(0)
    cases = {}
    for name in ("case_a", "case_b", "case_c"):
        true = np.zeros(shape, dtype=np.uint8)
        true[2:8, 2:7, 1:6] = 1
        if name != "case_b":
            true[8:11, 6:9, 5:7] = 2
        pred = true.copy()
        flips = rng.random(shape) < 0.15
        pred[flips] = rng.integers(0, 3, size=int(flips.sum()))
        save(root / "labels" / f"{name}.nii.gz", true)
        save(root / "preds" / f"{name}.nii.gz", pred)
        cases[name] = (pred, true)
    return cases


def expected_table(cases, num_classes=3):
    names = sorted(cases)
    table = np.array([[dice(*cases[n], c) for c in range(1, num_classes)] for n in names])
    return names, table


def test_per_case_per_class_dice_and_means(tmp_path):
    cases = make_cases(tmp_path)
    names, table = expected_table(cases)
    result = evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert result.cases == tuple(names)
    np.testing.assert_allclose(result.dice, table, rtol=1e-12, equal_nan=True)
    assert np.isnan(result.dice[1, 1])  # case_b has no class 2: excluded, not zero
    # Per class over the cases that contain it; overall the mean of the class means.
    class_means = [table[:, 0].mean(), (table[0, 1] + table[2, 1]) / 2]
    np.testing.assert_allclose(result.class_means, class_means, rtol=1e-12)
    case_means = [table[0].mean(), table[1, 0], table[2].mean()]
    np.testing.assert_allclose(result.case_means, case_means, rtol=1e-12)
    assert result.overall == pytest.approx(np.mean(class_means), rel=1e-12)
    # Here "per case, then over cases" would give another number.
    assert result.overall != pytest.approx(np.mean(case_means), rel=1e-6)


def test_training_validation_and_evaluate_give_the_same_means(tmp_path):
    import tensorflow as tf

    from tf_medseg.training.validation import validate

    cases = make_cases(tmp_path)
    evaluated = evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    shape = next(iter(cases.values()))[0].shape
    # The "model" reads the prediction from the image channel, so validation scores exactly
    # the predicted files.
    items = [
        {"image": cases[n][0][..., None].astype(np.float32), "label": cases[n][1]}
        for n in sorted(cases)
    ]

    def predictor(windows):
        return tf.one_hot(tf.cast(tf.round(windows[..., 0]), tf.int32), 3)

    result = validate(predictor, items, 3, shape, overlap=0.0)
    np.testing.assert_allclose(result.case_dice, evaluated.dice, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.dice, evaluated.class_means, rtol=1e-12)
    assert result.mean_dice == pytest.approx(evaluated.overall, rel=1e-12)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_csv_and_table_from_the_command_line(tmp_path):
    cases = make_cases(tmp_path)
    names, table = expected_table(cases)
    out = tmp_path / "out" / "dice.csv"
    completed = run_cli(
        f"--pred_dir={tmp_path / 'preds'}", f"--label_dir={tmp_path / 'labels'}", f"--csv={out}"
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert lines[0].split() == ["case", "class_1", "class_2", "mean"]
    assert [line.split()[0] for line in lines[1:]] == [*names, "mean"]
    assert lines[2].split()[2] == "nan"
    with out.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["case", "class_1", "class_2", "mean"]
    values = np.array([[float(v) for v in row[1:3]] for row in rows[1:4]])
    np.testing.assert_allclose(values, table, atol=1e-6, equal_nan=True)
    assert rows[-1][0] == "mean"
    result = evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert float(rows[-1][-1]) == pytest.approx(result.overall, abs=1e-6)


def test_num_classes_adds_absent_classes_as_nan(tmp_path):
    cases = make_cases(tmp_path)
    result = evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels", num_classes=4)
    assert result.dice.shape == (3, 3)
    assert np.all(np.isnan(result.dice[:, 2])) and np.isnan(result.class_means[2])
    _, table = expected_table(cases)
    np.testing.assert_allclose(result.dice[:, :2], table, rtol=1e-12, equal_nan=True)


def test_matches_by_case_name_and_ignores_unpredicted_labels(tmp_path):
    true = np.zeros((6, 6, 6), dtype=np.int16)
    true[1:4, 1:4, 1:4] = 1
    pred = np.zeros_like(true)
    pred[1:4, 1:4, 2:5] = 1
    save(tmp_path / "labels" / "liver_1.nii.gz", true)
    save(tmp_path / "labels" / "liver_2.nii.gz", true)
    save(tmp_path / "labels" / "._liver_1.nii.gz", true)  # a hidden resource fork: ignored
    save(tmp_path / "preds" / "liver_1.nii", pred.astype(np.float32))  # .nii, float labels
    result = evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert result.cases == ("liver_1",)
    assert result.dice[0, 0] == pytest.approx(2 * 18 / 54, rel=1e-12)


def test_missing_label_names_the_prediction(tmp_path):
    make_cases(tmp_path)
    save(tmp_path / "preds" / "case_z.nii.gz", np.zeros((12, 10, 8), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="case_z.nii.gz has no label"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


def test_command_line_error_is_a_message_naming_the_file(tmp_path):
    make_cases(tmp_path)
    (tmp_path / "labels" / "case_c.nii.gz").unlink()
    completed = run_cli(f"--pred_dir={tmp_path / 'preds'}", f"--label_dir={tmp_path / 'labels'}")
    assert completed.returncode == 1
    assert "case_c.nii.gz has no label" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_shape_mismatch_names_both_files(tmp_path):
    make_cases(tmp_path)
    save(tmp_path / "preds" / "case_b.nii.gz", np.zeros((12, 10, 9), dtype=np.uint8))
    with pytest.raises(DataError, match=r"case_b.nii.gz has shape \(12, 10, 9\).*case_b"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


def test_affine_mismatch_is_an_error(tmp_path):
    make_cases(tmp_path)
    save(tmp_path / "preds" / "case_a.nii.gz", np.zeros((12, 10, 8), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="different affines"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


def test_bad_label_values_name_the_file(tmp_path):
    make_cases(tmp_path)
    bad = np.zeros((12, 10, 8), dtype=np.float32)
    bad[0, 0, 0] = 0.5
    save(tmp_path / "preds" / "case_c.nii.gz", bad)
    with pytest.raises(DataError, match="case_c.nii.gz: holds non-integer"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    save(tmp_path / "preds" / "case_c.nii.gz", np.full((12, 10, 8), 5, np.uint8))
    with pytest.raises(DataError, match="case_c.nii.gz: holds label 5"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels", num_classes=3)


def test_empty_prediction_folder_is_an_error(tmp_path):
    (tmp_path / "preds").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI predictions"):
        evaluate.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
