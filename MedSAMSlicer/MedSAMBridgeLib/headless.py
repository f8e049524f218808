"""Slicer's scene and module logics without the Slicer application (slicer-core, no Qt).

In the Slicer application ``slicer.app``, ``slicer.mrmlScene`` and ``slicer.modules`` exist and
the functions here only look them up. With the ``slicer-core`` wheel (plain Python, no display)
:func:`create_headless_scene` builds the same pieces the application would: a scene, an
application logic, and the Colors, Volumes and Segmentations module logics registered under
their module names, so that display nodes, ``slicer.util.arrayFromVolume`` and friends work.
The command line script (``scripts/medsam_headless.py``) and the tests use it.

Loading and saving go through module logics and storage nodes, which work in both worlds
(``slicer.util.loadVolume`` and ``saveNode`` need the application).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import slicer

from MedSAMSlicerLib.errors import MedSAMError


def has_application() -> bool:
    """Whether we run inside the Slicer application (``slicer.app`` exists)."""
    return getattr(slicer, "app", None) is not None


class _Module:
    """Stands in for ``slicer.modules.<name>``: only ``logic()`` is needed outside Slicer."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def create_headless_scene():
    """Return the MRML scene, building a fresh one with its module logics outside Slicer.

    Inside the Slicer application this returns ``slicer.mrmlScene`` unchanged. Outside, each
    call makes a new empty scene and sets ``slicer.mrmlScene`` and ``slicer.modules.volumes`` /
    ``slicer.modules.segmentations`` (objects with a ``logic()`` method), replacing any
    previous headless scene.
    """
    if has_application():
        return slicer.mrmlScene
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    # Display nodes look up the color logic through the application logic ("Colors").
    for name, cls in (
        ("Colors", slicer.vtkMRMLColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(
        volumes=_Module(logics["Volumes"]),
        segmentations=_Module(logics["Segmentations"]),
        colors=_Module(logics["Colors"]),
        # Keeps the application logic alive as long as the scene is in use.
        _headless_application_logic=app_logic,
    )
    return scene


def volumes_logic():
    """The Volumes module logic (``slicer.modules.volumes.logic()``)."""
    return slicer.modules.volumes.logic()


def segmentations_logic():
    """The Segmentations module logic (``slicer.modules.segmentations.logic()``)."""
    return slicer.modules.segmentations.logic()


def load_volume(path: str, name: Optional[str] = None, labelmap: bool = False):
    """Load a scalar (or label) volume file (NIfTI, NRRD, MHA, ...) into the scene.

    The file is checked first as the command line checks it
    (:func:`~MedSAMSlicerLib.fileio.volumes.check_volume_file`: a regular file, every voxel byte there,
    intact compressed data, a header SimpleITK reads), so a truncated NIfTI is refused here too
    and Slicer's readers never print their own errors before ours.

    Raises:
        MedSAMError: the file does not exist or cannot be read as a volume.
    """
    from MedSAMSlicerLib.fileio.itk_io import quiet_itk
    from MedSAMSlicerLib.fileio.volumes import check_volume_file

    path = os.fspath(check_volume_file(path, "volume file"))
    if name is None:
        name = _stem(path)
    # Bit 0 of the options is "label map". Slicer's readers print their errors (with colour
    # codes) straight to the process's stderr: collected, and ours said instead.
    with quiet_itk():
        node = volumes_logic().AddArchetypeVolume(path, name, 1 if labelmap else 0)
    if node is None or node.GetImageData() is None:
        raise MedSAMError(f"could not read a volume from {path}: is it an image file (NIfTI, NRRD, MHA)?")
    return node


def load_segmentation(path: str, name: Optional[str] = None):
    """Load a segmentation file (``.seg.nrrd``, or a labelmap image: one segment per label),
    checked first as every image file is (:func:`~MedSAMSlicerLib.fileio.integrity.check_image_file`).

    Raises:
        MedSAMError: the file does not exist or cannot be read as a segmentation.
    """
    from MedSAMSlicerLib.fileio.integrity import check_image_file
    from MedSAMSlicerLib.fileio.itk_io import quiet_itk

    path = os.fspath(check_image_file(path, "segmentation file"))
    if name is None:
        name = _stem(path)
    with quiet_itk():
        node = segmentations_logic().LoadSegmentationFromFile(path, True, name)
    if node is None:
        raise MedSAMError(f"could not read a segmentation from {path}")
    return node


def save_node(node, path: str, overwrite: bool = True) -> None:
    """Write ``node`` with its default storage node (``.seg.nrrd`` for segmentations), through the
    one writer (:func:`~MedSAMSlicerLib.fileio.atomic.atomic_write`): into a temporary file beside
    ``path``, then published at once; a link at ``path`` is replaced, never written through;
    without ``overwrite`` an existing file is never replaced.

    Raises:
        MedSAMError: the file could not be written.
    """
    from MedSAMSlicerLib.fileio.atomic import atomic_write
    from MedSAMSlicerLib.fileio.itk_io import quiet_itk

    path = os.fspath(path)
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()

    def write(tmp) -> None:
        storage.SetFileName(os.fspath(tmp))
        with quiet_itk() as native:
            written = storage.WriteData(node)
        if not written:
            raise OSError(f"Slicer's {storage.GetClassName()} could not write it" + (f": {native[-1]}" if native else ""))

    try:
        atomic_write(path, write, overwrite=overwrite)
    finally:
        storage.SetFileName(path)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
