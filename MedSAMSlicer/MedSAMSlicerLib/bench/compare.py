"""Ours against the reference pipeline for one model: encoder, decoder, 3D propagation, memory, agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

from ..metrics import dice
from .cases import Case
from .children import memory_in_child
from .measure import interleaved, metric
from .pipelines import build_pipelines, ours_box3d, run_ours_3d
from .reference import random_vit_b_state

# Slices in the 3D box and repeats: (normal, quick).
SLICES = {"litemedsam": (20, 6), "medsam": (4, 2)}
ENCODER_REPEATS = {"litemedsam": (5, 3), "medsam": (2, 1)}
DECODER_REPEATS = {"litemedsam": (15, 5), "medsam": (8, 3)}
PROPAGATION_REPEATS = {"litemedsam": (3, 1), "medsam": (1, 1)}


def bench_model(model: str, device: torch.device, quick: bool, workdir: Path,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Benchmark one model (``litemedsam`` or ``medsam``) against its reference; returns its JSON row.

    In this process both pipelines run under one :func:`~.allocator.reuse_freed_memory` scope (a
    no-op unless ``MEDSAM_REUSE_FREED_MEMORY=1``; glibc's settings are process-wide, so the two
    must share them). The fresh-process rows run each pipeline as it ships.
    """
    from ..models.allocator import reuse_freed_memory

    with reuse_freed_memory() as tuned:
        row = _bench_model(model, device, quick, workdir, log)
    row["allocator_in_process"] = ("glibc heap reuse on for both pipelines" if tuned
                                   else "the platform's default for both pipelines")
    return row


def _bench_model(model: str, device: torch.device, quick: bool, workdir: Path,
                 log: Callable[[str], None]) -> Dict[str, Any]:
    from ..models.allocator import supported as allocator_on

    q = 1 if quick else 0
    n_slices = SLICES[model][q]
    case = Case(n_slices)
    state = weights = None
    if model == "medsam":
        state = random_vit_b_state()
        weights = workdir / "medsam_random_vit_b.pth"
        torch.save(state, weights)
    ref, seg = build_pipelines(model, device, weights, state)
    log(f"[{model}] reference {ref.name} vs ours: {seg.describe()}")
    row: Dict[str, Any] = {"case": case.describe(), "ours": seg.describe(), "precision": str(seg.dtype),
                           "batch_size": seg.predictor.batch_size}

    # Same prompt in model space for both (see the module docstring).
    box_ours = ours_box3d(model, case)
    ox0, oy0, _, ox1, oy1, _ = box_ours
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
    t = interleaved({"reference": lambda: ref.encode(tensor), "ours": ours_encode}, reps, device)
    row["encoder_s"] = metric(t["reference"], t["ours"], "s")

    # 2. Box -> mask with a cached embedding.
    seg.predictor.encode([z])
    reps = DECODER_REPEATS[model][q]
    log(f"[{model}] box-to-mask latency, {reps} repeats")
    t = interleaved({
        "reference": lambda: ref.decode(ref_emb, ref_box, new_hw, hw),
        "ours": lambda: seg.segment_slice(z, (ox0, oy0, ox1, oy1)),
    }, reps, device)
    row["box_to_mask_ms"] = metric([v * 1e3 for v in t["reference"]], [v * 1e3 for v in t["ours"]], "ms")
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
        masks["ours"] = run_ours_3d(seg, case, box_ours, f"bench-3d-{counter[0]}").mask

    t = interleaved({"reference": ref_3d, "ours": ours_3d}, reps, device)
    row["propagation_3d_s"] = metric(t["reference"], t["ours"], "s")
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
    mem = {p: memory_in_child(model, p, device, n_slices, weights, warm=not quick) for p in ("reference", "ours")}
    when = "seconds_cold" if quick else "seconds_warm"
    row["propagation_3d_fresh_process_s"] = metric([mem["reference"][when]], [mem["ours"][when]], "s")
    row["propagation_3d_fresh_process_s"].update(
        slices=n_slices, run="first run in the process" if quick else "second run in the process",
        cold={p: mem[p]["seconds_cold"] for p in mem},
        allocator="reference: the platform's defaults (the original script); ours: as shipped, "
                  "MedSAMSlicerLib.models.allocator " + ("on" if allocator_on() else "off (default)"))
    key = "cuda_peak_mb" if device.type == "cuda" else "peak_rss_delta_mb"
    row["peak_memory_mb"] = metric([mem["reference"][key]], [mem["ours"][key]], "MB", speed=False)
    row["peak_memory_mb"]["measure"] = ("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                                        else "resident set growth, sampled every 2 ms")
    if device.type == "cuda":
        row["peak_rss_mb"] = {p: mem[p]["peak_rss_delta_mb"] for p in mem}

    # Where the encoder speed comes from: the same model without optimize_for_inference.
    if not quick:
        from ..segmenter import Segmenter

        others = {"plain": Segmenter(model, checkpoint=weights, device=str(device), optimize=False)}
        if model == "litemedsam" and device.type == "cpu" and seg.dtype == torch.float32:
            from ..models.cpu_features import bfloat16_matmuls_missing

            if bfloat16_matmuls_missing() is None:  # else the report's machine section says why not
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
        t = interleaved(fns, reps, device)
        for name in others:
            row[f"encoder_{name}_s"] = metric(t["reference"], t[name], "s")
            row[f"encoder_{name}_s"]["ours_default_over_this"] = float(np.median(t["ours"]) / np.median(t[name]))
        del others
    return row
