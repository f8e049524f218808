"""MedSAM Training: fine-tune MedSAM / LiteMedSAM on labelled cases, from Slicer.

The training runs in a background process (``PythonSlicer -m MedSAMSlicerLib.training.cli
train ... --progress-json --export-to ...``) started and read by ``MedSAMTrainingLib`` (no Qt
there); this module only collects the settings, polls the job with a timer, shows progress and
the loss / Dice plot the trainer writes. The process itself exports its best (else latest)
weights into the folder the MedSAM module lists its models from, so a run that Slicer did not
see end still reaches the model list. Module, Widget, Logic, Test, in Slicer's usual order.
"""

import logging
import os

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import MedSAMSlicer  # noqa: F401  (loaded first, as our dependency: it makes our packages the extension's own)
from MedSAMBridgeLib.choices import DEVICE_CHOICES, choice_enum

#: Packages the training process needs besides the MedSAM module's (cc3d removes small label
#: islands in preprocessing, matplotlib draws the loss/Dice plot).
TRAINING_REQUIREMENTS = ("connected-components-3d>=3.12,<5", "matplotlib>=3.6,<4")
POLL_INTERVAL_MS = 1000
PLOT_FILE = "training.png"
#: Folders are per computer, so they are kept in the application settings, not in the scene.
SETTINGS_PREFIX = "MedSAMTraining/"

