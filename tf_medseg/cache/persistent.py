"""On-disk cache of deterministic-prefix outputs, so a second run skips preprocessing.

``PersistentPrefixCache(cache_dir, prefix)`` wraps a prefix: it is itself a prefix
(``item -> cached item``) that loads the output from ``cache_dir`` when present and otherwise
computes it and writes it. The file's key hashes the item (its fields, and for every field that
names a file, the file's absolute path, size and modification time) with the prefix's
``config_fingerprint()``, so changing a transform setting or an input file invalidates it.

Files are ``np.savez`` archives loaded with ``allow_pickle=False``: arrays are stored as arrays,
everything else (the case name, the geometry record) as JSON in a ``__meta__`` entry, with
arrays, NumPy scalars and tuples inside it tagged so that they round-trip. Writes are atomic
(a temporary file in the same folder, fsync, then ``os.replace``), are skipped with a warning
when the disk lacks space, and a corrupt file is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_META_KEY = "__meta__"
# Room for the zip directory and the JSON record on top of the arrays' bytes.
_WRITE_MARGIN_BYTES = 1 << 20


def _describe(value: Any) -> Any:
    """What of an item field goes into the key: a file's identity, or the value itself."""
    if isinstance(value, str) and os.path.isfile(value):
        stat = os.stat(value)
        return {"file": os.path.abspath(value), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def item_key(item: Mapping[str, Any], fingerprint: str) -> str:
    """The cache key of an item under a prefix configuration.

    Args:
        item: Item dict (``{"case", "image", "label"}``).
        fingerprint: The prefix's ``config_fingerprint()``.

    Returns:
        A sha256 hex digest.
    """
    record = {"prefix": fingerprint, "item": _describe(dict(item)), "format": _FORMAT_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _encode(value: Any) -> Any:
    """JSON-ready form of a geometry-like value, tagging what JSON would lose."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": value.shape}
    if isinstance(value, np.generic):
        return {"__npscalar__": value.item(), "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"only string keys can be stored, got {list(value)}")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    raise TypeError(f"cannot store a value of type {type(value).__name__} in the disk cache")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        if "__npscalar__" in value:
            return np.dtype(value["dtype"]).type(value["__npscalar__"])
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


class PersistentPrefixCache:
    """A prefix that keeps its outputs on disk.

    Args:
        cache_dir: Folder for the cache files (created if missing).
        prefix: The deterministic prefix; must have ``config_fingerprint() -> str``.
        reserve_bytes: Free space to leave on the disk; a write that would go below it is
            skipped with a warning.

    Raises:
        TypeError: If ``prefix`` has no ``config_fingerprint``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        prefix: Callable[[Mapping[str, Any]], dict[str, Any]],
        reserve_bytes: int = 256 << 20,
    ):
        fingerprint = getattr(prefix, "config_fingerprint", None)
        if fingerprint is None:
            raise TypeError(
                "the on-disk cache needs a prefix with config_fingerprint() (a Compose), so "
                "that changed settings invalidate it"
            )
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.fingerprint = str(fingerprint())
        self.reserve_bytes = int(reserve_bytes)
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0, "skipped_writes": 0}

    def config_fingerprint(self) -> str:
        """The wrapped prefix's fingerprint."""
        return self.fingerprint

    def path(self, item: Mapping[str, Any]) -> Path:
        """The cache file of an item (whether or not it exists)."""
        case = re.sub(r"[^A-Za-z0-9_.-]", "_", str(item.get("case", "item")))[:64]
        return self.cache_dir / f"{case}-{item_key(item, self.fingerprint)[:32]}.npz"

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """Loads the item's prefix output from disk, or computes and stores it.

        Args:
            item: Item dict.

        Returns:
            The prefix output.
        """
        path = self.path(item)
        if path.exists():
            try:
                out = self._load(path, item_key(item, self.fingerprint))
                self._count("hits")
                return out
            except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
                self._count("corrupt")
                logger.warning("disk cache file %s is unreadable (%s); recomputing", path, exc)
        self._count("misses")
        out = self.prefix(item)
        self._write(path, item_key(item, self.fingerprint), out)
        return out

    def _load(self, path: Path, key: str) -> dict[str, Any]:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive[_META_KEY][()]))
            if meta.get("version") != _FORMAT_VERSION or meta.get("key") != key:
                raise ValueError("the file belongs to another key or format")
            arrays = {name: archive[f"arr_{i}"] for i, name in enumerate(meta["arrays"])}
        values = _decode(meta["values"])
        return {name: arrays[name] if name in arrays else values[name] for name in meta["order"]}

    def _write(self, path: Path, key: str, out: Mapping[str, Any]) -> None:
        arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
        try:
            if any(a.dtype.hasobject for a in arrays.values()):
                raise TypeError("object arrays would need pickle")
            values = {k: _encode(v) for k, v in out.items() if k not in arrays}
        except TypeError as exc:
            logger.warning("not writing %s to the disk cache: %s", path.name, exc)
            self._count("skipped_writes")
            return
        meta = {
            "version": _FORMAT_VERSION,
            "key": key,
            "order": list(out),
            "arrays": list(arrays),
            "values": values,
        }
        needed = sum(a.nbytes for a in arrays.values()) + _WRITE_MARGIN_BYTES
        free = shutil.disk_usage(self.cache_dir).free
        if free - needed < self.reserve_bytes:
            logger.warning(
                "not writing %s to the disk cache: %.1f MB free, %.1f MB needed plus a "
                "reserve of %.1f MB",
                path.name,
                free / 2**20,
                needed / 2**20,
                self.reserve_bytes / 2**20,
            )
            self._count("skipped_writes")
            return
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                # Positional arrays (stored as arr_0, arr_1, ...) so no field name can clash
                # with np.savez's own arguments; their names are in the JSON record.
                np.savez(f, *arrays.values(), **{_META_KEY: np.array(json.dumps(meta))})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write %s to the disk cache: %s", path.name, exc)
            self._count("skipped_writes")
            return
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._count("writes")
