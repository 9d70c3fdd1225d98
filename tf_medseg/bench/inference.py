"""Benchmark of sliding-window inference over one whole synthetic spleen volume.

The volume is a synthetic spleen phantom generated at ``--size`` voxels in-plane and brought to
exactly ``size x size x round(0.6 * size)`` voxels (160 x 160 x 96 by default: cropped, or
padded with air, around its centre), on its raw voxel grid: no resampling and no cropping to
the body, so the time is that of the window count of this shape. Intensities are clipped to a
CT window and scaled to [0, 1]. The model is the default ``unet3d`` (untrained weights; the
time does not depend on them), run through the fixed-shape ``tf.function`` predictor that
validation and ``tf-medseg-predict`` use.

For each blending mode it reports the wall time of :func:`sliding_window_inference` on the
volume (median of ``--repeats`` runs after a warm-up that traces the predictor), the number of
windows, and the time of the model alone on one window batch, so that
``total - batches * model time`` is the cost of cutting and blending windows on the host::

    python -m tf_medseg.bench.inference --size=160 --roi=64 --overlap=0.25 \\
        --json=runs/bench/inference.json
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from tf_medseg.bench import cpu_name, write_json
from tf_medseg.data.synthetic import make_phantom
from tf_medseg.inference.window import (
    BLEND_MODES,
    make_window_predictor,
    overlap_from_flag,
    sliding_window_inference,
    window_starts,
)
from tf_medseg.models import build_model

FLAGS = flags.FLAGS

#: CT window (HU) mapped to [0, 1]: soft tissue of the phantom.
HU_WINDOW = (-160.0, 240.0)


def define_flags() -> None:
    """Declares the benchmark's flags (at run time, so importing the module declares none)."""
    flags.DEFINE_integer("size", 160, "In-plane size of the volume; its depth is 0.6 * size.")
    flags.DEFINE_integer("roi", 64, "Cubic window size (a multiple of 2^4 for the unet3d).")
    flags.DEFINE_float("overlap", 0.25, "Window overlap: a fraction < 1, or voxels >= 1.")
    flags.DEFINE_list("modes", list(BLEND_MODES), "Blending modes to time.")
    flags.DEFINE_integer("sw_batch_size", 1, "Windows per forward pass.")
    flags.DEFINE_integer("repeats", 3, "Timed runs per mode after the warm-up; median reported.")
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic volume.")
    flags.DEFINE_string("json", "runs/bench/inference.json", "Where to write the results.")


def benchmark_volume(size: int, seed: int = 0) -> np.ndarray:
    """The benchmark's input: a synthetic spleen CT of exactly (size, size, 0.6 * size) voxels.

    Args:
        size: In-plane voxels.
        seed: The phantom's seed.

    Returns:
        float32 array (1, size, size, round(0.6 * size), 1) scaled to [0, 1].
    """
    image = make_phantom("spleen", 0, size, seed).image.astype(np.float32)
    target = (size, size, max(8, round(0.6 * size)))
    for axis, n in enumerate(target):
        have = image.shape[axis]
        if have > n:
            start = (have - n) // 2
            image = np.take(image, np.arange(start, start + n), axis=axis)
        elif have < n:
            pad = [(0, 0)] * 3
            pad[axis] = ((n - have) // 2, n - have - (n - have) // 2)
            image = np.pad(image, pad, constant_values=-1000.0)
    lo, hi = HU_WINDOW
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return scaled[None, ..., None].astype(np.float32)


def time_sliding_window(
    volume: np.ndarray,
    predictor,
    roi: int,
    overlap: float | int,
    mode: str,
    sw_batch_size: int,
    repeats: int,
) -> dict:
    """Times ``sliding_window_inference`` on ``volume`` (after one untimed run).

    Returns:
        ``{"mode", "warmup_s", "median_s", "min_s", "runs_s"}``.
    """

    def run():
        sliding_window_inference(
            volume, predictor, roi, overlap=overlap, mode=mode, sw_batch_size=sw_batch_size
        )

    start = time.perf_counter()
    run()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "warmup_s": warmup,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "runs_s": times,
    }


def time_model_batch(predictor, roi: int, sw_batch_size: int, repeats: int) -> float:
    """Median time (s) of the predictor alone on one batch of windows (traced beforehand)."""
    windows = tf.random.uniform((sw_batch_size, roi, roi, roi, 1), seed=0)
    predictor(windows).numpy()
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        predictor(windows).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(
    size: int,
    roi: int,
    overlap: float | int,
    modes: list[str],
    sw_batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Builds the volume and the default unet3d, then times every mode.

    Returns:
        The report: settings, volume shape, window count, model time per batch, and one result
        per mode (with ``overhead_s``, the time beyond the model's).
    """
    unknown = sorted(set(modes) - set(BLEND_MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {BLEND_MODES}")
    volume = benchmark_volume(size, seed)
    spatial = volume.shape[1:4]
    padded = [max(s, roi) for s in spatial]
    num_windows = len(window_starts(padded, [roi] * 3, overlap))
    batches = -(-num_windows // sw_batch_size)
    model = build_model("unet3d", 2, 1)
    predictor = make_window_predictor(model, [roi] * 3, 1, sw_batch_size)
    model_s = time_model_batch(predictor, roi, sw_batch_size, repeats)
    results = []
    for mode in modes:
        result = time_sliding_window(volume, predictor, roi, overlap, mode, sw_batch_size, repeats)
        result["overhead_s"] = result["median_s"] - batches * model_s
        results.append(result)
        print(f"{mode:9s} {result['median_s']:8.2f} s", flush=True)
    return {
        "volume_shape": list(spatial),
        "resampled": False,
        "roi": roi,
        "overlap": overlap,
        "sw_batch_size": sw_batch_size,
        "num_windows": num_windows,
        "model": "unet3d",
        "model_params": model.count_params(),
        "model_batch_s": model_s,
        "repeats": repeats,
        "tensorflow": tf.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }


def format_table(report: dict) -> str:
    """The results as a fixed-width text table."""
    shape = "x".join(str(s) for s in report["volume_shape"])
    lines = [
        f"volume {shape} (raw grid), {report['num_windows']} windows of {report['roi']}^3, "
        f"overlap {report['overlap']}, sw_batch_size {report['sw_batch_size']}, "
        f"model {report['model_batch_s']:.3f} s per batch",
        f"{'mode':9s} {'total s':>9s} {'min s':>9s} {'s/window':>9s} {'overhead s':>11s}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['mode']:9s} {row['median_s']:9.2f} {row['min_s']:9.2f} "
            f"{row['median_s'] / report['num_windows']:9.3f} {row['overhead_s']:11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    report = run_benchmark(
        FLAGS.size,
        FLAGS.roi,
        overlap_from_flag(FLAGS.overlap),
        FLAGS.modes,
        FLAGS.sw_batch_size,
        FLAGS.repeats,
        FLAGS.seed,
    )
    print(format_table(report))
    if FLAGS.json:
        write_json(FLAGS.json, report)


if __name__ == "__main__":
    define_flags()
    app.run(main)
