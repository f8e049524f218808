"""``medsam-slicer bench --compare structures``: five structures as one job against the liver alone.

On the shipped CT, LiteMedSAM: liver, spleen, both kidneys and aorta, each from the label's box on
its largest slice with the extent found automatically (``--quick``: 3D boxes of 11 slices), run as
one job (:meth:`~MedSAMSlicerLib.segmenter.Segmenter.segment_structures`: each slice encoded once, a
slice's boxes decoded together) against the liver alone (:meth:`~MedSAMSlicerLib.segmenter.Segmenter.segment`),
in the same process and rounds, interleaved, the embedding cache cleared before each run. The cost
ratio (five / one) is the median over rounds of per-round ratios (issue 12's target: at most 1.5).

Masks: each structure of the job is compared with the same structure run alone (its own
``segment`` call): the voxels that differ outside the voxels two structures claimed (should be 0),
and the contested voxels it lost; Dice against the labels for both.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import numpy as np

from ..boxes import BoxPrompt
from ..data import DEMO_STRUCTURES, example_ct, example_ct_labels
from ..demo import reference_box
from ..fileio.volumes import read_volume
from ..metrics import dice

#: Issue 12: five structures as one job cost at most this many times the liver alone.
TARGET_RATIO = 1.5


def _prompts(labels: np.ndarray, quick: bool) -> Dict[str, BoxPrompt]:
    prompts = {}
    for name, value in DEMO_STRUCTURES.items():
        z, box = reference_box(labels == value)
        prompts[name] = BoxPrompt(z, box, (max(z - 5, 0), min(z + 5, labels.shape[0] - 1)) if quick else None)
    return prompts


def bench_structures(device: str = "auto", quick: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Time five structures as one job against the liver alone, and compare their masks.

    Returns:
        ``seconds`` (per round: ``liver_alone``, ``five_as_one_job``), ``ratio`` (median of per-round
        five / one), ``target``, ``met``, ``encoded_slices`` (each run, from an empty cache), and per
        structure ``voxels``, ``contested_lost`` (voxels of its own run that went to another
        structure), ``differ_outside_overlaps`` (0 when the job equals the runs one by one there),
        ``dice_alone`` and ``dice_job`` against the labels.
    """
    from ..segmenter import Segmenter

    volume = read_volume(example_ct())
    labels = read_volume(example_ct_labels(), labels=True).array
    prompts = _prompts(labels, quick)
    seg = Segmenter("litemedsam", device=device)
    seg.set_volume(volume.array)
    rounds = 1 if quick else 3
    times: Dict[str, List[float]] = {"liver_alone": [], "five_as_one_job": []}
    encoded: Dict[str, int] = {}
    job = None
    alone_liver = None
    for r in range(rounds):
        for key in ("liver_alone", "five_as_one_job") if r % 2 == 0 else ("five_as_one_job", "liver_alone"):
            seg.predictor.cache.clear()
            before = seg.predictor.encoded_slices
            t0 = time.perf_counter()
            if key == "liver_alone":
                alone_liver = seg.segment(prompts["liver"], "3d")
            else:
                job = seg.segment_structures(prompts)
            times[key].append(time.perf_counter() - t0)
            encoded[key] = seg.predictor.encoded_slices - before
            log(f"round {r + 1}/{rounds}: {key} {times[key][-1]:.1f} s, {encoded[key]} slices encoded")
    ratios = [f / o for f, o in zip(times["five_as_one_job"], times["liver_alone"])]
    ratio = float(np.median(ratios))
    assert job is not None and alone_liver is not None
    per: Dict[str, Any] = {}
    for name, prompt in prompts.items():
        alone = alone_liver.mask if name == "liver" else seg.segment(prompt, "3d").mask
        got = job.results[name].mask
        outside = ~job.contested
        per[name] = {
            "voxels": int(got.sum()),
            "contested_lost": int((alone & ~got).sum()),
            "differ_outside_overlaps": int(((alone != got) & outside).sum()),
            "dice_alone": round(dice(alone, labels == DEMO_STRUCTURES[name]), 4),
            "dice_job": round(dice(got, labels == DEMO_STRUCTURES[name]), 4),
        }
    return {
        "case": "shipped CT, " + ("3D boxes of 11 slices" if quick else "2D boxes, automatic extent"),
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "ratio": round(ratio, 3), "ratios": [round(v, 3) for v in ratios], "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO, "encoded_slices": encoded, "structures": per,
        "device": str(seg.device),
    }


def markdown_table(result: Dict[str, Any]) -> str:
    """The structures comparison as a markdown table."""
    s = result["seconds"]
    lines = [
        f"Five structures as one job vs the liver alone ({result['case']}, {result['device']}): "
        f"ratio {result['ratio']:.2f} (target <= {result['target']}: {'met' if result['met'] else 'NOT met'}); "
        f"median seconds {np.median(s['five_as_one_job']):.1f} vs {np.median(s['liver_alone']):.1f}; slices encoded "
        f"{result['encoded_slices'].get('five_as_one_job')} vs {result['encoded_slices'].get('liver_alone')}",
        "",
        "| structure | voxels | lost to overlaps | differ outside overlaps | Dice alone | Dice in the job |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["structures"].items():
        lines.append(f"| {name} | {row['voxels']} | {row['contested_lost']} | {row['differ_outside_overlaps']} | "
                     f"{row['dice_alone']:.3f} | {row['dice_job']:.3f} |")
    return "\n".join(lines)
