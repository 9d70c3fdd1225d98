"""The reproduction recipes in experiments/: every flagfile dry-runs from a folder outside the
repository, resolves to what its comment says, and the Docker script builds the right command."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tf_medseg.data.synthetic import generate_task

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TASKS = ("spleen", "heart", "liver")
#: What each ablation changes in proposed.flags (every other resolved setting must be equal).
ABLATIONS = {
    "proposed-cache": {"cache": "none"},
    "proposed-adaptive": {"adaptive_sampling": False},
    "proposed-novograd": {"optimizer": "adam", "learning_rate": 1e-4},
    "proposed-instance_norm": {"norm": "batch"},
    "proposed-amp": {"precision": "float32"},
}


def _flagfiles(task: str) -> list[Path]:
    return sorted((EXPERIMENTS / task).rglob("*.flags"))


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, dict]:
    """Every flagfile's resolved configuration (its config.json), keyed ``task/relative``,
    from ``tf-medseg-train --flagfile=... --dry_run`` run in a folder outside the repository."""
    root = tmp_path_factory.mktemp("experiments")
    data = {
        task: generate_task(task, str(root / f"data_{task}"), num_train=4, num_test=0, size=16)
        for task in TASKS
    }
    outside = root / "elsewhere"
    outside.mkdir()

    def dry_run(task: str, flagfile: Path) -> tuple[str, dict]:
        key = f"{task}/{flagfile.relative_to(EXPERIMENTS / task).with_suffix('')}"
        workdir = root / "runs" / key.replace("/", "_")
        command = [
            sys.executable,
            "-m",
            "tf_medseg.cli.train",
            f"--flagfile={flagfile}",
            f"--data_dir={data[task]}",
            f"--workdir={workdir}",
            "--dry_run",
        ]
        result = subprocess.run(command, cwd=outside, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{key}:\n{result.stderr[-2000:]}"
        assert "dry run: wrote config.json" in result.stdout, key
        return key, json.loads((workdir / "config.json").read_text())

    jobs = [(task, f) for task in TASKS for f in _flagfiles(task)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(lambda job: dry_run(*job), jobs))


def test_each_task_has_proposed_baseline_package_and_the_ablations():
    for task in TASKS:
        names = {str(f.relative_to(EXPERIMENTS / task).with_suffix("")) for f in _flagfiles(task)}
        assert names == {"proposed", "baseline", "package"} | {f"ablations/{a}" for a in ABLATIONS}
    assert (EXPERIMENTS / "README.md").is_file()


def _without_paths(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("workdir", "data_dir")}


def test_every_flagfile_dry_runs_outside_the_repository_as_its_comment_says(dry_runs):
    for task in TASKS:
        proposed = dry_runs[f"{task}/proposed"]
        baseline = dry_runs[f"{task}/baseline"]
        package = dry_runs[f"{task}/package"]
        # The paper's proposed configuration, with the paper's sampler update and centres.
        assert proposed["cache"] == "smart" and proposed["optimizer"] == "novograd"
        assert proposed["adaptive_sampling"] and proposed["norm"] == "instance"
        assert proposed["precision"] == "mixed_float16"
        assert proposed["sampler_damping"] == 1.0 and proposed["sampler_warmup_validations"] == 0
        assert proposed["pos_fraction_bounds"] == [0.1, 0.9] and not proposed["balance_classes"]
        # The package's sampler differs from the paper's; nothing else does.
        differ = {k for k in proposed if proposed[k] != package[k]} - {"workdir"}
        assert differ and differ <= {
            "sampler_damping",
            "sampler_warmup_validations",
            "sampler_warmup_dice",
            "pos_fraction_bounds",
            "balance_classes",
        }, differ
        # The baseline: the paper's "Native TF".
        assert baseline["cache"] == "none" and baseline["optimizer"] == "adam"
        assert baseline["norm"] == "batch" and not baseline["adaptive_sampling"]
        assert baseline["precision"] == "float32"
        assert baseline["patch_size"] == proposed["patch_size"]
        assert baseline["target_dice"] == proposed["target_dice"]
        for name, change in ABLATIONS.items():
            ablation = _without_paths(dry_runs[f"{task}/ablations/{name}"])
            assert ablation == {**_without_paths(proposed), **change}, f"{task} {name}"


def test_the_docker_script_mounts_the_experiment_and_runs_one_or_several_gpus(tmp_path):
    data = tmp_path / "Task09_Spleen"
    data.mkdir()
    script = str(EXPERIMENTS / "docker_train.sh")
    env = {**os.environ, "DOCKER": "echo"}

    def command(*args):
        result = subprocess.run(
            ["bash", script, *args], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    one = command("spleen", "proposed", str(data), "runs/one")
    assert one[:2] == ["run", "--gpus"] and "horovodrun" not in one
    assert f"{EXPERIMENTS}:/experiments:ro" in one and f"{data}:/data/Task09_Spleen:ro" in one
    assert f"{tmp_path / 'runs' / 'one'}:/workdir" in one
    assert one[-3:] == [
        "--flagfile=/experiments/spleen/proposed.flags",
        "--data_dir=/data/Task09_Spleen",
        "--workdir=/workdir",
    ]
    eight = command("liver", "ablations/proposed-cache", str(data), "runs/eight", "8", "--seed=1")
    at = eight.index("horovodrun")
    assert eight[at - 1] == "--entrypoint" and eight[at + 2 : at + 8] == [
        "-np",
        "8",
        "-H",
        "localhost:8",
        "--gloo",
        "tf-medseg-train",
    ]
    assert eight[-4:] == [
        "--flagfile=/experiments/liver/ablations/proposed-cache.flags",
        "--data_dir=/data/Task09_Spleen",
        "--workdir=/workdir",
        "--seed=1",
    ]
    missing = subprocess.run(
        ["bash", script, "spleen", "nothing", str(data), "runs/x"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 2 and "no experiment" in missing.stderr
