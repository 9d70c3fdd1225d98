"""Building blocks shared by the 3D segmentation models.

Every model is a Keras functional model on channels-last 5D tensors ``(N, D, H, W, C)`` built
from these pieces: an input that checks the spatial size is divisible by ``2**depth``, a
normalisation factory (batch, instance, group, layer and weight normalisation, the options the
paper compares for the U-Net), convolution / activation helpers, and a softmax head that stays in
float32 under a mixed-precision policy.

The custom layers are registered as Keras serialisable under the package name ``tf_medseg`` so a
saved model (SavedModel or ``.keras``) loads back once ``tf_medseg.models`` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

NORMS = ("batch", "instance", "group", "layer", "weight")
ACTIVATIONS = ("relu", "leaky_relu", "prelu")


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class SpatialSizeCheck(tf.keras.layers.Layer):
    """Identity layer that rejects spatial sizes not divisible by ``divisor``.

    A static shape is checked in Python (a ``ValueError`` at build or trace time); a dynamic one
    with a graph assertion (an ``InvalidArgumentError`` when the graph runs).

    Args:
        divisor: Every spatial size (D, H, W) must be a multiple of it, ``2**depth`` for a
            network that halves the resolution ``depth`` times.
    """

    def __init__(self, divisor: int, **kwargs):
        super().__init__(**kwargs)
        if divisor < 1:
            raise ValueError(f"divisor must be positive, got {divisor}")
        self.divisor = int(divisor)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        static = inputs.shape[1:4]
        if any(size is not None and size % self.divisor for size in static):
            raise ValueError(
                f"spatial size {tuple(static)} of input {tuple(inputs.shape)} is not divisible "
                f"by {self.divisor} (2**depth); crop or pad the input to a multiple of "
                f"{self.divisor}"
            )
        if all(size is not None for size in static):
            return inputs
        remainder = tf.math.floormod(tf.shape(inputs)[1:4], self.divisor)
        assertion = tf.debugging.assert_equal(
            remainder,
            tf.zeros_like(remainder),
            message=f"spatial size of the input is not divisible by {self.divisor} (2**depth)",
        )
        with tf.control_dependencies([assertion]):
            return tf.identity(inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "divisor": self.divisor}


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class GroupNorm(tf.keras.layers.Layer):
    """Group normalisation of channels-last tensors with statistics computed in float32.

    ``groups == channels`` is instance normalisation, ``groups == 1`` is layer normalisation
    (over all spatial positions and channels of a sample). The Keras core
    ``GroupNormalization`` computes its moments in the compute dtype, which under
    ``mixed_bfloat16`` loses about three times the precision of the bfloat16 input itself, and
    materialises a mask of ones the size of the input; this layer casts to float32, normalises,
    applies the float32 scale and offset, and casts back to the compute dtype.

    Args:
        groups: Number of channel groups; must divide the number of channels.
        epsilon: Added to the variance.
    """

    def __init__(self, groups: int, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.epsilon = float(epsilon)

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(f"{self.groups} groups do not divide {channels} channels")
        self.channels = int(channels)
        # Plain float32 variables (no autocast) so the affine step is float32 under any policy.
        self.gamma = self.add_weight(
            name="gamma", shape=(channels,), initializer="ones", experimental_autocast=False
        )
        self.beta = self.add_weight(
            name="beta", shape=(channels,), initializer="zeros", experimental_autocast=False
        )
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = tf.cast(inputs, tf.float32)
        shape = tf.shape(x)
        grouped_shape = tf.concat([shape[:-1], [self.groups, self.channels // self.groups]], 0)
        grouped = tf.reshape(x, grouped_shape)
        reduce_axes = list(range(1, inputs.shape.rank - 1)) + [inputs.shape.rank]
        mean, variance = tf.nn.moments(grouped, axes=reduce_axes, keepdims=True)
        normalised = (grouped - mean) * tf.math.rsqrt(variance + self.epsilon)
        outputs = tf.reshape(normalised, shape) * self.gamma + self.beta
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class WeightNormConv3D(tf.keras.layers.Layer):
    """Weight-normalised 3D convolution (Salimans and Kingma 2016), plain or transposed.

    The kernel is ``g * v / ||v||`` with the norm taken per output channel; ``g`` starts at
    ``||v||`` so the initial kernel is the ``he_normal`` draw. ``v``, ``g`` and the norm are
    float32, the convolution runs in the compute dtype. ``tfa.layers.WeightNormalization`` is
    not used: it fails on its first call under ``mixed_float16`` / ``mixed_bfloat16`` (it assigns
    a half-precision norm to its float32 ``g``) and cannot be exported as a SavedModel around
    ``Conv3DTranspose`` (it swaps the wrapped layer's kernel for a tensor of another graph).

    Args:
        filters: Output channels.
        kernel_size: Side of the cubic kernel.
        strides: Stride on every spatial axis (the upsampling factor when ``transpose``).
        transpose: Transposed convolution (output size ``input size * strides``).
        use_bias: Add a learned bias.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        transpose: bool = False,
        use_bias: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.transpose = bool(transpose)
        self.use_bias = bool(use_bias)
        # tf.nn kernels are (k, k, k, in, out) for conv3d and (k, k, k, out, in) transposed.
        self._out_axis = 3 if self.transpose else 4
        self._norm_axes = [axis for axis in range(5) if axis != self._out_axis]

    def build(self, input_shape: tf.TensorShape) -> None:
        in_channels = int(input_shape[-1])
        k = self.kernel_size
        channels = (self.filters, in_channels) if self.transpose else (in_channels, self.filters)
        self.v = self.add_weight(
            name="v",
            shape=(k, k, k, *channels),
            initializer="he_normal",
            experimental_autocast=False,
        )
        self.g = self.add_weight(
            name="g",
            shape=(self.filters,),
            initializer=lambda shape, dtype=None: self._direction_norm(),
            experimental_autocast=False,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer="zeros", experimental_autocast=False
            )
        super().build(input_shape)

    def _direction_norm(self) -> tf.Tensor:
        """Per-output-channel L2 norm of ``v``, in float32."""
        return tf.sqrt(tf.reduce_sum(tf.square(self.v), axis=self._norm_axes))

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        scale = self.g / self._direction_norm()
        scale_shape = [1, 1, 1, 1, 1]
        scale_shape[self._out_axis] = self.filters
        kernel = tf.cast(self.v * tf.reshape(scale, scale_shape), self.compute_dtype)
        if self.transpose:
            shape = tf.shape(inputs)
            output_shape = tf.concat([shape[:1], shape[1:4] * self.strides, [self.filters]], 0)
            outputs = tf.nn.conv3d_transpose(
                inputs, kernel, output_shape, strides=self.strides, padding="SAME"
            )
            outputs.set_shape(self.compute_output_shape(inputs.shape))
        else:
            strides = [1, self.strides, self.strides, self.strides, 1]
            outputs = tf.nn.conv3d(inputs, kernel, strides=strides, padding="SAME")
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, self.compute_dtype))
        return outputs

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        input_shape = tf.TensorShape(input_shape)
        spatial = []
        for size in input_shape[1:4]:
            if size is None:
                spatial.append(None)
            elif self.transpose:
                spatial.append(size * self.strides)
            else:
                spatial.append(-(-size // self.strides))
        return tf.TensorShape([input_shape[0], *spatial, self.filters])

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "transpose": self.transpose,
            "use_bias": self.use_bias,
        }


def _as_triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    triple = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(triple) != 3:
        raise ValueError(f"expected one or three spatial sizes, got {size!r}")
    return triple


def model_input(
    in_channels: int, divisor: int, spatial_size: int | Sequence[int] | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Creates the 5D input and its spatial-size check.

    Args:
        in_channels: Number of image channels (modalities).
        divisor: Required divisor of every spatial size (``2**depth``).
        spatial_size: Optional fixed (D, H, W) or cube side; ``None`` accepts any size, checked
            when the model is called.

    Returns:
        ``(inputs, checked)``: the ``tf.keras.Input`` and the tensor to build the network on.

    Raises:
        ValueError: If ``in_channels < 1`` or a fixed spatial size is not divisible.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    shape = (None, None, None) if spatial_size is None else _as_triple(spatial_size)
    inputs = tf.keras.Input(shape=(*shape, in_channels), name="image")
    return inputs, SpatialSizeCheck(divisor, name="spatial_size_check")(inputs)


def group_count(norm: str, channels: int, groups: int = 8) -> int:
    """Number of groups a group-type normalisation uses for ``channels`` channels.

    Args:
        norm: ``instance`` (one group per channel), ``layer`` (one group) or ``group``.
        channels: Number of channels to normalise.
        groups: Requested groups for ``group``; reduced to the largest divisor of ``channels``
            not above it, so narrow test models still build.

    Returns:
        The number of groups.
    """
    if norm == "instance":
        return channels
    if norm == "layer":
        return 1
    return math.gcd(channels, groups)


def normalization(
    norm: str, channels: int, name: str, groups: int = 8
) -> tf.keras.layers.Layer | None:
    """Returns the activation-normalisation layer for ``norm`` (``None`` for weight norm).

    Args:
        norm: One of ``NORMS``.
        channels: Channels of the tensor to normalise.
        name: Layer name.
        groups: Groups for ``norm="group"``.

    Returns:
        A Keras layer, or ``None`` when ``norm == "weight"`` (the convolution is normalised).

    Raises:
        ValueError: If ``norm`` is unknown.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if norm == "weight":
        return None
    if norm == "batch":
        return tf.keras.layers.BatchNormalization(epsilon=1e-5, name=name)
    return GroupNorm(group_count(norm, channels, groups), name=name)


def activation(kind: str, name: str) -> tf.keras.layers.Layer:
    """Returns an activation layer: ``relu``, ``leaky_relu`` (slope 0.01) or ``prelu``.

    ``prelu`` learns one slope per channel (shared over space) so it accepts any spatial size.

    Raises:
        ValueError: If ``kind`` is unknown.
    """
    if kind == "relu":
        return tf.keras.layers.ReLU(name=name)
    if kind == "leaky_relu":
        return tf.keras.layers.LeakyReLU(alpha=0.01, name=name)
    if kind == "prelu":
        return tf.keras.layers.PReLU(shared_axes=[1, 2, 3], name=name)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def conv3d(
    x: tf.Tensor,
    filters: int,
    kernel_size: int,
    norm: str,
    name: str,
    strides: int = 1,
    transpose: bool = False,
) -> tf.Tensor:
    """Applies a 'same'-padded 3D (transposed) convolution, weight-normalised if ``norm`` says so.

    Only the weight-normalised convolution has a bias: in these models every other convolution
    is followed, directly or after an addition or concatenation, by a normalisation layer with
    its own offset.
    """
    if norm == "weight":
        conv = WeightNormConv3D(filters, kernel_size, strides, transpose, use_bias=True, name=name)
        return conv(x)
    conv_class = tf.keras.layers.Conv3DTranspose if transpose else tf.keras.layers.Conv3D
    conv = conv_class(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )
    return conv(x)


def norm_act(x: tf.Tensor, norm: str, act: str | None, name: str, groups: int = 8) -> tf.Tensor:
    """Normalises ``x`` (unless weight norm) and applies ``act`` (unless ``None``)."""
    layer = normalization(norm, x.shape[-1], f"{name}_norm", groups)
    if layer is not None:
        x = layer(x)
    return x if act is None else activation(act, f"{name}_act")(x)


def conv_norm_act(
    x: tf.Tensor,
    filters: int,
    kernel_size: int,
    norm: str,
    act: str | None,
    name: str,
    strides: int = 1,
    groups: int = 8,
) -> tf.Tensor:
    """Convolution, normalisation, activation (``act=None`` stops after the normalisation)."""
    x = conv3d(x, filters, kernel_size, norm, f"{name}_conv", strides=strides)
    return norm_act(x, norm, act, name, groups)


def softmax_head(x: tf.Tensor, num_classes: int, prefix: str = "") -> tf.Tensor:
    """1x1x1 convolution to ``num_classes`` logits and a float32 softmax over channels.

    The softmax layer has ``dtype="float32"``, so probabilities (and the loss computed on them)
    are float32 whatever the global mixed-precision policy.

    Args:
        x: The features to classify.
        num_classes: Output classes, background included.
        prefix: Prepended to the layer names ``logits`` and ``probs`` (the model's main head
            has none; auxiliary heads need their own names).

    Raises:
        ValueError: If ``num_classes < 2`` (a softmax over one class is constant).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    logits = tf.keras.layers.Conv3D(num_classes, 1, name=f"{prefix}logits")(x)
    return tf.keras.layers.Activation("softmax", dtype="float32", name=f"{prefix}probs")(logits)


@tf.keras.utils.register_keras_serializable(package="tf_medseg")
class MaxPool3D(tf.keras.layers.MaxPool3D):
    """3D max pooling that also runs under ``mixed_float16`` on a CPU.

    TensorFlow has no float16 ``MaxPool3D`` kernel for CPUs; there the layer pools in float32
    and casts back. A maximum is exact in any precision, so the result is the same as a float16
    kernel's; on GPUs the float16 kernel runs as usual.
    """

    def call(self, inputs):
        if inputs.dtype == tf.float16 and not tf.config.list_logical_devices("GPU"):
            return tf.cast(super().call(tf.cast(inputs, tf.float32)), tf.float16)
        return super().call(inputs)
