"""The MedSAM Segment Editor effect: drag a box in an axial slice view, preview, apply.

Thin on purpose: it turns mouse events and widgets into calls to ``MedSAMBridgeLib.MRMLBridge``
(where every decision is made and tested on slicer-core) and shows the results.

Slicer loads this file under the name of its folder, ``SegmentEditorMedSAMLib``
(``qSlicerSegmentEditorScriptedEffect::setPythonSource``), so the folder holds nothing else and
this file imports our packages by their absolute names only.

The model runs in a worker thread (``MedSAMSlicerLib.background``): the mouse handler only reads
the scene and starts the work; a zero-interval timer pumps the worker, which also gives it the
Python GIL that Slicer's idle event loop would otherwise keep; the result is shown when it is done.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MedSAMBridgeLib.choices import COMBINE_CHOICES, DIRECTION_CHOICES, MODE_CHOICES, WINDOW_CHOICES

ROI_REFERENCE_ROLE = "MedSAM.ROI"
MIN_BOX_PIXELS = 4
#: Seconds each timer tick waits for the worker (the GUI handles events between ticks).
PUMP_BUDGET_S = 0.03
#: Slices encoded around the click while the box is being dragged.
PREFETCH_RADIUS = 3


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """MedSAM: box-prompted segmentation with the MedSAM / LiteMedSAM models."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM"  # not translated: modules find effects by name
        scriptedEffect.title = "MedSAM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.rectangles = {}  # slice widget -> BoxPipeline
        self.boxCorners = None  # RAS corners of the last drawn box
        self.boxNormal = None  # and its view's normal
        self.prediction = None
        self.previewSegmentId = None
        self.previousPreviews = []  # the previews before each correction (Undo correction)
        self.correcting = False  # the running prediction corrects self.prediction
        self.lastApplied = None  # (prediction, segment id) of the last Apply: a slice marked good re-propagates it
        self.replaceOnApply = False  # a correction of the applied segment replaces it
        self.reviewSlice = None  # the doubtful slice last shown
        self.lastSliceWidget = None  # the view the user last drew in
        self.queue = {}  # segment id -> PredictionRequest: boxes for several segments, run as one job
        self.segmentBoxes = {}  # segment id -> boxlist.SegmentBoxes: several boxes make one structure
        self.listPipelines = {}  # slice widget -> [BoxPipeline]: the listed boxes shown in that view
        self.task = None  # the running BackgroundTask
        self.taskKind = None  # "prefetch" or "predict"
        self.applyWhenDone = False
        self.install = None  # MedSAMSlicer.InstallPump while first-use installs run
        self.afterInstall = None  # what to do when they succeed (dropped when the effect is left)
        self.connections = []  # (widget, signal, slot), disconnected in cleanup()
        self.sceneObserver = None
        self.choices = []
        self.pumpTimer = qt.QTimer()
        self.pumpTimer.setInterval(0)
        self.pumpTimer.connect("timeout()", self.onPump)

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
<li><b>Cancel</b>: stop a running propagation, or drop the preview. (<b>Esc</b> leaves the effect,
which also stops a run and drops the preview.)
<li><b>ROI</b>: instead of drawing, select a markups ROI and press <b>Preview</b>; its height bounds the propagation.
<li><b>Correct</b> a 3D preview: draw a box on a wrong slice; that slice and the first box's are kept
(locked) and the structure is propagated again from the new box up to the next locked slice.
<b>Accept slice</b> locks the slice shown in the view as it is (also after Paint/Erase on the applied
segment: it is propagated again from there). <b>Undo correction</b> goes back one step;
<b>Next doubtful slice</b> shows the slices the model was least sure of.
<li><b>Several boxes, one segment</b>: with <i>Add boxes</i> checked, each box drawn is added to the
selected segment's boxes (listed under <i>Boxes</i>, shown in the views on their slice) and
<b>Preview</b> segments them as one structure: boxes on one slice are its pieces, boxes on several slices
its key slices. To move a box, select it in the list and draw it again on its slice; <b>Delete box</b>
and <b>Clear boxes</b> remove boxes.
<li><b>Queue</b> (several structures): with <i>Queue boxes</i> checked, each box drawn is kept for the
selected segment; select the next segment and draw again; <b>Run queue</b> segments them all as one
job (each slice is computed once; where two structures meet, the model's confidence decides) and
writes each into its segment (one Undo restores them all).
</ul>
<p><b>3D</b> propagates slice by slice from the box and stops where the structure ends
(or at the ROI's top and bottom); <b>2D</b> segments the box's slice only, to refine one slice.
<b>Replace on segmented slices</b> keeps the segment on all other slices.
Other segments are overwritten only as the Masking section's <i>Modify other segments</i> says.
<p>The model sees the volume through the <b>intensity window</b>. <i>Automatic</i> uses the
window/level you set in the view, or, while the view's window is still Slicer's automatic one,
the CT abdomen window (CT) or percentile scaling (MR), as the models were trained.
The model runs in the background: Slicer stays usable, and the options are locked until it ends.
Models, weights and the device (CPU, CUDA, Apple MPS) are chosen in the <b>MedSAM</b> module.
<b>Speed</b>: <i>Exact</i> runs the model as trained; the faster settings use OpenVINO and (fastest)
interpolate every 2nd slice; each one's tooltip says what it costs.
</html>"""

    # -- options ------------------------------------------------------------------------------
    def _addOptionsRow(self, *widgets):
        """Put ``widgets`` side by side in one row of the effect's options."""
        row = qt.QHBoxLayout()
        for widget in widgets:
            row.addWidget(widget)
        self.scriptedEffect.addOptionsWidget(row)

    def setupOptionsFrame(self):
        self.modelSelector = qt.QComboBox()
        self.modelSelector.setToolTip("Model and weights (fine-tuned checkpoints from MedSAM Training are listed too).")
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelSelector)
        self.speedSelector = qt.QComboBox()
        self.speedSelector.setToolTip("What the model may trade for speed on a CPU (each setting's tooltip says the cost).")
        self.scriptedEffect.addLabeledOptionsWidget("Speed:", self.speedSelector)

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
        self._addOptionsRow(self.previewButton, self.applyButton, self.cancelButton)

        self.acceptSliceButton = qt.QPushButton("Accept slice")
        self.acceptSliceButton.setToolTip("Lock the slice shown in the view as it is (after Paint/Erase too) and "
                                          "propagate again from it.")
        self.undoCorrectionButton = qt.QPushButton("Undo correction")
        self.undoCorrectionButton.setToolTip("Go back to the preview before the last correction.")
        self.nextDoubtfulButton = qt.QPushButton("Next doubtful slice")
        self.nextDoubtfulButton.setToolTip("Show the next slice the model was least sure of (predicted IoU, "
                                           "narrow/wide box agreement, overlap with the previous slice).")
        self._addOptionsRow(self.acceptSliceButton, self.undoCorrectionButton, self.nextDoubtfulButton)
        self.queueCheckBox = qt.QCheckBox("Queue boxes")
        self.queueCheckBox.setToolTip("Keep each drawn box for the selected segment, then run them all as one job.")
        self.runQueueButton = qt.QPushButton("Run queue")
        self.runQueueButton.setToolTip("Segment every queued box into its segment, as one job.")
        self.clearQueueButton = qt.QPushButton("Clear queue")
        self._addOptionsRow(self.queueCheckBox, self.runQueueButton, self.clearQueueButton)
        self.addBoxesCheckBox = qt.QCheckBox("Add boxes")
        self.addBoxesCheckBox.setToolTip("Add each drawn box to the selected segment's boxes (one structure: pieces on "
                                         "one slice, key slices on several); press Preview to segment them.")
        self.boxSelector = qt.QComboBox()
        self.boxSelector.setToolTip("The selected segment's boxes (slice, size). Select one and draw on its slice to "
                                    "move it; selecting it shows its slice.")
        self.deleteBoxButton = qt.QPushButton("Delete box")
        self.deleteBoxButton.setToolTip("Remove the box selected in the list.")
        self.clearBoxesButton = qt.QPushButton("Clear boxes")
        self.clearBoxesButton.setToolTip("Remove all boxes of the selected segment.")
        self._addOptionsRow(self.addBoxesCheckBox, self.deleteBoxButton, self.clearBoxesButton)
        self.scriptedEffect.addLabeledOptionsWidget("Boxes:", self.boxSelector)
        self.reviewLabel = qt.QLabel()
        self.reviewLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.reviewLabel)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for combo in (self.windowSelector, self.modeSelector, self.directionSelector, self.combineSelector):
            self._connect(combo, "currentIndexChanged(int)", self.updateMRMLFromGUI)
        self._connect(self.modelSelector, "currentIndexChanged(int)", self.onModelChanged)
        self._connect(self.speedSelector, "currentIndexChanged(int)", self.onSpeedChanged)
        self._connect(self.roiSelector, "currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self._connect(self.previewButton, "clicked()", self.onPreview)
        self._connect(self.applyButton, "clicked()", self.onApply)
        self._connect(self.cancelButton, "clicked()", self.onCancel)
        self._connect(self.acceptSliceButton, "clicked()", self.onAcceptSlice)
        self._connect(self.undoCorrectionButton, "clicked()", self.onUndoCorrection)
        self._connect(self.nextDoubtfulButton, "clicked()", self.onNextDoubtful)
        self._connect(self.runQueueButton, "clicked()", self.onRunQueue)
        self._connect(self.clearQueueButton, "clicked()", self.onClearQueue)
        self._connect(self.boxSelector, "currentIndexChanged(int)", self.onBoxSelected)
        self._connect(self.deleteBoxButton, "clicked()", self.onDeleteBox)
        self._connect(self.clearBoxesButton, "clicked()", self.onClearBoxes)

    def _connect(self, widget, signal, slot):
        widget.connect(signal, slot)
        self.connections.append((widget, signal, slot))

    @staticmethod
    def _combo(choices, toolTip):
        combo = qt.QComboBox()
        for value, label in choices:
            combo.addItem(label, value)
        combo.setToolTip(toolTip)
        return combo

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("WINDOW", "auto")
        self.scriptedEffect.setParameterDefault("MODE", "3d")
        self.scriptedEffect.setParameterDefault("DIRECTION", "both")
        self.scriptedEffect.setParameterDefault("COMBINE", "slices")

    def updateGUIFromMRML(self):
        # Slicer calls this on every parameter change of every effect (qMRMLSegmentEditorWidget.cxx):
        # only cheap widget updates here; the model list is filled in activate().
        for combo, name in (
            (self.windowSelector, "WINDOW"),
            (self.modeSelector, "MODE"),
            (self.directionSelector, "DIRECTION"),
            (self.combineSelector, "COMBINE"),
        ):
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(combo.findData(self.scriptedEffect.parameter(name)), 0))
            combo.blockSignals(wasBlocked)
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        wasBlocked = self.roiSelector.blockSignals(True)
        self.roiSelector.setCurrentNode(parameterSetNode.GetNodeReference(ROI_REFERENCE_ROLE) if parameterSetNode else None)
        self.roiSelector.blockSignals(wasBlocked)
        self._fillBoxList()  # the selected segment's boxes (the selection may have changed)
        self._updateWidgets()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("WINDOW", self.windowSelector.currentData)
        self.scriptedEffect.setParameter("MODE", self.modeSelector.currentData)
        self.scriptedEffect.setParameter("DIRECTION", self.directionSelector.currentData)
        self.scriptedEffect.setParameter("COMBINE", self.combineSelector.currentData)
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode:
            parameterSetNode.SetNodeReferenceID(ROI_REFERENCE_ROLE, self.roiSelector.currentNodeID)

    def _fillModels(self):
        """One scan of the checkpoint folder (no torch import): when the effect is activated."""
        logic = self._logic()
        current = logic.modelChoice()
        self.choices = logic.modelChoices()
        wasBlocked = self.modelSelector.blockSignals(True)
        self.modelSelector.clear()
        for choice in self.choices:
            self.modelSelector.addItem(choice.label())
        self.modelSelector.setCurrentIndex(self.choices.index(current) if current in self.choices else 0)
        self.modelSelector.blockSignals(wasBlocked)

    def onModelChanged(self, index):
        if 0 <= index < len(self.choices):
            self._logic().setModelChoice(self.choices[index])

    def _fillSpeeds(self):
        import MedSAMSlicer

        MedSAMSlicer.fillSpeedSelector(self.speedSelector, self._logic().speed())

    def onSpeedChanged(self, index):
        speed = self.speedSelector.itemData(index)
        setup = self._logic().speedSetup(speed)
        self._fillSpeeds()  # the setting in force until what it needs is installed
        self._whenReady(lambda: self._useSpeed(speed), setup)

    def _useSpeed(self, speed):
        self._logic().useSpeed(speed)
        self._fillSpeeds()

    # -- first use: installs in the background (rules: MedSAMBridgeLib.installs) -------------------
    def _whenReady(self, then, setup=None):
        """``then()`` now when everything is installed; otherwise the one question, then the
        installs in the background (the GUI stays live), then ``then()``. Declining or a failure
        ends in one status line and changes nothing."""
        import MedSAMSlicer

        logic = self._logic()
        setup = setup or logic.firstUse()
        if setup.ready:
            then()
            return
        if setup.problem:
            self.statusLabel.text = setup.message
            return
        if not logic.askToInstall(setup):
            self.statusLabel.text = setup.declined()
            return
        self.afterInstall = then
        self.install = MedSAMSlicer.InstallPump(setup, self.statusLabel, self.progressBar, self._onInstallDone)
        self.install.start()
        self._updateWidgets()

    def _onInstallDone(self, ok):
        then, self.afterInstall, self.install = self.afterInstall, None, None
        self._fillSpeeds()  # what is in force now
        self._updateWidgets()
        if ok and then is not None:
            then()

    def _stopInstall(self):
        if self.install is not None:
            self.install.cancel()
            self.install.cleanup()
            self.install = None
            self.afterInstall = None

    def _updateWidgets(self):
        running = self._modelRunning() or self.install is not None
        # While the model runs (or first-use installs), nothing that would change its inputs can be touched.
        for widget in (self.modelSelector, self.speedSelector, self.windowSelector, self.modeSelector, self.directionSelector,
                       self.combineSelector, self.roiSelector, self.previewButton):
            widget.enabled = not running
        self.directionSelector.enabled = not running and self.scriptedEffect.parameter("MODE") == "3d"
        drawn = self.boxCorners is not None or bool(self._boxes(create=False))
        self.applyButton.enabled = not running and (self.prediction is not None or drawn)
        self.cancelButton.enabled = running or self.prediction is not None or self.boxCorners is not None
        if self.install is None:  # an install shows its own progress
            self.progressBar.setVisible(running)
        self.acceptSliceButton.enabled = not running and (self._correctable() or self.lastApplied is not None)
        self.undoCorrectionButton.enabled = not running and bool(self.previousPreviews)
        self.nextDoubtfulButton.enabled = not running and self._correctable()
        self.runQueueButton.enabled = not running and bool(self.queue)
        self.clearQueueButton.enabled = not running and bool(self.queue)
        self.queueCheckBox.enabled = not running
        self.addBoxesCheckBox.enabled = not running
        self.boxSelector.enabled = not running
        self.deleteBoxButton.enabled = not running and self.boxSelector.currentIndex > 0
        self.clearBoxesButton.enabled = not running and bool(self._boxes(create=False))

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self):
        self._fillModels()
        self._fillSpeeds()
        if self.sceneObserver is None:
            self.sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self._onSceneClose)
        self.statusLabel.text = "Drag a box around the structure in an axial view."
        self._updateWidgets()

    def deactivate(self):
        # Also what Esc does: the Segment Editor's Esc shortcut deselects the active effect.
        # A running install goes on (stopping pip midway helps nobody); only its follow-up is dropped.
        self.afterInstall = None
        self._stopTask()
        self._clearAll()
        self._removeActors()

    def cleanup(self):
        # Since Slicer 5.10 called when the effect's Segment Editor widget is destroyed; it only
        # touches this effect's own state (its own parameter set node's preview).
        self._stopTask()
        self._stopInstall()
        self.pumpTimer.stop()
        # The timer's connection holds this effect: undone here, or the effect is never freed
        # (AbstractScriptedSegmentEditorEffect.cleanup's docstring, v5.10.0 / v5.12.3; Slicer issue 7392).
        self.pumpTimer.disconnect("timeout()", self.onPump)
        self._clearAll()
        self._removeActors()
        for widget, signal, slot in self.connections:
            widget.disconnect(signal, slot)
        self.connections = []
        if self.sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self.sceneObserver)
            self.sceneObserver = None

    def sourceVolumeNodeChanged(self):
        self._stopTask()
        self._clearAll()
        self.lastApplied = None
        self.segmentBoxes = {}
        self._showListBoxes()

    def _onSceneClose(self, caller, event):
        self._stopTask()
        self.prediction = None
        self.boxCorners = None
        self.previousPreviews = []
        self.lastApplied = None
        self.segmentBoxes = {}

    def _logic(self):
        # The module's logic holds the shared bridge, model choice and dependency set-up.
        import MedSAMSlicer

        return MedSAMSlicer.MedSAMSlicerLogic()

    # -- mouse --------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self._modelRunning() or self.install is not None:
            return False
        anyModifier = callerInteractor.GetShiftKey() or callerInteractor.GetControlKey() or callerInteractor.GetAltKey()
        pipeline = self._pipeline(viewWidget)
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and not anyModifier:
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                return True
            if self._correctable() or self.addBoxesCheckBox.checked:
                self._clearBoxes()  # a box drawn on a 3D preview corrects it; an added box keeps the preview
            else:
                self._clearAll()
            self.lastSliceWidget = viewWidget
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
            if self.addBoxesCheckBox.checked:
                corners, self.boxCorners = self.boxCorners, None
                pipeline.clear()
                self._addBox(corners, self.boxNormal)
                return True
            pipeline.setRas(self.boxCorners)
            self.onPreview(useRoi=False)
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            if key in ("Return", "KP_Enter") and (self.prediction is not None or self.boxCorners is not None
                                                  or self._boxes(create=False)):
                self.onApply()
                return True
        return False

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        pipeline = self.rectangles.get(viewWidget)
        if pipeline is not None:
            pipeline.update()
        if viewWidget in self.listPipelines:
            self._showListBoxes([viewWidget])  # scrolled: the boxes on the slice now shown

    def _pipeline(self, viewWidget):
        if viewWidget not in self.rectangles:
            pipeline = BoxPipeline(viewWidget)
            self.scriptedEffect.addActor2D(viewWidget, pipeline.actor)
            self.rectangles[viewWidget] = pipeline
        return self.rectangles[viewWidget]

    def _removeActors(self):
        for viewWidget, pipeline in self.rectangles.items():
            self.scriptedEffect.removeActor2D(viewWidget, pipeline.actor)
        self.rectangles = {}
        for viewWidget, pipelines in self.listPipelines.items():
            for pipeline in pipelines:
                self.scriptedEffect.removeActor2D(viewWidget, pipeline.actor)
        self.listPipelines = {}

    # -- background work ----------------------------------------------------------------------
    def _prefetch(self, viewWidget, xy):
        """Encode slices near the click while the box is dragged, so the preview comes sooner."""
        logic = self._logic()
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if volumeNode is None or self.task is not None or not logic.dependenciesReady():
            return
        try:
            task = logic.bridge().prefetch_around(volumeNode, self.xyToRas(xy, viewWidget), radius=PREFETCH_RADIUS,
                                                  window=self.scriptedEffect.parameter("WINDOW"))
        except Exception as exc:  # a prefetch is only an optimisation
            logging.debug(f"MedSAM prefetch skipped: {exc}")
            return
        self._startTask(task, "prefetch")

    def _startTask(self, task, kind):
        self.task, self.taskKind = task, kind
        self.pumpTimer.start()
        self._updateWidgets()

    def _stopTask(self):
        """Cancel the running work and forget it. Not waited for: the worker stops at its next
        slice whenever it next gets the GIL, and its result is dropped (blocking the GUI thread for
        a slice of ViT-B on a CPU could take many seconds)."""
        task, self.task, self.taskKind = self.task, None, None
        self.applyWhenDone = False
        self.pumpTimer.stop()
        if task is not None:
            task.cancel()
        if hasattr(self, "progressBar"):
            self._updateWidgets()

    def onPump(self):
        """Timer tick: let the worker run for a moment (releasing the GIL) and show its progress."""
        task, kind = self.task, self.taskKind
        if task is None:
            self.pumpTimer.stop()
            return
        for done, total, message in task.pump(PUMP_BUDGET_S):
            if kind in ("predict", "queue"):
                self.progressBar.maximum = max(total, 1)
                self.progressBar.value = done
                self.progressBar.format = f"{message} (%v/%m)"
        if not task.done:
            return
        self.pumpTimer.stop()
        self.task, self.taskKind = None, None
        if kind == "predict":
            self._onPredictionDone(task)
        elif kind == "queue":
            self._onQueueDone(task)
        self._updateWidgets()

    # -- actions ------------------------------------------------------------------------------
    def onPreview(self, useRoi=True):
        """Start computing the result for the ROI (if selected and ``useRoi``) or the last drawn box."""
        from MedSAMBridgeLib import MRMLBridge
        from MedSAMSlicerLib.errors import MedSAMError

        if self._modelRunning():
            return
        self._stopTask()  # a prefetch: what it encoded stays in the cache
        logic = self._logic()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        roiNode = parameterSetNode.GetNodeReference(ROI_REFERENCE_ROLE) if useRoi else None
        boxes = self._boxes(create=False) if roiNode is None and self.boxCorners is None else None
        if roiNode is None and self.boxCorners is None and not boxes:
            self.statusLabel.text = "Draw a box in an axial view, or select an ROI."
            return
        if not logic.firstUse().ready:
            # First use: one question, then PyTorch, scipy and the weights are installed in the
            # background; the preview follows when they are in (the box is kept meanwhile).
            self._whenReady(lambda: self.onPreview(useRoi))
            return
        if boxes:
            self._previewBoxes(boxes, logic.bridge(), volumeNode)
            return
        try:
            src = MRMLBridge.source_volume(volumeNode)
            if roiNode is not None:
                prompt = MRMLBridge.prompt_from_roi(src, roiNode)
            else:
                prompt = MRMLBridge.prompt_from_points(src, self.boxCorners, self.boxNormal)
            bridge = logic.bridge()
            if roiNode is None and self.queueCheckBox.checked:
                self._queueBox(bridge, volumeNode, prompt)
                return
            self.correcting = roiNode is None and self._correctable()
            if self.correcting:
                request = bridge.correction_request(self.prediction, prompt)
            else:
                request = bridge.request(
                    volumeNode,
                    prompt,
                    mode=self.scriptedEffect.parameter("MODE"),
                    direction=self.scriptedEffect.parameter("DIRECTION"),
                    window=self.scriptedEffect.parameter("WINDOW"),
                )
                self.previousPreviews = []
                self.replaceOnApply = False
        except MedSAMError as exc:
            self.statusLabel.text = str(exc)
            return
        self._runPrediction(bridge, request, "Correcting: propagating again from the new box..." if self.correcting
                            else "Segmenting... (Cancel stops it)")

    # -- several boxes, one segment (rules: MedSAMBridgeLib.boxlist) --------------------------------
    def _boxes(self, create=True):
        """The selected segment's boxes (None when it has none and ``create`` is False)."""
        from MedSAMBridgeLib.boxlist import SegmentBoxes

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentId = parameterSetNode.GetSelectedSegmentID() if parameterSetNode is not None else None
        if not segmentId:
            return None
        if segmentId not in self.segmentBoxes and create:
            self.segmentBoxes[segmentId] = SegmentBoxes()
        return self.segmentBoxes.get(segmentId)

    def _addBox(self, corners, normal):
        """A box drawn with Add boxes checked: added to the selected segment's boxes (or, drawn on
        the selected box's slice, replacing it)."""
        from MedSAMBridgeLib import MRMLBridge
        from MedSAMBridgeLib.boxlist import DrawnBox
        from MedSAMSlicerLib.errors import MedSAMError

        boxes = self._boxes()
        if boxes is None:
            return
        try:
            src = MRMLBridge.source_volume(self.scriptedEffect.parameterSetNode().GetSourceVolumeNode())
            prompt = MRMLBridge.prompt_from_points(src, corners, normal)
            selected = self.boxSelector.currentIndex - 1  # item 0 is "(new box)"
            index = boxes.draw(src, DrawnBox(prompt, [list(c) for c in corners]), selected if selected >= 0 else None)
        except MedSAMError as exc:
            self.statusLabel.text = str(exc)
            return
        moved = "Moved" if index == selected else "Added"
        self._fillBoxList()
        self._showListBoxes()
        self.statusLabel.text = f"{moved} {boxes.row(index)}. {boxes.summary()} Press Preview to segment them."
        self._updateWidgets()

    def _previewBoxes(self, boxes, bridge, volumeNode):
        from MedSAMSlicerLib.errors import MedSAMError

        queued = self.queueCheckBox.checked
        try:
            request = boxes.request(bridge, volumeNode, mode="3d" if queued else self.scriptedEffect.parameter("MODE"),
                                    direction=self.scriptedEffect.parameter("DIRECTION"),
                                    window=self.scriptedEffect.parameter("WINDOW"))
        except MedSAMError as exc:
            self.statusLabel.text = str(exc)
            return
        if queued:
            self.queue[self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()] = request
            self.statusLabel.text = f"Queued {boxes.summary()} Select the next segment and draw, or press Run queue."
            self._updateWidgets()
            return
        self.correcting = False
        self.previousPreviews = []
        self.replaceOnApply = False
        self._runPrediction(bridge, request, f"Segmenting {boxes.summary()} (Cancel stops it)")

    def _fillBoxList(self):
        """The list shows the selected segment's boxes; item 0 "(new box)": a drawn box is added."""
        if not hasattr(self, "boxSelector"):
            return
        boxes = self._boxes(create=False)
        rows = boxes.rows() if boxes else []
        wasBlocked = self.boxSelector.blockSignals(True)
        self.boxSelector.clear()
        self.boxSelector.addItem("(new box)")
        for row in rows:
            self.boxSelector.addItem(row)
        self.boxSelector.setCurrentIndex(0)
        self.boxSelector.blockSignals(wasBlocked)

    def onBoxSelected(self, index):
        """Show the selected box's slice in every view (drawing there now moves the box)."""
        boxes = self._boxes(create=False)
        if boxes and 1 <= index <= len(boxes):
            corners = boxes.boxes[index - 1].corners_ras
            r, a, s = (sum(c[axis] for c in corners) / len(corners) for axis in range(3))
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
            self.statusLabel.text = f"{boxes.row(index - 1)}: draw on its slice to move it, or Delete box."
        self._showListBoxes()
        self._updateWidgets()

    def onDeleteBox(self):
        boxes = self._boxes(create=False)
        index = self.boxSelector.currentIndex - 1
        if not boxes or not 0 <= index < len(boxes):
            return
        row = boxes.row(index)
        boxes.delete(index)
        self._fillBoxList()
        self._showListBoxes()
        self.statusLabel.text = f"Deleted {row}. {boxes.summary()}"
        self._updateWidgets()

    def onClearBoxes(self):
        boxes = self._boxes(create=False)
        if boxes:
            boxes.clear()
        self._fillBoxList()
        self._showListBoxes()
        self.statusLabel.text = "Boxes cleared."
        self._updateWidgets()

    def _showListBoxes(self, views=None):
        """Draw the selected segment's boxes in each slice view that shows their slice."""
        boxes = self._boxes(create=False)
        selected = self.boxSelector.currentIndex - 1 if hasattr(self, "boxSelector") else -1
        for viewWidget in views or set(self.rectangles) | set(self.listPipelines):
            sliceToRas = viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS()
            shown = boxes.on_slice([sliceToRas.GetElement(r, 3) for r in range(3)]) if boxes else []
            pipelines = self.listPipelines.setdefault(viewWidget, [])
            while len(pipelines) < len(shown):
                pipeline = BoxPipeline(viewWidget)
                self.scriptedEffect.addActor2D(viewWidget, pipeline.actor)
                pipelines.append(pipeline)
            for pipeline, index in zip(pipelines, shown):
                pipeline.setRas(boxes.boxes[index].corners_ras)
                pipeline.setColor((1.0, 0.5, 0.0) if index == selected else (0.0, 1.0, 1.0))
                pipeline.update()
            for pipeline in pipelines[len(shown):]:
                pipeline.clear()
            viewWidget.sliceView().scheduleRender()

    def _queueBox(self, bridge, volumeNode, prompt):
        """Keep the drawn box for the selected segment (one per segment; drawing again replaces it)."""
        from MedSAMBridgeLib import reviewing

        request = bridge.request(volumeNode, prompt, mode="3d", direction=self.scriptedEffect.parameter("DIRECTION"),
                                 window=self.scriptedEffect.parameter("WINDOW"))
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        self.queue[segmentId] = request
        names = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in self.queue
                 if segmentationNode.GetSegmentation().GetSegment(s) is not None]
        self.statusLabel.text = (f"Queued a box on slice {reviewing.slice_name(request.source, prompt.z)} for "
                                 f"'{names[-1] if names else segmentId}'. Queue: {', '.join(names)}. Select the next "
                                 "segment and draw, or press Run queue.")
        self._updateWidgets()

    def onClearQueue(self):
        self.queue = {}
        self.statusLabel.text = "Queue cleared."
        self._updateWidgets()

    def onRunQueue(self):
        """Segment every queued box into its segment, as one job, in the background."""
        from MedSAMSlicerLib.background import run_in_background

        if self._modelRunning() or not self.queue:
            return
        self._stopTask()
        bridge = self._logic().bridge()
        requests = dict(self.queue)
        self.statusLabel.text = f"Segmenting {len(requests)} structures as one job... (Cancel stops it)"
        self.progressBar.value = 0
        self._startTask(run_in_background(lambda progress, cancel: bridge.compute_queue(requests, progress, cancel),
                                          "medsam-queue"), "queue")

    def _onQueueDone(self, task):
        from MedSAMBridgeLib import MRMLBridge
        from MedSAMSlicerLib.errors import MedSAMError
        from MedSAMSlicerLib.progress import Cancelled

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        try:
            predictions = task.result()
            for prediction in predictions.values():
                problem = MRMLBridge.volume_changed(prediction.source)
                if problem:
                    raise MedSAMError(problem + " Queue the boxes again.")
            if segmentationNode is None:
                raise MedSAMError("The segmentation was removed while MedSAM was running.")
        except Cancelled:
            self.statusLabel.text = "Cancelled: nothing was changed (the queue is kept)."
            return
        except MedSAMError as exc:
            self.statusLabel.text = str(exc)
            return
        except Exception as exc:
            logging.exception("MedSAM queue failed")
            slicer.util.errorDisplay(f"MedSAM failed: {exc}")
            return
        bridge = self._logic().bridge()
        selected = parameterSetNode.GetSelectedSegmentID()
        written = []
        self.scriptedEffect.saveStateForUndo()  # one Undo restores every segment of the job
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            for segmentId, prediction in predictions.items():
                segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
                if segment is None:
                    continue  # removed meanwhile
                bridge.apply(prediction, segmentationNode, segmentId, self.scriptedEffect.parameter("COMBINE"),
                             editor_node=parameterSetNode)
                written.append(segment.GetName())
        except MedSAMError as exc:
            self.statusLabel.text = f"{exc} Undo restores the segments."
            return
        finally:
            parameterSetNode.SetSelectedSegmentID(selected)
            qt.QApplication.restoreOverrideCursor()
        self.queue = {}
        self.statusLabel.text = f"Wrote {', '.join(written)} ({len(written)} structures, one job). Undo restores them."

    def _runPrediction(self, bridge, request, message):
        self.previewSegmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        self.statusLabel.text = message
        self.progressBar.value = 0
        self._startTask(bridge.start(request), "predict")

    def _onPredictionDone(self, task):
        from MedSAMBridgeLib import MRMLBridge
        from MedSAMSlicerLib.errors import MedSAMError
        from MedSAMSlicerLib.progress import Cancelled

        applyNow, self.applyWhenDone = self.applyWhenDone, False
        correcting, self.correcting = self.correcting, False
        # A correction that fails or is cancelled leaves the preview it was correcting as it was.
        keep = correcting and not self.replaceOnApply and self.prediction is not None
        try:
            prediction = task.result()
            problem = MRMLBridge.volume_changed(prediction.source)
            if problem:
                raise MedSAMError(problem + " Draw the box again.")
            segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
            if segmentationNode is None:
                raise MedSAMError("The segmentation was removed while MedSAM was running.")
            if keep:
                self.previousPreviews.append(self.prediction)
            self._showPrediction(prediction)
        except Cancelled:
            if not keep:
                self.prediction = None
            self.statusLabel.text = "Cancelled: nothing was changed."
            return
        except MedSAMError as exc:
            if not keep:
                self.prediction = None
            self.statusLabel.text = str(exc)
            return
        except Exception as exc:
            if not keep:
                self.prediction = None
            logging.exception("MedSAM preview failed")
            slicer.util.errorDisplay(f"MedSAM failed: {exc}")
            return
        if applyNow:
            self.onApply()

    def _showPrediction(self, prediction):
        from MedSAMBridgeLib import MRMLBridge, reviewing

        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.prediction = prediction
        self.reviewSlice = None
        MRMLBridge.show_preview(prediction, segmentationNode, self.scriptedEffect.parameterSetNode(),
                                self.previewSegmentId)
        notes = "; ".join(f"{k}: {v}" for k, v in prediction.notes.items())
        corrected = f" {len(self.previousPreviews)} correction(s)." if self.previousPreviews else ""
        self.statusLabel.text = (
            f"Preview: {prediction.voxel_count} voxels on {len(prediction.covered)} slice(s).{corrected} "
            f"{notes} Press Apply (Enter) to write it into the selected segment"
            + ("; a box drawn now corrects it." if self._correctable() else ".")
        )
        self.reviewLabel.text = reviewing.summary(prediction)

    def _modelRunning(self):
        return self.taskKind in ("predict", "queue") and self.task is not None

    def _correctable(self):
        return self.prediction is not None and self.prediction.result is not None and self.prediction.mode == "3d"

    def _viewedSlice(self, src):
        """The canonical slice shown in the view last drawn in (else the Red view)."""
        from MedSAMBridgeLib import reviewing

        sliceWidget = self.lastSliceWidget or slicer.app.layoutManager().sliceWidget("Red")
        sliceToRas = sliceWidget.mrmlSliceNode().GetSliceToRAS()
        return reviewing.slice_of_point(src, [sliceToRas.GetElement(r, 3) for r in range(3)])

    def onAcceptSlice(self):
        """Lock the viewed slice as it is and propagate again from it: of the preview, or, after
        Apply (and Paint/Erase), of the applied segment as it is now."""
        from MedSAMBridgeLib import MRMLBridge
        from MedSAMSlicerLib.errors import MedSAMError

        if self._modelRunning():
            return
        self._stopTask()
        bridge = self._logic().bridge()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        try:
            if self._correctable():
                base, segmentationNode, segmentId = self.prediction, None, None
            elif self.lastApplied is not None and self.lastApplied[1] == parameterSetNode.GetSelectedSegmentID():
                base, segmentationNode, segmentId = self.lastApplied[0], parameterSetNode.GetSegmentationNode(), \
                    self.lastApplied[1]
            else:
                raise MedSAMError("Nothing to correct: segment the structure in 3D first.")
            z = self._viewedSlice(base.source)
            request = bridge.correction_request(base, MRMLBridge.BoxPrompt(z, (0, 0, 1, 1)), accept=True,
                                                segmentation_node=segmentationNode, segment_id=segmentId)
        except MedSAMError as exc:
            self.statusLabel.text = str(exc)
            return
        if segmentationNode is not None:  # the applied segment is re-propagated: the result replaces it
            self.prediction, self.previousPreviews, self.replaceOnApply = base, [], True
        self.correcting = True
        self._runPrediction(bridge, request, "Slice accepted: propagating again from it...")

    def onUndoCorrection(self):
        if self._modelRunning() or not self.previousPreviews:
            return
        self._showPrediction(self.previousPreviews.pop())
        self._updateWidgets()

    def onNextDoubtful(self):
        from MedSAMBridgeLib import reviewing

        if not self._correctable():
            return
        z = reviewing.next_doubtful(self.prediction, self.reviewSlice)
        if z is None:
            self.reviewLabel.text = "No doubtful slice."
            return
        self.reviewSlice = z
        r, a, s = reviewing.slice_centre_ras(self.prediction.source, self.prediction.mask, z)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        reason = dict(reviewing.doubtful(self.prediction)).get(z, "")
        self.reviewLabel.text = (f"Slice {reviewing.slice_name(self.prediction.source, z)}: {reason}. "
                                 f"{reviewing.summary(self.prediction)} Draw a box to correct it, or Accept slice.")

    def onApply(self):
        from MedSAMBridgeLib import MRMLBridge

        if self._modelRunning():
            return
        if self.prediction is None:
            self.applyWhenDone = True
            self.onPreview(useRoi=self.boxCorners is None)
            if self.taskKind != "predict":
                self.applyWhenDone = False
            return
        problem = MRMLBridge.volume_changed(self.prediction.source)
        if problem:
            self.statusLabel.text = problem + " Nothing was written."
            self._clearAll()
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        modes = {
            "set": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
            "add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
            "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove,
        }
        combine = "replace" if self.replaceOnApply else self.scriptedEffect.parameter("COMBINE")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            edits = MRMLBridge.modifications(
                self.prediction,
                segmentationNode,
                self.scriptedEffect.defaultModifierLabelmap(),
                combine,
            )
            self.scriptedEffect.saveStateForUndo()
            for labelmap, mode in edits:
                self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, modes[mode])
            if self.prediction.record is not None:  # how it was made, in the segment's tags (undone with it)
                MRMLBridge.write_record(segmentationNode, parameterSetNode.GetSelectedSegmentID(),
                                        self.prediction.record, combine)
            if self._correctable():
                self.lastApplied = (self.prediction, parameterSetNode.GetSelectedSegmentID())
            self.statusLabel.text = "Applied. Undo restores the segment."
        finally:
            qt.QApplication.restoreOverrideCursor()
        self._clearAll()

    def onCancel(self):
        if self.install is not None:
            self.install.cancel()
            self.statusLabel.text = "Cancelling the install..."
            return
        if self._modelRunning():
            self.task.cancel()
            self.statusLabel.text = "Cancelling after the current slice..."
            return
        self._clearAll()
        self.statusLabel.text = "Drag a box around the structure in an axial view."

    def _clearAll(self):
        from MedSAMBridgeLib import MRMLBridge

        self.prediction = None
        self.previousPreviews = []
        self.replaceOnApply = False
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode is not None:
            MRMLBridge.clear_preview(parameterSetNode)
        if hasattr(self, "reviewLabel"):
            self.reviewLabel.text = ""
        self._clearBoxes()

    def _clearBoxes(self):
        self.boxCorners = None
        self.boxNormal = None
        for viewWidget, pipeline in self.rectangles.items():
            pipeline.clear()
            viewWidget.sliceView().scheduleRender()
        if hasattr(self, "applyButton"):
            self._updateWidgets()


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

    def setColor(self, rgb):
        self.actor.GetProperty().SetColor(*rgb)

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
