"""Which slices of a 3D result to review first: the *doubtful* ones.

Every slice of a :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` keeps what the decoder
said about it (:class:`~MedSAMSlicerLib.segmentation.propagation.SliceRecord`: predicted IoU, area, the
agreement of the narrow and the wider box, the overlap with the previous slice). :class:`DoubtRule`
flags the slices worth a look; the signals and thresholds were chosen by measuring which of them
predict a slice's error (per-slice Dice against the labels) on the shipped CT and MR (docs/evaluation.md,
"Doubtful slices"). Slices the user locked are never doubtful: the user made them.

>>> doubtful_slices(result)            # [z, ...], the most doubtful first
>>> review(result)                     # one SliceReview per slice of the mask
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..fileio.orientation import name_slices
from .propagation import PropagationResult, SliceRecord


@dataclass(frozen=True)
class DoubtRule:
    """When a slice is doubtful: any of its signals past its threshold.

    Attributes:
        min_agreement: Dice between the masks of the narrow box and the wider box (6 px more at
            256 input) below this: the mask depends on where exactly the box edges fall.
        min_score: the decoder's predicted IoU below this.
        max_intensity_shift: the median intensity under the mask (windowed, 0-255) further than
            this from the median over the result's slices: the mask has moved onto other tissue.

    Measured (docs/evaluation.md, "Doubtful slices"): on the 14 structures of the shipped CT and MR that one
    box segments with 3D Dice >= 0.8 (421 propagated slices, 15% of them with slice Dice < 0.8),
    the predicted IoU (AUC 0.77), the narrow/wide agreement (0.74) and the intensity shift (0.64)
    predict a bad slice; the overlap with the previous slice (0.57), the area change (0.57) and
    the distance from the box (0.54) hardly do. With these thresholds 11% of the slices are
    flagged, 56% of them bad (44% of all bad slices); flagged slices have mean Dice 0.64, the
    others 0.89.

    Doubtful slices are ordered by how many signals are past their thresholds, then by predicted
    IoU (the best single predictor), lowest first.
    """

    min_agreement: float = 0.85
    min_score: float = 0.75
    max_intensity_shift: float = 10.0

    def signals(self, record: SliceRecord, reference_intensity: float) -> List[str]:
        """The signals of one slice past their thresholds, in words (none: not doubtful)."""
        why = []
        if math.isfinite(record.agreement) and record.agreement < self.min_agreement:
            why.append(f"narrow and wider box agree {record.agreement:.2f} < {self.min_agreement:g}")
        if math.isfinite(record.score) and record.score < self.min_score:
            why.append(f"predicted IoU {record.score:.2f} < {self.min_score:g}")
        shift = abs(record.intensity - reference_intensity)
        if math.isfinite(shift) and shift > self.max_intensity_shift:
            why.append(f"intensity {shift:.0f} grey levels from the structure's > {self.max_intensity_shift:g}")
        return why


@dataclass(frozen=True)
class SliceReview:
    """One slice of a result, as the review shows it.

    Attributes:
        z: the canonical slice.
        score: the decoder's predicted IoU (NaN on a slice the user edited and accepted).
        area: pixels of the mask.
        locked: the user drew a box on it or accepted it.
        doubtful: worth a look (:class:`DoubtRule`).
        signals: how many signals are past their thresholds (0: not doubtful).
        reason: why it is doubtful, or how it was made (``"start"``, ``"box"``, ``"accepted"``).
    """

    z: int
    score: float
    area: int
    locked: bool
    doubtful: bool
    signals: int
    reason: str


def review(result: PropagationResult, rule: Optional[DoubtRule] = None) -> List[SliceReview]:
    """One :class:`SliceReview` per slice that holds the structure in ``result.mask``, by ``z``.

    Slices of the mask without a record (e.g. painted by hand before a correction) are listed with
    a NaN score and are not doubtful.
    """
    rule = rule or DoubtRule()
    records: Dict[int, SliceRecord] = {r.z: r for r in result.slices if r.accepted}
    locked = set(result.locked)
    zs = [int(v) for v in result.mask.any(axis=(1, 2)).nonzero()[0]]
    intensities = [records[z].intensity for z in zs if z in records and math.isfinite(records[z].intensity)]
    reference = float(np.median(intensities)) if intensities else float("nan")
    out: List[SliceReview] = []
    for z in zs:
        area = int(result.mask[z].sum())
        record = records.get(z)
        if record is None:
            out.append(SliceReview(z, float("nan"), area, z in locked, False, 0, "no record"))
            continue
        why = [] if z in locked else rule.signals(record, reference)
        out.append(SliceReview(z, float(record.score), area, z in locked, bool(why), len(why),
                               "; ".join(why) or record.reason))
    return out


def doubtful_slices(result: PropagationResult, rule: Optional[DoubtRule] = None) -> List[int]:
    """The doubtful slices of ``result``, the most doubtful first: most signals past their
    thresholds, then lowest predicted IoU (:class:`DoubtRule`)."""
    items = [s for s in review(result, rule) if s.doubtful]
    return [s.z for s in sorted(items, key=lambda s: (-s.signals, s.score, s.z))]


def next_doubtful(result: PropagationResult, after: Optional[int] = None, rule: Optional[DoubtRule] = None
                  ) -> Optional[int]:
    """The slice a "next doubtful slice" button goes to: the most doubtful one after ``after`` in
    :func:`doubtful_slices`'s order (the first when ``after`` is ``None`` or not doubtful; wraps
    around). ``None`` when no slice is doubtful."""
    order = doubtful_slices(result, rule)
    if not order:
        return None
    if after is None or after not in order:
        return order[0]
    return order[(order.index(after) + 1) % len(order)]


def end_reasons(result: PropagationResult) -> Dict[str, str]:
    """Why the structure ends where it does, per end: ``{"down": ..., "up": ...}`` (the passes toward
    the volume's ends; a direction that was not propagated is absent)."""
    return {k: result.stop_reasons[k] for k in ("down", "up") if k in result.stop_reasons}


def review_report(result: PropagationResult, slice_name: Callable[[int], Tuple[str, int]],
                  rule: Optional[DoubtRule] = None) -> dict:
    """The review as JSON-ready data, slices named as the user's file names them.

    Args:
        result: a 3D result.
        slice_name: canonical ``z`` -> ``(axis, index)`` of the file, e.g. ``("k", 21)``
            (:meth:`~MedSAMSlicerLib.fileio.orientation.AxialOrientation.slice_to_index`).

    Returns:
        ``{"slice_axis": "k", "slices": [{"k", "iou", "area", "locked", "doubtful", "reason"}, ...],
        "doubtful": [k, ...] (most doubtful first), "ends": {"down"/"up": {"last", "stopped_at",
        "reason"}}}``: per end (``up``: toward increasing canonical z, superior) the last slice of
        the structure, the slice the stop rule rejected (``None`` when none was) and why.
    """
    items = review(result, rule)
    axis = slice_name(0)[0]

    def index(z: int) -> int:
        return slice_name(int(z))[1]

    def number(v: float) -> Optional[float]:
        return round(float(v), 4) if math.isfinite(v) else None

    slices = [{axis: index(s.z), "iou": number(s.score), "area": s.area, "locked": s.locked, "doubtful": s.doubtful,
               "reason": s.reason} for s in items]
    start = result.locked[0] if result.locked else None
    ends: Dict[str, dict] = {}
    extent = result.z_extent
    for direction, reason in end_reasons(result).items():
        up = direction == "up"
        rejected = [r for r in result.slices if not r.accepted and start is not None and (r.z > start if up else r.z < start)]
        stop = min(rejected, key=lambda r: r.z) if (rejected and up) else (max(rejected, key=lambda r: r.z) if rejected else None)
        ends[direction] = {
            "last": None if extent is None else index(extent[1] if up else extent[0]),
            "stopped_at": None if stop is None else index(stop.z),
            "reason": name_slices(stop.reason if stop is not None else reason, slice_name),
        }
    return {"slice_axis": axis, "slices": slices, "doubtful": [index(z) for z in doubtful_slices(result, rule)],
            "ends": ends}
