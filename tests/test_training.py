"""The training engine end to end on a tiny synthetic task: outputs, resume, policies."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tiny_config import TINY_FLAGS, tiny_config, train_to_end, validations

from tf_medseg.config import PAPER_SAMPLER
from tf_medseg.training import hooks as hooks_lib
from tf_medseg.training.checks import ConfigError
from tf_medseg.training.interrupts import Interrupts
from tf_medseg.training.loop import Trainer


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def test_end_to_end_writes_every_output(spleen_task_dir, tmp_path):
    trainer, summary = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2))
    workdir = str(tmp_path / "run")
    # 2 cached items x 2 samples / batch 2 = 2 steps per epoch.
    assert summary["steps"] == 4 and summary["epochs"] == 2
    for key in ("best_dice", "best_step", "best_wall_s", "time_to_target_s", "patches_per_s"):
        assert key in summary
    assert 0.0 <= summary["best_dice"] <= 1.0 and summary["patches_per_s"] > 0
    # Two epochs: the second, without the first's tracing, is counted on its own too.
    assert summary["steady_patches_per_s"] > 0
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert set(line) >= {"step", "epoch", "wall_s", "dice", "mean_dice", "r_fp", "r_fn"}
        assert "spleen" in line["dice"]
        # Per class beside the average (issue #17); one class: the same numbers.
        assert line["r_fp_per_class"] == {"spleen": line["r_fp"]}
        assert line["r_fn_per_class"] == {"spleen": line["r_fn"]}
        assert {"positive_fraction", "equation_4_fraction", "sampler_updated"} <= set(line)
    assert lines[0]["sampler_updated"] is False  # the default warm-up: one validation
    assert glob.glob(os.path.join(workdir, "checkpoints", "ckpt-4.index"))
    assert os.path.isfile(os.path.join(workdir, "best_model.keras"))
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["patch_size"] == [16, 16, 16]
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            tags.add(value.tag)
    assert {"val/mean_dice", "val/dice_spleen", "val/r_fp", "sampler/positive_fraction"} <= tags
    assert {"val/r_fp_spleen", "val/r_fn_spleen", "sampler/equation_4_fraction"} <= tags
    assert {"train/patches_per_s", "cache/swaps"} <= tags
    assert "val/slice_true_red_pred_green" in tags
    loaded = tf.keras.models.load_model(os.path.join(workdir, "best_model.keras"))
    x = np.zeros((1, 16, 16, 16, 1), np.float32)
    assert loaded(x).shape == (1, 16, 16, 16, 2)


def test_resume_continues_from_saved_step_and_optimizer_state(spleen_task_dir, tmp_path):
    first, _ = train_to_end(
        tiny_config(spleen_task_dir, tmp_path / "run", epochs=1, optimizer="adam")
    )
    saved_weights = [v.numpy() for v in first.model.trainable_variables]
    saved_slots = [v.numpy() for v in first.optimizer.variables()]
    saved_cache = json.loads(first.state.cache_state)
    second = Trainer(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2, optimizer="adam"))
    try:
        assert second.restored_from is not None
        assert second.state.step == 2 and second.state.epoch == 1
        assert int(second.optimizer.iterations.numpy()) == 2
        for a, b in zip(saved_weights, second.model.trainable_variables, strict=True):
            np.testing.assert_array_equal(a, b.numpy())
        restored_slots = [v.numpy() for v in second.optimizer.variables()]
        assert len(restored_slots) == len(saved_slots)
        for a, b in zip(saved_slots, restored_slots, strict=True):
            np.testing.assert_array_equal(a, b)
        assert second.train_source.state()["epoch"] == saved_cache["epoch"] == 1
        summary = second.fit()
    finally:
        second.close()
    assert summary["steps"] == 4 and len(second.state.losses) == 2


@pytest.mark.parametrize(
    "change,said",
    [
        ({"cache_num": 3}, "cache_num 2 -> 3"),
        ({"cache": "none"}, None),
    ],
)
def test_resume_into_a_changed_cache_says_what_changed_and_refills(
    spleen_task_dir, tmp_path, caplog, change, said
):
    first, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", epochs=1, seed=0))
    del first
    caplog.set_level("WARNING")
    second = Trainer(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2, **change))
    try:
        assert second.restored_from is not None and second.state.step == 2
        summary = second.fit()
    finally:
        second.close()
    assert summary["epochs"] == 2
    if said:
        (line,) = [r.getMessage() for r in caplog.records if "another run" in r.getMessage()]
        assert said in line and line.endswith("the cache starts afresh")


def test_val_tta_validates_with_the_mean_over_the_mirrored_windows(spleen_task_dir, tmp_path):
    from tf_medseg.inference.window import flip_combinations

    trainer, summary = train_to_end(
        tiny_config(spleen_task_dir, tmp_path / "run", epochs=1, val_tta=True)
    )
    assert 0.0 <= summary["best_dice"] <= 1.0
    windows = tf.random.stateless_normal((1, 16, 16, 16, 1), (4, 2))
    mirrored = [
        np.flip(trainer.model(np.flip(windows.numpy(), a), training=False).numpy(), a)
        for a in flip_combinations()
    ]
    got = trainer.validator.training_predictor(windows)
    np.testing.assert_allclose(got, np.mean(mirrored, axis=0), atol=1e-5)
    assert not np.allclose(got, mirrored[0], atol=1e-4)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_policies_run_with_finite_loss(spleen_task_dir, tmp_path, policy):
    trainer, summary = train_to_end(
        tiny_config(spleen_task_dir, tmp_path / policy, precision=policy, epochs=1)
    )
    assert len(trainer.state.losses) == 2 and np.all(np.isfinite(trainer.state.losses))
    scaled = isinstance(trainer.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")
    assert trainer.model.layers[-1].dtype_policy.compute_dtype == "float32"


#: A smart cache holding half of the 4 training items and replacing half of itself per epoch.
REPLACING = dict(seed=3, cache_num=0, cache_rate=0.5, replace_rate=0.5, epochs=6, val_every=2)


def _two_deterministic_runs(data_dir, tmp_path, **overrides):
    """Two runs of the same deterministic configuration: (trainer, workdir) of each."""
    runs = []
    for name in ("a", "b"):
        config = tiny_config(data_dir, tmp_path / name, deterministic=True, **overrides)
        runs.append((train_to_end(config)[0], tmp_path / name))
    return runs


def test_deterministic_runs_give_identical_losses(spleen_task_dir, tmp_path):
    runs = _two_deterministic_runs(
        spleen_task_dir, tmp_path, seed=7, max_steps=20, epochs=100, val_every=100, cache="full"
    )
    assert len(runs[0][0].state.losses) == 20
    assert runs[0][0].state.losses == runs[1][0].state.losses


def test_deterministic_runs_with_a_replacing_smart_cache_are_identical(spleen_task_dir, tmp_path):
    """--deterministic implies --wait_for_replacements: every replacement is swapped in at its
    boundary, so two runs train on the same items in the same epochs, and summary.json says so."""
    runs = _two_deterministic_runs(spleen_task_dir, tmp_path, **REPLACING)
    outcomes = []
    for trainer, workdir in runs:
        metrics = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        outcomes.append((trainer.state.losses, [m["dice"] for m in metrics]))
        cache = json.load(open(workdir / "summary.json"))["cache"]
        assert cache["mode"] == "smart" and cache["wait_for_replacements"]
        assert cache["cache_num"] == 2 and cache["items_in_shard"] == 4
        assert cache["items_replaced"] == 6 and cache["late_swaps"] == 0  # one per boundary
        assert cache["peak_rss_bytes"] > 50 * 2**20
    assert len(outcomes[0][0]) == 12
    assert outcomes[0] == outcomes[1]


class _SignalAfter(hooks_lib.Hook):
    """Records a SIGINT after step ``step``, as the CLI's installed handler does."""

    def __init__(self, interrupts, step):
        self.interrupts, self.step = interrupts, step

    def on_step_end(self, trainer, log):
        if trainer.state.step == self.step:
            self.interrupts.signum = signal.SIGINT


