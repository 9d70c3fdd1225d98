"""Cached items: one computed in a cache worker thread, its size, and how many fit a budget.

A cached item is the deterministic prefix's output, a dict whose arrays are kept C-contiguous
and 64-byte aligned: TensorFlow hands a NumPy buffer to a tensor without copying it only when
the buffer is aligned to Eigen's maximum alignment (64 bytes covers every build).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_medseg.cache.schedule import replace_count

Item = Mapping[str, Any]
CachedItem = dict[str, Any]
Prefix = Callable[[Item], CachedItem]
#: A collective over the workers: this worker's cache size in, the agreed one (the minimum) out.
Agree = Callable[[int], int]

_ALIGN_BYTES = 64


class CachePrefixError(RuntimeError):
    """The deterministic prefix failed on an item in a cache worker thread."""


class CacheBudgetError(ValueError):
    """The requested cache does not fit in the memory budget."""


def item_nbytes(item: Mapping[str, Any]) -> int:
    """Bytes held by the arrays of a cached item.

    Args:
        item: A cached item (prefix output).

    Returns:
        The sum of ``nbytes`` over the item's NumPy array values.
    """
    return int(sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray)))


def item_path(item: Item) -> str:
    """The file that names an item in error messages (its image path, else its case)."""
    image = item.get("image")
    if isinstance(image, str):
        return image
    if isinstance(image, list | tuple) and image and isinstance(image[0], str):
        return ", ".join(image)
    return str(item.get("case", "<item without image path>"))


def aligned(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` C-contiguous and 64-byte aligned, copying only when it is not."""
    if array.flags.c_contiguous and array.ctypes.data % _ALIGN_BYTES == 0:
        return array
    buffer = np.empty(array.nbytes + _ALIGN_BYTES, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % _ALIGN_BYTES
    out = buffer[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def prepare(prefix: Prefix, item: Item) -> CachedItem:
    """The prefix's output for one item, its arrays aligned (what a cache worker thread runs).

    Args:
        prefix: The deterministic prefix.
        item: An item dict.

    Returns:
        The cached item.

    Raises:
        CachePrefixError: If the prefix fails; the message names the item's file.
    """
    try:
        out = prefix(item)
    except Exception as exc:
        raise CachePrefixError(
            f"the deterministic prefix failed on {item_path(item)}: {type(exc).__name__}: {exc}"
        ) from exc
    return {k: aligned(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}


def budget_cache_num(
    wanted: int,
    *,
    explicit: bool,
    item_bytes: int,
    budget_bytes: int,
    replace_rate: float,
    shard_size: int,
    largest_path: str,
    agree: Agree | None = None,
    whole: bool = False,
) -> int:
    """The number of cached items a memory budget holds, with their replacements in flight.

    With ``agree`` the size is the same on every worker (each worker's items differ in size; a
    worker whose budget fails makes all fail, instead of leaving the others waiting for it).

    Args:
        wanted: The cache size asked for; the result is at most this.
        explicit: Whether ``wanted`` was given explicitly: then a smaller fit is an error.
        item_bytes: The size of one cached item (the largest measured).
        budget_bytes: The memory budget.
        replace_rate: Fraction of the cache replaced per epoch.
        shard_size: Items of this rank's part (see :func:`~tf_medseg.cache.replace_count`).
        largest_path: The file of the largest measured item, for the error message.
        agree: The workers' collective (see :class:`~tf_medseg.cache.SmartCache`).
        whole: The cache must hold every item of the part (``--cache=full``): fewer is an
            error that names the smart cache as the way on.

    Raises:
        CacheBudgetError: When the budget holds no item, or fewer than an explicit ``wanted``
            (or, with ``whole``, fewer than every item).
    """
    fits = budget_bytes // item_bytes

    def need(n: int) -> int:
        return n + replace_count(n, replace_rate, shard_size)

    best = max((n for n in range(1, wanted + 1) if need(n) <= fits), default=0)
    mine = -1 if (explicit or whole) and best < wanted else best
    agreed = agree(mine) if agree is not None else mine
    mb = 2**20
    if agreed < 0 and whole:
        raise CacheBudgetError(
            f"--cache=full holds every one of the {wanted} items of "
            f"{'this worker' if agree is None else 'each worker'}, up to {item_bytes / mb:.1f} MB "
            f"each: {wanted * item_bytes / mb:.1f} MB, above the memory budget of "
            f"{budget_bytes / mb:.1f} MB" + (" (on another worker)" if mine >= 0 else "") + ": "
            f"use --cache=smart (it holds {max(best, 1)} and replaces them within the budget) or "
            "raise --memory_budget_gb"
        )
    if agreed < 0:
        raise CacheBudgetError(
            f"a smart cache of {wanted} items (+{need(wanted) - wanted} replacements in "
            f"flight) of up to {item_bytes / mb:.1f} MB each needs "
            f"{need(wanted) * item_bytes / mb:.1f} MB, above the memory budget of "
            f"{budget_bytes / mb:.1f} MB"
            + (" (on another worker)" if mine >= 0 else "")
            + ": lower cache_num or raise memory_budget_bytes"
        )
    if agreed == 0:
        raise CacheBudgetError(
            f"the memory budget of {budget_bytes / mb:.1f} MB cannot hold one cached item of "
            f"about {item_bytes / mb:.1f} MB ({largest_path})"
            + (" on another worker" if mine > 0 else "")
        )
    return agreed


def lower_thread_priority(nice: int) -> None:
    """Raises the calling thread's nice value by ``nice`` (Linux: nice is per thread).

    Replacement threads run at a lower priority than the training and input threads, so that
    preparing replacements takes the CPU time training leaves idle instead of slowing training
    (what is not ready at an epoch boundary is swapped in later). Elsewhere a no-op.
    """
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + nice)
    except OSError as exc:  # e.g. a seccomp profile that forbids it: keep the default priority
        logging.warning("could not lower the replacement thread's priority: %s", exc)


def check_cache_arguments(items, cache_num, cache_rate, replace_rate, rank, world_size) -> None:
    if not items:
        raise ValueError("SmartCache needs at least one item")
    if not 0.0 <= replace_rate <= 1.0:
        raise ValueError(f"replace_rate must be in [0, 1], got {replace_rate}")
    if not 0.0 < cache_rate <= 1.0:
        raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
    if cache_num is not None and cache_num < 1:
        raise ValueError(f"cache_num must be at least 1, got {cache_num}")


def warn_fixed_subset(cache_num: int, part_size: int, world_size: int) -> None:
    """A budget (or cache_num) below the part with no replacement: says that training sees
    only a fixed subset, instead of leaving the user to find it out from the Dice."""
    logging.warning(
        "the cache holds %d of the %d items of %s and replace_rate=0 replaces none: "
        "training sees only those %d; raise replace_rate to cycle the others through",
        cache_num,
        part_size,
        "this worker" if world_size > 1 else "the training set",
        cache_num,
    )
