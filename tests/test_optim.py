"""tf_medseg's NovoGrad against tensorflow-addons' (paper profile) and a NumPy reference (both)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.losses import soft_dice_loss
from tf_medseg.optim import NovoGrad, WarmupSchedule, build_optimizer

STEPS = 60
CASES = {
    "paper": dict(beta_1=0.9, beta_2=0.98),
    "weight_decay": dict(beta_1=0.9, beta_2=0.98, weight_decay=1e-3),
    "grad_averaging": dict(beta_1=0.95, beta_2=0.999, grad_averaging=True, weight_decay=1e-4),
    "amsgrad": dict(beta_1=0.9, beta_2=0.98, amsgrad=True),
}


def small_problem(seed: int = 0):
    """A tiny 3D segmentation net and a fixed batch: convolutions, a bias and batch norm."""
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((8, 8, 8, 1))
    x = tf.keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.Conv3D(2, 1)(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Softmax()(x))
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    labels = (images[..., 0] > 0.3).astype(np.int32)
    return model, tf.constant(images), tf.one_hot(labels, 2)


def train(optimizer, seed: int = 0, steps: int = STEPS):
    model, images, labels = small_problem(seed)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = soft_dice_loss(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=False))
        return loss

    losses = [float(step()) for _ in range(steps)]
    return model, losses


@pytest.mark.parametrize("case", sorted(CASES))
def test_novograd_equals_tensorflow_addons(case):
    tfa = pytest.importorskip(
        "tensorflow_addons", reason="tensorflow-addons is the reference in the paper profile only"
    )
    kwargs = CASES[case]
    ours, our_losses = train(NovoGrad(learning_rate=5e-3, **kwargs))
    ref, ref_losses = train(tfa.optimizers.NovoGrad(learning_rate=5e-3, **kwargs))
    assert our_losses[-1] < our_losses[0] - 0.05, "the problem must actually train"
    np.testing.assert_allclose(our_losses, ref_losses, atol=1e-5)
    for a, b in zip(ours.weights, ref.weights, strict=False):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.name)


def test_novograd_with_a_schedule_equals_tensorflow_addons():
    tfa = pytest.importorskip(
        "tensorflow_addons", reason="tensorflow-addons is the reference in the paper profile only"
    )
    schedule = WarmupSchedule(1e-2, total_steps=STEPS, warmup_steps=10, decay="cosine")
    ours, _ = train(NovoGrad(learning_rate=schedule, beta_2=0.98))
    ref, _ = train(tfa.optimizers.NovoGrad(learning_rate=schedule, beta_2=0.98))
    for a, b in zip(ours.weights, ref.weights, strict=False):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.name)


def test_a_tensorflow_addons_checkpoint_restores_into_novograd(tmp_path):
    tfa = pytest.importorskip(
        "tensorflow_addons", reason="tensorflow-addons is the reference in the paper profile only"
    )
    ref_opt = tfa.optimizers.NovoGrad(learning_rate=5e-3, beta_2=0.98)
    ref, _ = train(ref_opt, steps=10)
    path = tf.train.Checkpoint(model=ref, optimizer=ref_opt).save(str(tmp_path / "ckpt"))
    model, _, _ = small_problem(seed=1)  # other initial weights: the restore must overwrite them
    ours = NovoGrad(learning_rate=5e-3, beta_2=0.98)
    ours._create_all_weights(model.trainable_variables)  # Keras 2 legacy: slots now, not lazily
    tf.train.Checkpoint(model=model, optimizer=ours).restore(path).assert_consumed()
    assert int(ours.iterations) == 10
    for var, ref_var in zip(model.trainable_variables, ref.trainable_variables, strict=False):
        np.testing.assert_array_equal(var.numpy(), ref_var.numpy())
        for slot in ("m", "v"):
            np.testing.assert_array_equal(
                ours.get_slot(var, slot).numpy(), ref_opt.get_slot(ref_var, slot).numpy()
            )


def reference_novograd(w, grads, lr, beta_1, beta_2, eps, weight_decay, grad_averaging):
    """The update of NovoGrad's docstring, in float64 NumPy, for one variable."""
    m, v = np.zeros_like(w), 0.0
    for t, g in enumerate(grads):
        g2 = float(np.sum(g * g))
        v = g2 if t == 0 else beta_2 * v + (1 - beta_2) * g2
        d = g / (np.sqrt(v) + eps) + weight_decay * w
        if grad_averaging and t > 0:
            d = (1 - beta_1) * d
        m = beta_1 * m + d
        w = w - lr * m
    return w


@pytest.mark.parametrize("grad_averaging", [False, True])
def test_novograd_follows_its_documented_update(grad_averaging):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(5, 3))
    grads = [rng.normal(size=(5, 3)) * (t + 1) for t in range(12)]
    var = tf.Variable(w0.astype(np.float32))
    opt = NovoGrad(
        learning_rate=0.01,
        beta_1=0.9,
        beta_2=0.98,
        epsilon=1e-7,
        weight_decay=0.01,
        grad_averaging=grad_averaging,
    )
    for g in grads:
        opt.apply_gradients([(tf.constant(g.astype(np.float32)), var)])
    expected = reference_novograd(w0, grads, 0.01, 0.9, 0.98, 1e-7, 0.01, grad_averaging)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    # The second moment is one scalar per variable.
    assert opt.get_slot(var, "v").shape == ()


def test_novograd_config_round_trips_and_rejects_negative_decay():
    opt = NovoGrad(learning_rate=0.02, beta_2=0.98, weight_decay=1e-3, grad_averaging=True)
    again = NovoGrad.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    with pytest.raises(ValueError, match="weight_decay"):
        NovoGrad(weight_decay=-1.0)


def test_build_optimizer_uses_the_packaged_novograd_and_loss_scaling():
    opt = build_optimizer("novograd", 1e-3, total_steps=10)
    assert isinstance(opt, NovoGrad)
    scaled = build_optimizer("novograd", 1e-3, total_steps=10, mixed_float16=True)
    assert isinstance(scaled, tf.keras.mixed_precision.LossScaleOptimizer)
    assert isinstance(scaled.inner_optimizer, NovoGrad)


def test_dynamic_loss_scaling_skips_overflowing_steps_and_lowers_the_scale():
    """The float16 policy's loss scaling (Keras 2's LossScaleOptimizer, in both profiles)."""
    opt = build_optimizer("novograd", 1e-2, total_steps=10, mixed_float16=True)
    var = tf.Variable([1.0, 2.0])
    scale = float(opt.loss_scale)
    assert scale > 1
    assert float(opt.get_scaled_loss(tf.constant(2.0))) == 2.0 * scale
    (unscaled,) = opt.get_unscaled_gradients([tf.constant([scale, 2 * scale])])
    np.testing.assert_allclose(unscaled.numpy(), [1.0, 2.0])
    opt.apply_gradients([(tf.constant([np.inf, 1.0]), var)])  # an overflow: no update
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    assert float(opt.loss_scale) == scale / 2
    opt.apply_gradients([(tf.constant([0.5, 1.0]), var)])
    assert not np.array_equal(var.numpy(), [1.0, 2.0])
    assert int(opt.iterations) == 2  # Keras 2 counts the skipped step too, in both profiles
