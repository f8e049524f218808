"""Reading volumes, mapping them to the engine's canonical axial order, and writing results.

Conventions (see ``docs/CONTRACT.md``):

* A file's voxels are indexed ``(i, j, k)``; SimpleITK and Slicer hand them to numpy as arrays of
  shape ``(k, j, i)``.
* The engine works on *canonical* arrays of shape ``(z, y, x)``: ``x`` runs toward the patient's
  Left, ``y`` toward Posterior, ``z`` toward Superior (the LPS voxel order of DICOM).
  :class:`AxialOrientation` maps between the two by an axis permutation and flips only, never by
  resampling, so every canonical voxel is exactly one file voxel.
* SimpleITK's physical space is LPS; Slicer's is RAS = ``(-L, -P, S)``.  RAS <-> index conversion
  happens here (for files) and in the Slicer bridge (for MRML nodes), nowhere else.
* Boxes are ``(x0, y0, z0, x1, y1, z1)`` in canonical voxel indices, inclusive.

Results are always written on the input's exact grid (same size, spacing, origin, direction), to a
temporary file in the destination folder that is then renamed, so a failed write never leaves a
half-written output behind.

This module is plain Python over numpy and SimpleITK: it never imports Slicer, Qt or VTK.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import math
import operator
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import MedSAMError

PathLike = Union[str, "os.PathLike[str]"]
Box3D = Tuple[int, int, int, int, int, int]
Segment = Tuple[str, np.ndarray, Tuple[float, float, float]]

__all__ = [
    "AxialOrientation",
    "Volume",
    "read_volume",
    "ras_to_canonical_index",
    "canonical_index_to_ras",
    "ras_box_to_canonical",
    "ijk_box_to_canonical",
    "write_labelmap",
    "write_seg_nrrd",
    "LABELMAP_EXTENSIONS",
]

#: File extensions :func:`write_labelmap` writes (``.seg.nrrd`` goes to :func:`write_seg_nrrd`).
LABELMAP_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")

_LPS_RAS_SIGN = np.array([-1.0, -1.0, 1.0])
_CANONICAL_NAMES = ("x (toward Left)", "y (toward Posterior)", "z (toward Superior)")
_INDEX_NAMES = ("i", "j", "k")
_IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_SUPPORTED_INPUTS = (
    "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
    "or a folder holding one DICOM series"
)
# Distinct colours (RGB in 0..1) for segments written without an explicit colour.
_DEFAULT_COLORS = (
    (0.945, 0.839, 0.569),
    (0.847, 0.396, 0.310),
    (0.565, 0.933, 0.565),
    (0.416, 0.600, 0.839),
    (0.863, 0.706, 0.886),
    (0.988, 0.667, 0.247),
    (0.502, 0.682, 0.502),
    (0.737, 0.416, 0.196),
    (0.298, 0.749, 0.792),
    (0.933, 0.510, 0.655),
    (0.710, 0.710, 0.314),
    (0.600, 0.450, 0.800),
)
_DICOM_TAG = re.compile(r"^[0-9a-fA-F]{4}\|[0-9a-fA-F]{4}$")


# --------------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxialOrientation:
    """How a file's ``(i, j, k)`` voxel axes map onto the canonical ``(x, y, z)`` axes.

    Canonical ``x`` runs toward patient Left, ``y`` toward Posterior, ``z`` toward Superior.
    For each canonical axis ``c`` (0 = x, 1 = y, 2 = z), ``axes[c]`` is the index axis
    (0 = i, 1 = j, 2 = k) most aligned with it and ``flips[c]`` says whether that index axis runs
    the opposite way (then canonical coordinate = ``n - 1 - index``).  The permutation is chosen
    jointly over the six possible ones, maximising the summed ``|cos|`` between each index axis
    and its canonical axis, so flipped, permuted (sagittal or coronal acquisitions) and oblique
    volumes (up to 45 degrees; an exact 45-degree tie goes to the unpermuted order) all map to an
    axial-first array without resampling.

    Build it with :meth:`from_lps_direction` (SimpleITK's ``GetDirection()``),
    :meth:`from_ras_direction` (Slicer's IJKToRAS directions) or :meth:`from_image`.

    Attributes:
        axes: ``axes[c]`` = index axis (0 = i, 1 = j, 2 = k) along canonical axis ``c``.
        flips: ``flips[c]`` = True when that index axis points against canonical axis ``c``.
        shape_ijk: ``(ni, nj, nk)``, the file's size in SimpleITK's order.
        direction_lps: unit direction columns of the i, j, k axes in LPS, as a row-major 3x3.
    """

    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    shape_ijk: Tuple[int, int, int]
    direction_lps: Tuple[Tuple[float, float, float], Tuple[float, float, float], Tuple[float, float, float]]

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_lps_direction(cls, direction: Sequence, shape_ijk: Sequence[int]) -> AxialOrientation:
        """Build from a direction matrix in LPS.

        Args:
            direction: 3x3 matrix (nested or flat row-major, as ``sitk.Image.GetDirection()``)
                whose COLUMNS are the directions of the i, j, k index axes in LPS.  Columns may
                include the spacing (they are normalised).
            shape_ijk: ``(ni, nj, nk)``, the image size in SimpleITK order (``GetSize()``).
        """
        matrix = _direction_matrix(direction)
        shape = tuple(int(operator.index(n)) for n in shape_ijk)
        if len(shape) != 3 or min(shape) < 1:
            raise MedSAMError(f"Volume size must be three positive numbers (i, j, k); got {tuple(shape_ijk)}.")
        best: Optional[Tuple[int, ...]] = None
        best_score = -1.0
        for perm in itertools.permutations(range(3)):
            score = sum(abs(matrix[c, perm[c]]) for c in range(3))
            if score > best_score + 1e-9:
                best, best_score = perm, score
        assert best is not None
        axes = (best[0], best[1], best[2])
        flips = tuple(bool(matrix[c, axes[c]] < 0) for c in range(3))
        rows = tuple(tuple(float(v) for v in row) for row in matrix)
        return cls(axes=axes, flips=flips, shape_ijk=shape, direction_lps=rows)  # type: ignore[arg-type]

    @classmethod
    def from_ras_direction(cls, direction: Sequence, shape_ijk: Sequence[int]) -> AxialOrientation:
        """Build from a direction matrix in RAS (e.g. the 3x3 part of Slicer's IJKToRAS).

        Args:
            direction: 3x3 matrix (nested or flat row-major) whose COLUMNS are the directions of
                the i, j, k index axes in RAS.  Columns may include the spacing.
            shape_ijk: ``(ni, nj, nk)``.
        """
        matrix = _direction_matrix(direction)
        return cls.from_lps_direction(_LPS_RAS_SIGN[:, None] * matrix, shape_ijk)

    @classmethod
    def from_image(cls, image: sitk.Image) -> AxialOrientation:
        """Build from a 3D SimpleITK image's direction and size."""
        return cls.from_lps_direction(image.GetDirection(), image.GetSize())

    # -- shapes --------------------------------------------------------------------------------

    @property
    def shape_kji(self) -> Tuple[int, int, int]:
        """Shape of the file's numpy array, ``(nk, nj, ni)``."""
        ni, nj, nk = self.shape_ijk
        return (nk, nj, ni)

    @property
    def canonical_shape(self) -> Tuple[int, int, int]:
        """Shape of canonical arrays, ``(nz, ny, nx)`` (numpy order, axial slice first)."""
        n = self.shape_ijk
        return (n[self.axes[2]], n[self.axes[1]], n[self.axes[0]])

    @property
    def obliqueness_degrees(self) -> float:
        """Largest angle, in degrees, between an index axis and the canonical axis it maps to.

        0 for volumes aligned with the patient axes (flips and permutations included); callers
        may warn above a degree or so, since canonical slices are then tilted planes.
        """
        matrix = np.asarray(self.direction_lps)
        cosines = [min(1.0, abs(matrix[c, self.axes[c]])) for c in range(3)]
        return float(max(math.degrees(math.acos(v)) for v in cosines))

    def describe(self) -> str:
        """One line such as ``"x <- -i, y <- -j, z <- k"`` (a minus means flipped)."""
        parts = []
        for c, name in enumerate("xyz"):
            sign = "-" if self.flips[c] else ""
            parts.append(f"{name} <- {sign}{_INDEX_NAMES[self.axes[c]]}")
        return ", ".join(parts)

    # -- arrays --------------------------------------------------------------------------------

    @property
    def _to_canonical_transpose(self) -> Tuple[int, int, int]:
        # Output numpy axis n holds canonical axis c = 2 - n, i.e. index axis axes[c], which is
        # numpy axis 2 - axes[c] of a (k, j, i) array.
        return tuple(2 - self.axes[2 - n] for n in range(3))  # type: ignore[return-value]

    @property
    def _canonical_flip_slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(None, None, -1) if self.flips[2 - n] else slice(None) for n in range(3))  # type: ignore[return-value]

    def to_canonical(self, array_kji: np.ndarray) -> np.ndarray:
        """File array ``(nk, nj, ni)`` (as SimpleITK/Slicer give it) -> canonical ``(nz, ny, nx)``.

        Returns a C-contiguous array of the same dtype (a copy unless no change was needed).
        """
        array = np.asarray(array_kji)
        if array.shape != self.shape_kji:
            raise MedSAMError(
                f"Array shape {array.shape} does not match the volume: expected (k, j, i) = {self.shape_kji}."
            )
        out = np.transpose(array, self._to_canonical_transpose)[self._canonical_flip_slices]
        return np.ascontiguousarray(out)

    def from_canonical(self, array_zyx: np.ndarray) -> np.ndarray:
        """Canonical array ``(nz, ny, nx)`` -> file array ``(nk, nj, ni)``; exact inverse of
        :meth:`to_canonical`.  Returns a C-contiguous array of the same dtype."""
        array = np.asarray(array_zyx)
        if array.shape != self.canonical_shape:
            raise MedSAMError(
                f"Array shape {array.shape} does not match the volume: expected canonical "
                f"(z, y, x) = {self.canonical_shape}."
            )
        inverse = tuple(int(a) for a in np.argsort(self._to_canonical_transpose))
        out = np.transpose(array[self._canonical_flip_slices], inverse)
        return np.ascontiguousarray(out)

    # -- indices -------------------------------------------------------------------------------

    def ijk_to_canonical(self, ijk: Sequence[int]) -> Tuple[int, int, int]:
        """File voxel index ``(i, j, k)`` -> canonical voxel index ``(x, y, z)`` (integers).

        A flipped axis maps ``v`` to ``n - 1 - v``.  No range check (see
        :func:`ijk_box_to_canonical` for a checked box).
        """
        values = [int(operator.index(v)) for v in ijk]
        out = []
        for c in range(3):
            a = self.axes[c]
            v = values[a]
            out.append(self.shape_ijk[a] - 1 - v if self.flips[c] else v)
        return (out[0], out[1], out[2])

    def canonical_to_ijk(self, xyz: Sequence[int]) -> Tuple[int, int, int]:
        """Canonical voxel index ``(x, y, z)`` -> file voxel index ``(i, j, k)`` (integers)."""
        values = [int(operator.index(v)) for v in xyz]
        out = [0, 0, 0]
        for c in range(3):
            a = self.axes[c]
            v = values[c]
            out[a] = self.shape_ijk[a] - 1 - v if self.flips[c] else v
        return (out[0], out[1], out[2])

    def ijk_points_to_canonical(self, points_ijk: np.ndarray) -> np.ndarray:
        """Continuous file indices, shape ``(N, 3)`` as ``(i, j, k)`` -> ``(N, 3)`` as ``(x, y, z)``.

        Voxel centres are at integer coordinates, so a flip maps ``v`` to ``n - 1 - v``.
        """
        pts = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
        out = np.empty_like(pts)
        for c in range(3):
            a = self.axes[c]
            out[:, c] = self.shape_ijk[a] - 1 - pts[:, a] if self.flips[c] else pts[:, a]
        return out

    def canonical_points_to_ijk(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous canonical indices ``(N, 3)`` as ``(x, y, z)`` -> ``(N, 3)`` as ``(i, j, k)``."""
        pts = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
        out = np.empty_like(pts)
        for c in range(3):
            a = self.axes[c]
            out[:, a] = self.shape_ijk[a] - 1 - pts[:, c] if self.flips[c] else pts[:, c]
        return out

    def canonical_spacing(self, spacing_ijk: Sequence[float]) -> Tuple[float, float, float]:
        """Voxel spacing ``(si, sj, sk)`` in file order -> ``(sx, sy, sz)`` in canonical order (mm)."""
        s = [float(v) for v in spacing_ijk]
        return (s[self.axes[0]], s[self.axes[1]], s[self.axes[2]])


def _direction_matrix(direction: Sequence) -> np.ndarray:
    """A 3x3 matrix with unit columns from a nested or flat row-major direction."""
    try:
        matrix = np.asarray(direction, dtype=float)
        matrix = matrix.reshape(3, 3)
    except (TypeError, ValueError) as exc:
        raise MedSAMError(f"A direction matrix must be 3x3 (9 numbers); got {direction!r}.") from exc
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(norms < 1e-12):
        raise MedSAMError(f"The direction matrix {matrix.tolist()} has a zero or invalid column.")
    matrix = matrix / norms
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise MedSAMError(f"The direction matrix {matrix.tolist()} is singular: two voxel axes are parallel.")
    return matrix


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

    @classmethod
    def from_image(
        cls, image: sitk.Image, path: Optional[PathLike] = None, notes: Optional[List[str]] = None
    ) -> Volume:
        """Wrap a SimpleITK image (3D, one component) as a canonical :class:`Volume`.

        A 4D image with a single frame is reduced to 3D; other layouts raise :class:`MedSAMError`.
        """
        source = f"'{path}'" if path is not None else "The image"
        _check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
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


def read_volume(path: PathLike) -> Volume:
    """Read a 3D scalar volume and put it in canonical ``(z, y, x)`` order.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
            ``.mhd``) file, or a folder with DICOM files (the series with the most files is read;
            a note says so when there are several).  A single DICOM file reads the whole series
            it belongs to.

    Returns:
        A :class:`Volume` whose ``array`` is ``(nz, ny, nx)`` in the file's voxel type.

    Raises:
        MedSAMError: missing path, not an image, a 2D image, a 4D or multi-component image, an
            empty folder or a folder without DICOM files.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MedSAMError(f"Input not found: '{p}'. Check the path; give {_SUPPORTED_INPUTS}.")
    notes: List[str] = []
    if p.is_dir():
        image = _read_dicom_folder(p, notes)
    else:
        image = _read_image_file(p, notes)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return Volume.from_image(image, p, notes)


def _check_layout(dimension: int, size: Sequence[int], components: int, pixel_type: str, source: str) -> None:
    """Refuse anything but a 3D single-component image (a 4D image with one frame is allowed)."""
    size = list(size)
    dims = "x".join(str(n) for n in size)
    if components != 1:
        raise MedSAMError(
            f"{source} has {components} components per voxel ({pixel_type}, size {dims}), e.g. colour "
            "(RGB) or a vector field; MedSAM needs a single-channel (scalar) volume. Extract one channel "
            "first, e.g. with SimpleITK `sitk.VectorIndexSelectionCast(image, 0)` or Slicer's "
            "'Vector to Scalar Volume' module, and save it as a new file."
        )
    if dimension == 2:
        raise MedSAMError(
            f"MedSAM needs a 3D volume; got a 2D image of size {dims} from {source}. Give the 3D volume "
            "(for DICOM, the folder holding all slices of the series)."
        )
    if dimension == 4:
        if size[3] == 1:
            return
        raise MedSAMError(
            f"{source} is a 4D image ({'x'.join(str(n) for n in size[:3])} voxels with {size[3]} frames or "
            "time points); MedSAM needs one 3D volume. Extract one frame first, e.g. with SimpleITK "
            f"`sitk.Extract(image, [{size[0]}, {size[1]}, {size[2]}, 0], [0, 0, 0, frame])` or Slicer's "
            "Sequences module, and save it as a new file."
        )
    if dimension != 3:
        raise MedSAMError(f"MedSAM needs a 3D volume; {source} is a {dimension}D image of size {dims}.")


def _sitk_reason(exc: BaseException) -> str:
    """The useful line of a SimpleITK exception message."""
    text = str(exc)
    if "sitk::ERROR:" in text:
        text = text.split("sitk::ERROR:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's 'No Series were found') for a moment."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _read_image_file(p: Path, notes: List[str]) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedSAMError(
            f"'{p}' is not an image file that can be read ({_sitk_reason(exc)}). Give {_SUPPORTED_INPUTS}."
        ) from exc
    source = f"'{p}'"
    is_dicom = any(_DICOM_TAG.match(key) for key in reader.GetMetaDataKeys())
    if is_dicom:
        series = _dicom_series_of_file(p)
        if series is not None and len(series) > 1:
            notes.append(
                f"'{p.name}' is one DICOM slice; read the whole series it belongs to "
                f"({len(series)} files in '{p.parent}')."
            )
            return _read_dicom_files(series, f"The DICOM series in '{p.parent}'")
    _check_layout(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                  sitk.GetPixelIDValueAsString(reader.GetPixelID()), source)
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise MedSAMError(
            f"{source} could not be read ({_sitk_reason(exc)}); the file may be truncated or corrupt. "
            "Re-export it and try again."
        ) from exc


def _dicom_series_of_file(p: Path) -> Optional[List[str]]:
    folder = str(p.parent)
    target = os.path.realpath(str(p))
    with _quiet_itk():
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_id))
            if any(os.path.realpath(f) == target for f in files):
                return files
    return None


def _read_dicom_folder(folder: Path, notes: List[str]) -> sitk.Image:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise MedSAMError(f"Folder '{folder}' cannot be listed ({exc}). Check its permissions.") from exc
    if not entries:
        raise MedSAMError(
            f"Folder '{folder}' is empty. Point to a folder holding the DICOM files of one series, "
            "or to an image file (NIfTI, NRRD, MHA)."
        )
    with _quiet_itk():
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        hints = []
        images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)]
        if images:
            hints.append(f" It holds image files such as '{images[0]}': give that file's path instead.")
        if any(e.is_dir() for e in entries):
            hints.append(" Subfolders are not searched: point to the folder that holds the DICOM slices.")
        raise MedSAMError(
            f"Folder '{folder}' holds no DICOM series (none of its files could be read as DICOM)."
            + "".join(hints)
            + f" Give {_SUPPORTED_INPUTS}."
        )
    with _quiet_itk():
        series = [
            (sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in series_ids
        ]
    series.sort(key=lambda item: -len(item[1]))
    chosen_id, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"'{sid}' ({len(f)} files)" for sid, f in series[1:])
        notes.append(
            f"Folder '{folder}' holds {len(series)} DICOM series; reading '{chosen_id}' ({len(files)} files), "
            f"the one with the most files. Others: {others}. To read another, put its files in a folder of "
            "their own."
        )
    return _read_dicom_files(files, f"The DICOM series in '{folder}'")