def test_a_run_interrupted_in_the_middle_of_epochs_resumes_exactly(spleen_task_dir, tmp_path):
    """Ctrl-C in the middle of an epoch, twice, each time restarted with the same settings:
    with --deterministic and a replacing smart cache (cache_rate=0.5, replace_rate=0.5) the
    losses, the validations, the sampler's fraction and the best Dice equal those of a run that
    never stopped (3 steps per epoch; stops after steps 5 and 13). The sampler's warm-up spans
    the first validation (at step 6), so the run resumed at step 13 must restore it to update
    the fraction at step 18 as the whole run does."""
    settings = dict(REPLACING, deterministic=True, num_samples=3, sampler_warmup_dice=0.0)
    whole, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "whole", **settings))
    assert whole.steps_per_epoch == 3 and whole.state.step == 18
    workdir = tmp_path / "stopped"
    losses, resumed_at = [], []
    for stop in (5, 13, None):
        trainer = Trainer(tiny_config(spleen_task_dir, workdir, **settings))
        resumed_at.append((trainer.state.step, trainer.state.epoch_step))
        interrupts = Interrupts()
        if stop:
            trainer.hooks.append(_SignalAfter(interrupts, stop))
        try:
            if stop:
                with pytest.raises(KeyboardInterrupt):
                    trainer.fit(interrupts)
            else:
                trainer.fit(interrupts)
        finally:
            trainer.close()
        losses += trainer.state.losses
    assert resumed_at == [(0, 0), (5, 2), (13, 1)]  # (step, steps of its epoch already taken)
    assert losses == whole.state.losses
    assert validations(workdir) == validations(tmp_path / "whole")
    assert [line["step"] for line in validations(workdir)] == [6, 12, 18]
    assert [line["sampler_updated"] for line in validations(workdir)] == [False, True, True]
    summaries = [json.load(open(w / "summary.json")) for w in (workdir, tmp_path / "whole")]
    for key in ("best_dice", "best_step", "steps", "epochs"):
        assert summaries[0][key] == summaries[1][key]
    assert trainer.sampler.positive_fraction.numpy() == whole.sampler.positive_fraction.numpy()
    assert summaries[0]["cache"]["items_replaced"] > 0


