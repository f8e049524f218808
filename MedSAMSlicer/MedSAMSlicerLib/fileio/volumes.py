"""Reading volumes, mapping them to the engine's canonical axial order, and writing results.

Conventions (see ``docs/CONTRACT.md``):

* A file's voxels are indexed ``(i, j, k)``; SimpleITK and Slicer hand them to numpy as arrays of
  shape ``(k, j, i)``.
* The engine works on *canonical* arrays of shape ``(z, y, x)``: ``x`` runs toward the patient's
  Left, ``y`` toward Posterior, ``z`` toward Superior (the LPS voxel order of DICOM).
  :class:`~MedSAMSlicerLib.fileio.orientation.AxialOrientation` (``orientation.py``) maps between the two
  by an axis permutation and flips only, never by resampling, so every canonical voxel is exactly
  one file voxel.
* Before SimpleITK reads a file, ``integrity.check_file_complete`` checks that every voxel byte its
  header promises is there.
* SimpleITK's physical space is LPS; Slicer's is RAS = ``(-L, -P, S)``.  RAS <-> index conversion
  happens here (for files) and in the Slicer bridge (for MRML nodes), nowhere else.
* Boxes are ``(x0, y0, z0, x1, y1, z1)`` in canonical voxel indices, inclusive.

Results are always written on the input's exact grid (same size, spacing, origin, direction), to a
temporary file in the destination folder that is then renamed, so a failed write never leaves a
half-written output behind.

This module is plain Python over numpy and SimpleITK: it never imports Slicer, Qt or VTK.
"""

from __future__ import annotations

import itertools
import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..boxes import BoxOutside, voxel_box
from ..errors import MedSAMError
from .atomic import atomic_write, check_output, split_extension
from .dicom import is_dicom_file, read_dicom_folder, read_series_of_file
from .integrity import check_file_complete
from .itk_io import SUPPORTED_INPUTS, check_layout, quiet_itk, sitk_reason
from .orientation import LPS_RAS_SIGN, AxialOrientation
from .segnrrd import write_label_values

PathLike = Union[str, "os.PathLike[str]"]
Box3D = Tuple[int, int, int, int, int, int]

__all__ = [
    "Volume",
    "read_volume",
    "check_volume_file",
    "check_voxel_values",
    "ras_box_to_canonical",
    "ijk_box_to_canonical",
    "write_labelmap",
    "LABELMAP_EXTENSIONS",
]

#: File extensions :func:`write_labelmap` writes (``.seg.nrrd``: :func:`~MedSAMSlicerLib.fileio.segnrrd.write_label_values`).
LABELMAP_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")

# How a canonical axis is named to the user, who gives boxes in RAS: x runs along R, y along A, z along S.
_RAS_AXIS_NAMES = ("R (right-left)", "A (anterior-posterior)", "S (superior-inferior)")


