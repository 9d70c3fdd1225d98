"""Sliding-window inference over whole volumes, and largest-connected-component post-processing.

Validation during training and ``tf-medseg-predict`` both run a model trained on patches over
whole volumes. :func:`sliding_window_inference` follows the semantics of MONAI's
``sliding_window_inference`` (MONAI 1.x), on channels-last arrays:

* the volume is padded with ``cval`` only along axes where it is smaller than the window, the
  padding split ``diff // 2`` before and the rest after, and the output is cropped back;
* windows start every ``int(roi * (1 - overlap))`` voxels per axis (at least 1; one window when
  the window equals the padded volume), the last window flush with the far border;
* each window prediction is weighted by an importance map (constant, or a separable Gaussian
  with ``sigma = 0.125 * roi`` per axis, clamped from below at 1e-3) and the output is
  ``sum(w * pred) / sum(w)``.

The paper's section 5 validates with 224^3 windows overlapping by 32 voxels, so ``overlap`` is
also accepted as an integer number of voxels. :func:`keep_largest_component` is the paper's
appendix A post-processing ("keeping the largest connected component") for organ classes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import tensorflow as tf
from tqdm import tqdm

BLEND_MODES = ("constant", "gaussian")

# MONAI clamps the importance map from below so that no voxel gets a vanishing total weight.
_MIN_IMPORTANCE = 1e-3


def compute_importance_map(
    roi_size: Sequence[int], mode: str = "constant", sigma_scale: float | Sequence[float] = 0.125
) -> np.ndarray:
    """Returns the weight given to each voxel of a window when windows are blended.

    As MONAI's ``compute_importance_map``: ``"constant"`` is all ones; ``"gaussian"`` is the
    outer product of 1-D Gaussians ``exp(-x^2 / (2 sigma^2))`` sampled at
    ``x = -(n - 1) / 2, ..., (n - 1) / 2`` with ``sigma = sigma_scale * n`` per axis (so the
    peak is 1 for odd sizes and slightly below 1 for even sizes; there is no renormalisation),
    then clamped from below at ``max(min(map), 1e-3)``.

    Args:
        roi_size: Window size per spatial axis.
        mode: ``"constant"`` or ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the window size, one value or one per axis.

    Returns:
        A float32 array of shape ``roi_size``.

    Raises:
        ValueError: For an unknown mode or a non-positive window size or sigma scale.
    """
    roi = tuple(int(r) for r in roi_size)
    if any(r < 1 for r in roi):
        raise ValueError(f"window size must be positive, got {roi}")
    if mode == "constant":
        return np.ones(roi, dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"unknown blend mode {mode!r}; expected one of {BLEND_MODES}")
    scales = _per_axis(sigma_scale, len(roi), "sigma_scale")
    if any(s <= 0 for s in scales):
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    weights = np.ones((), dtype=np.float64)
    for n, scale in zip(roi, scales, strict=True):
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        profile = np.exp(-(x**2) / (2.0 * (scale * n) ** 2))
        weights = np.multiply.outer(weights, profile)
    weights = weights.astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), _MIN_IMPORTANCE))


def overlap_from_flag(value: float) -> float | int:
    """A flag's window overlap as :func:`sliding_window_inference` takes it: a number >= 1 is
    whole voxels (an int; the paper's 32), anything smaller a fraction."""
    value = float(value)
    return int(value) if value >= 1 else value


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | int | Sequence = 0.25
) -> list[tuple[int, ...]]:
    """Returns the corner of every window that tiles an image, as MONAI's ``dense_patch_slices``.

    Args:
        image_size: Spatial size of the (already padded) image; each axis >= the window.
        roi_size: Window size per spatial axis.
        overlap: A fraction in [0, 1), or an int number of voxels (>= 1), or one per axis.

    Returns:
        Window start coordinates, the first axis varying slowest.

    Raises:
        ValueError: When the window is larger than the image or the overlap is invalid.
    """
    image = tuple(int(s) for s in image_size)
    roi = tuple(int(r) for r in roi_size)
    if len(image) != len(roi):
        raise ValueError(f"image size {image} and window size {roi} differ in rank")
    if any(r > s for r, s in zip(roi, image, strict=True)):
        raise ValueError(f"window {roi} is larger than the image {image}; pad first")
    intervals = _scan_intervals(image, roi, _per_axis(overlap, len(roi), "overlap"))
    per_axis = []
    for size, window, interval in zip(image, roi, intervals, strict=True):
        count = next(
            (d + 1 for d in range(math.ceil(size / interval)) if d * interval + window >= size), 1
        )
        per_axis.append([min(d * interval, size - window) for d in range(count)])
    grid = np.stack([g.ravel() for g in np.meshgrid(*per_axis, indexing="ij")], axis=1)
    return [tuple(int(v) for v in corner) for corner in grid]


