"""Several structures from one job: each slice encoded once for all of them, the boxes of one slice
decoded together, the structures propagated in lockstep, overlaps settled by confidence.

>>> job = segment_structures(predictor, {"liver": BoxPrompt(106, (17, 19, 79, 73)),
...                                      "spleen": BoxPrompt(107, (80, 50, 110, 77))})
>>> job.results["liver"].mask          # (z, y, x) bool, overlaps settled
>>> job.contested                      # (z, y, x) bool: voxels two or more structures claimed

Each structure is propagated exactly as :func:`~MedSAMSlicerLib.segmentation.propagation.propagate` would do it
alone (same boxes, same wider box, same stop rule: :mod:`.lockstep` runs the same step for all
passes of a slice at once), so its mask is the one it gets alone, except where structures
overlap. There each voxel goes to the structure whose decoder is most confident in it: the
highest logit at that voxel (logits, not probabilities, because probabilities saturate at 1.0
where two structures both claim a voxel strongly); an exact tie goes to the name that sorts
first. The order of the prompts never matters. Overlaps are settled on the result only: each
structure's own propagation goes on from its own mask, so settling never changes where another
structure's pass goes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .lockstep import Pass, shared_slices, walk
from .predictor import Predictor
from .propagation import (
    PropagationResult,
    PropagationSettings,
    check_prompt,
    join_pieces,
    propagate,
    resolve_margins,
    slice_record,
)
from .results import StructuresResult  # noqa: F401  (its home is results.py, torch-free)


def _extent(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return (int(zs[0]), int(zs[-1])) if zs.size else None


def settle_overlaps(masks: Mapping[str, np.ndarray], logits: Mapping[str, Mapping[int, np.ndarray]]
                    ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Give each voxel that several masks hold to the most confident one.

    Args:
        masks: per name, a ``(z, y, x)`` bool mask.
        logits: per name and slice, the logits on that slice's mask pixels (``np.nonzero`` order).

    Returns:
        ``(settled masks, contested)``: new masks (the inputs are not changed) and the ``(z, y, x)``
        voxels two or more masks held. Ties go to the name that sorts first.
    """
    names = sorted(masks)
    if not names:
        raise MedSAMError("no structure to settle")
    shape = masks[names[0]].shape
    count = np.zeros(shape, dtype=np.uint8)
    for name in names:
        count += masks[name]
    contested = count > 1
    settled = {name: masks[name].copy() for name in names}
    for z in np.flatnonzero(contested.any(axis=(1, 2))):
        here = contested[z]
        claimants = [n for n in names if (masks[n][z] & here).any()]
        confidence = np.full((len(claimants),) + here.shape, -np.inf, dtype=np.float32)
        for i, name in enumerate(claimants):
            confidence[i][masks[name][z]] = logits[name][int(z)]
        winner = np.argmax(confidence, axis=0)  # the first maximum: names in sorted order
        for i, name in enumerate(claimants):
            settled[name][z] &= ~here | (winner == i)
    return settled, contested


