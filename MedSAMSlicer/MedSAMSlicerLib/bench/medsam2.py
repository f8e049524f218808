"""MedSAM2 in ``medsam-slicer bench --models medsam2``: ours against MedSAM2's own inference, one run.

The reference is ``medsam2_infer_3D_CT.py`` (bowang-lab/MedSAM2, commit 332f30d) replayed on Meta's
``sam2`` package, as written there (:class:`ReferenceMedSAM2`): the window clipped and min-max
scaled in float64, ``resize_grayscale_to_rgb_and_resize`` (a PIL loop), ``/ 255`` and ImageNet
mean/std on the whole volume, the package's own ``init_state`` (MedSAM2's ``SAM2VideoPredictorNPZ``
differs from the package's legacy predictor only by taking these frames: they are handed to the
package's frame loader for the call), the box on the key slice, ``propagate_in_video`` forward,
``reset_state``, the box again, ``reverse=True``, the union and ``getLargestCC``
(``skimage.measure.label``). No MedSAM2 weights are reachable here: both sides load the same
seeded random weights, so the agreement is meaningful and the masks are not anatomy.

The case: the shipped CT's liver (:class:`~.cases.Case`), the slices of its box cut out as the
volume (MedSAM2's CT volumes are cut to the lesion's slices), window L40/W400, the box on the
middle slice. Rows: one slice (a box on a one-slice volume, the encoder included), the 3D run, peak
memory of the 3D run in a fresh process per pipeline, and whether the masks are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import MedSAMError
from .cases import Case
from .measure import interleaved, metric, peak_rss, sync

#: Slices in the 3D box and repeats: (normal, quick).
SLICES = (8, 3)
REPEATS = (2, 1)
SEED = 2024
LOWER, UPPER = -160.0, 240.0  # L40/W400

#: MedSAM2's ``sam2/configs/sam2.1_hiera_t512.yaml`` against the package's ``sam2.1_hiera_t.yaml``,
#: and the post-processing of its ``build_sam2_video_predictor_npz``.
MEDSAM2_YAML = ("++model.image_size=512", "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
                "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]")
NPZ_BUILDER = ("++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
               "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
               "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
               "++model.binarize_mask_from_pts_for_mem_enc=true", "++model.fill_hole_area=8")


def resize_grayscale_to_rgb_and_resize(array: np.ndarray, image_size: int) -> np.ndarray:
    """MedSAM2's function of that name: ``(d, h, w)`` -> ``(d, 3, size, size)`` float64 (PIL RGB resize)."""
    from PIL import Image

    d = array.shape[0]
    resized_array = np.zeros((d, 3, image_size, image_size))
    for i in range(d):
        img_rgb = Image.fromarray(array[i].astype(np.uint8)).convert("RGB")
        resized_array[i] = np.array(img_rgb.resize((image_size, image_size))).transpose(2, 0, 1)
    return resized_array


def get_largest_cc(segmentation: np.ndarray) -> np.ndarray:
    """MedSAM2's ``getLargestCC`` (``skimage.measure.label``, full connectivity)."""
    from skimage import measure

    labels = measure.label(segmentation)
    return labels == np.argmax(np.bincount(labels.flat)[1:]) + 1


