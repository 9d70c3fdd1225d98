"""tf_medseg: fast 3D medical image segmentation training with TensorFlow 2 / Keras.

TensorFlow is taken as ``tensorflow-cpu`` by default. GPU nodes install the ``gpu`` extra
with ``TF_MEDSEG_TENSORFLOW=none`` so that the CPU wheel is not installed beside the CUDA one
(the Docker image does this, its base image already carrying TensorFlow 2.15).
"""

import os

from setuptools import find_packages, setup

TF_VERSION = "2.15.1"
_tf_choice = os.environ.get("TF_MEDSEG_TENSORFLOW", "tensorflow-cpu")
_tf_requirement = [] if _tf_choice == "none" else [f"{_tf_choice}=={TF_VERSION}"]

setup(
    name="tf_medseg",
    version="0.1.0",
    description="Train 3D medical image segmentation models 20x faster (TF2/Keras).",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["tf_medseg", "tf_medseg.*"]),
    # The experiment presets (tf-medseg-train --preset=NAME) ship inside the package.
    package_data={"tf_medseg.presets": ["*.flags"]},
    install_requires=_tf_requirement
    + [
        "tensorflow-addons==0.23.0",
        "nibabel>=5,<6",
        "SimpleITK>=2.5,<2.6",
        "numpy<2",
        "absl-py>=2,<3",
        "tqdm>=4.60",
    ],
    extras_require={
        "gpu": [f"tensorflow[and-cuda]=={TF_VERSION}"],
        "test": ["pytest>=7", "ruff==0.8.4"],
        # Horovod itself is built by `make venv` (it needs TensorFlow present at build time);
        # these are its runtime requirements.
        "horovod": ["cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "tf-medseg-train=tf_medseg.cli.train:run",
            "tf-medseg-predict=tf_medseg.cli.predict:run",
            "tf-medseg-evaluate=tf_medseg.cli.evaluate:run",
            "tf-medseg-synth=tf_medseg.cli.synth:run",
            "tf-medseg-plan=tf_medseg.cli.plan:run",
        ]
    },
)
