"""Volume nodes as the engine sees them: canonical voxels, geometry in world RAS, the intensity window.

:func:`source_volume` reads a scalar volume node into a :class:`SourceVolume` (canonical ``(z, y, x)``
voxels, the node's ``(i, j, k)`` <-> canonical mapping, IJK -> world RAS with parent transforms);
:func:`volume_changed` says whether a node still holds what was read; :func:`window_for` resolves
the window a user chose (the view's, a preset, or the engine's automatic rule).

Coordinates are spelled as for files (``MedSAMSlicerLib.fileio.volumes.Volume``): ``ras_to_canonical``,
``canonical_to_ras``, ``ras_extent``; RAS is Slicer's world frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import slicer
import vtk

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.orientation import AxialOrientation
from MedSAMSlicerLib.fileio.volumes import check_array_values

WindowLike = Union[None, str, Tuple[float, float], "object"]

# Volume keys whose voxels passed check_array_values (NaN/inf, blank).
_CHECKED_VOLUMES: set = set()


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


def _ijk_to_world_ras(volume_node) -> np.ndarray:
    """4x4 from ``volume_node``'s voxel index ``(i, j, k, 1)`` to world RAS, parent transforms included."""
    local = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(local)
    return _to_world(volume_node) @ _matrix_to_array(local)


@dataclass
class SourceVolume:
    """A volume node seen by the engine.

    Attributes:
        node: the ``vtkMRMLScalarVolumeNode`` (never modified).
        orientation: its ``(i, j, k)`` <-> canonical ``(x, y, z)`` mapping.
        ijk_to_ras: 4x4, voxel index ``(i, j, k, 1)`` -> world RAS (parent transforms included).
        array: canonical ``(z, y, x)`` voxels, read-only.
        key: identifies voxels and geometry (the engine's embedding-cache key).
    """

    node: object
    orientation: AxialOrientation
    ijk_to_ras: np.ndarray
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
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def axis_direction_ras(self, canonical_axis: int) -> np.ndarray:
        """Unit vector in world RAS along canonical axis 0 (x), 1 (y) or 2 (z), increasing index."""
        index_axis = self.orientation.axes[canonical_axis]
        column = self.ijk_to_ras[:3, index_axis].copy()
        column /= np.linalg.norm(column)
        return -column if self.orientation.flips[canonical_axis] else column

    def ras_to_canonical(self, points_world: np.ndarray) -> np.ndarray:
        """World RAS points ``(N, 3)`` -> continuous canonical ``(x, y, z)`` (voxel centres at integers)."""
        pts = np.asarray(points_world, dtype=float).reshape(-1, 3)
        homogeneous = np.c_[pts, np.ones(len(pts))]
        ijk = (self.ras_to_ijk @ homogeneous.T).T[:, :3]
        return self.orientation.ijk_points_to_canonical(ijk)

    def canonical_to_ras(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous canonical ``(x, y, z)`` points ``(N, 3)`` -> world RAS."""
        ijk = self.orientation.canonical_points_to_ijk(np.asarray(points_xyz, dtype=float).reshape(-1, 3))
        homogeneous = np.c_[ijk, np.ones(len(ijk))]
        return (self.ijk_to_ras @ homogeneous.T).T[:, :3]

    def ras_extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """RAS bounding box of the voxel centres."""
        nz, ny, nx = self.shape
        corners = np.array(list(itertools.product((0, nx - 1), (0, ny - 1), (0, nz - 1))), dtype=float)
        ras = self.canonical_to_ras(corners)
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
    ijk_to_ras = _ijk_to_world_ras(volume_node)
    dims = image.GetDimensions()
    if min(dims) < 1 or dims[0] < 2 or dims[1] < 2:
        raise MedSAMError(f"The volume '{volume_node.GetName()}' ({dims[0]}x{dims[1]}x{dims[2]}) is too small.")
    orientation = AxialOrientation.from_ras_direction(ijk_to_ras[:3, :3], dims)
    array_kji = slicer.util.arrayFromVolume(volume_node)
    array = orientation.to_canonical(array_kji)
    if copy:
        array = np.array(array, copy=True)
    elif np.shares_memory(array, array_kji):
        # A view of the node's own buffer: make sure nothing downstream can write through it.
        array = array.view()
    array.flags.writeable = False
    key = _volume_key(volume_node, ijk_to_ras)
    if key not in _CHECKED_VOLUMES:  # a full pass over the voxels: once per voxels and geometry
        check_array_values(array, orientation, f"The volume '{volume_node.GetName()}'")
        _CHECKED_VOLUMES.add(key)
    return SourceVolume(volume_node, orientation, ijk_to_ras, array, key)


def _volume_key(volume_node, ijk_to_ras: np.ndarray) -> str:
    # Voxels and geometry only: a renamed or re-displayed volume keeps its cached embeddings.
    geometry = ",".join(f"{v:.6g}" for v in ijk_to_ras[:3].ravel())
    return f"{volume_node.GetID()}:{volume_node.GetImageData().GetMTime()}:{geometry}"


def volume_changed(src: SourceVolume) -> Optional[str]:
    """Why ``src`` no longer describes its node (removed from the scene, voxels or geometry
    changed), or ``None`` when it still does. Cheap: no voxels are read."""
    node = src.node
    if node is None or node.GetScene() is None or node.GetImageData() is None:
        return f"The volume '{src.name}' was removed while MedSAM was running."
    try:
        key = _volume_key(node, _ijk_to_world_ras(node))
    except MedSAMError as exc:
        return str(exc)
    if key != src.key:
        return f"The volume '{src.name}' changed (voxels or position) while MedSAM was running."
    return None


def window_for(volume_node, window: WindowLike = None):
    """The intensity :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window` to use.

    Args:
        window: ``None`` or ``"auto"``: the view's window/level if the user set one (the display
            node's automatic window/level is off), else the engine's automatic window
            (:meth:`Window.automatic <MedSAMSlicerLib.segmentation.preprocessing.Window.automatic>`, the same rule
            as the command line: CT abdomen window for CT, MR percentile scaling otherwise).
            (Slicer's automatic window on CT is about 1500 HU wide, which washes out soft tissue and
            halves the Dice of small organs.)
            ``"display"``: the display node's window/level as shown, whatever it is.
            A preset name (``"abdomen"``, ``"lung"``, ``"bone"``, ``"brain"``, ``"mr"``), a
            ``(level, width)`` pair, or a ``Window`` (:func:`~MedSAMSlicerLib.segmentation.preprocessing.resolve_window`).
    """
    from MedSAMSlicerLib.segmentation.preprocessing import Window, resolve_window

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
