"""Transform base classes and the composition that finds the cacheable deterministic prefix.

A transform maps an item dict to an item dict. Randomness is declared on the class: a
:class:`RandomTransform` draws from a seed, a plain :class:`Transform` gives the same output for
the same input. :meth:`Compose.deterministic_prefix` is the longest run of deterministic
transforms from the start of the chain; anything that is not a :class:`Transform`, or a nested
:class:`Compose` with a random member, ends it (erring on the side of not caching). The smart
cache keeps the prefix's output in memory; the random tail runs per sample.
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

    is_random = False

    def __call__(self, data: dict) -> dict:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that determine this transform's output (JSON-serialisable)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class RandomTransform(Transform):
    """A transform whose output depends on a random draw; it ends the cacheable prefix."""

    is_random = True


class Compose(Transform):
    """A chain of transforms applied in order.

    Args:
        transforms: Transforms (or any callables on dicts; a callable that is not a
            :class:`Transform` is treated as random, since nothing says it is not).
    """

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    @property
    def is_random(self) -> bool:  # type: ignore[override]
        return any(_is_random(t) for t in self.transforms)

    def __call__(self, data: dict) -> dict:
        for transform in self.transforms:
            data = transform(data)
        return data

    def deterministic_prefix(self) -> Compose:
        """The longest run of deterministic transforms from the start, as a new Compose."""
        prefix = []
        for transform in self.transforms:
            if _is_random(transform):
                break
            prefix.append(transform)
        return Compose(prefix)

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


def _is_random(transform: Any) -> bool:
    if not isinstance(transform, Transform):
        return True
    return bool(transform.is_random)
