"""3D propagation from one 2D box, slice by slice, up and down.

As LiteMedSAM's 3D inference (``CVPR24_LiteMedSAM_infer.py``): each slice is prompted with the
bounding box of the previous slice's mask, grown by a margin (3 px at 256 input); an empty
previous mask falls back to the first box. With a z-range (a 3D box) the range alone bounds the
propagation, exactly as the original.

One addition of ours (``wider_box``, on by default): each slice is also prompted with that box
grown by 6 px more, and the wider box's mask is kept when the decoder is more confident in it
(predicted IoU higher by ``0.02``) and it contains the first mask (an extension of the same
structure, not a jump to a neighbour). With only the original's 3 px margin a structure that moves or
grows between slices is clipped by the box and the masks shrink slice after slice (on the shipped
CT the spleen falls from Dice 0.95 to 0.79). ``wider_box=0`` reproduces the original exactly.

Without a z-range the structure's extent is ours to find: MedSAM was trained on non-empty slices
only and always outputs *something* (MedSAM issue #136), so a stop rule decides where the
structure ends. :class:`StopRule` documents the rule and its defaults, which were measured on the
real CT shipped in ``Testing/Data`` (see docs/evaluation.md, "The stop rule, measured").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..boxes import DIRECTIONS
from ..boxes import middle_slice as box3d_middle_slice
from ..errors import MedSAMError
from ..models.allocator import reuse_freed_memory
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from .predictor import Predictor, SliceResult
from .preprocessing import box_to_model, check_box, mask_box_in_model
from .results import PropagationResult, SliceRecord  # noqa: F401  (their home is results.py, torch-free)

INTENSITY_SCALES = ("grey", "spread")
WIDER_BOX_WHEN = ("always", "touching")


@dataclass(frozen=True)
class StopRule:
    """When automatic propagation decides that the structure has ended.

    Going from one slice to the next, the new mask is rejected and the pass stops when any of:

    - it is empty (fewer than ``min_pixels`` pixels);
    - **its intensity changed**: the median of the windowed image (0-255) under the new mask
      differs by more than ``max_intensity_shift`` from the median of the medians of the slices
      accepted so far. When an organ ends, MedSAM moves to a neighbour inside the box (fat, bowel,
      another organ), which nearly always looks different; 25 grey levels are ~40 HU with the
      abdomen window (L40/W400). With ``intensity_scale="spread"`` the threshold is instead in
      units of the structure's own spread (the interquartile range under the first mask, at
      least ``min_spread`` grey levels), the same meaning under any window; measured with
      ``medsam-slicer evaluate`` it let the CT liver drift (docs/decisions.md), so grey levels
      stay the default;
    - it has shrunk below ``min_area_fraction`` (15%) of the largest accepted slice: below that a
      box prompt no longer holds the model on the tapering tip, and it drifts to a neighbour of
      similar intensity (the liver's lower tip on the shipped CT: 22 slices of drift at 5%);
    - it overlaps the previous slice's mask too little: less than ``min_overlap`` of the new mask
      lies inside the previous mask grown by ``grow_px`` pixels;
    - the decoder's own predicted IoU is below ``min_score``;
    - only on a pass that extends a structure from a correction at its tip (the known structure is
      larger than the corrected slice, :mod:`~MedSAMSlicerLib.segmentation.corrections`): its area grows past
      ``tip_growth`` times the smallest slice of the pass plus ``tip_slack_px`` pixels. A tip
      narrows toward its end; a mask that widens again has moved onto a neighbour (the liver's
      lower tip on the shipped CT, corrected at its last found slice, went on over 33 slices of
      bowel at a similar intensity without this rule).

    The defaults were chosen on the real CT shipped in ``Testing/Data`` by simulating each rule on
    unbounded propagations of nine structures (docs/evaluation.md, "The stop rule, measured"). ``max_slices`` bounds
    a pass in any case.
    """

    min_pixels: int = 4
    max_intensity_shift: float = 25.0
    intensity_scale: str = "grey"
    min_spread: float = 4.0
    min_area_fraction: float = 0.15
    min_overlap: float = 0.6
    grow_px: int = 2
    min_score: float = 0.5
    max_slices: int = 10_000
    tip_growth: float = 1.5
    tip_slack_px: int = 16

    def __post_init__(self) -> None:
        if self.intensity_scale not in INTENSITY_SCALES:
            raise MedSAMError(f"stop.intensity_scale is one of {', '.join(INTENSITY_SCALES)}; got '{self.intensity_scale}'")

    def check(self, previous: np.ndarray, current: SliceResult, image: np.ndarray, history: _PassHistory) -> Optional[str]:
        """Return why the pass stops at ``current`` (``None`` to go on).

        Args:
            previous: ``(H, W)`` mask accepted on the previous slice.
            current: the new slice's prediction.
            image: ``(H, W)`` windowed ``uint8`` slice under ``current``.
            history: intensity and area statistics of the slices accepted so far.
        """
        area = int(current.mask.sum())
        if area < self.min_pixels:
            return f"empty mask ({area} px)"
        median = float(np.median(image[current.mask]))
        shift = abs(median - history.reference_intensity)
        if self.intensity_scale == "spread":
            unit = max(history.spread, self.min_spread)
            if shift > self.max_intensity_shift * unit:
                return (f"intensity changed by {shift / unit:.1f} x the structure's spread ({unit:.0f} grey levels)"
                        f" > {self.max_intensity_shift:g}")
        elif shift > self.max_intensity_shift:
            return f"intensity changed by {shift:.0f} grey levels > {self.max_intensity_shift:g}"
        if area < self.min_area_fraction * history.max_area:
            return f"area {area} px < {self.min_area_fraction:g} of the largest slice ({history.max_area} px)"
        overlap = float((current.mask & _dilate(previous, self.grow_px)).sum()) / area
        if overlap < self.min_overlap:
            return f"overlap with previous slice {overlap:.2f} < {self.min_overlap:g}"
        if current.score < self.min_score:
            return f"predicted IoU {current.score:.2f} < {self.min_score:g}"
        if history.tip and area > self.tip_growth * history.min_area + self.tip_slack_px:
            return (f"area {area} px grows past {self.tip_growth:g} x the tip's smallest slice ({history.min_area} px)"
                    f" + {self.tip_slack_px} px")
        return None


@dataclass
class _PassHistory:
    """Running statistics of the slices a pass has accepted."""

    medians: List[float]
    max_area: int
    spread: float = 0.0  # interquartile range of the intensities under the first mask
    min_area: int = 0
    tip: bool = False  # a pass extending a structure from its tip (StopRule's tip rule applies)

    @classmethod
    def start(cls, mask: np.ndarray, image: np.ndarray) -> _PassHistory:
        if not mask.any():
            return cls([0.0], 0, 0.0)
        values = image[mask]
        q1, q3 = np.percentile(values, [25, 75])
        return cls([float(np.median(values))], int(mask.sum()), float(q3 - q1), int(mask.sum()))

    @property
    def reference_intensity(self) -> float:
        return float(np.median(self.medians))

    def accept(self, mask: np.ndarray, image: np.ndarray) -> None:
        self.medians.append(float(np.median(image[mask])))
        self.max_area = max(self.max_area, int(mask.sum()))
        self.min_area = min(self.min_area, int(mask.sum()))


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=px)


#: Pixels the previous slice's mask is grown by before :attr:`SliceRecord.overlap` is measured.
OVERLAP_GROW_PX = 2


def slice_record(z: int, result: SliceResult, image: np.ndarray, previous: Optional[np.ndarray] = None,
                 agreement: float = float("nan"), accepted: bool = True, reason: str = "") -> SliceRecord:
    """The :class:`SliceRecord` of ``result`` on slice ``z`` (``image``: the windowed ``(H, W)`` slice;
    ``previous``: the mask the prompt came from, ``None`` on a start slice)."""
    area = int(result.mask.sum())
    overlap = float("nan")
    if previous is not None and area:
        overlap = float((result.mask & _dilate(previous, OVERLAP_GROW_PX)).sum()) / area
    intensity = float(np.median(image[result.mask])) if area else float("nan")
    return SliceRecord(int(z), area, float(result.score), accepted, reason, float(agreement), overlap, intensity)


WIDER_BOX_PX = 6.0  # at 256 input
CONFIDENCE_GAIN = 0.02
REJOIN_DICE = 0.9


@dataclass(frozen=True)
class PropagationSettings:
    """Every choice 3D propagation makes, in one object (``medsam-slicer evaluate --set`` names
    these fields; ``stop.<field>`` names a :class:`StopRule` field).

    Attributes:
        margin: growth of each slice's box around the previous mask, in model-input pixels at
            256 input (``None``: LiteMedSAM's 3 px; scaled for MedSAM's 1024).
        wider_box: extra growth (px at 256 input) of a second prompt per slice, kept when the
            decoder is more confident in it by ``confidence_gain`` and it contains the first
            mask; 0 reproduces LiteMedSAM's 3D inference exactly.
        confidence_gain: how much higher the wider box's predicted IoU must be.
        wider_box_relative: the wider box also grows by this fraction of the box's longer side on
            each side (0: by ``wider_box`` pixels only).
        auto_stop: apply ``stop`` without a z-range; ``False`` runs to the volume's edges, as
            LiteMedSAM's own algorithm does when it is given no z-range.
        stop: the :class:`StopRule`.
        wider_box_when: ``"always"`` tries the wider box on every slice; ``"touching"`` only when
            the first mask reaches the edge of its box (within 1.5 px at 256 input), the case
            the wider box exists for (a structure clipped by a box that follows it too tightly).
        follow_parts: when the previous slice's mask has split into parts (connected pieces of
            at least ``part_min_fraction`` of the largest piece and ``part_min_px`` pixels at 256
            input), prompt each part with its own box and join the masks; parts whose boxes
            overlap are prompted together (they are meeting).
        wider_max_growth: > 0 keeps the wider box's mask only when it is at most this fraction
            larger than the first mask (0: no limit).
        box_jitter: > 0 averages each prompt's logits over the box and four copies grown,
            shrunk and shifted by this many pixels at 256 input (:meth:`Predictor.predict_model_box`).
        zoom_below: > 0: when the box's longer side is below this many pixels at the model's
            input, work on a square crop of every slice around the box instead of the whole slice
            (``zoom_context`` times the box's longer side, at least 8 px, kept inside the slice),
            so the model sees the structure larger; each slice of the crop is encoded for this
            structure alone. 0: off.
        zoom_enlarge: let the zoomed crop be smaller than the model's input (it is then enlarged);
            ``False``: the crop is at least the input size in slice pixels, so only slices larger
            than the input are zoomed, to their own resolution (see :func:`zoom_region`).
        rejoin: a correction's pass (:func:`~MedSAMSlicerLib.segmentation.corrections.correct`) ends on the
            first slice whose new mask has at least this Dice with the result before the
            correction: from there on the result was already what the correction leads to, and
            the slices beyond keep their masks. 0: every pass runs to its end.
        wider_first: the start slice of a propagation also gets the wider second prompt around
            the user's box, by the same rule as every later slice; ``False`` (default): the user's
            box alone. Measured with ``evaluate`` (mixed, not adopted); the queue of several
            structures and box corrections always start from the user's box alone.
        key_corridor: between two slices the user drew boxes on (key slices, or box corrections),
            each slice's prompt is kept inside the two boxes interpolated and grown on each side by
            this fraction of their longer side; a pass that leaves it restarts from it
            (:func:`clip_box`). 0: off.
    """

    margin: Optional[float] = None
    wider_box: float = WIDER_BOX_PX
    confidence_gain: float = CONFIDENCE_GAIN
    wider_box_relative: float = 0.0
    auto_stop: bool = True
    stop: StopRule = field(default_factory=StopRule)
    wider_box_when: str = "always"
    follow_parts: bool = False
    part_min_fraction: float = 0.2
    part_min_px: float = 16.0
    box_jitter: float = 0.0
    wider_max_growth: float = 0.0
    zoom_below: float = 0.0
    zoom_context: float = 3.0
    zoom_enlarge: bool = False
    rejoin: float = REJOIN_DICE
    wider_first: bool = False
    key_corridor: float = 0.0

    def __post_init__(self) -> None:
        if self.wider_box_when not in WIDER_BOX_WHEN:
            raise MedSAMError(f"wider_box_when is one of {', '.join(WIDER_BOX_WHEN)}; got '{self.wider_box_when}'")

    @classmethod
    def original(cls) -> PropagationSettings:
        """LiteMedSAM's own 3D algorithm (``CVPR24_LiteMedSAM_infer.py``): 3 px margin, one box
        per slice, never stops early (only a z-range bounds it)."""
        return cls(wider_box=0.0, auto_stop=False)


def _extends(wide: np.ndarray, narrow: np.ndarray, fraction: float = 0.9) -> bool:
    """Whether ``wide`` keeps (nearly) all of ``narrow``: the same structure, not a neighbour."""
    area = int(narrow.sum())
    return area == 0 or int((wide & narrow).sum()) >= fraction * area


def _grown(box_m: np.ndarray, grow: float, size: float) -> np.ndarray:
    """``box_m`` (model pixels) grown by ``grow`` on each side, kept inside the model input."""
    return np.array([max(0.0, box_m[0] - grow), max(0.0, box_m[1] - grow),
                     min(size, box_m[2] + grow), min(size, box_m[3] + grow)])


def _choose_wider(narrow: SliceResult, wide: Optional[SliceResult], settings: PropagationSettings) -> SliceResult:
    """The wider-box rule: keep the wider box's mask when the decoder is more confident in it by
    ``confidence_gain`` and it contains the first mask (and, with ``wider_max_growth``, is not too
    much larger)."""
    if wide is None:
        return narrow
    if wide.score > narrow.score + settings.confidence_gain and _extends(wide.mask, narrow.mask):
        if settings.wider_max_growth > 0 and wide.mask.sum() > (1 + settings.wider_max_growth) * max(
                1, int(narrow.mask.sum())):
            return narrow
        return wide
    return narrow


def _agreement(narrow: SliceResult, wide: Optional[SliceResult]) -> float:
    """Dice between the masks of the narrow and the wider box (NaN without a wider box): where they
    disagree, the mask depends on where exactly the box edges fall."""
    if wide is None:
        return float("nan")
    a, b = int(narrow.mask.sum()), int(wide.mask.sum())
    return 1.0 if a + b == 0 else 2.0 * int((narrow.mask & wide.mask).sum()) / (a + b)


def _predict_boxes(
    predictor: Predictor, z: int, boxes: Sequence[np.ndarray], wider_box: float, settings: PropagationSettings
) -> List[Tuple[SliceResult, float]]:
    """Each box on slice ``z`` (model pixels), with the wider second prompt where it applies; all
    boxes go to the decoder together (:meth:`Predictor.decode_boxes`). Returns per box the chosen
    result and the narrow/wide :func:`_agreement`."""
    jitter = settings.box_jitter * predictor.input_size / 256.0
    boxes = [np.asarray(b, dtype=float) for b in boxes]
    if not boxes:
        return []
    if wider_box <= 0:
        return [(r, float("nan")) for r in predictor.decode_boxes(z, boxes, jitter)]
    grow = wider_box * predictor.input_size / 256.0
    size = float(predictor.input_size)
    n = len(boxes)
    wides: List[Optional[SliceResult]]
    def wider(b: np.ndarray) -> np.ndarray:
        # wider_box_relative: the extra growth also scales with the box (a large organ grows by more px).
        return _grown(b, grow + settings.wider_box_relative * float(max(b[2] - b[0], b[3] - b[1])), size)

    if settings.wider_box_when == "always":
        both = predictor.decode_boxes(z, boxes + [wider(b) for b in boxes], jitter)
        narrow, wides = both[:n], list(both[n:])
    else:  # "touching": the wider box only where the first mask reaches its box
        narrow = predictor.decode_boxes(z, boxes, jitter)
        need = [i for i, r in enumerate(narrow) if _touches_box(r, predictor, z)]
        decoded = predictor.decode_boxes(z, [wider(boxes[i]) for i in need], jitter)
        wides = [None] * n
        for i, r in zip(need, decoded):
            wides[i] = r
    return [(_choose_wider(a, b, settings), _agreement(a, b)) for a, b in zip(narrow, wides)]


def _touches_box(result: SliceResult, predictor: Predictor, z: int) -> bool:
    """Whether the mask reaches (within 1.5 px at 256 input) a side of its box inside the image."""
    if not result.mask.any():
        return False
    prepared = predictor.prepared(z)
    tight = mask_box_in_model(result.mask, prepared, 0.0)
    if tight is None:
        return False
    tol = 1.5 * predictor.input_size / 256.0
    box = result.box_model
    limit_x, limit_y = prepared.resized_hw[1], prepared.resized_hw[0]
    near = [tight[0] - box[0] <= tol and box[0] > 0, tight[1] - box[1] <= tol and box[1] > 0,
            box[2] - tight[2] <= tol and box[2] < limit_x, box[3] - tight[3] <= tol and box[3] < limit_y]
    return any(near)


def _part_boxes(
    previous: np.ndarray, predictor: Predictor, z: int, margin: float, settings: PropagationSettings
) -> Optional[List[np.ndarray]]:
    """One box (model pixels) per part of ``previous`` when it has split, else ``None``."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(previous, structure=np.ones((3, 3), bool))
    if n < 2:
        return None
    prepared = predictor.prepared(z)
    areas = np.bincount(labels.ravel())[1:]
    scale = prepared.box_scale[0] * prepared.box_scale[1]
    keep = [i + 1 for i, a in enumerate(areas)
            if a >= settings.part_min_fraction * areas.max() and a * scale >= settings.part_min_px]
    boxes = [b for b in (mask_box_in_model(labels == i, prepared, margin) for i in keep) if b is not None]
    # Parts whose boxes overlap are meeting: one box for them.
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]:
                    boxes[i] = np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes if len(boxes) > 1 else None