TrainingModel = choice_enum("TrainingModel", (("litemedsam", "LiteMedSAM (CPU-friendly)"), ("medsam", "MedSAM ViT-B (GPU)")))
TrainingDevice = choice_enum("TrainingDevice", DEVICE_CHOICES)


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
The best checkpoint is added to the MedSAM module's checkpoint folder, where the MedSAM effect
lists it as a model. Cancel, or closing Slicer, stops the run after it saves its current step (a run
can be resumed); the process also stops by itself if Slicer ends in any other way.
<p>See the <a href="https://github.com/medsam-slicer/SlicerMedSAM#fine-tuning-medsamtraining">documentation</a>.</p>
"""
        self.parent.acknowledgementText = "Training recipe after MedSAM's train_one_gpu.py (bowang-lab/MedSAM)."


#
# Parameter node
#


@parameterNodeWrapper
class MedSAMTrainingParameterNode:
    """The training settings, saved with the scene.

    model - the architecture to fine-tune.
    epochs, maxSteps (0: no limit), batchSize, learningRate - the schedule.
    freezeEncoder - train the mask decoder only.
    device - where training runs.
    checkpointName - the name in the MedSAM model list (default: the run folder's name).
    """

    model: TrainingModel = TrainingModel.litemedsam
    epochs: int = 10
    maxSteps: int = 0
    batchSize: int = 4
    learningRate: float = 1e-4
    freezeEncoder: bool = False
    device: TrainingDevice = TrainingDevice.auto
    checkpointName: str = ""


#
# Widget
#


class MedSAMTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.install = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        self.ui = MedSAMSlicer.setupPanel(self, "MedSAMTraining.ui")
        if self.ui is None:
            return
        self.logic = MedSAMTrainingLogic()

        import ctk

        for selector in (self.ui.dataSelector, self.ui.outputSelector):
            selector.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.initialWeights.filters = ctk.ctkPathLineEdit.Files
        self.ui.initialWeights.nameFilters = ["Weights (*.pth *.pt)"]
        settings = qt.QSettings()
        self.ui.dataSelector.currentPath = settings.value(SETTINGS_PREFIX + "Data", "")
        self.ui.outputSelector.currentPath = settings.value(SETTINGS_PREFIX + "Out", "")

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.startButton.connect("clicked()", self.onStartOrCancel)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        """Slicer is closing (or the module is reloaded): stop the run, undo the connections.

        Quitting is handled here, not in an ``aboutToQuit()`` slot of ours: Slicer connects its own
        ``qSlicerCoreApplication::onAboutToQuit`` first, and it unloads every module
        (``qSlicerModuleFactoryManager::unloadModules`` -> ``moduleAboutToBeUnloaded`` ->
        ``ScriptedLoadableModuleWidget.cleanup``) before any later slot runs (Base/QTCore/
        qSlicerCoreApplication.cxx, Base/Python/slicer/ScriptedLoadableModule.py, v5.10.0 and v5.12.3).
        The stop is not waited for: the trainer saves its step and exits by itself (its stdin closes
        with Slicer anyway; ``MedSAMTrainingLib.jobs``), so Slicer closes at once."""
        if self.run is not None and self.logic.isRunning(self.run):
            logging.info("MedSAM Training: stopping the training run; it saves its current step first")
            self.logic.cancel(self.run)
        if self.install is not None:
            self.install.cancel()
            self.install.cleanup()
            self.install = None
        if hasattr(self, "timer"):
            self.timer.stop()
            self.timer.disconnect("timeout()", self.onPoll)
            self.ui.startButton.disconnect("clicked()", self.onStartOrCancel)
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def _settings(self):
        p = self._parameterNode
        return {
            "data": self.ui.dataSelector.currentPath,
            "out": self.ui.outputSelector.currentPath,
            "model": p.model.value,
            "checkpoint": self.ui.initialWeights.currentPath or None,
            "epochs": p.epochs,
            "max_steps": p.maxSteps or None,
            "batch_size": p.batchSize,
            "lr": p.learningRate,
            "freeze_image_encoder": p.freezeEncoder,
            "device": p.device.value,
        }

    def onStartOrCancel(self):
        if self.install is not None:
            self.install.cancel()
            self.ui.statusLabel.text = "Cancelling the install..."
            return
        if self.run is not None:
            self.logic.cancel(self.run)
            self.ui.statusLabel.text = "Cancelling: the current step is saved to latest.pth..."
            return
        settings = self._settings()
        qt.QSettings().setValue(SETTINGS_PREFIX + "Data", settings["data"])
        qt.QSettings().setValue(SETTINGS_PREFIX + "Out", settings["out"])
        setup = self.logic.firstUse(settings)
        if setup.ready:
            self._start(settings)
        elif setup.problem:
            self.ui.statusLabel.text = setup.message
        elif not self.logic.askToInstall(setup):
            self.ui.statusLabel.text = setup.declined()
        else:  # first use: installed in the background, then the run starts
            import MedSAMSlicer

            self.install = MedSAMSlicer.InstallPump(setup, self.ui.statusLabel, self.ui.progressBar,
                                                    lambda ok: self._installDone(ok, settings))
            self.install.start()
            self.ui.startButton.text = "Cancel"

    def _installDone(self, ok, settings):
        self.install = None
        self.ui.startButton.text = "Start training"
        if ok:
            self._start(settings)

    def _start(self, settings):
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            self.run = self.logic.start(settings, name=self._parameterNode.checkpointName or None)
            self.ui.startButton.text = "Cancel"
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting the training process..."
            self.timer.start()

    def onPoll(self):
        if self.run is None:
            self.timer.stop()
            return
        for event in self.logic.poll(self.run):
            self._show(event)
        if not self.logic.isRunning(self.run):
            self.timer.stop()
            self._finished()

    def _show(self, event):
        kind = event.get("event")
        if kind == "progress":  # preprocessing, training steps, validation
            self.ui.progressBar.maximum = max(int(event.get("total") or 1), 1)
            self.ui.progressBar.value = int(event.get("done") or 0)
            self.ui.progressBar.format = f"{event.get('stage', '')}: %v/%m"
            if event.get("message"):
                self.ui.statusLabel.text = f"{event.get('stage', '')}: {event['message']}"
        elif kind == "validation":
            dice = event.get("mean_dice")
            if dice is not None:
                self.ui.statusLabel.text = f"Validation at step {event.get('step')}: mean Dice {dice:.3f}"
        elif kind in ("error", "cancelled", "warning"):
            # Warnings: e.g. training on an incomplete preparation, a window that shows next to nothing.
            self.ui.statusLabel.text = f"{kind.capitalize()}: {event.get('message', '')}"
            if kind == "warning":
                logging.warning(f"MedSAM Training: {event.get('message', '')}")
        if kind in ("validation", "checkpoint", "done", "exit"):
            self._showPlot()

    def _showPlot(self):
        path = os.path.join(self.ui.outputSelector.currentPath, PLOT_FILE)
        if os.path.isfile(path):
            pixmap = qt.QPixmap(path)
            if not pixmap.isNull():
                self.ui.plotLabel.setPixmap(pixmap.scaledToWidth(min(520, pixmap.width()), qt.Qt.SmoothTransformation))

    def _finished(self):
        run, self.run = self.run, None
        self.ui.startButton.text = "Start training"
        self.ui.progressBar.setVisible(False)
        self._showPlot()
        with slicer.util.tryWithErrorDisplay("Training failed.", waitCursor=True):
            self.ui.statusLabel.text = self.logic.finish(run)


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

    def getParameterNode(self):
        return MedSAMTrainingParameterNode(super().getParameterNode())

    def pythonExecutable(self):
        """PythonSlicer: Slicer's own Python, with the packages installed in Slicer (the same
        rule as for installs: ``MedSAMBridgeLib.installs.python_executable``)."""
        from MedSAMBridgeLib import installs

        return installs.python_executable()

    def checkpointFolder(self):
        """Where the MedSAM module looks for fine-tuned checkpoints."""

        return MedSAMSlicer.MedSAMSlicerLogic().checkpointFolder()

    def firstUse(self, settings=None):
        """The first-use flow (``MedSAMBridgeLib.installs.FirstUse``) for a run: the MedSAM
        module's packages, the weights of the model to fine-tune (unless a weights file starts
        it), and the training packages."""
        from MedSAMBridgeLib import installs

        settings = settings or {}
        model, checkpoint = settings.get("model") or "litemedsam", settings.get("checkpoint")
        return installs.FirstUse(lambda: installs.plan_installs(model, checkpoint, TRAINING_REQUIREMENTS))

    def askToInstall(self, setup):

        return MedSAMSlicer.MedSAMSlicerLogic().askToInstall(setup)

    def setupPythonRequirements(self, askConfirmation=True, settings=None):
        """Install what training needs, in this thread (scripts, the self-test). Returns True when ready."""

        return MedSAMSlicer.MedSAMSlicerLogic().runFirstUse(self.firstUse(settings), askConfirmation)

    def exportPath(self, settings, name=None):
        """Where a run's weights go: ``<checkpoint folder>/<name or run folder>-<model>.pth``."""
        from MedSAMSlicerLib.models.model_choice import checkpoint_file_name

        base = name or os.path.basename(os.path.normpath(settings["out"]))
        return os.path.join(self.checkpointFolder(), checkpoint_file_name(base, settings.get("model") or "litemedsam"))

    # The only place that talks to MedSAMTrainingLib's job runner (a process started with
    # ``-m MedSAMSlicerLib.training.cli train ... --progress-json``, read line by line).
    def start(self, settings, name=None):
        """Start a training process for ``settings`` (keys of ``TrainConfig``); returns a run."""
        from MedSAMTrainingLib import jobs

        for key in ("data", "out"):
            if not settings.get(key):
                raise ValueError(f"Choose the {'dataset' if key == 'data' else 'run'} folder first.")
        target = self.exportPath(settings, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # The job puts the folder holding MedSAMSlicerLib on PYTHONPATH (PythonSlicer does not
        # have the extension's module folders on sys.path).
        job = jobs.TrainingJob(settings, python=self.pythonExecutable(), export_to=target)
        job.start()
        logging.info(f"MedSAM training started: {' '.join(job.commands[-1])}")
        return TrainingRun(dict(settings), job, target)

    def poll(self, run):
        """New progress events (dicts parsed from the process's --progress-json lines)."""
        return list(run.job.poll())

    def isRunning(self, run):
        return bool(run.job.running)

    def cancel(self, run):
        """Ask the process to stop (through its stdin: ``PythonSlicer`` forwards no signals); the
        trainer saves the current step (and exports it) before it exits."""
        run.cancelled = True
        run.job.cancel()

    def stop(self, run, timeout):
        """Cancel and wait up to ``timeout`` seconds, then end the process tree (Slicer is closing)."""
        run.cancelled = True
        return run.job.stop(timeout)

    def finish(self, run):
        """After the process ended: a status line. Raises on a failed run."""
        code = run.job.returncode
        if not run.cancelled and code not in (0, None):
            raise RuntimeError(f"The training process ended with code {code}:\n{run.job.error_text()}")
        if not os.path.isfile(run.exportPath):
            return "Training stopped before the first checkpoint; nothing to add to the MedSAM models."
        prefix = "Cancelled; the last saved" if run.cancelled else "Done; the"
        return f"{prefix} checkpoint is now a MedSAM model: {run.exportPath}"


class TrainingRun:
    """A started training: its settings, the job, where its weights are exported, and whether
    the user cancelled it."""

    def __init__(self, settings, job, exportPath):
        self.settings = settings
        self.job = job
        self.exportPath = exportPath
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
        run = logic.start(settings, name="selftest")
        deadline = time.time() + 600
        events = []
        while logic.isRunning(run) and time.time() < deadline:
            events += logic.poll(run)
            slicer.app.processEvents()
            time.sleep(0.5)
        events += logic.poll(run)
        self.assertFalse(logic.isRunning(run), "training did not finish in time")
        self.assertTrue(any(e.get("event") in ("step", "progress") for e in events), events)
        self.assertEqual(run.job.returncode, 0, run.job.error_text())
        message = logic.finish(run)
        self.delayDisplay(message)

        files = [choice.checkpoint or "" for choice in MedSAMSlicer.MedSAMSlicerLogic().modelChoices()]
        self.assertTrue(any(f.endswith("selftest-litemedsam.pth") for f in files), files)
        self.delayDisplay("Test passed")
