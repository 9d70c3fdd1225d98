"""Failure is loud, early and recoverable: killed runs resume, bad checkpoints fall back,
worker exceptions surface with the file's path, a diverging loss stops the run, Ctrl-C saves.

The kill, interrupt and resume tests run the real ``tf-medseg-train`` command in subprocesses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_config import TINY_FLAGS, tiny_config, validations

from tf_medseg.cache import CacheBudgetError, CachePrefixError
from tf_medseg.data.io import DataError, read_nifti, write_nifti
from tf_medseg.data.msd import load_task, task_split
from tf_medseg.training.course import NonFiniteLossError
from tf_medseg.training.loop import Trainer


def _train_command(data_dir, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "tf_medseg.cli.train",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        *extra,
    ]


def _wait_for(predicate, timeout, proc=None, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(every)
    return False


def _checkpoint_steps(workdir):
    return sorted(
        int(os.path.basename(p).split("-")[1].split(".")[0])
        for p in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index"))
    )


def test_sigkill_at_a_random_moment_then_resume_equals_a_run_never_killed(
    spleen_task_dir, tmp_path
):
    """SIGKILL at a random moment after the first checkpoint, then the same command again:
    with --deterministic and a replacing smart cache, the validations (Dice, FP/FN indices, the
    sampler's fraction, one line per validation) and the summary equal a run never killed."""

    def command(workdir):
        flags = ("--max_steps=30", "--deterministic", "--replace_rate=0.5")
        return _train_command(spleen_task_dir, str(workdir), *flags)

    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _checkpoint_steps(workdir), 120, proc), "no checkpoint written"
        time.sleep(random.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    saved = _checkpoint_steps(workdir)
    assert saved and max(saved) < 30, "a checkpoint before the kill, and not the last"
    folder = str(tmp_path / "whole")
    runs = [
        subprocess.run(command(w), capture_output=True, text=True, timeout=300)
        for w in (workdir, folder)
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"resumed from {os.path.join(workdir, 'checkpoints', f'ckpt-{max(saved)}')}"
        in runs[0].stderr
    )
    assert "resumed from" not in runs[1].stderr
    summaries = [json.load(open(os.path.join(w, "summary.json"))) for w in (workdir, folder)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 30
    assert summaries[0]["best_dice"] == summaries[1]["best_dice"]
    assert summaries[0]["best_step"] == summaries[1]["best_step"]
    assert summaries[0]["cache"]["items_replaced"] > 0
    assert validations(workdir) == validations(folder)
    assert [line["step"] for line in validations(workdir)] == list(range(2, 31, 2))


def _handles_signals(pid: int) -> bool:
    """Whether process ``pid`` has its own SIGINT and SIGTERM handlers (Linux: /proc's caught
    signal mask; Python's default SIGTERM action is to die, so the bit appears only when
    tf-medseg-train installs its handler, at the first line of its module)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return all(caught >> (signum - 1) & 1 for signum in (signal.SIGINT, signal.SIGTERM))


def _signal_at(command, signum, delay, log, timeout=20.0):
    """Runs ``command``, sends ``signum`` ``delay`` seconds after the process installed its
    signal handlers (or when it ends, if sooner); returns (returncode, stderr, seconds from the
    signal to the exit; inf if it did not exit within ``timeout`` and was killed). The run's
    whole stderr is kept in the file ``log``.

    Before its handlers, Python's defaults apply (a KeyboardInterrupt traceback, or death by
    SIGTERM): the interpreter's own start-up precedes the program's first line. It takes about
    0.1 s on an idle machine and was measured at up to 0.33 s on a loaded one, so a fixed head
    start cannot stand for it."""
    with open(log, "w+") as out:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out, text=True)
        seconds = float("inf")
        try:
            assert _wait_for(
                lambda: _handles_signals(proc.pid), 60, proc, every=0.005
            ), f"no signal handlers within 60 s (log {log})"
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signum)
            sent = time.time()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
                seconds = time.time() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        return proc.returncode, out.read(), seconds


def _saved_at(stderr):
    """The step of the interrupt's checkpoint, from the log line, or None."""
    match = re.search(r"saving a checkpoint at step (\d+)", stderr)
    return int(match.group(1)) if match else None


def _signal_lane(command, workdir, signals, rng, logs):
    """One run's life stopped by each of ``signals`` in turn, restarted with the same command.

    The first start is stopped once it trains; its time to the first checkpoint sets the range
    of the random moments. Every start's stderr is kept in the folder ``logs``, and a failed
    assertion shows the whole of it. Returns ``(moments, last checkpointed step)``.
    """
    os.makedirs(logs, exist_ok=True)
    first_log = os.path.join(logs, "first.txt")
    start = time.time()
    with open(first_log, "w+") as out:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out, text=True)
        try:
            trained = _wait_for(lambda: _checkpoint_steps(workdir), 180, proc)
            first_epoch_s = time.time() - start
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        stderr = out.read()
    where = f"{workdir} first start (log {first_log})"
    assert trained, f"{where}: never trained\n{stderr}"
    assert proc.returncode == 130, f"{where}: exit {proc.returncode}\n{stderr}"
    saved = _saved_at(stderr)
    assert saved is not None and saved in _checkpoint_steps(workdir), f"{where}:\n{stderr}"
    moments = {"before training": 0, "in training": 0}
    for run, signum in enumerate(signals):
        # Any moment from the program's first line (see _signal_at): every other run in the
        # first half of the range (mostly start-up and the cache fill), the others in the
        # second (mostly training), so that both kinds of moment are drawn in every lane.
        half = (first_epoch_s + 3.0) / 2
        delay = rng.uniform(0.0, half) + (half if run % 2 else 0.0)
        log = os.path.join(logs, f"run-{run}.txt")
        code, stderr, seconds = _signal_at(command, signum, delay, log)
        with open(os.path.join(logs, "runs.jsonl"), "a") as f:
            record = {"run": run, "delay": delay, "exit": code, "seconds": seconds}
            f.write(json.dumps(record) + "\n")
        where = (
            f"{workdir} run {run}: {signal.Signals(signum).name} after {delay:.2f} s (log {log})"
        )
        assert code == 130, f"{where}: exit {code}\n{stderr}"
        assert seconds < 20, f"{where}: exited {seconds:.1f} s after the signal\n{stderr}"
        assert (
            "Traceback" not in stderr and "did not stop within" not in stderr
        ), f"{where}:\n{stderr}"
        step = _saved_at(stderr)
        if step is None:
            moments["before training"] += 1
            # (TensorFlow may log after it, e.g. about a restore the signal cut short.)
            assert re.search(r"interrupted .*nothing (new )?to save", stderr), f"{where}:\n{stderr}"
        else:
            moments["in training"] += 1
            assert step >= saved, f"{where}: resumed behind the last checkpoint ({step} < {saved})"
            resumed = f"resumed from {os.path.join(workdir, 'checkpoints', f'ckpt-{saved}')}"
            assert resumed in stderr, f"{where}:\n{stderr}"
            assert step in _checkpoint_steps(workdir), f"{where}: no checkpoint at step {step}"
            saved = step
    return moments, saved