def _pad_to_window(image: np.ndarray, roi: list[int], cval: float):
    """``image`` padded (centred, with ``cval``) to at least ``roi`` along each spatial axis;
    its padded spatial size and the padding before each axis."""
    spatial = list(image.shape[1:4])
    padded_size = [max(s, r) for s, r in zip(spatial, roi, strict=True)]
    pad_low = [(p - s) // 2 for p, s in zip(padded_size, spatial, strict=True)]
    if padded_size != spatial:
        pad_width = [(0, 0)]
        pad_width += [
            (lo, p - s - lo) for lo, p, s in zip(pad_low, padded_size, spatial, strict=True)
        ]
        image = np.pad(image, pad_width + [(0, 0)], mode="constant", constant_values=cval)
    return image, padded_size, pad_low


def _windows_and_weights(padded_size, roi, overlap, mode, sigma_scale):
    """The windows' slices, the blending weights (with a channel axis) and their sum over the
    volume."""
    weights = compute_importance_map(roi, mode, sigma_scale)
    starts = window_starts(padded_size, roi, overlap)
    windows = [tuple(slice(s, s + r) for s, r in zip(c, roi, strict=True)) for c in starts]
    weight_sum = np.zeros(padded_size, dtype=np.float32)
    for window in windows:
        weight_sum[window] += weights
    return windows, weights[..., np.newaxis], weight_sum


def sliding_window_inference(
    volume: tf.Tensor | np.ndarray,
    predictor: Callable[[tf.Tensor], Any],
    roi_size: int | Sequence[int | None],
    overlap: float | int | Sequence = 0.25,
    mode: str = "constant",
    sw_batch_size: int = 1,
    cval: float = 0.0,
    sigma_scale: float | Sequence[float] = 0.125,
    progress: bool = False,
) -> tf.Tensor | np.ndarray:
    """Predicts a whole volume by blending predictions of overlapping windows.

    Windows of all batch items are fed to ``predictor`` ``sw_batch_size`` at a time; the last
    window batch is padded with zeros to ``sw_batch_size`` (and the padding's outputs dropped)
    so that a ``tf.function`` predictor sees one input shape and traces once. Predictions are
    accumulated into the output as they come, so memory holds the volume, the output and one
    window batch, never all windows. Accumulation is float32 on the host; the result does not
    depend on ``sw_batch_size``.

    Args:
        volume: Images shaped (batch, D, H, W, C), channels-last.
        predictor: Any callable from a (n, *roi_size, C) tensor to a (n, *roi_size, K) tensor
            or array (a Keras model, a ``tf.function``), e.g. softmax probabilities.
        roi_size: Window size, one int or one per spatial axis; ``None`` or a value <= 0 takes
            the volume's size along that axis (as MONAI).
        overlap: Overlap of neighbouring windows: a fraction in [0, 1), or an int number of
            voxels >= 1 (the paper: 224^3 windows overlapping by 32 voxels), or one per axis.
        mode: Blending, ``"constant"`` (plain average) or ``"gaussian"``.
        sw_batch_size: Number of windows per predictor call.
        cval: Value used to pad axes where the volume is smaller than the window.
        sigma_scale: Gaussian sigma as a fraction of the window size (``"gaussian"`` only).
        progress: Show a progress bar over window batches.

    Returns:
        float32 predictions shaped (batch, D, H, W, K): a ``tf.Tensor`` when ``volume`` is a
        tensor, otherwise a NumPy array.

    Raises:
        ValueError: For a volume that is not 5-D, invalid window/overlap/batch settings, or a
            predictor output with the wrong shape.
    """
    as_tensor = tf.is_tensor(volume)
    image = volume.numpy() if as_tensor else np.asarray(volume)
    if image.ndim != 5:
        raise ValueError(f"volume must be (batch, D, H, W, C), got shape {image.shape}")
    if int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    sw_batch_size = int(sw_batch_size)
    batch, *spatial, _ = image.shape
    roi = _resolve_roi(roi_size, spatial)
    image, padded_size, pad_low = _pad_to_window(image, roi, cval)
    windows, weights, weight_sum = _windows_and_weights(
        padded_size, roi, overlap, mode, sigma_scale
    )
    output = None
    total = batch * len(windows)
    firsts = range(0, total, sw_batch_size)
    for first in tqdm(firsts, desc="sliding window", disable=not progress, leave=False):
        jobs = [divmod(i, len(windows)) for i in range(first, min(first + sw_batch_size, total))]
        window_batch = np.zeros((sw_batch_size, *roi, image.shape[-1]), dtype=image.dtype)
        for j, (item, w) in enumerate(jobs):
            window_batch[j] = image[(item, *windows[w])]
        prediction = _to_float32(predictor(tf.convert_to_tensor(window_batch)))
        if prediction.ndim != 5 or tuple(prediction.shape[:4]) != (sw_batch_size, *roi):
            raise ValueError(
                f"predictor returned shape {prediction.shape} for windows of shape "
                f"{window_batch.shape}; expected ({sw_batch_size}, {', '.join(map(str, roi))}, K)"
            )
        if output is None:
            output = np.zeros((batch, *padded_size, prediction.shape[-1]), dtype=np.float32)
        for j, (item, w) in enumerate(jobs):
            output[(item, *windows[w])] += prediction[j] * weights

    output /= weight_sum[np.newaxis, ..., np.newaxis]
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_low, spatial, strict=True))
    output = output[(slice(None), *crop)]
    return tf.convert_to_tensor(output) if as_tensor else np.ascontiguousarray(output)


