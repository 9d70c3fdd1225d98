"""Benchmark of the model zoo: parameter count and training-step time per precision policy.

For each model and policy it builds the model with its default options, then times a compiled
forward + backward pass (soft Dice loss of equation 1, gradients of all trainable weights; no
optimizer update) on one random batch, after a warm-up run that traces it. It prints a table and
writes JSON::

    python -m tf_medseg.bench.models --size=64 --batch=2 --json=runs/bench/models.json
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from tf_medseg.bench import cpu_name, write_json
from tf_medseg.losses import soft_dice_loss
from tf_medseg.models import MODELS, build_model

FLAGS = flags.FLAGS
flags.DEFINE_list("models", sorted(MODELS), "Models to benchmark.")
flags.DEFINE_list("policies", ["float32", "mixed_bfloat16"], "Keras precision policies.")
flags.DEFINE_integer("size", 64, "Cubic patch size.")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_integer("num_classes", 2, "Output classes, background included.")
flags.DEFINE_integer("in_channels", 1, "Input channels.")
flags.DEFINE_integer("repeats", 5, "Timed steps after the warm-up; the median is reported.")
flags.DEFINE_string("json", "runs/bench/models.json", "Where to write the results.")


def time_training_step(
    model: tf.keras.Model, images: tf.Tensor, labels: tf.Tensor, repeats: int
) -> dict:
    """Times ``repeats`` forward + backward passes of ``model`` after one tracing warm-up.

    Args:
        model: The model to time.
        images: Input batch ``(N, D, H, W, C)``.
        labels: One-hot labels ``(N, D, H, W, K)``.
        repeats: Number of timed steps.

    Returns:
        ``{"warmup_s", "median_s", "min_s", "loss"}``.
    """

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = soft_dice_loss(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        # Reduce the gradients so the backward pass cannot be pruned from the graph.
        return loss, tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gradients])

    start = time.perf_counter()
    loss, _ = step(images, labels)
    loss.numpy()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss, gradient_sum = step(images, labels)
        gradient_sum.numpy()
        times.append(time.perf_counter() - start)
    return {
        "warmup_s": warmup,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "loss": float(loss),
    }


def benchmark(
    names: list[str],
    policies: list[str],
    size: int,
    batch: int,
    num_classes: int,
    in_channels: int,
    repeats: int,
) -> list[dict]:
    """Runs ``time_training_step`` for every model and policy; restores the global policy.

    Returns:
        One result dict per (model, policy) with the parameter count and timings.
    """
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch, size, size, size, in_channels)), tf.float32)
    labels = tf.one_hot(rng.integers(0, num_classes, (batch, size, size, size)), num_classes)
    previous = tf.keras.mixed_precision.global_policy()
    results = []
    try:
        for name in names:
            for policy in policies:
                tf.keras.backend.clear_session()
                tf.keras.mixed_precision.set_global_policy(policy)
                model = build_model(name, num_classes, in_channels)
                timing = time_training_step(model, images, labels, repeats)
                results.append(
                    {"model": name, "policy": policy, "params": model.count_params(), **timing}
                )
                print(f"{name:10s} {policy:15s} {results[-1]['median_s']:8.3f} s", flush=True)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    return results


def format_table(results: list[dict]) -> str:
    """Formats the results as a fixed-width text table."""
    lines = [f"{'model':10s} {'policy':15s} {'params':>12s} {'step s':>9s} {'min s':>9s}"]
    for row in results:
        lines.append(
            f"{row['model']:10s} {row['policy']:15s} {row['params']:12,d} "
            f"{row['median_s']:9.3f} {row['min_s']:9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    results = benchmark(
        FLAGS.models,
        FLAGS.policies,
        FLAGS.size,
        FLAGS.batch,
        FLAGS.num_classes,
        FLAGS.in_channels,
        FLAGS.repeats,
    )
    print(format_table(results))
    report = {
        "batch": FLAGS.batch,
        "size": FLAGS.size,
        "num_classes": FLAGS.num_classes,
        "in_channels": FLAGS.in_channels,
        "repeats": FLAGS.repeats,
        "tensorflow": tf.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    if FLAGS.json:
        write_json(FLAGS.json, report)


if __name__ == "__main__":
    app.run(main)
