"""Boxes: the prompt every front end builds, and the rules that turn corners into voxels.

One home for:

* :class:`BoxPrompt`: a 2D box ``(x0, y0, x1, y1)`` on canonical slice ``z``, optionally with a
  z-range that bounds 3D propagation (LiteMedSAM's 3D box).
* :func:`voxel_box`: continuous canonical points (RAS corners mapped by a file's or a volume
  node's geometry) -> the inclusive voxel box they enclose.
* :func:`middle_slice`: the slice a 3D box's 2D box goes on.
* :func:`structure_prompts`: one structure's boxes as given -> the prompts the engine runs (how a
  3D box combines with the structure's other boxes).

Plain numpy; the borders that know RAS (``volumes.py`` for files, ``MRMLBridge`` for MRML nodes)
map corners to canonical points and call :func:`voxel_box`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import MedSAMError

#: Which way 3D propagation goes from the box's slice: both ways, up (superior, z increasing) or
#: down (inferior).
DIRECTIONS = ("both", "up", "down")

#: What a box asks for: ``"3d"`` (the structure through the slices: the box's z-range, or an
#: automatic extent) or ``"2d"`` (the box's slice only).
MODES = ("3d", "2d")

#: Voxel centres within this fraction of a voxel of a box face count as inside.
TOLERANCE_VOXELS = 1e-3


def middle_slice(z0: int, z1: int) -> int:
    """The slice a 3D box's 2D box goes on: ``int((z1 - z0) / 2 + z0)`` for ``z0 <= z1``, as
    LiteMedSAM's 3D inference (the lower of the two middle slices when their count is even)."""
    lo, hi = sorted((int(z0), int(z1)))
    return int((hi - lo) / 2 + lo)


@dataclass(frozen=True)
class BoxPrompt:
    """A box in canonical voxel indices.

    Attributes:
        z: the slice the 2D box is on.
        box: ``(x0, y0, x1, y1)`` on that slice, inclusive.
        z_range: inclusive ``(z0, z1)`` bounding 3D propagation, or ``None`` (automatic extent).
    """

    z: int
    box: Tuple[int, int, int, int]
    z_range: Optional[Tuple[int, int]] = None

    @classmethod
    def from_voxel_box(cls, first: Sequence[int], last: Sequence[int]) -> BoxPrompt:
        """The prompt for an inclusive voxel box ``first = (x0, y0, z0)``, ``last = (x1, y1, z1)``:
        on one slice a 2D box there; over several slices a 3D box, its 2D box on the middle slice
        (:func:`middle_slice`) and its height as the z-range."""
        x0, y0, z0 = (int(v) for v in first)
        x1, y1, z1 = (int(v) for v in last)
        box = (x0, y0, x1, y1)
        if z0 == z1:
            return cls(z0, box)
        return cls(middle_slice(z0, z1), box, (min(z0, z1), max(z0, z1)))

    @property
    def box3d(self) -> Tuple[int, int, int, int, int, int]:
        """``(x0, y0, z0, x1, y1, z1)`` (the z-range, or the box's slice)."""
        z0, z1 = self.z_range if self.z_range is not None else (self.z, self.z)
        return (self.box[0], self.box[1], z0, self.box[2], self.box[3], z1)


class BoxOutside(Exception):
    """:func:`voxel_box`: the box misses the volume along canonical ``axis`` (0 x, 1 y, 2 z)."""

    def __init__(self, axis: int) -> None:
        super().__init__(f"the box lies outside the volume along canonical axis {axis}")
        self.axis = axis


