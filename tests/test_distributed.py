"""Multi-worker training for real on this CPU, with each backend: ``horovodrun -np 2 -H
localhost:2 --gloo`` (Horovod, paper profile) and ``tf-medseg-launch --num_workers=2``
(tf.distribute's MultiWorkerMirroredStrategy, modern profile). The same checks hold for both.

Three jobs share one workdir, each resuming the previous one's checkpoints:

A. ``trained``: 3 epochs from scratch (2 steps each), recording every rank's batches;
B. ``killed``: resumes A with no end in sight; the test SIGKILLs rank 1 after two more epochs;
C. ``resumed``: resumes B's last checkpoint with rank 1's clock one hour ahead and a 30-minute
   bound, and fp16 gradient compression.

Every job runs under a timeout and is killed with its process group when it overruns, so a hang
fails the test instead of blocking the suite. The single-process references (the same global
batch through the same train step, validation of the same weights) run in the pytest process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tiny_config import tiny_config

from tf_medseg import distributed, stack
from tf_medseg.config import TrainConfig
from tf_medseg.data.synthetic import generate_task
from tf_medseg.inference.window import make_window_predictor
from tf_medseg.training.loop import Trainer
from tf_medseg.training.validation import validate

HOROVODRUN = Path(sys.executable).parent / "horovodrun"
WORKER = Path(__file__).parent / "distributed_worker.py"
JOB_TIMEOUT_S = 180
STEPS_PER_EPOCH = 2  # cache_num 2 x num_samples 2 / batch_size 2, on each rank


def launch_command(backend: str) -> list[str]:
    """The launcher of two local workers for a backend."""
    if backend == "horovod":
        return [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo"]
    return [sys.executable, "-m", "tf_medseg.cli.launch", "--num_workers=2", "--"]


@pytest.fixture(scope="module", params=["horovod", "tf"])
def backend(request) -> str:
    if request.param == "horovod" and not HOROVODRUN.exists():
        pytest.skip("Horovod is not installed (the paper profile's make venv builds it)")
    if request.param == "tf" and stack.profile() == "paper":
        pytest.skip("the tf backend needs TensorFlow 2.16+ (the modern profile)")
    return request.param


# ---------------------------------------------------------------------------- single process
def test_single_process_is_inert(monkeypatch):
    for name in (*distributed._LAUNCHER_VARIABLES, "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    dist = distributed.setup(fp16_allreduce=True)
    assert (dist.rank, dist.size, dist.is_chief, dist.hvd) == (0, 1, True, None)
    with tf.GradientTape() as tape:
        pass
    assert dist.gradient_tape(tape) is tape
    values = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(dist.allreduce_sum(values, "x"), values.astype(np.float64))
    assert dist.allreduce_mean(2.5, "x") == 2.5
    assert dist.any_rank(True, "x") and not dist.any_rank(False, "x")
    assert dist.allgather_object({"a": 1}, "x") == [{"a": 1}]
    dist.check_same(3, "steps per epoch")
    assert float(dist.mean_in_graph(tf.constant(1.5), "x")) == 1.5
    assert dist.scaled_learning_rate(1e-3, scale=True, warmup_steps=0) == 1e-3
    assert distributed.Distributed(size=4).scaled_learning_rate(1e-3, True, 100) == 4e-3
    assert distributed.Distributed(size=4).scaled_learning_rate(1e-3, False, 100) == 1e-3


# ---------------------------------------------------------------------------- the jobs
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    """6 training cases (3 per rank, 2 cached, 1 replaced per epoch) and 3 validation cases."""
    out = tmp_path_factory.mktemp("hvd") / "spleen"
    return generate_task("spleen", str(out), num_train=9, num_test=0, size=32, seed=11)


def hvd_config(data_dir: str, workdir: Path, **overrides) -> TrainConfig:
    """The shared tiny configuration, made deterministic and comparable across worker counts."""
    settings = dict(
        num_val=3,
        epochs=3,
        optimizer="novograd",
        learning_rate=1e-2,
        # Per-patch Dice: the mean over 2 + 2 patches is the loss over the 4 patches. Batch
        # Dice sums over each worker's own batch, which one process cannot reproduce.
        loss_batch=False,
        deterministic=True,
        seed=5,
        image_summaries=False,
    )
    return tiny_config(data_dir, workdir, **{**settings, **overrides})


class Job:
    """A two-worker job of the test worker, in its own process group."""

    def __init__(self, backend: str, config: TrainConfig, out: Path, *worker_args: str):
        out.mkdir(parents=True)
        (out / "config.json").write_text(config.to_json())
        self.out = out
        self.backend = backend
        self.log = open(out / "launcher.log", "w+")
        command = [
            *launch_command(backend),
            sys.executable, str(WORKER), "--config", str(out / "config.json"),
            "--out", str(out), *worker_args,
        ]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def worker_pid(self, rank: int) -> int | None:
        path = self.out / f"pid.{rank}"
        return int(path.read_text()) if path.exists() else None

    def output(self) -> str:
        self.log.flush()
        return (self.out / "launcher.log").read_text()

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> int:
        """The job's exit code; kills everything it started and fails the test on timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"{self.backend} job did not finish in {timeout} s:\n{self.output()[-3000:]}"
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        # Both launchers start each worker in a session of its own: end those too.
        for rank in (0, 1):
            pid = self.worker_pid(rank)
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()

    def rank(self, r: int) -> tuple[dict, dict]:
        arrays = np.load(self.out / f"rank{r}.npz")
        return json.loads((self.out / f"rank{r}.json").read_text()), dict(arrays)


