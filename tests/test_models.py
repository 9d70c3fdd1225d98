"""Tests of tf_medseg.models: shapes, size checks, serialisation, mixed precision, blocks."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_medseg.models import MODELS, build_model, main_output_model
from tf_medseg.models.blocks import GroupNorm, WeightNormConv3D

# Tiny configurations: two downsamplings, so spatial sizes must be multiples of 4.
TINY = {
    "unet3d": {"depth": 2, "base_filters": 4},
    "segresnet": {"depth": 2, "base_filters": 4, "blocks_down": (1, 1, 1)},
    "vnet": {"depth": 2, "base_filters": 4},
}
IN_CHANNELS = 2


def tiny_model(name: str, num_classes: int = 3, **options) -> tf.keras.Model:
    return build_model(name, num_classes, IN_CHANNELS, **{**TINY[name], **options})


def random_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*shape, IN_CHANNELS)).astype(np.float32)


@pytest.fixture
def policy(request):
    """Sets the global Keras precision policy for one test and restores the previous one."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    tf.keras.mixed_precision.set_global_policy(previous)


def test_registry_lists_the_three_models():
    assert sorted(MODELS) == ["segresnet", "unet3d", "vnet"]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shape_dtype_and_probabilities(name, num_classes):
    model = tiny_model(name, num_classes)
    for batch, spatial in [(2, (16, 16, 16)), (1, (32, 16, 24))]:
        probs = model(random_images((batch, *spatial))).numpy()
        assert probs.shape == (batch, *spatial, num_classes)
        assert probs.dtype == np.float32
        assert probs.min() >= 0.0
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_spatial_size_not_divisible_raises(name):
    with pytest.raises(ValueError, match="not divisible by 4"):
        tiny_model(name, spatial_size=(16, 18, 16))
    model = tiny_model(name)
    with pytest.raises(ValueError, match=r"spatial size \(16, 16, 22\).*not divisible by 4"):
        model(random_images((1, 16, 16, 22)))
    with pytest.raises(ValueError, match="not divisible by 4"):
        model.predict(random_images((1, 18, 16, 16)), verbose=0)


