"""Tests of tf_medseg.losses against NumPy references, including the 0/0 corners."""

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.losses import LOSSES, dice_ce_loss, get_loss, soft_dice_loss

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
