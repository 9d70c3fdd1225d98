"""NIfTI reading and writing with nibabel, keeping the affine, and the checks on what is read.

Every error raised here is a :class:`DataError` whose message starts with the offending file's
path, so that a user with hundreds of volumes knows which one to look at.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


@dataclass(frozen=True)
class Volume:
    """A volume as read from disk.

    Attributes:
        data: The voxel array, spatial axes first (x, y, z) and, for multi-channel images,
            the channels last.
        affine: The 4x4 voxel-to-world (RAS+, millimetres) matrix.
        path: The file it was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    path: str

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in millimetres along the three spatial axes."""
        return spacing_from_affine(self.affine)


#: The file names of NIfTI volumes.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_case(path: str) -> str | None:
    """The case name of a NIfTI file (its name without ``.nii.gz`` / ``.nii``), or None for
    another kind of file."""
    name = os.path.basename(str(path))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def nifti_cases(folder: str) -> dict[str, str]:
    """The NIfTI files of a folder by case name, sorted (hidden files left out).

    Raises:
        FileNotFoundError: The folder does not exist.
        DataError: Two files give the same case (``a.nii`` and ``a.nii.gz``).
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        case = nifti_case(name)
        if case is None or case.startswith("."):
            continue
        path = os.path.join(folder, name)
        if case in found:
            raise DataError(f"{path} and {found[case]} are the same case {case!r}")
        found[case] = path
    return found


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of the three spatial axes: the norms of the affine's first three columns."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


#: The errors nibabel, gzip and zlib raise on a file that is not (all) NIfTI.
_UNREADABLE = (
    nib.filebasedimages.ImageFileError,
    EOFError,
    OSError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
)