def _read_dicom_files(files: List[str], source: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise MedSAMError(
            f"{source} could not be read ({_sitk_reason(exc)}). Check that the files are complete; "
            "compressed DICOM needs a SimpleITK build with the matching codec."
        ) from exc
    _check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                  image.GetPixelIDTypeAsString(), source)
    return image


# --------------------------------------------------------------------------------------------
# Coordinates and boxes
# --------------------------------------------------------------------------------------------


def ras_to_canonical_index(volume: Volume, ras_points: np.ndarray) -> np.ndarray:
    """RAS points in mm -> continuous canonical voxel coordinates ``(x, y, z)``.

    Args:
        volume: the volume whose grid is used.
        ras_points: shape ``(3,)`` or ``(N, 3)``, ``(R, A, S)`` in mm (Slicer's world).

    Returns:
        Same shape as the input: ``(x, y, z)`` with voxel centres at integers (not rounded, not
        clipped).
    """
    pts = np.asarray(ras_points, dtype=float)
    if pts.shape[-1:] != (3,) or pts.ndim > 2:
        raise MedSAMError(f"RAS points must have shape (3,) or (N, 3); got {pts.shape}.")
    lps = pts.reshape(-1, 3) * _LPS_RAS_SIGN
    ijk = np.array([volume.image.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in lps],
                   dtype=float).reshape(-1, 3)
    xyz = volume.orientation.ijk_points_to_canonical(ijk)
    return xyz.reshape(pts.shape)


