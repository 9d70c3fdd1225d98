"""Transforms on item dicts: the deterministic preprocessing chain and its base classes.

The random tail (patch crop, flips, intensity shift) runs as TF ops in :mod:`tf_medseg.pipeline`.
"""

from tf_medseg.transforms.base import Compose, Transform
from tf_medseg.transforms.preprocessing import PreprocessingConfig, build_preprocessing

__all__ = ["Compose", "PreprocessingConfig", "Transform", "build_preprocessing"]
