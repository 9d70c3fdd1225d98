"""tf-medseg-export: each TensorFlow piece against the NumPy/SimpleITK one it replaces, and the
SavedModel, loaded in a process where tf_medseg and SimpleITK cannot be imported, against
tf-medseg-predict on the synthetic test volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.cli.export import serving_inputs
from tf_medseg.data.msd import load_task, split_items
from tf_medseg.inference.serving import components as serving_components
from tf_medseg.inference.serving import grid as serving_grid
from tf_medseg.inference.serving import module as serving_module
from tf_medseg.inference.serving import spec as serving_spec
from tf_medseg.inference.serving import window as serving_window
from tf_medseg.inference.window import (
    WindowSettings,
    keep_largest_component,
    mean_predictor,
    sliding_window_inference,
    window_starts,
)
from tf_medseg.transforms import PreprocessingConfig, build_preprocessing
from tf_medseg.transforms.spatial import invert_label

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# Run in a fresh interpreter that cannot import tf_medseg or SimpleITK: loads the SavedModel,
# segments each image and compares with predict's label files.
SERVING_CHECK = r"""
import importlib.abc, json, os, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tf_medseg", "SimpleITK"):
            raise ImportError(f"{name} must not be needed by the export")
        return None

sys.meta_path.insert(0, Refuse())
import nibabel as nib
import numpy as np
import tensorflow as tf

export_dir, images, predicted = sys.argv[1:4]
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
rows = []
for name in sorted(os.listdir(images)):
    image = nib.load(os.path.join(images, name))
    data = np.asarray(image.get_fdata(dtype=np.float32))
    data = data[..., None] if data.ndim == 3 else data
    out = serve(image=tf.constant(data), affine=tf.constant(image.affine, tf.float64))
    labels, probs = out["labels"].numpy(), out["probabilities"].numpy()
    expected = np.asarray(nib.load(os.path.join(predicted, name)).dataobj)
    union = (labels > 0) | (expected > 0)
    argmax = np.argmax(probs, axis=-1)
    rows.append({
        "case": name,
        "shape_ok": labels.shape == expected.shape == data.shape[:3],
        "dtypes": [str(labels.dtype), str(probs.dtype)],
        "agreement": float(np.mean(labels == expected)),
        "foreground_agreement": float(np.mean(labels[union] == expected[union])),
        "foreground_voxels": int((expected > 0).sum()),
        "probability_sum_error": float(np.abs(probs.sum(-1) - 1).max()),
        "labels_follow_argmax": bool(np.all((labels == argmax) | (labels == 0))),
    })