def canonical_index_to_ras(volume: Volume, xyz_points: np.ndarray) -> np.ndarray:
    """Continuous canonical voxel coordinates ``(x, y, z)`` -> RAS points in mm.

    Args:
        volume: the volume whose grid is used.
        xyz_points: shape ``(3,)`` or ``(N, 3)``.

    Returns:
        Same shape as the input, ``(R, A, S)`` in mm.
    """
    pts = np.asarray(xyz_points, dtype=float)
    if pts.shape[-1:] != (3,) or pts.ndim > 2:
        raise MedSAMError(f"Canonical points must have shape (3,) or (N, 3); got {pts.shape}.")
    ijk = volume.orientation.canonical_points_to_ijk(pts.reshape(-1, 3))
    lps = np.array([volume.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in ijk],
                   dtype=float).reshape(-1, 3)
    return (lps * _LPS_RAS_SIGN).reshape(pts.shape)


def _ras_extent(volume: Volume) -> Tuple[np.ndarray, np.ndarray]:
    """RAS bounding box of the volume's voxel centres."""
    nz, ny, nx = volume.shape
    corners = np.array(list(itertools.product((0, nx - 1), (0, ny - 1), (0, nz - 1))), dtype=float)
    ras = canonical_index_to_ras(volume, corners)
    return ras.min(axis=0), ras.max(axis=0)


