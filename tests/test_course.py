"""The run's course on its own: when it validates, checkpoints and stops, what a validation
changes (no model, no data: a run state, an optimiser and validation results)."""

from __future__ import annotations

import types

import pytest

from tf_medseg import distributed, optim
from tf_medseg.config import TrainConfig
from tf_medseg.training.course import Course
from tf_medseg.training.state import RunState


def _course(**flags) -> Course:
    config = TrainConfig(data_dir="d", workdir="w", optimizer="adam", learning_rate=1.0, **flags)
    optimizer = optim.build_optimizer("adam", 1.0, 1000, config.lr_schedule)
    return Course(config, RunState(), distributed.Distributed(), optimizer)


def _result(dice: float):
    return types.SimpleNamespace(mean_dice=dice)


def test_validation_and_checkpoint_epochs():
    course = _course(val_every=3, checkpoint_every=2)
    assert [e for e in range(1, 10) if course.validates_after(e)] == [3, 6, 9]
    assert [e for e in range(1, 7) if course.checkpoints_after(e)] == [2, 4, 6]


def test_a_validation_records_the_best_and_the_first_time_at_the_target():
    course = _course(target_dice=0.8)
    state = course.state
    state.step = 10
    assert course.record(_result(0.5)) and state.best_dice == 0.5 and state.best_step == 10
    state.step = 20
    assert not course.record(_result(0.4)) and state.best_step == 10
    assert not course.record(_result(float("nan")))
    state.step = 30
    assert course.record(_result(0.85)) and state.steps_to_target == 30
    state.step = 40
    course.record(_result(0.9))
    assert state.steps_to_target == 30 and state.best_step == 40  # the first time, the best


def test_after_validation_decays_the_rate_and_stops_on_a_plateau_or_the_target():
    course = _course(patience=3, min_delta=1.0, lr_schedule="plateau", lr_decay_patience=1)
    for dice in (0.5, 0.5, 0.5):
        course.after_validation(_result(dice))
        assert course.state.stop_reason is None
    assert optim.current_learning_rate(course.optimizer) == pytest.approx(0.25)
    course.after_validation(_result(0.5))
    assert course.state.stop_reason.startswith("plateau: ")
    target = _course(target_dice=0.8)
    target.after_validation(_result(0.79))
    assert target.state.stop_reason is None
    target.after_validation(_result(0.8))
    assert target.state.stop_reason == "validation Dice 0.8000 reached --target_dice 0.8"


def test_a_resumed_course_puts_the_decayed_rate_back():
    course = _course(patience=4, lr_schedule="plateau")
    course.state.lr_scale = 0.125
    assert optim.current_learning_rate(course.optimizer) == pytest.approx(1.0)
    course.begin()
    assert optim.current_learning_rate(course.optimizer) == pytest.approx(0.125)


def test_the_step_bound_and_the_budget_stop_the_run():
    course = _course(max_steps=5)
    course.state.step = 4
    course.after_step()
    assert course.state.stop_reason is None
    course.state.step = 5
    course.after_step(synced=False)
    assert course.state.stop_reason == "reached --max_steps"
    timed = _course(budget_minutes=1.0, lr_schedule="cosine")
    timed.after_epoch()
    assert timed.state.stop_reason is None
    timed.state.elapsed_s = 61.0  # an earlier session's minute
    timed.after_epoch()
    assert timed.state.stop_reason == "reached --budget_minutes=1"
    # The cosine knows the whole budget is spent: annealed to its floor.
    assert optim.current_learning_rate(timed.optimizer) == pytest.approx(0.0, abs=1e-6)


def test_with_native_validation_the_target_is_the_labels_geometrys():
    course = _course(target_dice=0.8)
    state = course.state
    state.step = 10
    # The grid says 0.85, the labels' geometry 0.75: not reached; the best is the grid's.
    assert course.record(_result(0.85), native=_result(0.75))
    course.after_validation(_result(0.85), native=_result(0.75))
    assert not state.reached_target() and state.stop_reason is None and state.best_dice == 0.85
    state.step = 20
    course.record(_result(0.84), native=_result(0.81))
    course.after_validation(_result(0.84), native=_result(0.81))
    assert state.steps_to_target == 20
    assert state.stop_reason == (
        "validation Dice in the labels' geometry 0.8100 reached --target_dice 0.8"
    )