def test_signals_at_random_moments_exit_130_with_a_resumable_checkpoint(spleen_task_dir, tmp_path):
    """10 SIGINTs and 2 SIGTERMs at random moments of a run's life (start-up, the cache fill,
    steps, epoch boundaries, validation every epoch), a new seed each run of the suite: each
    exits 130 within 20 s, and the same command resumes where the one before stopped. Two runs
    (lanes) at once, to halve the time. TF_MEDSEG_TEST_SEED repeats a seed."""
    seed = int(os.environ.get("TF_MEDSEG_TEST_SEED", time.time()))
    lanes = {
        "a": [signal.SIGINT] * 5 + [signal.SIGTERM],
        "b": [signal.SIGTERM] + [signal.SIGINT] * 5,
    }

    def lane(name):
        workdir = str(tmp_path / name)
        command = _train_command(spleen_task_dir, workdir, "--max_steps=100000", "--val_every=1")
        logs = str(tmp_path / f"logs-seed-{seed}-{name}")
        return _signal_lane(command, workdir, lanes[name], random.Random(f"{seed}{name}"), logs)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(lanes, pool.map(lane, lanes), strict=True))
    kinds = ("before training", "in training")
    moments = {k: sum(r[0][k] for r in results.values()) for k in kinds}
    assert all(moments.values()), f"every kind of moment was hit (seed {seed}): {moments}"
    # The last checkpoint resumes and trains on to the end.
    saved = results["a"][1]
    workdir = str(tmp_path / "a")
    final = subprocess.run(
        _train_command(spleen_task_dir, workdir, f"--max_steps={saved + 2}", "--val_every=1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert json.load(open(os.path.join(workdir, "summary.json")))["steps"] == saved + 2


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(spleen_task_dir, tmp_path, caplog):
    config = tiny_config(spleen_task_dir, tmp_path / "run", epochs=2)
    trainer = Trainer(config)
    trainer.fit()
    trainer.close()
    steps = _checkpoint_steps(config.workdir)
    assert steps == [2, 4]
    latest = glob.glob(os.path.join(config.workdir, "checkpoints", "ckpt-4.data-*"))[0]
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 3)
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(config)
    try:
        assert resumed.restored_from.endswith("ckpt-2")
        assert resumed.state.step == 2
        assert any(
            "ckpt-4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
        )
    finally:
        resumed.close()


def _copy_with_truncated(spleen_task_dir, tmp_path, pick):
    data = str(tmp_path / "data")
    shutil.copytree(spleen_task_dir, data)
    train, val = task_split(load_task(data), num_val=2, seed=0)
    victim = pick(train, val)["image"]
    with open(victim, "r+b") as f:
        f.truncate(200)
    return data, victim


def test_corrupt_training_file_stops_before_training(spleen_task_dir, tmp_path):
    data, victim = _copy_with_truncated(spleen_task_dir, tmp_path, lambda t, v: t[1])
    with pytest.raises(DataError, match="not a readable NIfTI") as err:
        Trainer(tiny_config(data, tmp_path / "run"))
    assert victim in str(err.value)
    assert not glob.glob(os.path.join(str(tmp_path / "run"), "checkpoints", "*"))


def test_corrupt_mri_training_file_is_one_line_before_training(heart_task_dir, tmp_path):
    # Every listed file's header and length are checked before training (MRI reads no file
    # for intensity statistics, so this is the first read of the broken file).
    data, victim = _copy_with_truncated(heart_task_dir, tmp_path, lambda t, v: t[0])
    with pytest.raises(DataError, match="not a readable NIfTI") as err:
        Trainer(tiny_config(data, tmp_path / "run"))
    assert victim in str(err.value)
    result = subprocess.run(
        _train_command(data, str(tmp_path / "cli")), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tf-medseg-train:") and victim in last
    assert not glob.glob(os.path.join(str(tmp_path / "cli"), "checkpoints", "*"))


def test_worker_exception_ends_training_with_the_path(heart_task_dir, tmp_path):
    # A validation volume is first read by the cache's worker threads at the first validation;
    # a NaN intensity is a fault its header cannot show.
    data = str(tmp_path / "data")
    shutil.copytree(heart_task_dir, data)
    _, val = task_split(load_task(data), num_val=1, seed=0)
    victim = val[0]["image"]
    volume = read_nifti(victim)
    image = np.asarray(volume.data, np.float32)
    image.flat[image.size // 2] = np.nan
    write_nifti(victim, image, volume.affine)
    trainer = Trainer(tiny_config(data, tmp_path / "run", num_val=1, epochs=5))
    start = time.time()
    try:
        with pytest.raises(CachePrefixError, match="NaN") as err:
            trainer.fit()
    finally:
        trainer.close()
    assert victim in str(err.value)
    assert time.time() - start < 60
    assert trainer.state.step == 2, "stopped at the first validation"


def test_memory_budget_below_one_item_is_rejected_before_training(spleen_task_dir, tmp_path):
    config = tiny_config(spleen_task_dir, tmp_path / "run", memory_budget_gb=1e-6)
    with pytest.raises(CacheBudgetError):
        Trainer(config)
    assert not glob.glob(os.path.join(config.workdir, "checkpoints", "*"))


def test_diverging_loss_stops_with_the_step_and_keeps_no_nan_model(spleen_task_dir, tmp_path):
    # Plain SGD at an absurd learning rate without normalisation overflows the weights.
    config = tiny_config(
        spleen_task_dir,
        tmp_path / "run",
        optimizer="sgd",
        learning_rate=1e30,
        norm="batch",
        epochs=20,
        val_every=1,
    )
    trainer = Trainer(config)
    try:
        with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
            trainer.fit()
    finally:
        trainer.close()
    best = os.path.join(config.workdir, "best_model.keras")
    if os.path.exists(best):
        import tensorflow as tf

        import tf_medseg.models  # noqa: F401  (registers the custom layers)

        model = tf.keras.models.load_model(best)
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_cli_reports_bad_data_in_one_line(tmp_path):
    root = tmp_path / "task"
    root.mkdir()
    (root / "dataset.json").write_text("{broken")
    result = subprocess.run(
        _train_command(str(root), str(tmp_path / "run")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tf-medseg-train:") and "dataset.json" in last and "JSON" in last