def _fmt_point(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in p) + ")"


def ras_box_to_canonical(volume: Volume, ras_corner_a: Sequence[float], ras_corner_b: Sequence[float]) -> Box3D:
    """An RAS-aligned box (two opposite corners, mm) -> canonical voxel box, inclusive.

    The box holds the voxels whose centres lie inside it (with a 0.001-voxel tolerance, so corners
    placed on voxel centres include those voxels).  Along an axis where the box is thinner than a
    voxel (e.g. a flat box drawn on one slice), the voxel nearest to its middle is taken.  For an
    oblique volume, the eight corners are mapped and their canonical bounding box is used.

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
    xyz = ras_to_canonical_index(volume, corners)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    n_xyz = volume.shape[::-1]
    tol = 1e-3
    first, last = [], []
    for c in range(3):
        f = math.ceil(lo[c] - tol)
        la = math.floor(hi[c] + tol)
        if f > la:
            f = la = int(round((lo[c] + hi[c]) / 2.0))
        if la < 0 or f > n_xyz[c] - 1:
            ras_lo, ras_hi = _ras_extent(volume)
            raise MedSAMError(
                f"The box from RAS {_fmt_point(a)} to {_fmt_point(b)} mm lies outside the volume "
                f"(along {_CANONICAL_NAMES[c]}); the volume spans RAS {_fmt_point(ras_lo)} to "
                f"{_fmt_point(ras_hi)} mm. Draw the box on this volume."
            )
        first.append(max(f, 0))
        last.append(min(la, n_xyz[c] - 1))
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


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in (".seg.nrrd", ".nii.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _output_path(path: PathLike) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        raise MedSAMError(f"Output '{p}' is a folder; give a file name such as '{p / 'mask.nii.gz'}'.")
    return p


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file beside ``path``, then rename it."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSAMError(f"Cannot create the output folder '{parent}' ({exc}). Choose a writable location.") from exc
    ext = _extension(path)
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    tmp = parent / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        raise MedSAMError(
            f"Could not write '{path}' ({_sitk_reason(exc)}). Check that the folder is writable and has free space."
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def _check_canonical(array: np.ndarray, volume: Volume, what: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.shape != volume.shape:
        raise MedSAMError(
            f"The {what} has shape {arr.shape} but the volume's canonical shape (z, y, x) is {volume.shape}; "
            "results must be on the volume's own grid."
        )
    return arr


def _as_labels(labels_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    arr = _check_canonical(labels_zyx, volume, "labelmap")
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


def write_labelmap(labels_zyx: np.ndarray, volume: Volume, path: PathLike) -> Path:
    """Write a canonical mask or labelmap on the volume's exact grid.

    Args:
        labels_zyx: bool mask or integer labels (0..255), shape ``volume.shape`` = ``(nz, ny, nx)``.
        volume: the volume the labels belong to; its grid (size, spacing, origin, direction) and
            voxel order are used for the file.
        path: ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (uint8 labels), or ``.seg.nrrd`` (a Slicer
            segmentation with one segment per non-zero label, named ``Segment_<label>`` and keeping
            the label values).  The parent folder is created.

    Returns:
        The written path.

    Raises:
        MedSAMError: wrong shape, non-integer or out-of-range labels, unsupported extension, or an
            unwritable destination.  Nothing is left behind on failure.
    """
    p = _output_path(path)
    ext = _extension(p)
    if ext not in LABELMAP_EXTENSIONS:
        raise MedSAMError(
            f"Cannot write a labelmap to '{p.name}': use one of {', '.join(LABELMAP_EXTENSIONS)} "
            "(.mhd is not supported because it writes two files)."
        )
    labels = _as_labels(labels_zyx, volume)
    labels_kji = volume.orientation.from_canonical(labels)
    if ext == ".seg.nrrd":
        values = [int(v) for v in np.unique(labels_kji) if v != 0]
        infos = [
            _SegmentInfo(f"Segment_{v}", _DEFAULT_COLORS[n % len(_DEFAULT_COLORS)], 0, v, _extent(labels_kji == v))
            for n, v in enumerate(values)
        ]
        _atomic_write(p, lambda tmp: _write_seg_nrrd_file(tmp, [labels_kji], infos, volume.image))
        return p

    image = sitk.GetImageFromArray(labels_kji)
    image.CopyInformation(volume.image)
    _atomic_write(p, lambda tmp: sitk.WriteImage(image, str(tmp), True))
    return p


@dataclass(frozen=True)
class _SegmentInfo:
    name: str
    color: Tuple[float, float, float]
    layer: int
    label: int
    extent: Tuple[int, int, int, int, int, int]  # i0 i1 j0 j1 k0 k1 (Slicer's order); empty: 0 -1 ...


def _extent(mask_kji: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    """Slicer's segment extent ``(i0, i1, j0, j1, k0, k1)`` of a (k, j, i) mask; empty -> 0 -1 ..."""
    if not mask_kji.any():
        return (0, -1, 0, -1, 0, -1)
    out: List[int] = []
    for numpy_axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != numpy_axis)
        hits = np.flatnonzero(mask_kji.any(axis=other))
        out += [int(hits[0]), int(hits[-1])]
    return (out[0], out[1], out[2], out[3], out[4], out[5])


