"""Tests of the adaptive positive/negative sampler (equations 4, 5 and 6 of the paper)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg import metrics
from tf_medseg.config import PAPER_SAMPLER, TrainConfig
from tf_medseg.sampling import (
    AdaptiveSampler,
    damped_fraction,
    fp_fn_indices,
    next_positive_fraction,
)
from tf_medseg.training.build import build_sampler


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


def test_checkpoint_round_trip_of_the_fraction_and_the_warm_up(tmp_path):
    sampler = AdaptiveSampler(warmup_validations=1)
    sampler.positive_fraction.assign(0.73)
    sampler.update_from_sums(_sums(r_fp=0.996, r_fn=0.009))  # the warm-up's one validation
    path = tf.train.Checkpoint(sampler=sampler).save(str(tmp_path / "ckpt"))
    sampler.positive_fraction.assign(0.2)
    sampler.update_from_sums(_sums(r_fp=0.5, r_fn=0.5))

    restored = AdaptiveSampler(warmup_validations=1)
    tf.train.Checkpoint(sampler=restored).restore(path).assert_consumed()
    assert float(restored.positive_fraction.numpy()) == pytest.approx(0.73)
    assert int(restored.validations_seen.numpy()) == 1 and not restored.warmed_up.numpy()
    tf.train.Checkpoint(sampler=sampler).restore(path).assert_consumed()
    assert float(sampler.positive_fraction.numpy()) == pytest.approx(0.73)
    assert int(sampler.validations_seen.numpy()) == 1 and not sampler.warmed_up.numpy()
    # The next validation is the second: past the warm-up, it updates, as it would have.
    assert restored.update_from_sums(_sums(r_fp=0.5, r_fn=1.0))["updated"]


def test_a_checkpoint_without_the_warm_up_state_restores_with_a_fresh_warm_up(tmp_path, caplog):
    """Checkpoints written before the sampler kept its warm-up state held its fraction alone."""
    from tf_medseg.training.build import _restore
    from tf_medseg.training.state import RunState

    def parts():
        model, optimizer = tf.Module(), tf.Module()
        model.w, optimizer.m = tf.Variable([1.0, 2.0]), tf.Variable(0.0)
        return model, optimizer

    model, optimizer = parts()
    old_sampler = tf.train.Checkpoint(positive_fraction=tf.Variable(0.27))
    state = RunState()
    state.step = 40
    state.store()
    old = tf.train.Checkpoint(
        model=model, optimizer=optimizer, sampler=old_sampler, **state.variables_by_name
    )
    path = old.save(str(tmp_path / "ckpt"))
    model, optimizer = parts()
    sampler, state = AdaptiveSampler(warmup_validations=1), RunState()
    now = tf.train.Checkpoint(
        model=model, optimizer=optimizer, sampler=sampler, **state.variables_by_name
    )
    with pytest.raises(AssertionError):  # what a plain restore says
        now.restore(path).assert_existing_objects_matched()
    caplog.set_level("WARNING")
    _restore(now, path, state)
    state.load()
    assert state.step == 40 and float(sampler.positive_fraction.numpy()) == pytest.approx(0.27)
    assert int(sampler.validations_seen.numpy()) == 0 and not sampler.warmed_up.numpy()
    assert any("warm-up starts again" in r.getMessage() for r in caplog.records)


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


def _sums(r_fp: float, r_fn: float, union: int = 1000) -> metrics.ConfusionSums:
    """One class's sums with the given indices: pred = r_fp * union, label = r_fn * union."""
    pred, label = round(r_fp * union), round(r_fn * union)
    return metrics.ConfusionSums([pred + label - union], [pred], [label])


