"""The layer between MRML nodes and the MedSAM engine (no Qt: runs in Slicer and on slicer-core).

Everything the Segment Editor effect, the module's logic and the headless script decide is
decided here, so it can be tested without the Slicer application:

* **Source volume -> engine array.** The volume node's voxels ``(k, j, i)`` are put in the
  engine's canonical axial order ``(z, y, x)`` (x toward Left, y toward Posterior, z toward
  Superior) by :class:`MedSAMSlicerLib.fileio.orientation.AxialOrientation`: axis permutation and flips only,
  so every canonical voxel is one voxel of the node. The node's voxels are never written.
* **RAS <-> IJK** happens here (and in the engine's ``volumes.py`` for files), nowhere else. A
  box from corner points, from a markups ROI or from a rectangle drawn in a slice view becomes a
  :class:`~MedSAMSlicerLib.boxes.BoxPrompt` in canonical voxel indices, by the engine's one rule
  (:func:`MedSAMSlicerLib.boxes.voxel_box`, which the command line uses too): voxels whose centres
  lie inside, and along an axis where the box is thinner than a voxel, the voxel nearest its middle.
* **Mask -> segment.** A canonical mask goes back to ``(k, j, i)``, becomes a labelmap in the
  volume's geometry (parent transforms included), is resampled onto the Segment Editor's modifier
  labelmap geometry and is written with the Segment Editor's own rules (``ModifySegmentByLabelmap``:
  its masking and overwrite settings). :func:`labelmaps.modifications` lists those edits; the
  effect hands them to ``scriptedEffect.modifySelectedSegmentByLabelmap``, the headless path
  (:meth:`MedSAMBridge.apply`) to ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``.

* **Threads.** Reading nodes (:meth:`MedSAMBridge.request`) and writing segments
  (:meth:`MedSAMBridge.write_segment`, :meth:`MedSAMBridge.apply`, the preview) happen on the
  thread that owns the scene; the engine work in between (:meth:`MedSAMBridge.compute`) touches no
  node and may run in a worker (:meth:`MedSAMBridge.start`). A result whose volume changed in the
  meantime is refused (:func:`volume_changed`).
* **Several boxes, one segment.** :meth:`MedSAMBridge.boxes_request` (or ``segment(..., boxes_ras=...)``)
  makes one segment from several boxes: on one slice its pieces, on several slices its key slices
  (``Segmenter.segment_boxes``; a 3D box among them gives the z-range,
  :func:`MedSAMSlicerLib.boxes.structure_prompts`). A correction may give a box per piece on its
  slice (``correction_request(..., more=...)``), recorded with ``"more"``.
* **Preview.** Each Segment Editor keeps its own preview node, referenced from its parameter set
  node (:func:`show_preview`, :func:`clear_preview`), so closing one editor never removes another's.

How a result is combined with the segment (``combine``):

* ``"slices"`` (default): the segment is replaced on the slices MedSAM segmented and kept on all
  others, so a box drawn again on one slice (2D) or a new propagation refines the segment.
* ``"add"``: the result is added to the segment.
* ``"replace"``: the segment becomes the result.

Other segments lose voxels only where the editor's overwrite mode says so (``"none"``,
``"visible"``, ``"all"``); the headless default is ``"none"``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer

from MedSAMSlicerLib.background import BackgroundTask, run_in_background
from MedSAMSlicerLib.boxes import BoxPrompt, structure_prompts
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.progress import CancelToken, ProgressCallback
from MedSAMSlicerLib.segmentation.provenance import Provenance, new_job, prompt_ras, volume_sha256

# The bridge's parts, imported here so that front ends use one module (``MRMLBridge.X``).
from .backends import Backend
from .choices import COMBINE_MODES, DIRECTIONS, MODES, WINDOW_CHOICES  # noqa: F401
from .labelmaps import (  # noqa: F401
    MODIFICATION_MODES,
    modifications,
    restore_state,
    save_state,
    segment_array,
)
from .predictions import Prediction, PredictionRequest  # noqa: F401
from .preview import PREVIEW_REFERENCE_ROLE, clear_preview, preview_node, show_preview  # noqa: F401
from .prompts import MAX_VIEW_TILT_DEGREES, prompt_from_points, prompt_from_roi, view_tilt_degrees  # noqa: F401
from .records import segment_record, segment_tags, write_record  # noqa: F401
from .sources import (  # noqa: F401
    SourceVolume,
    WindowLike,
    _to_world,
    source_volume,
    volume_changed,
    window_for,
)

OVERWRITE_MODES = ("none", "visible", "all")

# id(segmenter) -> key of the volume and window it was last given (see MedSAMBridge.request).
_LOADED_VOLUME: Dict[int, str] = {}
_LOADED_LOCK = threading.Lock()


def _notes(src: SourceVolume, stop_reasons: Dict[str, str]) -> Dict[str, str]:
    """The engine's stop reasons with their slices named as the viewer numbers them (``"k 43"``)."""
    name = src.orientation.name_slices
    return {name(k): name(v) for k, v in stop_reasons.items()}


