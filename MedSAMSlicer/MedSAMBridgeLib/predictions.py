"""What the bridge hands between the scene and the engine: a prediction request read from the
scene, and the engine's result on a source volume, not yet written to any segment.

Plain data (no MRML): :mod:`.MRMLBridge` makes and uses them, :mod:`.preview` shows a
:class:`Prediction`; both import them from here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.segmentation.provenance import Provenance
from MedSAMSlicerLib.segmentation.results import PropagationResult

from .sources import SourceVolume


@dataclass
class Prediction:
    """An engine result on a source volume, not yet written to any segment.

    Attributes:
        source: the :class:`SourceVolume` it was computed on.
        prompt: the :class:`BoxPrompt`.
        mode: ``"3d"`` or ``"2d"``.
        mask: canonical ``(z, y, x)`` bool.
        covered: canonical slices MedSAM segmented (accepted); ``"slices"`` combining replaces
            the segment on these.
        score: the decoder's predicted IoU on the prompt slice.
        notes: why propagation stopped, per direction.
        record: how it was made (:class:`~MedSAMSlicerLib.segmentation.provenance.Provenance`), written into
            the segment's tags when applied (:func:`records.write_record`).
        result: 3D: the engine's :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` (its
            locked slices and per-slice records: what a correction and the review start from).
        window: the resolved intensity window it was computed with (a correction uses it too).
    """

    source: SourceVolume
    prompt: BoxPrompt
    mode: str
    mask: np.ndarray
    covered: List[int]
    score: float = float("nan")
    notes: Dict[str, str] = field(default_factory=dict)
    record: Optional[Provenance] = None
    result: Optional[PropagationResult] = None
    window: object = None

    @property
    def voxel_count(self) -> int:
        return int(self.mask.sum())


@dataclass
class PredictionRequest:
    """Everything a prediction needs, read from the scene on the thread that owns it.

    :meth:`MedSAMBridge.compute` then needs no MRML: it can run in a worker thread.

    Attributes:
        source: the volume (voxels copied), its geometry and key.
        window: the intensity window, already resolved (``"auto"`` looked at the display node).
        prompt, mode, direction: what to segment and how.
        base, accept, current: a correction (see the fields).
    """

    source: SourceVolume
    window: object
    prompt: BoxPrompt
    mode: str = "3d"
    direction: str = "both"
    #: A correction of this 3D result (:meth:`MedSAMBridge.correction_request`): ``prompt`` is
    #: the new box, or with ``accept`` its slice of ``current`` is marked good as it is.
    base: Optional[Prediction] = None
    accept: bool = False
    #: The ``(z, y, x)`` mask being corrected when it is not ``base``'s (the segment as the user
    #: edited it after applying).
    current: Optional[np.ndarray] = None
    #: Further boxes for the same segment, as drawn (``prompt`` is the first): its pieces on one
    #: slice, or its key slices (:meth:`MedSAMBridge.boxes_request`); for a correction, the boxes of
    #: the other pieces on the corrected slice.
    more: Tuple[BoxPrompt, ...] = ()

    @property
    def boxes(self) -> Tuple[BoxPrompt, ...]:
        """Every box of the request, as drawn (``prompt`` first)."""
        return (self.prompt,) + tuple(self.more)

    @property
    def volume_key(self) -> str:
        return f"{self.source.key}|{self.window.key}"
