"""The preview of a result: a separate, unsaved segmentation node over the target, one per holder
node (each Segment Editor keeps its own, as Slicer's auto-complete effects do)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import slicer

from .labelmaps import modifications

if TYPE_CHECKING:  # the engine's result type, for annotations only
    from .predictions import Prediction

PREVIEW_NODE_NAME = "MedSAM preview"
#: Node reference role, on a holder node, of the preview segmentation node. For the effect the
#: holder is its parameter set node and the role is what ``scriptedEffect.setNodeReference("Preview",
#: node)`` writes for an effect named "MedSAM" (qSlicerSegmentEditorAbstractEffect.cxx).
PREVIEW_REFERENCE_ROLE = "MedSAM.Preview"
#: Attribute on the preview segmentation node naming the segmentation it previews.
PREVIEW_TARGET_ATTRIBUTE = "MedSAM.PreviewTarget"


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
    ((image, _),) = modifications(prediction, segmentation_node, None, "add")
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