def test_an_interrupt_while_the_graph_builds_stops_before_training_and_saves_nothing(
    spleen_task_dir, tmp_path
):
    """A signal recorded while the step is traced (deferred there: raised inside TensorFlow's
    C code it would be printed and lost) ends fit before the first step, as an interrupt
    outside the loop: a plain KeyboardInterrupt, no checkpoint."""
    trainer = Trainer(tiny_config(spleen_task_dir, tmp_path / "run"))
    interrupts = Interrupts()
    trace = trainer.trace_train_step

    def trace_then_signal():
        trace()
        assert interrupts._defer  # tracing runs deferred
        interrupts.signum = signal.SIGINT

    trainer.trace_train_step = trace_then_signal
    try:
        with pytest.raises(KeyboardInterrupt, match="while building the graph") as raised:
            trainer.fit(interrupts)
    finally:
        trainer.close()
    assert type(raised.value) is KeyboardInterrupt and trainer.state.step == 0
    assert not os.path.isdir(tmp_path / "run" / "checkpoints") or not os.listdir(
        tmp_path / "run" / "checkpoints"
    )


def test_a_run_resumed_from_an_older_checkpoint_drops_the_latervalidations(
    spleen_task_dir, tmp_path
):
    """A run killed after its checkpoint at step 6 had validated up to step 12 (the files left
    are those of a finished run whose checkpoint list ends at step 6): resumed, it drops the
    validations after step 6 and writes them again, one line per validation, equal."""
    settings = dict(deterministic=True, seed=3, epochs=6, val_every=2, keep_checkpoints=10)
    whole, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", **settings))
    expected = validations(tmp_path / "run")
    checkpoints = str(tmp_path / "run" / "checkpoints")
    listed = tf.train.get_checkpoint_state(checkpoints)
    paths = list(listed.all_model_checkpoint_paths)
    last = [p.endswith("ckpt-6") for p in paths].index(True) + 1
    tf.compat.v1.train.update_checkpoint_state(
        checkpoints,
        paths[last - 1],
        all_model_checkpoint_paths=paths[:last],
        all_model_checkpoint_timestamps=list(listed.all_model_checkpoint_timestamps)[:last],
    )
    resumed, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", **settings))
    assert resumed.restored_from.endswith("ckpt-6")
    assert resumed.state.losses == whole.state.losses[6:]
    assert validations(tmp_path / "run") == expected


def test_contradictory_flags_are_rejected_one_line_each(spleen_task_dir, tmp_path):
    config = tiny_config(
        spleen_task_dir,
        tmp_path,
        patch_size=(32, 32, 32),
        replace_rate=1.5,
        pos_fraction_bounds=(0.9, 0.1),
    )
    with pytest.raises(ConfigError) as err:
        Trainer(config)
    lines = str(err.value).splitlines()
    assert any("larger than the validation window" in line for line in lines)
    assert any("--replace_rate" in line for line in lines)
    assert any("--pos_fraction_bounds" in line for line in lines)
    assert len(lines) == 3
    assert (
        dataclasses.replace(
            config, patch_size=(16, 16, 16), replace_rate=0.1, pos_fraction_bounds=(0.1, 0.9)
        ).validate()
        == []
    )


def test_sampler_flags_are_checked_one_line_each(spleen_task_dir, tmp_path):
    config = tiny_config(
        spleen_task_dir,
        tmp_path,
        pos_fraction=0.2,  # below the default floor of 1/3
        sampler_warmup_validations=-1,
        sampler_warmup_dice=1.5,
        sampler_damping=0.0,
    )
    lines = config.validate()
    for flag in ("--pos_fraction=0.2 is outside", "--sampler_warmup_validations"):
        assert any(flag in line for line in lines), lines
    for flag in ("--sampler_warmup_dice", "--sampler_damping"):
        assert any(flag in line for line in lines), lines
    assert len(lines) == 4
    paper = dataclasses.replace(config, **PAPER_SAMPLER)
    assert paper.validate() == []  # 0.2 is inside the paper's 0.1-0.9


def _dry_run(data_dir, workdir, *flags):
    import subprocess
    import sys

    from tiny_config import TINY_FLAGS

    return subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, "--dry_run", *flags]
        + [f"--data_dir={data_dir}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sampler_paper_is_the_papers_sampler_and_refuses_a_contradicting_flag(
    spleen_task_dir, tmp_path
):
    names = list(PAPER_SAMPLER)
    default = _dry_run(spleen_task_dir, tmp_path / "default")
    assert default.returncode == 0, default.stderr[-2000:]
    config = json.load(open(tmp_path / "default" / "config.json"))
    assert [config[n] for n in names] == [1, 0.1, 0.5, [1 / 3, 0.9]]
    paper = _dry_run(spleen_task_dir, tmp_path / "paper", "--sampler=paper", "--sampler_damping=1")
    assert paper.returncode == 0, paper.stderr[-2000:]
    config = json.load(open(tmp_path / "paper" / "config.json"))
    assert [config[n] for n in names] == [0, 0.0, 1.0, [0.1, 0.9]]
    refused = _dry_run(spleen_task_dir, tmp_path / "x", "--sampler=paper", "--sampler_damping=0.5")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "--sampler=paper sets --sampler_damping=1, but --sampler_damping=0.5" in line


