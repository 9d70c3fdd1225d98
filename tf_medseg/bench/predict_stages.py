"""Benchmark of ``tf-medseg-predict`` on Decathlon-size volumes: seconds per volume by stage,
and the window stage against the model's bare forward pass over the same windows.

Each volume is a synthetic spleen CT at the Decathlon's geometry (``tf-medseg-synth
--geometry=msd``: 512 x 512 in-plane, 0.6-1 mm, 31-168 slices of 1.5-8 mm). It goes through
:class:`~tf_medseg.inference.segmenter.Segmenter`, the code of ``tf-medseg-predict``, which
times each stage (load, reorient, resample and crop, normalise, windows with the argmax,
components, back to the file's grid). The bare forward pass is the same fixed-shape
``tf.function`` predictor run over as many window batches as the volume has, on inputs prepared
beforehand: what the window stage would cost if cutting, blending and the argmax were free.

The model is a training workdir's (``--model``), or, without one, an untrained U-Net of the
given sizes (the forward pass does not depend on the weights; its labels are noise, so the
components stage is then not what a trained model's would be, and is left out)::

    python -m tf_medseg.bench.predict_stages --cases=3 --json=runs/bench/predict_stages.json
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declares the benchmark's flags (at run time, so importing the module declares none)."""
    flags.DEFINE_string("model", None, "A training workdir (default: an untrained U-Net).")
    flags.DEFINE_integer("cases", 3, "Decathlon-size synthetic spleen volumes to segment.")
    flags.DEFINE_integer("seed", 0, "The synthetic volumes' seed.")
    flags.DEFINE_float("spacing", 2.0, "Untrained model: the grid (mm) the volume is resampled to.")
    flags.DEFINE_integer("roi", 32, "Untrained model: the window size.")
    flags.DEFINE_float("overlap", 0.25, "Untrained model: the windows' overlap.")
    flags.DEFINE_integer("sw_batch_size", 8, "Untrained model: windows per forward pass.")
    flags.DEFINE_integer("depth", 3, "Untrained model: U-Net depth.")
    flags.DEFINE_integer("base_filters", 8, "Untrained model: U-Net filters.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats of the bare forward pass per volume.")
    flags.DEFINE_string("data_dir", None, "Keep the generated volumes here (default: a temp dir).")
    flags.DEFINE_string("json", None, "Write the results as JSON here.")


def untrained_segmenter(task, spacing: float):
    """A Segmenter with an untrained U-Net and the training chain of ``task`` at ``spacing``."""
    from tf_medseg.inference.segmenter import Segmenter
    from tf_medseg.inference.window import WindowSettings
    from tf_medseg.models import build_model
    from tf_medseg.transforms.preprocessing import PreprocessingConfig, build_preprocessing

    chain = build_preprocessing(
        task, task.training, PreprocessingConfig(spacing=(spacing,) * 3), progress=False
    )
    model = build_model(
        "unet3d",
        task.num_classes,
        task.num_channels,
        depth=FLAGS.depth,
        base_filters=FLAGS.base_filters,
        norm="batch",
    )
    roi = (FLAGS.roi,) * 3
    settings = WindowSettings(roi, FLAGS.overlap, "constant", FLAGS.sw_batch_size, False)
    return Segmenter(model, chain, settings, task.modalities)


def bare_forward_s(segmenter, shape: tuple[int, ...]) -> tuple[float, int, int]:
    """The median seconds of the predictor over the windows of a volume of ``shape`` (spatial),
    on inputs made beforehand; and the numbers of windows and of batches."""
    from tf_medseg.inference.window import window_starts

    s = segmenter.settings
    padded = [max(n, r) for n, r in zip(shape, s.roi_size, strict=True)]  # as the window pads
    windows = len(window_starts(padded, s.roi_size, s.overlap))
    batches = math.ceil(windows / s.sw_batch_size)
    batch = np.random.default_rng(0).random(
        (s.sw_batch_size, *s.roi_size, segmenter.num_channels), np.float32
    )
    segmenter.predictor(batch)  # traced and warm
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(batches):
            np.asarray(segmenter.predictor(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times), windows, batches


def grid_shape(segmenter, path: str) -> tuple[int, ...]:
    """The spatial shape of ``path`` after the chain (the grid the windows slide over)."""
    item = {"case": os.path.basename(path), "image": path}
    for transform in segmenter.preprocessing.transforms:
        item = transform(item)
    return tuple(item["image"].shape[:3])


def main(argv: list[str]) -> int:
    del argv
    from tf_medseg.bench import provenance, write_json
    from tf_medseg.data.msd import load_task
    from tf_medseg.data.synthetic import generate_task
    from tf_medseg.inference.segmenter import Segmenter, describe_times

    root = FLAGS.data_dir or tempfile.mkdtemp(prefix="tf_medseg_predict_bench_")
    data = os.path.join(root, "spleen_msd")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        print(f"generating {FLAGS.cases} Decathlon-size spleen volumes in {data} ...")
        generate_task(
            "spleen", data, num_train=2, num_test=FLAGS.cases, seed=FLAGS.seed, geometry="msd"
        )
    task = load_task(data)
    if FLAGS.model:
        segmenter = Segmenter.load(FLAGS.model)
    else:
        segmenter = untrained_segmenter(task, FLAGS.spacing)
    files = sorted(item["image"] for item in task.test)[: FLAGS.cases]
    segmenter.segment(files[0])  # traces the predictor (not timed)
    rows = []
    for path in files:
        source_shape = tuple(nib.load(path).shape[:3])
        segmenter.segment(path)
        stages = dict(segmenter.last_times)
        shape = grid_shape(segmenter, path)
        forward, windows, batches = bare_forward_s(segmenter, shape)
        rows.append(
            {
                "case": os.path.basename(path),
                "source_shape": source_shape,
                "grid_shape": shape,
                "windows": windows,
                "batches": batches,
                "stages_s": {k: round(v, 3) for k, v in stages.items()},
                "total_s": round(sum(stages.values()), 3),
                "bare_forward_s": round(forward, 3),
                "windows_over_forward": round(stages["windows"] / forward, 3),
            }
        )
        print(
            f"{rows[-1]['case']} {source_shape} -> grid {shape}, {windows} windows: "
            f"{describe_times(stages)}; bare forward {forward:.2f} s, windows stage "
            f"{stages['windows'] / forward:.2f}x"
        )
    s = segmenter.settings
    result = {
        **provenance(),
        "model": FLAGS.model
        or f"untrained unet3d depth {FLAGS.depth}, {FLAGS.base_filters} " "filters",
        "window": {
            "roi": list(s.roi_size),
            "overlap": s.overlap,
            "sw_batch_size": s.sw_batch_size,
            "keep_largest": s.keep_largest,
        },
        "volumes": rows,
        "median_total_s": statistics.median(r["total_s"] for r in rows),
        "median_windows_over_forward": statistics.median(r["windows_over_forward"] for r in rows),
    }
    print(
        f"median per volume {result['median_total_s']:.1f} s; window stage "
        f"{result['median_windows_over_forward']:.2f}x the bare forward pass"
    )
    if FLAGS.json:
        write_json(FLAGS.json, result)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
