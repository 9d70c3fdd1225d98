"""Tests of tf_medseg.losses against NumPy references, including the 0/0 corners."""

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.losses import (
    LOSSES,
    deep_supervision_loss,
    deep_supervision_weights,
    dice_ce_loss,
    get_loss,
    nearest_downsample,
    soft_dice_loss,
)

SMOOTH = 1e-5


def numpy_dice_loss(labels, probs, include_background=False, batch=False, smooth=SMOOTH):
    """Equation 1 in float64, one term per (sample,) class, then the mean."""
    labels, probs = labels.astype(np.float64), probs.astype(np.float64)
    if not include_background:
        labels, probs = labels[..., 1:], probs[..., 1:]
    axes = tuple(range(0 if batch else 1, labels.ndim - 1))
    intersection = (probs * labels).sum(axes)
    denominator = (probs**2).sum(axes) + (labels**2).sum(axes) + smooth
    return 1.0 - np.mean(2.0 * intersection / denominator)


def numpy_cross_entropy(labels, probs):
    log_probs = np.log(np.clip(probs.astype(np.float64), 1e-7, 1.0))
    return np.mean(-(labels * log_probs).sum(-1))


def random_case(shape=(2, 8, 8, 8), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, shape)]
    logits = rng.normal(size=(*shape, num_classes))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return labels, probs.astype(np.float32)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_soft_dice_matches_numpy(include_background, batch):
    labels, probs = random_case()
    # Make the two samples differ so per-sample and batch Dice differ.
    labels[1, ..., 0] = 1.0
    labels[1, ..., 1:] = 0.0
    loss = soft_dice_loss(labels, probs, include_background=include_background, batch=batch)
    assert loss.dtype == tf.float32 and loss.shape == ()
    expected = numpy_dice_loss(labels, probs, include_background, batch)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)


def test_per_sample_and_batch_modes_differ():
    labels, probs = random_case()
    labels[1, ..., 0] = 1.0
    labels[1, ..., 1:] = 0.0
    per_sample = soft_dice_loss(labels, probs).numpy()
    whole_batch = soft_dice_loss(labels, probs, batch=True).numpy()
    assert abs(per_sample - whole_batch) > 0.05


def test_hand_computed_value():
    # One sample, 4 voxels, classes (background, foreground); foreground p = (1, .5, 0, 0),
    # g = (1, 1, 0, 0): 2 * 1.5 / (1.25 + 2) = 12 / 13.
    probs_fg = np.array([1.0, 0.5, 0.0, 0.0], np.float32)
    labels_fg = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
    probs = np.stack([1 - probs_fg, probs_fg], -1).reshape(1, 4, 1, 1, 2)
    labels = np.stack([1 - labels_fg, labels_fg], -1).reshape(1, 4, 1, 1, 2)
    expected = 1.0 - 3.0 / (3.25 + SMOOTH)
    np.testing.assert_allclose(soft_dice_loss(labels, probs).numpy(), expected, rtol=1e-6)


def test_perfect_prediction_gives_zero_loss():
    labels, _ = random_case()
    np.testing.assert_allclose(soft_dice_loss(labels, labels).numpy(), 0.0, atol=1e-6)


def test_all_zero_prediction():
    labels, _ = random_case()
    probs = np.zeros_like(labels)
    probs[..., 0] = 1.0  # everything predicted background
    loss = soft_dice_loss(labels, probs)
    np.testing.assert_allclose(loss.numpy(), 1.0, atol=1e-7)
    np.testing.assert_allclose(loss.numpy(), numpy_dice_loss(labels, probs), atol=1e-7)
    with_background = soft_dice_loss(labels, probs, include_background=True)
    expected = numpy_dice_loss(labels, probs, include_background=True)
    np.testing.assert_allclose(with_background.numpy(), expected, rtol=1e-6)


def test_all_zero_label():
    _, probs = random_case()
    labels = np.zeros_like(probs)
    labels[..., 0] = 1.0  # an empty foreground
    loss = soft_dice_loss(labels, probs)
    np.testing.assert_allclose(loss.numpy(), 1.0, atol=1e-7)
    np.testing.assert_allclose(loss.numpy(), numpy_dice_loss(labels, probs), atol=1e-7)


def test_zero_over_zero_is_finite_with_zero_gradient():
    labels = tf.zeros((2, 4, 4, 4, 3))
    probs = tf.zeros((2, 4, 4, 4, 3))
    for batch in [False, True]:
        with tf.GradientTape() as tape:
            tape.watch(probs)
            loss = soft_dice_loss(labels, probs, include_background=True, batch=batch)
        gradient = tape.gradient(loss, probs).numpy()
        assert loss.numpy() == pytest.approx(1.0)
        assert np.isfinite(gradient).all()
        np.testing.assert_array_equal(gradient, 0.0)


def test_empty_class_gradient_through_softmax_is_finite():
    # An empty label class predicted (nearly) empty: the 0/0 corner reached from logits.
    logits = tf.Variable(np.full((1, 4, 4, 4, 2), [30.0, -30.0], np.float32))
    labels = np.zeros((1, 4, 4, 4, 2), np.float32)
    labels[..., 0] = 1.0
    with tf.GradientTape() as tape:
        loss = soft_dice_loss(labels, tf.nn.softmax(logits))
    gradient = tape.gradient(loss, logits).numpy()
    assert np.isfinite(loss.numpy()) and np.isfinite(gradient).all()


