"""The serving graph as a ``tf.Module``, and its export as a SavedModel."""

from __future__ import annotations

import os
from collections.abc import Sequence

import tensorflow as tf

from tf_medseg.inference.serving.components import keep_largest
from tf_medseg.inference.serving.grid import (
    back_to_source_grid,
    body_box,
    normalise,
    to_preprocessed_grid,
)
from tf_medseg.inference.serving.spec import ExportError, ServingSpec, spec_from_chain
from tf_medseg.inference.serving.window import sliding_window
from tf_medseg.inference.window import flip_combinations


class ServingModule(tf.Module):
    """The serving graph around one model or an ensemble (see the module's docstring).

    Args:
        models: Keras models (channels-last input, softmax output), one input and output shape.
        spec: What the graph does.
    """

    def __init__(self, models: Sequence[tf.keras.Model], spec: ServingSpec):
        super().__init__(name="tf_medseg_serving")
        self.models = list(models)
        self.spec = spec
        self.flips = flip_combinations() if spec.tta else [()]
        spec_image = tf.TensorSpec([None, None, None, spec.num_channels], tf.float32, "image")
        spec_affine = tf.TensorSpec([4, 4], tf.float64, "affine")
        self.serve = tf.function(self._serve, input_signature=[spec_image, spec_affine])

    def predict_windows(self, windows: tf.Tensor) -> tf.Tensor:
        """Mean softmax of the models (and mirrorings) for a window batch, float32."""
        total = None
        for model in self.models:
            for axes in self.flips:
                mirrored = tf.reverse(windows, axis=list(axes)) if axes else windows
                out = tf.cast(model(mirrored, training=False), tf.float32)
                out = tf.reverse(out, axis=list(axes)) if axes else out
                total = out if total is None else total + out
        return total / float(len(self.models) * len(self.flips))

    def preprocess(self, image: tf.Tensor, affine: tf.Tensor) -> tuple[tf.Tensor, dict]:
        """The image on the preprocessed grid (cropped, normalised) and its geometry."""
        spec = self.spec
        volume, geometry = to_preprocessed_grid(image, affine, spec.spacing)
        start, stop = body_box(volume, spec.threshold, spec.margin)
        volume = tf.slice(volume, tf.concat([start, [0]], 0), tf.concat([stop - start, [-1]], 0))
        geometry.update(start=start, stop=stop)
        return normalise(volume, spec), geometry

    def check_inputs(self, image: tf.Tensor, affine: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The inputs, checked as predict checks a file: the channels the models take, finite
        intensities, and a finite affine whose 3x3 part is invertible.

        A loaded signature does not enforce the image's declared shape, and neither NaN
        intensities nor a singular affine stop the graph on their own: without these checks
        they come back as labels of garbage.

        Raises:
            tf.errors.InvalidArgumentError: When the graph runs, naming the input at fault.
        """
        channels = self.spec.num_channels
        checks = [
            tf.debugging.Assert(
                tf.equal(tf.shape(image)[-1], channels),
                [
                    f"image must be [X, Y, Z, {channels}]: the model takes {channels} "
                    "channel(s) on the last axis (one modality: a last axis of size 1); got "
                    "an image of shape",
                    tf.shape(image),
                ],
                summarize=4,
            ),
            tf.debugging.assert_all_finite(
                image, "image holds NaN or infinite intensities; replace them before serving"
            ),
            tf.debugging.assert_all_finite(affine, "affine holds NaN or infinite values"),
        ]
        with tf.control_dependencies(checks):
            rzs = affine[:3, :3]
            # Relative to the columns' lengths (the voxel sizes), so that the test does not
            # depend on the units: 0 for a singular matrix, 1 for an orthogonal one.
            scale = tf.reduce_prod(tf.sqrt(tf.reduce_sum(rzs * rzs, axis=0)))
            independence = tf.abs(tf.linalg.det(rzs)) / tf.maximum(scale, 1e-300)
            invertible = tf.debugging.Assert(
                independence > 1e-6,
                [
                    "affine is not invertible: its 3x3 part (voxel axes to mm) must map the "
                    "three voxel axes to independent directions; got",
                    affine,
                ],
                summarize=16,
            )
        with tf.control_dependencies([invertible]):
            return tf.identity(image), tf.identity(affine)

    def _serve(self, image: tf.Tensor, affine: tf.Tensor) -> dict[str, tf.Tensor]:
        spec = self.spec
        image, affine = self.check_inputs(image, affine)
        volume, geometry = self.preprocess(image, affine)
        probs = sliding_window(volume, self.predict_windows, spec)
        labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
        if spec.window.keep_largest:
            labels = keep_largest(labels, spec.num_classes, spec.window.largest_classes)
        start, stop = geometry["start"], geometry["stop"]
        pads = tf.stack([start, geometry["new_shape"] - stop], axis=1)
        labels = tf.pad(labels, pads)
        background = tf.pad(probs[..., :1], tf.concat([pads, [[0, 0]]], 0), constant_values=1.0)
        foreground = tf.pad(probs[..., 1:], tf.concat([pads, [[0, 0]]], 0))
        probs = tf.concat([background, foreground], axis=-1)
        labels = back_to_source_grid(labels, geometry, spec.spacing)
        probs = back_to_source_grid(probs, geometry, spec.spacing)
        return {"labels": tf.cast(labels, tf.uint8), "probabilities": probs}


def export_segmenter(segmenter, out: str) -> str:
    """Writes a :class:`tf_medseg.inference.segmenter.Segmenter` as a SavedModel at ``out``.

    Args:
        segmenter: Loaded models, their preprocessing and window settings (``tta`` included).
        out: The SavedModel folder (created; must not hold a SavedModel already).

    Returns:
        ``out``.

    Raises:
        ExportError: The chain cannot be expressed as the graph, or ``out`` is taken.
    """
    if os.path.exists(os.path.join(out, "saved_model.pb")):
        raise ExportError(f"{out} already holds a SavedModel; remove it or choose another --out")
    spec = spec_from_chain(segmenter.preprocessing, segmenter.settings, segmenter.tta)
    module = ServingModule(segmenter.models, spec)
    tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
    return out