def join_pieces(results: Sequence[SliceResult]) -> SliceResult:
    """One slice's result from the results of several boxes (the pieces of one structure): the
    masks and logits joined, the predicted IoU weighted by each piece's area, the box their union."""
    if len(results) == 1:
        return results[0]
    mask = np.logical_or.reduce([r.mask for r in results])
    areas = np.array([max(1, int(r.mask.sum())) for r in results], dtype=float)
    score = float(np.dot(areas, [r.score for r in results]) / areas.sum())
    boxes = [r.box_model for r in results]
    union = np.array([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                      max(b[3] for b in boxes)])
    logits = np.maximum.reduce([r.logits for r in results]) if all(r.logits is not None for r in results) else None
    return SliceResult(mask=mask, score=score, box_model=union, logits=logits)


def clip_box(box_m: np.ndarray, limit: Optional[np.ndarray]) -> np.ndarray:
    """``box_m`` kept inside ``limit`` (both model pixels ``(x0, y0, x1, y1)``); where they do not
    meet, ``limit`` itself (a pass that left its corridor restarts from it)."""
    if limit is None:
        return box_m
    clipped = np.array([max(box_m[0], limit[0]), max(box_m[1], limit[1]), min(box_m[2], limit[2]),
                        min(box_m[3], limit[3])])
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        return np.asarray(limit, dtype=float)
    return clipped


