"""Box -> mask prediction on the slices of one volume, with an embedding cache.

The image encoder is the expensive part (LiteMedSAM ~0.9 s, MedSAM ViT-B 12-19 s per slice on a
laptop CPU); the prompt encoder and mask decoder take milliseconds. So, as segment-anything's
``SamPredictor``: encode a slice once, keep its embedding, and answer every box on that slice
from the cache. Embeddings are keyed by (volume, window, model, slice), kept in a
least-recently-used cache with a memory cap, and many slices can be encoded in one batch.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..background import BackgroundTask, run_in_background
from ..errors import MedSAMError
from ..models.allocator import reuse_freed_memory
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .memory import MemoryLRU
from .preprocessing import (
    PreparedSlice,
    box_to_model,
    check_box,
    logits_at_slice,
    logits_to_mask,
    prepare_slice,
)


@dataclass
class SliceResult:
    """The model's answer for one box on one slice.

    Attributes:
        mask: ``(H, W)`` boolean mask on the slice grid (``y``, ``x``).
        score: the mask decoder's predicted IoU (a confidence, not a measurement).
        box_model: the box as given to the model, in model-input pixels ``(x0, y0, x1, y1)``.
        logits: ``(H, W)`` float32 logits at slice resolution
            (:func:`~MedSAMSlicerLib.segmentation.preprocessing.logits_at_slice`): the per-pixel confidence that
            settles overlaps between structures; ``None`` where not computed.
    """

    mask: np.ndarray
    score: float
    box_model: np.ndarray
    logits: Optional[np.ndarray] = None


class EmbeddingCache(MemoryLRU):
    """Slice embeddings ``(1, 256, 64, 64)`` float32 tensors (4 MiB each), least recently used
    first out beyond ``max_bytes`` (and beyond a session's own cap on a server:
    :class:`~MedSAMSlicerLib.segmentation.memory.MemoryLRU`)."""

    def _size(self, value: torch.Tensor) -> int:
        return value.numel() * value.element_size()


def volume_key(volume: np.ndarray) -> str:
    """A content hash of an array (shape, dtype and bytes), fast enough for whole CT volumes."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str((volume.shape, volume.dtype.str)).encode())
    digest.update(np.ascontiguousarray(volume).data)
    return digest.hexdigest()


class SliceVolume:
    """The windowed ``(z, y, x)`` ``uint8`` volume a model works on slice by slice, its name in the
    caches and its slice indices: the one home of these for the :class:`Predictor` (LiteMedSAM,
    MedSAM) and MedSAM2's engine (:class:`~MedSAMSlicerLib.segmentation.medsam2.MedSAM2Engine`).

    A subclass sets ``self._lock`` (a ``threading.RLock``) and may override :meth:`_volume_changed`.
    """

    _volume: Optional[np.ndarray] = None
    _key: str = ""
    _lock: threading.RLock

    def set_volume(self, volume_u8: np.ndarray, key: Optional[str] = None) -> None:
        """Use a windowed ``(z, y, x)`` ``uint8`` volume (:func:`~.preprocessing.apply_window`);
        ``key`` names it in the cache (default: a content hash, :func:`volume_key`)."""
        vol = np.asarray(volume_u8)
        if vol.ndim != 3:
            raise MedSAMError(f"the volume must be 3D (z, y, x); got shape {vol.shape}")
        if vol.dtype != np.uint8:
            raise MedSAMError("the model takes a windowed uint8 volume (see preprocessing.apply_window)")
        with self._lock:
            self._volume = vol
            self._key = key if key is not None else volume_key(vol)
            self._volume_changed()

    def _volume_changed(self) -> None:
        """Called under the lock once a new volume is set: drop what was derived from the old one."""

    @property
    def volume(self) -> np.ndarray:
        """The windowed ``(z, y, x)`` volume."""
        if self._volume is None:
            raise MedSAMError("no volume set: call set_volume() first")
        return self._volume

    @property
    def depth(self) -> int:
        """Number of slices."""
        return int(self.volume.shape[0])

    def check_slice_index(self, z: int) -> int:
        """Return ``z`` as an int, or raise :class:`MedSAMError` if it is not a slice index."""
        depth = self.depth
        if not float(z).is_integer() or not 0 <= int(z) < depth:
            raise MedSAMError(f"slice {z} is out of range: this volume has axial slices 0..{depth - 1}")
        return int(z)


