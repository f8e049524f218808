"""The MedSAM Segment Editor effect: drag a box in an axial slice view, preview, apply.

Thin on purpose: it turns mouse events and widgets into calls to ``MRMLBridge`` (where every
decision is made and tested on slicer-core) and shows the results. Qt and the Segment Editor
exist only inside Slicer, so this file is only checked by parsing and linting outside it.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

WINDOW_CHOICES = (
    ("Automatic (the view's if set, else CT abdomen / MR)", "auto"),
    ("Display (exactly as shown in the view)", "display"),
    ("CT abdomen (L40/W400)", "abdomen"),
    ("CT lung (L-160/W1500)", "lung"),
    ("CT bone (L400/W1000)", "bone"),
    ("CT brain (L40/W80)", "brain"),
    ("MR (0.5-99.5 percentiles)", "mr"),
)
MODE_CHOICES = (("3D (propagate)", "3d"), ("2D (this slice only)", "2d"))
DIRECTION_CHOICES = (("Up and down", "both"), ("Up (superior)", "up"), ("Down (inferior)", "down"))
COMBINE_CHOICES = (
    ("Replace on segmented slices", "slices"),
    ("Add to segment", "add"),
    ("Replace whole segment", "replace"),
)
ROI_REFERENCE_ROLE = "MedSAM.ROI"
MIN_BOX_PIXELS = 4


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """MedSAM: box-prompted segmentation with the MedSAM / LiteMedSAM models."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM"  # not translated: modules find effects by name
        scriptedEffect.title = "MedSAM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.rectangles = {}  # slice widget -> BoxPipeline
        self.boxCorners = None  # RAS corners of the last drawn box, with its view's normal
        self.boxNormal = None
        self.prediction = None
        self.cancelToken = None
        self.running = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return """<html>Segment the selected segment with <b>MedSAM</b> from a box.<br>
<p><ul style="margin: 0">
<li><b>Left-button drag</b> in an axial (Red) view: draw a box around the structure; a preview appears.
<li><b>Enter</b> or <b>Apply</b>: write the preview into the selected segment (Undo restores it).
<li><b>Escape</b> or <b>Cancel</b>: stop a running propagation, or drop the preview.
<li><b>ROI</b>: instead of drawing, select a markups ROI and press <b>Preview</b>; its height bounds the propagation.
</ul>
<p><b>3D</b> propagates slice by slice from the box and stops where the structure ends
(or at the ROI's top and bottom); <b>2D</b> segments the box's slice only, to refine one slice.
<b>Replace on segmented slices</b> keeps the segment on all other slices.
Other segments are overwritten only as the Masking section's <i>Modify other segments</i> says.
<p>The model sees the volume through the <b>intensity window</b>. <i>Automatic</i> uses the
window/level you set in the view, or, while the view's window is still Slicer's automatic one,
the CT abdomen window (CT) or percentile scaling (MR), as the models were trained.
Models, weights and the device (CPU, CUDA, Apple MPS) are chosen in the <b>MedSAM</b> module.
</html>"""

    # -- options ------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.modelSelector = qt.QComboBox()
        self.modelSelector.setToolTip("Model and weights (fine-tuned checkpoints from MedSAM Training are listed too).")
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelSelector)

        self.windowSelector = self._combo(WINDOW_CHOICES, "Intensity window the model sees.")
        self.scriptedEffect.addLabeledOptionsWidget("Intensity window:", self.windowSelector)

        self.modeSelector = self._combo(MODE_CHOICES, "3D: propagate through slices. 2D: only the box's slice.")
        self.scriptedEffect.addLabeledOptionsWidget("Mode:", self.modeSelector)

        self.directionSelector = self._combo(DIRECTION_CHOICES, "Which way 3D propagation goes from the box's slice.")
        self.scriptedEffect.addLabeledOptionsWidget("Propagate:", self.directionSelector)

        self.combineSelector = self._combo(COMBINE_CHOICES, "How the result is combined with the selected segment.")
        self.scriptedEffect.addLabeledOptionsWidget("Result:", self.combineSelector)

        self.roiSelector = slicer.qMRMLNodeComboBox()
        self.roiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.roiSelector.noneEnabled = True
        self.roiSelector.addEnabled = False
        self.roiSelector.removeEnabled = False
        self.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.roiSelector.setToolTip("Optional: segment inside this ROI (press Preview) instead of a drawn box.")
        self.scriptedEffect.addLabeledOptionsWidget("ROI:", self.roiSelector)

        self.previewButton = qt.QPushButton("Preview")
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.previewButton.setToolTip("Compute the result for the ROI (or the last drawn box) and show it.")
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip("Write the preview into the selected segment.")
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip("Stop the running propagation, or drop the preview.")
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.previewButton)
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for combo in (self.modelSelector, self.windowSelector, self.modeSelector, self.directionSelector, self.combineSelector):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.previewButton.connect("clicked()", self.onPreview)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    @staticmethod
    def _combo(choices, toolTip):
        combo = qt.QComboBox()
        for label, value in choices:
            combo.addItem(label, value)
        combo.setToolTip(toolTip)
        return combo

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("WINDOW", "auto")
        self.scriptedEffect.setParameterDefault("MODE", "3d")
        self.scriptedEffect.setParameterDefault("DIRECTION", "both")
        self.scriptedEffect.setParameterDefault("COMBINE", "slices")

    def updateGUIFromMRML(self):
        self._fillModels()
        for combo, name in (
            (self.windowSelector, "WINDOW"),
            (self.modeSelector, "MODE"),
            (self.directionSelector, "DIRECTION"),
            (self.combineSelector, "COMBINE"),
        ):
            wasBlocked = combo.blockSignals(True)
            index = combo.findData(self.scriptedEffect.parameter(name))
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(wasBlocked)
        self.directionSelector.enabled = self.scriptedEffect.parameter("MODE") == "3d"
        wasBlocked = self.roiSelector.blockSignals(True)
        self.roiSelector.setCurrentNode(self.scriptedEffect.parameterSetNode().GetNodeReference(ROI_REFERENCE_ROLE))
        self.roiSelector.blockSignals(wasBlocked)
        self._updateButtons()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("WINDOW", self.windowSelector.currentData)
        self.scriptedEffect.setParameter("MODE", self.modeSelector.currentData)
        self.scriptedEffect.setParameter("DIRECTION", self.directionSelector.currentData)
        self.scriptedEffect.setParameter("COMBINE", self.combineSelector.currentData)
        self.scriptedEffect.parameterSetNode().SetNodeReferenceID(ROI_REFERENCE_ROLE, self.roiSelector.currentNodeID)
        choice = self.modelSelector.currentData
        if choice:
            self._logic().setModelChoice(choice)
        self.directionSelector.enabled = self.modeSelector.currentData == "3d"

    def _fillModels(self):
        logic = self._logic()
        wasBlocked = self.modelSelector.blockSignals(True)
        self.modelSelector.clear()
        for label, choice in logic.modelChoices():
            self.modelSelector.addItem(label, choice)
        self.modelSelector.setCurrentIndex(max(self.modelSelector.findData(logic.modelChoice()), 0))
        self.modelSelector.blockSignals(wasBlocked)

    def _updateButtons(self):
        self.previewButton.enabled = not self.running
        self.applyButton.enabled = not self.running and (self.prediction is not None or self.boxCorners is not None)
        self.cancelButton.enabled = self.running or self.prediction is not None or self.boxCorners is not None

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self):
        self.statusLabel.text = "Drag a box around the structure in an axial view."

    def deactivate(self):
        self.onCancel()
        self._clearAll()

    def cleanup(self):
        self._clearAll()

    def sourceVolumeNodeChanged(self):
        self._clearAll()

    def _logic(self):
        # The module's logic holds the shared bridge, model choice and dependency set-up.
        import MedSAMSlicer

        return MedSAMSlicer.MedSAMSlicerLogic()

    # -- mouse --------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.running:
            return False
        anyModifier = callerInteractor.GetShiftKey() or callerInteractor.GetControlKey() or callerInteractor.GetAltKey()
        pipeline = self._pipeline(viewWidget)
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and not anyModifier:
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                return True
            self._clearAll()
            pipeline.start(callerInteractor.GetEventPosition())
            self._prefetch(viewWidget, callerInteractor.GetEventPosition())
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and pipeline.dragging:
            pipeline.move(callerInteractor.GetEventPosition())
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and pipeline.dragging:
            corners = pipeline.finish(callerInteractor.GetEventPosition())
            if corners is None:
                return True
            self.boxCorners = [self.xyToRas(xy, viewWidget) for xy in corners]
            sliceToRas = viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS()
            self.boxNormal = [sliceToRas.GetElement(r, 2) for r in range(3)]
            pipeline.setRas(self.boxCorners)
            self.onPreview(useRoi=False)
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            if key in ("Return", "KP_Enter") and (self.prediction is not None or self.boxCorners is not None):
                self.onApply()
                return True
            if key == "Escape" and (self.prediction is not None or self.boxCorners is not None):
                self.onCancel()
                return True
        return False

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        pipeline = self.rectangles.get(viewWidget)
        if pipeline is not None:
            pipeline.update()

    def _pipeline(self, viewWidget):
        if viewWidget not in self.rectangles:
            pipeline = BoxPipeline(viewWidget)
            self.scriptedEffect.addActor2D(viewWidget, pipeline.actor)
            self.rectangles[viewWidget] = pipeline
        return self.rectangles[viewWidget]

    def _prefetch(self, viewWidget, xy):
        """Encode slices near the click in the background, so the preview comes at once."""
        logic = self._logic()
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if volumeNode is None or not logic.dependenciesReady():
            return
        try:
            logic.bridge().prefetch_around(volumeNode, self.xyToRas(xy, viewWidget), window=self.scriptedEffect.parameter("WINDOW"))
        except Exception as exc:  # a prefetch is only an optimisation
            logging.debug(f"MedSAM prefetch skipped: {exc}")

    # -- actions ------------------------------------------------------------------------------
    def onPreview(self, useRoi=True):
        """Compute the result for the ROI (if selected and ``useRoi``) or the last drawn box."""
        from MedSAMSlicerLib.errors import MedSAMError
        from MedSAMSlicerLib.progress import Cancelled, CancelToken
        from SegmentEditorMedSAMLib import MRMLBridge

        logic = self._logic()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        roiNode = parameterSetNode.GetNodeReference(ROI_REFERENCE_ROLE) if useRoi else None
        if roiNode is None and self.boxCorners is None:
            self.statusLabel.text = "Draw a box in an axial view, or select an ROI."
            return
        if not logic.setupPythonRequirements():
            self.statusLabel.text = "MedSAM needs PyTorch: install it when asked (see the MedSAM module)."
            return
        bridge = logic.bridge()
        self.cancelToken = CancelToken()
        self._setRunning(True)
        try:
            src = MRMLBridge.source_volume(volumeNode)
            if roiNode is not None:
                prompt = MRMLBridge.prompt_from_roi(src, roiNode)
            else:
                prompt = MRMLBridge.prompt_from_points(src, self.boxCorners, self.boxNormal)
            self.prediction = bridge.predict(
                volumeNode,
                prompt,
                mode=self.scriptedEffect.parameter("MODE"),
                direction=self.scriptedEffect.parameter("DIRECTION"),
                window=self.scriptedEffect.parameter("WINDOW"),
                progress=self._onProgress,
                cancel=self.cancelToken,
            )
            bridge.show_preview(self.prediction, segmentationNode, parameterSetNode.GetSelectedSegmentID())
            notes = "; ".join(f"{k}: {v}" for k, v in self.prediction.notes.items())
            self.statusLabel.text = (
                f"Preview: {self.prediction.voxel_count} voxels on {len(self.prediction.covered)} slice(s). "
                f"{notes} Press Apply (Enter) to keep it."
            )
        except Cancelled:
            self.prediction = None
            self.statusLabel.text = "Cancelled: nothing was changed."
        except MedSAMError as exc:
            self.prediction = None
            self.statusLabel.text = str(exc)
        except Exception as exc:
            self.prediction = None
            logging.exception("MedSAM preview failed")
            slicer.util.errorDisplay(f"MedSAM failed: {exc}")
        finally:
            self._setRunning(False)

    def onApply(self):
        if self.prediction is None:
            self.onPreview(useRoi=self.boxCorners is None)
            if self.prediction is None:
                return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        bridge = self._logic().bridge()
        modes = {
            "set": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
            "add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
            "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove,
        }
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            edits = bridge.modifications(
                self.prediction,
                segmentationNode,
                self.scriptedEffect.defaultModifierLabelmap(),
                self.scriptedEffect.parameter("COMBINE"),
            )
            self.scriptedEffect.saveStateForUndo()
            for labelmap, mode in edits:
                self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, modes[mode])
            self.statusLabel.text = "Applied. Undo restores the segment."
        finally:
            qt.QApplication.restoreOverrideCursor()
        self._clearAll()

    def onCancel(self):
        if self.running and self.cancelToken is not None:
            self.cancelToken.cancel()
            return
        self._clearAll()
        self.statusLabel.text = "Drag a box around the structure in an axial view."

    def _onProgress(self, done, total, message):
        self.progressBar.maximum = max(total, 1)
        self.progressBar.value = done
        self.progressBar.format = f"{message} (%v/%m)"
        slicer.app.processEvents()  # keeps Cancel clickable

    def _setRunning(self, running):
        self.running = running
        self.progressBar.setVisible(running)
        self.progressBar.value = 0
        if running:
            qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
        else:
            qt.QApplication.restoreOverrideCursor()
        self._updateButtons()

    def _clearAll(self):
        self.prediction = None
        self.boxCorners = None
        self.boxNormal = None
        bridge = self._logic().bridge(create=False)
        if bridge is not None:
            bridge.clear_preview()
        for viewWidget, pipeline in self.rectangles.items():
            pipeline.clear()
            viewWidget.sliceView().scheduleRender()
        if hasattr(self, "applyButton"):
            self._updateButtons()