class _StopWhenLearned(hooks_lib.Hook):
    """Stops the run at the first validation where class ``index`` reaches Dice ``dice``."""

    def __init__(self, index: int, dice: float):
        self.index, self.dice = index, dice

    def on_epoch_end(self, trainer, log):
        v = log.validation
        if v is not None and v.dice[self.index] >= self.dice:
            trainer.state.stop(f"class {self.index} reached Dice {self.dice}")


#: The lesion's Dice that counts as learned, and the steps allowed (issue #19's evidence test).
LESION_DICE, LESION_STEPS = 0.3, 336


def small_lesion_config(data_dir, workdir, **overrides):
    """The default settings (the plan's loss and largest-component rule for the data, the
    sampler's defaults) at a size that trains in seconds: 24^3 patches of 1 mm, validation
    every 48 steps."""
    from tf_medseg.data.msd import load_task
    from tf_medseg.planning import fingerprint, system
    from tf_medseg.planning import rules as plan

    fp = fingerprint.fingerprint(
        load_task(data_dir), folders=[str(workdir) + "_plan"], num_workers=2
    )
    planned = plan.make_plan(fp, system.describe_machine("cpu")).settings
    settings = dict(
        spacing=(1.0, 1.0, 1.0),
        patch_size=(24, 24, 24),
        val_roi_size=(24, 24, 24),
        val_sw_batch_size=4,
        depth=3,
        base_filters=8,
        learning_rate=5e-3,
        cache="full",
        cache_num=0,
        epochs=1000,
        max_steps=LESION_STEPS,
        val_every=8,
        checkpoint_every=1000,
        image_summaries=False,
        deterministic=True,
        loss=planned["loss"],
        val_keep_largest=planned["val_keep_largest"],
    )
    return tiny_config(data_dir, workdir, **{**settings, **overrides})


def test_a_small_lesion_is_learned_within_a_few_hundred_steps_by_default(liver_task_dir, tmp_path):
    """Issue #19: on the synthetic liver (lesions of 4-7 voxels across, 1% of the foreground)
    the default settings (Dice + cross-entropy, as the plan chooses for a small class; the
    sampler's warm-up, damping and floor) learn the lesion: its validation Dice reaches 0.3
    within 336 steps. The run stops there. Measured on 2 cores over seeds 0-19 (the numerics of
    another CPU behave as another seed): reached at step 96-240. With the soft Dice alone, the
    lesion Dice stayed at about 0.001 for 120 steps (lesions predicted everywhere) in 3 of 3
    seeds, with either sampler."""
    config = small_lesion_config(liver_task_dir, tmp_path / "run")
    assert config.loss == "dice_ce" and not config.val_keep_largest
    trainer = Trainer(config)
    trainer.hooks.insert(1, _StopWhenLearned(index=1, dice=LESION_DICE))  # after validation
    try:
        trainer.fit()
    finally:
        trainer.close()
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    lesion = [line["dice"]["cancer"] for line in lines]
    assert max(lesion) >= LESION_DICE, [(line["step"], line["dice"]) for line in lines]


def test_profile_steps_write_a_trace_that_names_the_step_ops(spleen_task_dir, tmp_path):
    from tf_medseg.bench.step_profile import format_summary, newest_trace, summarise

    config = tiny_config(
        spleen_task_dir, tmp_path / "run", epochs=2, profile_steps=(1, 3), val_every=10
    )
    assert config.validate() == []
    train_to_end(config)
    trace = newest_trace(str(tmp_path / "run"))
    assert trace.startswith(str(tmp_path / "run" / "tensorboard" / "plugins" / "profile"))
    summary = summarise(trace)
    compute = next(g for name, g in summary["groups"].items() if name.startswith("compute"))
    # The traced steps ran the U-Net's convolutions and their gradients.
    assert any("Conv3D" in op_type for op_type in compute["op_types"])
    assert any("Conv3DBackpropFilter" in op_type for op_type in compute["op_types"])
    assert 0 < summary["span_ms"] < 60_000
    assert "Conv3D" in format_summary(summary)
    bad = dataclasses.replace(config, profile_steps=(3, 1))
    assert any("--profile_steps" in line for line in bad.validate())


def test_the_step_is_traced_once_before_the_loop(spleen_task_dir, tmp_path):
    trainer = Trainer(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2))
    try:
        trainer.trace_train_step()
        assert trainer.train_step.experimental_get_tracing_count() == 1
        trainer.fit()  # full batches only (2 items x 2 samples, batch 2): no second trace
        assert trainer.train_step.experimental_get_tracing_count() == 1
        assert trainer.state.step == 4
    finally:
        trainer.close()


