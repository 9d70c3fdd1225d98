"""The presets shipped in the package: every one parses and validates, resolves from any folder
(nested flagfiles beside their file), dry-runs, and is in the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from absl import flags

from tf_medseg import presets
from tf_medseg.config import config_from_flags, define_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = presets.names()


def _config(*args: str):
    values = flags.FlagValues()
    define_flags(values)
    flags.DEFINE_string("preset", None, "", flag_values=values)
    flags.DEFINE_bool("plan", None, "", flag_values=values)
    argv = presets.expand_flagfiles(["tf-medseg-train", *args])
    values([*argv, "--data_dir=/data/task", "--workdir=w"])
    return config_from_flags(values)


def test_the_named_presets_ship():
    expected = {"msd_spleen", "msd_heart", "msd_liver", "msd_generic", "msd_spleen_baseline"}
    expected |= {"msd_heart_baseline", "msd_liver_baseline", "synthetic_spleen"}
    expected |= {"synthetic_heart", "synthetic_spleen_msd", "synthetic_heart_msd"}
    expected |= {"synthetic_liver", "synthetic_liver_msd"}
    assert expected <= set(NAMES)
    assert presets.path("msd_spleen") == presets.path("msd_spleen.flags")
    with pytest.raises(presets.PresetError, match="unknown preset 'spleen'; the presets are: "):
        presets.path("spleen")


@pytest.mark.parametrize("name", NAMES)
def test_preset_parses_and_validates(name):
    config = _config(f"--preset={name}")
    assert config.validate() == [], f"{name}: {config.validate()}"


def test_nested_flagfiles_resolve_beside_their_file_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: absl would look for msd_spleen.flags here
    liver = _config("--preset=msd_liver_baseline")
    # msd_liver_baseline -> msd_liver -> msd_spleen, each overriding what it includes.
    assert liver.patch_size == (112, 112, 112) and liver.target_dice == 0.73
    assert liver.cache == "none" and liver.optimizer == "adam"
    # A user's file in another folder including a preset's file by path, and a flag after it.
    mine = tmp_path / "mine" / "exp.flags"
    mine.parent.mkdir()
    mine.write_text(f"# mine\n--flagfile={presets.path('msd_heart')}\n--batch_size=3\n")
    config = _config(f"--flagfile={mine}", "--batch_size=4")
    assert config.batch_size == 4 and config.target_dice == 0.912
    assert _config(f"--flagfile={mine}").batch_size == 3
    # A flag before the preset is overridden by it, as with absl's --flagfile.
    assert _config("--batch_size=1", "--preset=msd_spleen").batch_size == 6
    # A relative nested path that only exists from the current folder is read from there.
    (tmp_path / "base.flags").write_text("--batch_size=5\n")
    (mine.parent / "top.flags").write_text("--flagfile=base.flags\n")
    assert _config(f"--flagfile={mine.parent / 'top.flags'}").batch_size == 5


def test_flagfiles_that_include_each_other_are_an_error(tmp_path):
    (tmp_path / "a.flags").write_text("--flagfile=b.flags\n")
    (tmp_path / "b.flags").write_text("--flagfile=a.flags\n")
    with pytest.raises(presets.PresetError, match="include each other"):
        presets.expand_flagfiles(["x", f"--flagfile={tmp_path / 'a.flags'}"])
    with pytest.raises(presets.PresetError, match="cannot read flagfile"):
        presets.expand_flagfiles(["x", "--flagfile", str(tmp_path / "missing.flags")])


def test_msd_presets_size_the_cache_by_a_memory_budget():
    # The paper's gradual replacement: the cache holds what the budget allows, not a fixed
    # fraction of the training set.
    for name in ("msd_spleen", "msd_heart", "msd_liver"):
        config = _config(f"--preset={name}")
        assert config.cache == "smart" and config.memory_budget_gb > 0, name
        assert config.cache_rate == 1.0 and 0 < config.replace_rate < 1, name
    assert _config("--preset=msd_spleen_baseline").cache == "none"


def test_dry_run_of_every_preset_from_outside_the_repository(spleen_task_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in NAMES:
        workdir = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "tf_medseg.cli.train", f"--preset={name}", "--dry_run"]
            + [f"--data_dir={spleen_task_dir}", f"--workdir={workdir}", "--num_val=2"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        assert f"preset: {name}" in result.stdout and "nothing trained" in result.stdout
        split = json.loads((workdir / "split.json").read_text())
        assert len(split["validation"]) == 2 and len(split["train"]) == 4
        assert not set(split["train"]) & set(split["validation"])
        config = json.loads((workdir / "config.json").read_text())
        if name == "msd_generic":  # planned for the data: the plan is beside the config
            plan = json.loads((workdir / "plan.json").read_text())
            assert config["patch_size"] == [plan["patch_size"]] * 3
        else:
            assert config["patch_size"] == list(_config(f"--preset={name}").patch_size)
            assert not (workdir / "plan.json").exists()
        assert not (workdir / "checkpoints").exists()


def test_fold_flags_are_checked_one_line_each(tmp_path):
    config = _config("--preset=msd_spleen", "--num_folds=5", "--fold=4", "--val_tta")
    assert (config.num_folds, config.fold, config.val_tta) == (5, 4, True)
    assert config.validate() == []
    assert _config("--preset=msd_spleen").val_tta is False
    cases = [
        (("--fold=2",), "--fold=2 needs --num_folds"),
        (("--num_folds=1",), "--num_folds must be 0 (no folds) or at least 2, got 1"),
        (("--num_folds=3", "--fold=3"), "--fold must be in [0, 3) for --num_folds=3, got 3"),
        (("--num_folds=3", "--fold=-1"), "--fold must be in [0, 3) for --num_folds=3, got -1"),
        (("--num_folds=3", f"--split_file={tmp_path / 's.json'}"), "--split_file"),
        (("--num_folds=3", "--num_val=4"), "--num_val=4 both choose the validation cases"),
    ]
    for args, expected in cases:
        errors = _config("--preset=msd_spleen", *args).validate()
        assert len(errors) == 1 and expected in errors[0], (args, errors)
    # A preset that sets --num_val needs --num_val=0 with folds.
    (line,) = _config("--preset=synthetic_spleen", "--num_folds=3").validate()
    assert "give --num_val=0" in line
    assert _config("--preset=synthetic_spleen", "--num_folds=3", "--num_val=0").validate() == []


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", "--preset=synthetic_spleen", "--dry_run"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_writes_the_fold_and_its_split_json_is_read_back_by_split_file(
    spleen_task_dir, tmp_path
):
    from tf_medseg.data.msd import fold_split, load_task

    folded = _dry_run(
        f"--data_dir={spleen_task_dir}",
        f"--workdir={tmp_path / 'fold1'}",
        "--num_val=0",
        "--num_folds=3",
        "--fold=1",
        "--seed=5",
    )
    assert folded.returncode == 0, folded.stderr[-2000:]
    assert "cross-validation fold 1 of 3 (seed 5)" in folded.stdout
    split = json.loads((tmp_path / "fold1" / "split.json").read_text())
    train, val = fold_split(load_task(spleen_task_dir).training, 3, 1, seed=5)
    assert split == {
        "train": [item["case"] for item in train],
        "validation": [item["case"] for item in val],
    }
    assert len(split["validation"]) == 2 and len(split["train"]) == 4
    again = _dry_run(
        f"--data_dir={spleen_task_dir}",
        f"--workdir={tmp_path / 'again'}",
        f"--split_file={tmp_path / 'fold1' / 'split.json'}",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "cross-validation fold" not in again.stdout
    assert json.loads((tmp_path / "again" / "split.json").read_text()) == split
    # More folds than cases: one line, exit code 2.
    many = _dry_run(
        f"--data_dir={spleen_task_dir}",
        f"--workdir={tmp_path / 'many'}",
        "--num_val=0",
        "--num_folds=7",
    )
    assert many.returncode == 2
    assert "cannot deal 6 cases into 7 folds" in many.stderr and "Traceback" not in many.stderr


def test_dry_run_reports_a_bad_data_folder_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", "--preset=synthetic_spleen", "--dry_run"]
        + [f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "dataset.json: not found" in result.stderr and "Traceback" not in result.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", "--preset=nope", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "unknown preset 'nope'" in unknown.stderr


def test_the_wheel_carries_the_presets(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the clone
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    shutil.copytree(
        os.path.join(REPO, "tf_medseg"),
        source / "tf_medseg",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("tf_medseg-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tf_medseg/presets/{name}.flags" for name in NAMES} <= shipped


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_says_which_sampler_it_runs(name):
    """Each preset's comment names the patch sampler its flags give: fixed 1:1 sampling, the
    paper's sampler, or the package's (warm-up, damping, a floor of 1/3, class-balanced
    centres); the msd_* presets were called the paper's proposed settings while they ran the
    package's."""
    from tf_medseg.config import PAPER_SAMPLER

    config = _config(f"--preset={name}")
    with open(presets.path(name)) as f:
        comment = " ".join(line.strip("#\n ") for line in f if line.startswith("#"))
    if not config.adaptive_sampling:
        expected = "fixed 1:1 sampling"
    elif not config.balance_classes and all(
        getattr(config, key) == pytest.approx(value) for key, value in PAPER_SAMPLER.items()
    ):
        expected = "the paper's sampler"
    else:
        expected = "the package's sampler"
    assert expected in comment, f"{name}: runs {expected}; its comment: {comment}"


