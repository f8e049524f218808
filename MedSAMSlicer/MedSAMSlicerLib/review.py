"""Which slices of a 3D result to review first: the *doubtful* ones.

Every slice of a :class:`~MedSAMSlicerLib.propagation.PropagationResult` keeps what the decoder
said about it (:class:`~MedSAMSlicerLib.propagation.SliceRecord`: predicted IoU, area, the
agreement of the narrow and the wider box, the overlap with the previous slice). :class:`DoubtRule`
turns those into a doubt per slice; the signals and thresholds were chosen by measuring which of
them predict a slice's error (per-slice Dice against the labels) on the shipped CT and MR (README,
"Doubtful slices"). Slices the user locked are never doubtful: the user made them.

>>> doubtful_slices(result)            # [z, ...], the most doubtful first
>>> review(result)                     # one SliceReview per slice of the mask
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .propagation import PropagationResult, SliceRecord


@dataclass(frozen=True)
class DoubtRule:
    """When a slice is doubtful: any signal past its threshold.

    Attributes:
        min_agreement: Dice between the masks of the narrow box and the wider box (6 px more at
            256 input) below this: the mask depends on where exactly the box edges fall.
        min_score: the decoder's predicted IoU below this.
        min_overlap: less than this fraction of the mask inside the previous slice's mask (grown
            by 2 px): the mask moved.

    The doubt of a slice is how far its worst signal lies below its threshold, as a fraction of the
    threshold (0 when none is); slices are ordered by it.
    """

    min_agreement: float = 0.85
    min_score: float = 0.6
    min_overlap: float = 0.8

    def doubt(self, record: SliceRecord) -> Tuple[float, str]:
        """``(doubt, reason)`` of one slice; ``(0.0, "")`` when no signal is past its threshold."""
        worst, why = 0.0, []
        for value, limit, text in ((record.agreement, self.min_agreement, "narrow and wider box agree {:.2f} < {:g}"),
                                   (record.score, self.min_score, "predicted IoU {:.2f} < {:g}"),
                                   (record.overlap, self.min_overlap, "overlap with the previous slice {:.2f} < {:g}")):
            if math.isfinite(value) and value < limit:
                worst = max(worst, (limit - value) / limit)
                why.append(text.format(value, limit))
        return worst, "; ".join(why)


@dataclass(frozen=True)
class SliceReview:
    """One slice of a result, as the review shows it.

    Attributes:
        z: the canonical slice.
        score: the decoder's predicted IoU (NaN on a slice the user edited and accepted).
        area: pixels of the mask.
        locked: the user drew a box on it or accepted it.
        doubtful: worth a look (:class:`DoubtRule`).
        doubt: how doubtful (0: not at all); the order of :func:`doubtful_slices`.
        reason: why it is doubtful, or how it was made (``"start"``, ``"box"``, ``"accepted"``).
    """

    z: int
    score: float
    area: int
    locked: bool
    doubtful: bool
    doubt: float
    reason: str


def review(result: PropagationResult, rule: Optional[DoubtRule] = None) -> List[SliceReview]:
    """One :class:`SliceReview` per slice that holds the structure in ``result.mask``, by ``z``.

    Slices of the mask without a record (e.g. painted by hand before a correction) are listed with
    a NaN score and are not doubtful.
    """
    rule = rule or DoubtRule()
    records: Dict[int, SliceRecord] = {r.z: r for r in result.slices if r.accepted}
    locked = set(result.locked)
    out: List[SliceReview] = []
    for z in (int(v) for v in result.mask.any(axis=(1, 2)).nonzero()[0]):
        area = int(result.mask[z].sum())
        record = records.get(z)
        if record is None:
            out.append(SliceReview(z, float("nan"), area, z in locked, False, 0.0, "no record"))
            continue
        doubt, why = (0.0, "") if z in locked else rule.doubt(record)
        out.append(SliceReview(z, float(record.score), area, z in locked, doubt > 0, doubt,
                               why or record.reason))
    return out


def doubtful_slices(result: PropagationResult, rule: Optional[DoubtRule] = None) -> List[int]:
    """The doubtful slices of ``result``, the most doubtful first (ties: by ``z``)."""
    items = [s for s in review(result, rule) if s.doubtful]
    return [s.z for s in sorted(items, key=lambda s: (-s.doubt, s.z))]


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
            (:meth:`~MedSAMSlicerLib.orientation.AxialOrientation.slice_to_index`).

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
            "reason": stop.reason if stop is not None else reason,
        }
    return {"slice_axis": axis, "slices": slices, "doubtful": [index(z) for z in doubtful_slices(result, rule)],
            "ends": ends}
