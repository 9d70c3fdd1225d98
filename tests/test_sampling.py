"""Tests of the adaptive positive/negative sampler (equations 4, 5 and 6 of the paper)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg import metrics
from tf_medseg.sampling import AdaptiveSampler, fp_fn_indices, next_positive_fraction


def two_class_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 1: 4 predicted, 6 true, 3 shared. Class 2: 2 predicted, none true."""
    pred = np.zeros((4, 4, 4), dtype=np.uint8)
    true = np.zeros((4, 4, 4), dtype=np.uint8)
    pred[0, 0, :4] = 1
    true[0, 0, 1:4] = 1
    true[1, 0, :3] = 1
    pred[3, 3, :2] = 2
    return pred, true


def test_fp_fn_indices_hand_computed():
    r_fp, r_fn = fp_fn_indices(*two_class_case(), num_classes=3)
    # Class 1: union 4 + 6 - 3 = 7. Class 2: union 2, r_fp 2/2, r_fn 0/2.
    assert r_fp == pytest.approx((4 / 7 + 1.0) / 2, rel=1e-12)
    assert r_fn == pytest.approx((6 / 7 + 0.0) / 2, rel=1e-12)


def test_fp_fn_indices_perfect_and_absent_classes_count_as_balanced():
    pred, true = two_class_case()
    assert fp_fn_indices(true, true, num_classes=3) == pytest.approx((1.0, 1.0))
    # Class 3 is absent from both: r_fp = r_fn = 1 for it.
    r_fp, r_fn = fp_fn_indices(pred, true, num_classes=4)
    assert r_fp == pytest.approx((4 / 7 + 1.0 + 1.0) / 3, rel=1e-12)
    assert r_fn == pytest.approx((6 / 7 + 0.0 + 1.0) / 3, rel=1e-12)


@pytest.mark.parametrize(
    "r_fp, r_fn, gamma, bounds, expected",
    [
        (1.0, 1.0, 1.0, (0.1, 0.9), 0.5),
        (0.5, 1.0, 1.0, (0.1, 0.9), 2 / 3),  # r' = 2
        (0.5, 1.0, 2.0, (0.1, 0.9), 4 / 5),  # r' = 4
        (1.0, 0.5, 1.0, (0.1, 0.9), 1 / 3),  # r' = 1/2
        (0.8, 0.6, 0.5, (0.1, 0.9), math.sqrt(0.75) / (1 + math.sqrt(0.75))),
        (0.01, 1.0, 1.0, (0.1, 0.9), 0.9),  # r' = 100 -> 100/101, clamped
        (1.0, 0.01, 1.0, (0.2, 0.7), 0.2),
        (0.0, 0.5, 1.0, (0.1, 0.9), 0.9),  # nothing predicted: as many positives as allowed
        (0.5, 0.0, 1.0, (0.1, 0.9), 0.1),  # nothing true: as many negatives as allowed
        (0.0, 0.0, 1.0, (0.1, 0.9), 0.5),  # 0/0: undefined, balanced
        (math.nan, 1.0, 1.0, (0.1, 0.9), 0.5),
        (1.0, math.nan, 1.0, (0.1, 0.9), 0.5),
        (math.inf, math.inf, 1.0, (0.1, 0.9), 0.5),
        (1e-300, 1e300, 3.0, (0.1, 0.9), 0.9),  # no overflow
        (1.0, 1.0, 1.0, (0.6, 0.8), 0.6),  # 0.5 clamped into the bounds
    ],
)
def test_next_positive_fraction_hand_cases(r_fp, r_fn, gamma, bounds, expected):
    result = next_positive_fraction(r_fp, r_fn, gamma=gamma, bounds=bounds)
    assert isinstance(result, float)
    assert result == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r_fp": -0.1, "r_fn": 1.0},
        {"r_fp": 1.0, "r_fn": 1.0, "gamma": 0.0},
        {"r_fp": 1.0, "r_fn": 1.0, "bounds": (0.0, 0.9)},
        {"r_fp": 1.0, "r_fn": 1.0, "bounds": (0.1, 1.0)},
        {"r_fp": 1.0, "r_fn": 1.0, "bounds": (0.7, 0.3)},
    ],
)
def test_next_positive_fraction_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        next_positive_fraction(**kwargs)


def test_more_false_positives_lower_and_more_false_negatives_raise_the_fraction():
    true = np.zeros((8, 8, 8), dtype=np.uint8)
    true[2:6, 2:6, 2:6] = 1
    over = true.copy()
    over[1:7, 1:7, 1:7] = 1  # extra false positives
    under = np.zeros_like(true)
    under[3:5, 3:5, 3:5] = 1  # misses most of the organ
    exact = next_positive_fraction(*fp_fn_indices(true, true, 2))
    more_fp = next_positive_fraction(*fp_fn_indices(over, true, 2))
    more_fn = next_positive_fraction(*fp_fn_indices(under, true, 2))
    assert exact == pytest.approx(0.5)
    assert more_fp < 0.5 < more_fn
    # Hand values: over-segmentation r' = (64/216) / 1, under-segmentation r' = 1 / (8/64).
    assert more_fp == pytest.approx(64 / 280, rel=1e-12)
    assert more_fn == pytest.approx(8 / 9, rel=1e-12)