def test_disk_cache_falls_back_to_the_workdir_when_the_data_folder_cannot_be_written(tmp_path):
    from tf_medseg.training.build import disk_cache_dir

    blocked = tmp_path / "data" / ".tf_medseg_cache"
    blocked.parent.mkdir()
    blocked.write_text("a file where the cache folder would go: unwritable, even for root")
    folder = disk_cache_dir(str(blocked), str(tmp_path / "run"))
    assert folder == str(tmp_path / "run" / "prefix_cache") and os.path.isdir(folder)
    writable = tmp_path / "data2" / ".tf_medseg_cache"
    assert disk_cache_dir(str(writable), str(tmp_path / "run")) == str(writable / "prefix")


def test_steps_to_the_next_validation():
    from tf_medseg.training.hooks import steps_to_validation

    # 10 steps per epoch, validation after epochs 4, 8, ...
    assert steps_to_validation(1, 0, 10, 4) == 40
    assert steps_to_validation(1, 3, 10, 4) == 37
    assert steps_to_validation(4, 9, 10, 4) == 1
    assert steps_to_validation(5, 1, 10, 4) == 39
    assert steps_to_validation(3, 10, 10, 1) == 0


def test_the_cli_shows_graph_building_step_and_validation_progress(spleen_task_dir, tmp_path):
    import subprocess
    import sys

    from tiny_config import TINY_FLAGS

    flags = [f for f in TINY_FLAGS if not f.startswith(("--epochs", "--progress"))]
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *flags, "--epochs=2", "--val_every=2"]
        + [f"--data_dir={spleen_task_dir}", f"--workdir={tmp_path / 'run'}", "--progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    err = result.stderr
    assert "building the training graph..." in err and "built the training graph in" in err
    assert err.index("building the training graph") < err.index("epoch 1:")
    assert "to_val=" in err and "loss=" in err  # the step bar's postfix
    assert "validation:" in err and "volume" in err  # the bar over validation volumes


def test_hot_path_reads_losses_back_every_log_every_steps_without_retracing(
    spleen_task_dir, tmp_path
):
    """3 cached items x 1 sample / batch 2: each epoch ends on a short batch of 1, which must
    reuse the graph; losses are read back (and written to TensorBoard) every 3 steps and at
    each epoch's end, all of them, in order."""
    config = tiny_config(
        spleen_task_dir,
        tmp_path / "run",
        cache_num=3,
        num_samples=1,
        epochs=3,
        log_every=3,
        val_every=100,
        deterministic=True,
        seed=3,
    )
    trainer, summary = train_to_end(config)
    assert trainer.steps_per_epoch == 2 and summary["steps"] == 6
    assert trainer.train_step.experimental_get_tracing_count() == 1
    assert len(trainer.state.losses) == 6 and np.all(np.isfinite(trainer.state.losses))
    (events,) = glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))
    logged = {}
    for event in tf.compat.v1.train.summary_iterator(events):
        for value in event.summary.value:
            if value.tag == "train/loss":
                logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [2, 3, 4, 6]  # epoch ends (2, 4, 6) and multiples of 3
    for step, loss in logged.items():
        assert loss == pytest.approx(trainer.state.losses[step - 1], abs=1e-6)


def test_multi_worker_stop_votes_are_taken_only_at_sync_points(spleen_task_dir, tmp_path):
    """A time bound under several workers costs an all-reduce per vote: votes happen every
    --log_every steps and at epoch ends, at the same steps on every worker, not per step."""
    from tf_medseg import distributed

    votes = []

    class TwoWorkers(distributed.Distributed):  # collectives of one process, counted
        def any_rank(self, flag, name):
            votes.append((name, trainer_ref[0].state.step))
            return bool(flag)

    trainer_ref = []
    config = tiny_config(
        spleen_task_dir, tmp_path / "run", epochs=4, log_every=3, budget_minutes=60.0
    )
    trainer = Trainer(config, dist=TwoWorkers(size=2))
    trainer_ref.append(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
    steps_per_epoch = trainer.steps_per_epoch
    assert trainer.state.step == 4 * steps_per_epoch
    voted = sorted({step for name, step in votes if name == "stop_budget_minutes"})
    expected = sorted(
        {s for s in range(1, trainer.state.step + 1) if s % 3 == 0 or s % steps_per_epoch == 0}
    )
    assert voted == expected
    interrupts = [step for name, step in votes if name == "interrupt"]
    assert set(interrupts) <= set(expected) and len(interrupts) < trainer.state.step + 4


# Deep supervision: the tiny U-Net (depth 2) has one auxiliary output at half resolution.
# 4 cached items x 2 samples / batch 2: 4 steps per epoch.
DEEP = dict(deep_supervision=True, deterministic=True, cache="full")


def test_deep_supervision_trains_validates_and_exports_a_one_output_model(
    spleen_task_dir, tmp_path
):
    from tf_medseg.inference.segmenter import Segmenter

    workdir = tmp_path / "run"
    config = tiny_config(
        spleen_task_dir, workdir, epochs=4, val_every=2, learning_rate=5e-3, **DEEP
    )
    trainer, summary = train_to_end(config)
    assert len(trainer.train_model.outputs) == 2 and len(trainer.model.outputs) == 1
    losses = trainer.state.losses
    assert len(losses) == 16 and np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    lines = validations(workdir)
    assert [line["step"] for line in lines] == [8, 16]
    assert all(0.0 <= line["dice"]["spleen"] <= 1.0 for line in lines)
    assert 0.0 <= summary["best_dice"] <= 1.0
    best = tf.keras.models.load_model(os.path.join(workdir, "best_model.keras"))
    assert len(best.outputs) == 1
    segmenter = Segmenter.load(str(workdir))
    (image,) = glob.glob(os.path.join(spleen_task_dir, "imagesTs", "*.nii.gz"))
    labels, _ = segmenter.segment(image)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


def test_a_deep_supervision_run_resumes_exactly(spleen_task_dir, tmp_path):
    """A run of 2 epochs equals one of 1 epoch resumed for a second, auxiliary head included."""
    whole, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "whole", epochs=2, **DEEP))
    first, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path / "run", epochs=1, **DEEP))
    aux = first.train_model.get_layer("ds1_logits").kernel.numpy()
    second = Trainer(tiny_config(spleen_task_dir, tmp_path / "run", epochs=2, **DEEP))
    try:
        assert second.restored_from is not None and second.state.step == 4
        np.testing.assert_array_equal(second.train_model.get_layer("ds1_logits").kernel, aux)
        second.fit()
    finally:
        second.close()
    assert first.state.losses + second.state.losses == whole.state.losses
    assert validations(tmp_path / "run") == validations(tmp_path / "whole")


