"""MedSAM2 (bowang-lab/MedSAM2, 2025): SAM 2.1 tiny fine-tuned on medical volumes, 512 px input, a
box on a key slice propagated through the volume by SAM 2's memory attention, forward and backward.

The network and the propagation are the official ``sam2`` package's (Meta, PyPI ``sam2==1.1.0``),
not a copy. What MedSAM2 changes is followed here, each from its repository (commit 332f30d):

* **The model** (:func:`build_medsam2`): SAM 2.1 tiny from the package's own config
  ``configs/sam2.1/sam2.1_hiera_t.yaml`` with MedSAM2's three differences
  (``sam2/configs/sam2.1_hiera_t512.yaml``: ``image_size: 512`` and the memory attention's RoPE
  ``feat_sizes: [32, 32]``), and the post-processing options of MedSAM2's builder
  (``sam2/build_sam.py``, ``build_sam2_video_predictor_npz``: dynamic multimask via stability,
  binarised masks from prompts in the memory, holes up to 8 px filled).
* **The predictor**: MedSAM2's ``SAM2VideoPredictorNPZ`` (``sam2/sam2_video_predictor_npz.py``) is
  the package's ``sam2.sam2_video_predictor_legacy.SAM2VideoPredictor`` line for line except that
  ``init_state`` takes the preprocessed frames instead of a folder of JPEGs; :func:`predictor_class`
  subclasses the package's class with that ``init_state`` only (plus a per-slice feature cache,
  which gives the same features).
* **Windowing** (:func:`window_volume`): ``medsam2_infer_3D_CT.py`` clips the volume to the
  window and min-max scales the clipped volume to 0-255 (``uint8``), in float64.
* **Frames** (:class:`Frames`): ``resize_grayscale_to_rgb_and_resize``: each slice as a PIL image
  converted to RGB and resized to 512 x 512 (PIL's default filter, bicubic), then ``/ 255`` and
  ImageNet mean/std, computed in float64 as the script does (a float64 tensor minus float32 means).
* **3D** (:meth:`MedSAM2Engine.propagate`): the box on the key slice, ``propagate_in_video``
  forward; ``reset_state``; the box again, ``propagate_in_video(reverse=True)``; the two passes
  united (``mask_logits > 0``) and the largest 3D connected component kept (``getLargestCC``:
  ``skimage.measure.label``, full 26-connectivity).

Holes: SAM 2 fills mask holes with a CUDA extension (``sam2._C``, shipped compiled in MedSAM2's
repository); the PyPI build without CUDA skips that step with a warning. :func:`install_cpu_holes`
gives the package the same connected components (8-connectivity) on the CPU when its extension
is absent, so the masks are MedSAM2's on any device.

Quality: no MedSAM2 weights are reachable here; everything is tested on identical random weights
against MedSAM2's own inference (``Testing/test_medsam2.py``); docs/medsam2.md quotes the authors'
published figures.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..background import BackgroundTask, run_in_background
from ..errors import MedSAMError
from ..models.sam2_network import (  # noqa: F401  (the network's names, also used from here)
    IMG_MEAN,
    IMG_STD,
    INPUT_SIZE,
    INSTALL_HINT,
    MEDSAM2_CONFIG_OVERRIDES,
    MEDSAM2_POSTPROCESSING,
    SAM2_CONFIG,
    SAM2_REQUIREMENT,
    SCORE_MEANING,
    build_medsam2,
    connected_components_8,
    install_cpu_holes,
    predictor_class,
    predictor_class_target,
)
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .memory import MemoryLRU
from .predictor import SliceResult, SliceVolume
from .results import Conditioning, check_corrections  # noqa: F401  (Conditioning re-exported: a result's prompts)


# -- preprocessing ------------------------------------------------------------------------------
def window_volume(volume: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """``medsam2_infer_3D_CT.py``'s windowing: clip to ``[lower, upper]``, min-max scale the
    clipped volume to 0-255 (float64), truncate to ``uint8``. A constant volume gives zeros."""
    data = np.clip(np.asarray(volume, dtype=np.float64), lower, upper)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.uint8((data - lo) / (hi - lo) * 255.0)


def prepare_frame(slice_u8: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """One ``(H, W)`` ``uint8`` slice as MedSAM2's frame ``(3, size, size)`` float32:
    ``resize_grayscale_to_rgb_and_resize`` (PIL RGB, resized with PIL's default bicubic filter),
    ``/ 255`` and ImageNet mean/std in float64, then float32 (``_get_image_feature``'s ``.float()``)."""
    from PIL import Image

    rgb = Image.fromarray(np.ascontiguousarray(slice_u8, dtype=np.uint8)).convert("RGB")
    arr = np.array(rgb.resize((size, size))).transpose(2, 0, 1).astype(np.float64) / 255.0
    frame = torch.from_numpy(arr)
    frame -= torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    frame /= torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    return frame.float()


class Frames:
    """The frames of a windowed ``(z, y, x)`` ``uint8`` volume for SAM 2's ``inference_state["images"]``,
    made on demand (the whole volume at once would be 6 MB per slice in float64): ``frames[i]`` is
    slice ``zs[i]`` as :func:`prepare_frame` makes it."""

    def __init__(self, volume_u8: np.ndarray, zs: Sequence[int], size: int = INPUT_SIZE) -> None:
        self.volume = volume_u8
        self.zs = [int(z) for z in zs]
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.zs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_frame(self.volume[self.zs[int(i)]], self.size)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """``getLargestCC`` of ``medsam2_infer_3D_CT.py``: the largest connected component of a
    ``(z, y, x)`` mask with full (26-) connectivity (``skimage.measure.label``'s default), labels
    in raster order, the first of equally large ones. An empty mask is returned empty."""
    from scipy import ndimage as ndi

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m.copy()
    labels, _ = ndi.label(m, structure=np.ones((3,) * m.ndim, bool))
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


# -- the feature cache --------------------------------------------------------------------------
class FeatureCache(MemoryLRU):
    """SAM 2's image features per slice of one volume, least recently used first out beyond
    ``max_bytes`` (and a session's own cap on a server: :class:`~MedSAMSlicerLib.segmentation.memory.MemoryLRU`);
    the positional encodings (the same for every slice) are kept once.

    A :class:`FeatureCache` view (:meth:`view`) maps a state's frame indices to slices."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        super().__init__(max_bytes)
        self._pos: Dict[Tuple, List[torch.Tensor]] = {}
        self._held = 0
        self.encoded = 0

    def _size(self, value: Mapping[str, Any]) -> int:
        return sum(t.numel() * t.element_size() for t in value["backbone_fpn"]) + (
            value["vision_features"].numel() * value["vision_features"].element_size())

    def _may_evict(self) -> bool:
        return not self._held

    def put(self, key: Hashable, backbone_out: Dict[str, Any]) -> Dict[str, Any]:
        """Keep ``backbone_out`` (``forward_image``'s output for one slice); returns what is kept."""
        shapes = tuple(tuple(p.shape) + (str(p.dtype),) for p in backbone_out["vision_pos_enc"])
        with self._lock:
            pos = self._pos.setdefault(shapes, list(backbone_out["vision_pos_enc"]))
            out = {"vision_features": backbone_out["vision_features"], "vision_pos_enc": pos,
                   "backbone_fpn": list(backbone_out["backbone_fpn"])}
            self._store(key, out)
            self.encoded += 1
            return out

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Nothing is evicted while the block runs (a job that visits slices twice encodes each once)."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1

    def view(self, prefix: Hashable, zs: Sequence[int]) -> _CacheView:
        """Frame ``i`` of a state -> key ``(prefix, zs[i])``."""
        return _CacheView(self, prefix, list(zs))


class _CacheView:
    def __init__(self, cache: FeatureCache, prefix: Hashable, zs: List[int]) -> None:
        self.cache, self.prefix, self.zs = cache, prefix, zs

    def get(self, frame: int):
        return self.cache.get((self.prefix, self.zs[frame]))

    def put(self, frame: int, backbone_out):
        return self.cache.put((self.prefix, self.zs[frame]), backbone_out)


# -- the engine ---------------------------------------------------------------------------------
@dataclass
class _Passes:
    """What the passes over one sub-volume gave, per volume slice."""

    logits: Dict[int, np.ndarray]  # (H, W) float32 at slice resolution, the max over the passes
    scores: Dict[int, float]  # object presence probability, the max over the passes


class MedSAM2Engine(SliceVolume):
    """MedSAM2 on one windowed volume, with the methods the :class:`~MedSAMSlicerLib.segmenter.Segmenter`
    calls: 2D (:meth:`segment_slice`), 3D (:meth:`propagate`), several structures
    (:meth:`segment_structures`) and corrections (:meth:`correct`). The volume (``set_volume``, a
    windowed ``(z, y, x)`` ``uint8`` array from :func:`window_volume`), ``depth`` and
    ``check_slice_index`` are the :class:`~MedSAMSlicerLib.segmentation.predictor.SliceVolume`'s, as the
    :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor`'s.

    Args:
        model: :func:`build_medsam2`'s network with weights, on ``device``, in eval mode.
        model_key: identifies the weights (part of every feature-cache key).
        device: where it runs.
        dtype: autocast dtype (bfloat16 on a GPU, as MedSAM2's script); float32 runs plainly.
        cache: a :class:`FeatureCache` (features are 4 MiB per slice).
    """

    method = "medsam2"

    def __init__(self, model: torch.nn.Module, model_key: str, device: torch.device,
                 dtype: torch.dtype = torch.float32, cache: Optional[FeatureCache] = None) -> None:
        self.model = model
        self.model_key = model_key
        self.input_size = int(model.image_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache = cache if cache is not None else FeatureCache()
        self._lock = threading.RLock()
        self.decoded_boxes = 0

    @property
    def encoded_slices(self) -> int:
        """Slices run through the image encoder so far (for tests and benchmarks)."""
        return self.cache.encoded

    def _prefix(self) -> Tuple[str, str]:
        return (self._key, self.model_key)

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _state(self, zs: Sequence[int]):
        vol = self.volume
        return self.model.init_state(Frames(vol, zs, self.input_size), vol.shape[1], vol.shape[2],
                                     features=self.cache.view(self._prefix(), zs))

    def encode(self, zs: Sequence[int], progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> None:
        """Compute the image features of slices ``zs`` now (a later prompt on them answers faster)."""
        todo = [self.check_slice_index(z) for z in zs]
        todo = [z for z in dict.fromkeys(todo) if (self._prefix(), z) not in self.cache]
        for i, z in enumerate(todo):
            check_cancel(cancel)
            with self._lock, torch.inference_mode(), self._autocast():
                if (self._prefix(), z) not in self.cache:
                    image = prepare_frame(self.volume[z], self.input_size).to(self.device).unsqueeze(0)
                    self.cache.put((self._prefix(), z), self.model.forward_image(image))
            report(progress, i + 1, len(todo), "encoding slices")

    def is_encoded(self, z: int) -> bool:
        return (self._prefix(), int(z)) in self.cache

    def prefetch(self, zs: Sequence[int]) -> BackgroundTask:
        """Encode ``zs`` in a background task."""
        wanted = [int(z) for z in zs if 0 <= int(z) < self.depth]
        return run_in_background(lambda progress, cancel: self.encode(wanted, progress, cancel), "medsam2-prefetch")

    def _check_box(self, z: int, box: Sequence[float]) -> Tuple[float, float, float, float]:
        from .preprocessing import check_box

        b = check_box(box, tuple(self.volume.shape[1:]))
        return tuple(float(v) for v in b)  # type: ignore[return-value]

    # -- 2D -------------------------------------------------------------------------------------
    def segment_slice(self, z: int, box: Sequence[float]):
        """2D: the mask of slice ``z`` from a box ``(x0, y0, x1, y1)`` (``add_new_points_or_box``
        on that frame: the key slice's mask of MedSAM2's 3D run). Returns a
        :class:`~MedSAMSlicerLib.segmentation.predictor.SliceResult` whose score is the presence probability."""
        z = self.check_slice_index(z)
        b = self._check_box(z, box)
        with self._lock, torch.inference_mode(), self._autocast():
            state = self._state([z])
            _, _, logits = self.model.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=np.array(b))
            score = _presence(state["temp_output_dict_per_obj"][0]["cond_frame_outputs"][0])
        self.decoded_boxes += 1
        at_slice = logits[0, 0].float().cpu().numpy()
        return SliceResult(mask=at_slice > 0.0, score=score, box_model=np.asarray(b) * self.input_size /
                           np.array([self.volume.shape[2], self.volume.shape[1]] * 2), logits=at_slice)

    # -- 3D -------------------------------------------------------------------------------------
    def _passes(self, prompts: Sequence[Conditioning], masks: Mapping[int, np.ndarray], lo: int, hi: int,
                direction: str, progress, cancel, done: int, total: int) -> Tuple[_Passes, int]:
        """MedSAM2's passes over slices ``lo..hi``: every prompt added, forward; reset; every prompt
        added again, reverse. ``masks``: the masks of the slices accepted as they are."""
        zs = list(range(lo, hi + 1))
        logits: Dict[int, np.ndarray] = {}
        scores: Dict[int, float] = {}
        directions = [d for d in ("up", "down") if direction in ("both", d)]
        with self._lock, torch.inference_mode(), self._autocast():
            state = self._state(zs)
            for name in directions:
                for p in prompts:
                    if p.box is not None:
                        self.model.add_new_points_or_box(state, frame_idx=p.z - lo, obj_id=1, box=np.array(p.box))
                        self.decoded_boxes += 1
                    else:
                        self.model.add_new_mask(state, frame_idx=p.z - lo, obj_id=1,
                                                mask=torch.as_tensor(masks[p.z], dtype=torch.bool))
                check_cancel(cancel)
                for frame, _, out in self.model.propagate_in_video(state, reverse=(name == "down")):
                    z = zs[frame]
                    at_slice = out[0, 0].float().cpu().numpy()
                    logits[z] = at_slice if z not in logits else np.maximum(logits[z], at_slice)
                    here = state["output_dict"]["cond_frame_outputs"].get(frame) or \
                        state["output_dict"]["non_cond_frame_outputs"][frame]
                    scores[z] = max(scores.get(z, 0.0), _presence(here))
                    done += 1
                    report(progress, done, total, f"slice {z} ({name})")
                    check_cancel(cancel)
                self.model.reset_state(state)
        return _Passes(logits, scores), done

    def _result(self, passes: _Passes, prompts: Sequence[Conditioning], direction: str,
                z_range: Optional[Tuple[int, int]], edge_reason: str):
        from .propagation import PropagationResult, SliceRecord

        shape = self.volume.shape
        united = np.zeros(shape, dtype=bool)
        for z, lg in passes.logits.items():
            united[z] = lg > 0.0
        mask = largest_component(united)
        records = []
        for z in sorted(passes.logits):
            area = int(mask[z].sum())
            before = int(united[z].sum())
            reason = ""
            if not area:
                reason = (f"object absent (presence {passes.scores[z]:.2f})" if not before
                          else f"{before} px outside the largest connected component")
            start = next((("box" if p.box is not None else "accepted") for p in prompts if p.z == z), None)
            intensity = float(np.median(self.volume[z][mask[z]])) if area else float("nan")
            records.append(SliceRecord(z, area, float(passes.scores[z]), bool(area), start or reason,
                                       intensity=intensity))
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        extent = (int(zs[0]), int(zs[-1])) if zs.size else None
        reasons = {d: edge_reason for d in ("up", "down") if direction in ("both", d)}
        locked = tuple(sorted(p.z for p in prompts))
        return PropagationResult(mask=mask, z_extent=extent, stop_reasons=reasons, slices=records, locked=locked,
                                 prompts=tuple(prompts))

    def _run(self, prompts: Sequence[Conditioning], masks: Mapping[int, np.ndarray],
             z_range: Optional[Tuple[int, int]], direction: str, progress, cancel, logits_out=None):
        from ..boxes import DIRECTIONS

        if direction not in DIRECTIONS:
            raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")
        lo, hi = 0, self.depth - 1
        if z_range is not None:
            lo, hi = sorted(int(v) for v in z_range)
            if lo < 0 or hi >= self.depth:
                raise MedSAMError(f"z-range {lo}..{hi} is outside the volume's slices 0..{self.depth - 1}")
        for p in prompts:
            if not lo <= p.z <= hi:
                raise MedSAMError(f"the slice {p.z} is outside the z-range {lo}..{hi}")
        first, last = min(p.z for p in prompts), max(p.z for p in prompts)
        total = (hi - first + 1 if direction in ("both", "up") else 0) + (last - lo + 1 if direction in ("both", "down")
                                                                         else 0)
        check_cancel(cancel)
        passes, _ = self._passes(prompts, masks, lo, hi, direction, progress, cancel, 0, total)
        edge = ("reached the end of the z-range" if z_range is not None else "reached the volume's edge") + (
            " (MedSAM2 propagates over every slice; the object score and the largest connected component "
            "set the extent)")
        result = self._result(passes, prompts, direction, z_range, edge)
        if logits_out is not None:
            logits_out.update({z: lg[result.mask[z]] for z, lg in passes.logits.items()})
        report(progress, total, total, "done")
        return result

    def propagate(self, z: int, box: Sequence[float], z_range: Optional[Tuple[int, int]] = None,
                  direction: str = "both", progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None):
        """3D as ``medsam2_infer_3D_CT.py``: the box on slice ``z``, SAM 2's propagation forward
        (``"up"``, increasing z) and backward (``"down"``) over the volume, or over ``z_range``
        (MedSAM2's volumes are cut to the lesion's slice range), united, the largest connected
        component kept. Returns a :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` whose
        ``prompts`` hold the box (what :meth:`correct` adds to)."""
        z = self.check_slice_index(z)
        prompt = Conditioning(z, self._check_box(z, box))
        return self._run([prompt], {}, z_range, direction, progress, cancel)

    # -- several structures -------------------------------------------------------------------
    def segment_structures(self, prompts, progress: Optional[ProgressCallback] = None,
                           cancel: Optional[CancelToken] = None):
        """Several structures, each propagated as it is alone (its own SAM 2 state, MedSAM2's
        passes and largest component), the image features computed once for all; a voxel several
        claim goes to the highest logit (:func:`~MedSAMSlicerLib.segmentation.structures.settle_overlaps`)."""
        from .structures import StructuresResult, _extent, settle_overlaps

        if not prompts:
            raise MedSAMError("give at least one structure to segment")
        names = list(prompts)
        checked = {}
        for name in names:
            if not str(name).strip():
                raise MedSAMError("every structure needs a name")
            p = prompts[name]
            try:
                z = self.check_slice_index(p.z)
                checked[name] = (Conditioning(z, self._check_box(z, p.box)), p.z_range)
            except MedSAMError as exc:
                raise MedSAMError(f"{name}: {exc}") from None
        encoded0, decoded0 = self.encoded_slices, self.decoded_boxes
        results, logits = {}, {}
        with self.cache.holding():
            for n, name in enumerate(names):
                own: Dict[int, np.ndarray] = {}

                def sub(done, total, message, n=n, name=name):
                    report(progress, n * 1000 + int(1000 * done / max(total, 1)), 1000 * len(names),
                           f"{name}: {message}")

                prompt, z_range = checked[name]
                results[name] = self._run([prompt], {}, z_range, "both", sub if progress else None, cancel, own)
                logits[name] = own
        masks = {n: r.mask for n, r in results.items()}
        contested = np.zeros(self.volume.shape, dtype=bool)
        if len(names) > 1:
            settled, contested = settle_overlaps(masks, logits)
            for name in names:
                results[name].mask = settled[name]
                results[name].z_extent = _extent(settled[name])
        return StructuresResult(results, contested, self.encoded_slices - encoded0, self.decoded_boxes - decoded0,
                                logits)

    # -- corrections ----------------------------------------------------------------------------
    def correct(self, current, corrections, locked: Optional[Sequence[int]] = None,
                z_range: Optional[Tuple[int, int]] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None):
        """A correction as SAM 2's video predictor takes one: a new prompt in the memory. Each
        correction becomes a conditioning frame (a box: ``add_new_points_or_box``; a slice accepted
        as it is: ``add_new_mask`` with that slice of ``current``) beside the earlier prompts (a
        result's ``prompts``; for a bare mask, each ``locked`` slice as it is), and MedSAM2's two
        passes run again from all of them: forward from the first, backward from the last, united,
        the largest connected component kept. A correction on a slice that already holds a prompt
        replaces it. Returns a new result (``current`` is not changed)."""
        from .propagation import PropagationResult

        volume = self.volume
        if isinstance(current, PropagationResult):
            mask_in = np.asarray(current.mask, dtype=bool)
            earlier = list(current.prompts) or [Conditioning(int(z)) for z in (locked or current.locked)]
        else:
            mask_in = np.asarray(current, dtype=bool)
            earlier = [Conditioning(int(z)) for z in (locked or ())]
        check_corrections(corrections, mask_in.shape, volume.shape)
        pieces = [c.z for c in corrections if c.more]
        if pieces:
            raise MedSAMError(f"MedSAM2 takes one box per slice of a structure; slice {pieces[0]} has "
                              f"{1 + len(next(c for c in corrections if c.more).more)} (boxes per piece are for "
                              "LiteMedSAM and MedSAM)")
        new: Dict[int, Conditioning] = {int(p.z): p for p in earlier}
        for c in corrections:
            z = self.check_slice_index(c.z)
            new[z] = Conditioning(z, self._check_box(z, c.box) if c.box is not None else None)
        prompts = [new[z] for z in sorted(new)]
        masks = {p.z: mask_in[p.z] for p in prompts if p.box is None}
        if not any(p.box is not None or masks[p.z].any() for p in prompts):
            raise MedSAMError("every prompt is an empty slice: give a box on a slice that shows the structure")
        return self._run(prompts, masks, z_range, "both", progress, cancel)


def _presence(out: Mapping[str, Any]) -> float:
    """SAM 2's object score of one frame's output as a probability."""
    logits = out.get("object_score_logits")
    return float(torch.sigmoid(logits.float()).max()) if logits is not None else float("nan")
