"""MedSAM for 3D Slicer: the module (models, weights, device, segmenting from an ROI) and the
registration of the "MedSAM" Segment Editor effect.

Four classes in Slicer's usual order: Module, Widget, Logic, Test. The logic has no GUI code
and can be used from the Python console or a script; the work itself is done by
``MedSAMBridgeLib.MRMLBridge`` (MRML <-> engine, no Qt) and ``MedSAMSlicerLib`` (the engine).
The effect lives alone in ``SegmentEditorMedSAMLib/`` because Slicer loads an effect file under
the name of its folder (see ``MedSAMBridgeLib/__init__.py``).
"""

import logging
import os
import sys

#: Our packages, shipped next to this file in the installed extension.
OWN_PACKAGES = ("MedSAMSlicerLib", "MedSAMBridgeLib", "MedSAMTrainingLib")


def useOwnPackages():
    """Make ``import MedSAMSlicerLib`` (and the bridge, the job runner) give the extension's own copy.

    Slicer appends each module's folder to the END of ``sys.path``
    (``qSlicerScriptedLoadableModuleFactory.cxx`` -> ``qSlicerCorePythonManager::appendPythonPath``:
    ``sys.path.append``, v5.10.0 and v5.12.3), so a ``medsam-slicer`` wheel pip-installed into
    Slicer's Python (site-packages comes first) would shadow the extension's engine, possibly
    another version of it. This folder is therefore moved to the front of ``sys.path``, and
    copies of our packages already imported from elsewhere are forgotten (imported again from
    here on first use). Returns the folder whose copies are in use (logged at start-up)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path[:1] != [here]:
        sys.path[:] = [here] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in OWN_PACKAGES:
            where = os.path.abspath(getattr(module, "__file__", None) or here)
            if not where.startswith(here + os.sep):
                logging.warning(f"MedSAM: not using the copy of {name} at {where}; the extension's is in {here}")
                del sys.modules[name]
    return here


ENGINE_FOLDER = useOwnPackages()

import qt  # noqa: E402  (after useOwnPackages: our imports below must find our own copies)
import slicer  # noqa: E402
import vtk  # noqa: E402
from slicer.parameterNodeWrapper import parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

from MedSAMBridgeLib import compat  # noqa: E402
from MedSAMBridgeLib.choices import DEVICE_CHOICES, WINDOW_CHOICES, choice_enum  # noqa: E402

HOMEPAGE = "https://github.com/medsam-slicer/SlicerMedSAM"
SETTINGS_MODEL = "MedSAM/Model"
SETTINGS_CHECKPOINT = "MedSAM/Checkpoint"
SETTINGS_DEVICE = "MedSAM/Device"
SETTINGS_SPEED = "MedSAM/Speed"
SETTINGS_CHECKPOINT_FOLDER = "MedSAM/CheckpointFolder"


def slicerVersionProblem():
    """A message when this Slicer is older than the extension supports, else ``None``."""
    return compat.slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


def setupPanel(widget, uiFile):
    """Load ``Resources/UI/<uiFile>`` into a module widget and return its ``ui`` variables; on an
    unsupported Slicer show why instead and return ``None``. (Both MedSAM modules use it.)"""
    problem = slicerVersionProblem()
    if problem:
        label = qt.QLabel(problem)
        label.wordWrap = True
        widget.layout.addWidget(label)
        widget.layout.addStretch(1)
        return None
    uiWidget = slicer.util.loadUI(widget.resourcePath(f"UI/{uiFile}"))
    widget.layout.addWidget(uiWidget)
    uiWidget.setMRMLScene(slicer.mrmlScene)
    return slicer.util.childWidgetVariables(uiWidget)


def fillSpeedSelector(combo, current):
    """Fill a combo box with the speed settings (data: the setting's name; tooltip: what it costs
    in accuracy, or what to install) and select ``current``. The module and the effect use it."""
    from MedSAMBridgeLib.choices import speed_items

    wasBlocked = combo.blockSignals(True)
    combo.clear()
    from MedSAMSlicerLib.models.speed import get_speed

    for index, (value, label, note, missing) in enumerate(speed_items()):
        install = bool(missing) and bool(get_speed(value).missing())  # else: this CPU lacks a feature
        suffix = (" - needs installing" if install else " - not on this CPU") if missing else ""
        why = (f" Not installed: {missing}." if install else f" Not on this CPU: {missing}.") if missing else ""
        combo.addItem(label + suffix, value)
        combo.setItemData(index, note + why, qt.Qt.ToolTipRole)
    combo.setCurrentIndex(max(combo.findData(current), 0))
    combo.blockSignals(wasBlocked)


class InstallPump:
    """Shows a first-use install (``MedSAMBridgeLib.installs.FirstUse``) running in the background:
    a timer pumps its task, the status label and progress bar show pip's progress, and
    ``onDone(ok)`` is called once at the end, after the status label got the flow's one-line
    message. The module panel, the effect and the training panel use it."""

    def __init__(self, setup, statusLabel, progressBar, onDone):
        self.setup = setup
        self.statusLabel = statusLabel
        self.progressBar = progressBar
        self.onDone = onDone
        self.timer = qt.QTimer()
        self.timer.setInterval(50)
        self.timer.connect("timeout()", self._tick)

    def start(self):
        self.setup.start()
        self.statusLabel.text = "Installing... (Slicer stays usable; Cancel stops it)"
        self.progressBar.setVisible(True)
        self.progressBar.maximum = max(len(self.setup.plan.steps), 1)
        self.progressBar.value = 0
        self.timer.start()

    @property
    def running(self):
        return self.setup.task is not None and not self.setup.task.done

    def cancel(self):
        if self.setup.task is not None:
            self.setup.task.cancel()

    def _tick(self):
        task = self.setup.task
        for done, total, message in task.pump(0.03):
            self.progressBar.maximum = max(int(total), 1)
            self.progressBar.value = int(done)
            self.statusLabel.text = message
        if not task.done:
            return
        onDone = self.onDone
        self.cleanup()
        ok = self.setup.finish()
        for line in self.setup.output:  # pip's own words, for the Python console
            logging.info(f"MedSAM install: {line}")
        self.progressBar.setVisible(False)
        self.statusLabel.text = self.setup.message
        if onDone is not None:
            onDone(ok)

    def cleanup(self):
        """Stop the timer and undo its connection (the install itself is cancelled by ``cancel``)."""
        self.timer.stop()
        if self.onDone is not None:
            self.timer.disconnect("timeout()", self._tick)
            self.onDone = None


#
# Module
#


class MedSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedSAM for 3D Slicer contributors"]
        self.parent.helpText = f"""
