"""The installed stack: which profile this is, and what it has.

tf_medseg runs on two stacks (README, "Install"): the **paper** profile (TensorFlow 2.15, whose
``tf.keras`` is Keras 2, with tensorflow-addons and Horovod) and the **modern** profile
(TensorFlow 2.16 or newer with ``tf-keras``, Keras 2 kept by ``TF_USE_LEGACY_KERAS=1``, which
``tf_medseg/__init__.py`` sets before TensorFlow is imported). What only one profile has is
asked for here, so that code and tests say why something is missing instead of failing on an
import. Nothing here imports TensorFlow.

``python -m tf_medseg.stack`` prints the stack and fails when it cannot run tf_medseg (``make
venv`` runs it after installing).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

PROFILES = ("paper", "modern")
_TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel")


class StackError(ImportError):
    """The installed packages cannot run tf_medseg; the message says what to install."""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensorflow_version() -> str | None:
    """The installed TensorFlow's version (any of its distributions), or None."""
    for name in _TENSORFLOW_DISTRIBUTIONS:
        version = _version(name)
        if version:
            return version
    return None


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def profile() -> str:
    """``paper`` when TensorFlow's own ``tf.keras`` is Keras 2 (up to 2.15), else ``modern``.

    Raises:
        StackError: TensorFlow is not installed.
    """
    version = tensorflow_version()
    if version is None:
        raise StackError(_missing_tensorflow())
    return "paper" if _minor(version) <= (2, 15) else "modern"


def _missing_tensorflow() -> str:
    return (
        "tf_medseg needs TensorFlow: pip install 'tf_medseg[paper]' (TensorFlow 2.15, Python "
        "3.9-3.11) or 'tf_medseg[modern]' (TensorFlow 2.21 with tf-keras, Python 3.10-3.13); "
        "'make venv' or 'make venv PROFILE=modern' does it"
    )


def problems() -> list[str]:
    """Every reason the installed stack cannot run tf_medseg (empty when it can)."""
    version = tensorflow_version()
    if version is None:
        return [_missing_tensorflow()]
    errors = []
    if _minor(version) > (2, 15):
        keras = _version("tf-keras") or _version("tf_keras")
        if keras is None:
            errors.append(
                f"TensorFlow {version}'s tf.keras is Keras 3, which tf_medseg does not use: "
                f"install tf-keras=={'.'.join(version.split('.')[:2])}.* (pip install "
                "'tf_medseg[modern]')"
            )
        elif _minor(keras) != _minor(version):
            errors.append(f"tf-keras {keras} does not match TensorFlow {version}")
        if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
            errors.append(
                "TF_USE_LEGACY_KERAS is not 1: tf.keras would be Keras 3 (tf_medseg sets it "
                "when imported before TensorFlow; do not set it to 0)"
            )
    return errors


def describe() -> dict:
    """The stack as a dict (for ``summary.json`` and the benchmarks' records)."""
    version = tensorflow_version()
    return {
        "profile": profile() if version else None,
        "python": sys.version.split()[0],
        "tensorflow": version,
        "tf_keras": _version("tf-keras"),
        "numpy": _version("numpy"),
        "tensorflow_addons": _version("tensorflow-addons"),
        "horovod": _version("horovod"),
    }


def keras_version(tf) -> str:
    """The version of the Keras that ``tf.keras`` is (tf-keras's under the modern profile,
    the ``keras`` package's under TensorFlow 2.15)."""
    name = getattr(tf.keras, "__name__", "")
    distribution = "tf-keras" if name.startswith("tf_keras") else "keras"
    return _version(distribution) or "?"


def main() -> int:
    import tf_medseg  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

    errors = problems()
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    import tensorflow as tf

    info = describe()
    keras = keras_version(tf)
    if not keras.startswith("2."):
        print(f"error: tf.keras is Keras {keras}, not Keras 2", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in info.items() if v) + f" keras={keras}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
