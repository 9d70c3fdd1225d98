"""Inference: a trained model over whole volumes, in training and after it.

- :mod:`tf_medseg.inference.window`: the sliding window (MONAI's semantics), the window
  predictor, test-time flips, the largest connected component.
- :mod:`tf_medseg.inference.segmenter`: the :class:`~tf_medseg.inference.segmenter.Segmenter`,
  models with their preprocessing, applied to NIfTI files in their own geometry (predict,
  ensembles, the serving export, the benchmarks).
- :mod:`tf_medseg.inference.serving`: the same as one TensorFlow graph (``tf-medseg-export``).

Training's validation uses the window module; nothing here depends on training.
"""