print("ROWS", json.dumps(rows))
print("LOADED", sorted(m for m in sys.modules if m.startswith(("tf_medseg", "SimpleITK"))))
"""


SETTINGS = WindowSettings(
    roi_size=(16, 16, 16), overlap=0.25, mode="constant", sw_batch_size=2, keep_largest=False
)


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    m = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


@pytest.mark.parametrize(
    "direction",
    [
        np.diag([-0.8, -0.8, 2.5]),
        np.diag([1.0, 1.0, 1.0])[[2, 0, 1]] * [0.7, 1.5, 3.0],
        np.diag([-1.0, 1.0, -1.0])[[1, 2, 0]] * [1.2, 0.9, 4.0],
        _rotation(2, 30) @ np.diag([0.8, 0.8, 5.0]),
        _rotation(0, 50) @ _rotation(1, -20) @ np.diag([-1.0, 0.5, 2.0]),
    ],
    ids=["lps", "permuted", "permuted-flipped", "rotated-30", "oblique"],
)
def test_orientation_is_nibabels(direction):
    affine = np.eye(4)
    affine[:3, :3] = direction
    axes, flips = serving_grid.orientation(tf.constant(affine))
    expected = nib.orientations.io_orientation(affine)
    np.testing.assert_array_equal(axes.numpy(), expected[:, 0])
    np.testing.assert_array_equal(flips.numpy(), expected[:, 1])


@pytest.mark.parametrize(
    ("task_fixture", "spacing", "margin"),
    [("spleen_task_dir", 2.0, 8), ("spleen_task_dir", 0.7, 0), ("heart_task_dir", 1.5, 8)],
    ids=["ct-2mm", "ct-0.7mm-cropped", "mri-2-channels"],
)
def test_preprocessing_and_the_way_back_equal_predicts(request, task_fixture, spacing, margin):
    task = load_task(request.getfixturevalue(task_fixture))
    train, _ = split_items(list(task.training), num_val=1, seed=0)
    chain = build_preprocessing(
        task, train, PreprocessingConfig(spacing=(spacing,) * 3, crop_margin=margin), progress=False
    )
    spec = serving_spec.spec_from_chain(chain, SETTINGS)
    item = task.training[0]
    expected = chain({"case": item["case"], "image": item["image"]})
    image, affine = serving_inputs(item["image"])
    volume, geometry = serving_module.ServingModule([], spec).preprocess(
        tf.constant(image), tf.constant(affine)
    )
    assert volume.shape == expected["image"].shape
    # float32 interpolation here, double in SimpleITK: a few 1e-6 of the normalised range
    np.testing.assert_allclose(volume.numpy(), expected["image"], atol=1e-4)
    if margin == 0:
        assert expected["geometry"]["steps"][-1]["op"] == "crop"  # the crop is exercised

    # The way back: a label blob in the preprocessed grid, as invert_label puts it back.
    shape = expected["image"].shape[:3]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    label = (np.linalg.norm((grid - np.array(shape) / 2) / np.array(shape), axis=-1) < 0.3) * 1
    label[: shape[0] // 3] *= 2
    pads = tf.stack([geometry["start"], geometry["new_shape"] - geometry["stop"]], axis=1)
    back = serving_grid.back_to_source_grid(
        tf.pad(label.astype(np.int32), pads), geometry, spec.spacing
    )
    reference = invert_label(label, expected["geometry"])
    assert back.shape == reference.shape == image.shape[:3]
    # Only ties of the nearest-neighbour rounding can differ (SimpleITK's own arithmetic).
    assert np.mean(back.numpy() == reference) >= 0.995


@pytest.mark.parametrize(
    ("size", "roi", "overlap"),
    [
        ((40, 33, 16), (16, 16, 16), 0.25),
        ((50, 16, 20), (16, 16, 8), 4),
        ((16, 16, 16), (16,) * 3, 0.5),
    ],
)
def test_window_corners_are_window_starts(size, roi, overlap):
    corners = serving_window.window_corners(tf.constant(size), roi, overlap).numpy()
    assert [tuple(c) for c in corners] == window_starts(size, roi, overlap)


def _position_dependent(windows):
    """Softmax of the window's values and a ramp along the window's first axis: a prediction
    that depends on where a voxel sits in its window, so that misplaced windows show."""
    ramp = tf.reshape(tf.linspace(-1.0, 1.0, windows.shape[1]), [1, -1, 1, 1, 1])
    return tf.nn.softmax(tf.concat([windows[..., :1] + ramp, -windows[..., :1]], -1))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_sliding_window_equals_the_numpy_one(mode):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(37, 20, 12, 1)).astype(np.float32)  # z smaller than the window
    spec = serving_spec.ServingSpec(
        num_channels=1,
        num_classes=2,
        spacing=None,
        threshold=None,
        margin=0,
        normalise="mri",
        ct_lower=(),
        ct_upper=(),
        window=WindowSettings((16, 16, 16), 0.25, mode, 3, False),
        tta=False,
    )
    got = serving_window.sliding_window(tf.constant(volume), _position_dependent, spec).numpy()
    expected = sliding_window_inference(
        volume[None], _position_dependent, (16, 16, 16), 0.25, mode, sw_batch_size=3
    )[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_ensemble_with_mirroring_is_predicts_mean():
    tf.keras.utils.set_random_seed(0)
    models = []
    for _ in range(2):
        inputs = tf.keras.Input((8, 8, 8, 1))
        x = tf.keras.layers.Conv3D(2, 3, padding="same")(inputs)
        models.append(tf.keras.Model(inputs, tf.keras.layers.Softmax()(x)))
    window = WindowSettings((8, 8, 8), 0.5, "constant", 2, False)
    spec = serving_spec.ServingSpec(1, 2, None, None, 0, "mri", (), (), window, True)
    windows = tf.random.normal((2, 8, 8, 8, 1), seed=1)
    got = serving_module.ServingModule(models, spec).predict_windows(windows).numpy()
    expected = mean_predictor(models, tta=True)(windows)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_largest_component_is_simpleitks():
    rng = np.random.default_rng(1)
    labels = np.zeros((30, 26, 20), np.int32)
    for value, count in ((1, 6), (2, 4)):
        for k in range(count):  # blobs of different sizes, some touching diagonally only
            centre = rng.integers(3, [27, 23, 17])
            radius = 1 + k
            box = tuple(slice(max(c - radius, 0), c + radius + 1) for c in centre)
            labels[box] = value
    labels[0, 0, 0], labels[1, 1, 1] = 1, 1  # two voxels joined by a corner
    got = serving_components.keep_largest(tf.constant(labels), 3).numpy()
    np.testing.assert_array_equal(got, keep_largest_component(labels))
    # A winding one-voxel path (the longest way a label travels) beside a compact blob 2 smaller.
    snake = np.zeros((24, 24, 6), np.int32)
    snake[::2, :22, 1] = 1
    for row in range(0, 22, 2):
        snake[row + 1, 21 if row % 4 == 0 else 0, 1] = 1
    size = int(snake.sum())
    snake[:, :, 4].flat[: size - 2] = 1  # a slab of 2 rows and a bit: one component
    got = serving_components.keep_largest(tf.constant(snake), 2).numpy()
    np.testing.assert_array_equal(got, keep_largest_component(snake))
    assert got[:, :, 1].sum() == size and not got[:, :, 4].any()
    tie = np.zeros((10, 10, 10), np.int32)
    tie[6:8, 1:3, 1:3], tie[1:3, 6:8, 6:8] = 1, 1  # equal sizes: the first in C order stays
    np.testing.assert_array_equal(
        serving_components.keep_largest(tf.constant(tie), 2).numpy(), keep_largest_component(tie)
    )
    assert not serving_components.largest_component(tf.zeros((4, 4, 4), tf.bool)).numpy().any()


def test_an_unknown_chain_is_refused():
    from tf_medseg.transforms.base import Compose
    from tf_medseg.transforms.load import LoadImage

    with pytest.raises(serving_spec.ExportError, match="reorient"):
        serving_spec.spec_from_chain(Compose([LoadImage(1, 2)]), SETTINGS)


def test_the_saved_model_serves_what_predict_writes_without_tf_medseg(trained, tmp_path):
    """The whole of predict in the SavedModel: loaded where tf_medseg and SimpleITK cannot be
    imported, its labels agree with tf-medseg-predict's on the synthetic test volume."""
    images = os.path.join(trained["data"], "imagesTs")
    out, predicted = str(tmp_path / "export"), str(tmp_path / "predicted")
    model = trained["workdir"]
    run = [sys.executable, "-m"]
    result = subprocess.run(
        [
            *run,
            "tf_medseg.cli.export",
            f"--model={model}",
            f"--out={out}",
            "--keep_largest",
            f"--check={images}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "serving_default(image float32 [X, Y, Z, 1]" in result.stdout
    checks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # Every voxel as predict's, as the README claims: the spleen is 1-3% of the volume, so a
    # share of all voxels below 1 could hide a missing spleen.
    assert len(checks) == 1 and checks[0]["agreement"] == 1.0, checks
    assert checks[0]["foreground_agreement"] == 1.0, checks
    result = subprocess.run(
        [
            *run,
            "tf_medseg.cli.predict",
            f"--model={model}",
            f"--input={images}",
            f"--output={predicted}",
            "--keep_largest",
            "--progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-c", SERVING_CHECK, out, images, predicted],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = json.loads(next(line for line in lines if line.startswith("ROWS "))[5:])
    assert next(line for line in lines if line.startswith("LOADED ")) == "LOADED []"
    assert len(rows) == 1
    for row in rows:
        assert row["shape_ok"] and row["dtypes"] == ["uint8", "float32"]
        assert row["foreground_voxels"] > 100  # the model found the spleen
        assert row["agreement"] == 1.0, row
        assert row["foreground_agreement"] == 1.0, row
        assert row["probability_sum_error"] < 1e-4
        assert row["labels_follow_argmax"]


def test_exporting_over_a_saved_model_is_one_line(trained, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "saved_model.pb").write_bytes(b"")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.export",
            f"--model={trained['workdir']}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("tf-medseg-export:")
    assert "already holds a SavedModel" in result.stderr


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained spleen model's export (one CT channel), loaded, and a test image with its
    affine as the signature takes them."""
    from tf_medseg.inference.segmenter import Segmenter

    out = str(tmp_path_factory.mktemp("serving") / "export")
    serving_module.export_segmenter(Segmenter.load(trained["workdir"]), out)
    images = os.path.join(trained["data"], "imagesTs")
    image, affine = serving_inputs(os.path.join(images, sorted(os.listdir(images))[0]))
    return tf.saved_model.load(out).signatures["serving_default"], image, affine


def _bad_two_channels(image, affine):
    return np.concatenate([image, image], axis=-1), affine


def _bad_no_channel_axis(image, affine):
    return image[..., 0], affine


def _bad_nan(image, affine):
    image = image.copy()
    image[10:12, 10:12, 5] = np.nan
    return image, affine


def _bad_infinite(image, affine):
    image = image.copy()
    image[0, 0, 0] = np.inf
    return image, affine


def _bad_singular_affine(image, affine):
    affine = affine.copy()
    affine[:3, 1] = affine[:3, 0] * 2.0  # the second voxel axis along the first
    return image, affine


def _bad_flat_affine(image, affine):
    affine = affine.copy()
    affine[:3, 2] = 0.0
    return image, affine


def _bad_nan_affine(image, affine):
    affine = affine.copy()
    affine[0, 3] = np.nan
    return image, affine


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (_bad_two_channels, r"image must be \[X, Y, Z, 1\].*shape\] \[\d+ \d+ \d+ 2\]"),
        (_bad_no_channel_axis, r"image must be \[X, Y, Z, 1\]"),
        (_bad_nan, "image holds NaN or infinite intensities"),
        (_bad_infinite, "image holds NaN or infinite intensities"),
        (_bad_singular_affine, "affine is not invertible"),
        (_bad_flat_affine, "affine is not invertible"),
        (_bad_nan_affine, "affine holds NaN or infinite values"),
    ],
    ids=["two-channels", "no-channel-axis", "nan", "infinite", "singular", "flat", "nan-affine"],
)
def test_the_saved_model_refuses_bad_inputs_naming_them(exported, make_bad, message):
    """A wrong channel count, NaN or infinite intensities and an affine that is not invertible
    stop the serving graph with a message that names the input, instead of labels of garbage
    (a loaded signature does not enforce its declared channel count)."""
    serve, image, affine = exported
    bad_image, bad_affine = make_bad(image, affine)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve(image=tf.constant(bad_image), affine=tf.constant(bad_affine))