@pytest.mark.parametrize(
    "current, target, damping, expected",
    [
        (0.5, 0.2, 1.0, 0.2),  # the paper: straight there
        (0.5, 0.2, 0.5, 1 / 3),  # r' 1 -> 1/4: the geometric mean 1/2, fraction 1/3
        (0.5, 0.8, 0.5, 2 / 3),  # r' 1 -> 4: 2
        (0.5, 0.8, 0.25, math.sqrt(2) / (1 + math.sqrt(2))),  # r' 4 ** 0.25
        (0.3, 0.3, 0.5, 0.3),
    ],
)
def test_damped_fraction_moves_in_log_odds(current, target, damping, expected):
    assert damped_fraction(current, target, damping) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("args", [(0.5, 0.5, 0.0), (0.5, 0.5, 1.5), (0.0, 0.5, 0.5), (0.5, 1.0, 1)])
def test_damped_fraction_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        damped_fraction(*args)


def test_warm_up_counts_validations_then_waits_for_the_dice_and_stays_over():
    sampler = AdaptiveSampler(warmup_validations=2, warmup_dice=0.1)
    over = _sums(r_fp=0.996, r_fn=0.009)  # an untrained model: foreground nearly everywhere
    steps = [(over, 0.5), (over, 0.5), (over, 0.05), (_sums(0.5, 1.0), 0.3), (over, 0.0)]
    seen = [sampler.update_from_sums(sums, mean_dice=dice) for sums, dice in steps]
    assert [s["updated"] for s in seen] == [False, False, False, True, True]
    assert [s["positive_fraction"] for s in seen[:3]] == [0.5, 0.5, 0.5]
    assert seen[3]["positive_fraction"] == pytest.approx(2 / 3, rel=1e-6)  # r' = 2
    assert seen[4]["positive_fraction"] == pytest.approx(0.1)  # once over, Dice no longer counts
    assert seen[2]["target_fraction"] == pytest.approx(0.1)  # reported during the warm-up too
    # A NaN Dice (no validation case with foreground) does not end the warm-up.
    nan = AdaptiveSampler(warmup_dice=0.1)
    assert not nan.update_from_sums(over, mean_dice=math.nan)["updated"]
    # Without a Dice only the count is checked.
    assert AdaptiveSampler(warmup_dice=0.1).update_from_sums(_sums(0.5, 1.0))["updated"]


def test_the_reported_start_starves_the_foreground_with_the_papers_sampler_only():
    """Issue #19: the first validation of an untrained model (r_FP 0.996, r_FN 0.009)."""
    over = _sums(r_fp=0.996, r_fn=0.009)
    paper = build_sampler(TrainConfig(**PAPER_SAMPLER))
    assert paper.update_from_sums(over, mean_dice=0.01)["positive_fraction"] == pytest.approx(0.1)
    default = build_sampler(TrainConfig())
    fractions = [default.update_from_sums(over, mean_dice=0.01)["positive_fraction"]]
    fractions += [default.update_from_sums(over, mean_dice=0.5)["positive_fraction"]]
    fractions += [default.update_from_sums(over, mean_dice=0.5)["positive_fraction"]]
    assert fractions[0] == 0.5  # the first validation: warm-up
    # Then half the way in log-odds to the floor 1/3 (r' = 1/2) each time: r' = 2 ** -0.5, and
    # 2 ** -0.75; never below the floor.
    assert fractions[1] == pytest.approx(2**-0.5 / (1 + 2**-0.5), rel=1e-6)
    assert fractions[2] == pytest.approx(2**-0.75 / (1 + 2**-0.75), rel=1e-6)


def test_the_papers_settings_are_equation_4_at_every_validation():
    paper = build_sampler(TrainConfig(**PAPER_SAMPLER))
    rng = np.random.default_rng(0)
    for _ in range(6):
        r_fp, r_fn = rng.uniform(0.05, 1.0, size=2)
        stats = paper.update_from_sums(_sums(r_fp, r_fn, union=10**6), mean_dice=0.0)
        expected = next_positive_fraction(stats["r_fp"], stats["r_fn"])
        assert stats["updated"] and stats["positive_fraction"] == pytest.approx(expected, rel=1e-6)
    # The constructor's defaults are the paper's.
    default = AdaptiveSampler()
    assert (default.warmup_validations, default.warmup_dice, default.damping) == (0, 0.0, 1.0)
    assert default.bounds == PAPER_SAMPLER["pos_fraction_bounds"]
