"""3D propagation from one 2D box, slice by slice, up and down.

As LiteMedSAM's 3D inference (``CVPR24_LiteMedSAM_infer.py``): each slice is prompted with the
bounding box of the previous slice's mask, grown by a margin (3 px at 256 input); an empty
previous mask falls back to the first box. With a z-range (a 3D box) the range alone bounds the
propagation, exactly as the original.

Without a z-range the structure's extent is ours to find: MedSAM was trained on non-empty slices
only and always outputs *something* (MedSAM issue #136), so a stop rule decides where the
structure ends. :class:`StopRule` documents the rule and its defaults, which were measured on the
real CT shipped in ``Testing/Data`` (see the README's "Automatic extent" section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import MedSAMError
from .predictor import Predictor, SliceResult
from .preprocessing import box_to_model, check_box, mask_box_in_model
from .progress import CancelToken, ProgressCallback, check_cancel, report

DIRECTIONS = ("both", "up", "down")


@dataclass(frozen=True)
class StopRule:
    """When automatic propagation decides that the structure has ended.

    Going from slice ``z`` to the next, the new mask is rejected and the pass stops when any of:

    - it is empty (fewer than ``min_pixels`` pixels);
    - it overlaps the previous slice's mask too little: the fraction of the new mask that lies
      inside the previous mask, grown by ``grow_px`` pixels, is below ``min_overlap``. At the end
      of an organ MedSAM jumps to a neighbour inside the box; a real continuation overlaps;
    - its area exceeds ``max_growth`` times the previous area (a leak into a neighbour);
    - the decoder's own predicted IoU is below ``min_score``.

    Attributes mirror those conditions. ``max_slices`` bounds a pass in any case.
    """

    min_pixels: int = 4
    min_overlap: float = 0.6
    grow_px: int = 2
    max_growth: float = 1.8
    min_score: float = 0.5
    max_slices: int = 10_000

    def check(self, previous: np.ndarray, current: SliceResult) -> Optional[str]:
        """Return why the pass stops at ``current``, or ``None`` to go on."""
        area = int(current.mask.sum())
        if area < self.min_pixels:
            return f"empty mask ({area} px)"
        prev_area = int(previous.sum())
        grown = _dilate(previous, self.grow_px)
        overlap = float((current.mask & grown).sum()) / area
        if overlap < self.min_overlap:
            return f"overlap with previous slice {overlap:.2f} < {self.min_overlap}"
        if prev_area > 0 and area > self.max_growth * prev_area:
            return f"area grew {area / prev_area:.2f}x > {self.max_growth}x"
        if current.score < self.min_score:
            return f"predicted IoU {current.score:.2f} < {self.min_score}"
        return None


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=px)


@dataclass
class SliceRecord:
    """What happened on one slice during propagation (for reports and tuning)."""

    z: int
    area: int
    score: float
    accepted: bool
    reason: str = ""


@dataclass
class PropagationResult:
    """A 3D result.

    Attributes:
        mask: ``(z, y, x)`` boolean mask of the whole volume.
        z_extent: ``(z_first, z_last)`` of the non-empty slices, or ``None`` if empty.
        stop_reasons: per direction (``"up"``/``"down"``), why the pass ended.
        slices: one :class:`SliceRecord` per predicted slice, in prediction order.
    """

    mask: np.ndarray
    z_extent: Optional[Tuple[int, int]]
    stop_reasons: Dict[str, str] = field(default_factory=dict)
    slices: List[SliceRecord] = field(default_factory=list)


def _default_margin(predictor: Predictor) -> float:
    # 3 px at LiteMedSAM's 256 input; the same physical fraction for MedSAM's 1024.
    return 3.0 * predictor.input_size / 256.0


def propagate(
    predictor: Predictor,
    z: int,
    box: Sequence[float],
    z_range: Optional[Tuple[int, int]] = None,
    direction: str = "both",
    stop: Optional[StopRule] = None,
    margin: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PropagationResult:
    """Segment a structure in 3D from a 2D box on slice ``z``.

    Args:
        predictor: a :class:`Predictor` with the volume set.
        z: the slice the box is drawn on.
        box: ``(x0, y0, x1, y1)`` in that slice's pixel indices (inclusive).
        z_range: inclusive ``(z_min, z_max)`` that bounds the propagation (a 3D box); ``None``
            finds the extent with ``stop``.
        direction: ``"both"``, ``"up"`` (increasing z, toward superior) or ``"down"``.
        stop: the :class:`StopRule` for automatic extent (default rule when ``None``).
        margin: box growth in model-input pixels (default 3 px at 256 input).
        progress: ``progress(done, total, message)``.
        cancel: a :class:`CancelToken`; cancelling raises :class:`Cancelled` between slices.

    Returns:
        A :class:`PropagationResult`; its mask is ``(z, y, x)`` like the volume.
    """
    if direction not in DIRECTIONS:
        raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")
    depth = predictor.depth
    z = predictor.check_slice_index(z)
    if z_range is not None:
        lo, hi = sorted(int(v) for v in z_range)
        if lo < 0 or hi >= depth:
            raise MedSAMError(f"z-range {lo}..{hi} is outside the volume's slices 0..{depth - 1}")
        if not lo <= z <= hi:
            raise MedSAMError(f"the box's slice {z} is outside its z-range {lo}..{hi}")
    else:
        lo, hi = 0, depth - 1
    rule = stop or StopRule()
    margin = _default_margin(predictor) if margin is None else float(margin)

    prepared = predictor.prepared(z)
    first_box = box_to_model(check_box(box, prepared.original_hw), prepared)
    passes: List[Tuple[str, List[int]]] = []
    if direction in ("both", "up"):
        passes.append(("up", list(range(z + 1, hi + 1))))
    if direction in ("both", "down"):
        passes.append(("down", list(range(z - 1, lo - 1, -1))))
    if z_range is None:
        passes = [(name, seq[: rule.max_slices]) for name, seq in passes]
    total = 1 + sum(len(seq) for _, seq in passes)

    check_cancel(cancel)
    shape = predictor.volume.shape
    out = np.zeros(shape, dtype=bool)
    first = predictor.predict_model_box(z, first_box)
    out[z] = first.mask
    records = [SliceRecord(z, int(first.mask.sum()), first.score, True, "start")]
    reasons: Dict[str, str] = {}
    done = 1
    report(progress, done, total, f"slice {z}")

    for name, seq in passes:
        previous = first.mask
        reasons[name] = "reached the end of the z-range" if z_range is not None else "reached the volume's edge"
        for i, zz in enumerate(seq):
            check_cancel(cancel)
            if not predictor.is_encoded(zz):
                # Encode ahead in the pass direction, a batch at a time.
                predictor.encode(seq[i : i + predictor.batch_size], cancel=cancel)
            box_m = mask_box_in_model(previous, predictor.prepared(zz), margin)
            result = predictor.predict_model_box(zz, first_box if box_m is None else box_m)
            reason = rule.check(previous, result) if z_range is None else None
            records.append(SliceRecord(zz, int(result.mask.sum()), result.score, reason is None, reason or ""))
            done += 1
            if reason is not None:
                reasons[name] = f"stopped at slice {zz}: {reason}"
                break
            out[zz] = result.mask
            previous = result.mask
            report(progress, done, total, f"slice {zz} ({name})")
    check_cancel(cancel)
    report(progress, total, total, "done")
    zs = np.nonzero(out.any(axis=(1, 2)))[0]
    extent = (int(zs.min()), int(zs.max())) if zs.size else None
    return PropagationResult(mask=out, z_extent=extent, stop_reasons=reasons, slices=records)


def propagate_box3d(
    predictor: Predictor,
    box3d: Sequence[float],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    margin: Optional[float] = None,
) -> PropagationResult:
    """LiteMedSAM's 3D-box inference: ``(x0, y0, z0, x1, y1, z1)`` (inclusive voxel indices).

    The 2D box goes on ``z_mid = int((z1 - z0) / 2 + z0)`` and the propagation stays within
    ``z0..z1``. A box with ``z0 == z1`` is a 2D box on that slice.
    """
    b = [float(v) for v in box3d]
    if len(b) != 6:
        raise MedSAMError(f"a 3D box needs six numbers x0 y0 z0 x1 y1 z1; got {len(b)}")
    x0, y0, z0, x1, y1, z1 = b
    z0, z1 = sorted((int(round(z0)), int(round(z1))))
    z_mid = int((z1 - z0) / 2 + z0)
    return propagate(
        predictor, z_mid, (x0, y0, x1, y1), z_range=(z0, z1), progress=progress, cancel=cancel, margin=margin
    )