def test_sampler_variable_is_float32_non_trainable_and_updated_in_place():
    sampler = AdaptiveSampler()
    variable = sampler.positive_fraction
    assert variable.dtype == tf.float32 and not variable.trainable
    assert float(variable.numpy()) == 0.5
    assert sampler.trainable_variables == ()

    @tf.function
    def read():  # stands for the pipeline's map function, traced once
        return variable * 1.0

    assert float(read()) == pytest.approx(0.5)
    pred, true = two_class_case()
    stats = sampler.update_from_sums(metrics.confusion_sums(pred, true, 3))
    r_fp, r_fn = (4 / 7 + 1.0) / 2, (6 / 7) / 2
    assert stats["r_fp"] == pytest.approx(r_fp, rel=1e-12)
    assert stats["r_fn"] == pytest.approx(r_fn, rel=1e-12)
    assert stats["ratio"] == pytest.approx(r_fn / r_fp, rel=1e-12)
    expected = (r_fn / r_fp) / (1 + r_fn / r_fp)
    assert stats["positive_fraction"] == pytest.approx(expected, rel=1e-6)
    assert sampler.positive_fraction is variable  # same variable, new value
    assert float(read()) == pytest.approx(expected, rel=1e-6)
    assert read.experimental_get_tracing_count() == 1


def test_sampler_accepts_all_reduced_sum_arrays():
    pred, true = two_class_case()
    sums = metrics.confusion_sums(pred, true, 3)
    from_object = AdaptiveSampler(gamma=2.0).update_from_sums(sums)
    from_array = AdaptiveSampler(gamma=2.0).update_from_sums(sums.to_array())
    assert from_array == pytest.approx(from_object)


def test_non_adaptive_sampler_keeps_its_fraction_but_reports_the_indices():
    sampler = AdaptiveSampler(initial_fraction=0.5, adaptive=False)
    true = np.zeros((8, 8, 8), dtype=np.uint8)
    true[2:6, 2:6, 2:6] = 1
    stats = sampler.update_from_sums(metrics.confusion_sums(np.zeros_like(true), true, 2))
    assert stats["r_fp"] == 0.0 and stats["r_fn"] == pytest.approx(1.0)
    assert math.isinf(stats["ratio"])
    assert stats["positive_fraction"] == 0.5 == float(sampler.positive_fraction.numpy())


def test_sampler_bounds_on_degenerate_predictions():
    sampler = AdaptiveSampler(bounds=(0.2, 0.8))
    true = np.zeros((8, 8, 8), dtype=np.uint8)
    true[2:6, 2:6, 2:6] = 1
    assert sampler.update_from_sums(metrics.confusion_sums(0 * true, true, 2))[
        "positive_fraction"
    ] == pytest.approx(0.8)
    empty = np.zeros_like(true)
    assert sampler.update_from_sums(metrics.confusion_sums(true, empty, 2))[
        "positive_fraction"
    ] == pytest.approx(0.2)


def test_sampler_rejects_initial_fraction_outside_bounds():
    with pytest.raises(ValueError, match="outside bounds"):
        AdaptiveSampler(initial_fraction=0.95)
    with pytest.raises(ValueError, match="gamma"):
        AdaptiveSampler(gamma=-1.0)


def test_checkpoint_round_trip_of_the_fraction(tmp_path):
    sampler = AdaptiveSampler()
    sampler.positive_fraction.assign(0.73)
    path = tf.train.Checkpoint(sampler=sampler).save(str(tmp_path / "ckpt"))
    sampler.positive_fraction.assign(0.2)

    restored = AdaptiveSampler()
    tf.train.Checkpoint(sampler=restored).restore(path).assert_consumed()
    assert float(restored.positive_fraction.numpy()) == pytest.approx(0.73)
    tf.train.Checkpoint(sampler=sampler).restore(path).assert_consumed()
    assert float(sampler.positive_fraction.numpy()) == pytest.approx(0.73)


def test_the_fraction_lives_on_the_host_whatever_the_default_device():
    # The input pipeline reads it per patch on the CPU; created under a GPU's default device it
    # would cost a round trip per patch. Stood in for here by a second logical CPU device.
    import subprocess
    import sys

    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "two = [tf.config.LogicalDeviceConfiguration()] * 2\n"
        "tf.config.set_logical_device_configuration(cpu, two)\n"
        "from tf_medseg.sampling import AdaptiveSampler\n"
        "with tf.device('/CPU:1'):\n"
        "    other = tf.Variable(1.0)\n"
        "    sampler = AdaptiveSampler()\n"
        "print(other.device)\n"
        "print(sampler.positive_fraction.device)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out[-2].endswith("device:CPU:1")  # the default device does move a plain variable
    assert out[-1].endswith("device:CPU:0")