def _predict_many(
    predictor: Predictor,
    z: int,
    requests: Sequence[Tuple],
    margin: float,
    wider_box: float,
    settings: PropagationSettings,
) -> List[Tuple[SliceResult, float]]:
    """Slice ``z`` for several passes at once, each ``(previous mask, first box[, limit])``: each
    prompted from its previous slice's mask (LiteMedSAM's rule, plus our options), its box kept
    inside ``limit`` when given (:func:`clip_box`, model pixels), all boxes of the slice decoded
    together. Returns per request the result and the narrow/wide agreement."""
    prepared = predictor.prepared(z)
    per_request: List[List[np.ndarray]] = []
    for request in requests:
        previous, first_box = request[0], request[1]
        limit = request[2] if len(request) > 2 else None
        boxes = _part_boxes(previous, predictor, z, margin, settings) if settings.follow_parts else None
        if boxes is None:
            box_m = mask_box_in_model(previous, prepared, margin)
            boxes = [first_box if box_m is None else box_m]
        per_request.append([clip_box(b, limit) for b in boxes])
    flat = _predict_boxes(predictor, z, [b for boxes in per_request for b in boxes], wider_box, settings)
    out: List[Tuple[SliceResult, float]] = []
    i = 0
    for boxes in per_request:
        parts = flat[i : i + len(boxes)]
        i += len(boxes)
        if len(parts) == 1:
            out.append(parts[0])
            continue
        agreement = float(np.nanmin([a for _, a in parts])) if any(np.isfinite(a) for _, a in parts) else float("nan")
        out.append((join_pieces([r for r, _ in parts]), agreement))
    return out


