"""The review of a 3D result in the slice views: which slices are doubtful, in the user's slice
numbers, and where the views go to show one.

What makes a slice doubtful is the engine's rule (:mod:`MedSAMSlicerLib.segmentation.review`); this module only
names slices as the volume's file does (``k 21``) and maps them to and from RAS for the views.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .sources import SourceVolume


def slice_name(src: SourceVolume, z: int) -> str:
    """Canonical slice ``z`` as the user's viewer numbers it, e.g. ``"k 21"``."""
    axis, index = src.orientation.slice_to_index(int(z))
    return f"{axis} {index}"


def slice_of_point(src: SourceVolume, point_ras) -> int:
    """The canonical slice through a RAS point (e.g. a slice view's centre), clipped to the volume."""
    z = float(src.ras_to_canonical(np.asarray(point_ras, dtype=float).reshape(1, 3))[0, 2])
    return int(min(max(round(z), 0), src.shape[0] - 1))


def slice_centre_ras(src: SourceVolume, mask_zyx: np.ndarray, z: int) -> Tuple[float, float, float]:
    """Where a view goes to show slice ``z`` of a result: the centre of the mask's bounding box on
    that slice (the slice's centre when it is empty), in RAS."""
    ys, xs = np.nonzero(mask_zyx[int(z)])
    if xs.size:
        point = [(xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0, float(z)]
    else:
        point = [(src.shape[2] - 1) / 2.0, (src.shape[1] - 1) / 2.0, float(z)]
    return tuple(float(v) for v in src.canonical_to_ras(np.array([point]))[0])  # type: ignore[return-value]


def doubtful(prediction) -> List[Tuple[int, str]]:
    """``(z, why)`` of the doubtful slices of a 3D prediction, the most doubtful first (empty for 2D)."""
    from MedSAMSlicerLib.segmentation.review import doubtful_slices, review

    if prediction.result is None:
        return []
    reasons = {s.z: s.reason for s in review(prediction.result) if s.doubtful}
    return [(z, reasons[z]) for z in doubtful_slices(prediction.result)]  # the engine's order


def next_doubtful(prediction, after: Optional[int] = None) -> Optional[int]:
    """The slice the "next doubtful slice" button goes to after ``after`` (wraps; ``None``: none)."""
    from MedSAMSlicerLib.segmentation.review import next_doubtful as engine_next

    return None if prediction.result is None else engine_next(prediction.result, after)


def summary(prediction) -> str:
    """One line for the panel: the doubtful slices by the user's numbers, or that there are none."""
    if prediction.result is None:
        return ""
    found = doubtful(prediction)
    if not found:
        return "No doubtful slice."
    names = ", ".join(slice_name(prediction.source, z) for z, _ in found[:6])
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    return f"{len(found)} doubtful slice(s): {names}{more}."
