"""tf_medseg: train 3D medical image segmentation models with the methods of a fast-training paper.

The package implements "Training Models 20X Faster in Medical Image Analysis" (MIDL 2020; the 20x
is the paper's claim, on GPUs; what this package measured is in the README) on
TensorFlow / Keras 2: smart cache with gradual replacement, adaptive positive/negative patch
sampling, NovoGrad, mixed precision and multi-worker training (Horovod or tf.distribute). It runs
on the paper's TensorFlow 2.15 and on TensorFlow 2.16+ with tf-keras (:mod:`tf_medseg.stack`).
"""

import importlib.util
import os

# TensorFlow 2.15 turns its oneDNN kernels on by default only on some Intel CPUs; on others a 3D
# U-Net training step is many times slower without them (the README's performance section). It
# must be set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS=0 in the
# environment still turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# TensorFlow 2.16+ makes tf.keras Keras 3 unless this is set before tf.keras is first touched;
# with tf-keras installed it stays Keras 2, whose models, layers, legacy optimisers, loss
# scaling and checkpoints tf_medseg uses (the modern profile). Only where tf-keras is installed:
# TensorFlow 2.15 (the paper profile) honours it too, and without tf-keras tf.keras would fail.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"