def _check_color(color: Sequence[float], name: str) -> Tuple[float, float, float]:
    try:
        rgb = tuple(float(v) for v in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rgb):
        raise MedSAMError(
            f"Segment '{name}' has colour {color!r}; give three numbers in 0..1 (red, green, blue)."
        )
    return (rgb[0], rgb[1], rgb[2])


def write_seg_nrrd(segments: Sequence[Segment], volume: Volume, path: PathLike) -> Path:
    """Write segments as a Slicer segmentation file (``.seg.nrrd``) on the volume's exact grid.

    Args:
        segments: ``(name, mask_zyx, color_rgb)`` per segment: ``mask_zyx`` a bool array of shape
            ``volume.shape`` = ``(nz, ny, nx)`` (non-zero = inside), ``color_rgb`` three floats in
            0..1.  Segment IDs are ``Segment_1``, ``Segment_2``, ... in this order.
        volume: the volume the segments belong to.
        path: destination, normally ending in ``.seg.nrrd`` (``.nrrd`` is accepted too).

    The file is what Slicer writes: one shared 3D labelmap when no two segments overlap; when they
    do, a 4D NRRD (``kinds: list domain domain domain``) with as few layers as possible (each
    segment goes to the first layer it does not overlap), so no segment loses voxels.  Segments
    keep their order; label values count from 1 within each layer.  Header keys: ``SegmentN_ID``,
    ``_Name``, ``_Color``, ``_LabelValue``, ``_Layer``, ``_Extent``, ``_Tags`` and the
    ``Segmentation_*`` keys Slicer reads.

    Returns:
        The written path.

    Raises:
        MedSAMError: a mask of the wrong shape, a bad colour or name, a wrong extension or an
            unwritable destination.  Nothing is left behind on failure.
    """
    p = _output_path(path)
    if _extension(p) not in (".seg.nrrd", ".nrrd"):
        raise MedSAMError(f"A Slicer segmentation is written as '.seg.nrrd'; got '{p.name}'.")
    checked: List[Tuple[str, np.ndarray, Tuple[float, float, float]]] = []
    for n, segment in enumerate(segments):
        try:
            name, mask, color = segment
        except (TypeError, ValueError) as exc:
            raise MedSAMError(f"Segment {n} must be a (name, mask, colour) triple.") from exc
        name = " ".join(str(name).split())
        if not name:
            raise MedSAMError(f"Segment {n} has an empty name; give each segment a name.")
        mask_zyx = _check_canonical(mask, volume, f"mask of segment '{name}'").astype(bool, copy=False)
        checked.append((name, volume.orientation.from_canonical(mask_zyx), _check_color(color, name)))

    layers: List[np.ndarray] = []
    layer_counts: List[int] = []
    infos: List[_SegmentInfo] = []
    for name, mask_kji, color in checked:
        for index, layer in enumerate(layers):
            if layer_counts[index] < 255 and not np.any(layer[mask_kji]):
                break
        else:
            layers.append(np.zeros(volume.orientation.shape_kji, dtype=np.uint8))
            layer_counts.append(0)
            index = len(layers) - 1
        layer_counts[index] += 1
        label = layer_counts[index]
        layers[index][mask_kji] = label
        infos.append(_SegmentInfo(name, color, index, label, _extent(mask_kji)))
    if not layers:
        layers.append(np.zeros(volume.orientation.shape_kji, dtype=np.uint8))
    _atomic_write(p, lambda tmp: _write_seg_nrrd_file(tmp, layers, infos, volume.image))
    return p


