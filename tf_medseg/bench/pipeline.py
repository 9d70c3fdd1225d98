"""Benchmark of the input pipeline: patches per second without a cache, with a full cache and
with the smart cache, the cache fill time, peak memory, and the smart cache's input stall.

On a synthetic spleen task (generated unless ``--data_dir`` is given; by default 12 volumes of
about 160 x 160 x 96 voxels at 0.8 x 0.8 x 2.5-5 mm, resampled to 1 mm by the prefix; with
``--geometry=msd`` volumes of the real task's size, 512 x 512 x 31-168 voxels) it runs
the training pipeline with 96^3 patches, 4 patches per volume and batches of 2:

* ``none``: the prefix (load, reorient, resample, crop, normalise, indices) on every item every
  epoch, with ``--num_workers`` threads: the baseline;
* ``full``: every item cached, no replacement;
* ``smart``: half of the items cached, half of those replaced each epoch.

Throughput is measured flat out (the consumer only takes the batches), after a warm-up epoch
that traces the graph; epochs are iterated as the training loop does, with
:class:`~tf_medseg.pipeline.TrainStream`, and include the epoch boundaries (the smart cache's
swaps). The stall fraction
is measured with a training-like consumer that spends ``--step_s`` per batch: time spent
waiting for the next batch (and at the epoch boundary) over the total time. It prints a table
and writes JSON::

    python -m tf_medseg.bench.pipeline --json=runs/bench/pipeline.json [--data_dir=DIR]

    {"none": {"patches_per_s": ...}, "full": {"patches_per_s": ..., "fill_s": ...},
     "smart": {"patches_per_s": ..., "fill_s": ..., "stall_fraction": ...},
     "peak_rss_bytes": ...}

(each mode also records its patch count, seconds and cache counters; ``config`` the settings).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import tensorflow as tf
from absl import app, flags

from tf_medseg.bench import write_json
from tf_medseg.cache.sources import SourceOptions, make_source
from tf_medseg.data.msd import load_task
from tf_medseg.data.synthetic import generate_task
from tf_medseg.pipeline import TailOptions, TrainStream
from tf_medseg.planning.system import peak_rss_bytes


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run (the flags of :func:`define_flags`)."""

    data_dir: str | None = None
    work_dir: str | None = None
    num_volumes: int = 12
    geometry: str = "size"
    size: int = 160
    patch: int = 96
    num_samples: int = 4
    batch_size: int = 2
    num_workers: int = 2
    none_epochs: int = 2
    cached_epochs: int = 10
    stall_epochs: int = 3
    step_s: float = 1.0
    smart_cache_rate: float = 0.5
    replace_rate: float = 0.5
    seed: int = 0


def _task_items(config: BenchConfig, scratch: str) -> tuple[list[dict], Callable]:
    """The training items and the task's deterministic prefix (statistics computed here)."""
    from tf_medseg.transforms import build_preprocessing

    root = config.data_dir
    if root is None:
        name = "synthetic_spleen" + ("_msd" if config.geometry == "msd" else "")
        root = os.path.join(config.work_dir or scratch, name)
        if not os.path.isfile(os.path.join(root, "dataset.json")):
            generate_task(
                "spleen",
                root,
                config.num_volumes,
                0,
                config.size,
                config.seed,
                progress=True,
                geometry=config.geometry,
            )
    task = load_task(root)
    items = sorted(task.training, key=lambda item: item["case"])[: config.num_volumes]
    prefix = build_preprocessing(task, items, progress=True)
    return items, prefix


def _stream(source, config: BenchConfig, channels: int) -> TrainStream:
    tail = TailOptions(config.batch_size, (config.patch,) * 3, config.num_samples, seed=config.seed)
    return TrainStream(source, tail, tf.Variable(0.5, trainable=False), num_channels=channels)


def _throughput(stream: TrainStream, epochs: int) -> dict:
    """Patches per second, consuming as fast as the pipeline produces."""
    for _ in stream.epoch():  # the first epoch traces the graph and fills the pipeline
        pass
    stream.end_epoch()
    patches = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for images, _ in stream.epoch():
            patches += int(images.shape[0])
        stream.end_epoch()
    seconds = time.perf_counter() - start
    return {"patches_per_s": patches / seconds, "patches": patches, "seconds": seconds}


def _stall(stream: TrainStream, epochs: int, step_s: float) -> dict:
    """Fraction of a training-like consumer's time spent waiting for input."""
    waited = 0.0
    batches = 0
    start = time.perf_counter()
    for _ in range(epochs):
        asked = time.perf_counter()
        for _ in stream.epoch():
            waited += time.perf_counter() - asked
            batches += 1
            time.sleep(step_s)  # the training step (an accelerator leaves the CPU free)
            asked = time.perf_counter()
        # The epoch boundary: the smart cache swaps in its replacements.
        stream.end_epoch()
        waited += time.perf_counter() - asked
    total = time.perf_counter() - start
    return {"stall_fraction": waited / total, "stall_s": waited, "stall_batches": batches}