Box-prompted segmentation with MedSAM and LiteMedSAM. Use the <b>MedSAM</b> effect in the Segment
Editor: drag a box around a structure in an axial view, preview, apply. This module chooses the
model, its weights (including checkpoints fine-tuned with <i>MedSAM Training</i>) and the device,
and segments a volume from an ROI without the Segment Editor.
<p>See the <a href="{HOMEPAGE}#readme">documentation</a>.</p>
"""
        self.parent.acknowledgementText = """
MedSAM: J. Ma et al., Segment anything in medical images, Nature Communications 15, 654 (2024).
LiteMedSAM: the CVPR 2024 MedSAM on Laptop challenge baseline (bowang-lab/MedSAM, LiteMedSAM branch).
"""
        problem = slicerVersionProblem()
        if problem:
            # No effect is registered on an unsupported Slicer: it would fail later, with a traceback.
            logging.warning(problem)
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText
            return
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), "SegmentEditorMedSAMLib", "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


#
# Parameter node: what the ROI panel's choices are, saved with the scene
#

#: The intensity windows (values and labels from ``choices.WINDOW_CHOICES``).
WindowChoice = choice_enum("WindowChoice", WINDOW_CHOICES)


@parameterNodeWrapper
class MedSAMSlicerParameterNode:
    """The ROI panel's inputs.

    inputVolume - the CT or MR volume to segment (never modified).
    roi - a markups ROI around the structure; its height bounds the propagation.
    segmentation - where the new segment goes.
    segmentName - the new segment's name.
    window - the intensity window the model sees.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    roi: slicer.vtkMRMLMarkupsROINode
    segmentation: slicer.vtkMRMLSegmentationNode
    segmentName: str = "MedSAM"
    window: WindowChoice = WindowChoice.auto


#
# Widget
#


class MedSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.install = None  # an InstallPump while first-use installs run
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._choices = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.ui = setupPanel(self, "MedSAMSlicer.ui")
        if self.ui is None:
            return
        self.logic = MedSAMSlicerLogic()

        import ctk

        self.ui.checkpointFolderSelector.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.checkpointFolderSelector.currentPath = self.logic.checkpointFolder()
        self.ui.checkpointSelector.filters = ctk.ctkPathLineEdit.Files
        self.ui.checkpointSelector.nameFilters = ["Weights (*.pth *.pt)"]
        for value, label in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(label, value)
        fillSpeedSelector(self.ui.speedSelector, self.logic.speed())

        # A folder typed by hand is applied once the typing pauses, not on every keystroke.
        self.folderTimer = qt.QTimer()
        self.folderTimer.setSingleShot(True)
        self.folderTimer.setInterval(600)
        self.folderTimer.connect("timeout()", self.onCheckpointFolderSettled)
        # While a run is going this zero-interval timer lets the worker thread run (see onPump).
        self.pumpTimer = qt.QTimer()
        self.pumpTimer.setInterval(0)
        self.pumpTimer.connect("timeout()", self.onPump)

        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.speedSelector.connect("currentIndexChanged(int)", self.onSpeedChanged)
        self.ui.checkpointFolderSelector.connect("currentPathChanged(QString)", lambda _path: self.folderTimer.start())
        self.ui.useCheckpointButton.connect("clicked()", self.onUseCheckpoint)
        self.ui.getWeightsButton.connect("clicked()", self.onGetWeights)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.setupRemotePanel()
        self.initializeParameterNode()
        self.updateModelGUI()

    def setupRemotePanel(self):
        """Local / Remote: where the model runs (MedSAMBridgeLib.backends decides; docs/remote.md)."""
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = "Where the model runs"
        box.collapsed = not self.logic.backend().remote
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.backendSelector = qt.QComboBox()
        self.backendSelector.addItem("Local (PyTorch in Slicer)", "local")
        self.backendSelector.addItem("Remote GPU server", "remote")
        self.serverUrlEdit = qt.QLineEdit()
        self.serverUrlEdit.placeholderText = "https://gpu.example.org:8765"
        self.serverTokenEdit = qt.QLineEdit()
        self.serverTokenEdit.echoMode = qt.QLineEdit.Password
        self.serverTokenEdit.placeholderText = "the token from the server's operator (or set MEDSAM_SLICER_TOKEN)"
        self.rememberTokenCheck = qt.QCheckBox("Remember the token (in Slicer's settings file, as plain text)")
        self.testConnectionButton = qt.QPushButton("Test connection")
        self.connectionLabel = qt.QLabel()
        self.connectionLabel.wordWrap = True
        form.addRow("Run on:", self.backendSelector)
        form.addRow("Server URL:", self.serverUrlEdit)
        form.addRow("Token:", self.serverTokenEdit)
        form.addRow(self.rememberTokenCheck)
        form.addRow(self.testConnectionButton)
        form.addRow(self.connectionLabel)
        backend = self.logic.backend()
        self.backendSelector.currentIndex = 1 if backend.remote else 0
        self.serverUrlEdit.text = backend.url
        self.serverTokenEdit.text = backend.token
        self.backendSelector.connect("currentIndexChanged(int)", lambda _i: self.onBackendChanged())
        self.serverUrlEdit.connect("editingFinished()", self.onBackendChanged)
        self.serverTokenEdit.connect("editingFinished()", self.onBackendChanged)
        self.rememberTokenCheck.connect("toggled(bool)", lambda _on: self.onBackendChanged())
        self.testConnectionButton.connect("clicked()", self.onTestConnection)
        self.connectionTimer = qt.QTimer()
        self.connectionTimer.setInterval(0)
        self.connectionTimer.connect("timeout()", self.onConnectionPump)
        self.connectionTask = None

    def _backendFromGUI(self):
        from MedSAMBridgeLib.backends import Backend

        return Backend(self.backendSelector.currentData, self.serverUrlEdit.text.strip(),
                       self.serverTokenEdit.text.strip(), self.logic.backend().cafile)

    def onBackendChanged(self):
        from MedSAMSlicerLib.errors import MedSAMError

        try:
            self.logic.setBackend(self._backendFromGUI(), self.rememberTokenCheck.checked)
            self.connectionLabel.text = self._backendFromGUI().describe()
        except MedSAMError as exc:
            self.connectionLabel.text = str(exc)

    def onTestConnection(self):
        """Asks the server in a worker thread (a slow network never freezes the window)."""
        from MedSAMSlicerLib.background import run_in_background

        if self.connectionTask is not None:
            return
        backend = self._backendFromGUI()
        self.connectionLabel.text = "Asking the server..."
        self.connectionTask = run_in_background(lambda progress, cancel: backend.test_connection(), "medsam-connect")
        self.connectionTimer.start()

    def onConnectionPump(self):
        task = self.connectionTask
        task.pump()
        if not task.done:
            return
        self.connectionTimer.stop()
        self.connectionTask = None
        from MedSAMSlicerLib.errors import MedSAMError

        try:
            self.connectionLabel.text = task.result()
        except MedSAMError as exc:
            self.connectionLabel.text = f"Cannot use the server: {exc}"

    def cleanup(self):
        self.cancelRun()
        self._stopInstall()
        if hasattr(self, "pumpTimer"):
            self.pumpTimer.stop()
            self.folderTimer.stop()
            self.pumpTimer.disconnect("timeout()", self.onPump)
            self.folderTimer.disconnect("timeout()", self.onCheckpointFolderSettled)
        self.removeObservers()
        self.setParameterNode(None)

    # -- first use: installs in the background (MedSAMBridgeLib.installs) -------------------------
    def _whenReady(self, then, setup=None):
        """Call ``then()`` now when everything is installed; otherwise ask the one question and
        install in the background, then call it. Declining or a failure ends in one status line."""
        setup = setup or self.logic.firstUse()
        if setup.ready:
            then()
            return
        if setup.problem:
            self.ui.statusLabel.text = setup.message
            return
        if not self.logic.askToInstall(setup):
            self.ui.statusLabel.text = setup.declined()
            return
        self.install = InstallPump(setup, self.ui.statusLabel, self.ui.progressBar, lambda ok: self._installDone(ok, then))
        self.install.start()
        self._setRunning(True)

    def _installDone(self, ok, then):
        self.install = None
        self._setRunning(False)
        fillSpeedSelector(self.ui.speedSelector, self.logic.speed())  # what is in force now
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()
        if ok:
            then()

    def _stopInstall(self):
        if self.install is not None:
            self.install.cancel()
            self.install.cleanup()
            self.install = None

    def enter(self):
        if self.logic is None:
            return
        self.initializeParameterNode()
        self.updateModelGUI()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event):
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            self.updateApplyButton()

    def updateApplyButton(self, caller=None, event=None):
        if self.run is not None or self.install is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.enabled = True
            return
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.roi and p.segmentation)
        self.ui.applyButton.text = "Segment"
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "Segment the structure inside the ROI." if ready else "Select a volume, an ROI and a segmentation."

    # -- model ------------------------------------------------------------------------------------
    def updateModelGUI(self):
        """List the models and fine-tuned checkpoints (a folder scan: only when the panel opens or
        the folder changes, never on a parameter change)."""
        current = self.logic.modelChoice()
        self._choices = self.logic.modelChoices()
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for choice in self._choices:
            self.ui.modelSelector.addItem(choice.label())
        self.ui.modelSelector.setCurrentIndex(self._choices.index(current) if current in self._choices else 0)
        self.ui.modelSelector.blockSignals(wasBlocked)
        wasBlocked = self.ui.deviceSelector.blockSignals(True)
        self.ui.deviceSelector.setCurrentIndex(max(self.ui.deviceSelector.findData(self.logic.device()), 0))
        self.ui.deviceSelector.blockSignals(wasBlocked)
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()

    def onModelChanged(self, index):
        if 0 <= index < len(self._choices):
            self.logic.setModelChoice(self._choices[index])
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()

    def onDeviceChanged(self, index):
        self.logic.setDevice(self.ui.deviceSelector.itemData(index))

    def onSpeedChanged(self, index):
        speed = self.ui.speedSelector.itemData(index)
        setup = self.logic.speedSetup(speed)
        fillSpeedSelector(self.ui.speedSelector, self.logic.speed())  # the setting in force until installed
        self._whenReady(lambda: self._useSpeed(speed), setup)

    def _useSpeed(self, speed):
        self.logic.useSpeed(speed)
        fillSpeedSelector(self.ui.speedSelector, self.logic.speed())

    def onCheckpointFolderSettled(self):
        path = self.ui.checkpointFolderSelector.currentPath
        if path and os.path.isdir(path):
            self.logic.setCheckpointFolder(path)
            self.updateModelGUI()

    def onUseCheckpoint(self):
        with slicer.util.tryWithErrorDisplay("The weights file cannot be used.", waitCursor=True):
            self.logic.setModelChoice(self.logic.checkpointChoice(self.ui.checkpointSelector.currentPath))
            self.updateModelGUI()

    def onGetWeights(self):
        """Install what the selected model needs (its weights included), in the background."""
        self._whenReady(lambda: setattr(self.ui.weightsStatusLabel, "text", self.logic.weightsStatus()))

    # -- segmenting from an ROI -------------------------------------------------------------------
    def onApply(self):
        if self.install is not None:
            self.install.cancel()
            self.ui.statusLabel.text = "Cancelling the install..."
            return
        if self.run is not None:
            self.run.task.cancel()
            self.ui.statusLabel.text = "Cancelling after the current slice..."
            return
        # First use: everything (PyTorch, scipy, the weights) is installed first, in the background.
        self._whenReady(self._startSegmenting)

    def _startSegmenting(self):
        with slicer.util.tryWithErrorDisplay("MedSAM segmentation failed.", waitCursor=True):
            p = self._parameterNode
            self.run = self.logic.startProcess(p.inputVolume, p.roi, p.segmentation, p.segmentName or "MedSAM",
                                               window=p.window.value)
            self._setRunning(True)
            self.ui.statusLabel.text = "Segmenting..."
            self.pumpTimer.start()

    def onPump(self):
        """Runs whenever the event loop is idle during a run. Slicer's event loop keeps Python's GIL
        while idle, so the worker only runs while ``pump`` waits (it releases the GIL)."""
        run = self.run
        if run is None:
            self.pumpTimer.stop()
            return
        for done, total, message in run.task.pump():
            self._showProgress(done, total, message)
        if not run.task.done:
            return
        self.pumpTimer.stop()
        self.run = None
        self._setRunning(False)
        from MedSAMSlicerLib.errors import MedSAMError
        from MedSAMSlicerLib.progress import Cancelled

        try:
            segmentId = self.logic.finishProcess(run)
            self.ui.statusLabel.text = f"Added segment '{run.segmentName}' ({segmentId})."
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
        except MedSAMError as exc:
            self.ui.statusLabel.text = str(exc)
        except Exception as exc:
            logging.exception("MedSAM segmentation failed")
            slicer.util.errorDisplay(f"MedSAM segmentation failed: {exc}")

    def cancelRun(self):
        if self.run is not None:
            # Not waited for: the worker stops at its next slice and its result is dropped.
            self.run.task.cancel()
            self.run = None
            if hasattr(self, "pumpTimer"):
                self.pumpTimer.stop()
                self._setRunning(False)

    def _setRunning(self, running):
        """While a run goes, the controls that would change its inputs are disabled."""
        for widget in (self.ui.volumeSelector, self.ui.roiSelector, self.ui.segmentationSelector,
                       self.ui.segmentNameEdit, self.ui.windowSelector, self.ui.modelSelector,
                       self.ui.deviceSelector, self.ui.speedSelector, self.ui.useCheckpointButton, self.ui.getWeightsButton,
                       self.ui.checkpointFolderSelector, self.ui.checkpointSelector):
            widget.enabled = not running
        if self.install is None:  # an install shows its own progress
            self.ui.progressBar.setVisible(running)
            self.ui.progressBar.value = 0
        self.updateApplyButton()

    def _showProgress(self, done, total, message=""):
        self.ui.progressBar.maximum = max(int(total), 1)
        self.ui.progressBar.value = int(done)
        self.ui.progressBar.format = f"{message} (%v/%m)"