# --------------------------------------------------------------------------------------------
# Volume and reading
# --------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A 3D scalar volume, read from a file or folder, in canonical order.

    Attributes:
        image: the input as read (3D, one component), kept so results are written on its exact
            grid (size, spacing, origin, direction).
        array: canonical voxels, shape ``(nz, ny, nx)``, in the input's voxel type.
        orientation: the mapping between the file's ``(i, j, k)`` and canonical ``(x, y, z)``.
        spacing: canonical voxel spacing ``(sx, sy, sz)`` in mm (note: x first, unlike ``array``).
        path: where it was read from (a file, or the DICOM folder), or None.
        notes: things the reader chose on the user's behalf (e.g. which DICOM series), to show.
    """

    image: sitk.Image
    array: np.ndarray
    orientation: AxialOrientation
    spacing: Tuple[float, float, float]
    path: Optional[Path] = None
    notes: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Canonical shape ``(nz, ny, nx)``."""
        return self.orientation.canonical_shape

    def ras_to_canonical(self, ras_points: np.ndarray) -> np.ndarray:
        """RAS points in mm -> continuous canonical voxel coordinates ``(x, y, z)``.

        Args:
            ras_points: shape ``(3,)`` or ``(N, 3)``, ``(R, A, S)`` in mm (Slicer's world).

        Returns:
            Same shape as the input: ``(x, y, z)`` with voxel centres at integers (not rounded,
            not clipped).
        """
        pts = np.asarray(ras_points, dtype=float)
        if pts.shape[-1:] != (3,) or pts.ndim > 2:
            raise MedSAMError(f"RAS points must have shape (3,) or (N, 3); got {pts.shape}.")
        lps = pts.reshape(-1, 3) * LPS_RAS_SIGN
        ijk = np.array([self.image.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in lps],
                       dtype=float).reshape(-1, 3)
        return self.orientation.ijk_points_to_canonical(ijk).reshape(pts.shape)

    def canonical_to_ras(self, xyz_points: np.ndarray) -> np.ndarray:
        """Continuous canonical voxel coordinates ``(x, y, z)``, shape ``(3,)`` or ``(N, 3)`` -> RAS
        points in mm, same shape."""
        pts = np.asarray(xyz_points, dtype=float)
        if pts.shape[-1:] != (3,) or pts.ndim > 2:
            raise MedSAMError(f"Canonical points must have shape (3,) or (N, 3); got {pts.shape}.")
        ijk = self.orientation.canonical_points_to_ijk(pts.reshape(-1, 3))
        lps = np.array([self.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in ijk],
                       dtype=float).reshape(-1, 3)
        return (lps * LPS_RAS_SIGN).reshape(pts.shape)

    def ras_extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """RAS bounding box ``(lo, hi)`` of the volume's voxel centres."""
        nz, ny, nx = self.shape
        corners = np.array(list(itertools.product((0, nx - 1), (0, ny - 1), (0, nz - 1))), dtype=float)
        ras = self.canonical_to_ras(corners)
        return ras.min(axis=0), ras.max(axis=0)

    @classmethod
    def from_image(
        cls, image: sitk.Image, path: Optional[PathLike] = None, notes: Optional[List[str]] = None
    ) -> Volume:
        """Wrap a SimpleITK image (3D, one component) as a canonical :class:`Volume`.

        A 4D image with a single frame is reduced to 3D; other layouts raise :class:`MedSAMError`.
        """
        source = f"'{path}'" if path is not None else "The image"
        check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                      image.GetPixelIDTypeAsString(), source)
        if image.GetDimension() == 4:
            size = list(image.GetSize())
            image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        orientation = AxialOrientation.from_image(image)
        view = sitk.GetArrayViewFromImage(image)
        array = orientation.to_canonical(view)
        if np.shares_memory(array, view):
            array = array.copy()
        return cls(
            image=image,
            array=array,
            orientation=orientation,
            spacing=orientation.canonical_spacing(image.GetSpacing()),
            path=Path(path) if path is not None else None,
            notes=list(notes or []),
        )