def run_benchmark(config: BenchConfig) -> dict:
    """Runs the three modes and returns the results dict (the JSON written by ``main``)."""
    with tempfile.TemporaryDirectory(prefix="tf_medseg_bench_") as scratch:
        items, prefix = _task_items(config, scratch)
        channels = 1
        results: dict = {}

        loading = SourceOptions(num_workers=config.num_workers, seed=config.seed)
        with make_source("none", items, prefix, loading) as source:
            channels = int(source.peek()["image"].shape[-1])
            with _stream(source, config, channels) as stream:
                results["none"] = _throughput(stream, config.none_epochs)

        with make_source("full", items, prefix, loading) as source:
            start = time.perf_counter()
            source.fill()
            fill_s = time.perf_counter() - start
            with _stream(source, config, channels) as stream:
                run = _throughput(stream, config.cached_epochs)
            results["full"] = {
                **run,
                "fill_s": fill_s,
                "cache_bytes": source.stats()["cache_bytes"],
            }

        smart = SourceOptions(
            cache_num=max(1, round(len(items) * config.smart_cache_rate)),
            replace_rate=config.replace_rate,
            num_workers=config.num_workers,
            seed=config.seed,
        )
        with make_source("smart", items, prefix, smart) as source:
            start = time.perf_counter()
            source.fill()
            fill_s = time.perf_counter() - start
            # As many smart epochs as patches of the full-cache run.
            epochs = max(1, round(config.cached_epochs * len(items) / source.cache_num))
            with _stream(source, config, channels) as stream:
                run = _throughput(stream, epochs)
                stall = _stall(stream, config.stall_epochs, config.step_s)
            stats = source.stats()
            results["smart"] = {
                **run,
                "fill_s": fill_s,
                **stall,
                "cache_num": stats["cache_num"],
                "replace_num": stats["replace_num"],
                "swaps": stats["swaps"],
                "late_swaps": stats["late_swaps"],
                "boundary_wait_s_max": stats["wait_s_max"],
            }
    results["peak_rss_bytes"] = peak_rss_bytes()
    results["config"] = {**dataclasses.asdict(config), "num_volumes": len(items)}
    return results


def format_table(results: dict) -> str:
    """The results as a text table."""
    base = results["none"]["patches_per_s"]
    lines = [
        f"{'mode':<6} {'patches/s':>10} {'x none':>7} {'fill s':>7} {'stall':>7}",
    ]
    for mode in ("none", "full", "smart"):
        row = results[mode]
        fill = f"{row['fill_s']:7.1f}" if "fill_s" in row else f"{'-':>7}"
        stall = f"{row['stall_fraction']:7.2%}" if "stall_fraction" in row else f"{'-':>7}"
        speedup = row["patches_per_s"] / base
        lines.append(f"{mode:<6} {row['patches_per_s']:10.1f} {speedup:7.1f} {fill} {stall}")
    lines.append(f"peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so importing this module
    defines none and cannot clash with other benchmarks' flags)."""
    flags.DEFINE_string("json", None, "Where to write the results.", required=True)
    flags.DEFINE_string(
        "data_dir", None, "MSD-layout task folder (default: generate a spleen task)."
    )
    flags.DEFINE_string(
        "work_dir", None, "Where to generate the task (default: a temporary folder)."
    )
    flags.DEFINE_integer("num_volumes", 12, "Training volumes used.", lower_bound=2)
    flags.DEFINE_enum(
        "geometry",
        "size",
        ["size", "msd"],
        "Generated volumes: size (--size in-plane) or msd (the real spleen task's shapes and "
        "spacings, 512 x 512 x 31-168).",
    )
    flags.DEFINE_integer("size", 160, "In-plane size of the generated volumes.", lower_bound=8)
    flags.DEFINE_integer("patch", 96, "Cubic patch size.", lower_bound=1)
    flags.DEFINE_integer("num_samples", 4, "Patches per volume per epoch.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 2, "Patches per batch.", lower_bound=1)
    flags.DEFINE_integer("num_workers", 2, "Threads of the prefix (fill, or every epoch for none).")
    flags.DEFINE_integer("none_epochs", 2, "Timed epochs without a cache.", lower_bound=1)
    flags.DEFINE_integer("cached_epochs", 10, "Timed epochs of the full cache.", lower_bound=1)
    flags.DEFINE_integer("stall_epochs", 3, "Smart-cache epochs of the stall measurement.")
    flags.DEFINE_float("step_s", 1.0, "Seconds the training-like consumer spends per batch.")
    flags.DEFINE_float("smart_cache_rate", 0.5, "Fraction of the volumes the smart cache holds.")
    flags.DEFINE_float("replace_rate", 0.5, "Smart cache replace rate.")
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic task and the pipeline.")


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    config = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    results = run_benchmark(config)
    print(format_table(results))
    write_json(args.json, results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
