"""tf-medseg-predict end to end: train briefly on a synthetic spleen, segment its test volume.

The trained workdir (conftest's ``trained``) is shared with tests/test_export.py (one training:
15-40 s on the 2 shared cores, depending on their load).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tf_medseg.config import TrainConfig
from tf_medseg.data.io import DataError, read_nifti, write_nifti
from tf_medseg.data.msd import load_task, split_items
from tf_medseg.inference.segmenter import list_inputs
from tf_medseg.inference.window import window_settings
from tf_medseg.metrics import dice_per_class
from tf_medseg.transforms import PreprocessingConfig, build_preprocessing
from tf_medseg.transforms.preprocessing import preprocessing_from_config


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_predict_writes_labels_in_the_input_geometry_then_evaluate_scores_them(trained):
    data, out = trained["data"], str(trained["root"] / "predictions")
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={trained['workdir']}",
        f"--input={os.path.join(data, 'imagesTs')}",
        f"--output={out}",
        "--keep_largest",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (case,) = [n for n in os.listdir(os.path.join(data, "imagesTs"))]
    # One log line per volume with its seconds by stage.
    (timing,) = [line for line in result.stderr.splitlines() if "(load " in line]
    total, parts = timing.split(": ", 1)[1].split(" s (", 1)
    stages = re.findall(r"(\w+) (\d+\.\d+) s", parts)
    names = [name for name, _ in stages]
    assert names[0] == "load" and names[-4:] == ["windows", "components", "back", "write"]
    assert {"reorient", "resample", "normalise"} <= set(names)
    assert float(total) == pytest.approx(sum(float(x) for _, x in stages), abs=0.01 * len(stages))
    image = read_nifti(os.path.join(data, "imagesTs", case))
    label = read_nifti(os.path.join(data, "labelsTs", case))
    pred = read_nifti(os.path.join(out, case))
    assert sorted(os.listdir(out)) == [case]
    assert pred.data.dtype == np.uint8
    assert pred.data.shape == image.data.shape
    assert np.allclose(pred.affine, image.affine, atol=1e-6)
    assert set(np.unique(pred.data)) <= {0, 1}
    dice = dice_per_class(pred.data, label.data, 2)[0]
    assert dice >= 0.8, f"Dice {dice:.3f} of the prediction on the synthetic test volume"

    table = str(trained["root"] / "dice.csv")
    scored = _cli(
        "tf_medseg.cli.evaluate",
        f"--pred_dir={out}",
        f"--label_dir={os.path.join(data, 'labelsTs')}",
        f"--csv={table}",
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    rows = list(csv.reader(open(table)))
    assert rows[0] == ["case", "class_1", "mean"]
    assert rows[1][0] == case.removesuffix(".nii.gz")
    assert float(rows[1][1]) == pytest.approx(dice, abs=1e-6)
    assert float(rows[-1][-1]) == pytest.approx(dice, abs=1e-6)


def test_channel_mismatch_is_refused_in_one_line_before_anything_is_written(trained):
    data, root = trained["data"], trained["root"]
    inputs = root / "mixed"
    (case,) = os.listdir(os.path.join(data, "imagesTs"))
    good = read_nifti(os.path.join(data, "imagesTs", case))
    write_nifti(str(inputs / case), good.data, good.affine)
    bad = str(inputs / "two_channels.nii.gz")
    write_nifti(bad, np.stack([good.data, good.data], axis=-1), good.affine)
    out = root / "refused"
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={os.path.join(trained['workdir'], 'best_model.keras')}",
        f"--input={inputs}",
        f"--output={out}",
    )
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("tf-medseg-predict:")]
    assert len(ours) == 1 and "Traceback" not in result.stderr
    assert bad in ours[0] and "2 channel(s)" in ours[0] and "takes 1 (CT)" in ours[0]
    assert not out.exists() or not os.listdir(out)


def _second_model(trained, name, scale=0.05):
    """A copy of the trained workdir whose model's weights are perturbed: another model of the
    same preprocessing and classes, as a second fold would be."""
    import tensorflow as tf

    folder = trained["root"] / name
    if not folder.exists():
        shutil.copytree(trained["workdir"], folder, ignore=shutil.ignore_patterns("checkpoints"))
        model = tf.keras.models.load_model(folder / "best_model.keras", compile=False)
        rng = np.random.default_rng(5)
        for variable in model.trainable_variables:
            noise = rng.normal(scale=scale, size=variable.shape) * np.std(variable.numpy())
            variable.assign_add(noise.astype(variable.dtype.as_numpy_dtype))
        model.save(folder / "best_model.keras")
    return str(folder)


def test_an_ensemble_averages_the_models_probabilities(trained):
    import tensorflow as tf

    from tf_medseg.inference.segmenter import Segmenter

    other = _second_model(trained, "fold_b")
    one, two = Segmenter.load(trained["workdir"]), Segmenter.load(other)
    both = Segmenter.load(f"{trained['workdir']},{other}")
    assert both.num_models == 2 and both.settings == one.settings
    windows = tf.random.stateless_normal((one.settings.sw_batch_size, 24, 24, 24, 1), (1, 2))
    p1, p2 = one.predictor(windows), two.predictor(windows)
    assert not np.allclose(p1, p2, atol=1e-3)
    np.testing.assert_allclose(both.predictor(windows), (p1 + p2) / 2, atol=1e-6)
    tta = Segmenter.load([trained["workdir"], other], tta=True)
    assert tta.tta and not np.allclose(tta.predictor(windows), both.predictor(windows), atol=1e-4)


def test_ensemble_with_tta_from_the_command_line_segments_the_test_volume(trained):
    data, out = trained["data"], str(trained["root"] / "ensemble_tta")
    other = _second_model(trained, "fold_b")
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={trained['workdir']},{other}",
        f"--input={os.path.join(data, 'imagesTs')}",
        f"--output={out}",
        "--tta",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (case,) = os.listdir(os.path.join(data, "imagesTs"))
    pred = read_nifti(os.path.join(out, case))
    label = read_nifti(os.path.join(data, "labelsTs", case))
    assert dice_per_class(pred.data, label.data, 2)[0] >= 0.8


def test_an_ensemble_of_other_preprocessing_is_refused_in_one_line(trained):
    other = trained["root"] / "other_spacing"
    shutil.copytree(trained["workdir"], other, ignore=shutil.ignore_patterns("checkpoints"))
    path = other / "preprocessing.json"
    path.write_text(path.read_text().replace("2.0", "1.5"))
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={trained['workdir']},{other}",
        f"--input={os.path.join(trained['data'], 'imagesTs')}",
        f"--output={trained['root'] / 'refused_ensemble'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tf-medseg-predict: ") and "preprocessing.json differs" in last


def test_models_of_other_seeds_ensemble_the_sampler_settings_are_not_compared(trained):
    """preprocessing.json holds the patch sampler's seed (ForegroundIndices, which acts on the
    label alone and does not run in prediction): models of other seeds share what an image
    goes through, and predict together."""
    from tf_medseg.inference.segmenter import Segmenter

    other = trained["root"] / "other_seed"
    shutil.copytree(trained["workdir"], other, ignore=shutil.ignore_patterns("checkpoints"))
    path = other / "preprocessing.json"
    chain = json.loads(path.read_text())
    (entry,) = [t for t in chain["transforms"] if t["name"] == "ForegroundIndices"]
    entry["seed"] += 1
    path.write_text(json.dumps(chain))
    assert Segmenter.load(f"{trained['workdir']},{other}").num_models == 2


def test_missing_model_is_one_line(tmp_path):
    image = str(tmp_path / "a.nii.gz")
    write_nifti(image, np.zeros((4, 4, 4), np.int16), np.eye(4))
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={tmp_path / 'nowhere'}",
        f"--input={image}",
        f"--output={tmp_path / 'out'}",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("tf-medseg-predict: ")
    assert "no such model file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("task_fixture", ["spleen_task_dir", "heart_task_dir"])
def test_chain_rebuilt_from_its_json_gives_the_same_item(request, task_fixture):
    task = load_task(request.getfixturevalue(task_fixture))
    train, _ = split_items(list(task.training), num_val=1, seed=0)
    chain = build_preprocessing(
        task, train, PreprocessingConfig(spacing=(2.0, 2.0, 2.0)), progress=False
    )
    rebuilt = preprocessing_from_config(json.loads(json.dumps(chain.config())))
    assert rebuilt.config() == chain.config()
    assert rebuilt.config_fingerprint() == chain.config_fingerprint()
    item = dict(task.training[0])
    expected, got = chain(dict(item)), rebuilt(dict(item))
    assert sorted(got) == sorted(expected)
    for key in ("image", "label", "fg_indices", "bg_indices"):
        assert got[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(got[key], expected[key])
    assert got["geometry"] == expected["geometry"]
    unlabelled = rebuilt({"case": item["case"], "image": item["image"]})
    assert "label" not in unlabelled and "fg_indices" not in unlabelled
    np.testing.assert_array_equal(unlabelled["image"], expected["image"])


def test_chain_json_with_an_unknown_transform_is_rejected():
    with pytest.raises(ValueError, match="unknown transform 'Sharpen'"):
        preprocessing_from_config({"transforms": [{"name": "Sharpen"}]})
    with pytest.raises(ValueError, match="bad settings for Resample"):
        preprocessing_from_config({"transforms": [{"name": "Resample", "size": 3}]})


def test_window_settings_come_from_the_config_unless_overridden():
    config = TrainConfig(depth=2, val_roi_size=(32, 32, 16), val_overlap=8.0, val_keep_largest=True)
    settings = window_settings(config)
    assert settings.roi_size == (32, 32, 16)
    assert settings.overlap == 8 and isinstance(settings.overlap, int)  # voxels
    assert settings.keep_largest and settings.mode == "constant"
    settings = window_settings(
        config, roi_size=["48"], overlap=0.25, mode="gaussian", keep_largest=False
    )
    assert settings.roi_size == (48, 48, 48) and settings.overlap == 0.25
    assert settings.mode == "gaussian" and not settings.keep_largest
    with pytest.raises(ValueError, match="multiples of 4"):
        window_settings(config, roi_size=["30"])


def test_inputs_are_nifti_files_of_a_folder(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert list_inputs(str(tmp_path)) == [str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="same case 'a'"):
        list_inputs(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .nii"):
        list_inputs(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not a NIfTI"):
        list_inputs(str(tmp_path / "notes.txt"))


def test_a_model_without_its_config_json_is_refused_in_one_line(trained):
    """The window settings are the training run's (config.json); the .keras model takes any
    window size (its spatial input is free), so nothing else says which: no default is guessed."""
    folder = trained["root"] / "no_config"
    shutil.copytree(
        trained["workdir"], folder, ignore=shutil.ignore_patterns("checkpoints", "config.json")
    )
    out = trained["root"] / "no_config_predictions"
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={folder}",
        f"--input={os.path.join(trained['data'], 'imagesTs')}",
        f"--output={out}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tf-medseg-predict: ") and str(folder / "config.json") in last
    assert not out.exists()


def test_five_cross_validation_folds_predict_as_one_ensemble(spleen_task_dir, tmp_path):
    """nnU-Net's workflow: five folds of a CT task, then their ensemble. Each fold trains on
    other cases, but the CT statistics are the data folder's (all its labelled cases), so the
    five share their preprocessing and predict together."""
    from tiny_config import tiny_config

    from tf_medseg.training.loop import Trainer

    folds = [str(tmp_path / f"fold{k}") for k in range(5)]
    for k, workdir in enumerate(folds):
        config = tiny_config(spleen_task_dir, workdir, num_val=0, num_folds=5, fold=k, epochs=1)
        trainer = Trainer(config)
        try:
            trainer.fit()
        finally:
            trainer.close()
    splits = [json.load(open(os.path.join(w, "split.json"))) for w in folds]
    assert len({tuple(s["validation"]) for s in splits}) == 5  # five different folds
    out = tmp_path / "predictions"
    result = _cli(
        "tf_medseg.cli.predict",
        f"--model={','.join(folds)}",
        f"--input={os.path.join(spleen_task_dir, 'imagesTs')}",
        f"--output={out}",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (case,) = os.listdir(os.path.join(spleen_task_dir, "imagesTs"))
    image = read_nifti(os.path.join(spleen_task_dir, "imagesTs", case))
    pred = read_nifti(str(out / case))
    assert os.listdir(out) == [case] and pred.data.shape == image.data.shape
    assert pred.data.dtype == np.uint8 and set(np.unique(pred.data)) <= {0, 1}