def _predict_next(
    predictor: Predictor,
    z: int,
    previous: np.ndarray,
    first_box: np.ndarray,
    margin: float,
    wider_box: float,
    settings: PropagationSettings,
) -> Tuple[SliceResult, float]:
    """Slice ``z`` prompted from the previous slice's mask (:func:`_predict_many` for one pass)."""
    return _predict_many(predictor, z, [(previous, first_box)], margin, wider_box, settings)[0]


def _default_margin(predictor: Predictor) -> float:
    # 3 px at LiteMedSAM's 256 input; the same physical fraction for MedSAM's 1024.
    return 3.0 * predictor.input_size / 256.0


def resolve_margins(predictor: Predictor, settings: PropagationSettings) -> Tuple[float, float]:
    """``(margin, wider_box)`` as the walk uses them: the margin in model-input pixels (LiteMedSAM's
    3 px at 256 input by default), the wider box in pixels at 256 input."""
    scale = predictor.input_size / 256.0
    margin = _default_margin(predictor) if settings.margin is None else float(settings.margin) * scale
    return float(margin), float(settings.wider_box)


def check_prompt(predictor: Predictor, z: int, box: Sequence[float],
                 z_range: Optional[Tuple[int, int]] = None) -> Tuple[int, np.ndarray, Tuple[int, int]]:
    """Check a box prompt against the volume: ``(z, first box in model pixels, (lo, hi))``, where
    ``lo..hi`` is the z-range or the whole volume.

    Raises:
        MedSAMError: the slice, the box or the z-range does not fit the volume.
    """
    depth = predictor.depth
    z = predictor.check_slice_index(z)
    lo, hi = 0, depth - 1
    if z_range is not None:
        lo, hi = sorted(int(v) for v in z_range)
        if lo < 0 or hi >= depth:
            raise MedSAMError(f"z-range {lo}..{hi} is outside the volume's slices 0..{depth - 1}")
        if not lo <= z <= hi:
            raise MedSAMError(f"the box's slice {z} is outside its z-range {lo}..{hi}")
    prepared = predictor.prepared(z)
    return z, box_to_model(check_box(box, prepared.original_hw), prepared), (lo, hi)


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
    wider_box: Optional[float] = None,
    settings: Optional[PropagationSettings] = None,
) -> PropagationResult:
    """Segment a structure in 3D from a 2D box on slice ``z``.

    Args:
        predictor: a :class:`Predictor` with the volume set.
        z: the slice the box is drawn on.
        box: ``(x0, y0, x1, y1)`` in that slice's pixel indices (inclusive).
        z_range: inclusive ``(z_min, z_max)`` that bounds the propagation (a 3D box); ``None``
            finds the extent with ``stop``.
        direction: ``"both"``, ``"up"`` (increasing z, toward superior) or ``"down"``.
        stop: the :class:`StopRule` for automatic extent (overrides ``settings.stop``).
        margin: box growth in model-input pixels (overrides ``settings.margin``).
        wider_box: extra growth of a second prompt (overrides ``settings.wider_box``).
        progress: ``progress(done, total, message)``.
        cancel: a :class:`CancelToken`; cancelling raises :class:`Cancelled` between slices.
        settings: :class:`PropagationSettings` (defaults when ``None``).

    Returns:
        A :class:`PropagationResult`; its mask is ``(z, y, x)`` like the volume.
    """
    runs = _zoomed(predictor, z, box, z_range, direction, stop, margin, progress, cancel, wider_box, settings,
                   modes=("range",) if z_range is not None else ("auto",))
    return runs["range"] if z_range is not None else runs["auto"]