def _joined_logits(mask: np.ndarray, pieces: Sequence[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The logits on ``mask``'s pixels (``np.nonzero`` order) from each piece's ``(mask, logits on
    it)``: where pieces overlap, the highest."""
    if len(pieces) == 1:
        return pieces[0][1]
    full = np.full(mask.shape, -np.inf, dtype=np.float32)
    for m, values in pieces:
        here = np.full(mask.shape, -np.inf, dtype=np.float32)
        here[m] = values
        np.maximum(full, here, out=full)
    return full[mask]


def segment_structures(
    predictor: Predictor,
    prompts: Mapping[str, Union[BoxPrompt, Sequence[BoxPrompt]]],
    settings: Optional[PropagationSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    settle: bool = True,
) -> StructuresResult:
    """Segment several structures in 3D, each from its box, as one job.

    Args:
        predictor: a :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor` with the volume set.
        prompts: per structure name, its :class:`~MedSAMSlicerLib.boxes.BoxPrompt` (a 2D box on a
            slice; with a z-range, a 3D box that bounds its propagation), or several on one slice
            with one z-range: the structure's pieces there, each followed by its own passes (own
            box, own stop), the masks joined. Structures' boxes may lie on the same slice or on
            different slices.
        settings: :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationSettings` for all structures.
        progress: ``progress(done, total, message)``.
        cancel: cancelling raises :class:`~MedSAMSlicerLib.progress.Cancelled` between slices.
        settle: settle overlaps (the default); ``False`` keeps each structure's mask as it is alone.

    Returns:
        A :class:`StructuresResult`.

    Raises:
        MedSAMError: no prompt, a nameless one, a slice, box or z-range that does not fit the volume
            (the message names the structure), or ``zoom_below`` > 0 with several structures.
    """
    settings = settings or PropagationSettings()
    if not prompts:
        raise MedSAMError("give at least one structure to segment")
    if settings.zoom_below > 0 and len(prompts) > 1:
        raise MedSAMError("zoom_below works on one structure at a time (its crop is encoded for it alone): "
                          "segment the structures one by one, or set zoom_below=0")
    names = list(prompts)
    checked = {}  # per (name, piece): (z, model box, (lo, hi))
    pieces: Dict[str, List[Tuple[str, int]]] = {}
    ranged: Dict[str, bool] = {}
    for name in names:
        if not str(name).strip():
            raise MedSAMError("every structure needs a name")
        given = prompts[name]
        plist = [given] if isinstance(given, BoxPrompt) else list(given)
        if not plist:
            raise MedSAMError(f"{name}: give at least one box")
        if len({(p.z, p.z_range) for p in plist}) > 1:
            raise MedSAMError(f"{name}: its boxes lie on different slices or have different z-ranges; boxes on "
                              "several slices of one structure are key slices (segment_boxes)")
        pieces[name] = [(name, i) for i in range(len(plist))]
        ranged[name] = plist[0].z_range is not None
        for key, prompt in zip(pieces[name], plist):
            try:
                checked[key] = check_prompt(predictor, prompt.z, prompt.box, prompt.z_range)
            except MedSAMError as exc:
                where = f"{name}, box {key[1] + 1}" if len(plist) > 1 else name
                raise MedSAMError(f"{where}: {exc}") from None
    encoded0, decoded0 = predictor.encoded_slices, predictor.decoded_boxes
    margin, wider_box = resolve_margins(predictor, settings)
    jitter = settings.box_jitter * predictor.input_size / 256.0
    volume = predictor.volume

    passes: List[Pass] = []
    starts = sorted({z for z, _, _ in checked.values()})
    firsts = {}
    for key, (z, box_m, (lo, hi)) in checked.items():
        rule = settings.stop if (not ranged[key[0]] and settings.auto_stop) else None
        edge = "reached the end of the z-range" if ranged[key[0]] else "reached the volume's edge"
        passes.append(Pass(key, "up", z, 1, hi, np.zeros(0), box_m, rule, edge))
        passes.append(Pass(key, "down", z, -1, lo, np.zeros(0), box_m, rule, edge))
    total = len(checked) + sum(p.limit for p in passes)
    done = 0
    with predictor.holding(shared_slices(passes, starts)):
        check_cancel(cancel)
        predictor.encode(starts, cancel=cancel)
        # The start slices: each slice's boxes decoded together.
        for z in starts:
            check_cancel(cancel)
            here = [k for k in checked if checked[k][0] == z]
            for key, result in zip(here, predictor.decode_boxes(z, [checked[k][1] for k in here], jitter)):
                firsts[key] = result
                done += 1
                report(progress, done, total, f"slice {z} ({key[0]})")
        for p in passes:
            p.start_mask = firsts[p.key].mask
        walk(predictor, passes, settings, margin, wider_box, hold=starts, progress=progress, cancel=cancel,
             done=done, total=total)

    shape = volume.shape
    masks: Dict[str, np.ndarray] = {}
    logits: Dict[str, Dict[int, np.ndarray]] = {}
    results: Dict[str, PropagationResult] = {}
    for name in names:
        keys = pieces[name]
        z = checked[keys[0]][0]
        first = join_pieces([firsts[k] for k in keys])
        mask = np.zeros(shape, dtype=bool)
        piece_logits: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}  # slice -> (mask, logits) per piece
        for k in keys:
            m = firsts[k].mask
            piece_logits.setdefault(z, []).append(
                (m, firsts[k].logits[m] if firsts[k].logits is not None else np.zeros(int(m.sum()), np.float32)))
        mask[z] = first.mask
        records = [slice_record(z, first, volume[z], reason="start")]
        reasons = {}
        for p in passes:
            if p.key not in keys:
                continue
            for zz, m in p.masks.items():
                mask[zz] |= m
                piece_logits.setdefault(zz, []).append((m, p.logits[zz]))
            records += p.records
            label = p.name if len(keys) == 1 else f"{p.name} (box {p.key[1] + 1})"
            reasons[label] = p.reason
        if len(keys) > 1:
            records.sort(key=lambda r: r.z)
        masks[name], logits[name] = mask, {zz: _joined_logits(mask[zz], found) for zz, found in piece_logits.items()}
        results[name] = PropagationResult(mask=mask, z_extent=_extent(mask), stop_reasons=reasons, slices=records,
                                          locked=(z,))
    contested = np.zeros(shape, dtype=bool)
    if settle and len(names) > 1:
        settled, contested = settle_overlaps(masks, logits)
        for name in names:
            results[name].mask = settled[name]
            results[name].z_extent = _extent(settled[name])
    return StructuresResult(results, contested, predictor.encoded_slices - encoded0,
                            predictor.decoded_boxes - decoded0, logits)


def segment_boxes(
    predictor: Predictor,
    prompts: Sequence[BoxPrompt],
    settings: Optional[PropagationSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PropagationResult:
    """One structure in 3D from every box the user drew for it.

    - One box: :func:`~MedSAMSlicerLib.segmentation.propagation.propagate` (automatic extent, or
      its z-range).
    - Several boxes on one slice: the structure's **pieces** there (two iliac arteries, bowel
      loops). Each piece is followed by its own passes, with its own box and its own stop, so
      pieces end where each ends and meet where they join; the masks are joined
      (:func:`segment_structures` for one structure).
    - Boxes on two or more slices: **key slices**. Each key slice is locked with its box(es), the
      slices between two key slices are propagated from both ends and split where the decoder is
      most confident (kept inside the key boxes' corridor when
      :attr:`~MedSAMSlicerLib.segmentation.propagation.PropagationSettings.key_corridor` > 0), and
      beyond the outermost key slices propagation goes on as from one box (the stop rule, or the
      z-range): :func:`~MedSAMSlicerLib.segmentation.corrections.correct` on an empty mask, so
      later corrections treat the key slices as locked.

    Args:
        predictor: the volume's :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor`.
        prompts: the boxes; all with the same z-range or none (automatic extent).
        settings: propagation settings (defaults when ``None``).
        progress: ``progress(done, total, message)``.
        cancel: cancelling raises :class:`~MedSAMSlicerLib.progress.Cancelled` between slices.

    Returns:
        A :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult`, ``(z, y, x)`` mask;
        ``locked``: the boxed slices.

    Raises:
        MedSAMError: no box, boxes with different z-ranges, or a box, slice or z-range that does
            not fit the volume.
    """
    from .corrections import correct
    from .results import Correction

    prompts = list(prompts)
    if not prompts:
        raise MedSAMError("give at least one box")
    ranges = {p.z_range for p in prompts}
    if len(ranges) > 1:
        raise MedSAMError("the boxes of one structure must share one z-range (or none): got "
                          + ", ".join("none" if r is None else f"{r[0]}..{r[1]}" for r in sorted(ranges, key=str)))
    z_range = prompts[0].z_range
    if len(prompts) == 1:
        p = prompts[0]
        return propagate(predictor, p.z, p.box, z_range=z_range, settings=settings, progress=progress, cancel=cancel)
    slices = sorted({p.z for p in prompts})
    if len(slices) == 1:
        return segment_structures(predictor, {"structure": prompts}, settings=settings, progress=progress,
                                  cancel=cancel, settle=False).results["structure"]
    by_slice = {z: [p.box for p in prompts if p.z == z] for z in slices}
    empty = np.zeros(predictor.volume.shape, dtype=bool)
    return correct(predictor, empty, [Correction.with_boxes(z, boxes) for z, boxes in by_slice.items()],
                   locked=(), z_range=z_range, settings=settings, progress=progress, cancel=cancel)
