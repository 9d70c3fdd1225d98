"""The transform base class and the chain of them.

A transform maps an item dict to an item dict, and gives the same output for the same input:
every transform here is deterministic, so a :class:`Compose` of them (the preprocessing chain of
:func:`tf_medseg.transforms.preprocessing.build_preprocessing`) is what the caches run once per
item and keep. The random tail (patch crop, flips, intensity shift) is not made of transforms:
it runs per sample as TensorFlow ops (:mod:`tf_medseg.transforms.random`, in
:class:`tf_medseg.pipeline.TrainStream`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any


class Transform:
    """A deterministic transform on item dicts.

    Subclasses implement :meth:`__call__` and list the settings that change their output in
    :meth:`config`, which feeds the on-disk cache's key.
    """

    def __call__(self, data: dict) -> dict:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that determine this transform's output (JSON-serialisable)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """A chain of transforms applied in order.

    Args:
        transforms: Transforms, applied in order.
    """

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, data: dict) -> dict:
        for transform in self.transforms:
            data = transform(data)
        return data

    def config(self) -> dict[str, Any]:
        return {
            "transforms": [
                {"name": type(t).__name__, **(t.config() if isinstance(t, Transform) else {})}
                for t in self.transforms
            ]
        }

    def config_fingerprint(self) -> str:
        """A stable hash of the chain's transforms and their settings (for on-disk caching)."""
        text = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"
