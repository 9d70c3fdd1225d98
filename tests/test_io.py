"""NIfTI reading and the checks on bad input: each error names the file and the problem."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from tf_medseg.data.io import DataError, check_image, check_label, read_nifti, write_nifti

AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def _write(path, data, affine=AFFINE):
    write_nifti(str(path), data, affine)
    return str(path)


def test_round_trip_keeps_data_affine_and_spacing(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = AFFINE.copy()
    affine[:3, 3] = [10, -20, 30]
    vol = read_nifti(_write(tmp_path / "a.nii.gz", data, affine))
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine)
    np.testing.assert_allclose(vol.spacing, [0.8, 0.8, 2.5], rtol=1e-6)


def test_missing_file(tmp_path):
    path = str(tmp_path / "none.nii.gz")
    with pytest.raises(DataError, match="file not found") as err:
        read_nifti(path)
    assert path in str(err.value)


def test_zero_sized_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as err:
        read_nifti(str(path))
    assert str(path) in str(err.value)


def test_not_nifti_with_nifti_name(tmp_path):
    path = tmp_path / "text.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"this is not an image" * 50)
    with pytest.raises(DataError, match="not a readable NIfTI") as err:
        read_nifti(str(path))
    assert str(path) in str(err.value)


def test_plain_text_with_nifti_name(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        read_nifti(str(path))


def test_truncated_gzip(tmp_path):
    path = _write(tmp_path / "t.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)))
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable NIfTI") as err:
        read_nifti(path)
    assert path in str(err.value)


def test_non_positive_spacing(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_zooms((1.0, 0.0, 1.0))
    path = str(tmp_path / "z.nii.gz")
    nib.save(img, path)
    with pytest.raises(DataError, match="spacing must be positive") as err:
        read_nifti(path)
    assert path in str(err.value)


def test_nan_and_infinite_intensities(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    path = _write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError, match="2 voxel.*NaN or infinite") as err:
        check_image(read_nifti(path), 1)
    assert path in str(err.value)


@pytest.mark.parametrize(
    ("stored", "kept"), [(np.int16, np.int16), (np.uint8, np.uint8), (np.int32, np.float32)]
)
def test_integer_images_can_keep_their_type(tmp_path, stored, kept):
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6).astype(stored)
    volume = read_nifti(_write(tmp_path / "i.nii.gz", data))
    image = check_image(volume, 1, keep_integer=True)
    assert image.dtype == kept and image.shape == (4, 5, 6, 1)  # int32 is not exact in float32
    np.testing.assert_array_equal(image[..., 0], data)
    assert check_image(volume, 1).dtype == np.float32
    nan = np.zeros((6, 6, 6), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        check_image(read_nifti(_write(tmp_path / "nan.nii.gz", nan)), 1, keep_integer=True)


def test_channel_count_and_dimensionality(tmp_path):
    four_d = _write(tmp_path / "4d.nii.gz", np.zeros((6, 6, 6, 4), np.float32))
    assert check_image(read_nifti(four_d), 4).shape == (6, 6, 6, 4)
    with pytest.raises(DataError, match="expected 1 channel") as err:
        check_image(read_nifti(four_d), 1)
    assert four_d in str(err.value)
    two_d = _write(tmp_path / "2d.nii.gz", np.zeros((6, 6), np.float32), np.eye(4))
    with pytest.raises(DataError, match="expected a 3D"):
        check_image(read_nifti(two_d), 1)
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((6, 6, 1), np.float32))
    with pytest.raises(DataError, match="expected a 3D"):
        check_image(read_nifti(flat), 1)


def test_label_checks(tmp_path):
    image = read_nifti(_write(tmp_path / "img.nii.gz", np.zeros((6, 6, 6), np.int16)))
    ok = np.zeros((6, 6, 6), np.uint8)
    ok[2:4, 2:4, 2:4] = 1
    label = check_label(read_nifti(_write(tmp_path / "ok.nii.gz", ok)), image, 2)
    assert label.dtype == np.uint8 and label.sum() == 8

    shape = _write(tmp_path / "shape.nii.gz", np.zeros((6, 6, 5), np.uint8))
    with pytest.raises(DataError, match="label shape") as err:
        check_label(read_nifti(shape), image, 2)
    assert shape in str(err.value)

    moved = AFFINE.copy()
    moved[0, 3] = 3.0
    affine = _write(tmp_path / "affine.nii.gz", ok, moved)
    with pytest.raises(DataError, match="affine differs") as err:
        check_label(read_nifti(affine), image, 2)
    assert affine in str(err.value)

    values = ok.copy()
    values[0, 0, 0] = 3
    out_of_range = _write(tmp_path / "values.nii.gz", values)
    with pytest.raises(DataError, match=r"values \[3\] are outside") as err:
        check_label(read_nifti(out_of_range), image, 2)
    assert out_of_range in str(err.value)

    negative = ok.astype(np.int16)
    negative[0, 0, 0] = -1
    negative[0, 0, 1] = 5
    signed = _write(tmp_path / "signed.nii.gz", negative)
    with pytest.raises(DataError, match=r"values \[-1, 5\] are outside"):
        check_label(read_nifti(signed), image, 2)

    fractional = ok.astype(np.float32)
    fractional[0, 0, 0] = 0.5
    frac = _write(tmp_path / "frac.nii.gz", fractional)
    with pytest.raises(DataError, match="non-integer"):
        check_label(read_nifti(frac), image, 2)


def test_write_is_deterministic(tmp_path):
    data = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    a, b = _write(tmp_path / "a.nii.gz", data), _write(tmp_path / "b.nii.gz", data)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert os.path.getsize(a) > 0


def _cut(path: str, size: int) -> str:
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_the_header_check_finds_a_file_cut_anywhere_without_reading_its_data(tmp_path, suffix):
    from tf_medseg.data.io import check_header

    data = np.random.default_rng(0).normal(size=(20, 21, 22)).astype(np.float32)
    whole = _write(tmp_path / f"whole{suffix}", data)
    assert check_header(whole) == (20, 21, 22)
    size = os.path.getsize(whole)
    for cut in (200, size // 2, size - 1):  # in the header, in the data, the last byte
        path = _cut(_write(tmp_path / f"cut_{cut}{suffix}", data), cut)
        with pytest.raises(DataError, match="not a readable NIfTI") as err:
            check_header(path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_the_header_check_accepts_a_gzip_file_of_several_members(tmp_path):
    """bgzip and some archivers write a gzip file as several members: its last member's size
    is not the file's, so the check reads it through."""
    from tf_medseg.data.io import check_header

    data = np.arange(10 * 11 * 12, dtype=np.int16).reshape(10, 11, 12)
    plain = _write(tmp_path / "a.nii", data)
    raw = open(plain, "rb").read()
    path = str(tmp_path / "members.nii.gz")
    with open(path, "wb") as f:
        half = len(raw) // 2
        f.write(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert check_header(path) == (10, 11, 12)
    np.testing.assert_array_equal(read_nifti(path).data, data)
