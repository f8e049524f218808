"""The layer between MRML nodes and the MedSAM engine (no Qt: runs in Slicer and on slicer-core).

Everything the Segment Editor effect, the module's logic and the headless script decide is
decided here, so it can be tested without the Slicer application:

* **Source volume -> engine array.** The volume node's voxels ``(k, j, i)`` are put in the
  engine's canonical axial order ``(z, y, x)`` (x toward Left, y toward Posterior, z toward
  Superior) by :class:`MedSAMSlicerLib.orientation.AxialOrientation`: axis permutation and flips only,
  so every canonical voxel is one voxel of the node. The node's voxels are never written.
* **RAS <-> IJK** happens here (and in the engine's ``volumes.py`` for files), nowhere else. A
  box from corner points, from a markups ROI or from a rectangle drawn in a slice view becomes a
  :class:`~MedSAMSlicerLib.boxes.BoxPrompt` in canonical voxel indices, by the engine's one rule
  (:func:`MedSAMSlicerLib.boxes.voxel_box`, which the command line uses too): voxels whose centres
  lie inside, and along an axis where the box is thinner than a voxel, the voxel nearest its middle.
* **Mask -> segment.** A canonical mask goes back to ``(k, j, i)``, becomes a labelmap in the
  volume's geometry (parent transforms included), is resampled onto the Segment Editor's modifier
  labelmap geometry and is written with the Segment Editor's own rules (``ModifySegmentByLabelmap``:
  its masking and overwrite settings). :meth:`MedSAMBridge.modifications` lists those edits; the
  effect hands them to ``scriptedEffect.modifySelectedSegmentByLabelmap``, the headless path
  (:meth:`MedSAMBridge.apply`) to ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``.

* **Threads.** Reading nodes (:meth:`MedSAMBridge.request`) and writing segments
  (:meth:`MedSAMBridge.write_segment`, :meth:`MedSAMBridge.apply`, the preview) happen on the
  thread that owns the scene; the engine work in between (:meth:`MedSAMBridge.compute`) touches no
  node and may run in a worker (:meth:`MedSAMBridge.start`). A result whose volume changed in the
  meantime is refused (:func:`volume_changed`).
* **Preview.** Each Segment Editor keeps its own preview node, referenced from its parameter set
  node (:func:`show_preview`, :func:`clear_preview`), so closing one editor never removes another's.

How a result is combined with the segment (``combine``):

* ``"slices"`` (default): the segment is replaced on the slices MedSAM segmented and kept on all
  others, so a box drawn again on one slice (2D) or a new propagation refines the segment.
* ``"add"``: the result is added to the segment.
* ``"replace"``: the segment becomes the result.

Other segments lose voxels only where the editor's overwrite mode says so (``"none"``,
``"visible"``, ``"all"``); the headless default is ``"none"``.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MedSAMSlicerLib.background import BackgroundTask, run_in_background
from MedSAMSlicerLib.boxes import BoxOutside, BoxPrompt, voxel_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.orientation import AxialOrientation
from MedSAMSlicerLib.progress import CancelToken, ProgressCallback
from MedSAMSlicerLib.volumes import check_array_values

from .choices import COMBINE_MODES, DIRECTIONS, MODES, WINDOW_CHOICES  # noqa: F401  (re-exported)

#: A box drawn in a slice view whose normal is tilted more than this from the volume's axial
#: voxel axis is refused. About 10 degrees, so that a box drawn in the standard axial view of a
#: volume acquired with a 10-degree tilt is still taken (its canonical slices are that tilted).
MAX_VIEW_TILT_DEGREES = 11.0

OVERWRITE_MODES = ("none", "visible", "all")
#: Segment Editor modification modes by name (what ``modifications`` returns).
MODIFICATION_MODES = ("set", "add", "remove")

PREVIEW_NODE_NAME = "MedSAM preview"
#: Node reference role, on a holder node, of the preview segmentation node. For the effect the
#: holder is its parameter set node and the role is what ``scriptedEffect.setNodeReference("Preview",
#: node)`` writes for an effect named "MedSAM" (qSlicerSegmentEditorAbstractEffect.cxx): each
#: Segment Editor keeps its own preview, as Slicer's auto-complete effects do.
PREVIEW_REFERENCE_ROLE = "MedSAM.Preview"
#: Attribute on the preview segmentation node naming the segmentation it previews.
PREVIEW_TARGET_ATTRIBUTE = "MedSAM.PreviewTarget"

WindowLike = Union[None, str, Tuple[float, float], "object"]


# ---------------------------------------------------------------------------------------------
# Shared models

# Volume keys whose voxels passed check_array_values (NaN/inf, blank).
_CHECKED_VOLUMES: set = set()
# id(segmenter) -> key of the volume and window it was last given (see MedSAMBridge.request).
_LOADED_VOLUME: Dict[int, str] = {}
_LOADED_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Geometry


def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s local coordinates to world RAS (identity without transform).

    Raises:
        MedSAMError: the node is under a non-linear transform.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, matrix):
        raise MedSAMError(
            f"'{node.GetName()}' is under a non-linear (warping) transform. MedSAM needs voxels on a "
            "regular grid: harden the transform (Data module, right-click > Harden transform) or remove it."
        )
    return _matrix_to_array(matrix)


@dataclass
class SourceVolume:
    """A volume node seen by the engine.

    Attributes:
        node: the ``vtkMRMLScalarVolumeNode`` (never modified).
        orientation: its ``(i, j, k)`` <-> canonical ``(x, y, z)`` mapping.
        ijk_to_world: 4x4, voxel index ``(i, j, k, 1)`` -> world RAS (parent transforms included).
        array: canonical ``(z, y, x)`` voxels, read-only.
        key: identifies voxels and geometry (the engine's embedding-cache key).
    """

    node: object
    orientation: AxialOrientation
    ijk_to_world: np.ndarray
    array: np.ndarray
    key: str

    @property
    def name(self) -> str:
        return self.node.GetName()

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Canonical shape ``(nz, ny, nx)``."""
        return self.orientation.canonical_shape

    @property
    def world_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_world)

    def axis_direction_world(self, canonical_axis: int) -> np.ndarray:
        """Unit vector in world RAS along canonical axis 0 (x), 1 (y) or 2 (z), increasing index."""
        index_axis = self.orientation.axes[canonical_axis]
        column = self.ijk_to_world[:3, index_axis].copy()
        column /= np.linalg.norm(column)
        return -column if self.orientation.flips[canonical_axis] else column

    def world_to_canonical(self, points_world: np.ndarray) -> np.ndarray:
        """World RAS points ``(N, 3)`` -> continuous canonical ``(x, y, z)`` (voxel centres at integers)."""
        pts = np.asarray(points_world, dtype=float).reshape(-1, 3)
        homogeneous = np.c_[pts, np.ones(len(pts))]
        ijk = (self.world_to_ijk @ homogeneous.T).T[:, :3]
        return self.orientation.ijk_points_to_canonical(ijk)

    def canonical_to_world(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous canonical ``(x, y, z)`` points ``(N, 3)`` -> world RAS."""
        ijk = self.orientation.canonical_points_to_ijk(np.asarray(points_xyz, dtype=float).reshape(-1, 3))
        homogeneous = np.c_[ijk, np.ones(len(ijk))]
        return (self.ijk_to_world @ homogeneous.T).T[:, :3]

    def world_extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """RAS bounding box of the voxel centres."""
        nz, ny, nx = self.shape
        corners = np.array(list(itertools.product((0, nx - 1), (0, ny - 1), (0, nz - 1))), dtype=float)
        ras = self.canonical_to_world(corners)
        return ras.min(axis=0), ras.max(axis=0)


def source_volume(volume_node, copy: bool = False) -> SourceVolume:
    """Read a scalar volume node as the engine sees it.

    Args:
        copy: copy the voxels (for work in another thread: the node's buffer belongs to the scene);
            otherwise the array is a read-only view of the node's voxels where the axes allow.

    Raises:
        MedSAMError: no volume, no voxels, not a scalar volume, a non-linear transform, NaN or
            infinite voxels, a blank (constant) volume.
    """
    if volume_node is None:
        raise MedSAMError(
            "No source volume. Select the volume to segment as the Segment Editor's source volume."
        )
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise MedSAMError(
            f"'{volume_node.GetName()}' is not a scalar (grey-level) volume: MedSAM segments CT or MR "
            "intensity volumes, not label maps, vectors or colour images."
        )
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise MedSAMError(f"The volume '{volume_node.GetName()}' has no voxels (is it still loading?).")
    if image.GetNumberOfScalarComponents() != 1:
        raise MedSAMError(
            f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "MedSAM needs a single-channel volume (use 'Vector to Scalar Volume' first)."
        )
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    ijk_to_world = _to_world(volume_node) @ _matrix_to_array(ijk_to_ras)
    dims = image.GetDimensions()
    if min(dims) < 1 or dims[0] < 2 or dims[1] < 2:
        raise MedSAMError(f"The volume '{volume_node.GetName()}' ({dims[0]}x{dims[1]}x{dims[2]}) is too small.")
    orientation = AxialOrientation.from_ras_direction(ijk_to_world[:3, :3], dims)
    array_kji = slicer.util.arrayFromVolume(volume_node)
    array = orientation.to_canonical(array_kji)
    if copy:
        array = np.array(array, copy=True)
    elif np.shares_memory(array, array_kji):
        # A view of the node's own buffer: make sure nothing downstream can write through it.
        array = array.view()
    array.flags.writeable = False
    key = _volume_key(volume_node, ijk_to_world)
    if key not in _CHECKED_VOLUMES:  # a full pass over the voxels: once per voxels and geometry
        check_array_values(array, orientation, f"The volume '{volume_node.GetName()}'")
        _CHECKED_VOLUMES.add(key)
    return SourceVolume(volume_node, orientation, ijk_to_world, array, key)


def _volume_key(volume_node, ijk_to_world: np.ndarray) -> str:
    # Voxels and geometry only: a renamed or re-displayed volume keeps its cached embeddings.
    geometry = ",".join(f"{v:.6g}" for v in ijk_to_world[:3].ravel())
    return f"{volume_node.GetID()}:{volume_node.GetImageData().GetMTime()}:{geometry}"


def volume_changed(src: SourceVolume) -> Optional[str]:
    """Why ``src`` no longer describes its node (removed from the scene, voxels or geometry
    changed), or ``None`` when it still does. Cheap: no voxels are read."""
    node = src.node
    if node is None or node.GetScene() is None or node.GetImageData() is None:
        return f"The volume '{src.name}' was removed while MedSAM was running."
    try:
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        key = _volume_key(node, _to_world(node) @ _matrix_to_array(ijk_to_ras))
    except MedSAMError as exc:
        return str(exc)
    if key != src.key:
        return f"The volume '{src.name}' changed (voxels or position) while MedSAM was running."
    return None


def window_for(volume_node, window: WindowLike = None):
    """The intensity :class:`~MedSAMSlicerLib.preprocessing.Window` to use.

    Args:
        window: ``None`` or ``"auto"``: the view's window/level if the user set one (the display
            node's automatic window/level is off), else the engine's automatic window
            (:meth:`Window.automatic <MedSAMSlicerLib.preprocessing.Window.automatic>`, the same rule
            as the command line: CT abdomen window for CT, MR percentile scaling otherwise).
            (Slicer's automatic window on CT is about 1500 HU wide, which washes out soft tissue and
            halves the Dice of small organs.)
            ``"display"``: the display node's window/level as shown, whatever it is.
            A preset name (``"abdomen"``, ``"lung"``, ``"bone"``, ``"brain"``, ``"mr"``), a
            ``(level, width)`` pair, or a ``Window`` (:func:`~MedSAMSlicerLib.preprocessing.resolve_window`).
    """
    from MedSAMSlicerLib.preprocessing import Window, resolve_window

    if isinstance(window, Window):
        return window
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    has_display = display is not None and hasattr(display, "GetWindow") and display.GetWindow() > 0
    shown = Window(level=float(display.GetLevel()), width=float(display.GetWindow())) if has_display else None
    is_auto = window is None or (isinstance(window, str) and window.lower() == "auto")
    if is_auto and shown is not None and not display.GetAutoWindowLevel():
        return shown
    if isinstance(window, str) and window.lower() == "display":
        window = shown or "auto"
    voxels = slicer.util.arrayFromVolume(volume_node) if volume_node is not None else np.zeros(1)
    try:
        return resolve_window(window, voxels)
    except MedSAMError:
        if isinstance(window, str):
            raise  # the engine's message lists the presets
        raise MedSAMError(f"a window is 'auto', 'display', a preset name or (level, width); got {window!r}") from None


# ---------------------------------------------------------------------------------------------
# Prompts


def _canonical_box(src: SourceVolume, xyz: np.ndarray, what: str) -> Tuple[List[int], List[int]]:
    """The engine's voxel-box rule (:func:`MedSAMSlicerLib.boxes.voxel_box`), with the message in
    RAS for a box outside the volume."""
    try:
        return voxel_box(xyz, src.shape)
    except BoxOutside:
        ras_lo, ras_hi = src.world_extent()
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
    cosine = abs(float(np.dot(normal / norm, src.axis_direction_world(2))))
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
    xyz = src.world_to_canonical(corners)
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
    xyz = src.world_to_canonical(corners)
    first, last = _canonical_box(src, xyz, f"ROI '{roi_node.GetName()}'")
    return BoxPrompt.from_voxel_box(first, last)


# ---------------------------------------------------------------------------------------------
# Labelmaps


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
    ijk_to_seg = np.linalg.inv(_to_world(segmentation_node)) @ src.ijk_to_world
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


# ---------------------------------------------------------------------------------------------
# The bridge


@dataclass
class Prediction:
    """An engine result on a source volume, not yet written to any segment.

    Attributes:
        source: the :class:`SourceVolume` it was computed on.
        prompt: the :class:`BoxPrompt`.
        mode: ``"3d"`` or ``"2d"``.
        mask: canonical ``(z, y, x)`` bool.
        covered: canonical slices MedSAM segmented (accepted); ``"slices"`` combining replaces
            the segment on these.
        score: the decoder's predicted IoU on the prompt slice.
        notes: why propagation stopped, per direction.
    """

    source: SourceVolume
    prompt: BoxPrompt
    mode: str
    mask: np.ndarray
    covered: List[int]
    score: float = float("nan")
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def voxel_count(self) -> int:
        return int(self.mask.sum())


@dataclass
class PredictionRequest:
    """Everything a prediction needs, read from the scene on the thread that owns it.

    :meth:`MedSAMBridge.compute` then needs no MRML: it can run in a worker thread.

    Attributes:
        source: the volume (voxels copied), its geometry and key.
        window: the intensity window, already resolved (``"auto"`` looked at the display node).
        prompt, mode, direction: what to segment and how.
    """

    source: SourceVolume
    window: object
    prompt: BoxPrompt
    mode: str = "3d"
    direction: str = "both"

    @property
    def volume_key(self) -> str:
        return f"{self.source.key}|{self.window.key}"


def _check_mode(mode: str, direction: str) -> None:
    if mode not in MODES:
        raise MedSAMError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if direction not in DIRECTIONS:
        raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")


class MedSAMBridge:
    """MRML in, engine call, segment out. One per front end; models are shared (see
    :func:`MedSAMSlicerLib.segmenter.shared_segmenter`).

    Args:
        model: registry name (``"litemedsam"``, ``"medsam"``).
        checkpoint: a weights file to use instead of the registry's (e.g. fine-tuned).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        segmenter: a ready ``Segmenter`` (tests, or a caller that manages its own).

    Threads: :meth:`request`, :meth:`apply`, the preview and everything else that touches nodes
    run on the thread that owns the scene (Slicer's GUI thread); :meth:`compute` only uses the
    engine and may run in a worker (:meth:`start`).
    """

    def __init__(self, model: str = "litemedsam", checkpoint: Optional[str] = None, device: str = "auto", segmenter=None):
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self._segmenter = segmenter

    # -- model ----------------------------------------------------------------------------------
    def configure(self, model: Optional[str] = None, checkpoint: Optional[str] = None, device: Optional[str] = None) -> None:
        """Switch model, checkpoint or device (loaded on next use)."""
        wanted = {
            "model": self.model if model is None else model,
            # An empty string clears the checkpoint (back to the registry's weights).
            "checkpoint": self.checkpoint if checkpoint is None else (checkpoint or None),
            "device": self.device if device is None else device,
        }
        if wanted != {"model": self.model, "checkpoint": self.checkpoint, "device": self.device}:
            self.model, self.checkpoint, self.device = wanted["model"], wanted["checkpoint"], wanted["device"]
            self._segmenter = None

    @property
    def segmenter(self):
        """The shared segmenter (loads the model on first use, in whichever thread asks first)."""
        if self._segmenter is None:
            from MedSAMSlicerLib.segmenter import shared_segmenter

            self._segmenter = shared_segmenter(self.model, self.checkpoint, self.device)
        return self._segmenter

    # -- volume ---------------------------------------------------------------------------------
    def _load_volume(self, request: PredictionRequest) -> None:
        """Give the engine the request's volume (windowed) unless it already has it."""
        segmenter = self.segmenter
        with _LOADED_LOCK:
            # The segmenter is shared (effect, module): remember per segmenter what it holds.
            if _LOADED_VOLUME.get(id(segmenter)) != request.volume_key:
                # No key: the engine names the volume by a hash of its voxels, so the same voxels
                # (reloaded, or the same image stored flipped or permuted) reuse cached embeddings.
                segmenter.set_volume(request.source.array, request.window)
                _LOADED_VOLUME[id(segmenter)] = request.volume_key

    def prefetch_around(self, volume_node, point_world, radius: int = 3, window: WindowLike = None) -> BackgroundTask:
        """Encode the slices around ``point_world`` in a background task (for a quick preview).

        Returns the started task; its ``centre`` attribute is the slice under the point. A GUI
        whose event loop keeps the GIL must pump it (:meth:`BackgroundTask.pump`).
        """
        src = source_volume(volume_node, copy=True)
        request = PredictionRequest(src, window_for(volume_node, window), BoxPrompt(0, (0, 0, 1, 1)))
        z = int(round(float(src.world_to_canonical(point_world)[0, 2])))
        z = min(max(z, 0), src.shape[0] - 1)
        zs = sorted(range(max(0, z - radius), min(src.shape[0], z + radius + 1)), key=lambda v: abs(v - z))

        def work(progress, cancel):
            self._load_volume(request)
            self.segmenter.predictor.encode(zs, progress, cancel)
            return zs

        task = run_in_background(work, "medsam-prefetch")
        task.centre = z
        return task

    # -- prediction -----------------------------------------------------------------------------
    def request(
        self,
        volume_node,
        prompt: BoxPrompt,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
    ) -> PredictionRequest:
        """Read what a prediction needs from the scene (call on the scene's thread).

        Raises:
            MedSAMError: bad input.
        """
        _check_mode(mode, direction)
        return PredictionRequest(source_volume(volume_node, copy=True), window_for(volume_node, window), prompt,
                                 mode, direction)

    def compute(
        self,
        request: PredictionRequest,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Prediction:
        """Run the engine on a request. Touches no node: safe in a worker thread.

        Raises:
            MedSAMError: bad input. ``Cancelled``: ``cancel`` was set.
        """
        if cancel is not None:
            cancel.raise_if_cancelled()
        self._load_volume(request)
        src, prompt = request.source, request.prompt
        if request.mode == "2d":
            if cancel is not None:
                cancel.raise_if_cancelled()
            result = self.segmenter.segment_slice(prompt.z, prompt.box)
            mask = np.zeros(src.shape, dtype=bool)
            mask[prompt.z] = result.mask
            if progress is not None:
                progress(1, 1, f"slice {prompt.z}")
            return Prediction(src, prompt, request.mode, mask, [prompt.z], float(result.score))
        result = self.segmenter.segment_3d(
            prompt.z, prompt.box, z_range=prompt.z_range, direction=request.direction, progress=progress, cancel=cancel
        )
        covered = sorted({r.z for r in result.slices if r.accepted})
        score = next((float(r.score) for r in result.slices if r.z == prompt.z), float("nan"))
        return Prediction(src, prompt, request.mode, np.asarray(result.mask, dtype=bool), covered, score,
                          dict(result.stop_reasons))

    def start(self, request: PredictionRequest) -> BackgroundTask:
        """:meth:`compute` in a started :class:`~MedSAMSlicerLib.background.BackgroundTask`; its
        ``result()`` is the :class:`Prediction`. Check :func:`volume_changed` before using it."""
        return run_in_background(lambda progress, cancel: self.compute(request, progress, cancel), "medsam-predict")

    def predict(
        self,
        volume_node,
        prompt: BoxPrompt,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Prediction:
        """:meth:`request` then :meth:`compute`, in this thread. Nothing in the scene changes.

        Raises:
            MedSAMError: bad input. ``Cancelled``: ``cancel`` was set.
        """
        return self.compute(self.request(volume_node, prompt, mode, direction, window), progress, cancel)

    # -- writing --------------------------------------------------------------------------------
    @staticmethod
    def modifications(prediction: Prediction, segmentation_node, reference=None, combine: str = "slices"):
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
        ijk_to_seg = np.linalg.inv(_to_world(segmentation_node)) @ src.ijk_to_world

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

    def apply(
        self,
        prediction: Prediction,
        segmentation_node,
        segment_id: str,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
    ) -> None:
        """Write ``prediction`` into a segment through ``vtkSlicerSegmentEditorLogic`` (headless path;
        the effect uses ``modifySelectedSegmentByLabelmap`` with the same :meth:`modifications`).

        Args:
            overwrite: ``"none"``, ``"visible"`` or ``"all"``: which other segments lose the voxels
                the result takes. ``None``: the editor node's setting, or ``"none"`` without one.
            editor_node: a ``vtkMRMLSegmentEditorNode`` whose masking settings apply (a temporary
                one is made without it).

        On any error the segmentation is put back as it was.
        """
        if overwrite is not None and overwrite not in OVERWRITE_MODES:
            raise MedSAMError(f"unknown overwrite mode '{overwrite}'; choose one of: {', '.join(OVERWRITE_MODES)}")
        segmentation = segmentation_node.GetSegmentation()
        if segment_id is None or segmentation.GetSegment(segment_id) is None:
            raise MedSAMError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        scene = segmentation_node.GetScene()
        temporary = editor_node is None
        if temporary:
            editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAM temporary editor")
            editor_node.SetOverwriteMode(_overwrite_mode(overwrite or "none"))
        previous_overwrite = editor_node.GetOverwriteMode()
        if overwrite is not None:
            editor_node.SetOverwriteMode(_overwrite_mode(overwrite))
        state = save_state(segmentation_node)
        try:
            if not _has_reference_geometry(segmentation_node):
                segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(prediction.source.node)
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLScene(scene)
            logic.SetSegmentEditorNode(editor_node)
            editor_node.SetAndObserveSegmentationNode(segmentation_node)
            editor_node.SetAndObserveSourceVolumeNode(prediction.source.node)
            editor_node.SetSelectedSegmentID(segment_id)
            if not logic.ResetModifierLabelmapToDefault():
                raise MedSAMError(f"the Segment Editor could not prepare '{segmentation_node.GetName()}' for editing")
            reference = logic.GetModifierLabelmap()
            for image, mode in MedSAMBridge.modifications(prediction, segmentation_node, reference, combine):
                logic.ModifySegmentByLabelmap(segmentation_node, segment_id, image, _logic_mode(mode), True, False)
        except BaseException:
            restore_state(segmentation_node, state)
            raise
        finally:
            if temporary:
                scene.RemoveNode(editor_node)
            else:
                editor_node.SetOverwriteMode(previous_overwrite)

    def segment_request(
        self,
        volume_node,
        segmentation_node,
        segment_id: Optional[str] = None,
        box_ras=None,
        roi_node=None,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
    ) -> PredictionRequest:
        """Check the inputs of :meth:`segment` and read them from the scene (scene's thread).

        Raises:
            MedSAMError: bad input.
        """
        if (box_ras is None) == (roi_node is None):
            raise MedSAMError("give either a box (two RAS corners) or an ROI node")
        if segmentation_node is None:
            raise MedSAMError("No segmentation: create or select the segmentation to write to.")
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAMError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        _check_mode(mode, direction)
        src = source_volume(volume_node, copy=True)
        prompt = prompt_from_roi(src, roi_node) if roi_node is not None else prompt_from_points(src, box_ras)
        return PredictionRequest(src, window_for(volume_node, window), prompt, mode, direction)

    def write_segment(
        self,
        prediction: Prediction,
        segmentation_node,
        segment_id: Optional[str] = None,
        segment_name: Optional[str] = None,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
    ) -> str:
        """Write a finished prediction into ``segment_id``, or into a new segment named
        ``segment_name`` (scene's thread). Returns the segment's ID.

        Raises:
            MedSAMError: the volume or the segmentation changed or went away since the request;
                the segmentation is then unchanged.
        """
        problem = volume_changed(prediction.source)
        if problem:
            raise MedSAMError(problem + " Nothing was written; run it again.")
        if segmentation_node is None or segmentation_node.GetScene() is None:
            raise MedSAMError("The segmentation was removed while MedSAM was running; nothing was written.")
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAMError(f"The segment '{segment_id}' was removed while MedSAM was running; nothing was written.")
        added = False
        if segment_id is None:
            segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", segment_name or "MedSAM")
            added = True
        try:
            self.apply(prediction, segmentation_node, segment_id, combine, overwrite, editor_node)
        except BaseException:
            if added:
                segmentation_node.GetSegmentation().RemoveSegment(segment_id)
            raise
        return segment_id

    def segment(
        self,
        volume_node,
        segmentation_node,
        segment_id: Optional[str] = None,
        box_ras=None,
        roi_node=None,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
        segment_name: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Tuple[str, Prediction]:
        """Everything in one call, in this thread (scripts, the self-test, the headless script).

        Args:
            box_ras: two opposite RAS corners ``[[R0, A0, S0], [R1, A1, S1]]`` (world, mm), or
            roi_node: a ``vtkMRMLMarkupsROINode`` (one of the two).
            segment_id: the segment to write; ``None`` adds a segment named ``segment_name``
                (only once the result is ready, so a cancelled run adds nothing).

        A GUI runs the same steps with the engine work in a worker thread:
        :meth:`segment_request`, :meth:`start`, then :meth:`write_segment`.

        Returns:
            ``(segment_id, prediction)``.

        Raises:
            MedSAMError: bad input. ``Cancelled``: cancelled; the segmentation is unchanged.
        """
        request = self.segment_request(volume_node, segmentation_node, segment_id, box_ras, roi_node, mode,
                                       direction, window)
        prediction = self.compute(request, progress, cancel)
        segment_id = self.write_segment(prediction, segmentation_node, segment_id, segment_name, combine, overwrite,
                                        editor_node)
        return segment_id, prediction


# ---------------------------------------------------------------------------------------------
# Preview


def show_preview(prediction: Prediction, segmentation_node, holder, segment_id: Optional[str] = None):
    """Show ``prediction`` in a separate, unsaved segmentation node over ``segmentation_node``.

    Args:
        holder: the node that keeps the preview (node reference :data:`PREVIEW_REFERENCE_ROLE`): the
            effect's parameter set node, the module's parameter node. Each holder has its own
            preview; showing again replaces it.
        segment_id: the segment the preview is for (its colour is used).

    The target segmentation is not touched; :func:`clear_preview` removes the preview. Returns the
    preview node.
    """
    scene = segmentation_node.GetScene()
    node = preview_node(holder)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        holder.SetNodeReferenceID(PREVIEW_REFERENCE_ROLE, node.GetID())
    node.SetAttribute(PREVIEW_TARGET_ATTRIBUTE, segmentation_node.GetID())
    node.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    segment_id_preview = segmentation.AddEmptySegment("preview", "MedSAM preview")
    color = [1.0, 1.0, 0.0]
    target = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if target is not None:
        color = list(target.GetColor())
    segmentation.GetSegment(segment_id_preview).SetColor(*color)
    ((image, _),) = MedSAMBridge.modifications(prediction, segmentation_node, None, "add")
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, node, segment_id_preview, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    display = node.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(0.6)
        display.SetOpacity2DOutline(1.0)
        display.SetVisibility3D(False)
    return node


def preview_node(holder):
    """The preview segmentation node ``holder`` keeps, or ``None``."""
    if holder is None:
        return None
    return holder.GetNodeReference(PREVIEW_REFERENCE_ROLE)


def clear_preview(holder) -> None:
    """Remove the preview ``holder`` keeps (no other holder's preview is touched)."""
    node = preview_node(holder)
    if holder is not None:
        holder.SetNodeReferenceID(PREVIEW_REFERENCE_ROLE, None)
    if node is not None and node.GetScene() is not None:
        node.GetScene().RemoveNode(node)


def _has_reference_geometry(segmentation_node) -> bool:
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return bool(segmentation_node.GetSegmentation().GetConversionParameter(name))


def _overwrite_mode(name: str) -> int:
    return {
        "none": slicer.vtkMRMLSegmentEditorNode.OverwriteNone,
        "visible": slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments,
        "all": slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments,
    }[name]


def _logic_mode(name: str) -> int:
    # Looked up when used, not at import: vtkSlicerSegmentEditorLogic exists from Slicer 5.10 on,
    # and an older Slicer must still be able to import this module to say what it needs.
    logic = slicer.vtkSlicerSegmentEditorLogic
    return {"set": logic.ModificationModeSet, "add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove}[name]
