"""Both pipelines built for one model, and our side's 3D run with the reference's prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .cases import Case
from .reference import ReferenceLiteMedSAM, ReferenceMedSAM, lite_resize_box_to_256


def build_pipelines(model: str, device: torch.device, weights: Optional[Path], state: Optional[Dict[str, torch.Tensor]],
           optimize: bool = True):
    from ..segmenter import Segmenter

    if model == "litemedsam":
        return ReferenceLiteMedSAM(device), Segmenter("litemedsam", device=str(device), optimize=optimize)
    assert state is not None and weights is not None
    return ReferenceMedSAM(device, state), Segmenter("medsam", checkpoint=weights, device=str(device), optimize=optimize)


def ours_box3d(model: str, case: Case) -> Tuple[float, ...]:
    """Our 3D box: the slice-pixel box whose model-space box is exactly the reference's first box.

    LiteMedSAM's original truncates the scaled box to integers (``resize_box_to_256``); ours scales
    without rounding, so it is given the truncated box mapped back to slice pixels. MedSAM's
    original scales without rounding, as ours does.
    """
    x0, y0, z0, x1, y1, z1 = case.box3d
    if model == "litemedsam":
        h, w = case.image.shape[1:]
        scale = 256 / max(h, w)
        bx0, by0, bx1, by1 = (float(v) / scale for v in lite_resize_box_to_256(np.array(case.box2d), (h, w)))
        return (bx0, by0, float(z0), bx1, by1, float(z1))
    return tuple(float(v) for v in case.box3d)


def run_ours_3d(seg, case: Case, box3d: Sequence[float], key: str):
    from ..segmentation.propagation import propagate_box3d

    seg.predictor.cache.clear()
    seg.set_volume(case.raw, case.window, key=key)
    return propagate_box3d(seg.predictor, box3d, wider_box=0)
