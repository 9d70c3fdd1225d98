"""tf-medseg-launch with real processes (no TensorFlow in the workers): environments, output,
fail-fast and signal forwarding. The training runs under it are in test_distributed.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_config import TINY_FLAGS

from tf_medseg import distributed, stack
from tf_medseg.cli import launch
from tf_medseg.planning.system import LOCAL_RANK_VARIABLE

LAUNCH = [sys.executable, "-m", "tf_medseg.cli.launch"]


def launch_python(code: str, *options: str) -> subprocess.CompletedProcess:
    """Two workers running ``python -c code`` under the launcher, to completion."""
    return subprocess.run(
        [*LAUNCH, "--num_workers=2", *options, "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_each_worker_gets_the_cluster_and_its_index():
    envs = launch.worker_environments(3, base={"KEEP": "1"})
    configs = [json.loads(env["TF_CONFIG"]) for env in envs]
    hosts = configs[0]["cluster"]["worker"]
    assert len(set(hosts)) == 3 and all(h.startswith("localhost:") for h in hosts)
    for index, (env, config) in enumerate(zip(envs, configs, strict=True)):
        assert config == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        assert env[LOCAL_RANK_VARIABLE] == str(index) and env["KEEP"] == "1"


def test_auto_picks_the_backend_from_the_environment(monkeypatch):
    for name in (*distributed._LAUNCHER_VARIABLES, "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.choose_backend("auto") == "none"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1"]}}))
    assert distributed.choose_backend("auto") == "tf"
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert distributed.choose_backend("auto") == "horovod"
    assert distributed.choose_backend("none") == "none"
    with pytest.raises(ValueError, match="unknown distribution 'mpi'"):
        distributed.choose_backend("mpi")


def test_tf_backend_without_a_cluster_says_how_to_start_one(monkeypatch):
    for name in ("TF_CONFIG", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    if stack.profile() == "paper":  # refused before it looks for a cluster
        with pytest.raises(RuntimeError, match="needs TensorFlow 2.16 or newer"):
            distributed.setup(distribution="tf")
        return
    with pytest.raises(RuntimeError, match="tf-medseg-launch --num_workers=N"):
        distributed.setup(distribution="tf")


def test_output_is_prefixed_and_success_is_zero():
    code = "import os, json; print('index', json.loads(os.environ['TF_CONFIG'])['task']['index'])"
    done = launch_python(code)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[0] index 0", "[1] index 1"]


def test_a_failing_worker_stops_the_others_and_sets_the_status():
    code = (
        "import os, sys, time\n"
        "if os.environ['TF_MEDSEG_LOCAL_RANK'] == '1': sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    start = time.time()
    done = launch_python(code, "--grace_s=2")
    assert done.returncode == 3
    assert time.time() - start < 30  # not the sleeping worker's 120 s
    assert "worker 1 failed (exit code 3); stopping the others" in done.stderr
    assert "worker 1 failed: exit code 3" in done.stderr


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period():
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.environ['TF_MEDSEG_LOCAL_RANK'] == '0': time.sleep(0.5); sys.exit(5)\n"
        "time.sleep(120)\n"
    )
    start = time.time()
    done = launch_python(code, "--grace_s=1")
    assert done.returncode == 5 and time.time() - start < 30


def test_sigint_is_forwarded_to_every_worker(tmp_path):
    code = (
        "import os, signal, sys, time\n"
        f"out = {str(tmp_path)!r} + '/got.' + os.environ['TF_MEDSEG_LOCAL_RANK']\n"
        "def handler(signum, frame):\n"
        "    open(out, 'w').write(signal.Signals(signum).name); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, handler)\n"
        "open(out + '.ready', 'w').close()\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [*LAUNCH, "--num_workers=2", "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not all(
        os.path.exists(tmp_path / f"got.{r}.ready") for r in (0, 1)
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "forwarding SIGINT to the workers" in err
    assert [(tmp_path / f"got.{r}").read_text() for r in (0, 1)] == ["SIGINT", "SIGINT"]


def test_usage_errors():
    for args in (["--num_workers=2"], ["--num_workers=0", "--", "true"]):
        done = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "error" in done.stderr


def test_the_cli_refuses_a_backend_it_cannot_start_in_one_line(spleen_task_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "SLURM_JOB_ID")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.train",
            "--distribution=tf",
            f"--data_dir={spleen_task_dir}",
            f"--workdir={tmp_path / 'run'}",
            *TINY_FLAGS,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tf-medseg-train: ") and "Traceback" not in done.stderr
    if stack.profile() == "paper":
        assert "needs TensorFlow 2.16 or newer" in last
    else:
        assert "needs the cluster in TF_CONFIG" in last
