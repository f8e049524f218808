"""Many propagation passes walked together, slice by slice: the engine under several structures at
once (:mod:`.structures`) and corrections (:mod:`.corrections`).

A :class:`Pass` goes from a slice whose mask is known (the user's box, or a slice the user drew or
accepted) one slice at a time in one direction, each slice prompted from the previous one's mask
exactly as :func:`~MedSAMSlicerLib.segmentation.propagation.propagate` does it (LiteMedSAM's box from the previous
mask, the wider box, the stop rule). :func:`walk` runs all passes going up in one sweep of
increasing ``z`` and all passes going down in one sweep of decreasing ``z``: on each slice every
pass that is there is prompted, and all their boxes go to the decoder together
(:meth:`~MedSAMSlicerLib.segmentation.predictor.Predictor.decode_boxes`). A pass's masks are those it would get
alone: nothing of one pass reaches another.

Each slice is encoded once, whatever the embedding cache's cap: a slice that both sweeps (or the
start slices and a sweep) need is held (:meth:`~MedSAMSlicerLib.segmentation.predictor.Predictor.holding`) from
its first use to its last, 4 MiB per slice for LiteMedSAM and MedSAM alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Set

import numpy as np

from ..models.allocator import reuse_freed_memory
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .predictor import Predictor
from .propagation import PropagationSettings, SliceRecord, StopRule, _PassHistory, _predict_many, slice_record


@dataclass
class Pass:
    """One direction of propagation from a slice whose mask is known.

    Attributes:
        key: the structure it belongs to.
        name: how its stop reason is labelled (``"up"``, ``"down"``, ``"up 40..59"``).
        start: the slice it starts from (its mask is known; the pass does not predict it).
        step: ``+1`` (toward increasing ``z``, superior) or ``-1``.
        end: the last slice it may predict (inclusive).
        start_mask: ``(H, W)`` mask on ``start``.
        first_box: model-pixel box used where the previous slice's mask is empty (the user's box).
        stop: the :class:`~MedSAMSlicerLib.segmentation.propagation.StopRule`, or ``None``: only ``end`` ends it.
        end_reason: its stop reason when it reaches ``end``.
        history: what the stop rule compares the new slices with (default: the start slice
            alone, as :func:`~MedSAMSlicerLib.segmentation.propagation.propagate`); a correction's pass starts
            with the structure's known slices (:mod:`.corrections`).
        previous: ``(Z, H, W)`` the result before a correction, or ``None``: the pass ends on
            the first slice whose new mask agrees with it (:attr:`PropagationSettings.rejoin`).
        piece: the pass follows one piece of a structure the user boxed in several pieces: it
            rejoins the earlier result where its mask agrees with the earlier mask's parts that it
            touches (the other pieces are other passes'), not with the whole slice.
        corridor: slice -> the model-pixel box ``(x0, y0, x1, y1)`` the pass's prompt must stay
            inside there (key-slice boxes on both sides of the span bound it:
            :func:`~MedSAMSlicerLib.segmentation.propagation.clip_box`), or ``None``.

    Filled in by :func:`walk`: ``masks`` (slice -> ``(H, W)`` mask of every accepted slice),
    ``logits`` (slice -> the logits on that mask's pixels, in ``np.nonzero`` order), ``records``
    (one :class:`~MedSAMSlicerLib.segmentation.propagation.SliceRecord` per predicted slice, rejected ones
    included), ``reason`` (why it ended) and ``rejoined`` (the slice where it met ``previous``, or
    ``None``).
    """

    key: Hashable
    name: str
    start: int
    step: int
    end: int
    start_mask: np.ndarray
    first_box: np.ndarray
    stop: Optional[StopRule] = None
    end_reason: str = ""
    history: Optional[_PassHistory] = None
    previous: Optional[np.ndarray] = None
    corridor: Optional[Callable[[int], np.ndarray]] = None
    piece: bool = False
    masks: Dict[int, np.ndarray] = field(default_factory=dict)
    logits: Dict[int, np.ndarray] = field(default_factory=dict)
    records: List[SliceRecord] = field(default_factory=list)
    reason: str = ""
    rejoined: Optional[int] = None

    @property
    def slices(self) -> range:
        """The slices it may predict, in its order (empty when ``end`` lies behind ``start``)."""
        return range(self.start + self.step, self.end + self.step, self.step)

    @property
    def limit(self) -> int:
        """How many slices it may predict (the stop rule's ``max_slices`` included)."""
        n = len(self.slices)
        return min(n, self.stop.max_slices) if self.stop is not None else n


def slices_used(passes: Sequence[Pass]) -> Set[int]:
    """Every slice the passes may predict."""
    used: Set[int] = set()
    for p in passes:
        used.update(p.slices[: p.limit])
    return used


def shared_slices(passes: Sequence[Pass], hold: Sequence[int] = ()) -> List[int]:
    """Slices used more than once by a job: by ``hold`` (its start slices), the up sweep and the
    down sweep of ``passes``. Holding these (:meth:`Predictor.holding`) encodes each slice once."""
    uses: Dict[int, int] = {}
    for used in (set(hold), slices_used([p for p in passes if p.step > 0]),
                 slices_used([p for p in passes if p.step < 0])):
        for z in used:
            uses[z] = uses.get(z, 0) + 1
    return sorted(z for z, n in uses.items() if n > 1)


def _rejoins(p: Pass, z: int, mask: np.ndarray, threshold: float) -> bool:
    """Whether pass ``p``'s new ``mask`` on slice ``z`` agrees with the result before the
    correction (Dice at least ``threshold``; an empty mask never rejoins: the pass goes on from
    its first box)."""
    if p.previous is None or threshold <= 0 or not mask.any():
        return False
    before = p.previous[z]
    if p.piece and before.any():
        from scipy import ndimage as ndi

        parts, _ = ndi.label(before, structure=np.ones((3, 3), bool))
        touched = np.unique(parts[mask & before])
        before = np.isin(parts, touched[touched > 0])
    total = int(mask.sum()) + int(before.sum())
    return 2.0 * int((mask & before).sum()) >= threshold * total


def walk(
    predictor: Predictor,
    passes: Sequence[Pass],
    settings: PropagationSettings,
    margin: float,
    wider_box: float,
    hold: Sequence[int] = (),
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    done: int = 0,
    total: Optional[int] = None,
) -> None:
    """Run ``passes``: the up passes in one sweep of increasing ``z``, then the down passes in one
    sweep of decreasing ``z``, each slice's prompts decoded together.

    Args:
        predictor: the volume's predictor.
        passes: what to run (filled in place).
        settings: the propagation settings.
        margin: box growth around the previous mask, in model-input pixels.
        wider_box: the wider box's extra growth, in pixels at 256 input (both as
            :func:`~MedSAMSlicerLib.segmentation.propagation.propagate` resolves them: :func:`resolve_margins`).
        hold: slices the caller has already used (its start slices): held too when a sweep uses
            them again.
        progress: ``progress(done, total, message)``, one step per predicted slice of a pass.
        cancel: cancelling raises :class:`~MedSAMSlicerLib.progress.Cancelled` between slices.
        done, total: steps the caller has reported already and the whole job's steps (default:
            none, and this walk's: ``sum(p.limit for p in passes)``).
    """
    volume = predictor.volume
    up = [p for p in passes if p.step > 0 and p.limit > 0]
    down = [p for p in passes if p.step < 0 and p.limit > 0]
    for p in passes:
        p.reason = p.end_reason
    shared = shared_slices(passes, hold)
    total = done + sum(p.limit for p in passes) if total is None else total
    with predictor.holding(shared), reuse_freed_memory():
        for group, step in ((up, 1), (down, -1)):
            if not group:
                continue
            state = {id(p): (p.start_mask, p.history or _PassHistory.start(p.start_mask, volume[p.start]))
                     for p in group}
            active = {id(p) for p in group}
            order = sorted(slices_used(group), reverse=step < 0)
            for i, z in enumerate(order):
                here = [p for p in group if id(p) in active and z in p.slices]
                if not here:
                    continue
                check_cancel(cancel)
                if not predictor.is_encoded(z):
                    # Encode ahead in the sweep's direction, a batch at a time.
                    ahead = [w for w in order[i:] if any(id(p) in active and w in p.slices for p in group)]
                    predictor.encode(ahead[: predictor.batch_size], cancel=cancel)
                requests = [(state[id(p)][0], p.first_box) if p.corridor is None
                            else (state[id(p)][0], p.first_box, p.corridor(z)) for p in here]
                for p, (result, agreement) in zip(here, _predict_many(predictor, z, requests, margin, wider_box,
                                                                       settings)):
                    previous, history = state[id(p)]
                    reason = p.stop.check(previous, result, volume[z], history) if p.stop is not None else None
                    p.records.append(slice_record(z, result, volume[z], previous, agreement, reason is None,
                                                  reason or ""))
                    if reason is not None:
                        p.reason = f"stopped at slice {z}: {reason}"
                        active.discard(id(p))
                    else:
                        p.masks[z] = result.mask
                        p.logits[z] = (result.logits[result.mask] if result.logits is not None
                                       else np.zeros(int(result.mask.sum()), np.float32))
                        if result.mask.any():
                            history.accept(result.mask, volume[z])
                        if _rejoins(p, z, result.mask, settings.rejoin):
                            p.rejoined = z
                            p.reason = f"rejoined the earlier result at slice {z}"
                            active.discard(id(p))
                        elif len(p.records) >= p.limit:
                            active.discard(id(p))
                    state[id(p)] = (result.mask, history)
                    done += 1
                    report(progress, done, total, f"slice {z}")
    check_cancel(cancel)
    report(progress, total, total, "done")