class Predictor(SliceVolume):
    """Encode slices of one windowed volume once, then answer boxes from the cached embeddings.

    Args:
        model: a :class:`~MedSAMSlicerLib.models.modeling.sam.SamModel` in eval mode, on ``device``.
        method: preprocessing name, ``"medsam"`` or ``"litemedsam"``.
        model_key: identifies the weights (part of every cache key).
        device: where the model runs.
        dtype: compute dtype for the image encoder (autocast); the decoder runs in float32.
        batch_size: slices per encoder call.
        cache: an :class:`EmbeddingCache` to share (a new 2 GiB one by default).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        model_key: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 4,
        cache: Optional[EmbeddingCache] = None,
    ) -> None:
        self.model = model
        self.method = method
        self.model_key = model_key
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.cache = cache if cache is not None else EmbeddingCache()
        self.input_size = int(model.input_size)
        self._prepared: Dict[int, PreparedSlice] = {}
        self._lock = threading.RLock()
        self._held: Dict[Tuple[str, str, str, int], Optional[torch.Tensor]] = {}
        self.encoded_slices = 0  # slices actually run through the encoder (for tests/benchmarks)
        self.decoded_boxes = 0  # boxes run through the mask decoder (for tests/benchmarks)
        #: Decode the boxes of one slice in one decoder call (a batch). On by default on GPUs, where
        #: one call for B boxes costs about as much as one box. Off on CPUs: there a batch costs what
        #: its boxes cost one by one, and multi-threaded CPU kernels are chosen by the batch size, so
        #: a box's logits in a batch differ from its logits alone by ~1e-5 (docs/performance.md,
        #: "Several structures as one job"); one call per box keeps every mask bit-identical to the box alone.
        self.batch_decode = torch.device(device).type != "cpu"

    # -- volume -------------------------------------------------------------------------------
    def _volume_changed(self) -> None:
        """A new volume: the prepared slices of the old one go (its embeddings stay in the shared
        cache, where the key tells them apart)."""
        self._prepared = {}

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> Predictor:
        """A predictor for the region ``[y0:y1, x0:x1]`` of every slice, sharing this one's model
        and embedding cache (the region is enlarged to the model's input like any small slice,
        so a small structure is seen larger). Its embeddings are keyed by this volume and the
        region."""
        sub = Predictor(self.model, self.method, self.model_key, self.device, self.dtype, self.batch_size, self.cache)
        sub.batch_decode = self.batch_decode
        sub.set_volume(np.ascontiguousarray(self.volume[:, y0:y1, x0:x1]), key=f"{self._key}|crop{y0},{y1},{x0},{x1}")
        return sub

    def cache_key(self, z: int) -> Tuple[str, str, str, int]:
        """The embedding-cache key of slice ``z``."""
        return (self._key, self.model_key, self.method, int(z))

    def prepared(self, z: int) -> PreparedSlice:
        """The model input for slice ``z`` (computed once per slice)."""
        z = self.check_slice_index(z)
        with self._lock:
            item = self._prepared.get(z)
            if item is None:
                item = prepare_slice(self.volume[z], self.method, self.input_size)
                self._prepared[z] = item
            return item

    # -- encoding -----------------------------------------------------------------------------
    def is_encoded(self, z: int) -> bool:
        """Whether slice ``z``'s embedding is cached (or held)."""
        key = self.cache_key(z)
        return self._held.get(key) is not None or key in self.cache

    @contextmanager
    def holding(self, zs: Iterable[int]) -> Iterator[None]:
        """Keep the embeddings of slices ``zs`` (of this volume) outside the cache's memory cap
        while the block runs: once encoded, each is kept until the block ends, whatever the cap,
        so a job that visits these slices twice encodes each once. Costs 4 MiB per slice."""
        keys = [self.cache_key(int(z)) for z in zs]
        with self._lock:
            added = [k for k in keys if k not in self._held]
            for k in added:
                self._held[k] = self.cache.get(k) if k in self.cache else None
        try:
            yield
        finally:
            with self._lock:
                for k in added:
                    self._held.pop(k, None)

    @torch.inference_mode()
    def _encode_batch(self, zs: Sequence[int]) -> None:
        images = torch.stack([self.prepared(z).image for z in zs]).to(self.device)
        with reuse_freed_memory():
            if self.dtype != torch.float32:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    emb = self.model.encode(images)
            else:
                emb = self.model.encode(images)
        emb = emb.float()
        for i, z in enumerate(zs):
            key = self.cache_key(z)
            one = emb[i : i + 1].clone()
            self.cache.put(key, one)
            if key in self._held:
                self._held[key] = one
        self.encoded_slices += len(zs)

    def encode(
        self,
        zs: Iterable[int],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        """Encode the slices ``zs`` that are not cached yet, ``batch_size`` at a time."""
        todo: List[int] = []
        for z in zs:
            z = self.check_slice_index(z)
            if not self.is_encoded(z) and z not in todo:
                todo.append(z)
        for start in range(0, len(todo), self.batch_size):
            check_cancel(cancel)
            batch = [z for z in todo[start : start + self.batch_size] if not self.is_encoded(z)]
            if batch:
                with self._lock:
                    self._encode_batch(batch)
            report(progress, min(start + self.batch_size, len(todo)), len(todo), "encoding slices")

    def embedding(self, z: int) -> torch.Tensor:
        """The ``(1, 256, 64, 64)`` embedding of slice ``z`` (encoded now if not cached)."""
        z = self.check_slice_index(z)
        key = self.cache_key(z)
        emb = self._held.get(key)
        if emb is None:
            emb = self.cache.get(key)
        if emb is None:
            with self._lock:
                emb = self.cache.get(self.cache_key(z))
                if emb is None:
                    self._encode_batch([z])
                    emb = self.cache.get(self.cache_key(z))
        assert emb is not None
        return emb

    def prefetch(self, zs: Iterable[int]) -> BackgroundTask:
        """Encode ``zs`` in a background task (for a quick preview); returns the started task.

        Like every :class:`~MedSAMSlicerLib.background.BackgroundTask`, it reports progress, can be
        cancelled, and is cancelled and joined at interpreter exit. A GUI that keeps the GIL while
        idle must :meth:`~MedSAMSlicerLib.background.BackgroundTask.pump` it for it to progress.
        """
        wanted = [int(z) for z in zs if 0 <= int(z) < self.depth]
        return run_in_background(lambda progress, cancel: self.encode(wanted, progress, cancel), "medsam-prefetch")

    # -- decoding -----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_boxes(self, z: int, boxes_model: Sequence[Sequence[float]], jitter: float = 0.0) -> List[SliceResult]:
        """Predict slice ``z`` from each of several boxes already in model-input pixels
        ``(x0, y0, x1, y1)``: the slice is encoded once (cached) and the boxes go through the mask
        decoder together (one call with :attr:`batch_decode`, else one call per box).

        ``jitter`` > 0 (model pixels) also decodes each box grown, shrunk and shifted by that much
        (five boxes per prompt) and averages the five logit maps before thresholding: a mask less
        sensitive to where exactly the box edges fall on the enlarged slice.

        Returns:
            One :class:`SliceResult` per box, in order, with its ``logits``.
        """
        prepared = self.prepared(z)
        emb = self.embedding(z).to(self.device)
        per_box = 5 if jitter > 0 else 1
        rows = []
        for box_model in boxes_model:
            box = np.asarray(box_model, dtype=np.float32)
            if jitter > 0:
                j = float(jitter)
                offsets = np.array([[0, 0, 0, 0], [-j, -j, j, j], [j, j, -j, -j], [-j, -j, -j, -j], [j, j, j, j]],
                                   dtype=np.float32)
                rows.append(np.clip(box[None] + offsets, 0.0, float(self.input_size)))
            else:
                rows.append(box[None])
        if not rows:
            return []
        calls = [np.concatenate(rows)] if self.batch_decode else rows
        out: List[SliceResult] = []
        with reuse_freed_memory():
            decoded = [self.model.decode(emb, torch.as_tensor(batch, device=self.device)) for batch in calls]
            logits = torch.cat([d[0] for d in decoded])
            iou = torch.cat([d[1] for d in decoded]).reshape(-1)
            self.decoded_boxes += int(logits.shape[0])
            for i, box_model in enumerate(boxes_model):
                one = logits[i * per_box : (i + 1) * per_box].mean(dim=0, keepdim=True)
                mask = logits_to_mask(one, prepared)
                at_slice = logits_at_slice(one, prepared)[0, 0].cpu().numpy()
                score = float(iou[i * per_box : (i + 1) * per_box].mean())
                out.append(SliceResult(mask=mask, score=score, box_model=np.asarray(box_model), logits=at_slice))
        return out

    def predict_model_box(self, z: int, box_model: Sequence[float], jitter: float = 0.0) -> SliceResult:
        """Predict slice ``z`` from a box already in model-input pixels ``(x0, y0, x1, y1)``
        (:meth:`decode_boxes` with one box)."""
        return self.decode_boxes(z, [box_model], jitter)[0]

    def predict(self, z: int, box: Sequence[float]) -> SliceResult:
        """Predict slice ``z`` from a box ``(x0, y0, x1, y1)`` in the slice's pixel indices.

        Returns the mask at the slice's own resolution ``(H, W)``.
        """
        prepared = self.prepared(z)
        checked = check_box(box, prepared.original_hw)
        return self.predict_model_box(z, box_to_model(checked, prepared))
