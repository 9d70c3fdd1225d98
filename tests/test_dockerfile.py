"""The GPU Dockerfiles, read as text (no Docker engine runs here): every file they copy exists
and is not excluded by ``.dockerignore``; the paper image is TensorFlow 2.15's GPU image with
Horovod built at the Makefile's version with NCCL and TensorFlow support; the modern image is
the GPU image of setup.py's modern TensorFlow, with the matching tf-keras."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def copy_sources(args: str) -> list[str]:
    """The source paths of a COPY/ADD (shell or JSON form, flags such as --chown dropped)."""
    if args.startswith("["):
        paths = json.loads(args)
    else:
        paths = [word for word in args.split() if not word.startswith("--")]
    return paths[:-1]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` patterns exclude a path (enough of Docker's rules for ours)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [*prefixes, *parts] if pattern.startswith("**/") else prefixes
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            result = not negate
    return result


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def modern() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile.modern").read_text())


def _setup_value(name: str) -> str:
    (value,) = re.findall(rf'^{name} = "([^"]+)"', (ROOT / "setup.py").read_text(), re.M)
    return value


def _args(instructions, keyword: str) -> list[str]:
    return [args for k, args in instructions if k == keyword]


def test_parser_joins_continuations_and_skips_comments():
    text = "# c\nFROM a:b\nRUN x \\\n    # inner\n    && y\nCOPY --chown=1 s1 s2 /d/\n"
    parsed = parse_dockerfile(text)
    assert parsed == [("FROM", "a:b"), ("RUN", "x && y"), ("COPY", "--chown=1 s1 s2 /d/")]
    assert copy_sources(parsed[2][1]) == ["s1", "s2"]
    assert copy_sources('["a b", "c", "/d"]') == ["a b", "c"]
    assert ignored("tf_medseg/__pycache__/x.pyc", ["**/__pycache__"])
    assert ignored(".venv", [".venv"]) and not ignored("tf_medseg", [".venv"])
    assert not ignored("data/x", ["data", "!data/x"])


def test_base_image_is_tensorflow_215_gpu(instructions):
    (base,) = _args(instructions, "FROM")
    assert re.fullmatch(r"tensorflow/tensorflow:2\.15\.\d+(\.post\d+)?-gpu", base), base


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.modern"])
def test_every_copied_file_exists_and_is_not_dockerignored(dockerfile):
    instructions = parse_dockerfile((ROOT / dockerfile).read_text())
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for k in ("COPY", "ADD") for a in _args(instructions, k) for s in copy_sources(a)]
    assert {"setup.py", "README.md", "tf_medseg"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
        assert not ignored(source, patterns), f".dockerignore excludes {source}"


def test_horovod_version_matches_the_makefile_and_builds_with_nccl(instructions):
    makefile = (ROOT / "Makefile").read_text()
    (wanted,) = re.findall(r"^HOROVOD_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    args = dict(a.split("=", 1) for a in _args(instructions, "ARG") if "=" in a)
    assert args["HOROVOD_VERSION"] == wanted
    runs = " ".join(_args(instructions, "RUN"))
    for setting in (
        "HOROVOD_GPU_OPERATIONS=NCCL",
        "HOROVOD_WITH_TENSORFLOW=1",
        "horovod==${HOROVOD_VERSION}",
        "--no-build-isolation",
    ):
        assert setting in runs, setting


def test_installs_the_package_on_the_images_tensorflow_with_the_train_entry_point(instructions):
    runs = _args(instructions, "RUN")
    # No profile extra: the image's TensorFlow stays (an extra would install a second one).
    assert any("pip install --no-cache-dir /opt/tf_medseg " in r for r in runs)
    assert not any("/opt/tf_medseg[" in r for r in runs)
    assert any("python3 -m tf_medseg.stack" in r for r in runs)
    # The installed package must carry its presets (the image's examples use --preset).
    assert any("pip install" in r and "presets.path('msd_spleen')" in r for r in runs)
    assert not any("experiments" in a for k in ("COPY", "ADD") for a in _args(instructions, k))
    (entrypoint,) = _args(instructions, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tf-medseg-train"]
    assert "tf-medseg-train=" in (ROOT / "setup.py").read_text()


def test_modern_image_is_the_modern_tensorflow_with_its_tf_keras(modern):
    wanted = _setup_value("MODERN_TF")
    args = dict(a.split("=", 1) for a in _args(modern, "ARG") if "=" in a)
    assert args["TF_VERSION"] == wanted
    (base,) = _args(modern, "FROM")
    assert base == "tensorflow/tensorflow:${TF_VERSION}-gpu"
    assert "TF_USE_LEGACY_KERAS=1" in _args(modern, "ENV")
    runs = " ".join(_args(modern, "RUN"))
    assert '"tf-keras==${TF_VERSION}"' in runs and "python3 -m tf_medseg.stack" in runs
    assert "horovod" not in runs.lower()
    (entrypoint,) = _args(modern, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tf-medseg-train"]
    assert "tf-medseg-launch=" in (ROOT / "setup.py").read_text()
