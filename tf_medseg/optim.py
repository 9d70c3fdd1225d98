"""Optimisers, learning-rate schedules and loss scaling.

NovoGrad (Ginsburg et al. 2019) is the paper's optimiser. The paper took it from
tensorflow-addons, which reached its end of life in May 2024; :class:`NovoGrad` here is the same
algorithm with the same hyper-parameters, slots and update, tested equal to
``tfa.optimizers.NovoGrad`` (tests/test_optim.py, in the paper profile, where tensorflow-addons is
kept as the reference). Adam at 1e-4 is the paper's baseline. Optimisers and schedules are plain
dicts of constructors. Under the ``mixed_float16`` policy the optimiser is wrapped in Keras'
dynamic ``LossScaleOptimizer``; under ``mixed_bfloat16`` and ``float32`` no loss scaling is needed
(bfloat16 has float32's exponent).

All optimisers are Keras 2's legacy (TF 2.10-style) classes, in both profiles (TensorFlow 2.15's
``tf.keras`` and ``tf-keras`` under ``TF_USE_LEGACY_KERAS=1``): a single kind keeps checkpoints,
loss scaling and gradient all-reduce uniform across them.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_medseg.choices import SCHEDULES


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class NovoGrad(tf.keras.optimizers.legacy.Optimizer):
    """NovoGrad: SGD with momentum on gradients normalised by a per-layer second moment.

    For each variable ``w`` (a "layer" in the paper's sense) with gradient ``g`` at step ``t``::

        v_t = ||g||^2                                   (t = 0)
        v_t = beta_2 * v_{t-1} + (1 - beta_2) * ||g||^2  (t > 0)
        d   = g / (sqrt(v_t) + epsilon) + weight_decay * w
        d   = (1 - beta_1) * d                          (grad_averaging and t > 0)
        m_t = beta_1 * m_{t-1} + d
        w   = w - lr * m_t

    ``v`` is one scalar per variable; the weight decay is decoupled from ``v`` (added after the
    normalisation). With ``amsgrad`` the running maximum of ``v`` normalises instead. These are
    tensorflow-addons 0.23's semantics, slot names (``m``, ``v``, ``vhat``; ``m`` is stored as
    ``-lr * m_t`` as Keras' momentum kernel keeps it) and defaults, so a checkpoint written with
    ``tfa.optimizers.NovoGrad`` restores into this class.

    Args:
        learning_rate: A float or a ``LearningRateSchedule``.
        beta_1: Momentum of the first moment.
        beta_2: Decay of the per-layer second moment.
        epsilon: Added to ``sqrt(v)``.
        weight_decay: Decoupled weight decay (>= 0).
        grad_averaging: Scale the normalised gradient by ``1 - beta_1`` (Adam-style averaging).
        amsgrad: Normalise by the running maximum of ``v``.
        name: The optimiser's name.
        **kwargs: Keras' ``clipnorm``, ``clipvalue``, ``global_clipnorm``.

    Raises:
        ValueError: A negative weight decay.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float = 0.0,
        grad_averaging: bool = False,
        amsgrad: bool = False,
        name: str = "NovoGrad",
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self._set_hyper("weight_decay", weight_decay)
        self._set_hyper("grad_averaging", bool(grad_averaging))  # a checkpointed bool, as tfa's
        self.amsgrad = bool(amsgrad)
        self.epsilon = epsilon or tf.keras.backend.epsilon()

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m", initializer="zeros")
        for var in var_list:
            self.add_slot(var, "v", initializer=tf.zeros(shape=[], dtype=var.dtype))
        if self.amsgrad:
            for var in var_list:
                self.add_slot(var, "vhat")

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        beta_1 = tf.identity(self._get_hyper("beta_1", var_dtype))
        beta_2 = tf.identity(self._get_hyper("beta_2", var_dtype))
        apply_state[(var_device, var_dtype)].update(
            epsilon=tf.convert_to_tensor(self.epsilon, var_dtype),
            beta_1_t=beta_1,
            beta_2_t=beta_2,
            one_minus_beta_1_t=1 - beta_1,
            one_minus_beta_2_t=1 - beta_2,
            weight_decay=tf.identity(self._get_hyper("weight_decay", var_dtype)),
        )

    def _normalised(self, grad, var, weights, coefficients):
        """The step direction ``d`` of the class docstring, updating ``v`` (and ``vhat``)."""
        first = tf.equal(self.iterations, 0)
        v = self.get_slot(var, "v")
        g_2 = tf.reduce_sum(tf.square(grad))
        v_t = tf.where(
            first, g_2, v * coefficients["beta_2_t"] + g_2 * coefficients["one_minus_beta_2_t"]
        )
        v_t = v.assign(v_t, use_locking=self._use_locking)
        if self.amsgrad:
            vhat = self.get_slot(var, "vhat")
            v_t = vhat.assign(tf.maximum(vhat, v_t), use_locking=self._use_locking)
        grad = grad / (tf.sqrt(v_t) + coefficients["epsilon"])
        grad = grad + coefficients["weight_decay"] * weights
        averaging = tf.logical_and(self._get_hyper("grad_averaging"), tf.logical_not(first))
        return tf.where(averaging, grad * coefficients["one_minus_beta_1_t"], grad)

    def _coefficients(self, var, apply_state):
        var_device, var_dtype = var.device, var.dtype.base_dtype
        return (apply_state or {}).get((var_device, var_dtype)) or self._fallback_apply_state(
            var_device, var_dtype
        )

    def _resource_apply_dense(self, grad, var, apply_state=None):
        coefficients = self._coefficients(var, apply_state)
        grad = self._normalised(grad, var, var, coefficients)
        return tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle,
            accum=self.get_slot(var, "m").handle,
            lr=coefficients["lr_t"],
            grad=grad,
            momentum=coefficients["beta_1_t"],
            use_locking=self._use_locking,
            use_nesterov=False,
        )

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        coefficients = self._coefficients(var, apply_state)
        grad = self._normalised(grad, var, tf.gather(var, indices), coefficients)
        return tf.raw_ops.ResourceSparseApplyKerasMomentum(
            var=var.handle,
            accum=self.get_slot(var, "m").handle,
            lr=coefficients["lr_t"],
            grad=grad,
            indices=indices,
            momentum=coefficients["beta_1_t"],
            use_locking=self._use_locking,
            use_nesterov=False,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            learning_rate=self._serialize_hyperparameter("learning_rate"),
            beta_1=self._serialize_hyperparameter("beta_1"),
            beta_2=self._serialize_hyperparameter("beta_2"),
            epsilon=self.epsilon,
            weight_decay=self._serialize_hyperparameter("weight_decay"),
            grad_averaging=self._serialize_hyperparameter("grad_averaging"),
            amsgrad=self.amsgrad,
        )
        return config