def test_a_configuration_resolves_defaults_then_the_plan_then_the_given_flags():
    from tf_medseg.config import TrainConfig, resolve_config

    planned = {"spacing": 2.0, "norm": "batch", "val_keep_largest": True}  # a Plan's settings
    planned |= {"learning_rate": 5e-3, "patch_size": 32, "depth": 3}
    config = resolve_config({"norm": "instance", "patch_size": ["48", "48", "32"]}, planned)
    assert config.spacing == (2.0, 2.0, 2.0) and config.val_keep_largest is True
    assert config.learning_rate == 5e-3 and config.depth == 3  # the plan's
    assert config.norm == "instance" and config.patch_size == (48, 48, 32)  # given over planned
    assert config.batch_size == TrainConfig.batch_size  # neither: the default
    with pytest.raises(ValueError, match="val_keep_largest=maybe: not true or false"):
        resolve_config({}, {"val_keep_largest": "maybe"})
    # A preset's flag, then the command line's, as absl orders them, over the plan.
    values = flags.FlagValues()
    define_flags(values)
    flags.DEFINE_string("preset", None, "", flag_values=values)
    argv = presets.expand_flagfiles(["t", "--preset=synthetic_spleen", "--spacing=3"])
    values([*argv, "--data_dir=d", "--workdir=w"])
    planned = {"spacing": 2.0, "depth": 4, "base_filters": 4}
    resolved = config_from_flags(values, planned=planned)
    assert resolved.spacing == (3.0, 3.0, 3.0)  # the command line over the preset and the plan
    assert resolved.depth == 3  # the preset's over the plan's
    assert resolved.base_filters == 8  # the preset's over the plan's
