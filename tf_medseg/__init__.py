"""tf_medseg: train 3D medical image segmentation models an order of magnitude faster.

The package reproduces "Training Models 20X Faster in Medical Image Analysis" (MIDL 2020) on
TensorFlow 2.15 / Keras 2: smart cache with gradual replacement, adaptive positive/negative
patch sampling, NovoGrad, mixed precision and Horovod multi-worker training.
"""

__version__ = "0.1.0"