def _run(job: Job) -> Job:
    code = job.wait()
    assert code == 0, f"{job.backend} job failed ({code}):\n{job.output()[-3000:]}"
    return job


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


@pytest.fixture(scope="module")
def workdir(backend, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"{backend}_run") / "workdir"


@pytest.fixture(scope="module")
def trained(backend, task_dir, workdir, tmp_path_factory) -> Job:
    config = hvd_config(task_dir, workdir)
    job = _run(Job(backend, config, tmp_path_factory.mktemp("job") / "trained", "--record"))
    # Jobs B and C append to the shared workdir: keep A's outputs.
    for name in ("metrics.jsonl", "summary.json"):
        (job.out / name).write_text((workdir / name).read_text())
    return job


@pytest.fixture(scope="module")
def killed(backend, trained, task_dir, workdir, tmp_path_factory) -> dict:
    """Job B: resumes A's checkpoint, trains until rank 1 is killed with SIGKILL."""
    config = hvd_config(task_dir, workdir, epochs=100000, val_every=100000)
    job = Job(backend, config, tmp_path_factory.mktemp("job") / "killed")
    checkpoints = workdir / "checkpoints"
    wanted = 3 * STEPS_PER_EPOCH + 2 * STEPS_PER_EPOCH  # A's 3 epochs, then 2 of B's own
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline and job.proc.poll() is None:
        latest = tf.train.latest_checkpoint(str(checkpoints))
        if latest and int(latest.rsplit("-", 1)[1]) >= wanted:
            break
        time.sleep(0.2)
    else:
        job.kill()
        pytest.fail(f"job B never reached step {wanted}:\n{job.output()[-3000:]}")
    victim, survivor = job.worker_pid(1), job.worker_pid(0)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    code = job.wait(timeout=60)
    seconds = time.time() - killed_at
    for _ in range(50):  # the launcher stops the survivor; give it a moment to exit
        if not _alive(survivor):
            break
        time.sleep(0.2)
    return {
        "job": job,
        "code": code,
        "seconds": seconds,
        "survivor_alive": _alive(survivor),
        "latest": tf.train.latest_checkpoint(str(checkpoints)),
    }


@pytest.fixture(scope="module")
def resumed(backend, killed, task_dir, workdir, tmp_path_factory) -> Job:
    config = hvd_config(task_dir, workdir, epochs=100000, budget_minutes=30.0, fp16_allreduce=True)
    out = tmp_path_factory.mktemp("job") / "resumed"
    return _run(Job(backend, config, out, "--skew_clock_rank", "1"))


@pytest.fixture(scope="module")
def single(task_dir, tmp_path_factory):
    """A one-process Trainer with the global batch (2 ranks x 2 patches) for the references."""
    config = hvd_config(task_dir, tmp_path_factory.mktemp("single") / "run", batch_size=4)
    trainer = Trainer(config)
    yield trainer
    trainer.close()


