"""Faults in reading and writing the run's files: one line, nothing lost.

A full disk (or a quota, or a read-only folder) while the run writes a checkpoint,
``best_model.keras``, ``summary.json`` or ``metrics.jsonl`` ends ``tf-medseg-train`` with one line
naming the file and the reason, exit code 1, and the last good checkpoint as the one the next run
resumes from. The faults are real: a file size limit (``RLIMIT_FSIZE``, set in the subprocess of
the real command, turns the write that crosses it into ``EFBIG``), a small tmpfs filled up
(``ENOSPC``; skipped where nothing can be mounted), or a folder where a file is to be written.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from tiny_config import TINY_FLAGS, tiny_config


def _train(data_dir, workdir, *extra, file_size_limit: int | None = None):
    """Runs the real ``tf-medseg-train``; with ``file_size_limit`` no file may grow past it."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from the write, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, *extra]
        + [f"--data_dir={data_dir}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size if file_size_limit else None,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def _last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def one_epoch(spleen_task_dir, tmp_path_factory) -> str:
    """A finished one-epoch run (2 steps, validated, ``checkpoints/ckpt-2``), for tests to copy
    and go on from."""
    run = tmp_path_factory.mktemp("faults") / "one_epoch"
    result = _train(spleen_task_dir, run, "--epochs=1", "--val_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return str(run)


def _copy(run: str, to) -> str:
    shutil.copytree(run, to)
    return to


def _steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# ---------------------------------------------------------------------------- metrics.jsonl
def test_a_truncated_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(
    spleen_task_dir, one_epoch, tmp_path
):
    run = _copy(one_epoch, tmp_path / "run")
    path = run / "metrics.jsonl"
    (line,) = path.read_text().splitlines(keepends=True)
    path.write_text(line + line[:-40])  # killed in the middle of writing its second line
    resumed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if f"{path}: line 2" in line]
    assert len(warnings) == 1 and "incomplete" in warnings[0], resumed.stderr[-3000:]
    assert _steps(run) == [2, 4]  # the cut line is gone; every line is whole


def test_a_corrupt_metrics_line_before_the_last_is_one_line(spleen_task_dir, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    path = run / "metrics.jsonl"
    (line,) = path.read_text().splitlines(keepends=True)
    path.write_text(line[:30] + "\n" + line)
    resumed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1")
    assert resumed.returncode == 1
    last = _last_line(resumed)
    assert last.startswith(f"tf-medseg-train: {path}: line 1 ") and "not JSON" in last


# ---------------------------------------------------------------------------- a full disk
#: Above every JSON file and event file of a tiny run (a few kB), below its checkpoint's data and
#: its best_model.keras (about 190 kB each).
LIMIT = 64 * 1024


def _index(workdir) -> str:
    """The checkpoint the next run resumes from, as the index file on disk names it."""
    with open(os.path.join(workdir, "checkpoints", "checkpoint")) as f:
        return f.readline().split('"')[1]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(
    spleen_task_dir, one_epoch, tmp_path
):
    run = _copy(one_epoch, tmp_path / "run")
    checkpoints = run / "checkpoints"
    before = sorted(os.listdir(checkpoints))
    assert _index(run) == "ckpt-2"
    full = _train(spleen_task_dir, run, "--epochs=3", "--val_every=1000", file_size_limit=LIMIT)
    assert full.returncode == 1, full.stderr[-3000:]
    assert _last_line(full) == (
        f"tf-medseg-train: cannot write the checkpoint {checkpoints / 'ckpt-4'}: File too large; "
        f"the last checkpoint, {checkpoints / 'ckpt-2'}, is intact: free space and run the same "
        "command to resume from it"
    )
    assert sorted(os.listdir(checkpoints)) == before  # nothing of the failed save is left
    assert _index(run) == "ckpt-2"
    resumed = _train(spleen_task_dir, run, "--epochs=3", "--val_every=1000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'ckpt-2'} at step 2" in resumed.stderr
    assert _index(run) == "ckpt-6"


def test_a_full_disk_at_the_best_model_keeps_the_previous_file_and_the_run_goes_on(
    spleen_task_dir, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    best = run / "best_model.keras"
    best.write_bytes(b"the previous best model")
    # A fresh run's first validation is its best: the model is written before any checkpoint.
    full = _train(spleen_task_dir, run, "--epochs=1", "--val_every=1", file_size_limit=LIMIT)
    assert full.returncode == 1, full.stderr[-3000:]
    last = _last_line(full)
    assert last.startswith(f"tf-medseg-train: cannot write {best}: File too large (")
    assert best.read_bytes() == b"the previous best model"
    assert [name for name in os.listdir(run) if "best_model" in name] == ["best_model.keras"]
    again = _train(spleen_task_dir, run, "--epochs=1", "--val_every=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert best.stat().st_size > LIMIT


def test_an_unwritable_summary_is_one_line_and_the_run_resumes(
    spleen_task_dir, one_epoch, tmp_path
):
    run = _copy(one_epoch, tmp_path / "run")
    summary = run / "summary.json"
    summary.unlink()
    summary.mkdir()  # the rename onto it fails: a real OSError of the real write
    failed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1000")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert _last_line(failed).startswith(f"tf-medseg-train: cannot write {summary}: Is a directory")
    assert _index(run) == "ckpt-2"
    assert not [name for name in os.listdir(run) if name.endswith(".tmp")]
    summary.rmdir()
    resumed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(summary.read_text())["steps"] == 4


def _mount(args: list[str]) -> None:
    """Runs ``mount`` (root only); skips the test with the reason where it cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (CI runs as root)")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs: a real disk that fills up (ENOSPC)."""
    point = tmp_path / "disk"
    point.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)])
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)


def _fill(disk, keep: int) -> str:
    """Fills ``disk`` up to ``keep`` bytes of free space; returns the filler file."""
    filler = os.path.join(disk, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - keep))
    os.close(fd)
    return filler


