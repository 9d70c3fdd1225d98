"""tf_medseg: fast 3D medical image segmentation training with TensorFlow 2 / Keras.

Two profiles, chosen by an extra (README, "Install"):

* ``paper``: the paper's stack, TensorFlow 2.15.1 (``tensorflow-cpu``; ``paper-gpu`` for the CUDA
  build) with tensorflow-addons 0.23.0 (the NovoGrad reference) and NumPy 1, Python 3.9-3.11.
  Horovod is built separately against it (``make venv``; its runtime needs are ``horovod``).
* ``modern``: TensorFlow 2.21 with ``tf-keras`` 2.21 (Keras 2 kept through
  ``TF_USE_LEGACY_KERAS=1``, which tf_medseg sets), NumPy 2, Python 3.10-3.13; no
  tensorflow-addons, no Horovod (``tf.distribute`` instead). tf-keras requires the ``tensorflow``
  package (not ``tensorflow-cpu``), which runs on CPUs as it is; ``modern-gpu`` adds CUDA.

With no profile extra, TensorFlow is not installed (a Docker image that brings its own).
"""

import os

from setuptools import find_packages, setup

PAPER_TF = "2.15.1"
MODERN_TF = "2.21.0"
_paper = ["tensorflow-addons==0.23.0", "numpy<2"]
# TensorFlow 2.21 no longer requires TensorBoard, whose summary writers tf_medseg uses.
_modern = [f"tf-keras=={MODERN_TF}", "tensorboard~=2.21.0"]

setup(
    name="tf_medseg",
    version="0.1.0",
    description=(
        "3D medical image segmentation (TF2/Keras) with the methods of the paper "
        "Training Models 20X Faster in Medical Image Analysis"
    ),
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.14",
    packages=find_packages(include=["tf_medseg", "tf_medseg.*"]),
    # The experiment presets (tf-medseg-train --preset=NAME) ship inside the package.
    package_data={"tf_medseg.presets": ["*.flags"]},
    install_requires=[
        "nibabel>=5,<6",
        "SimpleITK>=2.5,<2.6",
        "numpy",
        "absl-py>=2,<3",
        "tqdm>=4.60",
    ],
    extras_require={
        "paper": [f"tensorflow-cpu=={PAPER_TF}", *_paper],
        "paper-gpu": [f"tensorflow[and-cuda]=={PAPER_TF}", *_paper],
        "modern": [f"tensorflow=={MODERN_TF}", *_modern],
        "modern-gpu": [f"tensorflow[and-cuda]=={MODERN_TF}", *_modern],
        "test": ["pytest>=7", "pytest-xdist>=3.5", "ruff==0.8.4"],
        # Horovod itself is built by `make venv` (it needs TensorFlow present at build time);
        # these are its runtime requirements.
        "horovod": ["cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "tf-medseg-train=tf_medseg.cli:train",
            "tf-medseg-predict=tf_medseg.cli.predict:run",
            "tf-medseg-evaluate=tf_medseg.cli.evaluate:run",
            "tf-medseg-synth=tf_medseg.cli.synth:run",
            "tf-medseg-plan=tf_medseg.cli.plan:run",
            "tf-medseg-launch=tf_medseg.cli.launch:run",
            "tf-medseg-export=tf_medseg.cli.export:run",
            "tf-medseg-download=tf_medseg.cli.download:run",
        ]
    },
)