def _one_process_losses(single, info0, arr0, arr1) -> list[float]:
    """The losses of one process trained on the two ranks' batches of each step, concatenated,
    from the ranks' initial weights."""
    for i, v in enumerate(single.train_model.weights):
        v.assign(arr0[f"init{i}"])
    losses = []
    for step in range(len(info0["losses"])):
        images = np.concatenate([arr0["images"][step], arr1["images"][step]])
        labels = np.concatenate([arr0["labels"][step], arr1["labels"][step]])
        losses.append(float(single.train_step(tf.constant(images), tf.constant(labels))))
    return losses


# ---------------------------------------------------------------------------- the assertions
def test_ranks_train_on_different_data_and_end_with_identical_weights(trained):
    (info0, arr0), (info1, arr1) = trained.rank(0), trained.rank(1)
    assert info0["size"] == info1["size"] == 2
    assert info0["backend"] == info1["backend"] == trained.backend
    assert info0["step"] == info1["step"] == 3 * STEPS_PER_EPOCH
    # Each rank draws from its own shard, so the identical weights come from the all-reduce.
    assert arr0["images"].shape == (6, 2, 16, 16, 16, 1)
    assert not np.allclose(arr0["images"], arr1["images"])
    names = [k for k in arr0 if k.startswith("w")]
    assert len(names) > 10
    for name in names:
        np.testing.assert_array_equal(arr0[name], arr1[name], err_msg=name)
    moved = [not np.array_equal(arr0[n], arr0["init" + n[1:]]) for n in names]
    assert sum(moved) > len(names) // 2
    # The logged loss is the mean over the ranks, the same number on both.
    assert info0["losses"] == info1["losses"] and len(info0["losses"]) == 6


def test_loss_curve_matches_one_process_on_the_same_global_batch(trained, single):
    """The two ranks' batches of each step, concatenated, go through the one-process step.

    Gradients of a per-sample mean loss over 4 patches equal the mean of the gradients over
    2 + 2 patches, so with the same initial weights the losses and weights agree up to float32
    rounding (the all-reduce adds in another order).
    """
    (info0, arr0), (_, arr1) = trained.rank(0), trained.rank(1)
    losses = _one_process_losses(single, info0, arr0, arr1)
    np.testing.assert_allclose(info0["losses"], losses, rtol=0, atol=1e-6)
    assert losses[-1] < losses[0] - 5e-3  # the curve moves far more than the tolerance
    # oneDNN picks its convolution kernels by batch size (4 here, 2 per rank), so sums are
    # ordered differently: the weights agree to 2e-4 after moving by about 1e-2.
    for i, v in enumerate(single.model.weights):
        np.testing.assert_allclose(v.numpy(), arr0[f"w{i}"], rtol=0, atol=2e-4)


def test_distributed_validation_equals_single_process_validation(trained, single):
    (info0, arr0), (info1, arr1) = trained.rank(0), trained.rank(1)
    # Cases are dealt round-robin: 2 to rank 0, 1 to rank 1, none twice.
    assert len(info0["local_val_cases"]) == 2 and len(info1["local_val_cases"]) == 1
    np.testing.assert_array_equal(arr0["case_dice"], arr1["case_dice"])
    for i, v in enumerate(single.model.weights):
        v.assign(arr0[f"w{i}"])
    c = single.config
    predictor = make_window_predictor(
        single.model, c.val_roi_size, single.task.num_channels, c.val_sw_batch_size
    )
    items = single.validation_items()
    reference = validate(
        predictor, items, single.task.num_classes, c.val_roi_size, c.val_overlap, c.val_mode
    )
    assert [item["case"] for item in items] == [
        info0["local_val_cases"][0],
        info1["local_val_cases"][0],
        info0["local_val_cases"][1],
    ]
    np.testing.assert_array_equal(arr0["sums"], reference.sums.to_array())
    np.testing.assert_allclose(arr0["case_dice"], reference.case_dice, rtol=0, atol=1e-12)
    assert info0["mean_dice"] == pytest.approx(reference.mean_dice, abs=1e-12)


