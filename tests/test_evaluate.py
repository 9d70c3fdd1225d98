"""Tests of tf-medseg-evaluate on NIfTI files written with nibabel into tmp dirs."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tf_medseg.data.io import DataError
from tf_medseg.inference import scoring

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
    result = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
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


def _reading_model(cases):
    """Validation items of ``cases`` whose "model" reads the prediction from the image channel,
    so that validation scores exactly the predicted files: (shape, items, predictor)."""
    import tensorflow as tf

    items = [
        {"image": cases[n][0][..., None].astype(np.float32), "label": cases[n][1]}
        for n in sorted(cases)
    ]

    def predictor(windows):
        return tf.one_hot(tf.cast(tf.round(windows[..., 0]), tf.int32), 3)

    return next(iter(cases.values()))[0].shape, items, predictor


def test_training_validation_and_evaluate_give_the_same_means(tmp_path):
    from tf_medseg.training.validation import validate

    cases = make_cases(tmp_path)
    evaluated = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    shape, items, predictor = _reading_model(cases)
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
    lines = completed.stdout.strip().split("\n\n")[0].splitlines()  # the Dice table first
    assert lines[0].split() == ["case", "class_1", "class_2", "mean"]
    assert [line.split()[0] for line in lines[1:]] == [*names, "mean"]
    assert lines[2].split()[2] == "nan"
    with out.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["case", "class_1", "class_2", "mean"]
    values = np.array([[float(v) for v in row[1:3]] for row in rows[1:4]])
    np.testing.assert_allclose(values, table, atol=1e-6, equal_nan=True)
    assert rows[-1][0] == "mean"
    result = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert float(rows[-1][-1]) == pytest.approx(result.overall, abs=1e-6)


def test_num_classes_adds_absent_classes_as_nan(tmp_path):
    cases = make_cases(tmp_path)
    result = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels", num_classes=4)
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
    result = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert result.cases == ("liver_1",)
    assert result.dice[0, 0] == pytest.approx(2 * 18 / 54, rel=1e-12)


def test_missing_label_names_the_prediction(tmp_path):
    make_cases(tmp_path)
    save(tmp_path / "preds" / "case_z.nii.gz", np.zeros((12, 10, 8), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="case_z.nii.gz has no label"):
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


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
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


def test_affine_mismatch_is_an_error(tmp_path):
    make_cases(tmp_path)
    save(tmp_path / "preds" / "case_a.nii.gz", np.zeros((12, 10, 8), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="different affines"):
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


def test_bad_label_values_name_the_file(tmp_path):
    make_cases(tmp_path)
    bad = np.zeros((12, 10, 8), dtype=np.float32)
    bad[0, 0, 0] = 0.5
    save(tmp_path / "preds" / "case_c.nii.gz", bad)
    with pytest.raises(DataError, match="case_c.nii.gz: holds non-integer"):
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    save(tmp_path / "preds" / "case_c.nii.gz", np.full((12, 10, 8), 5, np.uint8))
    with pytest.raises(DataError, match="case_c.nii.gz: holds label 5"):
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels", num_classes=3)


def test_empty_prediction_folder_is_an_error(tmp_path):
    (tmp_path / "preds").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI predictions"):
        scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")


# --- The Decathlon's surface metrics (NSD, HD95, ASSD) against a brute-force reference ---


def brute_surface(mask):
    """Surface voxels, one by one: a voxel of the mask with a face neighbour outside the mask or
    outside the array (the mask minus its erosion by the 6-neighbourhood)."""
    points = []
    for voxel in np.argwhere(mask):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = voxel.copy()
                neighbour[axis] += step
                inside = 0 <= neighbour[axis] < mask.shape[axis]
                if not inside or not mask[tuple(neighbour)]:
                    points.append(voxel)
                    break
            else:
                continue
            break
    return np.array(points, dtype=np.float64).reshape(-1, mask.ndim)


def brute_metrics(pred, label, spacing, tolerance):
    """NSD, HD95 and ASSD from all pairwise Euclidean distances (mm) between surface voxels.

    Empty masks as MONAI defines them: both empty NaN; one empty NSD 0, distances inf.
    """
    sp, sl = brute_surface(pred), brute_surface(label)
    if not len(sp) and not len(sl):
        return {"nsd": np.nan, "hd95": np.nan, "assd": np.nan}
    if not len(sp) or not len(sl):
        return {"nsd": 0.0, "hd95": np.inf, "assd": np.inf}
    pairwise = np.sqrt((((sp[:, None, :] - sl[None, :, :]) * np.asarray(spacing)) ** 2).sum(-1))
    to_label, to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
    within = np.count_nonzero(to_label <= tolerance) + np.count_nonzero(to_pred <= tolerance)
    return {
        "nsd": within / (len(to_label) + len(to_pred)),
        "hd95": max(np.percentile(to_label, 95), np.percentile(to_pred, 95)),
        "assd": np.concatenate([to_label, to_pred]).mean(),
    }


def blobs(rng, shape, count, jitter=None):
    """A union of random ellipsoids (or ellipses); ``jitter`` moves a given set instead."""
    grid = np.indices(shape, dtype=np.float64)
    params = jitter or [
        (rng.uniform(1, np.array(shape) - 2), rng.uniform(1.0, np.array(shape) / 3))
        for _ in range(count)
    ]
    mask = np.zeros(shape, dtype=bool)
    moved = []
    for centre, radii in params:
        if jitter is not None:
            centre = centre + rng.normal(0, 0.8, size=len(shape))
            radii = np.maximum(radii + rng.normal(0, 0.5, size=len(shape)), 0.6)
        moved.append((centre, radii))
        offsets = [(g - c) / r for g, c, r in zip(grid, centre, radii, strict=True)]
        mask |= sum(o**2 for o in offsets) <= 1
    return mask, moved


SURFACE_CASES = [
    # shape, spacing (mm), NSD tolerance (mm)
    ((14, 12, 9), (1.0, 1.0, 1.0), 1.5),
    ((16, 16, 7), (0.7, 0.7, 5.0), 2.2),
    ((12, 13, 10), (1.5, 0.8, 2.5), 3.1),
    ((20, 17), (0.9, 3.3), 1.7),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, spacing, tolerance", SURFACE_CASES)
def test_surface_metrics_match_a_brute_force_reference(shape, spacing, tolerance, seed):
    from tf_medseg import surface_metrics

    rng = np.random.default_rng(seed)
    label, params = blobs(rng, shape, count=2)
    pred, _ = blobs(rng, shape, count=0, jitter=params)
    pred[tuple(rng.integers(0, shape))] = True  # a stray false positive, far or near
    expected = brute_metrics(pred, label, spacing, tolerance)
    got = surface_metrics.surface_distances(pred, label, spacing)
    assert got.nsd(tolerance) == pytest.approx(expected["nsd"], rel=1e-12, nan_ok=True)
    assert got.hausdorff(95) == pytest.approx(expected["hd95"], rel=1e-6, nan_ok=True)
    assert got.assd() == pytest.approx(expected["assd"], rel=1e-6, nan_ok=True)
    assert expected["hd95"] > 0  # not a degenerate comparison: the shapes differ


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 5.0)])
def test_empty_masks_follow_monai(spacing):
    from tf_medseg import surface_metrics

    empty = np.zeros((6, 5, 4), dtype=bool)
    blob = empty.copy()
    blob[1:4, 1:4, 1:3] = True
    both = surface_metrics.surface_distances(empty, empty, spacing)
    assert np.isnan(both.nsd(2.0)) and np.isnan(both.hausdorff()) and np.isnan(both.assd())
    for pred, label in ((empty, blob), (blob, empty)):
        one = surface_metrics.surface_distances(pred, label, spacing)
        assert one.nsd(100.0) == 0.0
        assert one.hausdorff() == np.inf and one.assd() == np.inf
        assert brute_metrics(pred, label, spacing, 100.0) == {
            "nsd": 0.0,
            "hd95": np.inf,
            "assd": np.inf,
        }


def test_single_voxels_on_an_anisotropic_grid():
    from tf_medseg import surface_metrics

    spacing = (0.7, 0.7, 5.0)
    pred = np.zeros((4, 4, 6), dtype=bool)
    label = pred.copy()
    pred[1, 2, 1] = True
    label[1, 2, 3] = True  # two slices further: 10 mm
    apart = surface_metrics.surface_distances(pred, label, spacing)
    assert apart.hausdorff() == pytest.approx(10.0, rel=1e-6)
    assert apart.assd() == pytest.approx(10.0, rel=1e-6)
    assert apart.nsd(9.9) == 0.0 and apart.nsd(10.0) == 1.0
    same = surface_metrics.surface_distances(label, label, spacing)
    assert (same.nsd(0.0), same.hausdorff(), same.assd()) == (1.0, 0.0, 0.0)
    label[3, 3, 3] = True  # a second label voxel: distances of 10 and about 10.2 mm
    both = surface_metrics.surface_distances(pred, label, spacing)
    expected = brute_metrics(pred, label, spacing, 10.2)
    assert both.assd() == pytest.approx(expected["assd"], rel=1e-6)
    assert both.nsd(10.2) == expected["nsd"]


def test_offset_planes_give_hand_computed_distances():
    """A 4 x 4 plane of label voxels and the 2 x 4 half of it two slices up (z spacing 5 mm).

    Every voxel of a one-voxel-thick plane is a surface voxel. Prediction to label: 8 distances
    of 10 mm. Label to prediction: 8 of 10 mm (under the prediction), 4 of sqrt(0.7^2 + 10^2)
    and 4 of sqrt(1.4^2 + 10^2) mm (one and two rows beside it).
    """
    from tf_medseg import surface_metrics

    sx, sz = 0.7, 5.0
    label = np.zeros((6, 6, 6), dtype=bool)
    pred = label.copy()
    label[1:5, 1:5, 1] = True
    pred[1:3, 1:5, 3] = True
    near, far = np.hypot(sx, 2 * sz), np.hypot(2 * sx, 2 * sz)
    got = surface_metrics.surface_distances(pred, label, (sx, sx, sz))
    # 16 sorted label-to-prediction distances: the 95th percentile falls between two "far".
    assert got.hausdorff() == pytest.approx(far, rel=1e-6)
    assert got.assd() == pytest.approx((16 * 2 * sz + 4 * near + 4 * far) / 24, rel=1e-6)
    assert got.nsd(10.01) == pytest.approx(16 / 24)  # 2 slices of 5 mm: 10 mm and more
    assert got.nsd(near) == pytest.approx(20 / 24)  # a distance equal to the tolerance counts
    assert got.nsd(far) == 1.0


def test_surface_metrics_per_class_uses_each_class_tolerance():
    from tf_medseg import surface_metrics

    rng = np.random.default_rng(7)
    spacing = (0.8, 0.8, 2.5)
    label = np.zeros((14, 12, 8), dtype=np.int16)
    label[blobs(rng, label.shape, 2)[0]] = 1
    label[2:5, 2:5, 2:4] = 2
    pred = np.roll(label, 1, axis=2)
    pred[pred == 2] = 0  # class 2 missed: NSD 0, distances inf
    got = surface_metrics.surface_metrics_per_class(pred, label, 4, spacing, [2.5, 1.0, 1.0])
    expected = brute_metrics(pred == 1, label == 1, spacing, 2.5)
    assert got["nsd"][0] == pytest.approx(expected["nsd"], rel=1e-12)
    assert got["hd95"][0] == pytest.approx(expected["hd95"], rel=1e-6)
    assert got["assd"][0] == pytest.approx(expected["assd"], rel=1e-6)
    assert (got["nsd"][1], got["hd95"][1], got["assd"][1]) == (0.0, np.inf, np.inf)
    assert all(np.isnan(got[m][2]) for m in ("nsd", "hd95", "assd"))  # class 3: nowhere
    with pytest.raises(ValueError, match="2 NSD tolerances for 3 foreground classes"):
        surface_metrics.surface_metrics_per_class(pred, label, 4, spacing, [1.0, 2.0])


def test_json_has_every_case_and_class_from_the_command_line(tmp_path):
    from tf_medseg.data.io import write_nifti

    spacing = (0.7, 0.7, 5.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-40.0, 12.0, 3.0)
    rng = np.random.default_rng(3)
    cases = {}
    for name in ("case_a", "case_b"):
        label = np.zeros((14, 12, 8), dtype=np.uint8)
        label[blobs(rng, label.shape, 2)[0]] = 1
        label[9:12, 8:11, 4:6] = 2
        pred = np.roll(label, 1, axis=0)
        if name == "case_b":
            pred[pred == 2] = 0  # class 2 missed: Dice 0, NSD 0, distances "inf"
        write_nifti(str(tmp_path / "labels" / f"{name}.nii.gz"), label, affine)
        write_nifti(str(tmp_path / "preds" / f"{name}.nii.gz"), pred, affine)
        cases[name] = (pred, label)
    out = tmp_path / "out" / "metrics.json"
    completed = run_cli(
        f"--pred_dir={tmp_path / 'preds'}",
        f"--label_dir={tmp_path / 'labels'}",
        f"--json={out}",
        "--nsd_tolerance_mm=1.5,3",
    )
    assert completed.returncode == 0, completed.stderr
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    report = json.loads(text)
    assert report["metrics"] == ["dice", "nsd", "hd95", "assd"]
    assert report["nsd_tolerance_mm"] == {"1": 1.5, "2": 3.0}
    assert sorted(report["cases"]) == ["case_a", "case_b"]
    for name, (pred, label) in cases.items():
        assert sorted(report["cases"][name]) == ["1", "2"]
        for cls, tolerance in ((1, 1.5), (2, 3.0)):
            got = report["cases"][name][str(cls)]
            assert sorted(got) == ["assd", "dice", "hd95", "nsd"]
            assert got["dice"] == pytest.approx(dice(pred, label, cls), rel=1e-12)
            expected = brute_metrics(pred == cls, label == cls, spacing, tolerance)
            if np.isinf(expected["hd95"]):
                assert (got["nsd"], got["hd95"], got["assd"]) == (0.0, "inf", "inf")
            else:
                assert got["nsd"] == pytest.approx(expected["nsd"], rel=1e-12)
                assert got["hd95"] == pytest.approx(expected["hd95"], rel=1e-6)
                assert got["assd"] == pytest.approx(expected["assd"], rel=1e-6)
    means = report["means"]
    a1, b1 = report["cases"]["case_a"]["1"], report["cases"]["case_b"]["1"]
    assert means["classes"]["1"]["nsd"] == pytest.approx((a1["nsd"] + b1["nsd"]) / 2)
    assert means["classes"]["2"]["hd95"] == "inf"  # one infinite case: an infinite mean
    overall_nsd = (means["classes"]["1"]["nsd"] + means["classes"]["2"]["nsd"]) / 2
    assert means["overall"]["nsd"] == pytest.approx(overall_nsd)
    # The Dice table comes first, as before; then one table per surface metric.
    blocks = completed.stdout.strip().split("\n\n")
    assert blocks[0].splitlines()[0].split() == ["case", "class_1", "class_2", "mean"]
    titles = [block.splitlines()[0] for block in blocks[1:]]
    assert titles == ["NSD (surface Dice) at 1.5, 3 mm", "HD95 (mm)", "ASSD (mm)"]


def test_dice_only_skips_the_surface_metrics(tmp_path):
    make_cases(tmp_path)
    out = tmp_path / "dice.json"
    args = (f"--pred_dir={tmp_path / 'preds'}", f"--label_dir={tmp_path / 'labels'}")
    completed = run_cli(*args, f"--json={out}", "--metrics=dice")
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    assert report["metrics"] == ["dice"] and report["nsd_tolerance_mm"] is None
    assert report["cases"]["case_a"]["1"].keys() == {"dice"}
    assert "\n\n" not in completed.stdout.strip()  # the Dice table alone
    result = scoring.evaluate_dirs(tmp_path / "preds", tmp_path / "labels")
    assert result.surface == {}  # the Python API's default is Dice alone too


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--metrics=dice,hd100", "unknown metric hd100; choose from dice,nsd,hd95,assd"),
        ("--nsd_tolerance_mm=-1", "--nsd_tolerance_mm=-1: give one distance in mm"),
        ("--nsd_tolerance_mm=two", "--nsd_tolerance_mm=two: give one distance in mm"),
        ("--nsd_tolerance_mm=1,2,3", "has 3 values for --num_classes=3"),
    ],
)
def test_bad_metric_flags_are_one_line_and_exit_2(tmp_path, flag, message):
    make_cases(tmp_path)
    args = (f"--pred_dir={tmp_path / 'preds'}", f"--label_dir={tmp_path / 'labels'}")
    completed = run_cli(*args, "--num_classes=3", flag)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith("tf-medseg-evaluate: ") and message in completed.stderr


def test_training_validation_gives_evaluates_surface_metrics(tmp_path):
    """--val_metrics: validation's per-class NSD, HD95 and ASSD are tf-medseg-evaluate's class
    means of the same predictions (the model reads them from the image channel), at the labels'
    spacing."""

    from tf_medseg.training.validation import SurfaceOptions, validate

    cases = make_cases(tmp_path)
    names = ("nsd", "hd95", "assd")
    evaluated = scoring.evaluate_dirs(
        tmp_path / "preds", tmp_path / "labels", metric_names=names, nsd_tolerance_mm=1.5
    )
    shape, items, predictor = _reading_model(cases)
    spacing = tuple(float(s) for s in np.abs(np.diag(AFFINE)[:3]))
    surface = SurfaceOptions(names, spacing, 1.5)
    result = validate(predictor, items, 3, shape, overlap=0.0, surface=surface)
    assert set(result.surface) == set(names)
    for name in names:
        means = [np.nanmean(evaluated.surface[name][:, c]) for c in range(2)]
        np.testing.assert_allclose(result.surface[name], means, rtol=1e-9)
    assert 0.0 <= result.surface["nsd"].min() <= result.surface["nsd"].max() <= 1.0
    assert validate(predictor, items, 3, shape, overlap=0.0).surface == {}