#
# Logic
#

# Shared by every MedSAMSlicerLogic instance (widget, effect, scripts): one bridge, one model.
_BRIDGE = None
# A server token typed in the module: this Slicer session only (MedSAMBridgeLib.backends).
_SESSION_TOKEN = ""


class MedSAMRun:
    """A segmentation from an ROI running in a worker thread (see ``MedSAMSlicerLogic.startProcess``)."""

    def __init__(self, task, segmentationNode, segmentName):
        self.task = task
        self.segmentationNode = segmentationNode
        self.segmentName = segmentName


class MedSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Model choice, dependency set-up and segmentation. Can be used without GUI::

        logic = MedSAMSlicerLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        segmentId = logic.process(volumeNode, roiNode, segmentationNode, "liver")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedSAMSlicerParameterNode(super().getParameterNode())

    # -- settings (per user, for every scene) ------------------------------------------------------
    @staticmethod
    def _settings():
        return qt.QSettings()

    def device(self):
        return str(self._settings().value(SETTINGS_DEVICE, "auto"))

    def setDevice(self, device):
        self._settings().setValue(SETTINGS_DEVICE, device)
        self._configureBridge()

    def speed(self):
        """The speed setting (a ``MedSAMSlicerLib.models.speed.SPEED_TIERS`` name) the effect and the module share."""
        from MedSAMSlicerLib.models.speed import DEFAULT_SPEED, SPEED_TIERS

        speed = str(self._settings().value(SETTINGS_SPEED, DEFAULT_SPEED))
        return speed if speed in SPEED_TIERS else DEFAULT_SPEED

    def setSpeed(self, speed):
        from MedSAMSlicerLib.models.speed import get_speed

        self._settings().setValue(SETTINGS_SPEED, get_speed(speed).name)
        self._configureBridge()

    def useSpeed(self, speed):
        """Put speed setting ``speed`` in force (what it needs is installed); when this CPU runs
        it in float32 instead of bfloat16, say so, once, where the user chose it."""
        from MedSAMSlicerLib.models.speed import get_speed

        tier = get_speed(speed)
        unsupported = tier.unsupported()
        if unsupported:
            slicer.util.warningDisplay(f"'{tier.label}' runs in float32 on this computer: {unsupported}.",
                                       "MedSAM: speed setting")
        self.setSpeed(tier.name)

    def speedSetup(self, speed):
        """The first-use flow (``installs.FirstUse``) for speed setting ``speed``: what it needs
        installed (OpenVINO for the faster settings), with the model's own needs."""
        from MedSAMBridgeLib import installs

        return self.firstUse(extra=installs.speed_requirements(speed))

    def chooseSpeed(self, speed, askConfirmation=True):
        """Use speed setting ``speed`` (for scripts: installs what it needs here, in this thread,
        without a dialog unless ``askConfirmation``). Returns True when the setting is in use;
        otherwise the setting in force is unchanged."""
        if not self.runFirstUse(self.speedSetup(speed), askConfirmation):
            return False
        self.useSpeed(speed)
        return True

    def checkpointFolder(self):
        from MedSAMSlicerLib.models.model_choice import default_checkpoint_dir

        return str(self._settings().value(SETTINGS_CHECKPOINT_FOLDER, str(default_checkpoint_dir())))

    def setCheckpointFolder(self, folder):
        self._settings().setValue(SETTINGS_CHECKPOINT_FOLDER, folder)

    def modelChoice(self):
        """The :class:`~MedSAMSlicerLib.models.model_choice.ModelChoice` the effect and the module share."""
        from MedSAMSlicerLib.models.model_choice import parse_choice

        choice, problem = parse_choice(str(self._settings().value(SETTINGS_MODEL, "litemedsam")),
                                       str(self._settings().value(SETTINGS_CHECKPOINT, "")))
        if problem:
            logging.warning(f"MedSAM: {problem}")
        return choice

    def setModelChoice(self, choice):
        self._settings().setValue(SETTINGS_MODEL, choice.model)
        self._settings().setValue(SETTINGS_CHECKPOINT, choice.checkpoint or "")
        self._configureBridge()

    def checkpointChoice(self, path, model=None):
        """The choice for a weights file (architecture: ``model``, or from its name)."""
        from MedSAMSlicerLib.models.model_choice import ModelChoice

        if not path or not os.path.isfile(path):
            raise ValueError(f"No weights file at '{path}'.")
        return ModelChoice.for_file(path, model)

    def modelChoices(self):
        """Registry models, then checkpoints in the checkpoint folder, then the current choice."""
        from MedSAMSlicerLib.models.model_choice import model_choices

        return model_choices(self.checkpointFolder(), extra=[self.modelChoice()])

    # -- where the model runs (Local / Remote; MedSAMBridgeLib.backends decides) ------------------
    def backend(self):
        """The :class:`MedSAMBridgeLib.backends.Backend` the user chose (Slicer's per-user settings;
        a token typed this session is kept in memory only)."""
        from MedSAMBridgeLib import backends

        keys = (backends.SETTINGS_BACKEND, backends.SETTINGS_SERVER_URL, backends.SETTINGS_SERVER_TOKEN,
                backends.SETTINGS_SERVER_CA)
        return backends.Backend.from_settings({k: self._settings().value(k, "") for k in keys}, _SESSION_TOKEN)

    def setBackend(self, backend, rememberToken=False):
        """Use ``backend``; its token goes into Slicer's settings only with ``rememberToken``."""
        global _SESSION_TOKEN
        backend.check()
        _SESSION_TOKEN = backend.token
        for key, value in backend.settings(rememberToken).items():
            self._settings().setValue(key, value)
        if _BRIDGE is not None:
            _BRIDGE.configure(backend=backend)

    # -- dependencies: first use (the rules are in MedSAMBridgeLib.installs) ------------------------
    def firstUse(self, extra=(), weights=True):
        """The first-use flow for the selected model: PyTorch, scipy, its weights (unless
        ``weights`` is False or a weights file is chosen) and the ``extra`` requirements."""
        from MedSAMBridgeLib import installs

        choice = self.modelChoice()
        model = choice.model if weights else None
        remote = self.backend().remote  # Remote: the server's model; nothing to install here
        return installs.FirstUse(lambda: installs.plan_installs(model, choice.checkpoint, extra, remote=remote))

    def askToInstall(self, setup):
        """The one question before installing (a Yes/No box)."""
        question, details = setup.question()
        return slicer.util.confirmOkCancelDisplay(question, "MedSAM: first use", detailedText=details)

    def runFirstUse(self, setup, askConfirmation=True):
        """Install what ``setup`` plans in this thread (scripts, the self-test, the headless run);
        the panels run it in the background instead. Returns True when everything is ready;
        otherwise the reason was logged (one line)."""
        if setup.ready:
            return True
        if setup.problem:
            logging.error(setup.message)
            return False
        if askConfirmation and not self.askToInstall(setup):
            logging.warning(setup.declined())
            return False
        ok = setup.run(log=logging.info)
        (logging.info if ok else logging.error)(setup.message)
        return ok

    def dependenciesReady(self):
        """Whether PyTorch and the other packages are installed (nothing is imported); in Remote
        mode nothing is needed beyond Slicer (``plan_installs(remote=True)``)."""
        from MedSAMBridgeLib import installs

        return installs.plan_installs(None, remote=self.backend().remote).ready

    def setupPythonRequirements(self, askConfirmation=True):
        """Install everything the selected model needs (packages and weights) in this thread.
        Returns True when ready. For scripts; the panels install in the background."""
        return self.runFirstUse(self.firstUse(), askConfirmation)

    def weightsStatus(self):
        """One line about the selected model's weights (no torch import)."""
        from MedSAMBridgeLib import installs

        choice = self.modelChoice()
        if choice.checkpoint:
            return f"Weights: {choice.checkpoint}" if os.path.isfile(choice.checkpoint) else f"Missing weights file: {choice.checkpoint}"
        plan = installs.plan_installs(choice.model)
        if plan.steps:
            return "Not installed yet: " + ", ".join(s.what for s in plan.steps) + " (installed on first use, after one question)."
        try:
            from MedSAMSlicerLib.models.registry import get_spec, resolve_weights

            return f"Weights: {resolve_weights(get_spec(choice.model))}"
        except Exception as exc:
            return f"Weights not available: {exc}"

    # -- segmentation -----------------------------------------------------------------------------
    def _configureBridge(self):
        if _BRIDGE is not None:
            choice = self.modelChoice()
            _BRIDGE.configure(model=choice.model, checkpoint=choice.checkpoint or "", device=self.device(),
                              speed=self.speed())

    def bridge(self, create=True):
        """The shared :class:`MRMLBridge.MedSAMBridge` (the effect uses the same one)."""
        global _BRIDGE
        if _BRIDGE is None and create:
            from MedSAMBridgeLib.MRMLBridge import MedSAMBridge

            choice = self.modelChoice()
            _BRIDGE = MedSAMBridge(model=choice.model, checkpoint=choice.checkpoint, device=self.device(),
                                   speed=self.speed(), backend=self.backend())
        return _BRIDGE

    def process(self, volumeNode, roiNode, segmentationNode, segmentName="MedSAM", window="auto",
                mode="3d", direction="both", overwrite="none", progress=None, cancel=None):
        """Segment the structure inside ``roiNode`` into a new segment of ``segmentationNode``.

        Can be used without GUI; runs in this thread. The volume's voxels are not modified; a
        cancelled run leaves the segmentation as it was. Returns the new segment's ID.
        """
        if segmentationNode is not None and not segmentationNode.GetDisplayNode():
            segmentationNode.CreateDefaultDisplayNodes()
        segmentId, _prediction = self.bridge().segment(
            volumeNode, segmentationNode, None, roi_node=roiNode, mode=mode, direction=direction,
            window=window, overwrite=overwrite, segment_name=segmentName, progress=progress, cancel=cancel,
        )
        return segmentId

    def startProcess(self, volumeNode, roiNode, segmentationNode, segmentName="MedSAM", window="auto",
                     mode="3d", direction="both"):
        """:meth:`process` with the model in a worker thread: the inputs are read now, the run is
        returned at once; pump ``run.task`` from a timer and call :meth:`finishProcess` when it is done."""
        bridge = self.bridge()
        request = bridge.segment_request(volumeNode, segmentationNode, None, roi_node=roiNode, mode=mode,
                                         direction=direction, window=window)
        return MedSAMRun(bridge.start(request), segmentationNode, segmentName)

    def finishProcess(self, run, overwrite="none"):
        """Write a finished run's result as a new segment (GUI thread). Raises what the run raised
        (``Cancelled`` for a cancelled run), or ``MedSAMError`` if its inputs changed meanwhile."""
        prediction = run.task.result()
        if not run.segmentationNode.GetDisplayNode():
            run.segmentationNode.CreateDefaultDisplayNodes()
        return self.bridge().write_segment(prediction, run.segmentationNode, None, run.segmentName, overwrite=overwrite)


