"""Loading transform: reads an item's NIfTI files and checks them against the task."""

from __future__ import annotations

import numpy as np

from tf_medseg.data.io import check_image, check_label, read_nifti
from tf_medseg.transforms.base import Transform


class LoadImage(Transform):
    """Reads ``image`` (and ``label`` when present) from their paths.

    The output item has ``image`` (X, Y, Z, C) as float32, or in its stored integer type when
    float32 holds that exactly (int16 CT: half the bytes, no conversion pass; the spatial and
    intensity transforms compute in float32 with the same results), ``label`` as uint8
    (X, Y, Z), ``image_path``, and a ``geometry`` record of the file's shape and affine that
    later spatial transforms extend, so that predictions can be put back into the file's
    geometry. Arrays keep the memory order they were read in (x fastest, as the file stores
    them and as SimpleITK resamples them); the transforms that copy them write C order.

    Args:
        num_channels: The task's number of modalities.
        num_classes: The task's number of classes, background included.

    Raises:
        DataError: (when called) Any of the checks of :mod:`tf_medseg.data.io` fails.
    """

    def __init__(self, num_channels: int, num_classes: int):
        self.num_channels = num_channels
        self.num_classes = num_classes

    def config(self) -> dict:
        return {"num_channels": self.num_channels, "num_classes": self.num_classes}

    def __call__(self, data: dict) -> dict:
        image_vol = read_nifti(data["image"])
        out = {
            "case": data["case"],
            "image_path": data["image"],
            "image": check_image(image_vol, self.num_channels, keep_integer=True),
            "geometry": {
                "source_shape": list(image_vol.data.shape[:3]),
                "source_affine": np.asarray(image_vol.affine).tolist(),
                "affine": np.asarray(image_vol.affine).tolist(),
                "steps": [],
            },
        }
        if "label" in data:
            out["label_path"] = data["label"]
            out["label"] = check_label(read_nifti(data["label"]), image_vol, self.num_classes)
        return out
