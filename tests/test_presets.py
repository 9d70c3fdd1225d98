"""Every preset in experiments/ parses with the training CLI's flags and is a valid config."""

from __future__ import annotations

import glob
import os

import pytest
from absl import flags

from tf_medseg.training.config import config_from_flags, define_flags

PRESETS = sorted(glob.glob(os.path.join("experiments", "*.flags")))


def _parse(preset: str):
    values = flags.FlagValues()
    define_flags(values)
    values(["tf-medseg-train", f"--flagfile={preset}", "--data_dir=/data/task", "--workdir=w"])
    return config_from_flags(values)


def test_there_are_presets():
    assert len(PRESETS) >= 10, PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_preset_parses_and_validates(preset):
    config = _parse(preset)
    assert config.validate() == [], f"{preset}: {config.validate()}"


def test_msd_presets_size_the_cache_by_a_memory_budget():
    # The paper's gradual replacement: the cache holds what the budget allows, not a fixed
    # fraction (a fixed 0.5 of the liver would be too much for some machines, needlessly little
    # for others).
    for name in ("msd_spleen", "msd_heart", "msd_liver", "msd_generic"):
        config = _parse(os.path.join("experiments", f"{name}.flags"))
        assert config.cache == "smart" and config.memory_budget_gb > 0, name
        assert config.cache_rate == 1.0 and 0 < config.replace_rate < 1, name
    assert _parse("experiments/msd_spleen_baseline.flags").cache == "none"
