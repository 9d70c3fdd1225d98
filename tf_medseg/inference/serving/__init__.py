"""Serving export: the whole of ``tf-medseg-predict`` as TensorFlow ops in a SavedModel.

:func:`export_segmenter` writes a SavedModel whose ``serving_default`` signature takes

* ``image``: float32 ``[X, Y, Z, C]``, the NIfTI's data array as stored (nibabel's
  ``get_fdata``), and
* ``affine``: float64 ``[4, 4]``, the file's affine,

and returns ``labels`` (uint8 ``[X, Y, Z]``, the input's grid) and ``probabilities`` (float32
``[X, Y, Z, K]``). In between, every step of predict runs as TensorFlow ops, so TensorFlow Serving,
Triton's TensorFlow backend or a plain ``tf.saved_model.load`` runs it with neither tf_medseg nor
SimpleITK installed:

1. **Reorientation to RAS** as nibabel's ``io_orientation`` computes it (the nearest orthogonal
   matrix of the affine's direction part by SVD, then each input axis to its largest output
   axis): a transposition, and flips.
2. **Resampling** to the training spacing (skipped where nibabel-style ``allclose`` says the
   spacing already is the target's), shape ``round(shape * spacing / target)``, first voxel
   centre kept: SimpleITK's linear interpolation with the edge values extended, which on an
   axis-aligned grid is separable, three gathers with weights. The flips of step 1 are folded
   into the interpolation coordinates (the value at ``c`` of a flipped axis is the value at
   ``n - 1 - c``), so the image is transposed once and interpolated once.
3. **Crop** to the body (first channel above the saved threshold, with the margin).
4. **Normalisation** with the statistics stored in ``preprocessing.json`` (CT: clip to the
   training foreground's percentiles and scale; MRI: z-score of the non-zero voxels).
5. **Sliding window**: MONAI's window corners and blending (:mod:`tf_medseg.inference.window`), the
   importance map a constant, ``sw_batch_size`` windows per forward pass, the windows added up
   axis by axis with segment sums; several models (an ensemble) and the 8 mirrorings of
   test-time augmentation averaged before the argmax.
6. **Largest connected component** per class when the run asked for it, on the list of the
   class's voxels: each starts with its own number and takes the largest number among its 26
   neighbours, with pointer jumping, until nothing changes; the biggest component stays (ties:
   the first in C order, as SimpleITK's ``RelabelComponent``).
7. **The way back**: the crop padded (background outside), the resampling undone by nearest
   neighbour (rounding half up, SimpleITK's), the orientation undone, all of it one gather per
   axis and one transposition.

Differences from predict: interpolation in float32 here against double in SimpleITK, and
ties of nearest-neighbour rounding, move single voxels at boundaries; ``tests/test_export.py``
measures the agreement on the synthetic test volumes.
"""
