"""Canonical masks <-> labelmaps in MRML: the Segment Editor edits that write a result, a segment's
voxels on a volume's grid, and the segmentation state kept for undo."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MedSAMSlicerLib.errors import MedSAMError

from .choices import COMBINE_MODES
from .sources import SourceVolume, _array_to_matrix, _to_world

#: Segment Editor modification modes by name (what :func:`modifications` returns).
MODIFICATION_MODES = ("set", "add", "remove")


def _oriented_image(array_kji: np.ndarray, ijk_to_frame: np.ndarray):
    """A ``vtkOrientedImageData`` (unsigned char) holding ``array_kji`` with geometry ``ijk_to_frame``."""
    nk, nj, ni = array_kji.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(ni, nj, nk)
    image.SetImageToWorldMatrix(_array_to_matrix(ijk_to_frame))
    data = np.ascontiguousarray(array_kji, dtype=np.uint8).ravel()
    scalars = numpy_support.numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def _geometry_image(src: SourceVolume, ijk_to_frame: np.ndarray):
    """A voxel-less image with the volume's grid in a given frame (reference for resampling)."""
    ni, nj, nk = src.orientation.shape_ijk
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(ni, nj, nk)
    image.SetImageToWorldMatrix(_array_to_matrix(ijk_to_frame))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    return image


def _resample(image, reference):
    """``image`` on ``reference``'s grid (nearest neighbour); ``image`` itself when they match."""
    resample = slicer.vtkOrientedImageDataResample
    if resample.DoGeometriesMatch(image, reference) and resample.DoExtentsMatch(image, reference):
        return image
    out = slicer.vtkOrientedImageData()
    resample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out, False, False)
    return out


def _kji_array(image) -> np.ndarray:
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(dims[::-1], dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])


def segment_array(segmentation_node, segment_id: str, src: SourceVolume) -> np.ndarray:
    """A segment's voxels on the source volume's grid, canonical ``(z, y, x)`` bool."""
    segment_image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, segment_image)
    if segment_image.GetPointData().GetScalars() is None:
        return np.zeros(src.shape, dtype=bool)
    # Segment image is in the segmentation's frame; express the volume grid in that frame too.
    ijk_to_seg = np.linalg.inv(_to_world(segmentation_node)) @ src.ijk_to_ras
    resampled = _resample(segment_image, _geometry_image(src, ijk_to_seg))
    return src.orientation.to_canonical(_kji_array(resampled) > 0)


# ---------------------------------------------------------------------------------------------
# Undo (what scriptedEffect.saveStateForUndo does in Slicer)


def save_state(segmentation_node):
    """A copy of the whole segmentation (segments, names, colours, voxels) for :func:`restore_state`."""
    state = slicer.vtkSegmentation()
    state.DeepCopy(segmentation_node.GetSegmentation())
    return state


def restore_state(segmentation_node, state) -> None:
    """Put a segmentation back exactly as :func:`save_state` saw it."""
    segmentation_node.GetSegmentation().DeepCopy(state)
    segmentation_node.Modified()


def modifications(prediction, segmentation_node, reference=None, combine: str = "slices"):
    """The Segment Editor edits that write ``prediction`` into a segment.

    Args:
        segmentation_node: the target segmentation (its parent transform is honoured).
        reference: the modifier labelmap geometry (``scriptedEffect.defaultModifierLabelmap()``
            in Slicer); ``None``: the volume's grid.
        combine: ``"slices"``, ``"add"`` or ``"replace"`` (see the module docstring).

    Returns:
        ``[(vtkOrientedImageData, "set" | "add" | "remove"), ...]`` to apply in order.
    """
    if combine not in COMBINE_MODES:
        raise MedSAMError(f"unknown combine mode '{combine}'; choose one of: {', '.join(COMBINE_MODES)}")
    src = prediction.source
    ijk_to_seg = np.linalg.inv(_to_world(segmentation_node)) @ src.ijk_to_ras

    def labelmap(canonical: np.ndarray):
        image = _oriented_image(src.orientation.from_canonical(canonical.astype(np.uint8)), ijk_to_seg)
        return _resample(image, reference) if reference is not None else image

    mask = labelmap(prediction.mask)
    if combine == "add":
        return [(mask, "add")]
    if combine == "replace":
        return [(mask, "set")]
    slab = np.zeros(src.shape, dtype=bool)
    slab[prediction.covered] = True
    return [(labelmap(slab), "remove"), (mask, "add")]