def test_deep_supervision_is_refused_for_other_models_in_one_line(spleen_task_dir, tmp_path):
    import subprocess
    import sys

    config = tiny_config(spleen_task_dir, tmp_path, deep_supervision=True)
    assert config.validate() == []
    (line,) = dataclasses.replace(config, model="vnet").validate()
    assert line.startswith("--deep_supervision is implemented for --model=unet3d only")
    assert line.endswith("not for --model=vnet")
    (line,) = dataclasses.replace(config, depth=1, patch_size=(16, 16, 16)).validate()
    assert line.startswith("--deep_supervision needs --depth >= 2")
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", "--noplan", "--model=segresnet"]
        + ["--deep_supervision", f"--data_dir={spleen_task_dir}", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tf-medseg-train: --deep_supervision is implemented for --model=unet3d only (auxiliary "
        "outputs on its decoder levels), not for --model=segresnet"
    ]


def test_resuming_with_another_network_names_the_flags_in_one_line_each(spleen_task_dir, tmp_path):
    """A checkpoint restores only into the network and optimiser that wrote it: a changed
    --deep_supervision or --depth is named, not reported as an unreadable checkpoint."""
    first, _ = train_to_end(tiny_config(spleen_task_dir, tmp_path, epochs=1))
    checkpoints = os.path.join(str(tmp_path), "checkpoints")
    changed = tiny_config(
        spleen_task_dir,
        tmp_path,
        deep_supervision=True,
        depth=3,
        precision="mixed_float16",  # a loss scale the checkpoints do not hold
        epochs=2,
    )
    with pytest.raises(ConfigError) as err:
        Trainer(changed)
    assert str(err.value).splitlines() == [
        f"--depth=3 differs from the --depth=2 of the run whose checkpoints are in "
        f"{checkpoints}: resume with that value, or train in another --workdir",
        f"--deep_supervision=true differs from the --deep_supervision=false of the run whose "
        f"checkpoints are in {checkpoints}: resume with that value, or train in another --workdir",
        f"--precision=mixed_float16 differs from the --precision=float32 of the run whose "
        f"checkpoints are in {checkpoints}: resume with that value, or train in another --workdir",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, "--optimizer=sgd"]
        + [f"--data_dir={spleen_task_dir}", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tf-medseg-train: --optimizer=sgd differs from the --optimizer={first.config.optimizer} "
        f"of the run whose checkpoints are in {checkpoints}: resume with that value, or train in "
        "another --workdir"
    ]
    resumed = Trainer(tiny_config(spleen_task_dir, tmp_path, epochs=2))  # the same: resumes
    try:
        assert resumed.restored_from is not None and resumed.state.step == first.state.step > 0
    finally:
        resumed.close()


def _refusal(workdir, flag, new, old, why):
    checkpoints = os.path.join(str(workdir), "checkpoints")
    return (
        f"--{flag}={new} differs from the --{flag}={old} of the run whose checkpoints are in "
        f"{checkpoints}: {why}; resume with that value, or train in another --workdir "
        f"(--finetune_from={workdir} starts it from this run's weights)"
    )


def test_resuming_on_another_split_is_refused_and_finetune_from_starts_a_new_run_from_its_weights(
    spleen_task_dir, tmp_path
):
    """Another seed, fold or validation count would validate on cases the weights trained on:
    refused, one line per flag (the Trainer and the CLI); --finetune_from in another workdir
    takes the weights alone (step, optimiser, sampler and best Dice start afresh)."""
    from tf_medseg.training.resume import resume_conflicts

    run = tmp_path / "run"
    first, _ = train_to_end(tiny_config(spleen_task_dir, run, epochs=1, pos_fraction=0.6))
    seed_line = _refusal(
        run, "seed", 7, 0, "the seed draws the split, the cache order and the patches"
    )
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(spleen_task_dir, run, epochs=2, seed=7))
    assert str(err.value).splitlines() == [seed_line]
    folds = tiny_config(spleen_task_dir, run, epochs=2, num_val=0, num_folds=3, fold=1)
    why = "the validation cases would change under the trained weights (split.json)"
    assert resume_conflicts(folds) == [
        _refusal(run, "num_val", 0, 2, why),
        _refusal(run, "num_folds", 3, 0, why),
        _refusal(run, "fold", 1, 0, why),
    ]
    # The saved split given as a split file is the same split: it resumes.
    same = tiny_config(spleen_task_dir, run, epochs=2, split_file=str(run / "split.json"))
    assert resume_conflicts(dataclasses.replace(same, num_val=0)) == []
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, "--seed=7"]
        + [f"--data_dir={spleen_task_dir}", f"--workdir={run}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tf-medseg-train: {seed_line}"]

    tuned = tiny_config(
        spleen_task_dir, tmp_path / "tuned", epochs=1, seed=7, finetune_from=str(run)
    )
    second = Trainer(tuned)
    try:
        assert second.restored_from is None and second.state.step == 0
        assert int(second.optimizer.iterations.numpy()) == 0
        assert second.state.best_dice < 0 <= first.state.best_dice
        assert float(second.sampler.positive_fraction.numpy()) == pytest.approx(0.5)
        for a, b in zip(
            first.model.trainable_variables, second.model.trainable_variables, strict=True
        ):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        summary = second.fit()
    finally:
        second.close()
    assert summary["steps"] == 2
    assert json.load(open(tmp_path / "tuned" / "split.json")) != json.load(open(run / "split.json"))
    # Once it has checkpoints of its own, the fine-tune resumes from them.
    assert resume_conflicts(dataclasses.replace(tuned, epochs=2)) == []


