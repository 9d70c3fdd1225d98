"""Post-processing chosen by validation (tf_medseg.postprocessing): per class, the largest
component only where it raises the mean validation Dice."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.inference.window import keep_largest_component
from tf_medseg.metrics import dice_per_class
from tf_medseg.postprocessing import PostprocessingDecision, decide, read_decision


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 32^3 case: class 1 an organ (one block) predicted with a stray island; class 2 two
    lesions, both predicted (the smaller one is not the largest component)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((32, 32, 32), np.uint8)
    label[4:16, 4:16, 4:16] = 1
    a, b = 20 + rng.integers(0, 3), 26
    label[a : a + 5, 4:9, 4:9] = 2
    label[b : b + 3, 20:23, 20:23] = 2
    pred = label.copy()
    pred[20:23, 20:23, 4:7] = 1  # a false island of the organ
    return pred, label


def test_the_organ_keeps_its_largest_component_and_the_lesions_do_not():
    cases = [_case(s) for s in range(3)]
    decision = decide(cases, num_classes=3)
    assert decision.keep_largest == (1,)
    assert decision.cases == 3
    # The figures it rests on, against a direct computation.
    organ_without = np.mean([dice_per_class(p, g, 3)[0] for p, g in cases])
    assert decision.dice_without[0] == pytest.approx(organ_without)
    assert decision.dice_with[0] == pytest.approx(1.0)
    assert decision.dice_with[1] < decision.dice_without[1] == pytest.approx(1.0)
    # Applied: the organ's island goes, both lesions stay.
    pred, label = cases[0]
    cleaned = decision.apply(pred)
    np.testing.assert_array_equal(cleaned, label)
    assert "class 1" in decision.describe() and "left as predicted" in decision.describe()


def test_no_gain_no_post_processing_and_a_class_never_labelled_is_left_alone():
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:8, 2:8, 2:8] = 1
    decision = decide([(label.copy(), label)], num_classes=3)
    assert decision.keep_largest == ()
    assert np.isnan(decision.dice_without[1]) and np.isnan(decision.dice_with[1])
    # min_gain: a gain below it is not taken.
    pred = label.copy()
    pred[12, 12, 12] = 1
    small = decide([(pred, label)], num_classes=2)
    assert small.keep_largest == (1,)
    assert decide([(pred, label)], num_classes=2, min_gain=0.01).keep_largest == ()
    with pytest.raises(ValueError, match="no validation cases"):
        decide([], num_classes=2)


def test_the_decision_round_trips_through_the_run_folder(tmp_path):
    decision = decide([_case(0)], num_classes=3)
    assert read_decision(str(tmp_path)) is None
    (tmp_path / "postprocessing.json").write_text(decision.to_json())
    assert read_decision(str(tmp_path)) == decision
    nan = PostprocessingDecision((), (float("nan"),), (float("nan"),), 1)
    again = PostprocessingDecision.from_json(nan.to_json())
    assert np.isnan(again.dice_without[0]) and again.keep_largest == ()


# ------------------------------------------------------------------ the run folder, predict, export
def _test_image(trained) -> str:
    folder = os.path.join(trained["data"], "imagesTs")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def _with_decision(trained, tmp_path, name: str, keep: tuple[int, ...]) -> str:
    """A copy of the trained run folder whose postprocessing.json keeps ``keep``."""
    folder = str(tmp_path / name)
    shutil.copytree(trained["workdir"], folder, ignore=shutil.ignore_patterns("checkpoints"))
    decision = PostprocessingDecision(keep, (0.5,), (0.6 if keep else 0.4,), 1)
    with open(os.path.join(folder, "postprocessing.json"), "w") as f:
        f.write(decision.to_json())
    return folder


def test_training_writes_the_choice_its_validation_made(trained):
    decision = read_decision(trained["workdir"])
    assert decision is not None and decision.cases == 1
    assert len(decision.dice_without) == len(decision.dice_with) == 1
    gained = decision.dice_with[0] > decision.dice_without[0]
    assert decision.keep_largest == ((1,) if gained else ())


def test_predict_and_ensembles_apply_the_choice_and_a_flag_overrides_it(trained, tmp_path, caplog):
    from tf_medseg.inference.segmenter import Segmenter

    image = _test_image(trained)
    keep = _with_decision(trained, tmp_path, "keep", (1,))
    leave = _with_decision(trained, tmp_path, "leave", ())
    raw = Segmenter.load(keep, keep_largest=False)
    assert not raw.settings.keep_largest
    labels, _ = raw.segment(image)
    kept = Segmenter.load(keep)
    assert kept.settings.keep_largest and kept.settings.largest_classes == (1,)
    np.testing.assert_array_equal(kept.segment(image)[0], keep_largest_component(labels))
    assert not Segmenter.load(leave).settings.keep_largest
    # An ensemble keeps what every model chose, and says so when they differ.
    with caplog.at_level(logging.WARNING):
        both = Segmenter.load([keep, leave])
    assert not both.settings.keep_largest and both.settings.largest_classes == ()
    assert any("chose the largest component" in r.getMessage() for r in caplog.records)
    assert Segmenter.load([keep, keep]).settings.largest_classes == (1,)


def test_the_serving_export_bakes_the_choice_in(trained, tmp_path):
    from tf_medseg.inference.segmenter import Segmenter
    from tf_medseg.inference.serving import components as serving_components
    from tf_medseg.inference.serving import spec as serving_spec

    keep = _with_decision(trained, tmp_path, "keep", (1,))
    segmenter = Segmenter.load(keep)
    spec = serving_spec.spec_from_chain(segmenter.preprocessing, segmenter.settings)
    assert spec.window.keep_largest and spec.window.largest_classes == (1,)
    labels = np.zeros((8, 8, 8), np.int32)
    labels[0:2, 0:2, 0:2] = 1
    labels[5:8, 5:8, 5:8] = 1
    labels[0, 7, 7] = 2
    classes = spec.window.largest_classes
    got = serving_components.keep_largest(tf.constant(labels), 3, classes).numpy()
    np.testing.assert_array_equal(got, keep_largest_component(labels, classes=[1]))


def test_a_corrupt_choice_is_one_line_naming_the_file(trained, tmp_path):
    from tf_medseg.inference.segmenter import ModelError, Segmenter

    folder = _with_decision(trained, tmp_path, "cut", (1,))
    path = os.path.join(folder, "postprocessing.json")
    with open(path, "w") as f:
        f.write('{"keep_largest": [1], "dice_wi')
    with pytest.raises(ModelError, match="not a readable post-processing choice") as err:
        Segmenter.load(folder)
    assert path in str(err.value) and "\n" not in str(err.value)