def read_volume(path: PathLike, allow_gaps: bool = False, labels: bool = False) -> Volume:
    """Read a 3D scalar volume, check it, and put it in canonical ``(z, y, x)`` order.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
            ``.mhd``) file, or a folder with DICOM files (the series with the most files is read;
            a note says so when there are several).  A single DICOM file reads the whole series
            it belongs to.
        allow_gaps: read a DICOM series with missing slices or uneven slice spacing anyway, on
            the uniform grid SimpleITK makes of it (a warning says how far slices are moved).
        labels: the file is a label map: a blank (all-zero) or constant volume is fine.

    Checks, so that nothing wrong is segmented or trained on silently (see "Input checks" in
    docs/user-guide.md): the file holds every voxel byte its header promises and its compressed data passes
    its own integrity check (SimpleITK fills missing voxels of a truncated NIfTI with zeros and
    reads damaged compressed data without a word); a DICOM series has no missing or unreadable
    slice between its first and last and evenly spaced slices; no voxel is NaN or infinite; an
    image is not blank or constant.

    Returns:
        A :class:`Volume` whose ``array`` is ``(nz, ny, nx)`` in the file's voxel type.

    Raises:
        MedSAMError: missing path, not an image, a 2D image, a 4D or multi-component image, an
            empty folder or a folder without DICOM files, or any failed check above; the message
            names the file (and slice positions or voxel indices) and what to do.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:  # e.g. a folder on the way that may not be entered
        raise MedSAMError(
            f"Input '{p}' cannot be used ({exc.strerror or exc}). Check the path and its permissions."
        ) from None
    if not exists:
        raise MedSAMError(f"Input not found: '{p}'. Check the path; give {SUPPORTED_INPUTS}.")
    notes: List[str] = []
    if is_dir:
        image = read_dicom_folder(p, notes, allow_gaps)
    else:
        image = _read_image_file(p, notes, allow_gaps)
    volume = Volume.from_image(image, p, notes)
    check_voxel_values(volume, labels=labels)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return volume


def check_voxel_values(volume: Volume, labels: bool = False) -> None:
    """Refuse voxels that are not numbers (NaN, infinite) and, unless ``labels``, a constant volume.

    NaN or infinite voxels would silently become black (CT window) or blank the whole volume
    (percentile window), so they are refused, not replaced: the message gives their count and
    the first one's index ``(i, j, k)`` in the file.

    Raises:
        MedSAMError: non-finite voxels; an image whose voxels all have the same value.
    """
    source = f"'{volume.path}'" if volume.path is not None else "The volume"
    check_array_values(volume.array, volume.orientation, source, labels)


def check_array_values(array: np.ndarray, orientation: AxialOrientation, source: str, labels: bool = False) -> None:
    """:func:`check_voxel_values` for a canonical ``(z, y, x)`` array (e.g. a Slicer volume node's
    voxels); ``orientation`` maps it back to the user's ``(i, j, k)`` for the message and ``source``
    names it ("'ct.nii.gz'", "The volume 'CT'")."""
    if array.size and np.issubdtype(array.dtype, np.inexact):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            # The first in the file's own order (k, then j, then i), as the user's viewer counts.
            k, j, i = (int(v) for v in np.argwhere(orientation.from_canonical(~finite))[0])
            kinds = [name for name, test in (("NaN", np.isnan), ("infinite", np.isinf)) if test(array).any()]
            raise MedSAMError(
                f"{source} has {bad} voxel(s) that are {' or '.join(kinds)} (the first at i={i}, j={j}, k={k}); "
                "their intensity is unknown, so nothing sensible can be segmented there. Replace them with a "
                "real value (e.g. the image minimum) in your image tool and save a new file."
            )
    if labels or not array.size:
        return
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise MedSAMError(
            f"{source} is blank: all its {array.size} voxels have the value {float(lo):g}, so there is nothing "
            "to segment. Check that this is the right file (an empty or failed export?)."
        )


def check_volume_file(path: PathLike, what: str = "input") -> Path:
    """Everything about a volume file that can be checked without reading its voxels, for front
    ends that hand the file to another reader (the headless script: Slicer's Volumes logic): a
    regular file, complete and intact (:func:`~MedSAMSlicerLib.fileio.integrity.check_image_file`), whose
    header SimpleITK reads as one 3D scalar image. Returns the path (``~`` expanded).

    Raises:
        MedSAMError: naming the file and the problem, in the words :func:`read_volume` uses.
    """
    from .integrity import check_image_file

    p = check_image_file(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_itk() as native:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedSAMError(
            f"'{p}' is not an image file that can be read ({sitk_reason(exc, native)}). Give {SUPPORTED_INPUTS}."
        ) from None
    check_layout(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                 sitk.GetPixelIDValueAsString(reader.GetPixelID()), f"'{p}'")
    return p


def _read_image_file(p: Path, notes: List[str], allow_gaps: bool = False) -> sitk.Image:
    from .userfiles import check_regular_file

    check_regular_file(p, "input")  # a FIFO or a device would hang or fill the memory
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_itk() as native:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if not os.access(p, os.R_OK) and p.is_file():
            raise MedSAMError(f"'{p}' cannot be opened: permission denied. Check the file's permissions.") from None
        raise MedSAMError(
            f"'{p}' is not an image file that can be read ({sitk_reason(exc, native)}). Give {SUPPORTED_INPUTS}."
        ) from None
    source = f"'{p}'"
    if is_dicom_file(reader):
        series = read_series_of_file(p, notes, allow_gaps)
        if series is not None:
            return series
    check_layout(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                 sitk.GetPixelIDValueAsString(reader.GetPixelID()), source)
    check_file_complete(p)
    try:
        with quiet_itk() as native:
            return reader.Execute()
    except RuntimeError as exc:
        raise MedSAMError(
            f"{source} could not be read ({sitk_reason(exc, native)}); the file may be truncated or corrupt. "
            "Copy or export it again."
        ) from None


# --------------------------------------------------------------------------------------------
# Coordinates and boxes
# --------------------------------------------------------------------------------------------


def _fmt_point(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in p) + ")"


def ras_box_to_canonical(volume: Volume, ras_corner_a: Sequence[float], ras_corner_b: Sequence[float]) -> Box3D:
    """An RAS-aligned box (two opposite corners, mm) -> canonical voxel box, inclusive.

    The voxels are chosen by :func:`~MedSAMSlicerLib.boxes.voxel_box` (centres inside, the nearest
    voxel along an axis thinner than one); for an oblique volume the eight corners are mapped and
    their canonical bounding box is used.

    Returns:
        ``(x0, y0, z0, x1, y1, z1)``, sorted and clipped to the volume.

    Raises:
        MedSAMError: when the box lies entirely outside the volume.
    """
    a = np.asarray(ras_corner_a, dtype=float).reshape(-1)
    b = np.asarray(ras_corner_b, dtype=float).reshape(-1)
    if a.shape != (3,) or b.shape != (3,) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise MedSAMError(f"A box needs two RAS corners of three finite numbers each; got {a.tolist()} and {b.tolist()}.")
    corners = np.array([[(a, b)[s[c]][c] for c in range(3)] for s in itertools.product((0, 1), repeat=3)])
    try:
        first, last = voxel_box(volume.ras_to_canonical(corners), volume.shape)
    except BoxOutside as outside:
        ras_lo, ras_hi = volume.ras_extent()
        raise MedSAMError(
            f"The box from RAS {_fmt_point(a)} to {_fmt_point(b)} mm lies outside the volume "
            f"(along {_RAS_AXIS_NAMES[outside.axis]}); the volume spans RAS {_fmt_point(ras_lo)} to "
            f"{_fmt_point(ras_hi)} mm. Draw the box on this volume."
        ) from None
    return (first[0], first[1], first[2], last[0], last[1], last[2])


def ijk_box_to_canonical(volume: Volume, i0: int, j0: int, k0: int, i1: int, j1: int, k1: int) -> Box3D:
    """A box in the input file's voxel indices (inclusive) -> canonical box ``(x0, y0, z0, x1, y1, z1)``.

    Corners may come in any order; the result is sorted per axis after flips.

    Raises:
        MedSAMError: an index is not an integer or lies outside the volume (the message names the
            valid range).
    """
    values = {"i0": i0, "j0": j0, "k0": k0, "i1": i1, "j1": j1, "k1": k1}
    ints = {}
    for name, v in values.items():
        try:
            ints[name] = int(operator.index(v))
        except TypeError:
            if isinstance(v, float) and v.is_integer():
                ints[name] = int(v)
            else:
                raise MedSAMError(f"Box index {name}={v!r} must be a whole number (a voxel index).") from None
    shape = volume.orientation.shape_ijk
    for name, v in ints.items():
        axis = "ijk".index(name[0])
        if not 0 <= v <= shape[axis] - 1:
            raise MedSAMError(
                f"Box index {name}={v} is outside the volume: {name[0]} must be in 0..{shape[axis] - 1} "
                f"(the file is {shape[0]}x{shape[1]}x{shape[2]} voxels, indices inclusive)."
            )
    p = volume.orientation.ijk_to_canonical((ints["i0"], ints["j0"], ints["k0"]))
    q = volume.orientation.ijk_to_canonical((ints["i1"], ints["j1"], ints["k1"]))
    lo = [min(p[c], q[c]) for c in range(3)]
    hi = [max(p[c], q[c]) for c in range(3)]
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _itk_write(image: sitk.Image, tmp: Path) -> None:
    try:
        with quiet_itk() as native:
            sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as exc:
        raise OSError(sitk_reason(exc, native)) from None


def _as_labels(labels_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    arr = volume.orientation.check_canonical(labels_zyx, "labelmap")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise MedSAMError(
            f"A labelmap must hold booleans or whole-number labels; got {arr.dtype}. Threshold "
            "probabilities first (e.g. mask = prob > 0.5)."
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise MedSAMError(
            f"Labels must be in 0..255 to be written as uint8; got {int(arr.min())}..{int(arr.max())}."
        )
    return arr.astype(np.uint8)


def write_labelmap(labels_zyx: np.ndarray, volume: Volume, path: PathLike, overwrite: bool = True) -> Path:
    """Write a canonical mask or labelmap on the volume's exact grid.

    Args:
        labels_zyx: bool mask or integer labels (0..255), shape ``volume.shape`` = ``(nz, ny, nx)``.
        volume: the volume the labels belong to; its grid (size, spacing, origin, direction) and
            voxel order are used for the file.
        path: ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (uint8 labels), or ``.seg.nrrd`` (a Slicer
            segmentation with one segment per non-zero label, named ``Segment_<label>`` and keeping
            the label values).  The parent folder is created.
        overwrite: replace an existing file; when false, an existing file (even one that appears
            while this is written) is left as it is and :class:`MedSAMError` is raised.

    Returns:
        The written path.

    Raises:
        MedSAMError: wrong shape, non-integer or out-of-range labels, unsupported extension, the
            volume's own file, or an unwritable destination (see :func:`~MedSAMSlicerLib.fileio.atomic.check_output`).  Nothing
            is left behind on failure.
    """
    p = check_output(path, overwrite, inputs=[volume.path] if volume.path is not None else [],
                     formats=LABELMAP_EXTENSIONS)
    labels = _as_labels(labels_zyx, volume)
    labels_kji = volume.orientation.from_canonical(labels)
    if split_extension(p.name)[1].lower() == ".seg.nrrd":
        return write_label_values(labels_kji, volume.image, p, overwrite)

    image = sitk.GetImageFromArray(labels_kji)
    image.CopyInformation(volume.image)
    atomic_write(p, lambda tmp: _itk_write(image, tmp), overwrite)
    return p