def voxel_box(points_xyz: np.ndarray, shape_zyx: Sequence[int]) -> Tuple[List[int], List[int]]:
    """The inclusive voxel box ``(first, last)`` (each ``[x, y, z]``) enclosing continuous canonical
    points ``(N, 3)`` (voxel centres at integers), clipped to a volume of shape ``(z, y, x)``.

    The box holds the voxels whose centres lie inside (:data:`TOLERANCE_VOXELS`, so corners placed on
    voxel centres include those voxels). Along an axis where the box is thinner than a voxel (a flat
    box drawn on one slice) the voxel nearest its middle is taken.

    Raises:
        BoxOutside: the box misses the volume along an axis (the caller names it in its terms).
    """
    xyz = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    n_xyz = list(shape_zyx)[::-1]
    first, last = [], []
    for c in range(3):
        f = math.ceil(lo[c] - TOLERANCE_VOXELS)
        la = math.floor(hi[c] + TOLERANCE_VOXELS)
        if f > la:
            f = la = int(round((lo[c] + hi[c]) / 2.0))
        if la < 0 or f > n_xyz[c] - 1:
            raise BoxOutside(c)
        first.append(max(f, 0))
        last.append(min(la, n_xyz[c] - 1))
    return first, last


def _extent_text(prompt: BoxPrompt, slice_to_index: Callable[[int], Tuple[str, int]]) -> str:
    if prompt.z_range is None:
        axis, index = slice_to_index(prompt.z)
        return f"a flat box on {axis}={index}"
    (axis, i), (_, j) = (slice_to_index(z) for z in prompt.z_range)
    return f"a 3D box over {axis} {min(i, j)}..{max(i, j)}"


def structure_prompts(prompts: Sequence[BoxPrompt], where: Sequence[str],
                      slice_to_index: Callable[[int], Tuple[str, int]] = lambda z: ("slice", int(z))) -> List[BoxPrompt]:
    """One structure's boxes, as given, -> the prompts the engine runs
    (:meth:`Segmenter.segment_boxes <MedSAMSlicerLib.segmenter.Segmenter.segment_boxes>` takes one
    z-range for all of a structure's boxes, or none). Every front end (the command line, its
    replay, the Slicer bridge) uses this rule.

    The rule: a structure's 3D boxes (boxes over several slices) give its z-range, so all of them
    must cover the same slices; its flat boxes (one slice each) then take that z-range and must lie
    inside it. Without a 3D box the extent is found beyond the outermost boxes. So two 3D boxes over
    the same slices are the structure's pieces on their common middle slice; a 3D box with flat boxes
    on other slices gives key slices within its range (a small lesion whose extent the user knows).
    A flat box keeps its own slice (a record stores it flat, so a replay finds it again). The same
    box given twice is refused.

    Args:
        prompts: the boxes as given (:meth:`BoxPrompt.from_voxel_box`), at least one.
        where: how the user finds each box again in an error (``"box 2 ('vessels', --box-ijk)"``).
        slice_to_index: canonical ``z`` -> ``(axis, index)`` as the user's viewer numbers slices
            (``AxialOrientation.slice_to_index``).

    Returns:
        The prompts, in the order given; flat boxes carry the 3D boxes' z-range.

    Raises:
        MedSAMError: no box, or naming both boxes as the user gave them, with their slices.
    """
    if not prompts:
        raise MedSAMError("give at least one box")
    ranged = [(w, p) for w, p in zip(where, prompts) if p.z_range is not None]
    out = list(prompts)
    if ranged:
        w0, p0 = ranged[0]
        for w, p in ranged[1:]:
            if p.z_range != p0.z_range:
                raise MedSAMError(
                    f"{w0} and {w} are 3D boxes of one structure over different slices "
                    f"({_extent_text(p0, slice_to_index)}, {_extent_text(p, slice_to_index)}): a structure has one "
                    "z-range; give its 3D boxes the same slices, or draw its other boxes flat (one slice each)")
        lo, hi = p0.z_range
        for i, (w, p) in enumerate(zip(where, prompts)):
            if p.z_range is None:
                if not lo <= p.z <= hi:
                    raise MedSAMError(
                        f"{w} ({_extent_text(p, slice_to_index)}) lies outside the slices of {w0} "
                        f"({_extent_text(p0, slice_to_index)}), a 3D box of the same structure: its 3D box gives the "
                        "structure's z-range; draw the flat box inside it, or widen the 3D box")
                out[i] = BoxPrompt(p.z, p.box, p0.z_range)
    for i, prompt in enumerate(out):
        for j in range(i):
            if out[j] == prompt:
                raise MedSAMError(f"{where[j]} and {where[i]} are the same box; give each piece or key slice its own "
                                  "box")
    return out
