"""Optimisers, learning-rate schedules and loss scaling.

NovoGrad (Ginsburg et al. 2019) is the paper's optimiser, taken from tensorflow-addons; Adam at
1e-4 is the paper's baseline. Optimisers and schedules are plain dicts of constructors. Under the
``mixed_float16`` policy the optimiser is wrapped in Keras' dynamic ``LossScaleOptimizer``; under
``mixed_bfloat16`` and ``float32`` no loss scaling is needed (bfloat16 has float32's exponent).

All optimisers are Keras' legacy (TF 2.10-style) classes, because tensorflow-addons' NovoGrad is
one: a single kind keeps checkpoints, loss scaling and Horovod handling uniform across them.
"""

from __future__ import annotations

import math

import tensorflow as tf
import tensorflow_addons as tfa

OPTIMIZERS = {
    "novograd": lambda lr, weight_decay: tfa.optimizers.NovoGrad(
        learning_rate=lr, beta_1=0.9, beta_2=0.98, weight_decay=weight_decay
    ),
    "adam": lambda lr, weight_decay: tf.keras.optimizers.legacy.Adam(learning_rate=lr),
    "sgd": lambda lr, weight_decay: tf.keras.optimizers.legacy.SGD(
        learning_rate=lr, momentum=0.9, nesterov=True
    ),
}

SCHEDULES = ("constant", "cosine")


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then constant or cosine decay.

    Args:
        base_lr: Peak learning rate.
        total_steps: Steps of the whole run (cosine reaches ``min_ratio * base_lr`` there).
        warmup_steps: Linear warm-up steps (0: none).
        decay: ``constant`` or ``cosine``.
        min_ratio: Floor of the cosine decay, as a fraction of ``base_lr``.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, decay="constant", min_ratio=0.0):
        if decay not in SCHEDULES:
            raise ValueError(f"unknown schedule {decay!r}; choose from {SCHEDULES}")
        self.base_lr = float(base_lr)
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.decay = decay
        self.min_ratio = float(min_ratio)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_lr, tf.float32)
        if self.decay == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
            lr = lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        if self.warmup_steps > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "min_ratio": self.min_ratio,
        }


def build_optimizer(
    name: str,
    learning_rate: float,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    mixed_float16: bool = False,
) -> tf.keras.optimizers.Optimizer:
    """The optimiser of a run.

    Args:
        name: A key of :data:`OPTIMIZERS`.
        learning_rate: Peak learning rate.
        total_steps: Steps of the run (for the cosine schedule).
        schedule: ``constant`` or ``cosine``.
        warmup_steps: Linear warm-up steps.
        weight_decay: NovoGrad's decoupled weight decay (ignored by the others).
        mixed_float16: Wrap in a dynamic ``LossScaleOptimizer`` (for the float16 policy).

    Returns:
        The optimiser.

    Raises:
        ValueError: Unknown name or schedule.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    lr = WarmupSchedule(learning_rate, total_steps, warmup_steps, schedule)
    optimizer = OPTIMIZERS[name](lr, weight_decay)
    if mixed_float16:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: tf.keras.optimizers.Optimizer) -> float:
    """The learning rate the optimiser applies at its current step."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(inner.iterations))
    return float(tf.keras.backend.get_value(lr))