def test_finetune_from_is_checked_before_the_run(spleen_task_dir, heart_task_dir, tmp_path):
    from tf_medseg.training.resume import resume_conflicts

    run = tmp_path / "run"
    train_to_end(tiny_config(spleen_task_dir, run, epochs=1))
    ok = tiny_config(spleen_task_dir, tmp_path / "tuned", finetune_from=str(run))
    assert resume_conflicts(ok) == []
    assert resume_conflicts(dataclasses.replace(ok, optimizer="adam", seed=3)) == []
    assert resume_conflicts(dataclasses.replace(ok, depth=3, base_filters=8)) == [
        f"--base_filters=8 differs from the --base_filters=4 of the run in "
        f"--finetune_from={run}: a fine-tune starts from that network's weights; give its value",
        f"--depth=3 differs from the --depth=2 of the run in --finetune_from={run}: a fine-tune "
        "starts from that network's weights; give its value",
    ]
    assert resume_conflicts(dataclasses.replace(ok, data_dir=heart_task_dir)) == [
        f"--data_dir={heart_task_dir} has channels ['MRI0', 'MRI1'] and classes "
        "['background', 'left atrium'], the run in "
        f"--finetune_from={run} was trained on channels ['CT'] and classes ['background', "
        f"'spleen'] ({run}/task.json): a fine-tune needs the same channels and classes"
    ]
    assert resume_conflicts(dataclasses.replace(ok, finetune_from=str(tmp_path / "none"))) == [
        f"--finetune_from={tmp_path / 'none'} holds no checkpoint "
        f"({tmp_path / 'none'}/checkpoints): give a training workdir"
    ]
    assert resume_conflicts(dataclasses.replace(ok, workdir=str(run))) == []  # resumes run