def _check_present(path: str) -> None:
    """Raises :class:`DataError` for a missing or empty file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


def read_nifti(path: str, dtype: np.dtype | None = None) -> Volume:
    """Reads a NIfTI file, checking that it is readable, complete and geometrically valid.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        dtype: If given, the data is returned as this dtype (scaled by the header's slope).

    Returns:
        The volume with its affine.

    Raises:
        DataError: The file is missing, empty, not NIfTI, truncated or corrupt, or its spacing is
            zero, negative or not finite.
    """
    _check_present(path)
    try:
        img = nib.load(path)
        if dtype is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype)
    except _UNREADABLE as err:
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: affine has non-finite entries")
    spacing = spacing_from_affine(affine)
    ndim = min(data.ndim, 3)
    # nibabel silently replaces zero pixdims by 1 on load; read the header as written.
    with nib.openers.ImageOpener(path) as f:
        raw_zooms = np.asarray(type(img.header).from_fileobj(f, check=False)["pixdim"][1:4])
    if np.any(spacing[:ndim] <= 0) or np.any(~(raw_zooms[:ndim] > 0)):
        raise DataError(
            f"{path}: voxel spacing must be positive, got pixdim {raw_zooms[:ndim].tolist()} "
            f"and affine spacing {spacing[:ndim].round(6).tolist()}"
        )
    return Volume(data=data, affine=affine, path=path)


def check_header(path: str) -> tuple[int, ...]:
    """Reads a NIfTI file's header and checks that the file holds every byte it announces,
    without reading the voxels: a cheap check of every file before training.

    An uncompressed file must be as long as the header's data offset and array; a gzip file's
    last 4 bytes (the uncompressed size, modulo 2^32) must say the same. A gzip file whose
    trailer does not (cut short, or of several gzip members) is read through once to tell.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.

    Returns:
        The array shape the header announces.

    Raises:
        DataError: The file is missing, empty, not NIfTI, or shorter than its header says.
    """
    _check_present(path)
    try:
        img = nib.load(path)
        offset = getattr(img.dataobj, "offset", None)
        shape = tuple(int(n) for n in img.shape)
        if offset is not None:
            expected = int(offset) + int(np.prod(shape)) * img.get_data_dtype().itemsize
            held = _stored_size(path, expected)
            if held < expected:
                raise EOFError(
                    f"the file holds {held} of the {expected} bytes its header announces"
                )
    except _UNREADABLE as err:
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    return shape


def _stored_size(path: str, expected: int) -> int:
    """The uncompressed bytes of ``path`` (``expected`` when a gzip trailer says so)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return os.fstat(f.fileno()).st_size
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return expected
    size = 0
    with gzip.open(path, "rb") as f:  # raises EOFError when the stream is cut short
        while chunk := f.read(1 << 22):
            size += len(chunk)
    return size


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    """Writes a NIfTI file (gzip-compressed for a ``.gz`` name), creating its folder.

    nibabel writes gzip members with a zero timestamp, so the same array gives the same bytes.

    Args:
        path: Output file.
        data: The voxel array; its dtype is kept.
        affine: 4x4 voxel-to-world matrix.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    # sform and qform both set, code 1 (scanner), as the MSD files have.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


#: Integer types whose every value float32 holds exactly: images stored as these (CT in int16)
#: can stay in them until a transform computes in float32, with the same results.
EXACT_IN_FLOAT32 = (np.int8, np.uint8, np.int16, np.uint16)


def check_image(volume: Volume, num_channels: int, keep_integer: bool = False) -> np.ndarray:
    """Checks an image's dimensionality, channels and values; returns it channels-last.

    Args:
        volume: The image as read.
        num_channels: The number of modalities the task declares.
        keep_integer: Return an image stored in one of :data:`EXACT_IN_FLOAT32` as it is
            (half the bytes of float32 for int16 CT, and no conversion pass); any other image
            is converted to float32.

    Returns:
        Array of shape (X, Y, Z, C), float32 (or the stored integer type with
        ``keep_integer``), in the memory order it was read in (nibabel's: x fastest).

    Raises:
        DataError: Not 3D (or 4D with ``num_channels`` channels), or non-finite intensities.
    """
    data = volume.data
    if data.ndim == 3:
        data = data[..., None]
    elif data.ndim == 4 and data.shape[3] == 1:
        pass
    elif data.ndim != 4:
        raise DataError(
            f"{volume.path}: expected a 3D image (or 4D with the channels last), "
            f"got shape {tuple(data.shape)}"
        )
    if data.shape[3] != num_channels:
        raise DataError(
            f"{volume.path}: expected {num_channels} channel(s) (the task's modalities), "
            f"got {data.shape[3]} (shape {tuple(volume.data.shape)})"
        )
    if min(data.shape[:3]) < 2:
        raise DataError(f"{volume.path}: expected a 3D volume, got shape {tuple(data.shape[:3])}")
    if keep_integer and data.dtype.type in EXACT_IN_FLOAT32:
        return np.asarray(data)
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(f"{volume.path}: {bad} voxel(s) have NaN or infinite intensities")
    return data


def check_label(label: Volume, image: Volume, num_classes: int, atol: float = 1e-3) -> np.ndarray:
    """Checks a label against its image and the task's classes; returns it as uint8.

    Args:
        label: The label volume.
        image: The image it belongs to.
        num_classes: Number of classes including background; values must be 0..num_classes-1.
        atol: Tolerance (mm) on the affines' agreement.

    Returns:
        Array of shape (X, Y, Z), uint8.

    Raises:
        DataError: Different shape or affine than the image, non-integer values, or values outside
            the task's labels.
    """
    data = label.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != image.data.shape[:3]:
        raise DataError(
            f"{label.path}: label shape {tuple(data.shape)} differs from image shape "
            f"{tuple(image.data.shape[:3])} ({image.path})"
        )
    if not np.allclose(label.affine, image.affine, atol=atol):
        raise DataError(
            f"{label.path}: label affine differs from the image's ({image.path}) by "
            f"{np.max(np.abs(label.affine - image.affine)):.4g} mm"
        )
    if not np.issubdtype(data.dtype, np.integer):
        as_float = np.asarray(data, dtype=np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise DataError(f"{label.path}: label has non-integer values")
    # A range check is one pass; np.unique sorts (a second per MSD-size label). It runs only
    # to name the bad values.
    if data.size and (data.min() < 0 or data.max() >= num_classes):
        values = np.unique(data)
        bad = values[(values < 0) | (values >= num_classes)]
        raise DataError(
            f"{label.path}: label values {bad.tolist()} are outside the task's labels "
            f"0..{num_classes - 1}"
        )
    return np.asarray(data, dtype=np.uint8)