def propagate_both(
    predictor: Predictor,
    z: int,
    box: Sequence[float],
    z_range: Tuple[int, int],
    direction: str = "both",
    settings: Optional[PropagationSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Tuple[PropagationResult, PropagationResult]:
    """``(propagate(..., z_range=z_range), propagate(..., z_range=None))`` from one walk per direction.

    Each slice's prompt depends only on the previous slice's mask, and the stop rule only
    truncates, so the two runs predict the same slices until one of them ends; the walk goes on
    until both have (the evaluation's "3d" and "2d" modes at the cost of the longer one). The
    results are exactly those of the two separate calls.
    """
    runs = _zoomed(predictor, z, box, z_range, direction, None, None, progress, cancel, None, settings,
                   modes=("range", "auto"))
    return runs["range"], runs["auto"]


def zoom_region(
    predictor: Predictor, z: int, box: Sequence[float], settings: PropagationSettings
) -> Optional[Tuple[int, int, int, int]]:
    """The crop ``(y0, y1, x0, x1)`` :attr:`PropagationSettings.zoom_below` asks for, or ``None``.

    The rule: the box's longer side, in model-input pixels at 256 input, below ``zoom_below``;
    then a square of ``zoom_context`` times that side (in slice pixels, at least 8) centred on the
    box, moved inside the slice (smaller only when the slice is). Unless ``zoom_enlarge``, the
    square is at least the model's input size in slice pixels, so that the crop is never enlarged
    (the model sees the slice's own pixels, at most): a slice no larger than the input is not zoomed.
    """
    if settings.zoom_below <= 0:
        return None
    prepared = predictor.prepared(z)
    b = check_box(box, prepared.original_hw)
    side = max(b[2] - b[0] + 1, b[3] - b[1] + 1)
    if side * prepared.box_scale[0] * 256.0 / predictor.input_size >= settings.zoom_below:
        return None
    h, w = prepared.original_hw
    size = max(8, round(side * settings.zoom_context))
    if not settings.zoom_enlarge:
        size = max(size, predictor.input_size)
        if size >= h and size >= w:
            return None  # the crop would be the whole slice
    size = int(min(size, h, w))
    cy, cx = (b[1] + b[3]) / 2.0, (b[0] + b[2]) / 2.0
    y0 = int(min(max(0, round(cy - size / 2.0)), h - size))
    x0 = int(min(max(0, round(cx - size / 2.0)), w - size))
    return y0, y0 + size, x0, x0 + size


def _zoomed(predictor: Predictor, z: int, box: Sequence[float], z_range, direction, stop, margin, progress, cancel,
            wider_box, settings: Optional[PropagationSettings], modes: Sequence[str]) -> Dict[str, PropagationResult]:
    """:func:`_propagate`, on a crop around the box when the zoom rule applies (masks pasted back)."""
    settings = settings or PropagationSettings()
    region = zoom_region(predictor, predictor.check_slice_index(z), box, settings)
    if region is None:
        return _propagate(predictor, z, box, z_range, direction, stop, margin, progress, cancel, wider_box, settings,
                          modes)
    y0, y1, x0, x1 = region
    sub = predictor.crop(y0, y1, x0, x1)
    shifted = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    runs = _propagate(sub, z, shifted, z_range, direction, stop, margin, progress, cancel, wider_box, settings, modes)
    for result in runs.values():
        full = np.zeros(predictor.volume.shape, dtype=bool)
        full[:, y0:y1, x0:x1] = result.mask
        result.mask = full
        result.stop_reasons = {k: f"{v} (zoomed on x {x0}..{x1 - 1}, y {y0}..{y1 - 1})" for k, v in
                               result.stop_reasons.items()}
    return runs


def _propagate(
    predictor: Predictor,
    z: int,
    box: Sequence[float],
    z_range: Optional[Tuple[int, int]],
    direction: str,
    stop: Optional[StopRule],
    margin: Optional[float],
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelToken],
    wider_box: Optional[float],
    settings: Optional[PropagationSettings],
    modes: Sequence[str],
) -> Dict[str, PropagationResult]:
    """The walk behind :func:`propagate` and :func:`propagate_both`: ``"range"`` bounded by
    ``z_range``, ``"auto"`` ended by the stop rule (or the volume's edges without ``auto_stop``)."""
    if direction not in DIRECTIONS:
        raise MedSAMError(f"unknown direction '{direction}'; choose one of: {', '.join(DIRECTIONS)}")
    depth = predictor.depth
    z, first_box, (lo, hi) = check_prompt(predictor, z, box, z_range)
    settings = settings or PropagationSettings()
    rule = stop or settings.stop
    default_margin, default_wider = resolve_margins(predictor, settings)
    margin = default_margin if margin is None else float(margin)
    wider_box = default_wider if wider_box is None else float(wider_box)
    want_range, want_auto = "range" in modes, "auto" in modes
    auto_stop = want_auto and settings.auto_stop
    passes: List[Tuple[str, List[int]]] = []
    if direction in ("both", "up"):
        passes.append(("up", list(range(z + 1, depth))))
    if direction in ("both", "down"):
        passes.append(("down", list(range(z - 1, -1, -1))))

    def reach(seq: List[int]) -> int:
        # Slices a pass may predict: within the range, and up to max_slices for the stop rule.
        n_range = sum(1 for v in seq if lo <= v <= hi) if want_range else 0
        n_auto = (min(len(seq), rule.max_slices) if auto_stop else len(seq)) if want_auto else 0
        return max(n_range, n_auto)

    total = 1 + sum(reach(seq) for _, seq in passes)

    # One allocator scope for the whole run: each slice reuses the previous slice's freed buffers.
    with reuse_freed_memory():
        check_cancel(cancel)
        shape = predictor.volume.shape
        if settings.wider_first:
            first = _predict_boxes(predictor, z, [first_box], wider_box, settings)[0][0]
        else:
            first = predictor.predict_model_box(z, first_box, settings.box_jitter * predictor.input_size / 256.0)
        outs = {m: np.zeros(shape, dtype=bool) for m in modes}
        records: Dict[str, List[SliceRecord]] = {}
        reasons: Dict[str, Dict[str, str]] = {m: {} for m in modes}
        start_record = slice_record(z, first, predictor.volume[z], reason="start")
        for m in modes:
            outs[m][z] = first.mask
            records[m] = [start_record]
        done = 1
        report(progress, done, total, f"slice {z}")

        volume = predictor.volume
        for name, seq in passes:
            previous = first.mask
            history = _PassHistory.start(first.mask, volume[z])
            if want_range:
                reasons["range"][name] = "reached the end of the z-range"
            if want_auto:
                reasons["auto"][name] = "reached the volume's edge"
            range_on, auto_on = want_range, want_auto
            for i, zz in enumerate(seq):
                range_on = range_on and lo <= zz <= hi
                if auto_stop and i >= rule.max_slices:
                    auto_on = False
                if not (range_on or auto_on):
                    break
                check_cancel(cancel)
                if not predictor.is_encoded(zz):
                    # Encode ahead in the pass direction, a batch at a time.
                    predictor.encode(seq[i : i + predictor.batch_size], cancel=cancel)
                result, agreement = _predict_next(predictor, zz, previous, first_box, margin, wider_box, settings)
                record = slice_record(zz, result, volume[zz], previous, agreement)
                if range_on:
                    outs["range"][zz] = result.mask
                    records["range"].append(record)
                if auto_on:
                    reason = rule.check(previous, result, volume[zz], history) if auto_stop else None
                    records["auto"].append(dataclasses.replace(record, accepted=reason is None, reason=reason or ""))
                    if reason is not None:
                        reasons["auto"][name] = f"stopped at slice {zz}: {reason}"
                        auto_on = False
                    else:
                        outs["auto"][zz] = result.mask
                        if result.mask.any():
                            history.accept(result.mask, volume[zz])
                previous = result.mask
                done += 1
                report(progress, done, total, f"slice {zz} ({name})")
        check_cancel(cancel)
        report(progress, total, total, "done")
        results = {}
        for m in modes:
            zs = np.nonzero(outs[m].any(axis=(1, 2)))[0]
            extent = (int(zs.min()), int(zs.max())) if zs.size else None
            results[m] = PropagationResult(mask=outs[m], z_extent=extent, stop_reasons=reasons[m], slices=records[m],
                                           locked=(z,))
        return results


def propagate_box3d(
    predictor: Predictor,
    box3d: Sequence[float],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    margin: Optional[float] = None,
    wider_box: Optional[float] = None,
    settings: Optional[PropagationSettings] = None,
) -> PropagationResult:
    """LiteMedSAM's 3D-box inference: ``(x0, y0, z0, x1, y1, z1)`` (inclusive voxel indices).

    The 2D box goes on ``z_mid = int((z1 - z0) / 2 + z0)`` and the propagation stays within
    ``z0..z1``. A box with ``z0 == z1`` is a 2D box on that slice. ``wider_box=0`` gives the
    original algorithm exactly (the benchmark compares against it).
    """
    z_mid, box, z_range = split_box3d(box3d)
    return propagate(
        predictor, z_mid, box, z_range=z_range, progress=progress, cancel=cancel, margin=margin,
        wider_box=wider_box, settings=settings,
    )


def split_box3d(box3d: Sequence[float]) -> Tuple[int, Tuple[float, float, float, float], Tuple[int, int]]:
    """A 3D box ``(x0, y0, z0, x1, y1, z1)`` as LiteMedSAM's 3D inference prompts it:
    ``(z_mid, (x0, y0, x1, y1), (z0, z1))`` with ``z_mid`` from :func:`~MedSAMSlicerLib.boxes.middle_slice`."""
    b = [float(v) for v in box3d]
    if len(b) != 6:
        raise MedSAMError(f"a 3D box needs six numbers x0 y0 z0 x1 y1 z1; got {len(b)}")
    x0, y0, z0, x1, y1, z1 = b
    z0, z1 = sorted((int(round(z0)), int(round(z1))))
    return box3d_middle_slice(z0, z1), (x0, y0, x1, y1), (z0, z1)