OPTIMIZERS = {
    "novograd": lambda lr, weight_decay: NovoGrad(
        learning_rate=lr, beta_1=0.9, beta_2=0.98, weight_decay=weight_decay
    ),
    "adam": lambda lr, weight_decay: tf.keras.optimizers.legacy.Adam(learning_rate=lr),
    "sgd": lambda lr, weight_decay: tf.keras.optimizers.legacy.SGD(
        learning_rate=lr, momentum=0.9, nesterov=True
    ),
}


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then constant, cosine or plateau.

    Two values are set from the host while training (:meth:`set_scale`,
    :meth:`set_time_fraction`) and read by the graph: ``scale``, the multiple of the schedule
    that plateau decays lower (:mod:`tf_medseg.training.plateau`; 1 otherwise), and
    ``time_fraction``, the part of a wall-time budget already spent, with which the cosine
    anneals over the budget when that ends the run before ``total_steps``. They are
    ``tf.Variable`` s outside the checkpoint: the trainer checkpoints the scale with its
    counters and recomputes the time fraction on resume.

    Args:
        base_lr: Peak learning rate.
        total_steps: Steps of the whole run (cosine reaches ``min_ratio * base_lr`` there).
        warmup_steps: Linear warm-up steps (0: none).
        decay: One of :data:`SCHEDULES`.
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
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")
        self.time_fraction = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="lr_time")

    def set_scale(self, scale: float) -> None:
        self.scale.assign(float(scale))

    def set_time_fraction(self, fraction: float) -> None:
        self.time_fraction.assign(float(fraction))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_lr, tf.float32) * self.scale
        if self.decay == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            progress = tf.maximum((step - self.warmup_steps) / span, self.time_fraction)
            progress = tf.clip_by_value(progress, 0.0, 1.0)
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


def learning_rate_schedule(optimizer: tf.keras.optimizers.Optimizer) -> WarmupSchedule | None:
    """The optimiser's :class:`WarmupSchedule` (through a loss-scale wrapper), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = getattr(inner, "_learning_rate", None)
    if not isinstance(lr, WarmupSchedule):
        lr = getattr(inner, "learning_rate", None)
    return lr if isinstance(lr, WarmupSchedule) else None


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
        schedule: One of :data:`SCHEDULES`.
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