class BoxPipeline:
    """The rectangle drawn in one slice view (a 2D actor, like the Scissors effect's outline)."""

    def __init__(self, sliceWidget):
        self.sliceWidget = sliceWidget
        self.dragging = False
        self.startXy = None
        self.rasCorners = None
        self.points = vtk.vtkPoints()
        self.polyData = vtk.vtkPolyData()
        self.polyData.SetPoints(self.points)
        lines = vtk.vtkCellArray()
        self.polyData.SetLines(lines)
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(self.polyData)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(mapper)
        self.actor.GetProperty().SetColor(1.0, 1.0, 0.0)
        self.actor.GetProperty().SetLineWidth(2)

    def start(self, xy):
        self.dragging = True
        self.startXy = xy
        self.rasCorners = None
        self._draw([xy, xy, xy, xy])

    def move(self, xy):
        x0, y0 = self.startXy
        self._draw([(x0, y0), (xy[0], y0), (xy[0], xy[1]), (x0, xy[1])])

    def finish(self, xy):
        """The four corners in view pixels, or None for a click without a real drag."""
        self.dragging = False
        x0, y0 = self.startXy
        if abs(xy[0] - x0) < MIN_BOX_PIXELS or abs(xy[1] - y0) < MIN_BOX_PIXELS:
            self.clear()
            return None
        corners = [(x0, y0), (xy[0], y0), (xy[0], xy[1]), (x0, xy[1])]
        self._draw(corners)
        return corners

    def setRas(self, rasCorners):
        """Keep the box where it is in the patient when the view pans or zooms."""
        self.rasCorners = rasCorners

    def update(self):
        if self.rasCorners is None or self.dragging:
            return
        rasToXy = vtk.vtkTransform()
        rasToXy.SetMatrix(self.sliceWidget.sliceLogic().GetSliceNode().GetXYToRAS())
        rasToXy.Inverse()
        self._draw([rasToXy.TransformPoint(p)[:2] for p in self.rasCorners])

    def clear(self):
        self.dragging = False
        self.rasCorners = None
        self.points.Reset()
        self.polyData.GetLines().Initialize()
        self.polyData.Modified()

    def _draw(self, corners):
        self.points.Reset()
        for x, y in corners:
            self.points.InsertNextPoint(x, y, 0.0)
        lines = vtk.vtkCellArray()
        lines.InsertNextCell(5)
        for index in (0, 1, 2, 3, 0):
            lines.InsertCellPoint(index)
        self.polyData.SetLines(lines)
        self.polyData.Modified()
        self.sliceWidget.sliceView().scheduleRender()
