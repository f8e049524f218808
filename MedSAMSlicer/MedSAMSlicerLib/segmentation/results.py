"""The results of the engine as plain data (numpy only, no torch): what a segmentation gives,
slice by slice, and what a user corrects.

They live here, apart from the code that computes them, so that a front end that does not run
the model (the Slicer bridge in Remote mode, :mod:`MedSAMSlicerLib.remote.client`) holds the very
same objects as one that does. Their old homes re-export them: ``propagation.SliceRecord``,
``propagation.PropagationResult``, ``corrections.Correction``, ``segmenter.Segmentation``,
``structures.StructuresResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError


@dataclass
class SliceRecord:
    """What happened on one slice during propagation (for reports, tuning and the review of
    doubtful slices, :mod:`~MedSAMSlicerLib.segmentation.review`).

    Attributes:
        z: the slice.
        area: pixels of its mask.
        score: the decoder's predicted IoU.
        accepted: kept in the result (``False``: the stop rule rejected it, see ``reason``).
        reason: why it was rejected, or how a start slice was made (``"start"``: the user's box,
            ``"box"``/``"accepted"``: a correction).
        agreement: Dice between the masks of the narrow and the wider box (NaN: no wider box).
        overlap: fraction of the mask inside the previous slice's mask grown by 2 px (NaN on a
            start slice).
        intensity: median of the windowed image (0-255) under the mask (NaN when empty).
    """

    z: int
    area: int
    score: float
    accepted: bool
    reason: str = ""
    agreement: float = float("nan")
    overlap: float = float("nan")
    intensity: float = float("nan")



@dataclass(frozen=True)
class Conditioning:
    """One prompt in SAM 2's memory (MedSAM2, :mod:`~MedSAMSlicerLib.segmentation.medsam2`): a box
    ``(x0, y0, x1, y1)`` (slice pixels, inclusive) on slice ``z``, or, with ``box=None``, the
    slice's mask as given (a slice accepted as it is)."""

    z: int
    box: Optional[Tuple[float, float, float, float]] = None


@dataclass
class PropagationResult:
    """A 3D result.

    Attributes:
        mask: ``(z, y, x)`` boolean mask of the whole volume.
        z_extent: ``(z_first, z_last)`` of the non-empty slices, or ``None`` if empty.
        stop_reasons: per direction (``"up"``/``"down"``), why the pass ended; after a
            correction also per span between two locked slices (``"between 41..59"``).
        slices: one :class:`SliceRecord` per predicted slice, in prediction order.
        locked: the slices the user drew a box on or accepted, sorted: a correction
            (:func:`~MedSAMSlicerLib.segmentation.corrections.correct`) never changes them.
        prompts: a memory-propagation model's (MedSAM2's) conditioning prompts, each a
            :class:`Conditioning` (a box or an accepted slice): what a
            correction adds to (:meth:`~MedSAMSlicerLib.segmentation.medsam2.MedSAM2Engine.correct`); empty for
            box propagation.
    """

    mask: np.ndarray
    z_extent: Optional[Tuple[int, int]]
    stop_reasons: Dict[str, str] = field(default_factory=dict)
    slices: List[SliceRecord] = field(default_factory=list)
    locked: Tuple[int, ...] = ()
    prompts: Tuple = ()



@dataclass(frozen=True)
class Correction:
    """One slice the user fixed.

    Attributes:
        z: the slice.
        box: ``(x0, y0, x1, y1)`` in that slice's pixel indices (inclusive): the model segments the
            slice from this box. ``None``: the slice of the given mask is accepted as it is (the
            user edited it and marked it good; an empty slice says the structure is not there).
        more: further boxes on the same slice for other pieces of the same structure (two iliac
            arteries, bowel loops): each piece is segmented from its own box and followed by its
            own pass, the masks joined (:mod:`~MedSAMSlicerLib.segmentation.corrections`).
    """

    z: int
    box: Optional[Tuple[float, float, float, float]] = None
    more: Tuple[Tuple[float, float, float, float], ...] = ()

    @classmethod
    def with_box(cls, z: int, box: Sequence[float]) -> Correction:
        """A new box on slice ``z``."""
        return cls(int(z), tuple(float(v) for v in box))  # type: ignore[arg-type]

    @classmethod
    def with_boxes(cls, z: int, boxes: Sequence[Sequence[float]]) -> Correction:
        """New boxes on slice ``z``, one per piece of the structure there (at least one)."""
        if not boxes:
            raise MedSAMError(f"slice {int(z)}: give at least one box")
        first, *rest = [tuple(float(v) for v in b) for b in boxes]
        return cls(int(z), first, tuple(rest))  # type: ignore[arg-type]

    @classmethod
    def accept(cls, z: int) -> Correction:
        """Slice ``z`` of the mask, as it is, marked good."""
        return cls(int(z))

    @property
    def boxes(self) -> Tuple[Tuple[float, float, float, float], ...]:
        """Every box on the slice (``()`` for an accepted slice)."""
        return () if self.box is None else (self.box,) + tuple(self.more)

def check_corrections(corrections: Sequence[Correction], mask_shape: Sequence[int],
                      volume_shape: Sequence[int]) -> None:
    """What every model's corrections ask of a job: the current mask ``(z, y, x)`` has the
    volume's shape, and there is at least one correction and at most one per slice. Raises
    :class:`~MedSAMSlicerLib.errors.MedSAMError` otherwise."""
    if tuple(mask_shape) != tuple(volume_shape):
        raise MedSAMError(f"the mask has shape {tuple(mask_shape)} but the volume is {tuple(volume_shape)} (z, y, x)")
    if not corrections:
        raise MedSAMError("give at least one correction: a box on a slice, or a slice marked good")
    zs = [c.z for c in corrections]
    repeated = sorted({z for z in zs if zs.count(z) > 1})
    if repeated:
        raise MedSAMError(f"one correction per slice; slice {repeated[0]} has {zs.count(repeated[0])}")


@dataclass
class Segmentation:
    """What one prompt gave, in the whole volume (:meth:`Segmenter.segment`).

    Attributes:
        prompt: the :class:`~MedSAMSlicerLib.boxes.BoxPrompt`.
        mode: ``"3d"`` or ``"2d"``.
        mask: ``(z, y, x)`` bool, the volume's shape.
        covered: the slices the model segmented and accepted (``"2d"``: the box's slice).
        score: the decoder's predicted IoU on the box's slice.
        stop_reasons: ``"3d"`` without a z-range: why each direction's pass ended.
        result: the :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` (``"3d"``), with the
            per-slice records; ``None`` for ``"2d"``.
    """

    prompt: BoxPrompt
    mode: str
    mask: np.ndarray
    covered: List[int]
    score: float = float("nan")
    stop_reasons: Dict[str, str] = field(default_factory=dict)
    result: Optional[PropagationResult] = None



@dataclass
class StructuresResult:
    """A job of several structures.

    Attributes:
        results: per name, its :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` (masks with
            overlaps settled; ``locked`` is the box's slice).
        contested: ``(z, y, x)`` bool: voxels that two or more structures' masks held before the
            overlaps were settled (each now belongs to exactly one of them).
        encoded_slices: slices the job ran through the image encoder (0 when all were cached).
        decoded_boxes: boxes the job ran through the mask decoder.
    """

    results: Dict[str, PropagationResult]
    contested: np.ndarray
    encoded_slices: int = 0
    decoded_boxes: int = 0
    logits: Dict[str, Dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
