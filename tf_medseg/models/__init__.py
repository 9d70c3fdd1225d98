"""Keras 3D segmentation models and their registry.

``MODELS`` maps a model name to its builder; ``build_model`` is the one entry point the CLI and
training code use; ``main_output_model`` gives the one-output model of a model trained with
auxiliary outputs (deep supervision). Importing this package also registers the custom layers
(package ``tf_medseg``) that loading a saved model needs.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tf_medseg.models.segresnet import build_segresnet
from tf_medseg.models.unet3d import build_unet3d
from tf_medseg.models.vnet import build_vnet

MODELS: dict[str, Callable[..., tf.keras.Model]] = {
    "unet3d": build_unet3d,
    "segresnet": build_segresnet,
    "vnet": build_vnet,
}


def build_model(name: str, num_classes: int, in_channels: int, **options) -> tf.keras.Model:
    """Builds a registered model under the current global mixed-precision policy.

    Args:
        name: A key of ``MODELS``: ``unet3d``, ``segresnet`` or ``vnet``.
        num_classes: Output classes, background included.
        in_channels: Input image channels.
        **options: Keyword options of the model's builder (e.g. ``depth``, ``base_filters``,
            ``norm``, ``spatial_size``).

    Returns:
        A functional Keras model from ``(N, D, H, W, in_channels)`` to float32 softmax
        probabilities ``(N, D, H, W, num_classes)`` (with unet3d's ``deep_supervision``, a list
        of outputs whose first is those probabilities: see :func:`main_output_model`).

    Raises:
        ValueError: If ``name`` is not registered or an option value is invalid.
        TypeError: If an option is not accepted by the builder.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](num_classes, in_channels, **options)


def main_output_model(model: tf.keras.Model) -> tf.keras.Model:
    """The model's first output alone: the one-output model of a deep-supervision model.

    The returned model is built on the same layers (it shares their weights, and a training
    step on ``model`` changes it too) and leaves the auxiliary heads out, so validation, the
    saved ``best_model.keras`` and prediction see an ordinary one-output model.

    Args:
        model: A functional model; its first output is the full-resolution prediction.

    Returns:
        ``model`` itself when it has one output, else a ``tf.keras.Model`` from its inputs to
        its first output, with the same name.
    """
    if len(model.outputs) == 1:
        return model
    return tf.keras.Model(model.input, model.outputs[0], name=model.name)
