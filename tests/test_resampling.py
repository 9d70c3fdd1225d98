"""SimpleITK resampling of arrays: equal to the plain implementation it replaced, bit for bit.

``_reference`` is the earlier code: C-order arrays transposed into SimpleITK and back, the whole
grid resampled in 3D, labels included. Geometries include spacings whose nearest-neighbour
positions fall exactly half-way between voxels (2 mm to 1 mm), where rounding decides.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from tf_medseg.transforms.resampling import (
    copy_array,
    resample_array,
    resample_image,
    resample_label,
    sitk_image,
)

SPACINGS = [0.5, 0.6, 0.75, 0.8, 0.9765625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 0.7929, 1.37]


def _reference(array, spacing, new_shape, new_spacing, nearest):
    source = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    source.SetSpacing([float(s) for s in spacing])
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in new_shape])
    resampler.SetOutputSpacing([float(s) for s in new_spacing])
    resampler.SetOutputOrigin(source.GetOrigin())
    resampler.SetOutputDirection(source.GetDirection())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    if not nearest:
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(resampler.Execute(source))
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))


def _geometries(count, seed):
    rng = np.random.default_rng(seed)
    for trial in range(count):
        spacing = rng.choice(SPACINGS, 3)
        if trial % 3 == 0:
            target = rng.choice([0.7, 1.0, 1.5, 2.0], 3)
        else:
            target = np.repeat(rng.choice([0.8, 1.0, 1.0, 1.5, 2.0]), 3)
        shape = rng.integers(2, 24, 3)
        new_shape = tuple(int(n) for n in np.maximum(1, np.round(shape * spacing / target)))
        yield rng, shape, spacing, target, new_shape


@pytest.mark.parametrize("order", ["C", "F"])
def test_arrays_resample_as_before(order):
    for rng, shape, spacing, target, new_shape in _geometries(40, seed=1):
        image = np.asarray(rng.integers(-1000, 1000, shape), np.int16, order=order)
        label = np.asarray(rng.integers(0, 4, shape), np.uint8, order=order)
        as_float = image.astype(np.float32)
        expected = _reference(as_float, spacing, new_shape, target, nearest=False)
        got = resample_array(image, spacing, new_shape, target, nearest=False)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)  # int16 in, as its float32 conversion
        expected = _reference(label, spacing, new_shape, target, nearest=True)
        np.testing.assert_array_equal(
            resample_array(label, spacing, new_shape, target, True), expected
        )
        got = resample_label(label, spacing, new_shape, target)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected, err_msg=f"{spacing} -> {target}")


def test_label_box_is_the_box_of_the_whole_grid():
    for rng, shape, spacing, target, new_shape in _geometries(20, seed=2):
        label = rng.integers(0, 3, shape).astype(np.uint8)
        box = []
        for n in new_shape:
            start = int(rng.integers(0, n))
            box.append(slice(start, int(rng.integers(start + 1, n + 1))))
        box = tuple(box)
        whole = _reference(label, spacing, new_shape, target, nearest=True)
        np.testing.assert_array_equal(
            resample_label(label, spacing, new_shape, target, box), whole[box]
        )


def test_a_region_of_the_grid_resamples_as_the_whole_grid_does():
    # Cut along y and z only (the rows keep their start): at 1 mm, bit for bit.
    for rng, shape, spacing, _, new_shape in _geometries(20, seed=3):
        target = np.ones(3)
        new_shape = tuple(int(n) for n in np.maximum(1, np.round(shape * spacing)))
        image = rng.normal(0, 300, shape).astype(np.float32)
        whole = _reference(image, spacing, new_shape, target, nearest=False)
        start = (0, int(rng.integers(0, new_shape[1])), int(rng.integers(0, new_shape[2])))
        size = (new_shape[0], new_shape[1] - start[1], new_shape[2] - start[2])
        part = resample_image(sitk_image(image, spacing), start, size, target)
        box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(part).T, whole[box])


@pytest.mark.parametrize("view", ["flipped", "fortran", "transposed"])
def test_copies_are_c_order_with_the_same_values(view):
    array = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    source = {
        "flipped": array[::-1, :, ::-1],
        "fortran": np.asfortranarray(array),
        "transposed": np.transpose(array, (2, 1, 0)),
    }[view]
    out = copy_array(source)
    assert out.flags.c_contiguous and out.dtype == np.int16
    np.testing.assert_array_equal(out, source)
    assert copy_array(source, "F").flags.f_contiguous