#
# Test
#


class MedSAMSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the same scenario as ``Testing/test_slicer_bridge.py``, through the
    logic: the small CT shipped with the module (``Resources/TestData``), an ROI around the liver,
    LiteMedSAM on CPU, Dice against the reference labels, a run in a worker thread, undo through
    the Segment Editor, and a cancelled run."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_MedSAMSlicer_roi_liver()
        self.setUp()
        self.test_MedSAMSlicer_cancel()

    def _data(self):
        """The small CT and its liver label (TotalSegmentator's example, Apache-2.0)."""
        data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "TestData")
        ct = slicer.util.loadVolume(os.path.join(data, "example_ct_sm.nii.gz"))
        labels = slicer.util.loadLabelVolume(os.path.join(data, "example_seg.nii.gz"))
        return ct, slicer.util.arrayFromVolume(labels) == 5

    def _roiAround(self, volumeNode, mask, k0=10, k1=19):
        import numpy as np

        mask = mask.copy()
        mask[:k0] = False
        mask[k1 + 1:] = False
        k, j, i = np.nonzero(mask)
        lo = np.array([i.min(), j.min(), k.min()]) - 0.5
        hi = np.array([i.max(), j.max(), k.max()]) + 0.5
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        m = slicer.util.arrayFromVTKMatrix(matrix)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedSAM test ROI")
        roi.SetCenter(*(m @ np.r_[(lo + hi) / 2, 1])[:3])
        roi.SetSize(*((hi - lo) * np.linalg.norm(m[:3, :3], axis=0)))
        return roi, mask

    def _ready(self):
        logic = MedSAMSlicerLogic()
        from MedSAMSlicerLib.models.model_choice import ModelChoice

        logic.setModelChoice(ModelChoice("litemedsam"))
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        logic.setDevice("cpu")
        return logic

    def test_MedSAMSlicer_roi_liver(self):
        import numpy as np

        self.delayDisplay("Setting up MedSAM (may install packages on first run)")
        logic = self._ready()
        ct, reference = self._data()
        roi, reference = self._roiAround(ct, reference)
        before = slicer.util.arrayFromVolume(ct).copy()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)

        self.delayDisplay("Segmenting the liver from an ROI")
        segmentId = logic.process(ct, roi, segmentation, "liver", window="abdomen")
        got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, ct) > 0
        dice = 2.0 * (got & reference).sum() / (got.sum() + reference.sum())
        self.delayDisplay(f"Dice {dice:.3f}")
        self.assertGreaterEqual(dice, 0.85)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), before)

        self.delayDisplay("The same in a worker thread, pumped as the panel's timer does")
        run = logic.startProcess(ct, roi, segmentation, "liver (background)", window="abdomen")
        while not run.task.done:
            run.task.pump()
            slicer.app.processEvents()
        backgroundId = logic.finishProcess(run)
        background = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, backgroundId, ct) > 0
        np.testing.assert_array_equal(background, got)

        self.delayDisplay("The effect's Apply, then Undo")
        from MedSAMBridgeLib import MRMLBridge

        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(ct)
        effectSegmentId = segmentation.GetSegmentation().AddEmptySegment("", "liver (effect)")
        editorWidget.setCurrentSegmentID(effectSegmentId)
        editorWidget.setActiveEffectByName("MedSAM")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the MedSAM effect is registered")
        prompt = MRMLBridge.prompt_from_roi(MRMLBridge.source_volume(ct), roi)
        effect.self().prediction = logic.bridge().predict(ct, prompt, window="abdomen")
        effect.self().onApply()
        applied = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, effectSegmentId, ct) > 0
        np.testing.assert_array_equal(applied, got)
        editorWidget.undo()
        undone = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, effectSegmentId, ct) > 0
        self.assertFalse(undone.any())
        editorWidget.setActiveEffect(None)
        self.delayDisplay("Test passed")

    def test_MedSAMSlicer_cancel(self):
        from MedSAMSlicerLib.progress import Cancelled, CancelToken

        logic = self._ready()
        ct, reference = self._data()
        roi, _ = self._roiAround(ct, reference)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        token = CancelToken()
        calls = []

        def progress(done, total, message):
            calls.append(done)
            if len(calls) >= 2:
                token.cancel()

        with self.assertRaises(Cancelled):
            logic.process(ct, roi, segmentation, "liver", window="abdomen", progress=progress, cancel=token)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        self.delayDisplay("Cancel test passed")