def test_only_rank_zero_writes_and_stop_votes_are_collective(trained, workdir):
    info0, _ = trained.rank(0)
    info1, _ = trained.rank(1)
    lines = [json.loads(x) for x in (trained.out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    # The loop's own last validation scored the final weights, as the worker's did.
    assert lines[-1]["mean_dice"] == pytest.approx(info0["mean_dice"], abs=1e-6)
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    written = json.loads((trained.out / "summary.json").read_text())
    assert written["workers"] == 2
    for info in (info0, info1):
        assert info["votes"] == {"rank1_true": True, "none_true": False}
        # fit() returns the summary on every worker, not only the chief that writes it.
        assert info["summary"] == {k: written[k] for k in ("steps", "best_dice", "workers")}


def test_killing_one_worker_fails_the_job_with_a_clear_error(killed):
    start = json.loads((killed["job"].out / "rank1.start.json").read_text())
    assert start["start_step"] == 3 * STEPS_PER_EPOCH  # B resumed A's last checkpoint
    assert killed["code"] != 0
    assert killed["seconds"] < 30
    output = killed["job"].output()
    if killed["job"].backend == "horovod":
        assert "exited with non-zero status" in output and "Exit code: 137" in output
    else:
        assert "worker 1 failed: killed by SIGKILL" in output
    assert not killed["survivor_alive"], "rank 0 outlived the failed job"


def test_restart_resumes_the_last_checkpoint_and_stops_on_an_agreed_time_bound(
    killed, resumed, workdir
):
    latest = killed["latest"]
    last_step = int(latest.rsplit("-", 1)[1])
    assert last_step >= 5 * STEPS_PER_EPOCH
    for r in (0, 1):
        start = json.loads((resumed.out / f"rank{r}.start.json").read_text())
        assert start["restored_from"] == latest
        assert start["start_step"] == last_step
    (info0, arr0), (info1, arr1) = resumed.rank(0), resumed.rank(1)
    # Only rank 1 is past the time bound on its own clock: both stop at the first vote, taken
    # at the loop's first sync point, the end of the first epoch (checkpoints are at epoch
    # ends, so the resumed run starts on one; --log_every is 10).
    stop = last_step + STEPS_PER_EPOCH
    for info in (info0, info1):
        assert info["stop_reason"] == "reached --budget_minutes=30"
        assert info["step"] == stop
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith(f"-{stop}")
    for name in (k for k in arr0 if k.startswith("w")):  # fp16 compression on the wire
        np.testing.assert_array_equal(arr0[name], arr1[name], err_msg=name)


def test_one_process_resumes_a_two_worker_checkpoint(resumed, task_dir, workdir, caplog):
    """The checkpoint holds each rank's cache position; one process keeps the model and the
    counters, and starts its cache afresh instead of failing on a foreign rank's position."""
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    (_, arr0) = resumed.rank(0)
    trainer = Trainer(hvd_config(task_dir, workdir, epochs=100000))
    try:
        assert trainer.restored_from == latest
        assert trainer.state.step == int(latest.rsplit("-", 1)[1])
        for i, v in enumerate(trainer.model.weights):
            np.testing.assert_array_equal(v.numpy(), arr0[f"w{i}"])
        assert trainer.train_source.state()["world_size"] == 1
    finally:
        trainer.close()
    assert "cache position is for 2 workers" in caplog.text


def test_deep_supervision_on_two_workers_follows_one_process(backend, task_dir, tmp_path):
    """--deep_supervision on two workers: the auxiliary head is broadcast and its gradients
    averaged like every other weight, and the loss (the weighted sum over the outputs, of a
    per-patch Dice) follows one process's on the same global batches."""
    config = hvd_config(task_dir, tmp_path / "workdir", deep_supervision=True, epochs=2)
    job = _run(Job(backend, config, tmp_path / "job", "--record"))
    (info0, arr0), (info1, arr1) = job.rank(0), job.rank(1)
    assert info0["losses"] == info1["losses"] and len(info0["losses"]) == 2 * STEPS_PER_EPOCH
    names = info0["weight_names"]
    heads = [i for i, name in enumerate(names) if name.startswith("ds1_logits/")]
    assert len(heads) == 2  # kernel and bias
    for i in range(len(names)):
        np.testing.assert_array_equal(arr0[f"w{i}"], arr1[f"w{i}"], err_msg=names[i])
    for i in heads:
        assert not np.array_equal(arr0[f"w{i}"], arr0[f"init{i}"]), names[i]
    single = Trainer(dataclasses.replace(config, workdir=str(tmp_path / "single"), batch_size=4))
    try:
        losses = _one_process_losses(single, info0, arr0, arr1)
    finally:
        single.close()
    np.testing.assert_allclose(info0["losses"], losses, rtol=0, atol=1e-6)
