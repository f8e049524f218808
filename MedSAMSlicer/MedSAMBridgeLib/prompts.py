"""Boxes from RAS points, markups ROIs and rectangles drawn in slice views -> :class:`BoxPrompt`
in canonical voxels, by the engine's one rule (:func:`MedSAMSlicerLib.boxes.voxel_box`)."""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import numpy as np

from MedSAMSlicerLib.boxes import BoxOutside, BoxPrompt, voxel_box
from MedSAMSlicerLib.errors import MedSAMError

from .sources import SourceVolume

#: A box drawn in a slice view whose normal is tilted more than this from the volume's axial
#: voxel axis is refused. About 10 degrees, so that a box drawn in the standard axial view of a
#: volume acquired with a 10-degree tilt is still taken (its canonical slices are that tilted).
MAX_VIEW_TILT_DEGREES = 11.0


def _canonical_box(src: SourceVolume, xyz: np.ndarray, what: str) -> Tuple[List[int], List[int]]:
    """The engine's voxel-box rule (:func:`MedSAMSlicerLib.boxes.voxel_box`), with the message in
    RAS for a box outside the volume."""
    try:
        return voxel_box(xyz, src.shape)
    except BoxOutside:
        ras_lo, ras_hi = src.ras_extent()
        raise MedSAMError(
            f"The {what} lies outside the volume '{src.name}', which spans RAS "
            f"{_fmt(ras_lo)} to {_fmt(ras_hi)} mm. Draw the box on this volume."
        ) from None


def _fmt(p) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in p) + ")"


def _check_points(points, minimum: int) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < minimum or not np.all(np.isfinite(pts)):
        raise MedSAMError(f"a box needs at least {minimum} RAS points of three finite numbers; got {np.asarray(points).tolist()}")
    return pts


def view_tilt_degrees(src: SourceVolume, slice_normal_world: Sequence[float]) -> float:
    """Angle between a slice view's normal and the volume's axial (canonical z) voxel axis."""
    normal = np.asarray(slice_normal_world, dtype=float).reshape(3)
    norm = np.linalg.norm(normal)
    if norm < 1e-12:
        raise MedSAMError("the slice view's normal is zero")
    cosine = abs(float(np.dot(normal / norm, src.axis_direction_ras(2))))
    return math.degrees(math.acos(min(1.0, cosine)))


def prompt_from_points(src: SourceVolume, points_world, slice_normal_world=None) -> BoxPrompt:
    """A box from RAS points (world coordinates, mm).

    Two opposite corners of a 3D box (``R0 A0 S0`` / ``R1 A1 S1``): the box spans the canonical
    voxels inside; if it covers more than one slice, its height bounds the propagation (as
    LiteMedSAM's 3D box: the 2D box goes on the middle slice). The corners of a rectangle drawn in
    a slice view (pass the view's normal): the box goes on the slice through the rectangle.

    Raises:
        MedSAMError: outside the volume, or drawn in a view that is not axial for this volume.
    """
    pts = _check_points(points_world, 2)
    if slice_normal_world is not None:
        tilt = view_tilt_degrees(src, slice_normal_world)
        if tilt > MAX_VIEW_TILT_DEGREES:
            raise MedSAMError(
                f"The box was drawn in a view tilted {tilt:.0f} degrees from the axial slices of "
                f"'{src.name}'. MedSAM segments axial slices: draw the box in an axial view (the Red "
                "view), or place an ROI and press Preview."
            )
    if len(pts) == 2:
        a, b = pts
        corners = np.array([[(a, b)[s[c]][c] for c in range(3)] for s in itertools.product((0, 1), repeat=3)])
    else:
        corners = pts
    xyz = src.ras_to_canonical(corners)
    if slice_normal_world is not None:
        # A drawn rectangle: one slice, through the rectangle's centre.
        z = int(round(float(np.clip(xyz[:, 2].mean(), 0, src.shape[0] - 1))))
        xyz = xyz.copy()
        xyz[:, 2] = z
    first, last = _canonical_box(src, xyz, "box")
    return BoxPrompt.from_voxel_box(first, last)


def prompt_from_roi(src: SourceVolume, roi_node) -> BoxPrompt:
    """A box from a markups ROI: its 8 corners (world) -> canonical box; its height bounds the
    propagation.

    Raises:
        MedSAMError: no ROI, an ROI outside the volume.
    """
    if roi_node is None:
        raise MedSAMError("No ROI selected: place a markups ROI around the structure first.")
    center = np.zeros(3)
    roi_node.GetCenterWorld(center)
    size = np.zeros(3)
    roi_node.GetSizeWorld(size)
    axes = []
    for getter in (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld):
        axis = np.zeros(3)
        getter(axis)
        axes.append(axis / max(np.linalg.norm(axis), 1e-12))
    if not np.all(np.isfinite(size)) or np.any(size < 0):
        raise MedSAMError(f"The ROI '{roi_node.GetName()}' has no valid size; place it again.")
    corners = np.array(
        [center + sum(s * 0.5 * size[c] * axes[c] for c, s in enumerate(signs)) for signs in itertools.product((-1, 1), repeat=3)]
    )
    xyz = src.ras_to_canonical(corners)
    first, last = _canonical_box(src, xyz, f"ROI '{roi_node.GetName()}'")
    return BoxPrompt.from_voxel_box(first, last)