def flip_combinations(ndim: int = 3) -> list[tuple[int, ...]]:
    """The ``2**ndim`` subsets of the spatial axes ``1..ndim`` of a channels-last batch, the
    empty one first: the mirrorings of test-time augmentation (nnU-Net's)."""
    axes = range(1, ndim + 1)
    return [c for n in range(ndim + 1) for c in itertools.combinations(axes, n)]


def mean_predictor(
    predictors: Sequence[Callable[[tf.Tensor], Any]], tta: bool = False
) -> Callable[[tf.Tensor], np.ndarray]:
    """A window predictor giving the mean of several predictors' probabilities (an ensemble),
    each over the 8 mirrorings of the window batch with ``tta``.

    Each mirrored batch goes through a predictor whole (``sw_batch_size`` windows per call) and
    its output is mirrored back before it is added, so the result is aligned with the input.
    The mean is taken in float32 before any argmax.

    Args:
        predictors: Window predictors of one input and output shape (e.g. from
            :func:`tf_medseg.inference.window.make_window_predictor`).
        tta: Average over the flips of the three spatial axes too.

    Returns:
        A predictor for :func:`sliding_window_inference`.

    Raises:
        ValueError: Without a predictor.
    """
    if not predictors:
        raise ValueError("mean_predictor needs at least one predictor")
    combos = flip_combinations() if tta else [()]
    if len(predictors) == 1 and not tta:
        return lambda windows: _to_float32(predictors[0](windows))

    def predict(windows: tf.Tensor) -> np.ndarray:
        total = None
        for predictor in predictors:
            for axes in combos:
                mirrored = tf.reverse(windows, axis=list(axes)) if axes else windows
                out = _to_float32(predictor(mirrored))
                out = np.flip(out, axis=axes) if axes else out
                total = out.copy() if total is None else total + out
        return total / np.float32(len(predictors) * len(combos))

    return predict


def keep_largest_component(
    labels: np.ndarray, classes: Sequence[int] | None = None, fully_connected: bool = True
) -> np.ndarray:
    """Keeps, for each given class, only its largest connected component.

    Voxels of a class outside its largest component become background (0). Components are
    found with SimpleITK's ``ConnectedComponent`` and ordered by ``RelabelComponent``.

    Args:
        labels: Integer label volume (2-D or 3-D), 0 = background.
        classes: Classes to clean (organs, typically, not lesions); ``None`` means every
            foreground class present.
        fully_connected: Face, edge and corner neighbours connect (26-connectivity in 3-D);
            ``False`` uses face neighbours only (6-connectivity).

    Returns:
        A new array of the same shape and dtype.

    Raises:
        TypeError: When ``labels`` is not an integer array.
        ValueError: For an unsupported rank or a background class in ``classes``.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2-D or 3-D, got shape {labels.shape}")
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c > 0]
    elif any(int(c) <= 0 for c in classes):
        raise ValueError(f"classes must be foreground labels (> 0), got {list(classes)}")
    finder = sitk.ConnectedComponentImageFilter()
    finder.SetFullyConnected(bool(fully_connected))
    result = labels.copy()
    for value in classes:
        mask = labels == value
        if not mask.any():
            continue
        components = finder.Execute(sitk.GetImageFromArray(mask.astype(np.uint8)))
        ranked = sitk.RelabelComponent(components, 0, True)
        result[mask & (sitk.GetArrayViewFromImage(ranked) != 1)] = 0
    return result


def _per_axis(value: Any, ndim: int, name: str) -> list:
    """Repeats a scalar setting per spatial axis, or checks a per-axis sequence's length."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != ndim:
            raise ValueError(f"{name} needs {ndim} values, got {value}")
        return list(value)
    return [value] * ndim