def _num(v: float) -> str:
    value = float(v)
    if value == 0.0:
        return "0"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


_CONVERSION_PARAMETERS = (
    ("Collapse labelmaps", "1", "Merge the labelmaps into as few shared labelmaps as possible 1 = created "
     "labelmaps will be shared if possible without overwriting each other."),
    ("Compute surface normals", "1", "Compute surface normals. 1 (default) = surface normals are computed. "
     "0 = surface normals are not computed (slightly faster but produces less smooth surface display)."),
    ("Crop to reference image geometry", "0", "Crop the model to the extent of reference geometry. 0 (default) "
     "= created labelmap will contain the entire model. 1 = created labelmap extent will be within reference "
     "image extent."),
    ("Decimation factor", "0.0", "Desired reduction in the total number of polygons. Range: 0.0 (no "
     "decimation) to 1.0 (as much simplification as possible)."),
    ("Default slice thickness", "0.0", "Default thickness for contours if slice spacing cannot be calculated."),
    ("End capping", "1", "Create end cap to close surface inside contours on the top and bottom of the structure."),
    ("Fractional labelmap oversampling factor", "1", "Determines the oversampling of the reference image "
     "geometry. All segments are oversampled with the same value (value of 1 means no oversampling)."),
    ("Joint smoothing", "0", "Perform joint smoothing."),
    ("Oversampling factor", "1", "Determines the oversampling of the reference image geometry. If it's a "
     "number, then all segments are oversampled with the same value (value of 1 means no oversampling)."),
    ("Smoothing factor", "0.5", "Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing)."),
    ("Threshold fraction", "0.5", "Determines the threshold that the closed surface is created at as a "
     "fractional value between 0 and 1."),
)


