"""Helpers for the tests on real MRML nodes (slicer-core): geometry, ROIs, Dice, comparisons."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "MedSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    # Slicer puts the module folder on sys.path; do the same for MedSAMBridgeLib.
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer")
from MedSAMSlicerLib.metrics import dice  # noqa: E402,F401  (re-exported for the MRML tests)

vtk = pytest.importorskip("vtk")

#: Slices of example_ct_sm.nii.gz the model tests use (embeddings computed once).
Z_SLAB = (14, 23)
LIVER, SPLEEN, KIDNEY_RIGHT = 5, 1, 2


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJKToRAS matrix as an array."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def set_ijk_to_ras(volume_node, matrix: np.ndarray) -> None:
    """Give a volume node a new IJKToRAS (its voxels unchanged)."""
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))


def label_box_ijk(mask_kji: np.ndarray, z_slab=None):
    """Inclusive voxel bounding box ``(i0, j0, k0), (i1, j1, k1)`` of a mask, optionally on slices ``k``."""
    mask = mask_kji.copy()
    if z_slab is not None:
        mask[: z_slab[0]] = False
        mask[z_slab[1] + 1 :] = False
    k, j, i = np.nonzero(mask)
    return np.array([i.min(), j.min(), k.min()]), np.array([i.max(), j.max(), k.max()])


def roi_around(scene, matrix: np.ndarray, lo_ijk, hi_ijk, name: str = "ROI", rotation=None):
    """A markups ROI covering voxels ``lo..hi`` (inclusive) of a volume with IJKToRAS ``matrix``.

    For an axis-aligned volume the ROI's faces lie half a voxel outside the voxel centres. With
    ``rotation`` (4x4), the ROI is turned with it (its object-to-node matrix), to fit an oblique
    volume exactly.
    """
    lo = np.asarray(lo_ijk, dtype=float) - 0.5
    hi = np.asarray(hi_ijk, dtype=float) + 0.5
    center = matrix @ np.r_[(lo + hi) / 2.0, 1.0]
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    size = (hi - lo) * spacing
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetSize(*size)
    if rotation is None:
        roi.SetCenter(*center[:3])
    else:
        object_to_node = np.array(rotation, dtype=float)
        object_to_node[:3, 3] = center[:3]
        roi.SetCenter(0.0, 0.0, 0.0)
        roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    return roi


def segment_kji(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """A segment exported onto ``reference_node``'s grid, ``(k, j, i)`` bool."""
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_node) > 0


def snapshot_arrays(segmentation_node, reference_node) -> dict:
    """Segment id -> (name, voxels on the reference grid): to compare whole segmentations."""
    segmentation = segmentation_node.GetSegmentation()
    out = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        out[segment_id] = (
            segmentation.GetSegment(segment_id).GetName(),
            segment_kji(segmentation_node, segment_id, reference_node),
        )
    return out


def assert_same_segmentation(before: dict, after: dict) -> None:
    """Same segment ids, names and voxels."""
    assert list(before) == list(after)
    for segment_id, (name, voxels) in before.items():
        assert after[segment_id][0] == name
        np.testing.assert_array_equal(after[segment_id][1], voxels, err_msg=f"segment {name} changed")
