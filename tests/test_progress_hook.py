"""The training progress bar (ProgressHook), as tf-medseg-train draws it."""

from __future__ import annotations

import re
import subprocess
import sys

from tiny_config import TINY_FLAGS


def test_the_bar_shows_the_last_loss_read_back_never_nan(spleen_task_dir, tmp_path):
    """The loss is read back from the device every --log_every steps and at each epoch's end;
    between read-backs the bar shows the last value read (it showed ``loss=nan`` on the first
    steps of every epoch, until the epoch's first read-back)."""
    flags = [f for f in TINY_FLAGS if not f.startswith(("--epochs", "--progress"))]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.train",
            f"--data_dir={spleen_task_dir}",
            f"--workdir={tmp_path / 'run'}",
            *flags,
            "--epochs=3",  # 2 steps each: the first of each epoch is between read-backs
            "--val_every=1000",
            "--log_every=10",
            "--progress=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = re.findall(r"loss=([^,\]\s]+)", result.stderr)
    assert shown, result.stderr[-3000:]
    assert "nan" not in shown, shown
    # The run's first step comes before any read-back: no value yet. After it, a number.
    assert shown[0] == "-", shown
    assert len(shown) >= 3 and all(re.fullmatch(r"\d+\.\d{4}", v) for v in shown[1:]), shown