def _write_seg_nrrd_file(path: Path, layers_kji: List[np.ndarray], infos: List[_SegmentInfo], image: sitk.Image) -> None:
    """Write a Slicer ``.seg.nrrd``: a gzip NRRD in LPS with the segmentation header keys."""
    ni, nj, nk = image.GetSize()
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    columns = direction * spacing  # column a = index axis a scaled by its spacing, in LPS
    origin = np.asarray(image.GetOrigin(), dtype=float)
    vectors = " ".join("(" + ",".join(_num(v) for v in columns[:, a]) + ")" for a in range(3))

    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _LPS_RAS_SIGN[:, None] * columns
    ijk_to_ras[:3, 3] = _LPS_RAS_SIGN * origin
    geometry = "".join(f"{_num(v)};" for v in ijk_to_ras.reshape(-1))
    geometry += "".join(f"{v};" for v in (0, ni - 1, 0, nj - 1, 0, nk - 1))
    parameters = list(_CONVERSION_PARAMETERS)
    parameters.insert(9, ("Reference image geometry", geometry, "Image geometry description string determining "
                          "the geometry of the labelmap that is created in course of conversion."))

    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", "type: unsigned char"]
    if len(layers_kji) == 1:
        data = np.ascontiguousarray(layers_kji[0], dtype=np.uint8)
        lines += ["dimension: 3", "space: left-posterior-superior", f"sizes: {ni} {nj} {nk}",
                  f"space directions: {vectors}", "kinds: domain domain domain"]
    else:
        data = np.ascontiguousarray(np.stack(layers_kji, axis=-1), dtype=np.uint8)  # (k, j, i, layer)
        lines += ["dimension: 4", "space: left-posterior-superior", f"sizes: {len(layers_kji)} {ni} {nj} {nk}",
                  f"space directions: none {vectors}", "kinds: list domain domain domain"]
    lines += ["encoding: gzip", "space origin: (" + ",".join(_num(v) for v in origin) + ")"]
    for n, info in enumerate(infos):
        lines += [
            f"Segment{n}_Color:=" + " ".join(_num(round(v, 6)) for v in info.color),
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_Extent:=" + " ".join(str(v) for v in info.extent),
            f"Segment{n}_ID:=Segment_{n + 1}",
            f"Segment{n}_LabelValue:={info.label}",
            f"Segment{n}_Layer:={info.layer}",
            f"Segment{n}_Name:={info.name}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Tags:=|",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_ConversionParameters:=" + "".join(f"{a}|{b}|{c}&" for a, b, c in parameters),
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(gzip.compress(data.tobytes(), compresslevel=6, mtime=0))
