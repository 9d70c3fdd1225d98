"""Tests of tf_medseg.metrics: confusion sums, Dice, FP/FN indices (eqs. 5, 6), case means."""

import dataclasses
import warnings

import numpy as np
import pytest

from tf_medseg.metrics import (
    ConfusionSums,
    confusion_sums,
    dice_from_sums,
    dice_per_class,
    fp_fn_from_sums,
    fp_fn_per_class,
    mean_dice,
    mean_dice_per_class,
)


def random_labels(shape=(16, 16, 16), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, shape).astype(np.uint8)


def numpy_dice(pred, true, num_classes):
    """Brute-force per-class Dice with NaN for an empty label."""
    dice = []
    for c in range(1, num_classes):
        p, g = (pred == c).astype(np.float64), (true == c).astype(np.float64)
        dice.append(np.nan if g.sum() == 0 else 2 * (p * g).sum() / (p.sum() + g.sum()))
    return np.array(dice)


def test_confusion_sums_match_brute_force():
    pred, true = random_labels(seed=1), random_labels(seed=2)
    sums = confusion_sums(pred, true, 3)
    for index, c in enumerate([1, 2]):
        assert sums.intersection[index] == np.sum((pred == c) & (true == c))
        assert sums.pred_volume[index] == np.sum(pred == c)
        assert sums.label_volume[index] == np.sum(true == c)
    assert sums.to_array().dtype == np.int64 and sums.to_array().shape == (3, 2)


def test_dice_per_class_matches_numpy():
    pred, true = random_labels(num_classes=4, seed=3), random_labels(num_classes=4, seed=4)
    np.testing.assert_allclose(dice_per_class(pred, true, 4), numpy_dice(pred, true, 4), rtol=1e-12)


def test_dice_edge_cases():
    true = np.zeros((8, 8, 8), np.int32)
    true[:4] = 1  # class 1 present, class 2 absent
    np.testing.assert_array_equal(dice_per_class(true, true, 3), [1.0, np.nan])
    # All-zero prediction: Dice 0 where the label has the class, NaN where it has not.
    np.testing.assert_array_equal(dice_per_class(np.zeros_like(true), true, 3), [0.0, np.nan])
    # All-zero label: every class undefined, whatever was predicted.
    np.testing.assert_array_equal(dice_per_class(true, np.zeros_like(true), 3), [np.nan] * 2)
    # Half the voxels of class 1 found, nothing else predicted: 2 * 128 / (128 + 256).
    pred = np.zeros_like(true)
    pred[:2] = 1
    np.testing.assert_allclose(dice_per_class(pred, true, 3), [2 / 3, np.nan])


def test_sums_add_across_split_volumes():
    pred, true = random_labels(seed=5), random_labels(seed=6)
    halves = [confusion_sums(pred[:8], true[:8], 3), confusion_sums(pred[8:], true[8:], 3)]
    total = halves[0] + halves[1]
    assert total == confusion_sums(pred, true, 3)
    assert ConfusionSums.zeros(3) + total == total
    np.testing.assert_allclose(dice_from_sums(total), numpy_dice(pred, true, 3), rtol=1e-12)


def test_to_array_round_trip_and_immutability():
    sums = ConfusionSums([1, 2], [3, 4], [5, 6])
    array = sums.to_array()
    np.testing.assert_array_equal(array, [[1, 2], [3, 4], [5, 6]])
    assert ConfusionSums.from_array(array) == sums
    with pytest.raises(dataclasses.FrozenInstanceError):
        sums.intersection = np.zeros(2)
    with pytest.raises(ValueError):
        sums.intersection[0] = 7
    with pytest.raises(ValueError, match=r"\(3, num_classes - 1\)"):
        ConfusionSums.from_array(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="different shapes"):
        ConfusionSums([1], [1, 2], [1, 2])


def test_fp_fn_hand_computed():
    # Class 1: pred 4 voxels, label 2 inside them -> union 4: r_fp 4/4, r_fn 2/4.
    # Class 2: pred 1 voxel, label 3 elsewhere -> union 4: r_fp 1/4, r_fn 3/4.
    # Class 3: nothing predicted, nothing labelled -> 1, 1.
    pred = np.zeros(16, np.int64)
    true = np.zeros(16, np.int64)
    pred[0:4] = 1
    true[0:2] = 1
    pred[4] = 2
    true[5:8] = 2
    sums = confusion_sums(pred, true, 4)
    np.testing.assert_array_equal(sums.to_array(), [[2, 0, 0], [4, 1, 0], [2, 3, 0]])
    r_fp, r_fn = fp_fn_from_sums(sums)
    assert r_fp == pytest.approx((1.0 + 0.25 + 1.0) / 3, abs=1e-12)
    assert r_fn == pytest.approx((0.5 + 0.75 + 1.0) / 3, abs=1e-12)
    per_fp, per_fn = fp_fn_per_class(sums)
    np.testing.assert_allclose(per_fp, [1.0, 0.25, 1.0], atol=1e-12)
    np.testing.assert_allclose(per_fn, [0.5, 0.75, 1.0], atol=1e-12)


def test_fp_fn_extremes():
    true = random_labels(seed=7)
    assert fp_fn_from_sums(confusion_sums(true, true, 3)) == (1.0, 1.0)
    # Nothing predicted: no false positives, all false negatives.
    assert fp_fn_from_sums(confusion_sums(np.zeros_like(true), true, 3)) == (0.0, 1.0)
    # Nothing labelled: all false positives.
    assert fp_fn_from_sums(confusion_sums(true, np.zeros_like(true), 3)) == (1.0, 0.0)


def test_fp_fn_matches_equations_5_and_6():
    pred, true = random_labels(seed=8), random_labels(seed=9)
    r_fp, r_fn = fp_fn_from_sums(confusion_sums(pred, true, 3))
    fp, fn = [], []
    for c in [1, 2]:
        p, g = (pred == c).astype(np.float64), (true == c).astype(np.float64)
        union = (p + g - p * g).sum()
        fp.append((p * (1 - g) + p * g).sum() / union)  # left-hand form of equation 5
        fn.append(((1 - p) * g + p * g).sum() / union)  # left-hand form of equation 6
    assert r_fp == pytest.approx(np.mean(fp), abs=1e-12)
    assert r_fn == pytest.approx(np.mean(fn), abs=1e-12)


def test_mean_dice_per_class_over_cases_then_over_classes():
    per_case = np.array([[0.5, np.nan], [np.nan, np.nan], [1.0, 0.0]])
    # Class means 0.75 and 0.0 -> 0.375 (per case first: 0.5 and 0.5 -> 0.5).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mean_dice(per_case) == pytest.approx(0.375)
        np.testing.assert_allclose(mean_dice_per_class(per_case), [0.75, 0.0])
        assert np.isnan(mean_dice(np.full((2, 2), np.nan)))
        np.testing.assert_array_equal(mean_dice_per_class(np.full((2, 2), np.nan)), [np.nan] * 2)
    assert mean_dice(np.array([0.2, 0.4])) == pytest.approx(0.3)


def test_bad_inputs_raise():
    labels = random_labels()
    with pytest.raises(ValueError, match="differs from label shape"):
        confusion_sums(labels[:8], labels, 3)
    with pytest.raises(ValueError, match=r"outside the 2 classes"):
        confusion_sums(labels, labels, 2)
    with pytest.raises(ValueError, match="integer class labels"):
        confusion_sums(labels.astype(np.float32), labels, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        confusion_sums(labels, labels, 1)