def medsam2_window(data: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """The script's windowing: clip, min-max to 0-255, ``np.uint8``."""
    pre = np.clip(data, lower, upper)
    pre = (pre - np.min(pre)) / (np.max(pre) - np.min(pre)) * 255.0
    return np.uint8(pre)


def medsam2_frames(img_3d: np.ndarray, image_size: int = 512) -> torch.Tensor:
    """The script's frames: resized, ``/ 255``, minus the float32 ImageNet mean, over its std (float64)."""
    img = torch.from_numpy(resize_grayscale_to_rgb_and_resize(img_3d, image_size) / 255.0)
    img -= torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    img /= torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    return img


@contextmanager
def _frames_given(frames: torch.Tensor, height: int, width: int) -> Iterator[None]:
    """The package's ``init_state`` loads frames from a path; MedSAM2's takes them: hand them over."""
    from sam2 import sam2_video_predictor_legacy as legacy

    loader = legacy.load_video_frames
    legacy.load_video_frames = lambda **kwargs: (frames, height, width)
    try:
        yield
    finally:
        legacy.load_video_frames = loader


class ReferenceMedSAM2:
    """``medsam2_infer_3D_CT.py`` on the ``sam2`` package (see the module doc).

    Args:
        weights: a checkpoint ``{"model": state_dict}`` as MedSAM2's ``_load_checkpoint`` reads it.
        device: where it runs.
        image_size: 512 (MedSAM2); smaller builds the same network for smaller frames (tests).
    """

    name = "medsam2_infer_3D_CT.py on sam2 1.1.0"

    def __init__(self, weights: Path, device: torch.device, image_size: int = 512) -> None:
        import sam2  # noqa: F401
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from ..segmentation.medsam2 import install_cpu_holes

        install_cpu_holes()  # what MedSAM2's compiled sam2/_C.so does, where it is absent
        grid = f"[{image_size // 16},{image_size // 16}]"
        yaml = [o.replace("=512", f"={image_size}").replace("[32,32]", grid) for o in MEDSAM2_YAML]
        cfg = compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml",
                      overrides=["++model._target_=sam2.sam2_video_predictor_legacy.SAM2VideoPredictor",
                                 *yaml, *NPZ_BUILDER])
        OmegaConf.resolve(cfg)
        model = instantiate(cfg.model, _recursive_=True)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
        self.predictor = model.to(device).eval()
        self.device = device

    def segment(self, raw_zyx: np.ndarray, prompts: Sequence[Tuple[int, Sequence[float]]],
                lower: float = LOWER, upper: float = UPPER) -> Tuple[np.ndarray, np.ndarray]:
        """The script for one structure on a raw ``(z, y, x)`` volume: ``prompts`` ``[(key slice,
        (x0, y0, x1, y1)), ...]`` (the script has one; more are SAM 2's boxes on other frames).
        Returns the first box's own mask ``(y, x)`` and the 3D mask ``(z, y, x)``."""
        predictor = self.predictor
        img_3d = medsam2_window(raw_zyx, lower, upper)
        height, width = img_3d.shape[1:]
        frames = medsam2_frames(img_3d, predictor.image_size).to(self.device)
        segs_3d = np.zeros(img_3d.shape, dtype=np.uint8)
        key_mask = None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _nothing()
        with _frames_given(frames, height, width), torch.inference_mode(), autocast:
            state = predictor.init_state("frames given")
            for reverse in (False, True):
                for key, box in prompts:
                    _, _, logits = predictor.add_new_points_or_box(inference_state=state, frame_idx=int(key), obj_id=1,
                                                                   box=np.array(box))
                    if key_mask is None:
                        key_mask = (logits[0] > 0.0).cpu().numpy()[0]
                for frame, _, logits in predictor.propagate_in_video(state, reverse=reverse):
                    segs_3d[frame, (logits[0] > 0.0).cpu().numpy()[0]] = 1
                predictor.reset_state(state)
        if np.max(segs_3d) > 0:
            segs_3d = np.uint8(get_largest_cc(segs_3d))
        return key_mask, segs_3d.astype(bool)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def random_weights(path: Path, seed: int = SEED) -> Path:
    """Seeded random MedSAM2 weights in MedSAM2's checkpoint layout, written to ``path``."""
    from ..segmentation.medsam2 import build_medsam2

    torch.manual_seed(seed)
    torch.save({"model": build_medsam2().state_dict()}, path)
    return path


def _volume(case: Case) -> Tuple[np.ndarray, int]:
    """The case's slices as MedSAM2's volume, and the key slice in it."""
    return np.ascontiguousarray(case.raw[case.zs[0]:case.zs[-1] + 1]), case.z_mid - case.zs[0]


