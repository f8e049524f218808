"""The canonical axial order, and how a volume's own voxel axes map onto it.

The engine works on arrays of shape ``(z, y, x)``: ``x`` runs toward the patient's Left, ``y``
toward Posterior, ``z`` toward Superior (the LPS voxel order of DICOM). A file (SimpleITK) or a
Slicer volume node indexes its voxels ``(i, j, k)`` (numpy shape ``(k, j, i)``);
:class:`AxialOrientation` maps between the two by an axis permutation and flips only, never by
resampling, so every canonical voxel is exactly one voxel of the volume. "Axial" is the voxel
plane closest to the patient's axial plane, whatever the direction matrix (flipped, permuted,
oblique, acquired sagittally). Used by ``volumes.py`` (files) and the MRML bridge (volume nodes).

Plain numpy (SimpleITK only for :meth:`AxialOrientation.from_image`).
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

import numpy as np

from ..errors import MedSAMError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: LPS <-> RAS: flip the first two axes.
LPS_RAS_SIGN = np.array([-1.0, -1.0, 1.0])
#: How index axes are named to users (their viewer shows them).
INDEX_NAMES = ("i", "j", "k")


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
        return cls.from_lps_direction(LPS_RAS_SIGN[:, None] * matrix, shape_ijk)

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
            parts.append(f"{name} <- {sign}{INDEX_NAMES[self.axes[c]]}")
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

    def check_canonical(self, array: np.ndarray, what: str = "array") -> np.ndarray:
        """``array`` if it has the canonical shape ``(nz, ny, nx)``, else :class:`MedSAMError` saying
        that results must be on the volume's own grid (``what`` names it: "labelmap", "mask of ...")."""
        arr = np.asarray(array)
        if arr.shape != self.canonical_shape:
            raise MedSAMError(
                f"The {what} has shape {arr.shape} but the volume's canonical shape (z, y, x) is "
                f"{self.canonical_shape}; results must be on the volume's own grid."
            )
        return arr

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

    def slice_to_index(self, z: int) -> Tuple[str, int]:
        """Canonical slice ``z`` -> the file's index axis along it and the index there, e.g.
        ``("k", 21)``: how a slice is named to the user (their viewer shows file indices)."""
        axis = self.axes[2]
        n = self.shape_ijk[axis]
        return INDEX_NAMES[axis], (n - 1 - int(z)) if self.flips[2] else int(z)

    def name_slices(self, text: str) -> str:
        """An engine message with its canonical slices named as the file's indices
        (:func:`name_slices` with :meth:`slice_to_index`)."""
        return name_slices(text, self.slice_to_index)

    def canonical_spacing(self, spacing_ijk: Sequence[float]) -> Tuple[float, float, float]:
        """Voxel spacing ``(si, sj, sk)`` in file order -> ``(sx, sy, sz)`` in canonical order (mm)."""
        s = [float(v) for v in spacing_ijk]
        return (s[self.axes[0]], s[self.axes[1]], s[self.axes[2]])


def name_slices(text: str, slice_to_index: Callable[[int], Tuple[str, int]]) -> str:
    """An engine message with its canonical slice numbers named as the file's indices:
    ``"stopped at slice 68"`` -> ``"stopped at slice k 43"``; ``"slices 91..92"``,
    ``"between 96..106"`` and ``"the pass from 90"`` likewise (a range kept ascending). Other
    numbers (areas, grey levels, counts) are left alone.

    Args:
        text: the message (a stop reason, a key such as ``"between 96..106"``).
        slice_to_index: canonical ``z`` -> ``(axis, index)``, e.g. ``("k", 21)``
            (:meth:`AxialOrientation.slice_to_index`).
    """

    def one(z: str) -> str:
        axis, index = slice_to_index(int(z))
        return f"{axis} {index}"

    def span(a: str, b: str) -> str:
        (axis, i), (_, j) = slice_to_index(int(a)), slice_to_index(int(b))
        return f"{axis} {min(i, j)}..{max(i, j)}"

    text = _SLICE_SPAN.sub(lambda m: f"{m.group(1)} {span(m.group(2), m.group(3))}", text)
    return _ONE_SLICE.sub(lambda m: f"{m.group(1)} {one(m.group(2))}", text)


#: Where engine messages name slices (:func:`name_slices`).
_SLICE_SPAN = re.compile(r"\b(slices|between) (\d+)\.\.(\d+)\b")
_ONE_SLICE = re.compile(r"\b(slice|pass from) (\d+)\b")


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
