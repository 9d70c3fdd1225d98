"""SimpleITK resampling of arrays between axis-aligned grids, and fast array copies.

The arrays are (X, Y, Z). SimpleITK's image buffer has x fastest, which is the Fortran order of
an (X, Y, Z) array and the order nibabel reads NIfTI data in: such an array goes to SimpleITK
without a transposing copy, and SimpleITK's output is read through a view and copied once, in
C order, keeping only the part wanted (the crop of :class:`~tf_medseg.transforms.spatial.
ResampleAndCrop`). Labels are resampled by indexing with SimpleITK's own nearest-neighbour
indices per axis (:func:`nearest_indices`), which gives the same voxels as resampling them in
3D, without the 3D pass.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def copy_into(out: np.ndarray, array: np.ndarray) -> None:
    """Copies ``array`` into ``out`` (same shape, any memory orders).

    From x fastest (SimpleITK's and nibabel's order) to z fastest (C) is a transposition; done
    whole it misses the cache on every voxel, so it is done one (X, Z) slab at a time, each a
    small 2D transposition that stays in cache (five times faster at 400 x 340 x 270).
    """
    x_fastest = array.ndim == 3 and abs(array.strides[0]) < abs(array.strides[2])
    if x_fastest and abs(out.strides[2]) < abs(out.strides[0]):
        for j in range(array.shape[1]):
            np.copyto(out[:, j], array[:, j])
    else:
        np.copyto(out, array)


def copy_array(array: np.ndarray, order: str = "C") -> np.ndarray:
    """A copy of ``array`` in the given memory order ("C" or "F").

    Through :func:`copy_into`; ``np.ascontiguousarray`` also takes a slow element-wise path on
    reversed strides (ten times slower on a flipped 512 x 512 x 100 volume).
    """
    out = np.empty(array.shape, array.dtype, order=order)
    copy_into(out, array)
    return out


def sitk_image(array: np.ndarray, spacing: np.ndarray) -> sitk.Image:
    """A 3D (X, Y, Z) array as a SimpleITK image with the same axes (x fastest in its buffer).

    An array already in Fortran order is handed over as it is, without a transposing copy, and
    in its own type: SimpleITK interpolates in double precision whatever the input type, so an
    int16 CT gives the same float32 output as its float32 conversion, without that pass.
    """
    if not array.flags.f_contiguous:
        array = copy_array(array, "F")
    image = sitk.GetImageFromArray(array.T)
    image.SetSpacing([float(s) for s in spacing])
    return image


def resample_image(
    source: sitk.Image,
    start: tuple[int, int, int],
    size: tuple[int, int, int],
    new_spacing: np.ndarray,
    nearest: bool = False,
    threads: int | None = None,
) -> sitk.Image:
    """Resamples ``source`` (first voxel centre at the origin) onto ``size`` voxels of the grid
    of spacing ``new_spacing`` that starts at the same point, beginning at grid index ``start``.
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in size])
    resampler.SetOutputSpacing([float(s) for s in new_spacing])
    origin = [float(a) * float(t) for a, t in zip(start, new_spacing, strict=True)]
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(source.GetDirection())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    # The output grid can reach half a voxel past the input's last centre: extend the edge values
    # there rather than filling with 0, which would read as tissue in CT (0 HU).
    resampler.SetUseNearestNeighborExtrapolator(True)
    if not nearest:
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    if threads:
        resampler.SetNumberOfThreads(threads)
        resampler.SetNumberOfWorkUnits(threads)
    return resampler.Execute(source)


def array_view(image: sitk.Image) -> np.ndarray:
    """The (X, Y, Z) view of a SimpleITK image's buffer; valid only while ``image`` lives."""
    return sitk.GetArrayViewFromImage(image).T


def resample_array(
    array: np.ndarray,
    spacing: np.ndarray,
    new_shape: tuple[int, int, int],
    new_spacing: np.ndarray,
    nearest: bool,
) -> np.ndarray:
    """Resamples a 3D array with SimpleITK, keeping the first voxel's centre in place.

    Args:
        array: (X, Y, Z) array.
        spacing: Its voxel size (mm).
        new_shape: Output shape.
        new_spacing: Output voxel size (mm).
        nearest: Nearest-neighbour interpolation (labels) instead of linear (images).

    Returns:
        The resampled array (C order), float32 for linear and the input dtype for nearest.
    """
    source = sitk_image(array, spacing)
    resampled = resample_image(source, (0, 0, 0), new_shape, new_spacing, nearest)
    return copy_array(array_view(resampled))


def nearest_indices(
    size: int, spacing: float, new_size: int, new_spacing: float, axis: int
) -> np.ndarray:
    """The source index SimpleITK's nearest-neighbour resampling takes along one axis.

    Nearest-neighbour resampling on an axis-aligned grid is separable: output voxel (i, j, k)
    is source voxel (ix[i], iy[j], iz[k]), edge extrapolation included. The indices come from
    SimpleITK itself (resampling the source's index ramp along ``axis`` on one thread, as each
    scanline of the 3D resampling starts at index 0), so rounding and ties are SimpleITK's.

    Args:
        size: Source voxels along the axis.
        spacing: Source voxel size (mm).
        new_size: Output voxels along the axis.
        new_spacing: Output voxel size (mm).
        axis: Which axis (0, 1 or 2): SimpleITK computes its first axis incrementally.

    Returns:
        int64 array of ``new_size`` source indices.
    """
    shape, new_shape, spacings, new_spacings = [1, 1, 1], [1, 1, 1], [1.0] * 3, [1.0] * 3
    shape[axis], new_shape[axis] = size, new_size
    spacings[axis], new_spacings[axis] = spacing, new_spacing
    ramp = np.arange(size, dtype=np.int32).reshape(shape)
    source = sitk_image(ramp, np.asarray(spacings))
    out = resample_image(source, (0, 0, 0), new_shape, np.asarray(new_spacings), True, threads=1)
    return sitk.GetArrayFromImage(out).T.reshape(-1).astype(np.int64)


def resample_label(
    label: np.ndarray,
    spacing: np.ndarray,
    new_shape: tuple[int, int, int],
    new_spacing: np.ndarray,
    box: tuple[slice, slice, slice] | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling of a label, equal to :func:`resample_array`'s, by indexing.

    Args:
        label: (X, Y, Z) integer array.
        spacing: Its voxel size (mm).
        new_shape: Output grid shape.
        new_spacing: Output voxel size (mm).
        box: Only this part of the output grid (default: all of it).

    Returns:
        The resampled label (C order, the input dtype), of the box's shape.
    """
    out = label
    box = box or tuple(slice(0, n) for n in new_shape)
    # Axes that shrink first, so that the copies get larger as late as possible.
    ratios = [new_shape[a] / label.shape[a] for a in range(3)]
    for axis in sorted(range(3), key=lambda a: ratios[a]):
        indices = nearest_indices(
            label.shape[axis], spacing[axis], new_shape[axis], new_spacing[axis], axis
        )[box[axis]]
        out = np.take(out, indices, axis=axis)
    return out if out.flags.c_contiguous else copy_array(out)
