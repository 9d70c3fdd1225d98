"""The plateau stop and decay (pure), the schedules' lengths, and both in a training run."""

from __future__ import annotations

import json
import math

import pytest
import tensorflow as tf
from tiny_config import tiny_config, train_to_end

from tf_medseg import config as config_lib
from tf_medseg import optim
from tf_medseg.planning import rules as plan
from tf_medseg.training.checks import ConfigError
from tf_medseg.training.loop import Trainer
from tf_medseg.training.plateau import PlateauRule, PlateauState, advance
from tf_medseg.training.state import TIME_PARTS


def _walk(rule, dices):
    state, steps = PlateauState(), []
    for dice in dices:
        step = advance(rule, state, dice)
        state = step.state
        steps.append(step)
    return steps


def test_a_gain_is_a_rise_above_the_last_gain_by_more_than_min_delta():
    steps = _walk(PlateauRule(patience=3, min_delta=0.01), [0.5, 0.505, 0.509, 0.515, 0.52])
    # 0.505 and 0.509 are within 0.01 of 0.5: no gain, and the reference stays at 0.5 (it does
    # not creep up with them); 0.515 is a gain over 0.5 and restarts the count.
    assert [s.state.stale for s in steps] == [0, 1, 2, 0, 1]
    assert [s.state.reference for s in steps] == [0.5, 0.5, 0.5, 0.515, 0.515]
    assert not any(s.stop for s in steps)


def test_the_run_stops_after_patience_validations_without_a_gain_and_nan_is_no_gain():
    steps = _walk(PlateauRule(patience=3), [0.6, 0.7, 0.69, float("nan"), 0.7005])
    assert [s.stop for s in steps] == [False, False, False, False, True]
    assert steps[-1].state.stale == 3
    assert not any(s.stop for s in _walk(PlateauRule(patience=0), [0.5] * 50))


def test_the_decay_comes_every_decay_patience_validations_down_to_the_floor():
    rule = PlateauRule(patience=0, decay_patience=2, decay_factor=0.5, min_scale=0.2)
    steps = _walk(rule, [0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert [s.decayed for s in steps] == [False, False, True, False, True] + [False, False] + [
        True,
        False,
        False,  # at the floor: 0.25 x 0.5 would be below 0.2
    ]
    assert [s.state.scale for s in steps][-1] == pytest.approx(0.2)
    # A gain keeps the lowered rate (it restarts the counts, not the rate).
    assert steps[5].state.scale == 0.25 and steps[5].state.since_decay == 0


def test_rule_errors_name_the_flags():
    errors = PlateauRule(patience=-1, min_delta=1.5, decay_patience=-2, decay_factor=1.0).errors()
    assert [e.split()[0] for e in errors] == [
        "--patience",
        "--min_delta",
        "--lr_decay_patience",
        "--lr_decay_factor",
    ]


def test_the_config_checks_the_schedule_and_plateau_flags(tmp_path):
    base = dict(data_dir="d", workdir=str(tmp_path))
    bad = config_lib.TrainConfig(**base, lr_schedule="plateau", budget_minutes=-1)
    assert bad.validate() == [
        "--lr_schedule=plateau needs --lr_decay_patience or --patience",
        "--budget_minutes must be >= 0, got -1",
    ]
    assert (
        "--lr_schedule must be one of"
        in config_lib.TrainConfig(**base, lr_schedule="step").validate()[0]
    )
    good = config_lib.TrainConfig(**base, lr_schedule="plateau", patience=9)
    assert good.validate() == [] and good.plateau_rule().decay_patience == 4
    # Without the plateau schedule the patience stops, but nothing decays.
    assert config_lib.TrainConfig(**base, patience=9).plateau_rule().decay_patience == 0


def test_a_config_json_with_the_old_max_minutes_reads_as_the_budget(tmp_path):
    text = config_lib.TrainConfig(data_dir="d", workdir="w").to_json()
    old = text.replace('"budget_minutes": 0.0', '"max_minutes": 12.5')
    assert '"max_minutes"' in old
    assert config_lib.TrainConfig.from_json(old).budget_minutes == 12.5


def test_the_cosine_anneals_over_the_budget_when_it_ends_first_and_plateau_scales():
    schedule = optim.WarmupSchedule(1.0, total_steps=1000, decay="cosine")
    assert float(schedule(100)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)), 1e-6)
    schedule.set_time_fraction(0.5)  # half the budget spent at step 100 of 1000
    assert float(schedule(100)) == pytest.approx(0.5, 1e-6)
    schedule.set_time_fraction(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    flat = optim.WarmupSchedule(2.0, total_steps=10, decay="plateau")
    flat.set_scale(0.25)
    assert float(flat(5)) == pytest.approx(0.5) and float(flat(500)) == pytest.approx(0.5)
    optimizer = optim.build_optimizer("adam", 1.0, 10, "plateau", mixed_float16=True)
    assert isinstance(optim.learning_rate_schedule(optimizer), optim.WarmupSchedule)


def test_the_plan_stops_on_a_plateau_or_anneals_over_a_budget():
    settings, _ = plan.stopping(steps_per_validation=13)
    assert settings == {"lr_schedule": "constant", "patience": math.ceil(400 / 13)}
    assert plan.stopping(steps_per_validation=1000)[0]["patience"] == plan.MIN_PATIENCE
    budget, reasons = plan.stopping(steps_per_validation=13, budget_minutes=30)
    assert budget == {"lr_schedule": "cosine", "budget_minutes": 30.0, "patience": 0}
    assert "anneals" in reasons["lr_schedule"]


def test_a_run_on_a_plateau_decays_its_rate_stops_and_says_why(spleen_task_dir, tmp_path):
    # No Dice rises by 1.0: every validation after the first is without a gain.
    plateau = dict(
        epochs=20,
        val_every=1,
        patience=3,
        min_delta=1.0,
        lr_schedule="plateau",
        lr_decay_patience=1,
        lr_decay_factor=0.5,
        optimizer="adam",
        learning_rate=1e-3,
    )
    trainer, summary = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", **plateau))
    assert summary["epochs"] == 4  # the reference, then 3 without a gain
    assert summary["stop_reason"].startswith("plateau: no validation Dice above")
    assert "--patience=3" in summary["stop_reason"]
    assert summary["learning_rate_scale"] == 0.125  # a decay at each of the 3
    assert optim.current_learning_rate(trainer.optimizer) == pytest.approx(1.25e-4)


def test_a_resumed_run_keeps_its_decays_and_counts(spleen_task_dir, tmp_path):
    plateau = dict(
        val_every=1,
        patience=4,
        min_delta=1.0,
        lr_schedule="plateau",
        lr_decay_patience=1,
        optimizer="adam",
        learning_rate=1e-3,
    )
    train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2, **plateau))
    second = Trainer(tiny_config(spleen_task_dir, tmp_path / "run", epochs=10, **plateau))
    try:
        assert (second.state.lr_scale, second.state.plateau_stale) == (0.5, 1)
        summary = second.fit()
    finally:
        second.close()
    # Three more validations without a gain: 4 in all, the stop; the rate halved at each.
    assert summary["epochs"] == 5 and summary["stop_reason"].startswith("plateau")
    assert summary["learning_rate_scale"] == 0.0625
    assert optim.current_learning_rate(second.optimizer) == pytest.approx(6.25e-5)


