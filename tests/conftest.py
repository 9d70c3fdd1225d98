"""Shared fixtures: tiny synthetic tasks written to temporary folders by the package's generator."""

from __future__ import annotations

import pytest

import tf_medseg  # noqa: F401  (sets TensorFlow's oneDNN switch before TensorFlow is imported)
from tf_medseg.data.synthetic import generate_task


@pytest.fixture(scope="session")
def spleen_task_dir(tmp_path_factory) -> str:
    """A tiny synthetic spleen task (CT, 6 training + 1 test cases, 32 voxels in-plane)."""
    out = tmp_path_factory.mktemp("synthetic") / "spleen"
    return generate_task("spleen", str(out), num_train=6, num_test=1, size=32, seed=3)


@pytest.fixture(scope="session")
def heart_task_dir(tmp_path_factory) -> str:
    """A tiny synthetic heart task (MRI, two modalities)."""
    out = tmp_path_factory.mktemp("synthetic") / "heart"
    return generate_task(
        "heart", str(out), num_train=3, num_test=1, size=24, seed=1, num_modalities=2
    )


@pytest.fixture(scope="session")
def liver_task_dir(tmp_path_factory) -> str:
    """A small synthetic liver task (CT, liver and lesions, 8 training cases, 64 in-plane)."""
    out = tmp_path_factory.mktemp("synthetic") / "liver"
    return generate_task("liver", str(out), num_train=8, num_test=0, size=64, seed=1)
