"""Print a model's parameter count and Keras summary.

Example::

    python -m tf_medseg.cli.summary --model=unet3d --num_classes=2 --in_channels=1 \\
        --option=norm=batch --option=depth=3 --size=64

``--option`` takes ``key=value`` pairs passed to the model builder; values are read as Python
literals when they parse (``3``, ``(1, 2, 2, 4)``, ``True``) and as strings otherwise.
"""

from __future__ import annotations

import ast

import tensorflow as tf
from absl import app, flags

from tf_medseg.models import MODELS, build_model

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "unet3d", sorted(MODELS), "Registered model name.")
flags.DEFINE_integer("num_classes", 2, "Output classes, background included.")
flags.DEFINE_integer("in_channels", 1, "Input image channels.")
flags.DEFINE_integer("size", None, "Optional fixed cubic input size, to show spatial shapes.")
flags.DEFINE_multi_string("option", [], "Builder option as key=value (repeatable).")
flags.DEFINE_string("policy", "float32", "Keras mixed-precision policy to build under.")
flags.DEFINE_boolean("layers", True, "Print the layer-by-layer Keras summary.")


def parse_options(pairs: list[str]) -> dict:
    """Parses ``key=value`` strings into builder keyword options.

    Args:
        pairs: Strings such as ``"depth=3"`` or ``"norm=batch"``.

    Returns:
        A dict of options, values as Python literals where they parse, else strings.

    Raises:
        ValueError: If a pair has no ``=``.
    """
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def main(argv: list[str]) -> None:
    del argv
    tf.keras.mixed_precision.set_global_policy(FLAGS.policy)
    options = parse_options(FLAGS.option)
    if FLAGS.size is not None:
        options["spatial_size"] = FLAGS.size
    model = build_model(FLAGS.model, FLAGS.num_classes, FLAGS.in_channels, **options)
    if FLAGS.layers:
        model.summary(line_length=110)
    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    print(f"model: {FLAGS.model} options: {options} policy: {FLAGS.policy}")
    print(f"parameters: {model.count_params():,} (trainable {trainable:,})")


if __name__ == "__main__":
    app.run(main)
