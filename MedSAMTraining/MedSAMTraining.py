"""MedSAM Training: fine-tune MedSAM / LiteMedSAM on labelled cases, from Slicer.

The training runs in a background process (``PythonSlicer -m MedSAMSlicerLib.training.cli
train ... --progress-json``) started and read by ``MedSAMTrainingLib`` (no Qt there); this
module only collects the settings, polls the job with a timer, shows progress and the loss /
Dice plot the trainer writes, and copies the finished checkpoint to the folder the MedSAM
module lists its models from. Module, Widget, Logic, Test, in Slicer's usual order.
"""

import logging
import os
import shutil
import sys

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: Packages the training process needs besides the MedSAM module's (cc3d removes small label
#: islands in preprocessing, matplotlib draws the loss/Dice plot).
TRAINING_REQUIREMENTS = (
    ("cc3d", "connected-components-3d>=3.12,<5"),
    ("matplotlib", "matplotlib>=3.6,<4"),
)
POLL_INTERVAL_MS = 1000
PLOT_FILE = "training.png"
SETTINGS_PREFIX = "MedSAMTraining/"


#
# Module
#


class MedSAMTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["MedSAMSlicer"]
        self.parent.contributors = ["MedSAM for 3D Slicer contributors"]
        self.parent.helpText = """
Fine-tune MedSAM or LiteMedSAM on your labelled volumes (a folder with <tt>images/</tt> and
<tt>labels/</tt>, FLARE22 layout). Training runs in a background process; Slicer stays usable.
The best checkpoint is copied to the MedSAM module's checkpoint folder, where the MedSAM effect
lists it as a model.
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = "Training recipe after MedSAM's train_one_gpu.py (bowang-lab/MedSAM)."


#
# Widget
#


class MedSAMTrainingWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedSAMTrainingLogic()
        self.job = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)

        dataBox = ctk.ctkCollapsibleButton()
        dataBox.text = "Data"
        self.layout.addWidget(dataBox)
        form = qt.QFormLayout(dataBox)
        self.dataSelector = self._folder("Labelled cases: images/ and labels/ (FLARE22 layout), or a preprocessed dataset.")
        form.addRow("Dataset folder:", self.dataSelector)
        self.outputSelector = self._folder("Run folder: checkpoints, log.csv and the plot are written here.")
        form.addRow("Run folder:", self.outputSelector)

        settingsBox = ctk.ctkCollapsibleButton()
        settingsBox.text = "Settings"
        self.layout.addWidget(settingsBox)
        form = qt.QFormLayout(settingsBox)
        self.modelSelector = qt.QComboBox()
        self.modelSelector.addItem("LiteMedSAM (CPU-friendly)", "litemedsam")
        self.modelSelector.addItem("MedSAM ViT-B (GPU)", "medsam")
        form.addRow("Model:", self.modelSelector)
        self.initialWeights = ctk.ctkPathLineEdit()
        self.initialWeights.filters = ctk.ctkPathLineEdit.Files
        self.initialWeights.nameFilters = ["Weights (*.pth *.pt)"]
        self.initialWeights.setToolTip("Optional: start from these weights instead of the model's published ones.")
        form.addRow("Initial weights:", self.initialWeights)
        self.epochs = self._spin(1, 10000, 10)
        form.addRow("Epochs:", self.epochs)
        self.maxSteps = self._spin(0, 10000000, 0)
        self.maxSteps.setToolTip("Stop after this many optimizer steps (0: no limit).")
        form.addRow("Max steps:", self.maxSteps)
        self.batchSize = self._spin(1, 256, 4)
        form.addRow("Batch size:", self.batchSize)
        self.learningRate = qt.QDoubleSpinBox()
        self.learningRate.decimals = 7
        self.learningRate.singleStep = 1e-5
        self.learningRate.minimum = 1e-7
        self.learningRate.maximum = 1.0
        self.learningRate.value = 1e-4
        form.addRow("Learning rate:", self.learningRate)
        self.freezeEncoder = qt.QCheckBox("Train the mask decoder only (fast, little memory)")
        form.addRow(self.freezeEncoder)
        self.deviceSelector = qt.QComboBox()
        for label, value in (("Automatic", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("Apple MPS", "mps")):
            self.deviceSelector.addItem(label, value)
        form.addRow("Device:", self.deviceSelector)
        self.checkpointName = qt.QLineEdit()
        self.checkpointName.placeholderText = "name for the MedSAM model list (default: run folder name)"
        form.addRow("Checkpoint name:", self.checkpointName)

        self.startButton = qt.QPushButton("Start training")
        self.layout.addWidget(self.startButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        self.layout.addWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.layout.addWidget(self.statusLabel)
        self.plotLabel = qt.QLabel()
        self.plotLabel.alignment = qt.Qt.AlignCenter
        self.layout.addWidget(self.plotLabel)
        self.layout.addStretch(1)

        self.startButton.connect("clicked()", self.onStartOrCancel)
        self._restoreSettings()

    def cleanup(self):
        self.timer.stop()

    @staticmethod
    def _folder(toolTip):
        selector = ctk.ctkPathLineEdit()
        selector.filters = ctk.ctkPathLineEdit.Dirs
        selector.setToolTip(toolTip)
        return selector

    @staticmethod
    def _spin(minimum, maximum, value):
        spin = qt.QSpinBox()
        spin.minimum = minimum
        spin.maximum = maximum
        spin.value = value
        return spin

    def _settings(self):
        return {
            "data": self.dataSelector.currentPath,
            "out": self.outputSelector.currentPath,
            "model": self.modelSelector.currentData,
            "checkpoint": self.initialWeights.currentPath or None,
            "epochs": self.epochs.value,
            "max_steps": self.maxSteps.value or None,
            "batch_size": self.batchSize.value,
            "lr": self.learningRate.value,
            "freeze_image_encoder": self.freezeEncoder.checked,
            "device": self.deviceSelector.currentData,
        }

    def _restoreSettings(self):
        settings = qt.QSettings()
        self.dataSelector.currentPath = settings.value(SETTINGS_PREFIX + "Data", "")
        self.outputSelector.currentPath = settings.value(SETTINGS_PREFIX + "Out", "")

    def onStartOrCancel(self):
        if self.job is not None:
            self.logic.cancel(self.job)
            self.statusLabel.text = "Cancelling: the current step is saved to latest.pth..."
            return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            settings = self._settings()
            qt.QSettings().setValue(SETTINGS_PREFIX + "Data", settings["data"])
            qt.QSettings().setValue(SETTINGS_PREFIX + "Out", settings["out"])
            if not self.logic.setupPythonRequirements():
                return
            self.job = self.logic.start(settings)
            self.startButton.text = "Cancel"
            self.progressBar.setVisible(True)
            self.progressBar.value = 0
            self.statusLabel.text = "Starting the training process..."
            self.timer.start()

    def onPoll(self):
        if self.job is None:
            self.timer.stop()
            return
        for event in self.logic.poll(self.job):
            self._show(event)
        if not self.logic.isRunning(self.job):
            self.timer.stop()
            self._finished()

    def _show(self, event):
        kind = event.get("event")
        if kind == "progress":  # preprocessing, training steps, validation
            self.progressBar.maximum = max(int(event.get("total") or 1), 1)
            self.progressBar.value = int(event.get("done") or 0)
            self.progressBar.format = f"{event.get('stage', '')}: %v/%m"
            if event.get("message"):
                self.statusLabel.text = f"{event.get('stage', '')}: {event['message']}"
        elif kind == "validation":
            dice = event.get("mean_dice")
            if dice is not None:
                self.statusLabel.text = f"Validation at step {event.get('step')}: mean Dice {dice:.3f}"
        elif kind in ("error", "cancelled"):
            self.statusLabel.text = f"{kind.capitalize()}: {event.get('message', '')}"
        if kind in ("validation", "checkpoint", "done", "exit"):
            self._showPlot()

    def _showPlot(self):
        path = os.path.join(self.outputSelector.currentPath, PLOT_FILE)
        if os.path.isfile(path):
            pixmap = qt.QPixmap(path)
            if not pixmap.isNull():
                self.plotLabel.setPixmap(pixmap.scaledToWidth(min(520, pixmap.width()), qt.Qt.SmoothTransformation))

    def _finished(self):
        job, self.job = self.job, None
        self.startButton.text = "Start training"
        self.progressBar.setVisible(False)
        self._showPlot()
        with slicer.util.tryWithErrorDisplay("Training failed.", waitCursor=True):
            result = self.logic.finish(job, name=self.checkpointName.text or None)
            self.statusLabel.text = result


#
# Logic
#


class MedSAMTrainingLogic(ScriptedLoadableModuleLogic):
    """Start, poll, cancel and finish training jobs. Can be used without GUI::

        logic = MedSAMTrainingLogic()
        run = logic.start({"data": "/data/flare22", "out": "/runs/liver", "epochs": 5})
        while logic.isRunning(run):
            for event in logic.poll(run): print(event)
            time.sleep(1)
        print(logic.finish(run))
    """

    def pythonExecutable(self):
        """PythonSlicer: Slicer's own Python, with the packages installed in Slicer."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        return candidate if os.path.exists(candidate) else sys.executable

    def checkpointFolder(self):
        """Where the MedSAM module looks for fine-tuned checkpoints."""
        import MedSAMSlicer

        return MedSAMSlicer.MedSAMSlicerLogic().checkpointFolder()

    def setupPythonRequirements(self, askConfirmation=True):
        """The MedSAM module's packages (torch through the PyTorch extension), plus the training ones."""
        import importlib.util

        import MedSAMSlicer

        if not MedSAMSlicer.MedSAMSlicerLogic().setupPythonRequirements(askConfirmation):
            return False
        missing = [req for name, req in TRAINING_REQUIREMENTS if importlib.util.find_spec(name) is None]
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "Training needs more Python packages: " + ", ".join(missing) + ". Install them now?"
            ):
                return False
            for requirement in missing:
                slicer.util.pip_install(requirement)
        return True

    # The only place that talks to MedSAMTrainingLib's job runner (a process started with
    # ``-m MedSAMSlicerLib.training.cli train ... --progress-json``, read line by line).
    def start(self, settings):
        """Start a training process for ``settings`` (keys of ``TrainConfig``); returns a run."""
        from MedSAMTrainingLib import jobs

        for key in ("data", "out"):
            if not settings.get(key):
                raise ValueError(f"Choose the {'dataset' if key == 'data' else 'run'} folder first.")
        # The job puts the folder holding MedSAMSlicerLib on PYTHONPATH (PythonSlicer does not
        # have the extension's module folders on sys.path).
        job = jobs.TrainingJob(settings, python=self.pythonExecutable())
        job.start()
        logging.info(f"MedSAM training started: {' '.join(job.command)}")
        return TrainingRun(dict(settings), job)

    def poll(self, run):
        """New progress events (dicts parsed from the process's --progress-json lines)."""
        return list(run.job.poll())

    def isRunning(self, run):
        return bool(run.job.running)

    def cancel(self, run):
        """Ask the process to stop; the trainer saves the current step before it exits."""
        run.cancelled = True
        run.job.cancel()

    def _failure(self, run):
        """None for a run that ended well (or was cancelled), else the error text."""
        code = run.job.returncode
        if run.cancelled or code in (0, None):
            return None
        return f"The training process ended with code {code}:\n{run.job.error_text()}"

    def finish(self, run, name=None):
        """After the process ended: copy the best (else latest) checkpoint to the MedSAM module's
        checkpoint folder and return a status line. Raises on a failed run."""
        failure = self._failure(run)
        if failure:
            raise RuntimeError(failure)
        runDir = run.settings["out"]
        source = None
        for candidate in ("best.pth", "latest.pth"):
            if os.path.isfile(os.path.join(runDir, candidate)):
                source = os.path.join(runDir, candidate)
                break
        if source is None:
            return "Training stopped before the first checkpoint; nothing to add to the MedSAM models."
        folder = self.checkpointFolder()
        os.makedirs(folder, exist_ok=True)
        model = run.settings.get("model") or "litemedsam"
        base = name or os.path.basename(os.path.normpath(runDir))
        target = os.path.join(folder, f"{base}-{model}.pth")
        # A plain state dict (no optimizer state): what the MedSAM module loads as a model.
        from MedSAMSlicerLib.training.trainer import export

        export(source, target)
        prefix = "Cancelled; the last saved" if run.cancelled else "Done; the"
        return f"{prefix} checkpoint is now a MedSAM model: {target}"


