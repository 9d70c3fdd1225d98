"""Deterministic transforms against NumPy references, on tiny volumes written as NIfTI."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tf_medseg.data.io import DataError, read_nifti, write_nifti
from tf_medseg.data.msd import load_task, split_items
from tf_medseg.transforms import (
    Compose,
    PreprocessingConfig,
    Transform,
    build_preprocessing,
)
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.intensity import NormalizeCT, NormalizeMRI
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.spatial import (
    CropForeground,
    Orientation,
    Resample,
    ResampleAndCrop,
    invert_label,
)


class _Det(Transform):
    def __init__(self, k=1):
        self.k = k

    def config(self):
        return {"k": self.k}

    def __call__(self, data):
        return {**data, "x": data.get("x", 0) + self.k}


def test_a_chain_applies_its_transforms_in_order_and_nests():
    chain = Compose([_Det(), Compose([_Det(), _Det()])])
    assert chain({"x": 0}) == {"x": 3} and len(chain) == 2
    assert chain.config()["transforms"][1]["name"] == "Compose"


def test_fingerprint_changes_with_settings():
    assert Compose([_Det(1)]).config_fingerprint() == Compose([_Det(1)]).config_fingerprint()
    assert Compose([_Det(1)]).config_fingerprint() != Compose([_Det(2)]).config_fingerprint()


def _item(tmp_path, image, label, affine, name="c"):
    img = str(tmp_path / f"{name}_img.nii.gz")
    lab = str(tmp_path / f"{name}_lab.nii.gz")
    write_nifti(img, image, affine)
    write_nifti(lab, label, affine)
    return LoadImage(num_channels=1, num_classes=3)({"case": name, "image": img, "label": lab})


def test_orientation_flips_to_ras_and_keeps_world_positions(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    affine = np.diag([-0.8, -0.9, 2.0, 1.0])
    affine[:3, 3] = [4.0, 5.0, -6.0]
    data = _item(tmp_path, image, label, affine)
    out = Orientation()(data)
    np.testing.assert_array_equal(out["image"][..., 0], image[::-1, ::-1, :])
    np.testing.assert_array_equal(out["label"], label[::-1, ::-1, :])
    new_affine = np.asarray(out["geometry"]["affine"])
    assert np.all(np.diag(new_affine)[:3] > 0)
    # The voxel holding a value sits at the same world point before and after.
    src_world = affine @ np.array([1, 2, 3, 1.0])
    dst_world = new_affine @ np.array([5 - 1 - 1, 6 - 1 - 2, 3, 1.0])
    np.testing.assert_allclose(src_world, dst_world)
    np.testing.assert_array_equal(invert_label(out["label"], out["geometry"]), label)


def test_orientation_is_identity_for_ras(tmp_path):
    image = np.zeros((4, 4, 4), np.float32)
    data = _item(tmp_path, image, image.astype(np.uint8), np.eye(4))
    assert Orientation()(data) is data


def test_resample_matches_linear_interpolation_reference(tmp_path):
    # Spacing 2 mm along z resampled to 1 mm: a linear ramp stays a linear ramp.
    z = np.arange(6, dtype=np.float32) * 10.0
    image = np.broadcast_to(z, (3, 4, 6)).copy()
    label = np.zeros((3, 4, 6), np.uint8)
    label[:, :, 3:] = 1
    data = _item(tmp_path, image, label, np.diag([1.0, 1.0, 2.0, 1.0]))
    out = Resample((1.0, 1.0, 1.0))(data)
    assert out["image"].shape == (3, 4, 12, 1)
    # Output voxel k sits at z = k mm, i.e. at source index k / 2 (edge values extended).
    expected = np.interp(np.arange(12) / 2.0, np.arange(6), z)
    np.testing.assert_allclose(out["image"][1, 2, :, 0], expected, atol=1e-4)
    nearest = (np.floor(np.arange(12) / 2.0 + 0.5) >= 3).astype(np.uint8)
    np.testing.assert_array_equal(out["label"][0, 0, :], nearest)
    np.testing.assert_allclose(np.diag(np.asarray(out["geometry"]["affine"]))[:3], [1, 1, 1])
    back = invert_label(out["label"], out["geometry"])
    np.testing.assert_array_equal(back, label)


def test_resample_shape_rule(tmp_path):
    data = _item(
        tmp_path,
        np.zeros((10, 7, 5), np.float32),
        np.zeros((10, 7, 5), np.uint8),
        np.diag([0.8, 0.8, 2.5, 1.0]),
    )
    out = Resample((1.0, 1.0, 1.0))(data)
    assert out["image"].shape[:3] == (8, 6, 12)  # round(10*0.8), round(7*0.8)=6, round(12.5)=12
    with pytest.raises(ValueError, match="positive"):
        Resample((1.0, 0.0, 1.0))


def test_crop_foreground_matches_bounding_box(tmp_path):
    image = np.full((20, 20, 20), -1000.0, np.float32)
    image[5:12, 6:15, 2:9] = 40.0
    label = np.zeros((20, 20, 20), np.uint8)
    label[10:13, 10:11, 10:11] = 1  # labelled voxels outside the body are kept too
    data = _item(tmp_path, image, label, np.eye(4))
    out = CropForeground(threshold=-500, margin=2)(data)
    start, stop = out["geometry"]["steps"][-1]["start"], out["geometry"]["steps"][-1]["stop"]
    assert start == [3, 4, 0] and stop == [15, 17, 13]
    np.testing.assert_array_equal(out["image"][..., 0], image[3:15, 4:17, 0:13])
    assert out["label"].sum() == label.sum()
    np.testing.assert_allclose(np.asarray(out["geometry"]["affine"])[:3, 3], [3, 4, 0])
    np.testing.assert_array_equal(invert_label(out["label"], out["geometry"]), label)


def test_normalize_ct_reference():
    rng = np.random.default_rng(1)
    image = rng.normal(50, 100, size=(6, 6, 6, 1)).astype(np.float32)
    out = NormalizeCT([0.0], [100.0])({"case": "c", "image": image})["image"]
    np.testing.assert_allclose(out, np.clip(image, 0, 100) / 100.0, atol=1e-6)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="range is empty"):
        NormalizeCT([5.0], [5.0])
    stats = {"percentiles": {"5.0": [10.0], "95.0": [30.0]}}
    assert NormalizeCT.from_stats(stats).config() == {"lower": [10.0], "upper": [30.0]}


def test_normalize_mri_reference():
    rng = np.random.default_rng(2)
    image = np.abs(rng.normal(300, 50, size=(6, 6, 6, 2))).astype(np.float32)
    image[:2] = 0.0
    out = NormalizeMRI()({"case": "c", "image": image})["image"]
    for c in range(2):
        values = image[2:, ..., c]
        np.testing.assert_allclose(
            out[2:, ..., c], (values - values.mean()) / values.std(), rtol=1e-4, atol=1e-5
        )
        assert np.all(out[:2, ..., c] == 0)
    constant = np.ones((4, 4, 4, 1), np.float32)
    with pytest.raises(DataError, match="constant intensity") as err:
        NormalizeMRI()({"case": "c", "image": constant, "image_path": "/data/x.nii.gz"})
    assert "/data/x.nii.gz" in str(err.value)


def test_foreground_indices(caplog):
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:5, 3:6, 4:8] = 1
    label[7, 7, 7] = 2
    data = {"case": "c", "image": np.zeros((10, 10, 10, 1), np.float32), "label": label}
    out = ForegroundIndices(max_indices=1000)(data)
    fg, bg = out["fg_indices"], out["bg_indices"]
    assert fg.dtype == np.int32 and fg.shape == (37, 3)
    np.testing.assert_array_equal(
        np.sort(np.ravel_multi_index(fg.T, label.shape)), np.flatnonzero(label > 0)
    )
    assert bg.shape == (963, 3) and np.all(label[tuple(bg.T)] == 0)
    small = ForegroundIndices(max_indices=20)(data)
    assert small["bg_indices"].shape == (20, 3) and np.all(label[tuple(small["bg_indices"].T)] == 0)
    again = ForegroundIndices(max_indices=20)(data)
    np.testing.assert_array_equal(small["bg_indices"], again["bg_indices"])
    with caplog.at_level("WARNING"):
        empty = ForegroundIndices()({**data, "label": np.zeros_like(label)})
    assert empty["fg_indices"].shape == (0, 3)
    assert any("no foreground" in r.getMessage() for r in caplog.records)


def test_full_chain_on_synthetic_ct_and_inverse(spleen_task_dir):
    task = load_task(spleen_task_dir)
    train, val = split_items(task.training, num_val=2, seed=0)
    chain = build_preprocessing(task, train, PreprocessingConfig(), progress=False)
    out = chain(val[0])
    assert out["image"].dtype == np.float32 and out["image"].ndim == 4
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    assert out["label"].shape == out["image"].shape[:3]
    assert out["fg_indices"].shape[0] > 0
    assert np.all(out["label"][tuple(out["fg_indices"].T)] > 0)
    ops = [s["op"] for s in out["geometry"]["steps"]]
    assert ops[:2] == ["orient", "resample"]
    source = read_nifti(val[0]["label"]).data
    back = invert_label(out["label"], out["geometry"])
    assert back.shape == source.shape
    dice = 2 * np.sum((back > 0) & (source > 0)) / (np.sum(back > 0) + np.sum(source > 0))
    # In-plane 0.8 mm -> 1 mm -> 0.8 mm with nearest neighbours loses boundary voxels only; on a
    # 32-voxel phantom the boundary is a large share of the organ.
    assert dice > 0.9


def test_full_chain_on_multimodal_mri(heart_task_dir):
    task = load_task(heart_task_dir)
    chain = build_preprocessing(task, list(task.training), progress=False)
    out = chain(task.training[0])
    assert out["image"].shape[3] == 2
    for c in range(2):
        values = out["image"][..., c][out["image"][..., c] != 0]
        assert abs(values.mean()) < 0.2 and 0.7 < values.std() < 1.3


def _ct_item(rng, shape, spacing, channels=1, label=True, body=True):
    """A CT-like item as LoadImage gives it: int16 air with a block of tissue, x fastest."""
    image = np.full(tuple(shape) + (channels,), -1000, np.int16, order="F")
    lab = np.zeros(shape, np.uint8, order="F")
    if body:
        lo = [int(rng.integers(0, n - 1)) for n in shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        image[box] = rng.integers(-600, 400, [b - a for a, b in zip(lo, hi, strict=True)] + [1])
        lab[box] = rng.integers(0, 3, [b - a for a, b in zip(lo, hi, strict=True)])
        lab[tuple(int(rng.integers(0, n)) for n in shape)] = 1  # a label outside the body
    affine = np.diag(list(spacing) + [1.0])
    geometry = {"source_shape": list(shape), "affine": affine.tolist(), "steps": []}
    item = {"case": "c", "image": image, "geometry": geometry}
    if label:
        item["label"] = lab
    return item


def _assert_same_item(got, expected, exact=True):
    assert got["geometry"] == expected["geometry"]
    assert got["image"].dtype == expected["image"].dtype and got["image"].flags.c_contiguous
    if exact:
        np.testing.assert_array_equal(got["image"], expected["image"])
    else:  # float32 rounding of values up to 1000 HU
        np.testing.assert_allclose(got["image"], expected["image"], rtol=1e-6, atol=1e-4)
    if "label" in expected:
        assert got["label"].dtype == np.uint8 and got["label"].flags.c_contiguous
        np.testing.assert_array_equal(got["label"], expected["label"])


@pytest.mark.parametrize("target", [1.0, 1.5, 0.8])
def test_resample_and_crop_equals_resample_then_crop(target):
    rng = np.random.default_rng(int(target * 10))
    spacings = [0.5, 0.7929, 0.8, 1.0, 1.25, 2.0, 2.5, 5.0]
    fused = ResampleAndCrop((target,) * 3, threshold=-500, margin=1)
    two_steps = Compose([Resample((target,) * 3), CropForeground(-500, margin=1)])
    for trial in range(16):
        shape = rng.integers(6, 20, 3)
        item = _ct_item(rng, shape, rng.choice(spacings, 3), channels=1 + trial % 2)
        if trial % 4 == 3:
            del item["label"]  # what predict loads
        _assert_same_item(fused(item), two_steps(item), exact=target == 1.0)


def test_resample_and_crop_edge_cases(caplog):
    rng = np.random.default_rng(5)
    fused = ResampleAndCrop((1.0, 1.0, 1.0), threshold=-500, margin=2)
    two_steps = Compose([Resample((1.0, 1.0, 1.0)), CropForeground(-500, margin=2)])
    # Already at the target spacing: the crop alone.
    item = _ct_item(rng, (9, 8, 7), (1.0, 1.0, 1.0))
    _assert_same_item(fused(item), two_steps(item))
    # Body everywhere: resampled, not cropped.
    item = _ct_item(rng, (9, 8, 7), (0.8, 0.8, 2.0))
    item["image"][...] = 40
    _assert_same_item(fused(item), two_steps(item))
    assert [s["op"] for s in fused(item)["geometry"]["steps"]] == ["resample"]
    # No body: resampled, not cropped, with the crop's warning.
    item = _ct_item(rng, (9, 8, 7), (0.8, 0.8, 2.0), body=False)
    with caplog.at_level("WARNING"):
        _assert_same_item(fused(item), two_steps(item))
    assert any("not cropped" in r.getMessage() for r in caplog.records)
    # A body voxel between the new grid's points vanishes in the interpolation.
    item = _ct_item(rng, (9, 8, 7), (0.5, 1.0, 1.0), label=False, body=False)
    item["image"][3, 4, 4] = 0
    _assert_same_item(fused(item), two_steps(item))


def test_resample_and_crop_is_inverted_by_invert_label(tmp_path):
    label = np.zeros((14, 12, 6), np.uint8)
    label[3:11, 3:9, 2:5] = 1
    image = np.where(label > 0, 50.0, -1000.0).astype(np.float32)
    image[2:12, 2:10, 1:5] = np.maximum(image[2:12, 2:10, 1:5], -100.0)
    data = Orientation()(_item(tmp_path, image, label, np.diag([-0.8, 0.8, 2.0, 1.0])))
    out = ResampleAndCrop((1.0, 1.0, 1.0), threshold=-500, margin=1)(data)
    assert [s["op"] for s in out["geometry"]["steps"]] == ["orient", "resample", "crop"]
    back = invert_label(out["label"], out["geometry"])
    two_steps = Compose([Resample((1.0, 1.0, 1.0)), CropForeground(-500, margin=1)])(data)
    np.testing.assert_array_equal(back, invert_label(two_steps["label"], two_steps["geometry"]))
    # 0.8 -> 1 -> 0.8 mm by nearest neighbours loses a boundary row or so.
    dice = 2 * np.sum((back > 0) & (label > 0)) / (np.sum(back > 0) + np.sum(label > 0))
    assert back.shape == label.shape and dice > 0.8  # 0.84, as before the fused transform


def _old_foreground_indices(label, case, max_indices, seed=0):
    rng = np.random.default_rng([seed, zlib.crc32(case.encode())])
    out = {}
    for key, mask in (("fg_indices", label > 0), ("bg_indices", label == 0)):
        flat = np.flatnonzero(mask)
        if flat.size > max_indices:
            flat = np.sort(rng.choice(flat, max_indices, replace=False))
        out[key] = np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)
    return out


@pytest.mark.parametrize("max_indices", [10, 300, 5000])
def test_foreground_indices_equal_the_listing_of_every_voxel(max_indices):
    rng = np.random.default_rng(max_indices)
    label = (rng.random((17, 13, 11)) < 0.15).astype(np.uint8)
    label[0, 0, :3] = 2  # foreground at the first positions
    for layout in ("C", "F"):
        data = {"case": "case_7", "label": np.asarray(label, order=layout)}
        out = ForegroundIndices(max_indices, seed=3, per_class=False)(data)  # the pooled lists
        expected = _old_foreground_indices(label, "case_7", max_indices, seed=3)
        for key in ("fg_indices", "bg_indices"):
            assert out[key].dtype == np.int32
            np.testing.assert_array_equal(out[key], expected[key])


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_normalize_ct_equals_the_expression_it_computes(dtype):
    rng = np.random.default_rng(7)
    image = np.asarray(rng.integers(-1024, 2000, (7, 6, 5, 2)), dtype, order="F")
    lower, upper = [-160.5, 10.0], [240.25, 900.0]
    out = NormalizeCT(lower, upper)({"case": "c", "image": image})["image"]
    lo, hi = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
    expected = ((np.clip(image.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_foreground_indices_per_class_keep_a_small_class_beside_a_large_one():
    label = np.zeros((40, 40, 40), np.uint8)
    label[:30, :30, :30] = 1  # 27000 voxels of organ
    label[10:13, 10:13, 10:13] = 2  # 27 voxels of lesion inside it
    data = {"case": "liver_0", "label": label}
    per_class = ForegroundIndices(max_indices=500)(data)["fg_indices"]
    classes = label[tuple(per_class.T)]
    assert (classes == 2).sum() == 27 and (classes == 1).sum() == 500
    pooled = ForegroundIndices(max_indices=500, per_class=False)(data)["fg_indices"]
    assert len(pooled) == 500 and (label[tuple(pooled.T)] == 2).sum() < 5
    single = {"case": "spleen_0", "label": (label > 0).astype(np.uint8)}
    for key in ("fg_indices", "bg_indices"):  # one class: the same lists either way
        np.testing.assert_array_equal(
            ForegroundIndices(max_indices=500)(single)[key],
            ForegroundIndices(max_indices=500, per_class=False)(single)[key],
        )
