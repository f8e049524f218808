"""The annotator's loop, simulated: one box, then corrections of the worst slice (issue 12, part 5).

For each structure the simulated user draws the label's box on its middle slice
(:func:`~.runner.simulated_box`, automatic extent), then up to ``n`` times fixes the worst slice
against the label (:func:`worst_slice`): a labelled slice gets the label's box around each of its
pieces there (:meth:`~MedSAMSlicerLib.segmentation.corrections.Correction.with_boxes`); a slice the result holds but the label
does not is erased and marked good (:meth:`~MedSAMSlicerLib.segmentation.corrections.Correction.accept`), as
a user would erase a slice the segment leaked onto. The 3D Dice is measured after each step.

Command (prints a Markdown table and writes a CSV; ``--help`` for the options)::

    MEDSAM_SLICER_DATA=Testing/Data/totalsegmentator python -m MedSAMSlicerLib.evaluation.loop \\
        --include 'ct/*' --min-slices 10 --corrections 3 --out loop.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError
from ..metrics import dice
from ..segmentation.corrections import Correction
from ..segmentation.preprocessing import resolve_window
from ..segmentation.propagation import PropagationResult, PropagationSettings
from .cases import Case, Structure, labelled_slices
from .runner import Variant, apply_assignments, label_box, label_pieces, simulated_box, window_arg


def slice_dice(result_mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-slice Dice ``(z,)`` of two ``(z, y, x)`` masks (NaN where both are empty)."""
    inter = (result_mask & ref).sum(axis=(1, 2)).astype(float)
    total = result_mask.sum(axis=(1, 2)).astype(float) + ref.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), np.nan)


def worst_slice(result_mask: np.ndarray, ref: np.ndarray, locked: Sequence[int], anchor: int) -> Optional[int]:
    """The slice a user checking against ``ref`` fixes next: the lowest per-slice Dice among the
    slices not locked where either mask holds voxels; ties go to the slice nearest ``anchor`` (the
    first box's slice: a user scrolls outward from the structure and fixes the first bad slice).
    ``None`` when every such slice is perfect."""
    per = slice_dice(result_mask, ref)
    candidates = [z for z in np.flatnonzero(np.isfinite(per)) if int(z) not in set(locked) and per[z] < 1.0]
    if not candidates:
        return None
    return int(min(candidates, key=lambda z: (round(float(per[z]), 12), abs(int(z) - anchor), int(z))))


def user_correction(result: PropagationResult, ref: np.ndarray, z: int) -> Tuple[PropagationResult, Correction]:
    """What the simulated user does on slice ``z``: where the label holds the structure, the label's
    tight box around each of its pieces there (:func:`~.runner.label_pieces`: one box for a
    structure in one piece); else the slice erased (the returned result's mask has it empty) and
    marked good."""
    if ref[z].any():
        return result, Correction.with_boxes(z, [label_box(p) for p in label_pieces(ref[z])])
    mask = result.mask.copy()
    mask[z] = False
    return dataclasses.replace(result, mask=mask), Correction.accept(z)