def test_gradient_matches_analytic_form():
    labels, probs = random_case(shape=(1, 4, 4, 4), num_classes=2)
    probs_tensor = tf.constant(probs)
    with tf.GradientTape() as tape:
        tape.watch(probs_tensor)
        loss = soft_dice_loss(labels, probs_tensor)
    gradient = tape.gradient(loss, probs_tensor).numpy()
    p, g = probs[..., 1].astype(np.float64), labels[..., 1].astype(np.float64)
    intersection, denominator = (p * g).sum(), (p**2).sum() + (g**2).sum() + SMOOTH
    expected = -(2 * g * denominator - 2 * intersection * 2 * p) / denominator**2
    np.testing.assert_allclose(gradient[..., 1], expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(gradient[..., 0], 0.0)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    labels, probs = random_case()
    probs_half = tf.cast(probs, dtype)
    loss = soft_dice_loss(tf.cast(labels, dtype), probs_half)
    assert loss.dtype == tf.float32
    # Same as the float32 computation on the rounded probabilities.
    rounded = tf.cast(probs_half, tf.float32).numpy()
    np.testing.assert_allclose(loss.numpy(), numpy_dice_loss(labels, rounded), rtol=1e-6)


def test_dice_ce_matches_numpy():
    labels, probs = random_case()
    loss = dice_ce_loss(labels, probs, ce_weight=0.5)
    expected = numpy_dice_loss(labels, probs) + 0.5 * numpy_cross_entropy(labels, probs)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)
    # All-zero prediction of a labelled class: the clip keeps the cross-entropy finite.
    zero = np.zeros_like(probs)
    zero[..., 0] = 1.0
    expected = numpy_dice_loss(labels, zero) + numpy_cross_entropy(labels, zero)
    np.testing.assert_allclose(dice_ce_loss(labels, zero).numpy(), expected, rtol=1e-6)


def test_registry_and_get_loss():
    assert set(LOSSES) == {"dice", "dice_ce", "ce"}
    labels, probs = random_case()
    loss = get_loss("dice", include_background=True, batch=True)
    expected = numpy_dice_loss(labels, probs, include_background=True, batch=True)
    np.testing.assert_allclose(loss(labels, probs).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("focal")
    with pytest.raises(ValueError, match="does not take"):
        get_loss("dice", ce_weight=1.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="needs >= 2 channels"):
        soft_dice_loss(np.ones((1, 4, 4, 4, 1)), np.ones((1, 4, 4, 4, 1)))
    with pytest.raises(ValueError):
        soft_dice_loss(np.ones((1, 4, 4, 4, 2)), np.ones((1, 4, 4, 4, 3)))


def test_works_inside_tf_function_with_dynamic_shapes():
    loss_fn = tf.function(
        soft_dice_loss, input_signature=[tf.TensorSpec((None, None, None, None, 3))] * 2
    )
    labels, probs = random_case()
    np.testing.assert_allclose(
        loss_fn(labels, probs).numpy(), numpy_dice_loss(labels, probs), rtol=1e-6
    )


def test_deep_supervision_weights_halve_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    weights = deep_supervision_weights(4)
    np.testing.assert_allclose(weights, [8 / 15, 4 / 15, 2 / 15, 1 / 15], rtol=1e-12)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    for level in range(1, 4):
        assert weights[level] == pytest.approx(weights[0] / 2**level, rel=1e-12)
    with pytest.raises(ValueError, match="num_outputs must be >= 1"):
        deep_supervision_weights(0)


def test_nearest_downsample_takes_the_voxel_at_each_blocks_centre():
    labels = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1, 1) * np.ones((1, 8, 4, 4, 1))
    # Along the first axis: voxels 1, 3, 5, 7 for factor 2; 2, 6 for factor 4.
    half = nearest_downsample(tf.constant(labels), 2).numpy()
    assert half.shape == (1, 4, 2, 2, 1)
    np.testing.assert_array_equal(half[0, :, 0, 0, 0], [1, 3, 5, 7])
    quarter = nearest_downsample(tf.constant(labels), 4).numpy()
    assert quarter.shape == (1, 2, 1, 1, 1)
    np.testing.assert_array_equal(quarter[0, :, 0, 0, 0], [2, 6])
    onehot, _ = random_case((2, 8, 8, 8))
    np.testing.assert_array_equal(
        nearest_downsample(tf.constant(onehot), 2).numpy(), onehot[:, 1::2, 1::2, 1::2]
    )
    assert nearest_downsample(onehot, 1) is onehot


@pytest.mark.parametrize("name", ["dice", "dice_ce", "ce"])
def test_deep_supervision_loss_is_the_weighted_sum_over_the_levels(name):
    labels, full = random_case((2, 8, 8, 8), seed=1)
    _, half = random_case((2, 4, 4, 4), seed=2)
    _, quarter = random_case((2, 2, 2, 2), seed=3)
    options = {} if name == "ce" else {"batch": True}
    loss = deep_supervision_loss(get_loss(name, **options), 3)
    got = loss(tf.constant(labels), [tf.constant(p) for p in (full, half, quarter)])
    assert got.dtype == tf.float32 and got.shape == ()

    def reference(g, p):
        ce = numpy_cross_entropy(g, p)
        dice = numpy_dice_loss(g, p, batch=True)
        return {"dice": dice, "dice_ce": dice + ce, "ce": ce}[name]

    # By hand: weights 4/7, 2/7, 1/7; targets every 2nd voxel from 1, every 4th from 2.
    expected = (
        4 / 7 * reference(labels, full)
        + 2 / 7 * reference(labels[:, 1::2, 1::2, 1::2], half)
        + 1 / 7 * reference(labels[:, 2::4, 2::4, 2::4], quarter)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_deep_supervision_loss_needs_every_output():
    labels, full = random_case((1, 4, 4, 4))
    loss = deep_supervision_loss(soft_dice_loss, 2)
    with pytest.raises(ValueError, match="over 2 outputs got 1"):
        loss(labels, [full])
