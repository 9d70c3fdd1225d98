"""Tests of tf_medseg.inference against an independent NumPy sliding-window reference."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.inference.window import (
    compute_importance_map,
    flip_combinations,
    keep_largest_component,
    mean_predictor,
    sliding_window_inference,
    window_starts,
)

# --- an independent reference: every window kept, blended at the end, float64 ---------------


def reference_predictor(windows: np.ndarray) -> np.ndarray:
    """NumPy twin of `tf_predictor`: depends on the window's position and content, not only on
    each voxel, so that how windows are laid out and blended changes the result."""
    x = windows[..., :1] + 0.5 * windows[..., 1:2]
    mean = windows.mean(axis=(1, 2, 3, 4), keepdims=True)
    depth = windows.shape[1]
    ramp = (np.arange(depth) / depth)[None, :, None, None, None]
    return np.concatenate([1.5 * x + mean, -x + 2.0 * ramp + 0.5 * mean + 0 * x], axis=-1)


def tf_predictor(windows: tf.Tensor) -> tf.Tensor:
    x = windows[..., :1] + 0.5 * windows[..., 1:2]
    mean = tf.reduce_mean(windows, axis=[1, 2, 3, 4], keepdims=True)
    depth = tf.shape(windows)[1]
    ramp = tf.cast(tf.range(depth), tf.float32) / tf.cast(depth, tf.float32)
    ramp = tf.reshape(ramp, [1, -1, 1, 1, 1])
    return tf.concat([1.5 * x + mean, -x + 2.0 * ramp + 0.5 * mean + 0 * x], axis=-1)


def reference_starts(size: int, roi: int, overlap) -> list[int]:
    if roi == size:
        return [0]
    is_voxels = isinstance(overlap, int) and overlap >= 1
    step = max(roi - overlap if is_voxels else int(roi * (1 - overlap)), 1)
    starts, start = [], 0
    while True:
        starts.append(min(start, size - roi))
        if start + roi >= size:
            return starts
        start += step


def reference_weights(roi, mode) -> np.ndarray:
    if mode == "constant":
        return np.ones(roi)
    coords = np.indices(roi, dtype=np.float64)
    exponent = sum(
        (c - (n - 1) / 2) ** 2 / (2 * (0.125 * n) ** 2) for c, n in zip(coords, roi, strict=True)
    )
    weights = np.exp(-exponent)
    return np.maximum(weights, max(weights.min(), 1e-3))


def reference_sliding_window(volume, roi, overlap, mode, cval=0.0):
    batch, *spatial, _ = volume.shape
    padded = [max(s, r) for s, r in zip(spatial, roi, strict=True)]
    low = [(p - s) // 2 for p, s in zip(padded, spatial, strict=True)]
    pads = [(lo, p - s - lo) for lo, p, s in zip(low, padded, spatial, strict=True)]
    image = np.pad(volume.astype(np.float64), [(0, 0), *pads, (0, 0)], constant_values=cval)
    overlaps = overlap if isinstance(overlap, tuple) else (overlap,) * 3
    starts = [reference_starts(p, r, o) for p, r, o in zip(padded, roi, overlaps, strict=True)]
    weights = reference_weights(roi, mode)
    windows, corners = [], []
    for b in range(batch):
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))
            windows.append(image[(b, *box)])
            corners.append((b, box))
    predictions = reference_predictor(np.stack(windows))
    numerator = np.zeros((batch, *padded, predictions.shape[-1]))
    denominator = np.zeros((batch, *padded))
    for (b, box), prediction in zip(corners, predictions, strict=True):
        numerator[(b, *box)] += weights[..., None] * prediction
        denominator[(b, *box)] += weights
    out = numerator / denominator[..., None]
    crop = tuple(slice(lo, lo + s) for lo, s in zip(low, spatial, strict=True))
    return out[(slice(None), *crop)]


def random_volume(spatial, channels=2, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *spatial, channels)).astype(np.float32)


# --- window layout and weights ---------------------------------------------------------------


@pytest.mark.parametrize(
    "size, roi, overlap, expected",
    [
        (10, 4, 0.25, [0, 3, 6]),  # step int(4 * 0.75) = 3
        (10, 4, 0.5, [0, 2, 4, 6]),
        (10, 4, 0.0, [0, 4, 6]),  # last window flush with the border
        (10, 4, 0.99, list(range(7))),  # step at least 1
        (96, 64, 0.25, [0, 32]),
        (300, 224, 32, [0, 76]),  # the paper: 224^3 windows, 32 voxels of overlap
        (64, 64, 0.25, [0]),
        (12, 5, 2, [0, 3, 6, 7]),
    ],
)
def test_window_starts_hand_cases(size, roi, overlap, expected):
    starts = window_starts((size,), (roi,), overlap)
    assert [s[0] for s in starts] == expected
    assert [s[0] for s in starts] == reference_starts(size, roi, overlap)


def test_window_starts_grid_order_first_axis_slowest():
    starts = window_starts((6, 5), (4, 4), 0.5)
    assert starts == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_gaussian_importance_map_matches_formula():
    roi = (7, 6, 5)
    weights = compute_importance_map(roi, "gaussian")
    assert weights.dtype == np.float32 and weights.shape == roi
    np.testing.assert_allclose(weights, reference_weights(roi, "gaussian"), rtol=1e-6, atol=1e-9)
    assert weights.min() == pytest.approx(1e-3)  # the clamp is active in the corners
    assert weights.max() == pytest.approx(np.exp(-0.25 / (2 * 0.75**2)), rel=1e-6)  # even axis
    # Hand value: one step from the centre along the odd axes of size 7 (sigma 0.875) and 5.
    x7 = np.exp(-1 / (2 * 0.875**2))
    y6 = np.exp(-0.25 / (2 * 0.75**2))
    z5 = np.exp(-1 / (2 * 0.625**2))
    assert weights[4, 3, 3] == pytest.approx(x7 * y6 * z5, rel=1e-6)
    np.testing.assert_array_equal(compute_importance_map(roi, "constant"), np.ones(roi))


# --- sliding window against the reference ------------------------------------------------------


@pytest.mark.parametrize(
    "spatial, roi, overlap, mode, cval",
    [
        pytest.param((5, 12, 9), (8, 6, 9), 0.25, "constant", 0.0, id="padding-odd-constant"),
        pytest.param((3, 10, 20), (6, 8, 8), 0.25, "gaussian", -1.0, id="padding-gaussian-cval"),
        pytest.param((12, 10, 8), (4, 5, 4), 0.0, "gaussian", 0.0, id="overlap-0"),
        pytest.param((8, 8, 8), (8, 8, 8), 0.5, "gaussian", 0.0, id="window-equals-volume"),
        pytest.param((13, 11, 9), (6, 5, 4), 0.5, "gaussian", 0.0, id="gaussian-uneven"),
        pytest.param((20, 14, 10), (8, 8, 6), 2, "constant", 0.0, id="overlap-2-voxels"),
        pytest.param((20, 14, 10), (8, 8, 6), 3, "gaussian", 0.0, id="overlap-3-voxels-gauss"),
        pytest.param((12, 12, 12), (6, 6, 6), (0.5, 3, 0.0), "gaussian", 0.0, id="per-axis"),
    ],
)
def test_matches_numpy_reference(spatial, roi, overlap, mode, cval):
    volume = random_volume(spatial)
    expected = reference_sliding_window(volume, roi, overlap, mode, cval)
    result = sliding_window_inference(
        volume, tf_predictor, roi, overlap=overlap, mode=mode, sw_batch_size=3, cval=cval
    )
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    assert result.shape == (*volume.shape[:-1], 2)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_window_equal_to_volume_is_one_prediction():
    volume = random_volume((8, 6, 4), batch=1)
    result = sliding_window_inference(volume, tf_predictor, (8, 6, 4), mode="gaussian")
    np.testing.assert_allclose(result, reference_predictor(volume), rtol=1e-5, atol=1e-6)


def test_voxelwise_predictor_is_reproduced_exactly_whatever_the_layout():
    volume = random_volume((11, 9, 7))
    for overlap, mode in [(0.0, "constant"), (0.6, "gaussian"), (3, "gaussian")]:
        result = sliding_window_inference(
            volume, lambda w: 2.0 * w + 1.0, (5, 4, 6), overlap=overlap, mode=mode
        )
        np.testing.assert_allclose(result, 2.0 * volume + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_independent_of_sw_batch_size(mode):
    volume = random_volume((10, 9, 8), seed=3)
    results = [
        sliding_window_inference(volume, tf_predictor, (4, 5, 4), 0.5, mode, sw_batch_size=n)
        for n in (1, 2, 5, 64)
    ]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-6, atol=1e-6)


def test_tf_function_predictor_traces_once_and_sees_fixed_batches():
    traces, shapes = [], []

    @tf.function
    def predictor(windows):
        traces.append(windows.shape)
        return tf_predictor(windows)

    def recording(windows):
        shapes.append(tuple(windows.shape))
        return predictor(windows)

    volume = random_volume((10, 9, 8), seed=4)
    # 3 x 3 x 3 windows per item, 2 items: 54 windows in batches of 4 (the last one padded).
    result = sliding_window_inference(volume, recording, (4, 4, 4), 0.25, sw_batch_size=4)
    assert len(traces) == 1
    assert shapes == [(4, 4, 4, 4, 2)] * 14
    np.testing.assert_allclose(
        result, reference_sliding_window(volume, (4, 4, 4), 0.25, "constant"), rtol=1e-5, atol=1e-5
    )


def test_tensor_in_tensor_out_float16_predictions_and_progress():
    volume = random_volume((9, 8, 7), seed=5)
    result = sliding_window_inference(
        tf.constant(volume),
        lambda w: tf.cast(tf_predictor(w), tf.float16),
        (6, 5, 4),
        overlap=0.5,
        mode="gaussian",
        sw_batch_size=2,
        progress=True,
    )
    assert tf.is_tensor(result) and result.dtype == tf.float32
    expected = reference_sliding_window(volume, (6, 5, 4), 0.5, "gaussian")
    np.testing.assert_allclose(result.numpy(), expected, rtol=5e-3, atol=5e-3)


def test_roi_none_takes_the_volume_size():
    volume = random_volume((6, 10, 5), batch=1, seed=6)
    result = sliding_window_inference(volume, tf_predictor, (None, 4, 0), overlap=0.5)
    expected = reference_sliding_window(volume, (6, 4, 5), 0.5, "constant")
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"overlap": 4}, "not smaller than the window"),
        ({"overlap": -2}, "overlap"),
        ({"overlap": True}, "overlap"),
        ({"mode": "median"}, "blend mode"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
    ],
)
def test_invalid_settings(kwargs, message):
    volume = random_volume((8, 8, 8), batch=1)
    with pytest.raises(ValueError, match=message):
        sliding_window_inference(volume, tf_predictor, (4, 4, 4), **kwargs)


def test_bad_volume_rank_and_bad_predictor_output():
    with pytest.raises(ValueError, match="batch, D, H, W, C"):
        sliding_window_inference(np.zeros((8, 8, 8, 1)), tf_predictor, (4, 4, 4))
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(np.zeros((1, 8, 8, 8, 1)), lambda w: w[:, :2], (4, 4, 4))


# --- largest connected component ------------------------------------------------------------


def blobs() -> np.ndarray:
    labels = np.zeros((16, 16, 16), dtype=np.uint8)
    labels[1:7, 1:7, 1:7] = 1  # class 1, 216 voxels
    labels[10:12, 10:12, 10:12] = 1  # class 1, 8 voxels
    labels[1:3, 10:15, 10:15] = 2  # class 2, 50 voxels
    labels[12:15, 1:4, 1:4] = 2  # class 2, 27 voxels
    return labels


def test_keep_largest_component_all_classes():
    labels = blobs()
    original = labels.copy()
    kept = keep_largest_component(labels)
    expected = labels.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[12:15, 1:4, 1:4] = 0
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(labels, original)  # input untouched
    assert kept.dtype == labels.dtype
    assert np.count_nonzero(kept == 1) == 216 and np.count_nonzero(kept == 2) == 50


def test_keep_largest_component_selected_classes_only():
    labels = blobs()
    kept = keep_largest_component(labels, classes=[2])
    expected = labels.copy()
    expected[12:15, 1:4, 1:4] = 0
    np.testing.assert_array_equal(kept, expected)


def test_keep_largest_component_connectivity():
    labels = np.zeros((8, 8, 8), dtype=np.int32)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[3:5, 3:5, 3:5] = 1  # 8 voxels touching the first cube only at a corner
    full = keep_largest_component(labels, fully_connected=True)
    np.testing.assert_array_equal(full, labels)
    faces = keep_largest_component(labels, fully_connected=False)
    assert np.count_nonzero(faces) == 27 and faces[0:3, 0:3, 0:3].all()


def test_keep_largest_component_errors_and_empty_class():
    labels = blobs()
    np.testing.assert_array_equal(keep_largest_component(labels, classes=[3]), labels)
    with pytest.raises(TypeError, match="integer"):
        keep_largest_component(labels.astype(np.float32))
    with pytest.raises(ValueError, match="foreground"):
        keep_largest_component(labels, classes=[0, 1])


def test_flip_combinations_are_the_eight_mirrorings():
    combos = flip_combinations()
    assert len(combos) == len(set(combos)) == 8 and combos[0] == ()
    assert set(combos) == {c for n in range(4) for c in itertools.combinations((1, 2, 3), n)}


def _position_dependent(windows):
    """Softmax over 2 classes of the voxel value plus a ramp along each axis (not mirror
    equivariant, so that test-time augmentation changes its output)."""
    x = np.asarray(windows, np.float32)[..., 0]
    ramp = sum(
        np.arange(n, dtype=np.float32).reshape([n if a == i else 1 for a in range(3)]) * (i + 1)
        for i, n in enumerate(x.shape[1:])
    )
    logit = x + 0.1 * ramp
    p = 1.0 / (1.0 + np.exp(-logit))
    return np.stack([1.0 - p, p], axis=-1)


def test_tta_is_the_mean_over_the_mirrored_windows_mirrored_back():
    windows = np.random.default_rng(0).normal(size=(3, 4, 5, 6, 1)).astype(np.float32)
    calls = []

    def predictor(batch):
        calls.append(tuple(batch.shape))
        return _position_dependent(batch)

    got = mean_predictor([predictor], tta=True)(tf.constant(windows))
    expected = np.mean(
        [
            np.flip(_position_dependent(np.flip(windows, axes)), axes)
            for axes in flip_combinations()
        ],
        axis=0,
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert calls == [(3, 4, 5, 6, 1)] * 8  # every mirroring as one batched call
    assert not np.allclose(got, _position_dependent(windows), atol=1e-3)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


def test_tta_leaves_a_mirror_equivariant_predictor_unchanged_and_ensembles_average():
    windows = np.random.default_rng(1).normal(size=(2, 4, 4, 4, 1)).astype(np.float32)

    def voxelwise(batch):
        p = tf.sigmoid(batch[..., 0])
        return tf.stack([1.0 - p, p], axis=-1)

    plain = voxelwise(windows).numpy()
    np.testing.assert_allclose(mean_predictor([voxelwise], tta=True)(windows), plain, atol=1e-6)
    ensemble = mean_predictor([voxelwise, _position_dependent])(tf.constant(windows))
    np.testing.assert_allclose(ensemble, (plain + _position_dependent(windows)) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        mean_predictor([])


def test_tta_in_the_sliding_window_gives_the_mirrored_volume_mean():
    """Over a whole volume with windows equal to it, TTA is the mean over the 8 mirrorings of
    the volume: what nnU-Net's mirroring computes."""
    volume = np.random.default_rng(2).normal(size=(1, 6, 7, 8, 1)).astype(np.float32)
    got = sliding_window_inference(volume, mean_predictor([_position_dependent], tta=True), 0)
    expected = np.mean(
        [np.flip(_position_dependent(np.flip(volume, a)), a) for a in flip_combinations()], axis=0
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)