@dataclass
class LoopRow:
    """One structure through the loop.

    Attributes:
        dice: 3D Dice after 0, 1, ... corrections (shorter when no slice was left to fix).
        corrected: the slices fixed, in order, each with ``"box"`` or ``"erase"``.
        seconds: wall time of the whole loop (first run and corrections).
    """

    case: str
    structure: str
    slices_true: int
    box_slice: int
    dice: List[float] = field(default_factory=list)
    corrected: List[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LoopStep:
    """One step of the loop: ``corrections`` made so far and the result after them.

    Attributes:
        corrections: 0 for the first box's result, then 1, 2, ...
        result: the :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` after them.
        corrected: the slice fixed at this step, ``"Z box"``, ``"Z N boxes"`` (a box per piece) or ``"Z erase"``
            (``""`` at step 0).
        seconds: wall time of this step (the first box's propagation, or one correction).
        encoded: slices encoded during this step (the first to reach a slice pays for it).
    """

    corrections: int
    result: PropagationResult
    corrected: str
    seconds: float
    encoded: int


def key_slice_prompts(ref: np.ndarray, k: int) -> List[BoxPrompt]:
    """The label's box on ``k`` >= 2 labelled slices spread evenly over its extent, both ends
    included (the labelled slice nearest each of ``k`` evenly spaced positions): key slices as a
    user draws them on a structure seen from its first to its last slice."""
    if k < 2:
        raise MedSAMError(f"key slices: give at least 2; got {k}")
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    if not zs.size:
        raise MedSAMError("the structure is empty")
    keys = sorted({int(zs[np.argmin(np.abs(zs - v))]) for v in np.linspace(zs[0], zs[-1], k)})
    return [BoxPrompt(z, label_box(ref[z])) for z in keys]


def loop_steps(seg, ref: np.ndarray, corrections: int = 3, settings: Optional[PropagationSettings] = None,
               start: Optional[Tuple[int, Tuple[int, int, int, int]]] = None,
               key_slices: int = 1) -> Iterator[LoopStep]:
    """The simulated annotator on one structure of the volume ``seg`` is set to, step by step.

    Args:
        seg: a :class:`~MedSAMSlicerLib.segmenter.Segmenter` with the volume set.
        ref: the label ``(z, y, x)`` bool.
        corrections: how many corrections at most; the loop ends earlier when no slice is left to fix.
        settings: propagation settings (default: the segmenter's).
        start: the first box ``(z, (x0, y0, x1, y1))`` (default: :func:`~.runner.simulated_box`, the
            label's tight box on its middle slice), propagated with automatic extent.
        key_slices: >= 2: the first result comes from the label's boxes on that many key slices
            (:func:`key_slice_prompts`, :meth:`~MedSAMSlicerLib.segmenter.Segmenter.segment_boxes`)
            instead of one box.

    Yields:
        :class:`LoopStep` for 0 corrections, then after each correction.
    """
    settings = settings or seg.propagation
    z, box = start if start is not None else simulated_box(ref)[:2]
    before, t0 = seg.predictor.encoded_slices, time.perf_counter()
    if key_slices > 1:
        prompts = key_slice_prompts(ref, key_slices)
        z = prompts[len(prompts) // 2].z  # ties of the worst slice go to the middle key slice
        result = seg.segment_boxes(prompts, settings=settings)
    else:
        result = seg.segment_3d(z, box, settings=settings)
    yield LoopStep(0, result, "", time.perf_counter() - t0, seg.predictor.encoded_slices - before)
    for step in range(1, corrections + 1):
        target = worst_slice(result.mask, ref, result.locked, z)
        if target is None:
            return
        before, t0 = seg.predictor.encoded_slices, time.perf_counter()
        current, fix = user_correction(result, ref, target)
        result = seg.correct(current, [fix], settings=settings)
        how = "erase" if fix.box is None else "box" if len(fix.boxes) == 1 else f"{len(fix.boxes)} boxes"
        yield LoopStep(step, result, f"{target} {how}",
                       time.perf_counter() - t0, seg.predictor.encoded_slices - before)


def run_loop(seg, ref: np.ndarray, corrections: int = 3, settings: Optional[PropagationSettings] = None,
             case: str = "", structure: str = "",
             on_result: Optional[Callable[[int, PropagationResult], None]] = None, key_slices: int = 1) -> LoopRow:
    """The loop on one structure of the volume ``seg`` is set to (:func:`loop_steps`, gathered).

    Args:
        seg: a :class:`~MedSAMSlicerLib.segmenter.Segmenter` with the volume set.
        ref: the label ``(z, y, x)`` bool.
        corrections: how many corrections at most.
        settings: propagation settings (default: the segmenter's).
        on_result: called with ``(corrections so far, result)`` after each step.
        key_slices: as :func:`loop_steps`.
    """
    z = simulated_box(ref)[0]
    row = LoopRow(case, structure, labelled_slices(ref), z)
    for step in loop_steps(seg, ref, corrections, settings, key_slices=key_slices):
        row.dice.append(dice(step.result.mask, ref))
        row.seconds += step.seconds
        if step.corrected:
            row.corrected.append(step.corrected)
        if on_result is not None:
            on_result(step.corrections, step.result)
    return row


def run_loops(cases: Sequence[Case], seg, corrections: int = 3, min_slices: int = 10,
              include: Optional[Callable[[Case, Structure], bool]] = None,
              settings: Optional[PropagationSettings] = None, log: Optional[Callable[[str], None]] = None,
              on_result: Optional[Callable[[Case, Structure, np.ndarray, int, PropagationResult], None]] = None,
              embedding_store=None, window: Optional[str] = None, key_slices: int = 1) -> List[LoopRow]:
    """:func:`run_loop` on every structure of ``cases`` labelled on at least ``min_slices`` slices
    (``embedding_store``: an :class:`~.store.EmbeddingStore` that keeps slice embeddings between runs;
    ``window``: as a :class:`~.runner.Variant`'s, ``None``: automatic; ``key_slices``: as
    :func:`loop_steps`)."""
    rows: List[LoopRow] = []
    for case in cases:
        structures = [s for s in case.structures if include is None or include(case, s)]
        loaded = False
        for structure in structures:
            ref = case.mask(structure)
            if labelled_slices(ref) < min_slices:
                continue
            if not loaded:
                seg.set_volume(case.image, resolve_window(window_arg(window), case.image))
                if embedding_store is not None:
                    embedding_store.load(seg.predictor)
                loaded = True
            hook = None if on_result is None else (lambda k, r, c=case, s=structure, m=ref: on_result(c, s, m, k, r))
            row = run_loop(seg, ref, corrections, settings, case.name, structure.name, hook, key_slices)
            rows.append(row)
            if embedding_store is not None:
                embedding_store.save(seg.predictor)
            if log is not None:
                log(f"{case.name}/{structure.name}: Dice " + " -> ".join(f"{d:.3f}" for d in row.dice)
                    + f" ({', '.join(row.corrected) or 'nothing to fix'}; {row.seconds:.0f} s)")
    return rows


SIGNAL_COLUMNS = ("case", "structure", "z", "dice", "score", "agreement", "overlap", "area", "area_change",
                  "intensity_shift", "from_start", "label_area")


def slice_signals(result: PropagationResult, ref: np.ndarray) -> List[dict]:
    """Per slice of ``result`` (its accepted, predicted slices): the signals a review could use and
    the slice's Dice against ``ref`` (what they should predict). ``area_change``: the area over the
    previous slice's in the pass (the neighbour toward the box's slice); ``intensity_shift``: the
    median intensity's distance from the median over the result's slices; ``from_start``: slices
    from the box's slice."""
    per = slice_dice(result.mask, ref)
    recs = {r.z: r for r in result.slices if r.accepted}
    start = result.locked[0] if result.locked else 0
    medians = [r.intensity for r in recs.values() if np.isfinite(r.intensity)]
    centre = float(np.median(medians)) if medians else float("nan")
    rows = []
    for z, r in sorted(recs.items()):
        if not result.mask[z].any():
            continue
        toward = z - 1 if z > start else z + 1
        prev = recs.get(toward)
        change = r.area / prev.area if (prev is not None and prev.area and z != start) else float("nan")
        rows.append({"z": z, "dice": float(per[z]), "score": r.score, "agreement": r.agreement, "overlap": r.overlap,
                     "area": r.area, "area_change": change, "intensity_shift": abs(r.intensity - centre),
                     "from_start": abs(z - start), "label_area": int(ref[z].sum())})
    return rows


def format_table(rows: Sequence[LoopRow], corrections: int) -> str:
    """A Markdown table: per structure the Dice after 0..n corrections, then the mean."""
    head = "| structure | slices | " + " | ".join(f"{k} corr." for k in range(corrections + 1)) + " |"
    lines = [head, "|" + "---|" * (corrections + 3)]

    def at(row: LoopRow, k: int) -> float:
        return row.dice[min(k, len(row.dice) - 1)]  # nothing left to fix: the Dice stays

    for r in rows:
        lines.append(f"| {r.case}/{r.structure} | {r.slices_true} | "
                     + " | ".join(f"{at(r, k):.3f}" for k in range(corrections + 1)) + " |")
    if rows:
        lines.append(f"| **mean of {len(rows)}** | | "
                     + " | ".join(f"**{np.mean([at(r, k) for r in rows]):.3f}**" for k in range(corrections + 1)) + " |")
    return "\n".join(lines)


def write_rows(rows: Sequence[LoopRow], path: Path, corrections: int) -> None:
    """One CSV line per structure: Dice after 0..n corrections, the slices fixed, seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case", "structure", "slices_true", "box_slice"] + [f"dice_{k}" for k in range(corrections + 1)]
                   + ["corrected", "seconds"])
        for r in rows:
            dices = [r.dice[min(k, len(r.dice) - 1)] for k in range(corrections + 1)]
            w.writerow([r.case, r.structure, r.slices_true, r.box_slice] + [f"{d:.4f}" for d in dices]
                       + ["; ".join(r.corrected), f"{r.seconds:.1f}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m MedSAMSlicerLib.evaluation.loop``: the loop on the shipped set (or given set files)."""
    import torch

    from ..segmenter import Segmenter
    from .cases import load_inputs

    p = argparse.ArgumentParser(prog="python -m MedSAMSlicerLib.evaluation.loop", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="*", help="evaluation set files or FLARE22 folders (default: the shipped set)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="case/structure glob (repeatable)")
    p.add_argument("--min-slices", type=int, default=10, help="structures labelled on at least this many slices")
    p.add_argument("--corrections", type=int, default=3, help="corrections per structure (default 3)")
    p.add_argument("--out", help="CSV file to write")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--slices", help="CSV file for the per-slice signals of each first result (the review's data)")
    p.add_argument("--embedding-cache", metavar="DIR", help="keep slice embeddings in DIR between runs")
    p.add_argument("--key-slices", type=int, default=1, metavar="K",
                   help="start from the label's boxes on K >= 2 key slices spread over the structure "
                        "(ends included) instead of one box on its middle slice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a propagation setting, as in 'medsam-slicer evaluate --set' (repeatable), "
                        "e.g. rejoin=0")
    args = p.parse_args(argv)
    if args.key_slices < 1:
        print(f"error: --key-slices must be 1 (one box) or more; got {args.key_slices}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cases = load_inputs(args.inputs)

        def wanted(case, structure) -> bool:
            return not args.include or any(fnmatch.fnmatchcase(f"{case.name}/{structure.name}", pat)
                                           for pat in args.include)

        variant = apply_assignments(Variant("loop"), args.set)
        seg = Segmenter("litemedsam", device="cpu", cache_mb=4096)
        seg.predictor.method = variant.preprocessing(seg.spec.preprocessing)  # enlarge=cubic, as evaluate
        store = None
        if args.embedding_cache:
            from .store import EmbeddingStore

            store = EmbeddingStore(args.embedding_cache)
        signals: List[dict] = []

        def on_result(case, structure, ref, step, result) -> None:
            if step == 0 and args.slices:
                signals.extend({"case": case.name, "structure": structure.name, **row}
                               for row in slice_signals(result, ref))

        rows = run_loops(cases, seg, args.corrections, args.min_slices, wanted, settings=variant.settings,
                         window=variant.window, on_result=on_result,
                         embedding_store=store, log=lambda line: print(line, file=sys.stderr, flush=True),
                         key_slices=args.key_slices)
    except MedSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.slices:
        Path(args.slices).parent.mkdir(parents=True, exist_ok=True)
        with open(args.slices, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=SIGNAL_COLUMNS)
            w.writeheader()
            w.writerows(signals)
    print(format_table(rows, args.corrections))
    if args.out:
        write_rows(rows, Path(args.out), args.corrections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