def test_the_budget_stops_the_run_and_the_cosine_knows_the_time_spent(spleen_task_dir, tmp_path):
    config = tiny_config(
        spleen_task_dir,
        tmp_path / "run",
        epochs=100000,
        lr_schedule="cosine",
        budget_minutes=0.25,
        val_every=5,
    )
    trainer, summary = train_to_end(config)
    assert summary["stop_reason"] == "reached --budget_minutes=0.25"
    assert 15.0 <= summary["wall_s"] < 60.0
    schedule = optim.learning_rate_schedule(trainer.optimizer)
    fraction = float(schedule.time_fraction.numpy())
    # Set at the last epoch end, at or just before the bound (steps alone: far from annealed).
    assert 0.8 <= fraction <= 1.0
    total = 100000 * trainer.steps_per_epoch
    assert summary["steps"] < 0.01 * total
    annealed = 0.5 * (1.0 + math.cos(math.pi * max(fraction, summary["steps"] / total)))
    # float32's cosine near its end: an absolute tolerance of a millionth of the peak rate.
    assert optim.current_learning_rate(trainer.optimizer) == pytest.approx(
        config.learning_rate * annealed, rel=1e-4, abs=1e-6 * config.learning_rate
    )


def test_reached_epochs_is_the_stop_reason_and_the_time_split_adds_up(spleen_task_dir, tmp_path):
    _, summary = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2))
    assert summary["stop_reason"] == "reached --epochs=2"
    split = summary["time_split"]
    assert list(split) == [*TIME_PARTS, "other"]
    for part in ("cache_fill", "graph", "training", "validation", "checkpoints"):
        assert split[part] > 0, part
    # The parts and the rest are this session's wall time (the summary's, taken just before).
    assert sum(split.values()) == pytest.approx(summary["wall_s"], abs=0.5)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["time_split"]["postprocessing"] == split["postprocessing"] > 0


def test_plateau_flags_out_of_range_stop_the_trainer_in_one_line_each(spleen_task_dir, tmp_path):
    config = tiny_config(spleen_task_dir, tmp_path / "run", patience=-1, lr_decay_factor=2.0)
    with pytest.raises(ConfigError) as err:
        Trainer(config)
    assert str(err.value).splitlines() == [
        "--patience must be >= 0, got -1",
        "--lr_decay_factor must be in (0, 1), got 2.0",
    ]
    tf.keras.backend.clear_session()


def test_the_plateau_benchmarks_table_gives_medians_ranges_and_the_time_saved():
    from tf_medseg.bench import plateau_stop

    def run(config, seed, wall, dice, curve=()):
        return {"task": "spleen", "config": config, "seed": seed, "wall_s": wall,
                "best_dice": dice, "curve": list(curve)}  # fmt: skip

    records = [
        run("decay", 0, 190.0, 0.95),
        run("decay", 1, 250.0, 0.96),
        run("decay", 2, 310.0, 0.94),
        run("reference", 0, 600.0, 0.97, [[100.0, 0.9, 10], [180.0, 0.955, 20], [590, 0.97, 50]]),
    ]
    text = plateau_stop.table(records, reference_minutes=10.0)
    decayed = next(line for line in text.splitlines() if " decay " in line)
    assert "250 (190-310)" in decayed and "0.95 (0.94-0.96)" in decayed
    assert decayed.rstrip().endswith("350 (290-410)")  # 600 s less each run's wall time
    assert "decay 190 s: 0.9550 (stopped run 0.9500); at 600 s: 0.9700" in text