def test_dynamic_spatial_size_is_checked_when_the_graph_runs():
    model = tiny_model("unet3d")
    forward = tf.function(
        model, input_signature=[tf.TensorSpec((None, None, None, None, IN_CHANNELS))]
    )
    assert forward(random_images((1, 8, 12, 16))).shape == (1, 8, 12, 16, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not divisible by 4"):
        forward(random_images((1, 8, 12, 14)))


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet2d", 2, 1)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("unet3d", 1, 1, **TINY["unet3d"])
    with pytest.raises(ValueError, match="unknown norm"):
        build_model("unet3d", 2, 1, norm="spectral", **TINY["unet3d"])
    with pytest.raises(ValueError, match="depth=2 needs 3 blocks_down and 2 blocks_up"):
        build_model("segresnet", 2, 1, depth=2, blocks_down=(1, 1, 1), blocks_up=(1,))
    with pytest.raises(TypeError, match="colour"):
        build_model("vnet", 2, 1, colour="blue")


def test_unet3d_parameter_count_matches_hand_count():
    # in 1 -> 2 -> 4 -> 2 -> out 2, batch norm (4 weights per channel), no conv bias:
    # enc0 27*1*2 + 8 + 27*2*2 + 8, bottleneck 27*2*4 + 16 + 27*4*4 + 16,
    # up 8*4*2, dec0 27*4*2 + 8 + 27*2*2 + 8, logits 2*2 + 2.
    model = build_model("unet3d", 2, 1, depth=1, base_filters=2, norm="batch")
    expected = 54 + 8 + 108 + 8 + 216 + 16 + 432 + 16 + 64 + 216 + 8 + 108 + 8 + 6
    assert model.count_params() == expected == 1268


def test_segresnet_depth_cuts_or_extends_the_paper_blocks():
    def residual_blocks(model):
        names = ("_".join(layer.name.split("_")[:2]) for layer in model.layers)
        return sorted({name for name in names if "_block" in name})

    paper = build_model("segresnet", 2, 1)
    assert len([n for n in residual_blocks(paper) if n.startswith("enc")]) == 1 + 2 + 2 + 4
    assert len([n for n in residual_blocks(paper) if n.startswith("dec")]) == 3
    shallow = build_model("segresnet", 2, 1, depth=1)
    assert residual_blocks(shallow) == ["dec0_block0", "enc0_block0", "enc1_block0", "enc1_block1"]


def test_summary_command_prints_parameter_count():
    options = ["--option=depth=1", "--option=base_filters=2", "--option=norm=batch"]
    command = [sys.executable, "-m", "tf_medseg.cli.summary", "--model=unet3d", "--nolayers"]
    command += options
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert "parameters: 1,268 (trainable 1,236)" in result.stdout


# One downsampling keeps SavedModel tracing fast; the options cover every custom layer.
ROUND_TRIP = {
    "unet3d": {"depth": 1, "base_filters": 4, "norm": "weight", "residual": True},
    "segresnet": {"depth": 1, "base_filters": 4, "blocks_down": (1, 1), "norm": "group"},
    "vnet": {"depth": 1, "base_filters": 4, "norm": "batch"},
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_save_and_load_round_trip_gives_identical_outputs(name, tmp_path):
    model = build_model(name, 3, IN_CHANNELS, **ROUND_TRIP[name])
    images = random_images((2, 16, 16, 16))
    # A training call moves batch-norm statistics away from their initial values.
    model(images, training=True)
    expected = model(images).numpy()

    clone = tf.keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(images).numpy(), expected)

    model.save(tmp_path / "model.keras")
    model.save(tmp_path / "savedmodel")
    for path in ["model.keras", "savedmodel"]:
        loaded = tf.keras.models.load_model(tmp_path / path)
        assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
        np.testing.assert_array_equal(loaded(images).numpy(), expected, err_msg=path)


def assert_close_to_float32(probs: np.ndarray, expected: np.ndarray) -> None:
    """bfloat16 keeps 8 mantissa bits: probabilities agree to ~5e-3 on average, 0.1 at worst.

    (The same tiny models with independently drawn weights differ by about 0.1 on average.)
    """
    error = np.abs(probs - expected)
    assert error.mean() < 0.01, error.mean()
    assert error.max() < 0.15, error.max()


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"], indirect=True)
@pytest.mark.parametrize("name", sorted(TINY))
def test_mixed_precision_output_is_float32_and_close_to_float32(name, policy):
    model = tiny_model(name)
    tf.keras.mixed_precision.set_global_policy("float32")
    reference_model = tiny_model(name)
    reference_model.set_weights(model.get_weights())
    images = random_images((1, 16, 16, 16))
    # CPU TensorFlow has no float16 MaxPool3D kernel: blocks.MaxPool3D pools in float32 there.
    probs = tf.function(model)(images)
    assert model.layers[-1].compute_dtype == "float32"
    assert model.get_layer("logits").compute_dtype == policy.split("_")[1]
    assert probs.dtype == tf.float32
    assert_close_to_float32(probs.numpy(), reference_model(images).numpy())
    np.testing.assert_allclose(probs.numpy().sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
# group and layer norm are GroupNorm with other group counts, tested in bfloat16 below.
@pytest.mark.parametrize("norm", ["batch", "instance", "weight"])
def test_unet3d_norms_train_under_bfloat16(norm, policy):
    model = build_model("unet3d", 3, IN_CHANNELS, depth=1, base_filters=8, norm=norm)
    tf.keras.mixed_precision.set_global_policy("float32")
    reference_model = build_model("unet3d", 3, IN_CHANNELS, depth=1, base_filters=8, norm=norm)
    reference_model.set_weights(model.get_weights())
    images = random_images((2, 16, 16, 16))
    with tf.GradientTape() as tape:
        probs = model(images, training=True)
        loss = tf.reduce_mean(tf.square(probs))
    gradients = tape.gradient(loss, model.trainable_variables)
    assert probs.dtype == tf.float32
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in gradients)
    assert_close_to_float32(probs.numpy(), reference_model(images, training=True).numpy())


def numpy_group_norm(x: np.ndarray, groups: int, epsilon: float = 1e-5) -> np.ndarray:
    n, d, h, w, c = x.shape
    grouped = x.astype(np.float64).reshape(n, d, h, w, groups, c // groups)
    mean = grouped.mean(axis=(1, 2, 3, 5), keepdims=True)
    variance = grouped.var(axis=(1, 2, 3, 5), keepdims=True)
    return ((grouped - mean) / np.sqrt(variance + epsilon)).reshape(x.shape)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_matches_numpy_in_float32_and_bfloat16(groups):
    x = np.random.default_rng(1).normal(10.0, 2.0, size=(2, 8, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(GroupNorm(groups)(x).numpy(), numpy_group_norm(x, groups), atol=1e-4)
    layer = GroupNorm(groups, dtype="mixed_bfloat16")
    x_bf16 = tf.cast(x, tf.bfloat16)
    out = layer(x_bf16)
    assert out.dtype == tf.bfloat16
    assert layer.gamma.dtype == tf.float32
    # Statistics in float32: the error is the bfloat16 rounding of input and output only.
    reference = numpy_group_norm(tf.cast(x_bf16, tf.float32).numpy(), groups)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), reference, atol=0.02)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="3 groups do not divide 8 channels"):
        GroupNorm(3)(np.zeros((1, 4, 4, 4, 8), np.float32))


@pytest.mark.parametrize("transpose", [False, True])
def test_weight_norm_conv_matches_plain_convolution(transpose):
    x = np.random.default_rng(2).normal(size=(1, 4, 4, 4, 3)).astype(np.float32)
    layer = WeightNormConv3D(5, 3, strides=2, transpose=transpose, use_bias=False)
    out = layer(x).numpy()
    # g starts at ||v||, so the kernel starts equal to v.
    if transpose:
        expected = tf.nn.conv3d_transpose(x, layer.v, (1, 8, 8, 8, 5), 2, padding="SAME")
    else:
        expected = tf.nn.conv3d(x, layer.v, [1, 2, 2, 2, 1], padding="SAME")
    assert out.shape == ((1, 8, 8, 8, 5) if transpose else (1, 2, 2, 2, 5))
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    layer.g.assign(2.0 * layer.g)
    np.testing.assert_allclose(layer(x).numpy(), 2.0 * expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"], indirect=True)
def test_unet3d_deep_supervision_gives_depth_outputs_halving_in_size(policy):
    model = build_model("unet3d", 3, IN_CHANNELS, depth=3, base_filters=4, deep_supervision=True)
    outputs = model(random_images((2, 16, 24, 32)))
    # The full-resolution output, then one per decoder level below it (the bottleneck has none).
    assert [tuple(o.shape) for o in outputs] == [
        (2, 16, 24, 32, 3),
        (2, 8, 12, 16, 3),
        (2, 4, 6, 8, 3),
    ]
    assert [o.name.split("/")[0] for o in model.outputs] == ["probs", "ds1_probs", "ds2_probs"]
    for probs in outputs:
        assert probs.dtype == tf.float32
        np.testing.assert_allclose(probs.numpy().sum(-1), 1.0, atol=1e-3)
    assert model.get_layer("ds1_logits").compute_dtype == policy.split("_")[-1]


def test_the_one_output_model_shares_the_deep_supervision_models_weights(tmp_path):
    train_model = tiny_model("unet3d", deep_supervision=True)
    model = main_output_model(train_model)
    images = random_images((1, 16, 16, 16))
    assert len(train_model.outputs) == 2 and len(model.outputs) == 1
    np.testing.assert_array_equal(model(images).numpy(), train_model(images)[0].numpy())
    # The same variables, less the auxiliary head's kernel and bias.
    shared = {id(v) for v in model.weights}
    assert shared < {id(v) for v in train_model.weights}
    extra = [v.name for v in train_model.weights if id(v) not in shared]
    assert sorted(extra) == ["ds1_logits/bias:0", "ds1_logits/kernel:0"]
    # A change to the training model's weights is a change to the one-output model.
    kernel = train_model.get_layer("logits").kernel
    kernel.assign(kernel * 2.0)
    np.testing.assert_array_equal(model(images).numpy(), train_model(images)[0].numpy())
    # Saved and loaded, it is an ordinary one-output model.
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert len(loaded.outputs) == 1 and loaded.output_shape == (None, None, None, None, 3)
    assert not [layer.name for layer in loaded.layers if layer.name.startswith("ds")]
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    # Without deep supervision there is nothing to cut.
    plain = tiny_model("unet3d")
    assert main_output_model(plain) is plain
