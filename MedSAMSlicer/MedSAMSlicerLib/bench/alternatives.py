"""``medsam-slicer bench --compare alternatives``: CPU speed alternatives against our exact path.

LiteMedSAM on the CPU, in one process, on the same real cases: 3D boxes on the shipped CT
(:class:`~.cases.Case`) around the liver (a 20-slice run, the standard benchmark's case), the
left kidney (its whole extent) and the aorta (a 20-slice run). Each alternative is a
:class:`~.speed.SpeedTier` recipe run through :meth:`~.segmenter.Segmenter.segment_box3d`, as
users get it; the reference pipeline (``CVPR24_LiteMedSAM_infer.py``'s loop, :mod:`.reference`) runs
in the same rounds on the liver case. Every round runs every pipeline once per case, interleaved,
with the embedding cache cleared; speed-ups are the median over rounds of per-round ratios, so a
busy machine slows both sides of a ratio alike.

Reported per alternative and case: seconds, speed-up against our exact path and against the
reference, 3D Dice against our exact masks and against the reference labels (over the box's
slices), and the difference of the latter from the exact path's. Per alternative: one-slice
encoder latency (interleaved), the first-use setup time (model conversion into an empty folder)
and the setup time once converted, and the installed size of the runtime's packages.

The every-2nd-slice recipes are measured with both fills of the skipped slices (:mod:`.strided`).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..metrics import dice
from ..models.speed import SpeedTier
from .cases import Case
from .measure import metric
from .reference import ReferenceLiteMedSAM

#: The cases: (name, TotalSegmentator label id, slices in the box (None: whole extent)), and
#: their quick-run slice counts.
CASES = [("liver", 5, 20), ("kidney_left", 3, None), ("aorta", 52, 20)]
QUICK_SLICES = {"liver": 6, "kidney_left": 6, "aorta": 6}
ROUNDS = (2, 1)  # (normal, quick)
#: The reference pipeline runs its 3D loop on the first case only (it takes the time of ~1.5 of ours).
REFERENCE_CASES = ("liver",)
ENCODER_REPEATS = (5, 2)
#: Runtime -> the distributions it installs (beyond numpy, packaging and what torch brings).
RUNTIME_DISTRIBUTIONS = {"openvino": ["openvino", "openvino-telemetry"],
                         "onnxruntime": ["onnxruntime", "onnx", "flatbuffers", "protobuf"]}


def alternatives() -> List[SpeedTier]:
    """Every recipe compared; :func:`bench_alternatives` skips, with the reason, those this machine
    cannot run (a runtime not installed, or bfloat16 without native bfloat16: :mod:`..cpu_features`)."""
    return [
        SpeedTier("exact", "torch float32 (ours, exact)"),
        SpeedTier("onnxruntime", "ONNX Runtime float32", encoder="onnxruntime"),
        SpeedTier("openvino", "OpenVINO float32", encoder="openvino"),
        SpeedTier("torch-bf16", "torch, bfloat16 matmuls", precision="bf16"),
        SpeedTier("openvino-bf16", "OpenVINO bfloat16", encoder="openvino", precision="bf16"),
        SpeedTier("stride2-interpolate", "every 2nd slice, the others interpolated (torch float32)", stride=2,
                  fill="interpolate"),
        SpeedTier("stride2-decode", "every 2nd slice, the others decoded (torch float32)", stride=2, fill="decode"),
        SpeedTier("openvino+stride2", "OpenVINO float32, every 2nd slice, the others interpolated",
                  encoder="openvino", stride=2, fill="interpolate"),
        SpeedTier("openvino-bf16+stride2", "OpenVINO bfloat16, every 2nd slice, the others interpolated",
                  encoder="openvino", precision="bf16", stride=2, fill="interpolate"),
    ]


def runnable(tiers: List[SpeedTier]) -> Tuple[List[SpeedTier], Dict[str, str]]:
    """``(the tiers this machine runs as written, {name: why not} for the others)``."""
    why = {t.name: t.missing() or t.unsupported() for t in tiers}
    return [t for t in tiers if not why[t.name]], {name: str(r) for name, r in why.items() if r}


def installed_mb(distributions: List[str]) -> Optional[float]:
    """MB on disk of the installed files of ``distributions`` (``None`` if one is not installed)."""
    total = 0
    for name in distributions:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        for f in files:
            try:
                total += os.path.getsize(f.locate())
            except OSError:
                pass
    return total / 1e6


def bench_alternatives(quick: bool = False, log: Callable[[str], None] = print, rounds: Optional[int] = None
                       ) -> Dict[str, Any]:
    """Run the comparison (LiteMedSAM, CPU); returns the JSON-ready results (module docstring)."""
    from ..models.encoder_runtimes import EXPORT_DIR_ENV
    from ..segmenter import Segmenter

    q = 1 if quick else 0
    cases = [Case(QUICK_SLICES[name] if quick else n, label, name) for name, label, n in CASES]
    tiers, skipped = runnable(alternatives())
    for name, why in skipped.items():
        log(f"[alternatives] {name}: skipped, {why}")
    device = torch.device("cpu")
    result: Dict[str, Any] = {"cases": {c.name: {"box3d_inclusive": list(c.box3d), "slices": len(c.zs)} for c in cases},
                              "skipped": skipped, "alternatives": {}}

    # Setup: first use (conversion into an empty folder) and again (converted file on disk).
    segmenters: Dict[str, Segmenter] = {}
    setup: Dict[str, Dict[str, float]] = {}
    old_env = os.environ.get(EXPORT_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="medsam-exported-") as folder:
        os.environ[EXPORT_DIR_ENV] = folder
        try:
            for tier in tiers:
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    seg = Segmenter("litemedsam", device="cpu", speed=tier)
                    times.append(time.perf_counter() - t0)
                segmenters[tier.name] = seg
                setup[tier.name] = {"first_use_s": times[0], "converted_s": times[1]}
                log(f"[alternatives] {tier.name}: {seg.describe()} (setup {times[0]:.1f} s, then {times[1]:.1f} s)")
        finally:
            if old_env is None:
                os.environ.pop(EXPORT_DIR_ENV, None)
            else:
                os.environ[EXPORT_DIR_ENV] = old_env
    reference = ReferenceLiteMedSAM(device)

    # Encoder latency, one slice (the liver box's middle slice), interleaved.
    liver = cases[0]
    encoder_tiers = [t for t in tiers if t.stride == 1]
    prepared = {}
    for tier in encoder_tiers:
        seg = segmenters[tier.name]
        seg.set_volume(liver.raw, liver.window, key="alternatives-encoder")
        seg.predictor.encode([liver.z_mid])  # warm-up
        prepared[tier.name] = seg
    tensor, _, _ = reference.prepare(liver.image[liver.z_mid])
    with torch.inference_mode():
        reference.encode(tensor)

    def encode_fn(seg: Segmenter) -> Callable[[], None]:
        def run() -> None:
            seg.predictor.cache.clear()
            seg.predictor.encode([liver.z_mid])
        return run

    reps = ENCODER_REPEATS[q]
    log(f"[alternatives] encoder latency, {reps} repeats")
    enc_times: Dict[str, List[float]] = {name: [] for name in ["reference", *prepared]}
    fns = {"reference": lambda: reference.encode(tensor), **{n: encode_fn(s) for n, s in prepared.items()}}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            enc_times[name].append(time.perf_counter() - t0)

    # 3D propagation, interleaved rounds.
    rounds = ROUNDS[q] if rounds is None else max(1, int(rounds))
    times: Dict[str, Dict[str, List[float]]] = {c.name: {n: [] for n in ["reference", *segmenters]} for c in cases}
    with_reference = [c.name for c in cases if c.name in REFERENCE_CASES]
    masks: Dict[str, Dict[str, np.ndarray]] = {c.name: {} for c in cases}
    for r in range(rounds):
        for case in cases:
            log(f"[alternatives] round {r + 1}/{rounds}: {case.name}, {len(case.zs)} slices")
            if case.name in with_reference:
                t0 = time.perf_counter()
                masks[case.name]["reference"] = reference.segment_3d(case.image, case.ref_box3d)
                times[case.name]["reference"].append(time.perf_counter() - t0)
            for name, seg in segmenters.items():
                seg.predictor.cache.clear()
                seg.set_volume(case.raw, case.window, key=f"alternatives-{case.name}")
                t0 = time.perf_counter()
                masks[case.name][name] = seg.segment_box3d(case.box3d).mask
                times[case.name][name].append(time.perf_counter() - t0)

    for tier in tiers:
        name = tier.name
        runtime_dists = RUNTIME_DISTRIBUTIONS.get(tier.encoder)
        row: Dict[str, Any] = {
            "label": tier.label,
            "recipe": {"encoder": tier.encoder, "precision": tier.precision, "stride": tier.stride, "fill": tier.fill},
            "setup_s": setup[name],
            "describe": segmenters[name].describe(),
            "installed_mb": installed_mb(runtime_dists) if runtime_dists else 0.0,
        }
        if name in enc_times:
            row["encoder_s"] = metric(enc_times["exact"], enc_times[name], "s")
            row["encoder_vs_reference"] = metric(enc_times["reference"], enc_times[name], "s")
        per_case: Dict[str, Any] = {}
        for case in cases:
            zs = case.zs
            m, e = masks[case.name][name], masks[case.name]["exact"]
            t = times[case.name]
            entry: Dict[str, Any] = {
                "dice_vs_exact": dice(m[zs], e[zs]),
                "dice_vs_labels": dice(m[zs], case.truth[zs]),
                "exact_dice_vs_labels": dice(e[zs], case.truth[zs]),
                "propagation_s": metric(t["exact"], t[name], "s"),
            }
            if case.name in with_reference:
                entry["propagation_vs_reference"] = metric(t["reference"], t[name], "s")
            entry["dice_vs_labels_change"] = entry["dice_vs_labels"] - entry["exact_dice_vs_labels"]
            per_case[case.name] = entry
        row["cases"] = per_case
        row["worst_dice_vs_labels_change"] = min(v["dice_vs_labels_change"] for v in per_case.values())
        row["min_dice_vs_exact"] = min(v["dice_vs_exact"] for v in per_case.values())
        row["min_speedup"] = min(v["propagation_s"]["speedup"] for v in per_case.values())
        result["alternatives"][name] = row
    result["reference_dice_vs_labels"] = {c.name: dice(masks[c.name]["reference"][c.zs], c.truth[c.zs])
                                          for c in cases if c.name in with_reference}
    result["rounds"] = rounds
    return result


def markdown_table(result: Dict[str, Any]) -> str:
    """One row per alternative: speed-ups and Dice per case, setup, install size."""
    cases = list(result["cases"])
    head = ["alternative", "encoder, 1 slice: vs exact (vs reference)"]
    head += [f"{c} ({result['cases'][c]['slices']} sl.): speed-up vs exact (vs ref.), Dice vs exact, "
             f"Dice vs labels (change)" for c in cases]
    head += ["setup, first use / later (s)", "installed (MB)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for name, row in result["alternatives"].items():
        cells = [f"{name}: {row['label']}"]
        if "encoder_s" in row:
            cells.append(f"{row['encoder_s']['speedup']:.2f}x ({row['encoder_vs_reference']['speedup']:.2f}x)")
        else:
            cells.append("-")
        for c in cases:
            e = row["cases"][c]
            vs_ref = f" ({e['propagation_vs_reference']['speedup']:.2f}x)" if "propagation_vs_reference" in e else ""
            cells.append(f"{e['propagation_s']['speedup']:.2f}x{vs_ref}, "
                         f"{e['dice_vs_exact']:.4f}, {e['dice_vs_labels']:.4f} ({e['dice_vs_labels_change']:+.4f})")
        cells.append(f"{row['setup_s']['first_use_s']:.1f} / {row['setup_s']['converted_s']:.1f}")
        cells.append(f"{row['installed_mb']:.0f}" if row.get("installed_mb") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    ref = ", ".join(f"{c} {v:.4f}" for c, v in result["reference_dice_vs_labels"].items())
    lines.append(f"\nReference pipeline's Dice vs labels: {ref}.")
    return "\n".join(lines)