def _check_mode(mode: str, direction: str) -> None:
    if mode not in MODES:
        raise MedSAMError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if direction not in DIRECTIONS:
        raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")


class MedSAMBridge:
    """MRML in, engine call, segment out. One per front end; models are shared (see
    :func:`MedSAMSlicerLib.segmenter.shared_segmenter`).

    Args:
        model: registry name (``"litemedsam"``, ``"medsam"``).
        checkpoint: a weights file to use instead of the registry's (e.g. fine-tuned).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        segmenter: a ready ``Segmenter`` (tests, or a caller that manages its own).

    Threads: :meth:`request`, :meth:`apply`, the preview and everything else that touches nodes
    run on the thread that owns the scene (Slicer's GUI thread); :meth:`compute` only uses the
    engine and may run in a worker (:meth:`start`).
    """

    def __init__(self, model: str = "litemedsam", checkpoint: Optional[str] = None, device: str = "auto",
                 segmenter=None, speed: str = "exact", backend: Optional[Backend] = None):
        #: Where the model runs (:class:`~MedSAMBridgeLib.backends.Backend`): Local, or Remote (a
        #: ``medsam-slicer serve``; then nothing here imports torch, and the server's model is used).
        self.backend = backend or Backend()
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        #: The speed setting (a :data:`MedSAMSlicerLib.models.speed.SPEED_TIERS` name).
        self.speed = speed
        self._segmenter = segmenter
        self._volume_sha: Dict[str, str] = {}

    # -- model ----------------------------------------------------------------------------------
    def configure(self, model: Optional[str] = None, checkpoint: Optional[str] = None, device: Optional[str] = None,
                  speed: Optional[str] = None, backend: Optional[Backend] = None) -> None:
        """Switch model, checkpoint, device, speed setting or backend (loaded on next use)."""
        if backend is not None and backend != self.backend:
            if self.backend.remote and self._segmenter is not None:
                self._segmenter.close()
            self.backend, self._segmenter = backend, None
        current = {"model": self.model, "checkpoint": self.checkpoint, "device": self.device, "speed": self.speed}
        wanted = {
            "model": self.model if model is None else model,
            # An empty string clears the checkpoint (back to the registry's weights).
            "checkpoint": self.checkpoint if checkpoint is None else (checkpoint or None),
            "device": self.device if device is None else device,
            "speed": self.speed if speed is None else speed,
        }
        if wanted != current:
            self.model, self.checkpoint, self.device, self.speed = (
                wanted["model"], wanted["checkpoint"], wanted["device"], wanted["speed"])
            self._segmenter = None

    @property
    def segmenter(self):
        """The shared segmenter (loads the model on first use, in whichever thread asks first)."""
        if self._segmenter is None and self.backend.remote:
            self._segmenter = self.backend.segmenter()
        if self._segmenter is None:
            from MedSAMSlicerLib.segmenter import shared_segmenter

            self._segmenter = shared_segmenter(self.model, self.checkpoint, self.device, speed=self.speed)
        return self._segmenter

    # -- volume ---------------------------------------------------------------------------------
    def _load_volume(self, request: PredictionRequest) -> None:
        """Give the engine the request's volume (windowed) unless it already has it."""
        segmenter = self.segmenter
        with _LOADED_LOCK:
            # The segmenter is shared (effect, module): remember per segmenter what it holds.
            if _LOADED_VOLUME.get(id(segmenter)) != request.volume_key:
                # No key: the engine names the volume by a hash of its voxels, so the same voxels
                # (reloaded, or the same image stored flipped or permuted) reuse cached embeddings.
                segmenter.set_volume(request.source.array, request.window)
                _LOADED_VOLUME[id(segmenter)] = request.volume_key

    def prefetch_around(self, volume_node, point_world, radius: int = 3, window: WindowLike = None) -> BackgroundTask:
        """Encode the slices around ``point_world`` in a background task (for a quick preview).

        Returns the started task; its ``centre`` attribute is the slice under the point. A GUI
        whose event loop keeps the GIL must pump it (:meth:`BackgroundTask.pump`).
        """
        src = source_volume(volume_node, copy=True)
        request = PredictionRequest(src, window_for(volume_node, window), BoxPrompt(0, (0, 0, 1, 1)))
        z = int(round(float(src.ras_to_canonical(point_world)[0, 2])))
        z = min(max(z, 0), src.shape[0] - 1)
        zs = sorted(range(max(0, z - radius), min(src.shape[0], z + radius + 1)), key=lambda v: abs(v - z))

        def work(progress, cancel):
            self._load_volume(request)  # Remote: the upload, early
            if self.segmenter.predictor is not None:
                self.segmenter.predictor.encode(zs, progress, cancel)
            return zs

        task = run_in_background(work, "medsam-prefetch")
        task.centre = z
        return task

    # -- prediction -----------------------------------------------------------------------------
    def request(
        self,
        volume_node,
        prompt: BoxPrompt,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
    ) -> PredictionRequest:
        """Read what a prediction needs from the scene (call on the scene's thread).

        Raises:
            MedSAMError: bad input.
        """
        _check_mode(mode, direction)
        return PredictionRequest(source_volume(volume_node, copy=True), window_for(volume_node, window), prompt,
                                 mode, direction)

    def compute(
        self,
        request: PredictionRequest,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Prediction:
        """Run the engine on a request. Touches no node: safe in a worker thread.

        Raises:
            MedSAMError: bad input. ``Cancelled``: ``cancel`` was set.
        """
        if cancel is not None:
            cancel.raise_if_cancelled()
        self._load_volume(request)
        if request.base is not None:
            return self._correct(request, progress, cancel)
        if request.more:
            return self._segment_boxes(request, progress, cancel)
        done = self.segmenter.segment(request.prompt, request.mode, request.direction, progress, cancel)
        return Prediction(request.source, request.prompt, request.mode, done.mask, done.covered, done.score,
                          _notes(request.source, done.stop_reasons), self._record(request), done.result, request.window)

    def compute_queue(
        self,
        requests: Dict[str, PredictionRequest],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Dict[str, Prediction]:
        """Several structures of one volume as one job (a queue of boxes, one per segment): each
        slice is encoded once for all, a slice's boxes are decoded together and overlaps are
        settled by the decoder's confidence, never by the queue's order. Touches no node.

        Args:
            requests: per segment id, its 3D :meth:`request` (same volume and window for all).

        Returns:
            Per segment id, its :class:`Prediction` (its record names the job's segments).
        """
        from MedSAMSlicerLib.segmentation.provenance import new_job

        if not requests:
            raise MedSAMError("The queue is empty: draw a box for each segment first.")
        first = next(iter(requests.values()))
        for key, request in requests.items():
            if request.mode != "3d" or request.base is not None:
                raise MedSAMError("Only new 3D boxes can be queued.")
            if len({p.z for p in request.boxes}) > 1:
                raise MedSAMError(f"Segment '{key}' has boxes on several slices (key slices): it is segmented on its "
                                  "own. Preview and apply it alone, then queue the others.")
            if request.volume_key != first.volume_key:
                raise MedSAMError("All queued boxes must be on the same volume, with the same window.")
        if cancel is not None:
            cancel.raise_if_cancelled()
        self._load_volume(first)
        prompts = {k: r.prompt if not r.more else self._structure(r) for k, r in requests.items()}
        job = self.segmenter.segment_structures(prompts, progress, cancel)
        shared = new_job(list(requests))
        out: Dict[str, Prediction] = {}
        for key, request in requests.items():
            result = job.results[key]
            covered = sorted({r.z for r in result.slices if r.accepted})
            score = next((float(r.score) for r in result.slices if r.z == request.prompt.z), float("nan"))
            record = dataclasses.replace(self._record(request), job=shared)
            prompt = request.prompt if not request.more else prompts[key][0]
            out[key] = Prediction(request.source, prompt, "3d", np.asarray(result.mask, dtype=bool), covered,
                                  score, _notes(request.source, result.stop_reasons), record, result, request.window)
        return out

    def correction_request(
        self,
        base: Prediction,
        prompt: BoxPrompt,
        accept: bool = False,
        segmentation_node=None,
        segment_id: Optional[str] = None,
        more: Sequence[BoxPrompt] = (),
    ) -> PredictionRequest:
        """A correction of the 3D result ``base`` (call on the scene's thread): a new box ``prompt``
        on a wrong slice (with ``more``, the boxes of the structure's other pieces on that slice:
        each piece followed from its own box, :meth:`Correction.with_boxes
        <MedSAMSlicerLib.segmentation.results.Correction.with_boxes>`), or with ``accept`` the
        prompt's slice marked good as it is. With
        ``segmentation_node`` and ``segment_id`` the mask corrected is that segment's (as the user
        edited it after applying ``base``), else ``base``'s own. The corrected slice is locked;
        propagation restarts from it to the next locked slice (:mod:`MedSAMSlicerLib.segmentation.corrections`).

        Raises:
            MedSAMError: ``base`` is not a 3D result, or its volume changed; ``more`` boxes on
                another slice than ``prompt``'s, or with ``accept``.
        """
        if base.mode != "3d" or base.result is None:
            raise MedSAMError("Only a 3D result can be corrected: segment the structure in 3D first.")
        more = tuple(more)
        if more and accept:
            raise MedSAMError("A slice marked good takes no box.")
        stray = next((p for p in more if p.z != prompt.z), None)
        if stray is not None:
            from . import reviewing

            raise MedSAMError(f"The boxes of one correction are the pieces on one slice: "
                              f"{reviewing.slice_name(base.source, prompt.z)} and "
                              f"{reviewing.slice_name(base.source, stray.z)} differ. Correct one slice at a time.")
        problem = volume_changed(base.source)
        if problem:
            raise MedSAMError(problem + " Segment it again.")
        current = None
        if segmentation_node is not None:
            current = segment_array(segmentation_node, segment_id, base.source)
        return PredictionRequest(base.source, base.window, prompt, "3d", "both", base=base, accept=accept,
                                 current=current, more=more)

    def _correct(self, request: PredictionRequest, progress, cancel) -> Prediction:
        from MedSAMSlicerLib.segmentation.results import Correction

        base, prompt = request.base, request.prompt
        correction = (Correction.accept(prompt.z) if request.accept
                      else Correction.with_boxes(prompt.z, [p.box for p in request.boxes]))
        current = base.result if request.current is None else request.current
        result = self.segmenter.correct(current, [correction], locked=base.result.locked,
                                        z_range=base.prompt.z_range, progress=progress, cancel=cancel)
        covered = sorted({r.z for r in result.slices if r.accepted} | set(result.locked))
        src = request.source
        if request.accept:
            centre = src.canonical_to_ras(np.array([[0.0, 0.0, prompt.z]]))[0]
            entry = {"kind": "accept", "slice_ras": [float(v) for v in centre], "edited": request.current is not None}
        else:
            entry = {"kind": "box", "ras": prompt_ras(src, prompt)}
            if request.more:
                entry["more"] = [prompt_ras(src, p) for p in request.more]
        record = base.record.with_corrections([entry]) if base.record is not None else None
        score = next((float(r.score) for r in result.slices if r.z == prompt.z), float("nan"))
        return Prediction(src, base.prompt, "3d", np.asarray(result.mask, dtype=bool), covered, score,
                          _notes(src, result.stop_reasons), record, result, request.window)

    def _record(self, request: PredictionRequest) -> Provenance:
        """How this request's result was made (the job names no structure yet: applying does)."""
        src = request.source
        if src.key not in self._volume_sha:
            self._volume_sha = {src.key: volume_sha256(src.array)}  # one volume's hash kept
        return Provenance.of(self.segmenter, [prompt_ras(src, p) for p in request.boxes], request.mode,
                             request.direction, new_job([]), self._volume_sha[src.key])

    @staticmethod
    def _structure(request: PredictionRequest) -> List[BoxPrompt]:
        """A request's boxes as the engine runs them (the rule for 3D boxes among them:
        :func:`MedSAMSlicerLib.boxes.structure_prompts`)."""
        n = len(request.boxes)
        return structure_prompts(request.boxes, [f"box {i} of {n}" for i in range(1, n + 1)],
                                 request.source.orientation.slice_to_index)

    def boxes_request(
        self,
        volume_node,
        prompts: Sequence[BoxPrompt],
        window: WindowLike = None,
    ) -> PredictionRequest:
        """One segment from several boxes (call on the scene's thread): boxes on one slice are its
        pieces, boxes on several slices its key slices, in 3D both ways
        (:meth:`Segmenter.segment_boxes <MedSAMSlicerLib.segmenter.Segmenter.segment_boxes>`). One
        box is :meth:`request` itself. A 3D box among them gives the segment's z-range
        (:func:`MedSAMSlicerLib.boxes.structure_prompts`).

        Raises:
            MedSAMError: no box, or boxes that do not go together (named ``box i of n``).
        """
        prompts = list(prompts)
        if not prompts:
            raise MedSAMError("Draw at least one box.")
        request = self.request(volume_node, prompts[0], "3d", "both", window)
        request = dataclasses.replace(request, more=tuple(prompts[1:]))
        self._structure(request)  # checked here, on the scene's thread, before any work
        return request

    def _segment_boxes(self, request: PredictionRequest, progress, cancel) -> Prediction:
        """:meth:`compute` for a request with several boxes: one segment from all of them."""
        if request.mode != "3d" or request.direction != "both":
            raise MedSAMError("Several boxes for one segment are followed in 3D, both ways.")
        prompts = self._structure(request)
        result = self.segmenter.segment_boxes(prompts, progress, cancel)
        covered = sorted({r.z for r in result.slices if r.accepted} | set(result.locked))
        score = next((float(r.score) for r in result.slices if r.z == prompts[0].z), float("nan"))
        return Prediction(request.source, prompts[0], "3d", np.asarray(result.mask, dtype=bool), covered, score,
                          _notes(request.source, result.stop_reasons), self._record(request), result, request.window)

    def start(self, request: PredictionRequest) -> BackgroundTask:
        """:meth:`compute` in a started :class:`~MedSAMSlicerLib.background.BackgroundTask`; its
        ``result()`` is the :class:`Prediction`. Check :func:`volume_changed` before using it."""
        return run_in_background(lambda progress, cancel: self.compute(request, progress, cancel), "medsam-predict")

    def predict(
        self,
        volume_node,
        prompt: BoxPrompt,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Prediction:
        """:meth:`request` then :meth:`compute`, in this thread. Nothing in the scene changes.

        Raises:
            MedSAMError: bad input. ``Cancelled``: ``cancel`` was set.
        """
        return self.compute(self.request(volume_node, prompt, mode, direction, window), progress, cancel)

    # -- writing --------------------------------------------------------------------------------
    def apply(
        self,
        prediction: Prediction,
        segmentation_node,
        segment_id: str,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
    ) -> None:
        """Write ``prediction`` into a segment through ``vtkSlicerSegmentEditorLogic`` (headless path;
        the effect uses ``modifySelectedSegmentByLabelmap`` with the same :meth:`modifications`).

        Args:
            overwrite: ``"none"``, ``"visible"`` or ``"all"``: which other segments lose the voxels
                the result takes. ``None``: the editor node's setting, or ``"none"`` without one.
            editor_node: a ``vtkMRMLSegmentEditorNode`` whose masking settings apply (a temporary
                one is made without it).

        On any error the segmentation is put back as it was.
        """
        if overwrite is not None and overwrite not in OVERWRITE_MODES:
            raise MedSAMError(f"unknown overwrite mode '{overwrite}'; choose one of: {', '.join(OVERWRITE_MODES)}")
        segmentation = segmentation_node.GetSegmentation()
        if segment_id is None or segmentation.GetSegment(segment_id) is None:
            raise MedSAMError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        scene = segmentation_node.GetScene()
        temporary = editor_node is None
        if temporary:
            editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAM temporary editor")
            editor_node.SetOverwriteMode(_overwrite_mode(overwrite or "none"))
        previous_overwrite = editor_node.GetOverwriteMode()
        if overwrite is not None:
            editor_node.SetOverwriteMode(_overwrite_mode(overwrite))
        state = save_state(segmentation_node)
        try:
            if not _has_reference_geometry(segmentation_node):
                segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(prediction.source.node)
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLScene(scene)
            logic.SetSegmentEditorNode(editor_node)
            editor_node.SetAndObserveSegmentationNode(segmentation_node)
            editor_node.SetAndObserveSourceVolumeNode(prediction.source.node)
            editor_node.SetSelectedSegmentID(segment_id)
            if not logic.ResetModifierLabelmapToDefault():
                raise MedSAMError(f"the Segment Editor could not prepare '{segmentation_node.GetName()}' for editing")
            reference = logic.GetModifierLabelmap()
            for image, mode in modifications(prediction, segmentation_node, reference, combine):
                logic.ModifySegmentByLabelmap(segmentation_node, segment_id, image, _logic_mode(mode), True, False)
            if prediction.record is not None:
                write_record(segmentation_node, segment_id, prediction.record, combine)
        except BaseException:
            restore_state(segmentation_node, state)
            raise
        finally:
            if temporary:
                scene.RemoveNode(editor_node)
            else:
                editor_node.SetOverwriteMode(previous_overwrite)

    def segment_request(
        self,
        volume_node,
        segmentation_node,
        segment_id: Optional[str] = None,
        box_ras=None,
        roi_node=None,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
        boxes_ras=None,
    ) -> PredictionRequest:
        """Check the inputs of :meth:`segment` and read them from the scene (scene's thread).

        Raises:
            MedSAMError: bad input.
        """
        if sum(v is not None for v in (box_ras, roi_node, boxes_ras)) != 1:
            raise MedSAMError("give either a box (two RAS corners), several boxes (two RAS corners each) or an ROI node")
        if segmentation_node is None:
            raise MedSAMError("No segmentation: create or select the segmentation to write to.")
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAMError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        _check_mode(mode, direction)
        src = source_volume(volume_node, copy=True)
        if boxes_ras is not None:
            prompts = [prompt_from_points(src, corners) for corners in boxes_ras]
            if not prompts:
                raise MedSAMError("give at least one box")
            if len(prompts) > 1 and (mode != "3d" or direction != "both"):
                raise MedSAMError("Several boxes for one segment are followed in 3D, both ways: 2D and a "
                                  "direction work on one box.")
            request = PredictionRequest(src, window_for(volume_node, window), prompts[0], mode, direction,
                                        more=tuple(prompts[1:]))
            if request.more:
                self._structure(request)
            return request
        prompt = prompt_from_roi(src, roi_node) if roi_node is not None else prompt_from_points(src, box_ras)
        return PredictionRequest(src, window_for(volume_node, window), prompt, mode, direction)

    def write_segment(
        self,
        prediction: Prediction,
        segmentation_node,
        segment_id: Optional[str] = None,
        segment_name: Optional[str] = None,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
    ) -> str:
        """Write a finished prediction into ``segment_id``, or into a new segment named
        ``segment_name`` (scene's thread). Returns the segment's ID.

        Raises:
            MedSAMError: the volume or the segmentation changed or went away since the request;
                the segmentation is then unchanged.
        """
        problem = volume_changed(prediction.source)
        if problem:
            raise MedSAMError(problem + " Nothing was written; run it again.")
        if segmentation_node is None or segmentation_node.GetScene() is None:
            raise MedSAMError("The segmentation was removed while MedSAM was running; nothing was written.")
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAMError(f"The segment '{segment_id}' was removed while MedSAM was running; nothing was written.")
        added = False
        if segment_id is None:
            segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", segment_name or "MedSAM")
            added = True
        try:
            self.apply(prediction, segmentation_node, segment_id, combine, overwrite, editor_node)
        except BaseException:
            if added:
                segmentation_node.GetSegmentation().RemoveSegment(segment_id)
            raise
        return segment_id

    def segment(
        self,
        volume_node,
        segmentation_node,
        segment_id: Optional[str] = None,
        box_ras=None,
        roi_node=None,
        mode: str = "3d",
        direction: str = "both",
        window: WindowLike = None,
        combine: str = "slices",
        overwrite: Optional[str] = None,
        editor_node=None,
        segment_name: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        boxes_ras=None,
    ) -> Tuple[str, Prediction]:
        """Everything in one call, in this thread (scripts, the self-test, the headless script).

        Args:
            box_ras: two opposite RAS corners ``[[R0, A0, S0], [R1, A1, S1]]`` (world, mm), or
            roi_node: a ``vtkMRMLMarkupsROINode``, or
            boxes_ras: several boxes for the one segment, two RAS corners each: its pieces on one
                slice, or its key slices (:meth:`boxes_request`); one of the three.
            segment_id: the segment to write; ``None`` adds a segment named ``segment_name``
                (only once the result is ready, so a cancelled run adds nothing).

        A GUI runs the same steps with the engine work in a worker thread:
        :meth:`segment_request`, :meth:`start`, then :meth:`write_segment`.

        Returns:
            ``(segment_id, prediction)``.

        Raises:
            MedSAMError: bad input. ``Cancelled``: cancelled; the segmentation is unchanged.
        """
        request = self.segment_request(volume_node, segmentation_node, segment_id, box_ras, roi_node, mode,
                                       direction, window, boxes_ras)
        prediction = self.compute(request, progress, cancel)
        segment_id = self.write_segment(prediction, segmentation_node, segment_id, segment_name, combine, overwrite,
                                        editor_node)
        return segment_id, prediction


def _has_reference_geometry(segmentation_node) -> bool:
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return bool(segmentation_node.GetSegmentation().GetConversionParameter(name))


def _overwrite_mode(name: str) -> int:
    return {
        "none": slicer.vtkMRMLSegmentEditorNode.OverwriteNone,
        "visible": slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments,
        "all": slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments,
    }[name]


def _logic_mode(name: str) -> int:
    # Looked up when used, not at import: vtkSlicerSegmentEditorLogic exists from Slicer 5.10 on,
    # and an older Slicer must still be able to import this module to say what it needs.
    logic = slicer.vtkSlicerSegmentEditorLogic
    return {"set": logic.ModificationModeSet, "add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove}[name]