def test_resuming_on_a_data_folder_with_other_classes_names_them_in_one_line(
    spleen_task_dir, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(spleen_task_dir, data, ignore=shutil.ignore_patterns(".tf_medseg_cache"))
    run = tmp_path / "run"
    train_to_end(tiny_config(str(data), run, epochs=1))
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = {"0": "background", "1": "spleen", "2": "lesion"}
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(str(data), run, epochs=2))
    assert str(err.value).splitlines() == [
        f"--data_dir={data} has channels ['CT'] and classes ['background', 'spleen', 'lesion'], "
        f"the run whose checkpoints are in {run / 'checkpoints'} was trained on channels ['CT'] "
        f"and classes ['background', 'spleen'] ({run}/task.json): give its data folder, or train "
        "in another --workdir"
    ]
    # The same flags on a dataset.json with a case fewer: another split, named as such.
    from tf_medseg.training.resume import resume_conflicts

    del spec["labels"]["2"]
    spec["training"] = spec["training"][1:]
    (data / "dataset.json").write_text(json.dumps(spec))
    assert resume_conflicts(tiny_config(str(data), run, epochs=2)) == [
        f"the split of --data_dir={data} differs from {run / 'split.json'} of the run whose "
        f"checkpoints are in {run / 'checkpoints'} with the same flags (its dataset.json or split "
        "file changed): restore them, or train in another --workdir "
        f"(--finetune_from={run} starts it from this run's weights)"
    ]


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_workdir_that_cannot_be_made_is_one_line_before_anything_runs(
    spleen_task_dir, tmp_path, dry_run
):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder of the workdir's path would be (root too)")
    workdir = blocker / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS]
        + [f"--data_dir={spleen_task_dir}", f"--workdir={workdir}"]
        + (["--dry_run"] if dry_run else []),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tf-medseg-train: --workdir={workdir} cannot be written (")
    assert line.endswith("): give a folder that can be created and written")


def test_ct_percentiles_the_statistics_do_not_hold_are_refused_before_the_run(
    spleen_task_dir, tmp_path
):
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(spleen_task_dir, tmp_path / "run", ct_percentiles=(1.0, 99.0)))
    assert str(err.value).splitlines() == [
        "--ct_percentiles=1,99: the intensity statistics hold the percentiles 0.5, 5, 50, 95 "
        "and 99.5; give two of them, low before high"
    ]
    assert not (tmp_path / "run").exists()
    for bad in [(95.0, 5.0), (5.0, 5.0, 5.0), (5.0,)]:
        assert len(tiny_config(spleen_task_dir, tmp_path, ct_percentiles=bad).validate()) == 1
    assert tiny_config(spleen_task_dir, tmp_path, ct_percentiles=(0.5, 99.5)).validate() == []


def test_a_resumed_run_keeps_the_ct_range_it_was_trained_with(spleen_task_dir, tmp_path, caplog):
    """A run begun when the CT statistics were its training cases' (or before the data's files
    changed) has another range in preprocessing.json than the data folder's statistics give:
    resumed, it keeps the range its weights were trained with, and says so."""
    run = tmp_path / "run"
    train_to_end(tiny_config(spleen_task_dir, run, epochs=1))
    path = run / "preprocessing.json"
    chain = json.loads(path.read_text())
    (entry,) = [t for t in chain["transforms"] if t["name"] == "NormalizeCT"]
    entry["lower"], entry["upper"] = [entry["lower"][0] - 7.0], [entry["upper"][0] + 5.0]
    path.write_text(json.dumps(chain))
    caplog.set_level("WARNING")
    resumed = Trainer(tiny_config(spleen_task_dir, run, epochs=2))
    resumed.close()
    assert resumed.restored_from is not None
    assert json.loads(path.read_text()) == chain
    (line,) = [r.getMessage() for r in caplog.records if "keeps the CT range" in r.getMessage()]
    assert line.startswith(f"{path}: the resumed run keeps the CT range it was trained with")


def test_val_metrics_adds_the_surface_metrics_to_metrics_jsonl_and_tensorboard(
    spleen_task_dir, tmp_path
):
    import tensorflow as tf

    config = tiny_config(
        spleen_task_dir, tmp_path / "run", epochs=1, val_every=1, val_metrics="dice,nsd,hd95"
    )
    train_to_end(config)
    (line,) = [json.loads(text) for text in open(os.path.join(config.workdir, "metrics.jsonl"))]
    assert set(line["nsd"]) == set(line["hd95"]) == {"spleen"} and "assd" not in line
    nsd, hd95 = line["nsd"]["spleen"], line["hd95"]["spleen"]
    assert 0.0 <= nsd <= 1.0
    assert hd95 == "inf" if nsd == 0.0 else hd95 >= 0.0
    (events,) = glob.glob(os.path.join(config.workdir, "tensorboard", "events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events) for v in e.summary.value}
    assert {"val/nsd_spleen", "val/hd95_spleen"} <= tags and "val/assd_spleen" not in tags
    errors = dataclasses.replace(config, val_metrics="dice,nsd,volume").validate()
    assert errors == [
        "--val_metrics=dice,nsd,volume: unknown volume; choose from dice, nsd, hd95, assd"
    ]


def test_a_run_is_checked_once_and_its_task_loaded_once(spleen_task_dir, tmp_path, monkeypatch):
    """check_run loads the task once for every check; a Trainer given the checked run neither
    loads it again nor checks again (the CLI's way: it passes the planner's task in too)."""
    from tf_medseg.data import msd
    from tf_medseg.training import checks

    loads = []

    def counting(root, *args, **kwargs):
        loads.append(root)
        return msd.load_task(root, *args, **kwargs)

    monkeypatch.setattr(checks, "load_task", counting)
    checked = checks.check_run(tiny_config(spleen_task_dir, tmp_path / "run", epochs=1))
    assert loads == [spleen_task_dir]

    def refused(*args, **kwargs):
        raise AssertionError("loaded or checked again")

    monkeypatch.setattr(checks, "load_task", refused)
    monkeypatch.setattr(msd, "load_task", refused)
    monkeypatch.setattr(checks, "config_errors", refused)
    trainer = Trainer(checked)
    try:
        assert trainer.fit()["steps"] > 0
    finally:
        trainer.close()
