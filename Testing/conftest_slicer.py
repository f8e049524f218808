"""Fixtures for tests on real MRML nodes through slicer-core (no Slicer application, no Qt).

Use from a test module with ``pytest_plugins = ["conftest_slicer"]``; helpers are in
``slicer_helpers``.

The scene is built by ``MedSAMBridgeLib.headless.create_headless_scene`` (the same
bootstrap the headless script uses) and the CT and its reference labels are loaded through the
Volumes module logic and storage nodes. One LiteMedSAM segmenter is shared by all tests on CPU;
tests keep their boxes on slices 14..23 of the 30-slice CT, so the slice embeddings are computed
once and every later test only runs the light decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from slicer_helpers import slicer


@dataclass
class CTScene:
    """A fresh scene with the small CT and its reference labels loaded."""

    scene: object
    ct: object  # vtkMRMLScalarVolumeNode
    labels: object  # vtkMRMLLabelMapVolumeNode on the CT's grid

    def label_array(self, value: int) -> np.ndarray:
        """Reference mask, ``(k, j, i)`` bool on the CT grid."""
        return slicer.util.arrayFromVolume(self.labels) == value

    def new_segmentation(self, name: str = "Segmentation"):
        """A segmentation whose geometry is the CT's (as the Segment Editor sets it)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.ct)
        return node


@pytest.fixture
def headless_scene():
    """A fresh MRML scene with Volumes/Segmentations logics (``slicer.mrmlScene`` set)."""
    from MedSAMBridgeLib.headless import create_headless_scene

    return create_headless_scene()


@pytest.fixture
def ct_scene(headless_scene, ct_sm_path, ct_sm_seg_path) -> CTScene:
    """The 30-slice CT and its TotalSegmentator labels, loaded through storage nodes."""
    from MedSAMBridgeLib.headless import load_volume

    ct = load_volume(ct_sm_path, "CT")
    labels = load_volume(ct_sm_seg_path, "labels", labelmap=True)
    return CTScene(headless_scene, ct, labels)


@pytest.fixture(scope="session")
def shared_segmenter(lite_segmenter):
    """LiteMedSAM on CPU, shared by every test (and by bridges made with default arguments): the
    engine's ``shared_segmenter``, which is also ``lite_segmenter``."""
    return lite_segmenter


@pytest.fixture
def bridge(shared_segmenter):
    """A bridge on the shared segmenter."""
    from MedSAMBridgeLib.MRMLBridge import MedSAMBridge

    return MedSAMBridge("litemedsam", None, "cpu", segmenter=shared_segmenter)
