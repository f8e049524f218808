"""The one entry point every front end uses: the command line, the Slicer effect and module,
the headless script, the benchmark and the training's evaluation.

>>> seg = Segmenter("litemedsam")                       # loads the model once
>>> seg.set_volume(ct_zyx)                              # raw (z, y, x); window: auto (CT/MR)
>>> seg.segment_slice(60, (30, 20, 70, 60)).mask       # (y, x) bool
>>> seg.segment_3d(60, (30, 20, 70, 60)).mask          # (z, y, x) bool, automatic extent
>>> seg.segment(BoxPrompt(60, (30, 20, 70, 60)), "3d")  # what the front ends call: a Segmentation
>>> seg.correct(result, [Correction.with_box(45, (28, 25, 66, 58))])  # fix slice 45, propagate again
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .background import BackgroundTask
from .boxes import DIRECTIONS, MODES, BoxPrompt
from .errors import MedSAMError
from .models import cpu_features
from .models.checkpoints import load_model
from .models.devices import select_device, select_precision
from .models.optimize import optimize_for_inference
from .models.registry import ModelSpec, get_spec, resolve_weights
from .models.speed import SpeedTier, get_speed
from .progress import CancelToken, ProgressCallback
from .segmentation.corrections import Correction, correct
from .segmentation.predictor import EmbeddingCache, Predictor, SliceResult, volume_key
from .segmentation.preprocessing import Window, apply_window, resolve_window
from .segmentation.propagation import PropagationResult, PropagationSettings, StopRule, split_box3d
from .segmentation.results import Segmentation  # noqa: F401  (its home is results.py, torch-free)
from .segmentation.strided import propagate_strided
from .segmentation.structures import StructuresResult, segment_boxes, segment_structures

PathLike = Union[str, "os.PathLike[str]"]


def check_box_settings(spec: ModelSpec, settings: Optional[PropagationSettings] = None,
                       stop: Optional[StopRule] = None, what: str = "") -> None:
    """The box-propagation settings (:class:`PropagationSettings`: margins, wider box, stop rule)
    are for the models that propagate a box slice by slice (``"propagation": "box"``); a model that
    propagates with SAM 2's memory (MedSAM2) takes only the defaults. Raises :class:`MedSAMError`
    (prefixed with ``what``, e.g. a variant's name) for anything else, before any work is done."""
    if spec.propagation == "box":
        return
    if stop is not None or (settings is not None and settings != PropagationSettings()):
        raise MedSAMError(f"{what}{': ' if what else ''}{spec.title} propagates with SAM 2's memory: the "
                          "box-propagation settings (margins, wider box, stop rule) do not apply to it")


class Segmenter:
    """A loaded model plus the volume it works on.

    Args:
        model: registry name, ``"litemedsam"`` (CPU-friendly), ``"medsam"`` (ViT-B, for GPUs) or
            ``"medsam2"`` (SAM 2.1 tiny with memory propagation, for GPUs; needs the ``sam2`` package).
        checkpoint: a weights file to use instead of the registry's (e.g. one made by
            ``medsam-train``); it must fit ``model``'s architecture.
        device: ``auto|cpu|cuda|mps``.
        precision: ``auto|float32|bfloat16|float16`` for the image encoder (``auto``: bfloat16 on
            GPUs, float32 on CPUs).
        download: allow downloading registry weights that are not on disk yet.
        cache_mb: memory cap of the embedding cache.
        batch_size: slices per encoder call (default 1 on a CPU, 16 on a GPU).
        progress: reports weight downloads.
        optimize: rewrite the image encoder for inference (:func:`~MedSAMSlicerLib.models.optimize.optimize_for_inference`:
            fused layers, fused attention kernels, channels-last; the same masks, faster).
            ``False`` keeps the plain modules (for comparisons and debugging).
        bfloat16_matmuls: opt-in, LiteMedSAM on a CPU with native bfloat16 (AVX512-BF16/AMX) in
            float32: the transformer stages' linear layers as bfloat16 products, ~1.25x faster
            encoding; masks close to but not the same as float32 (see ``optimize.py``). Where this
            CPU cannot (:func:`~MedSAMSlicerLib.models.cpu_features.bfloat16_matmuls_missing`) the float32
            layers stay and :attr:`notes` says why; the same for a speed tier's bfloat16 and for
            ``precision="bfloat16"`` on a CPU (emulated without native bfloat16: a note).
        speed: a :class:`~MedSAMSlicerLib.models.speed.SpeedTier` or its name, ``"exact"`` (default),
            ``"fast"`` or ``"fastest"`` (:data:`~MedSAMSlicerLib.models.speed.SPEED_TIERS` says what each
            costs in accuracy). A tier whose runtime is not installed raises :class:`MedSAMError`
            with the install command.
    """

    def __init__(
        self,
        model: str = "litemedsam",
        checkpoint: Optional[PathLike] = None,
        device: str = "auto",
        precision: str = "auto",
        download: bool = False,
        cache_mb: int = 2048,
        batch_size: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        optimize: bool = True,
        bfloat16_matmuls: bool = False,
        speed: Union[str, SpeedTier, None] = None,
    ) -> None:
        self.spec: ModelSpec = get_spec(model)
        self.speed: SpeedTier = get_speed(speed)
        self.device = select_device(device)
        self.dtype = select_precision(precision, self.device)
        #: What was asked for but this machine cannot give, one line each (shown by the front ends).
        self.notes: List[str] = []
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            note = cpu_features.bfloat16_autocast_note()
            if note:
                self._note(note)
            if cpu_features.bfloat16_autocast_missing() is not None:
                self.dtype = torch.float32
        self.window: Optional[Window] = None
        #: The propagation settings :meth:`segment_3d` and :meth:`segment_box3d` use by default.
        self.propagation = PropagationSettings()
        self.bfloat16_matmuls = False
        self.encoder_runtime: Optional[str] = None
        #: MedSAM2's engine (SAM 2's memory propagation) when the registry says ``"propagation": "memory"``.
        self.memory = None
        if self.spec.propagation == "memory":
            self._init_memory(checkpoint, download, progress, cache_mb)
            return
        # The tier's encoder runtime and precision are for CPUs in float32 (speed.py).
        cpu_recipe = self.device.type == "cpu" and self.dtype == torch.float32
        runtime = self.speed.encoder if cpu_recipe else "torch"
        if runtime != "torch":
            missing = self.speed.missing()
            if missing:
                raise MedSAMError(f"the '{self.speed.name}' speed cannot be used: {missing}")
        runtime_precision = self.speed.precision
        if runtime != "torch" and runtime_precision == "bf16":
            missing = cpu_features.openvino_bfloat16_missing()
            if missing:
                self._note(cpu_features.fallback_note("openvino_bfloat16", missing))
                runtime_precision = "f32"
        bfloat16_matmuls = bfloat16_matmuls or (cpu_recipe and runtime == "torch" and self.speed.precision == "bf16")
        self.weights: Path = resolve_weights(self.spec, checkpoint=checkpoint, download=download, progress=progress)
        self.model = load_model(self.spec, self.weights, device=self.device)
        self.model.eval()
        self.bfloat16_matmuls = bool(
            optimize and bfloat16_matmuls and self.device.type == "cpu" and self.dtype == torch.float32
            and self.spec.architecture == "tiny_vit"
        )
        if self.bfloat16_matmuls:
            missing = cpu_features.bfloat16_matmuls_missing()
            if missing:
                self._note(cpu_features.fallback_note("bfloat16_matmuls", missing))
                self.bfloat16_matmuls = False
        stat = self.weights.stat()
        model_key = f"{self.spec.name}:{self.weights.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
        self.encoder_runtime = None
        if runtime != "torch":
            from .models.encoder_runtimes import RuntimeEncoder

            # Converted from the plain encoder: the runtimes do their own fusing.
            encoder = RuntimeEncoder(self.model.image_encoder, model_key, self.spec.input_size, runtime=runtime,
                                     precision=runtime_precision)
            self.model.image_encoder = encoder
            self.encoder_runtime = encoder.describe()
            model_key += f"|{runtime}:{runtime_precision}"
        elif optimize:
            optimize_for_inference(self.model, self.device, self.dtype, bfloat16_matmuls=self.bfloat16_matmuls)
        if batch_size is None:
            # On a CPU a batch is no faster per slice (LiteMedSAM, 8 slices, idle 2-core EPYC: 6.9 s
            # at batch 1, 7.8 s at 2, 7.6 s at 4) and costs memory (20-slice 3D box: peak +346 MB at
            # batch 1, +656 MB at 4; the reference pipeline +~390 MB). GPUs gain from batches.
            batch_size = 1 if self.device.type == "cpu" else 16
        self.predictor = Predictor(
            self.model,
            self.spec.preprocessing,
            model_key,
            self.device,
            dtype=self.dtype,
            batch_size=batch_size,
            cache=EmbeddingCache(int(cache_mb) << 20),
        )

    def _init_memory(self, checkpoint, download, progress, cache_mb) -> None:
        """MedSAM2: SAM 2's network and memory propagation (:mod:`~MedSAMSlicerLib.segmentation.medsam2`). Its
        encoder is not rewritten (no speed settings: the tiers convert LiteMedSAM/MedSAM encoders)."""
        from .segmentation.medsam2 import FeatureCache, MedSAM2Engine

        if self.speed.name != "exact":
            raise MedSAMError(f"the '{self.speed.name}' speed setting is for LiteMedSAM and MedSAM (it converts their "
                              f"image encoders); {self.spec.title} runs at the 'exact' speed")
        self.weights = resolve_weights(self.spec, checkpoint=checkpoint, download=download, progress=progress)
        self.model = load_model(self.spec, self.weights, device=self.device)
        stat = self.weights.stat()
        model_key = f"{self.spec.name}:{self.weights.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
        self.memory = MedSAM2Engine(self.model, model_key, self.device, self.dtype,
                                    cache=FeatureCache(int(cache_mb) << 20))
        #: For the front ends that prefetch (``predictor.encode``): the engine encodes slices too.
        self.predictor = self.memory  # type: ignore[assignment]

    def _no_box_settings(self, settings, stop=None) -> None:
        check_box_settings(self.spec, settings, stop)

    @property
    def embedding_cache(self):
        """The slice embeddings kept between calls (:class:`~MedSAMSlicerLib.segmentation.memory.MemoryLRU`:
        LiteMedSAM/MedSAM's :class:`EmbeddingCache` or MedSAM2's feature cache), under ``cache_mb``."""
        return self.predictor.cache

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights file (computed once; what a record stores and a replay checks)."""
        if getattr(self, "_weights_sha256", None) is None:
            from .models.registry import file_digest

            self._weights_sha256 = file_digest(self.weights)
        return self._weights_sha256

    @property
    def precision(self) -> str:
        """The image encoder's precision as a record names it (``"float32"``, ``"bfloat16"``, ...)."""
        return str(self.dtype).replace("torch.", "")

    def _note(self, text: str) -> None:
        """Keep a fallback note (:attr:`notes`) and warn once (``UserWarning``) for library users."""
        self.notes.append(text)
        warnings.warn(text, UserWarning, stacklevel=3)

    # -- volume -------------------------------------------------------------------------------
    def set_volume(
        self,
        array_zyx: np.ndarray,
        window: Union[None, str, Window, Tuple[float, float]] = None,
        key: Optional[str] = None,
    ) -> None:
        """Work on a volume.

        Args:
            array_zyx: raw intensities in canonical axial order ``(z, y, x)`` (see
                ``volumes.read_volume`` / the Slicer bridge).
            window: intensity window: ``None``/``"auto"`` (default) chooses it from the volume
                (:meth:`Window.automatic`: CT abdomen window for CT, MR percentile scaling
                otherwise), or a preset name, ``(level, width)`` or a :class:`Window`.
            key: a name for the volume in the embedding cache (default: a content hash).
        """
        arr = np.asarray(array_zyx)
        if arr.ndim != 3:
            raise MedSAMError(f"the volume must be 3D (z, y, x); got an array of shape {arr.shape}")
        if min(arr.shape) < 1 or arr.shape[1] < 2 or arr.shape[2] < 2:
            raise MedSAMError(f"the volume of shape {arr.shape} is too small to segment")
        if not np.issubdtype(arr.dtype, np.number):
            raise MedSAMError(f"the volume must hold numbers; got dtype {arr.dtype}")
        window = resolve_window(window, arr)
        base = key if key is not None else volume_key(arr)
        self.window = window
        if self.memory is not None:
            from .segmentation.medsam2 import window_volume

            # MedSAM2's own windowing (clip, then min-max the clipped volume); MR percentiles as ours.
            u8 = (apply_window(arr, window) if window.percentiles is not None else
                  window_volume(arr, window.level - window.width / 2.0, window.level + window.width / 2.0))
            self.memory.set_volume(u8, key=f"{base}|{window.key}|medsam2")
            return
        self.predictor.set_volume(apply_window(arr, window), key=f"{base}|{window.key}")

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(z, y, x)`` shape of the current volume."""
        return tuple(self.predictor.volume.shape)  # type: ignore[return-value]

    # -- segmentation ---------------------------------------------------------------------------
    def segment_slice(self, z: int, box: Sequence[float]) -> SliceResult:
        """2D: the mask ``(y, x)`` on slice ``z`` for a box ``(x0, y0, x1, y1)``."""
        if self.memory is not None:
            return self.memory.segment_slice(z, box)
        return self.predictor.predict(self.predictor.check_slice_index(z), box)

    def segment_3d(
        self,
        z: int,
        box: Sequence[float],
        z_range: Optional[Tuple[int, int]] = None,
        direction: str = "both",
        stop: Optional[StopRule] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> PropagationResult:
        """3D from a 2D box on slice ``z``; ``z_range`` bounds it, else the extent is found.

        ``settings`` (default :attr:`propagation`) holds every propagation choice. With a speed
        tier whose stride is above 1 the model runs on every ``stride``-th slice and the slices
        between are filled (:func:`~MedSAMSlicerLib.segmentation.strided.propagate_strided`).

        MedSAM2 (``"propagation": "memory"``) propagates as its own inference does
        (:meth:`~MedSAMSlicerLib.segmentation.medsam2.MedSAM2Engine.propagate`): over every slice of the volume
        or the z-range, both ways, the largest connected component kept; ``stop`` and ``settings``
        are for box propagation and refused.
        """
        if self.memory is not None:
            self._no_box_settings(settings, stop)
            return self.memory.propagate(z, box, z_range=z_range, direction=direction, progress=progress,
                                         cancel=cancel)
        return propagate_strided(
            self.predictor, z, box, stride=self.speed.stride, z_range=z_range, direction=direction, stop=stop,
            progress=progress, cancel=cancel, fill=self.speed.fill, settings=settings or self.propagation,
        )

    def segment(
        self,
        prompt: BoxPrompt,
        mode: str = "3d",
        direction: str = "both",
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> Segmentation:
        """The one dispatch every front end uses: ``"2d"`` segments the prompt's slice only;
        ``"3d"`` propagates from it, within the prompt's z-range when it has one (a 3D box),
        else to an automatic extent in ``direction`` (``"both"``, ``"up"``, ``"down"``)."""
        if mode not in MODES:
            raise MedSAMError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
        if direction not in DIRECTIONS:
            raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")
        if mode == "2d":
            if cancel is not None:
                cancel.raise_if_cancelled()
            one = self.segment_slice(prompt.z, prompt.box)
            mask = np.zeros(self.shape, dtype=bool)
            mask[prompt.z] = one.mask
            if progress is not None:
                progress(1, 1, f"slice {prompt.z}")
            return Segmentation(prompt, mode, mask, [prompt.z], float(one.score))
        result = self.segment_3d(prompt.z, prompt.box, z_range=prompt.z_range, direction=direction,
                                 progress=progress, cancel=cancel, settings=settings)
        covered = sorted({r.z for r in result.slices if r.accepted})
        score = next((float(r.score) for r in result.slices if r.z == prompt.z), float("nan"))
        return Segmentation(prompt, mode, np.asarray(result.mask, dtype=bool), covered, score,
                            dict(result.stop_reasons), result)

    def segment_structures(
        self,
        prompts: Mapping[str, Union[BoxPrompt, Sequence[BoxPrompt]]],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> StructuresResult:
        """Several structures in 3D as one job (:func:`~MedSAMSlicerLib.segmentation.structures.segment_structures`):
        each slice encoded once for all, a slice's boxes decoded together, overlaps settled by the
        decoder's logits. Every slice is computed, whatever the speed setting's stride (the strided
        path follows one structure); its encoder runtime and precision apply. MedSAM2: each
        structure as alone, the features shared (:meth:`~MedSAMSlicerLib.segmentation.medsam2.MedSAM2Engine.segment_structures`).
        A structure may be given several boxes on one slice: its pieces (LiteMedSAM and MedSAM)."""
        if self.memory is not None:
            self._no_box_settings(settings)
            several = [n for n, p in prompts.items() if not isinstance(p, BoxPrompt) and len(p) != 1]
            if several:
                raise MedSAMError(f"{several[0]}: MedSAM2 takes one box per structure; several boxes for one "
                                  "structure (its pieces, or key slices) are for LiteMedSAM and MedSAM")
            prompts = {n: p if isinstance(p, BoxPrompt) else p[0] for n, p in prompts.items()}
            return self.memory.segment_structures(prompts, progress=progress, cancel=cancel)
        return segment_structures(self.predictor, prompts, settings=settings or self.propagation,
                                  progress=progress, cancel=cancel)

    def segment_boxes(
        self,
        prompts: Sequence[BoxPrompt],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> PropagationResult:
        """One structure in 3D from every box drawn for it
        (:func:`~MedSAMSlicerLib.segmentation.structures.segment_boxes`): one box is
        :meth:`segment_3d` (speed settings included); boxes on one slice are the structure's pieces,
        boxes on several slices its key slices (every slice computed, whatever the speed's stride).
        MedSAM2 takes one box per structure (later boxes are corrections, :meth:`correct`)."""
        prompts = list(prompts)
        if len(prompts) == 1:
            p = prompts[0]
            return self.segment_3d(p.z, p.box, z_range=p.z_range, progress=progress, cancel=cancel, settings=settings)
        if self.memory is not None:
            raise MedSAMError("MedSAM2 takes one box per structure; add the others as corrections, or use "
                              "LiteMedSAM or MedSAM for a structure's pieces and key slices")
        return segment_boxes(self.predictor, prompts, settings=settings or self.propagation, progress=progress,
                             cancel=cancel)

    def segment_box3d(
        self,
        box3d: Sequence[float],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> PropagationResult:
        """3D from ``(x0, y0, z0, x1, y1, z1)``: the 2D box on the middle slice, bounded in z."""
        z_mid, box, z_range = split_box3d(box3d)
        return self.segment_3d(z_mid, box, z_range=z_range, progress=progress, cancel=cancel, settings=settings)

    def correct(
        self,
        current: Union[PropagationResult, np.ndarray],
        corrections: Sequence[Correction],
        locked: Optional[Sequence[int]] = None,
        z_range: Optional[Tuple[int, int]] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        settings: Optional[PropagationSettings] = None,
    ) -> PropagationResult:
        """Correct a 3D result and propagate again from the corrected slices
        (:func:`~MedSAMSlicerLib.segmentation.corrections.correct`): ``current`` is the result or its
        ``(z, y, x)`` mask (with ``locked``), ``corrections`` are
        :meth:`Correction.with_box` (a new box on a slice) or :meth:`Correction.accept` (the
        mask's slice marked good). The locked slices never change; slices beyond the next locked
        slice on each side are kept. Returns a new result; ``current`` is not changed (Undo).

        MedSAM2: each correction is a new prompt in SAM 2's memory and both passes run again from
        all prompts (:meth:`~MedSAMSlicerLib.segmentation.medsam2.MedSAM2Engine.correct`)."""
        if self.memory is not None:
            self._no_box_settings(settings)
            return self.memory.correct(current, corrections, locked=locked, z_range=z_range, progress=progress,
                                       cancel=cancel)
        return correct(self.predictor, current, corrections, locked=locked, z_range=z_range,
                       settings=settings or self.propagation, progress=progress, cancel=cancel)

    def prefetch(self, zs: Sequence[int]) -> BackgroundTask:
        """Encode slices ``zs`` in a background task so later boxes on them answer at once."""
        if self.memory is not None:
            return self.memory.prefetch(zs)
        return self.predictor.prefetch(zs)

    def describe(self) -> str:
        """One line: model, weights, device and precision."""
        mixed = " (bfloat16 transformer matmuls)" if self.bfloat16_matmuls else ""
        runtime = f", encoder by {self.encoder_runtime}" if self.encoder_runtime else ""
        every = ("" if self.speed.stride == 1
                 else f", in 3D every {self.speed.stride} slices computed, the others {self.speed.fill}d")
        return (
            f"{self.spec.title} ({self.spec.architecture}, {self.spec.input_size}px) on {self.device}"
            f" in {str(self.dtype).replace('torch.', '')}{mixed}{runtime}; speed {self.speed.name}{every};"
            f" weights {self.weights}"
        )



# -- one model per (model, checkpoint, device), shared by the front ends of one process -----------
_SHARED: Dict[Tuple[str, str, str, str], Segmenter] = {}
_SHARED_LOCK = threading.Lock()


def shared_segmenter(model: str = "litemedsam", checkpoint: Optional[PathLike] = None, device: str = "auto",
                     progress: Optional[ProgressCallback] = None, speed: Optional[str] = None) -> Segmenter:
    """The one :class:`Segmenter` per ``(model, checkpoint, device, speed)`` in this process.

    The Slicer effect, the module and the headless script share it, so the weights are loaded once
    and the slice embeddings computed for one are reused by the others. ``device`` is the one it
    selects (``"auto"`` on a machine without a GPU is ``"cpu"``: the same segmenter). Thread-safe: a
    worker thread may be the first to ask (the model then loads off the GUI thread).
    """
    tier = get_speed(speed)
    key = (str(model), os.path.abspath(os.fspath(checkpoint)) if checkpoint else "", str(select_device(device)),
           tier.name)
    with _SHARED_LOCK:
        segmenter = _SHARED.get(key)
        if segmenter is None:
            segmenter = Segmenter(model=model, checkpoint=checkpoint, device=device, progress=progress, speed=tier)
            _SHARED[key] = segmenter
        return segmenter


def release_shared_segmenters() -> None:
    """Forget the shared models (frees their memory; the next use loads them again)."""
    with _SHARED_LOCK:
        _SHARED.clear()
