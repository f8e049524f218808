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

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .lockstep import Pass, shared_slices, walk
from .predictor import Predictor
from .propagation import PropagationResult, PropagationSettings, check_prompt, resolve_margins, slice_record
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


def segment_structures(
    predictor: Predictor,
    prompts: Mapping[str, BoxPrompt],
    settings: Optional[PropagationSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    settle: bool = True,
) -> StructuresResult:
    """Segment several structures in 3D, each from its box, as one job.

    Args:
        predictor: a :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor` with the volume set.
        prompts: per structure name, its :class:`~MedSAMSlicerLib.boxes.BoxPrompt` (a 2D box on a
            slice; with a z-range, a 3D box that bounds its propagation). Boxes may lie on the same
            slice or on different slices.
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
    checked = {}
    for name in names:
        if not str(name).strip():
            raise MedSAMError("every structure needs a name")
        prompt = prompts[name]
        try:
            checked[name] = check_prompt(predictor, prompt.z, prompt.box, prompt.z_range)
        except MedSAMError as exc:
            raise MedSAMError(f"{name}: {exc}") from None
    encoded0, decoded0 = predictor.encoded_slices, predictor.decoded_boxes
    margin, wider_box = resolve_margins(predictor, settings)
    jitter = settings.box_jitter * predictor.input_size / 256.0
    volume = predictor.volume

    passes: List[Pass] = []
    starts = sorted({z for z, _, _ in checked.values()})
    firsts = {}
    for name in names:
        z, box_m, (lo, hi) = checked[name]
        ranged = prompts[name].z_range is not None
        rule = settings.stop if (not ranged and settings.auto_stop) else None
        edge = "reached the end of the z-range" if ranged else "reached the volume's edge"
        passes.append(Pass(name, "up", z, 1, hi, np.zeros(0), box_m, rule, edge))
        passes.append(Pass(name, "down", z, -1, lo, np.zeros(0), box_m, rule, edge))
    total = len(names) + sum(p.limit for p in passes)
    done = 0
    with predictor.holding(shared_slices(passes, starts)):
        check_cancel(cancel)
        predictor.encode(starts, cancel=cancel)
        # The start slices: each slice's boxes decoded together.
        for z in starts:
            check_cancel(cancel)
            here = [n for n in names if checked[n][0] == z]
            for name, result in zip(here, predictor.decode_boxes(z, [checked[n][1] for n in here], jitter)):
                firsts[name] = result
                done += 1
                report(progress, done, total, f"slice {z} ({name})")
        for p in passes:
            p.start_mask = firsts[p.key].mask
        walk(predictor, passes, settings, margin, wider_box, hold=starts, progress=progress, cancel=cancel,
             done=done, total=total)

    shape = volume.shape
    masks: Dict[str, np.ndarray] = {}
    logits: Dict[str, Dict[int, np.ndarray]] = {}
    results: Dict[str, PropagationResult] = {}
    for name in names:
        z = checked[name][0]
        first = firsts[name]
        mask = np.zeros(shape, dtype=bool)
        mask[z] = first.mask
        own = {z: first.logits[first.mask] if first.logits is not None else np.zeros(int(first.mask.sum()), np.float32)}
        records = [slice_record(z, first, volume[z], reason="start")]
        reasons = {}
        for p in passes:
            if p.key != name:
                continue
            for zz, m in p.masks.items():
                mask[zz] = m
            own.update(p.logits)
            records += p.records
            reasons[p.name] = p.reason
        masks[name], logits[name] = mask, own
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