def test_a_full_tmpfs_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(
    spleen_task_dir, one_epoch, small_disk
):
    run = _copy(one_epoch, small_disk / "run")
    checkpoints = run / "checkpoints"
    filler = _fill(small_disk, keep=LIMIT)  # room for the JSON files, not for a checkpoint
    full = _train(spleen_task_dir, run, "--epochs=3", "--val_every=1000")
    assert full.returncode == 1, full.stderr[-3000:]
    assert _last_line(full) == (
        f"tf-medseg-train: cannot write the checkpoint {checkpoints / 'ckpt-4'}: No space left "
        f"on device; the last checkpoint, {checkpoints / 'ckpt-2'}, is intact: free space and "
        "run the same command to resume from it"
    )
    assert sorted(os.listdir(checkpoints)) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
    ]
    os.remove(filler)
    resumed = _train(spleen_task_dir, run, "--epochs=3", "--val_every=1000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'ckpt-2'} at step 2" in resumed.stderr
    assert _index(run) == "ckpt-6"


def test_a_full_disk_at_the_start_is_one_line_and_the_same_command_starts_after(
    spleen_task_dir, small_disk
):
    """The run's first files (config.json, split.json...) cannot be written: one line naming
    the file, exit 1, and the same command starts once there is room."""
    run = small_disk / "run"
    filler = _fill(small_disk, keep=0)
    full = _train(spleen_task_dir, run, "--epochs=1", "--val_every=1")
    assert full.returncode == 1, full.stderr[-3000:]
    line = _last_line(full)
    assert line.startswith(f"tf-medseg-train: cannot write {run}")
    assert "No space left on device; nothing was trained" in line
    os.remove(filler)
    again = _train(spleen_task_dir, run, "--epochs=1", "--val_every=1")
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_full_disk_at_metrics_jsonl_is_one_line_and_the_run_resumes(
    spleen_task_dir, one_epoch, tmp_path
):
    run = _copy(one_epoch, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    long = metrics.read_text() * 1000  # a long run's validations: larger than a checkpoint
    metrics.write_text(long)
    limit = 256 * 1024  # room for a checkpoint and the best model, not for metrics.jsonl
    assert len(long) > limit > os.path.getsize(run / "best_model.keras")
    failed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1", file_size_limit=limit)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert _last_line(failed).startswith(f"tf-medseg-train: cannot write {metrics}: File too large")
    assert metrics.read_text() == long and _index(run) == "ckpt-2"
    resumed = _train(spleen_task_dir, run, "--epochs=2", "--val_every=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(run) == [2] * 1000 + [4]


# ---------------------------------------------------------------------------- corrupt files
def _copy_with_a_cut_file(task_dir, tmp_path, pick) -> tuple[str, str]:
    """A copy of the task with one file cut in half; returns (task folder, the file)."""
    from tf_medseg.data.msd import load_task, task_split

    data = str(tmp_path / "data")
    shutil.copytree(task_dir, data, ignore=shutil.ignore_patterns(".tf_medseg_cache"))
    task = load_task(data)
    victim = pick(task, *task_split(task, num_val=1, seed=0))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return data, victim


@pytest.mark.parametrize(
    "pick",
    [
        lambda task, train, val: val[0]["image"],
        lambda task, train, val: val[-1]["label"],
        lambda task, train, val: task.test[0]["image"],
    ],
    ids=["validation image", "validation label", "test image"],
)
def test_a_cut_validation_or_test_file_stops_the_trainer_before_its_first_step(
    heart_task_dir, tmp_path, pick
):
    """MRI: no intensity statistics read the files; before, the cut validation file was found
    at the first validation, the test file never."""
    from tf_medseg.data.io import DataError
    from tf_medseg.training.loop import Trainer

    data, victim = _copy_with_a_cut_file(heart_task_dir, tmp_path, pick)
    with pytest.raises(DataError) as err:
        Trainer(tiny_config(data, tmp_path / "run", num_val=1, epochs=1))
    assert str(err.value).startswith(f"{victim}: not a readable NIfTI file")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_dry_run_reads_every_files_header(heart_task_dir, tmp_path):
    data, victim = _copy_with_a_cut_file(
        heart_task_dir, tmp_path, lambda task, train, val: task.test[0]["image"]
    )
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, "--num_val=1", "--dry_run"]
        + [f"--data_dir={data}", f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert _last_line(result).startswith(f"tf-medseg-train: {victim}: not a readable NIfTI file")


def test_the_run_files_are_written_with_the_users_umask_like_any_other_file(tmp_path):
    """Atomic writes go through a temporary file; it must not leave metrics.jsonl or
    summary.json readable by their owner alone (mkstemp's 0600) where others read the runs."""
    from tf_medseg.training.records import write_run_file

    previous = os.umask(0o022)
    try:
        path = str(tmp_path / "metrics.jsonl")
        write_run_file(path, "{}\n")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(previous)
    assert oct(os.stat(path).st_mode & 0o777) == oct(plain.stat().st_mode & 0o777) == "0o644"
