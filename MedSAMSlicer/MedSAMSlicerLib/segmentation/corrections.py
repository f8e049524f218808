"""Correct a 3D result and propagate again from the correction (the annotator's loop).

After a 3D result the user fixes a wrong slice: a new box on it (:meth:`Correction.with_box`), or
the slice edited by hand (Paint/Erase) and marked good (:meth:`Correction.accept`). The slices the
user drew a box on or accepted are *locked*: no correction changes them. A correction locks its
slice and propagates again from it outwards, each way until the next locked slice, the volume's
edge (or the z-range's end), or the stop rule; every slice outside those two spans is kept as it
was. A pass from a correction ends where it meets the earlier result again (its new mask has
Dice >= :attr:`~MedSAMSlicerLib.segmentation.propagation.PropagationSettings.rejoin`, 0.9, with the slice as
it was): beyond that slice the earlier result is what the correction leads to, and it is kept, so
a correction changes the slices it is about, not good slices far from it. Between two locked
slices that both hold the structure, each end propagates over the span toward the other, with no
stop rule (the user has said the structure is on both slices), and the span is split at one
slice: below it the pass from the lower end, above it the pass from the upper end, where the
decoder's summed confidence (predicted IoU) is highest (micro-sam's "segment between annotated
slices"; a fixed halfway point let a pass from a small tip undo good slices near the other end,
liver of the shipped CT; choosing slice by slice let one far slice of a drifting pass replace a
good one, duodenum). A pass that rejoined stands for the earlier result there, with its records'
confidences; a mask given without its records runs both passes to the end. A pass toward the
volume's edge from a correction compares the new
slices with the intensity of the whole structure known so far, not of the corrected slice alone
(:func:`_structure_history`). A locked slice the user emptied (erased, accepted) says the
structure is not there: nothing is propagated from it, so the span between it and the volume's
edge ends empty, and a pass coming toward it from the structure runs with the stop rule and ends
before it at the latest.

>>> first = propagate(predictor, 60, (30, 20, 70, 60))            # locked: (60,)
>>> fixed = correct(predictor, first, [Correction.with_box(45, (28, 25, 66, 58))])
>>> fixed.locked                                                   # (45, 60)
>>> good = correct(predictor, edited_mask, [Correction.accept(52)], locked=fixed.locked)

Each pass is :func:`~MedSAMSlicerLib.segmentation.propagation.propagate`'s walk (:mod:`.lockstep`): the same
boxes, wider box and stop rule, all passes of a slice decoded together, each slice encoded once.
A correction with no locked slice around it is :func:`propagate` itself: one box on an empty
mask gives exactly ``propagate``'s result. Corrections work on whole slices (``zoom_below`` and
the speed tiers' every-n-th-slice stride do not apply).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..errors import MedSAMError
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .lockstep import Pass, walk
from .predictor import Predictor
from .preprocessing import box_to_model, mask_box_in_model
from .propagation import (
    PropagationResult,
    PropagationSettings,
    SliceRecord,
    _PassHistory,
    check_prompt,
    join_pieces,
    resolve_margins,
    slice_record,
)
from .results import Correction, check_corrections  # noqa: F401  (Correction's home is results.py, torch-free)

EDGE_REASON = "reached the volume's edge"
RANGE_REASON = "reached the end of the z-range"


#: A span between two locked slices (``None``: the volume's or the z-range's end).
Span = Tuple[Optional[int], Optional[int]]


def _spans_around(z: int, locked: Sequence[int]) -> Tuple[Span, Span]:
    below = [v for v in locked if v < z]
    above = [v for v in locked if v > z]
    return (below[-1] if below else None, z), (z, above[0] if above else None)


_EDGE_PASS = re.compile(r"^(up|down)$")
_BETWEEN = re.compile(r"^between (\d+)\.\.(\d+)$")


def _reason_kept(name: str, rerun: Set[Span]) -> bool:
    """Whether an earlier stop reason belongs to a span that was not propagated again: ``"up"`` and
    ``"down"`` are the passes toward the volume's ends, ``"between a..b"`` the span between locked
    slices ``a`` and ``b`` (gone when a correction falls inside it or on its ends)."""
    if _EDGE_PASS.match(name):
        return not any((hi is None) if name == "up" else (lo is None) for lo, hi in rerun)
    match = _BETWEEN.match(name)
    if match is None:
        return True
    a, b = int(match.group(1)), int(match.group(2))
    return not any(lo is not None and hi is not None and a <= lo and hi <= b for lo, hi in rerun)


def _structure_history(mask: np.ndarray, volume: np.ndarray):
    """``known(z)``: a stop-rule history for a pass from slice ``z`` that starts from the structure's
    known slices (every non-empty slice of ``mask``): the intensity the new slices are compared with
    is the structure's, not that of the corrected slice alone (a correction at a structure's tip
    sees only the tip). The largest area is the start slice's, as in a fresh pass: the structure's
    largest would end a pass from a small tip at once."""
    zs = [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    medians = [float(np.median(volume[z][mask[z]])) for z in zs]
    largest = max((int(mask[z].sum()) for z in zs), default=0)

    def known(z: int) -> _PassHistory:
        history = _PassHistory.start(mask[z], volume[z])
        history.medians = list(medians) if medians else history.medians
        # The structure is larger elsewhere: this pass goes on from its tip (StopRule's tip rule).
        history.tip = largest > int(mask[z].sum())
        return history

    return known


def _source(p: Pass, z: int, records: Dict[int, SliceRecord], earlier: Dict[int, SliceRecord], before: np.ndarray):
    """What pass ``p`` (its ``records`` by slice) gives slice ``z``: ``(score, mask, record, kept)``;
    beyond the slice where it rejoined the earlier result, the earlier mask and record (``kept``
    True); ``(0, None, None, False)`` where it has nothing."""
    if z in p.masks:
        return _score(records[z]), p.masks[z], records[z], False
    if p.rejoined is not None and z in earlier:
        return _score(earlier[z]), before[z], earlier[z], True
    return 0.0, None, None, False


def _untouched_parts(before: np.ndarray, now: np.ndarray) -> np.ndarray:
    """The 8-connected parts of ``before`` (an ``(H, W)`` mask) that ``now`` does not touch."""
    from scipy import ndimage as ndi

    parts, _ = ndi.label(before, structure=np.ones((3, 3), bool))
    touched = np.unique(parts[now & before])
    return (parts > 0) & ~np.isin(parts, touched[touched > 0])


def _side_source(side: Sequence[Pass], z: int, by_slice: Dict[int, Dict[int, SliceRecord]],
                 earlier: Dict[int, SliceRecord], before: np.ndarray):
    """:func:`_source` for the passes of one end of a span (one per piece the user boxed there):
    their masks joined, their mean predicted IoU, the largest piece's record; ``kept`` when every
    piece that has the slice kept the earlier result."""
    found = [o for o in (_source(p, z, by_slice[id(p)], earlier, before) for p in side) if o[1] is not None]
    if not found:
        return 0.0, None, None, False
    if len(found) == 1:
        return found[0]
    mask = np.logical_or.reduce([o[1] for o in found])
    record = max((o[2] for o in found), key=lambda r: r.area)
    return float(np.mean([o[0] for o in found])), mask, record, all(o[3] for o in found)


def _corridors(predictor: Predictor, boxes: Mapping[int, Sequence[np.ndarray]], settings: PropagationSettings):
    """``corridor(a, b)``: for a span between two slices the user boxed, slice -> the model-pixel
    box a pass's prompt must stay inside (:attr:`PropagationSettings.key_corridor`): the two
    slices' boxes (each the union of its pieces' boxes) interpolated linearly, grown on each side
    by ``key_corridor`` times the longer side of the larger of them. ``None`` where the rule is
    off or either end is not a boxed slice."""
    size = float(predictor.input_size)

    def union(z: int) -> np.ndarray:
        bs = np.array(boxes[z], dtype=float)
        return np.array([bs[:, 0].min(), bs[:, 1].min(), bs[:, 2].max(), bs[:, 3].max()])

    def corridor_of(a: int, b: int) -> Optional[Callable[[int], np.ndarray]]:
        if settings.key_corridor <= 0 or a not in boxes or b not in boxes:
            return None
        box_a, box_b = union(a), union(b)
        grow = settings.key_corridor * float(max(box_a[2] - box_a[0], box_a[3] - box_a[1],
                                                 box_b[2] - box_b[0], box_b[3] - box_b[1]))

        def corridor(z: int) -> np.ndarray:
            t = (z - a) / float(b - a)
            box = (1 - t) * box_a + t * box_b
            return np.array([max(0.0, box[0] - grow), max(0.0, box[1] - grow), min(size, box[2] + grow),
                             min(size, box[3] + grow)])

        return corridor

    return corridor_of


def _best_split(low: Sequence[float], high: Sequence[float]) -> int:
    """``k`` maximising ``sum(low[:k]) + sum(high[k:])`` (ties: the nearest to the middle)."""
    n = len(low)
    low_sum = np.concatenate([[0.0], np.cumsum(low)])
    high_sum = np.concatenate([np.cumsum(high[::-1])[::-1], [0.0]])
    totals = low_sum + high_sum
    best = float(totals.max())
    return min((k for k in range(n + 1) if totals[k] >= best - 1e-9), key=lambda k: abs(2 * k - n))


def _score(record: SliceRecord) -> float:
    """A record's predicted IoU for the split (NaN, an accepted slice's, counts as 0)."""
    return float(record.score) if np.isfinite(record.score) else 0.0


def correct(
    predictor: Predictor,
    current: Union[PropagationResult, np.ndarray],
    corrections: Sequence[Correction],
    locked: Optional[Sequence[int]] = None,
    z_range: Optional[Tuple[int, int]] = None,
    settings: Optional[PropagationSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PropagationResult:
    """Apply corrections to a 3D result and propagate again from them.

    Args:
        predictor: the volume's :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor`.
        current: the current result, or its ``(z, y, x)`` bool mask (e.g. the segment as the user
            left it, edits included). Not changed.
        corrections: the slices fixed (each slice at most once). Several corrections run as one
            job: boxes on two slices of one structure (on an empty mask: a new structure)
            propagate between them from both ends and meet.
        locked: the slices locked so far (default: ``current.locked``; none for a mask).
        z_range: inclusive ``(z0, z1)`` that bounds the structure (a 3D box), or ``None``: the
            extent is found by the stop rule (``settings.auto_stop``).
        settings: :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationSettings` (defaults when ``None``).
        progress: ``progress(done, total, message)``.
        cancel: cancelling raises :class:`~MedSAMSlicerLib.progress.Cancelled` between slices.

    Returns:
        A new :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult`: the mask (slices outside
        the propagated spans as in ``current``), ``locked`` with the corrected slices added,
        ``slices`` sorted by ``z`` (``current``'s records of the kept slices, new ones for the
        rest; a box's slice has reason ``"box"``, an accepted one ``"accepted"`` with a NaN score)
        and ``stop_reasons`` (``"up"``/``"down"``: the passes toward the volume's ends;
        ``"between 41..59"``: the span between locked slices 41 and 59).

    Raises:
        MedSAMError: a mask of another shape than the volume, no correction, two on one slice, or
            a slice, box, locked slice or z-range that does not fit the volume.
    """
    settings = settings or PropagationSettings()
    volume = predictor.volume
    depth = predictor.depth
    if isinstance(current, PropagationResult):
        mask_in, records_in, reasons_in = current.mask, list(current.slices), dict(current.stop_reasons)
        locked = current.locked if locked is None else locked
    else:
        mask_in, records_in, reasons_in = np.asarray(current), [], {}
    check_corrections(corrections, mask_in.shape, volume.shape)
    zs = [c.z for c in corrections]
    lo, hi = 0, depth - 1
    if z_range is not None:
        lo, hi = sorted(int(v) for v in z_range)
        if lo < 0 or hi >= depth:
            raise MedSAMError(f"z-range {lo}..{hi} is outside the volume's slices 0..{depth - 1}")
    old_locked = sorted({predictor.check_slice_index(int(z)) for z in (locked or ())})
    boxes: Dict[int, List[np.ndarray]] = {}  # per slice, one model-pixel box per piece
    for c in corrections:
        z = predictor.check_slice_index(c.z)
        if not lo <= z <= hi:
            raise MedSAMError(f"the correction's slice {z} is outside the z-range {lo}..{hi}")
        if c.box is not None:
            boxes[z] = [check_prompt(predictor, z, b)[1] for b in c.boxes]
    margin, wider_box = resolve_margins(predictor, settings)
    jitter = settings.box_jitter * predictor.input_size / 256.0
    mask = np.array(mask_in, dtype=bool, copy=True)
    new_locked = sorted(set(old_locked) | set(zs))
    corrected = sorted(zs)

    # The spans next to each correction, and the passes that fill them.
    rerun: Set[Span] = set()
    for z in corrected:
        rerun.update(_spans_around(z, new_locked))
    edge_reason = EDGE_REASON if z_range is None else RANGE_REASON
    rule = settings.stop if (z_range is None and settings.auto_stop) else None
    # Toward a slice locked empty the structure ends somewhere before it: the stop rule finds where.
    toward_empty = settings.stop if settings.auto_stop else None

    total = len(corrected)
    done = 0
    starts: Dict[int, SliceRecord] = {}
    pieces: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}  # a boxed slice's (mask, box) per piece
    with predictor.holding(new_locked):
        check_cancel(cancel)
        predictor.encode(sorted(boxes), cancel=cancel)
        for z in corrected:
            check_cancel(cancel)
            if z in boxes:
                results = [predictor.predict_model_box(z, b, jitter) for b in boxes[z]]
                pieces[z] = [(r.mask, b) for r, b in zip(results, boxes[z])]
                result = join_pieces(results)
                mask[z] = result.mask
                starts[z] = slice_record(z, result, volume[z], reason="box")
            else:
                area = int(mask[z].sum())
                intensity = float(np.median(volume[z][mask[z]])) if area else float("nan")
                starts[z] = SliceRecord(z, area, float("nan"), True, "accepted", intensity=intensity)
            done += 1
            report(progress, done, total, f"slice {z}")

        def first_box(z: int) -> np.ndarray:
            # Where a pass's mask vanishes it falls back to this box: the locked mask's.
            prepared = predictor.prepared(z)
            box_m = mask_box_in_model(mask[z], prepared, margin)
            if box_m is None:  # a mask too small to survive the resize to the model's input
                ys, xs = np.nonzero(mask[z])
                box_m = box_to_model(np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float), prepared)
            return box_m

        def origins(z: int) -> List[Tuple[np.ndarray, np.ndarray]]:
            # What passes start from on slice z: each piece the user boxed, with its box (where its
            # mask vanishes the pass falls back to it), or the locked slice's mask as one.
            if z in pieces:
                return list(pieces[z])
            return [(mask[z], first_box(z))]

        def holds(z: int) -> bool:
            # The structure is on a slice the user boxed, even where the model's mask there came out
            # empty (a tip too small for it): passes go on from the box. A slice accepted empty: not there.
            return z in boxes or bool(mask[z].any())

        corridor_of = _corridors(predictor, boxes, settings)
        passes: List[Pass] = []
        pairs: List[Tuple[List[Pass], List[Pass]]] = []  # both ends of a span between two full locked slices
        for a, b in sorted(rerun, key=lambda s: (-1 if s[0] is None else s[0])):
            first, last = (lo if a is None else a + 1), (hi if b is None else b - 1)
            if first <= last:
                mask[first : last + 1] = False
        # Slices outside the z-range hold nothing (a result made with that z-range never had any).
        mask[:lo] = False
        mask[hi + 1 :] = False
        known = _structure_history(mask, volume)
        # The result before: a pass that meets it again ends there (settings.rejoin).
        previous = np.asarray(mask_in, dtype=bool)
        # Between two locked slices a pass that rejoined stands for the earlier result, compared by
        # the decoder's confidence in it: without its records (a mask) both passes run to the end.
        pair_previous = previous if records_in else None
        # Where the result ended before: a correction inside the structure fixes its shape, and the
        # pass from it ends there at the latest; to extend the structure, correct a slice beyond.
        before = np.flatnonzero(previous.any(axis=(1, 2)))
        for a, b in sorted(rerun, key=lambda s: (-1 if s[0] is None else s[0])):
            if a is None and b is not None:
                if holds(b):
                    end, why = lo, edge_reason
                    if before.size and lo < before[0] < b:
                        end, why = int(before[0]), f"reached slice {int(before[0])}, where the result ended before"
                    passes += [Pass(0, "down", b, -1, end, m, box, rule, why,
                                    history=known(b) if rule is not None else None, previous=previous,
                                    piece=len(pieces.get(b, ())) > 1)
                               for m, box in origins(b)]
            elif b is None and a is not None:
                if holds(a):
                    end, why = hi, edge_reason
                    if before.size and a < before[-1] < hi:
                        end, why = int(before[-1]), f"reached slice {int(before[-1])}, where the result ended before"
                    passes += [Pass(0, "up", a, 1, end, m, box, rule, why,
                                    history=known(a) if rule is not None else None, previous=previous,
                                    piece=len(pieces.get(a, ())) > 1)
                               for m, box in origins(a)]
            elif a is not None and b is not None and b - a > 1:
                full_a, full_b = holds(a), holds(b)
                name = f"between {a}..{b}"
                if full_a and full_b:
                    corridor = corridor_of(a, b)
                    ups = [Pass(0, name, a, 1, b - 1, m, box, None, f"reached slice {b}", previous=pair_previous,
                                corridor=corridor, piece=len(pieces.get(a, ())) > 1) for m, box in origins(a)]
                    downs = [Pass(0, name, b, -1, a + 1, m, box, None, f"reached slice {a}", previous=pair_previous,
                                  corridor=corridor, piece=len(pieces.get(b, ())) > 1) for m, box in origins(b)]
                    passes += ups + downs
                    pairs.append((ups, downs))
                elif full_a or full_b:
                    s, step, e, other = (a, 1, b - 1, b) if full_a else (b, -1, a + 1, a)
                    passes += [Pass(0, name, s, step, e, m, box, toward_empty, f"reached slice {other}, locked empty",
                                    history=known(s) if toward_empty is not None else None, previous=previous,
                                    piece=len(pieces.get(s, ())) > 1)
                               for m, box in origins(s)]
        total += sum(p.limit for p in passes)
        walk(predictor, passes, settings, margin, wider_box, hold=new_locked, progress=progress, cancel=cancel,
             done=done, total=total)
    check_cancel(cancel)

    rerun_slices: Set[int] = set(corrected)
    for a, b in rerun:
        rerun_slices.update(range(lo if a is None else a + 1, (hi if b is None else b - 1) + 1))
    # A pass that rejoined the earlier result leaves the slices beyond as they were (unless the
    # other pass of its span reached them).
    beyond: Set[int] = set()
    reached: Set[int] = set()
    for p in passes:
        reached.update(p.masks)
        if p.rejoined is not None:
            beyond.update(range(p.rejoined + p.step, p.end + p.step, p.step))
    restored = (beyond - reached) & rerun_slices
    for z in restored:
        mask[z] = previous[z]
    reasons = {k: v for k, v in reasons_in.items() if _reason_kept(k, rerun)}
    records = [r for r in records_in if r.z not in rerun_slices or r.z in restored] + list(starts.values())
    paired = {id(p) for ups, downs in pairs for p in ups + downs}
    for p in passes:
        if id(p) in paired:
            continue
        for z, m in p.masks.items():
            mask[z] |= m  # the span was cleared: the pieces' passes are joined
        records += p.records
        reasons[p.name] = p.reason
    for p in passes:
        # A piece's pass that rejoined the earlier result leaves its earlier parts beyond that slice
        # as they were, where another piece's pass goes on: the earlier parts no new mask touches.
        if p.piece and p.rejoined is not None and id(p) not in paired:
            for z in set(range(p.rejoined + p.step, p.end + p.step, p.step)) & reached & rerun_slices:
                mask[z] |= _untouched_parts(previous[z], mask[z])
    earlier = {r.z: r for r in records_in if r.accepted}
    chosen: Dict[int, SliceRecord] = {}
    for ups, downs in pairs:
        up, down = ups[0], downs[0]
        # The span is split at one slice: below it every slice from the pass from its lower end,
        # above it from the pass from its upper end, where the decoder's summed confidence is
        # highest (a pass that rejoined the earlier result stands for it beyond that slice: its
        # masks and records). One split keeps each pass's slices next to its start: choosing slice
        # by slice let a far slice of a drifting pass replace a good one (duodenum of the shipped CT).
        span = list(range(up.start + 1, down.start))
        by_slice = {id(p): {r.z: r for r in p.records} for p in ups + downs}
        from_up = [_side_source(ups, z, by_slice, earlier, previous) for z in span]
        from_down = [_side_source(downs, z, by_slice, earlier, previous) for z in span]
        split = _best_split([o[0] for o in from_up], [o[0] for o in from_down])
        n_kept = 0
        for i, z in enumerate(span):
            score, m, record, kept = from_up[i] if i < split else from_down[i]
            if m is None:  # this side has nothing here: the other's
                score, m, record, kept = from_down[i] if i < split else from_up[i]
            if m is None:
                continue
            mask[z] = m
            chosen[z] = record
            n_kept += kept
        reason = (f"slices {up.start + 1}..{up.start + split} from the pass from {up.start}, "
                  f"slices {up.start + split + 1}..{down.start - 1} from the pass from {down.start}, where the decoder "
                  "is most confident in total")
        if split == 0:
            reason = f"every slice from the pass from {down.start}, where the decoder is most confident in total"
        elif split == len(span):
            reason = f"every slice from the pass from {up.start}, where the decoder is most confident in total"
        if n_kept:
            reason += f"; {n_kept} kept as they were (the passes rejoined the earlier result)"
        reasons[up.name] = reason
    records = [r for r in records if r.z not in chosen] + list(chosen.values())
    records.sort(key=lambda r: r.z)
    zs_found = np.flatnonzero(mask.any(axis=(1, 2)))
    extent = (int(zs_found[0]), int(zs_found[-1])) if zs_found.size else None
    return PropagationResult(mask=mask, z_extent=extent, stop_reasons=reasons, slices=records,
                             locked=tuple(new_locked))