def bench_medsam2(device: torch.device, quick: bool, workdir: Path,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The JSON row of ``medsam2``: per-slice and 3D times, peak memory, agreement."""
    from ..boxes import BoxPrompt
    from ..metrics import dice
    from ..segmenter import Segmenter

    q = 1 if quick else 0
    case = Case(SLICES[q])
    volume, key = _volume(case)
    weights = random_weights(workdir / "medsam2_random.pt")
    ref = ReferenceMedSAM2(weights, device)
    seg = Segmenter("medsam2", checkpoint=weights, device=str(device))
    log(f"[medsam2] reference {ref.name} vs ours: {seg.describe()}")
    row: Dict[str, Any] = {"case": {**case.describe(), "volume_slices": list(case.zs)}, "ours": seg.describe(),
                           "precision": str(seg.dtype), "weights": f"random, seed {SEED} (both sides)"}
    box = case.box2d
    one = volume[key:key + 1]

    def ours_slice() -> np.ndarray:
        seg.memory.cache.clear()
        seg.set_volume(one, (40.0, 400.0))
        return seg.segment(BoxPrompt(0, box), "2d").mask[0]

    def ours_3d() -> np.ndarray:
        seg.memory.cache.clear()
        seg.set_volume(volume, (40.0, 400.0))
        return seg.segment(BoxPrompt(key, box), "3d").mask

    outs: Dict[str, Any] = {}
    reps = REPEATS[q]
    log("[medsam2] warm-up, then one slice (encoder included), interleaved")
    ours_slice(), ref.segment(one, [(0, box)])
    t = interleaved({"reference": lambda: outs.__setitem__("ref2d", ref.segment(one, [(0, box)])[0]),
                     "ours": lambda: outs.__setitem__("ours2d", ours_slice())}, reps, device)
    row["slice_s"] = metric(t["reference"], t["ours"], "s")
    log(f"[medsam2] 3D over {len(case.zs)} slices, interleaved")
    t = interleaved({"reference": lambda: outs.__setitem__("ref3d", ref.segment(volume, [(key, box)])[1]),
                     "ours": lambda: outs.__setitem__("ours3d", ours_3d())}, reps, device)
    row["propagation_3d_s"] = metric(t["reference"], t["ours"], "s")
    row["propagation_3d_s"]["slices"] = len(case.zs)
    row["same_mask_2d"] = bool(np.array_equal(outs["ref2d"], outs["ours2d"]))
    row["same_mask_3d"] = bool(np.array_equal(outs["ref3d"], outs["ours3d"]))
    row["dice_3d"] = dice(outs["ref3d"], outs["ours3d"])
    row["voxels"] = {"reference": int(outs["ref3d"].sum()), "ours": int(outs["ours3d"].sum())}
    log("[medsam2] peak memory of the 3D run, each pipeline in a fresh process")
    mem = {p: _memory_in_child(p, device, quick, weights) for p in ("reference", "ours")}
    key_mem = "cuda_peak_mb" if device.type == "cuda" else "peak_rss_delta_mb"
    row["peak_memory_mb"] = metric([mem["reference"][key_mem]], [mem["ours"][key_mem]], "MB", speed=False)
    row["peak_memory_mb"]["measure"] = ("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                                        else "resident set growth, sampled every 2 ms")
    row["propagation_3d_fresh_process_s"] = metric([mem["reference"]["seconds"]], [mem["ours"]["seconds"]], "s")
    return row


def _memory_in_child(pipeline: str, device: torch.device, quick: bool, weights: Path) -> Dict[str, Any]:
    args = json.dumps({"pipeline": pipeline, "device": str(device), "quick": quick, "weights": str(weights),
                       "threads": torch.get_num_threads()})
    env = dict(os.environ)
    lib_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = lib_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", "import sys; from MedSAMSlicerLib.bench.medsam2 import "
                           "memory_child; memory_child(sys.argv[1])", args],
                          capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise MedSAMError(f"the MedSAM2 memory measurement ({pipeline}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def memory_child(arg: str) -> None:
    """Entry point of the memory-measuring child process (prints one JSON line): one 3D run."""
    from ..boxes import BoxPrompt
    from ..segmenter import Segmenter

    spec = json.loads(arg)
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    case = Case(SLICES[1 if spec["quick"] else 0])
    volume, key = _volume(case)
    if spec["pipeline"] == "reference":
        runner: Any = ReferenceMedSAM2(Path(spec["weights"]), device)
    else:
        runner = Segmenter("medsam2", checkpoint=spec["weights"], device=str(device))
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with peak_rss() as rss:
        if spec["pipeline"] == "reference":
            runner.segment(volume, [(key, case.box2d)])
        else:
            runner.set_volume(volume, (40.0, 400.0))
            runner.segment(BoxPrompt(key, case.box2d), "3d")
        sync(device)
    out = {"peak_rss_delta_mb": (rss["peak"] - rss["base"]) / 2**20, "seconds": time.perf_counter() - t0}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    print(json.dumps(out), flush=True)


def markdown_rows(row: Dict[str, Any]) -> List[str]:
    """The table rows of ``medsam2`` (same columns as :func:`~.report.markdown_table`)."""
    title = "MedSAM2 (random weights)"
    n = row["propagation_3d_s"]["slices"]
    out = []
    for label, m, digits in (("one slice, box to mask, encoder included (s)", row["slice_s"], 2),
                             (f"3D, {n} slices, both passes (s)", row["propagation_3d_s"], 1),
                             (f"3D, {n} slices, in a fresh process (s)", row["propagation_3d_fresh_process_s"], 1),
                             ("peak memory, 3D (MB)", row["peak_memory_mb"], 0)):
        speed = f"{m['speedup']:.2f}x" if m.get("speedup") else "-"
        out.append(f"| {title} | {label} | {m['reference']:.{digits}f} | {m['ours']:.{digits}f} | {m['ratio']:.2f} | "
                   f"{speed} |")
    out.append(f"| {title} | same masks as the reference, 2D / 3D | | {row['same_mask_2d']} / {row['same_mask_3d']} "
               f"(Dice {row['dice_3d']:.4f}) | | |")
    return out
