"""3D propagation that runs the model on every ``stride``-th slice and fills the slices between.

The image encoder is ~90% of a propagation's time on a CPU; encoding every second slice halves
it. bowang-lab's MedSAMSlicer offers the same idea as "speed levels" (segment every 2nd or 3rd
slice and interpolate). Here the propagation itself is :func:`~.propagation.propagate`, unchanged,
run on a :class:`SliceSubset` of the volume (the slices ``z, z +- stride, z +- 2*stride, ...``,
plus the ends of a z-range), so the stop rule, the wider-box prompt and any later change to the
propagation apply as they are. The model's masks on the computed slices are then spread back to
the whole volume and the slices between two computed ones are filled:

- ``"interpolate"`` (default): shape-based interpolation. Each pair of neighbouring masks is turned
  into signed distance maps (positive inside) and the map is interpolated linearly in z; a
  skipped slice gets the voxels where it is positive. The two maps are first moved onto the
  centroids' interpolated position, so a structure that moves between the computed slices keeps
  its size in between, and one that grows or shrinks gets the shapes between (copying the
  neighbours, OR-ing or AND-ing them cannot). An empty neighbour (the structure ends there)
  leaves the slices between empty.
- ``"decode"``: the mask decoder on the mean of the two neighbours' embeddings, prompted with the
  box around both neighbours' masks. On the shipped CT its worst structure lost more against the
  labels than with ``"interpolate"`` (docs/performance.md, "Speed settings"), and it costs a decoder call per
  skipped slice, so the speed settings interpolate; it stays for the benchmark.

Without a z-range the extent is found on the computed slices; the slices past the last accepted
one stay empty (the structure's ends are therefore found to within ``stride - 1`` slices).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import MedSAMError
from ..models.speed import FILLS
from ..progress import CancelToken, ProgressCallback
from .predictor import Predictor
from .preprocessing import logits_to_mask, mask_box_in_model
from .propagation import (
    PropagationResult,
    PropagationSettings,
    SliceRecord,
    StopRule,
    _default_margin,
    check_prompt,
    propagate,
    split_box3d,
)


class SliceSubset(Predictor):
    """A :class:`Predictor` over some slices of another predictor's volume.

    Slice ``i`` here is slice ``zs[i]`` of ``parent``. The model, the embedding cache (with the
    parent's cache keys, so embeddings are shared both ways) and the prepared slices are the
    parent's; only the slice numbering differs.
    """

    def __init__(self, parent: Predictor, zs: Sequence[int]) -> None:
        super().__init__(parent.model, parent.method, parent.model_key, parent.device, dtype=parent.dtype,
                         batch_size=parent.batch_size, cache=parent.cache)
        self.parent = parent
        self.zs = [parent.check_slice_index(z) for z in zs]
        if not self.zs or any(b <= a for a, b in zip(self.zs, self.zs[1:])):
            raise MedSAMError("a slice subset needs increasing slice indices")
        self._volume = parent.volume[self.zs]

    def set_volume(self, volume_u8: np.ndarray, key: Optional[str] = None) -> None:
        raise MedSAMError("a slice subset follows its parent's volume; set the volume on the parent")

    def cache_key(self, z: int) -> Tuple[str, str, str, int]:
        return self.parent.cache_key(self.zs[z])

    def prepared(self, z: int):
        return self.parent.prepared(self.zs[self.check_slice_index(z)])

    def _encode_batch(self, zs: Sequence[int]) -> None:
        super()._encode_batch(zs)
        self.parent.encoded_slices += len(zs)


def computed_slices(z: int, lo: int, hi: int, stride: int, ends: bool) -> List[int]:
    """The slices the model runs on: ``z + k * stride`` within ``lo..hi``, plus ``lo`` and ``hi`` if ``ends``."""
    zs = set(range(z, hi + 1, stride)) | set(range(z, lo - 1, -stride))
    if ends:
        zs |= {lo, hi}
    return sorted(zs)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the boundary, positive inside ``mask`` and negative outside (pixels)."""
    from scipy import ndimage as ndi

    inside = ndi.distance_transform_edt(mask)
    outside = ndi.distance_transform_edt(~mask)
    return np.where(mask, inside - 0.5, 0.5 - outside)


def interpolate_masks(a: np.ndarray, b: np.ndarray, n: int) -> List[np.ndarray]:
    """The ``n`` slices between masks ``a`` and ``b`` (each ``(H, W)``), shape-based.

    Returns ``n`` boolean ``(H, W)`` masks at ``t = k / (n + 1)``, ``k = 1..n``; all empty when
    either neighbour is empty. Each neighbour's signed distance map is first moved so that its
    centroid sits on the centroids' interpolated position: plain distance-map interpolation of a
    structure that moves between the slices would thin it in between (a lens where the two
    shapes overlap, nothing where they do not).
    """
    if not a.any() or not b.any():
        return [np.zeros_like(a, dtype=bool) for _ in range(n)]
    from scipy import ndimage as ndi

    da, db = _signed_distance(a), _signed_distance(b)
    ca, cb = np.array(ndi.center_of_mass(a)), np.array(ndi.center_of_mass(b))
    out = []
    for t in (k / (n + 1) for k in range(1, n + 1)):
        centre = ca * (1.0 - t) + cb * t
        sa = ndi.shift(da, centre - ca, order=1, mode="nearest")
        sb = ndi.shift(db, centre - cb, order=1, mode="nearest")
        out.append((sa * (1.0 - t) + sb * t) > 0)
    return out


@torch.inference_mode()
def decode_between(predictor: Predictor, z: int, below: int, above: int, a: np.ndarray, b: np.ndarray,
                   margin: float) -> np.ndarray:
    """Slice ``z``'s mask from the mean of slices ``below``'s and ``above``'s embeddings.

    The prompt is the box around both neighbours' masks ``a`` and ``b`` (``(H, W)``), grown by
    ``margin`` model pixels. Returns an ``(H, W)`` boolean mask (empty when both are empty).
    """
    union = a | b
    prepared = predictor.prepared(z)
    box = mask_box_in_model(union, prepared, margin)
    if box is None:
        return np.zeros_like(a, dtype=bool)
    emb = (predictor.embedding(below) + predictor.embedding(above)) * 0.5
    boxes = torch.as_tensor(np.asarray(box, dtype=np.float32)[None], device=predictor.device)
    logits, _ = predictor.model.decode(emb.to(predictor.device), boxes)
    return logits_to_mask(logits, prepared)


def propagate_strided(
    predictor: Predictor,
    z: int,
    box: Sequence[float],
    stride: int = 2,
    z_range: Optional[Tuple[int, int]] = None,
    direction: str = "both",
    stop: Optional[StopRule] = None,
    margin: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    wider_box: Optional[float] = None,
    fill: str = "interpolate",
    settings: Optional[PropagationSettings] = None,
) -> PropagationResult:
    """:func:`~.propagation.propagate` on every ``stride``-th slice, the others filled.

    Args:
        predictor: a :class:`Predictor` with the volume set.
        z: the slice the box is drawn on (always computed).
        box: ``(x0, y0, x1, y1)`` in that slice's pixel indices (inclusive).
        stride: compute every ``stride``-th slice (1 is :func:`~.propagation.propagate` itself).
        z_range: inclusive ``(z_min, z_max)`` bounding the propagation; both ends are computed.
        fill: how skipped slices are filled, ``"interpolate"`` or ``"decode"`` (module docstring).
        direction, stop, margin, progress, cancel, wider_box, settings: as
            :func:`~.propagation.propagate`.

    Returns:
        A :class:`~.propagation.PropagationResult` in the whole volume's slice numbering; its
        ``slices`` records the computed slices only.
    """
    if int(stride) != stride or stride < 1:
        raise MedSAMError(f"the stride must be a whole number >= 1; got {stride}")
    if fill not in FILLS:
        raise MedSAMError(f"unknown fill '{fill}'; choose one of: {', '.join(FILLS)}")
    stride = int(stride)
    z = predictor.check_slice_index(z)
    if stride == 1:
        return propagate(predictor, z, box, z_range=z_range, direction=direction, stop=stop, margin=margin,
                         progress=progress, cancel=cancel, wider_box=wider_box, settings=settings)
    z, _, (lo, hi) = check_prompt(predictor, z, box, z_range)
    zs = computed_slices(z, lo, hi, stride, ends=z_range is not None)
    subset = SliceSubset(predictor, zs)
    sub_range = None if z_range is None else (0, len(zs) - 1)
    # The box is in slice pixels; every slice of a volume has the same grid, so it carries over.
    inner = propagate(subset, zs.index(z), box, z_range=sub_range, direction=direction, stop=stop, margin=margin,
                      progress=progress, cancel=cancel, wider_box=wider_box, settings=settings)
    if margin is None:
        margin = settings.margin if settings is not None else None
    margin = _default_margin(predictor) if margin is None else float(margin)
    out = np.zeros(predictor.volume.shape, dtype=bool)
    out[zs] = inner.mask
    accepted = {zs[r.z] for r in inner.slices if r.accepted}
    for below, above in zip(zs, zs[1:]):
        gap = above - below - 1
        if gap <= 0 or below not in accepted or above not in accepted:
            continue
        a, b = out[below], out[above]
        if fill == "interpolate":
            filled = interpolate_masks(a, b, gap)
        else:
            filled = [decode_between(predictor, zz, below, above, a, b, margin) for zz in range(below + 1, above)]
        out[below + 1 : above] = np.stack(filled)
    records = [SliceRecord(zs[r.z], r.area, r.score, r.accepted, r.reason) for r in inner.slices]
    reasons = {name: _renumber(reason, zs) for name, reason in inner.stop_reasons.items()}
    nonempty = np.nonzero(out.any(axis=(1, 2)))[0]
    extent = (int(nonempty.min()), int(nonempty.max())) if nonempty.size else None
    return PropagationResult(mask=out, z_extent=extent, stop_reasons=reasons, slices=records)


def _renumber(reason: str, zs: Sequence[int]) -> str:
    """A stop reason with the subset's slice number (``"stopped at slice 3: ..."``) in volume numbering."""
    prefix = "stopped at slice "
    if reason.startswith(prefix):
        number, _, rest = reason[len(prefix):].partition(":")
        if number.isdigit() and int(number) < len(zs):
            return f"{prefix}{zs[int(number)]}:{rest}"
    return reason


def propagate_box3d_strided(
    predictor: Predictor,
    box3d: Sequence[float],
    stride: int = 2,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    margin: Optional[float] = None,
    wider_box: Optional[float] = None,
    fill: str = "interpolate",
    settings: Optional[PropagationSettings] = None,
) -> PropagationResult:
    """:func:`~.propagation.propagate_box3d` (the 2D box on the middle slice, bounded by ``z0..z1``)
    on every ``stride``-th slice; see :func:`propagate_strided`."""
    z_mid, box, z_range = split_box3d(box3d)
    return propagate_strided(predictor, z_mid, box, stride=stride, z_range=z_range, progress=progress,
                             cancel=cancel, margin=margin, wider_box=wider_box, fill=fill, settings=settings)