def _resolve_roi(roi_size: int | Sequence[int | None], spatial: Sequence[int]) -> list[int]:
    """Window size per axis, ``None`` or <= 0 falling back to the volume's size (MONAI)."""
    values = _per_axis(roi_size, len(spatial), "roi_size")
    pairs = zip(values, spatial, strict=True)
    return [int(s) if r is None or int(r) <= 0 else int(r) for r, s in pairs]


def _scan_intervals(image: Sequence[int], roi: Sequence[int], overlaps: Sequence) -> list[int]:
    """Step between window starts per axis; overlap as a fraction or as whole voxels."""
    intervals = []
    for size, window, value in zip(image, roi, overlaps, strict=True):
        if isinstance(value, bool | np.bool_):
            raise ValueError(f"overlap must be a number, got {value!r}")
        if isinstance(value, int | np.integer) and value != 0:
            if value < 0:
                raise ValueError(f"overlap in voxels must be >= 1, got {value}")
            if window < size and value >= window:
                raise ValueError(
                    f"overlap of {value} voxels is not smaller than the window {window}"
                )
            interval = window - int(value)
        else:
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(
                    f"overlap must be a fraction in [0, 1) or an int number of voxels, got {value}"
                )
            interval = int(window * (1.0 - float(value)))
        intervals.append(window if window == size else max(interval, 1))
    return intervals


def _to_float32(prediction: Any) -> np.ndarray:
    """Host float32 copy of a predictor's output (mixed precision models may return float16)."""
    if tf.is_tensor(prediction):
        prediction = prediction.numpy()
    return np.asarray(prediction, dtype=np.float32)


def make_window_predictor(
    model: tf.keras.Model, roi_size: Sequence[int], channels: int, batch: int
):
    """A ``tf.function`` running the model on a fixed-shape batch of windows (traced once)."""
    spec = tf.TensorSpec([batch, *roi_size, channels], tf.float32)

    @tf.function(input_signature=[spec])
    def predict(windows):
        return tf.cast(model(windows, training=False), tf.float32)

    return predict


def predict_labels(
    predictor, image, roi_size: Sequence[int], overlap: float, mode: str, sw_batch_size: int
) -> np.ndarray:
    """The argmax labels (uint8) of one preprocessed volume ``(*spatial, C)`` by sliding
    window."""
    probs = sliding_window_inference(
        np.asarray(image, np.float32)[None],
        predictor,
        roi_size,
        overlap=overlap,
        mode=mode,
        sw_batch_size=sw_batch_size,
    )
    return np.argmax(np.asarray(probs)[0], axis=-1).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    """How the sliding window runs over a preprocessed volume.

    Attributes:
        roi_size: Window size per axis (divisible by the model's downsampling factor).
        overlap: A fraction in [0, 1), or an int number of voxels.
        mode: ``constant`` or ``gaussian`` blending.
        sw_batch_size: Windows per forward pass.
        keep_largest: Keep the largest connected component of the classes below.
        largest_classes: The classes ``keep_largest`` applies to (None: every foreground
            class), as chosen by validation (``postprocessing.json``).
    """

    roi_size: tuple[int, int, int]
    overlap: float | int
    mode: str
    sw_batch_size: int
    keep_largest: bool
    largest_classes: tuple[int, ...] | None = None


def window_settings(config, **overrides) -> WindowSettings:
    """The training run's validation window settings, with the given overrides (None: keep).

    ``config`` is the run's configuration: a ``TrainConfig``, or what :func:`_read_run` reads
    of its ``config.json`` (``val_roi_size``, ``val_overlap``, ``val_mode``,
    ``val_sw_batch_size``, ``val_keep_largest`` and ``depth``).

    Raises:
        ValueError: A window size that is not 3 positive multiples of ``2**config.depth``.
    """
    values = {
        "roi_size": config.val_roi_size,
        "overlap": config.val_overlap,
        "mode": config.val_mode,
        "sw_batch_size": config.val_sw_batch_size,
        "keep_largest": config.val_keep_largest,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    roi = [int(r) for r in values["roi_size"]]
    roi = roi * 3 if len(roi) == 1 else roi
    step = 2**config.depth
    if len(roi) != 3 or any(r <= 0 or r % step for r in roi):
        raise ValueError(
            f"window size {roi} must be 3 positive multiples of {step} (2^depth of the model)"
        )
    values["overlap"] = overlap_from_flag(values["overlap"])
    values["roi_size"] = tuple(roi)
    values["sw_batch_size"] = int(values["sw_batch_size"])
    values["keep_largest"] = bool(values["keep_largest"])
    return WindowSettings(**values)