class TrainingRun:
    """A started training: its settings, the job, and whether the user cancelled it."""

    def __init__(self, settings, job):
        self.settings = settings
        self.job = job
        self.cancelled = False


#
# Test
#


class MedSAMTrainingTest(ScriptedLoadableModuleTest):
    """A few training steps on a tiny synthetic dataset, in the background process, then the
    checkpoint appears in the MedSAM module's model list."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_MedSAMTraining_short_run()

    def test_MedSAMTraining_short_run(self):
        import tempfile
        import time

        import numpy as np
        import SimpleITK as sitk

        logic = MedSAMTrainingLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        root = tempfile.mkdtemp(prefix="medsam-training-test-")
        for folder in ("images", "labels"):
            os.makedirs(os.path.join(root, "data", folder))
        for case in range(3):
            k, j, i = np.mgrid[0:12, 0:64, 0:64]
            blob = ((i - 32 - 3 * case) / 14.0) ** 2 + ((j - 30) / 10.0) ** 2 + ((k - 6) / 5.0) ** 2 <= 1.0
            image = sitk.GetImageFromArray(np.where(blob, 80, -200).astype(np.int16))
            label = sitk.GetImageFromArray(blob.astype(np.uint8))
            for im in (image, label):
                im.SetSpacing((1.5, 1.5, 3.0))
            sitk.WriteImage(image, os.path.join(root, "data", "images", f"CASE_{case:04d}_0000.nii.gz"))
            sitk.WriteImage(label, os.path.join(root, "data", "labels", f"CASE_{case:04d}.nii.gz"))
        settings = {"data": os.path.join(root, "data"), "out": os.path.join(root, "run"), "model": "litemedsam",
                    "epochs": 1, "max_steps": 2, "batch_size": 2, "device": "cpu", "freeze_image_encoder": True}
        job = logic.start(settings)
        deadline = time.time() + 600
        events = []
        while logic.isRunning(job) and time.time() < deadline:
            events += logic.poll(job)
            slicer.app.processEvents()
            time.sleep(0.5)
        events += logic.poll(job)
        self.assertFalse(logic.isRunning(job), "training did not finish in time")
        self.assertTrue(any(e.get("event") in ("step", "progress") for e in events), events)
        self.assertEqual(job.job.returncode, 0, job.job.error_text())
        message = logic.finish(job, name="selftest")
        self.delayDisplay(message)
        import MedSAMSlicer

        choices = [choice for _, choice in MedSAMSlicer.MedSAMSlicerLogic().modelChoices()]
        self.assertTrue(any("selftest-litemedsam.pth" in c for c in choices), choices)
        self.delayDisplay("Test passed")
