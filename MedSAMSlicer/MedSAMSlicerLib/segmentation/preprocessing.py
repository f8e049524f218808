"""Intensity windowing and the per-model slice transforms, exactly as the original pipelines.

Two models, two preprocessing recipes (see ``../shared/REFERENCE.md``):

- **MedSAM** (``MedSAM_Inference.py``): grey slice -> 3 channels -> 1024x1024 with skimage's
  ``resize(order=3, preserve_range=True, anti_aliasing=True)`` -> ``uint8`` -> min-max to [0, 1].
  The box is scaled by ``1024 / [W, H, W, H]``; the 256x256 logits go through a sigmoid, are
  resized bilinearly to ``(H, W)`` and thresholded at 0.5.
- **LiteMedSAM** (``CVPR24_LiteMedSAM_infer.py``): longest side to 256 with OpenCV's
  ``INTER_AREA``, min-max to [0, 1], zero padding at the bottom and right to 256x256. The box is
  scaled by ``256 / max(H, W)``; the logits are cropped to the unpadded region, resized
  bilinearly to ``(H, W)``, then sigmoid > 0.5.

Neither skimage nor OpenCV is needed here: the same arithmetic is written with scipy/numpy
(tests compare against both libraries), so the engine installs cleanly in Slicer's Python.

Arrays: a slice is ``(H, W)`` = ``(y, x)``; a volume is ``(z, y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage as ndi

from ..errors import MedSAMError

if TYPE_CHECKING:  # torch is imported where tensors are made: Window and the windowing are torch-free
    import torch

# Level/width presets in Hounsfield units. Abdomen, lung and brain are the windows MedSAM's own
# preprocessing uses; bone is Slicer's "CT-Bone" display preset.
WINDOW_PRESETS = {
    "abdomen": (40.0, 400.0),
    "lung": (-160.0, 1500.0),
    "bone": (400.0, 1000.0),
    "brain": (40.0, 80.0),
}


#: Raw values below this mean CT (air is about -1000 HU); see :meth:`Window.automatic`.
CT_AIR_THRESHOLD = -500.0

#: Names accepted wherever a window preset is named; ``auto`` is resolved per volume.
PRESET_NAMES = ("auto", *WINDOW_PRESETS, "mr")


@dataclass(frozen=True)
class Window:
    """How raw intensities become the 8-bit image the model sees.

    Either a CT-style ``level``/``width`` (values below ``level - width/2`` map to 0, above
    ``level + width/2`` to 255) or MR-style percentile scaling (``percentiles=(0.5, 99.5)`` of
    the non-zero voxels, background kept at 0), as in MedSAM's ``pre_CT_MR.py``.
    """

    level: Optional[float] = None
    width: Optional[float] = None
    percentiles: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.percentiles is None:
            if self.level is None or self.width is None:
                raise MedSAMError("a window needs a level and a width (or MR percentiles)")
            if not np.isfinite(self.level) or not np.isfinite(self.width) or self.width <= 0:
                raise MedSAMError(
                    f"window width must be a positive number; got level {self.level}, width {self.width}"
                )
        else:
            lo, hi = self.percentiles
            if not 0 <= lo < hi <= 100:
                raise MedSAMError(f"percentiles must satisfy 0 <= low < high <= 100; got {self.percentiles}")

    @classmethod
    def preset(cls, name: str) -> Window:
        """A named preset: ``abdomen``, ``lung``, ``bone``, ``brain`` (CT) or ``mr``.

        ``auto`` depends on the volume: use :meth:`automatic` (or :func:`resolve_window`).
        """
        key = name.lower()
        if key == "auto":
            raise MedSAMError("the 'auto' window depends on the volume: use Window.automatic(volume)")
        if key == "mr":
            return cls(percentiles=(0.5, 99.5))
        if key not in WINDOW_PRESETS:
            names = ", ".join(sorted([*WINDOW_PRESETS, "mr"]))
            raise MedSAMError(f"unknown window preset '{name}'; choose one of: {names}")
        level, width = WINDOW_PRESETS[key]
        return cls(level=level, width=width)

    @classmethod
    def automatic(cls, volume: np.ndarray) -> Window:
        """The window the models were trained with, chosen from the intensities of ``volume``.

        CT (any value below ``CT_AIR_THRESHOLD``, -500: air is about -1000 HU, and no MR or other
        modality has such values) gets the CT abdomen window (L40/W400); anything else gets MR
        percentile scaling (0.5-99.5 percentiles of the non-zero voxels), as ``pre_CT_MR.py``.
        This is the one home of the rule: the command line, :meth:`Segmenter.set_volume
        <MedSAMSlicerLib.segmenter.Segmenter.set_volume>` and the Slicer bridge all call it.

        Args:
            volume: raw intensities, any shape (``(z, y, x)`` for a volume).
        """
        data = np.asarray(volume)
        if data.size and float(data.min()) < CT_AIR_THRESHOLD:
            return cls.preset("abdomen")
        return cls.preset("mr")

    @classmethod
    def around_box(cls, volume: np.ndarray, z: int, box: Sequence[float], grow: float = 0.5,
                   percentiles: Tuple[float, float] = (0.5, 99.5)) -> Window:
        """A window from the intensities around a prompt: the ``percentiles`` of slice ``z`` of
        ``volume`` ``(z, y, x)`` inside the box ``(x0, y0, x1, y1)`` grown by ``grow`` times its
        size on each side (kept inside the slice). Measured by ``medsam-slicer evaluate`` as
        ``window=box``, not a default (docs/decisions.md)."""
        data = np.asarray(volume)
        h, w = data.shape[1:]
        x0, y0, x1, y1 = (float(v) for v in box)
        gx, gy = (x1 - x0 + 1) * grow, (y1 - y0 + 1) * grow
        region = data[int(z), max(0, int(round(y0 - gy))): min(h, int(round(y1 + gy)) + 1),
                      max(0, int(round(x0 - gx))): min(w, int(round(x1 + gx)) + 1)].astype(np.float64)
        lo, hi = np.percentile(region, percentiles)
        return cls(level=float(lo + hi) / 2.0, width=max(float(hi - lo), 1.0))

    @property
    def key(self) -> str:
        """A short string that identifies the window (used in embedding-cache keys)."""
        if self.percentiles is not None:
            return f"pct{self.percentiles[0]:g}-{self.percentiles[1]:g}"
        return f"L{self.level:g}W{self.width:g}"


def resolve_window(window: Union[None, str, Window, Tuple[float, float]], volume: np.ndarray) -> Window:
    """A :class:`Window` from what a user gave: ``None`` or ``"auto"`` (:meth:`Window.automatic`
    on ``volume``), a preset name, a ``(level, width)`` pair, or a ``Window``."""
    if isinstance(window, Window):
        return window
    if window is None or (isinstance(window, str) and window.lower() == "auto"):
        return Window.automatic(volume)
    if isinstance(window, str):
        return Window.preset(window)
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise MedSAMError(f"a window is 'auto', a preset name or (level, width); got {window!r}") from None
    return Window(level=level, width=width)


def apply_window(volume: np.ndarray, window: Window, stretch: bool = False) -> np.ndarray:
    """Map raw intensities to ``uint8`` with ``window``.

    Args:
        volume: any-dimensional array of raw intensities (HU for CT), e.g. ``(z, y, x)``.
        window: the :class:`Window`.
        stretch: for level/width, min-max the clipped volume to 0-255 as ``pre_CT_MR.py`` does
            (``False``: fixed mapping, what a viewer shows). Percentile windows always stretch.

    Returns:
        ``uint8`` array of the same shape (values truncated, as ``np.uint8(...)`` in the original).
    """
    data = np.asarray(volume, dtype=np.float32)
    if window.percentiles is not None:
        nonzero = data[data > 0]
        if nonzero.size == 0:
            return np.zeros(data.shape, dtype=np.uint8)
        lo, hi = np.percentile(nonzero, window.percentiles)
        clipped = np.clip(data, lo, hi)
        out = _stretch(clipped)
        out[data == 0] = 0
        return out.astype(np.uint8)
    lower = window.level - window.width / 2.0
    upper = window.level + window.width / 2.0
    clipped = np.clip(data, lower, upper)
    if stretch:
        return _stretch(clipped).astype(np.uint8)
    return ((clipped - lower) / (upper - lower) * 255.0).astype(np.uint8)


def _stretch(data: np.ndarray) -> np.ndarray:
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    return (data - lo) / (hi - lo) * 255.0


#: :func:`window_note` warns when a window leaves fewer grey levels than this, or puts more than
#: ``SATURATED_FRACTION`` of the voxels at pure black or pure white.
MIN_GREY_LEVELS = 8
SATURATED_FRACTION = 0.95
#: Under a level/width (CT) window, an image whose 1st percentile is above this (no air, no fat)
#: and that the window turns white for more than this fraction of voxels is not in Hounsfield
#: units. On the shipped data: the CT's 1st percentile is -1012; the same CT without its rescale
#: (+1024) gives 12 and 66% white; the MR gives -2 and 38% white.
NOT_HU_ABOVE = -50.0
NOT_HU_WHITE_FRACTION = 0.25


def window_note(volume: np.ndarray, window: Window, stretch: bool = False) -> Optional[str]:
    """A warning when ``window`` shows next to nothing of ``volume``, else ``None``.

    Values that do not look like what the window is for give the model a blank or white image,
    and it still outputs a mask: e.g. CT stored without its rescale to Hounsfield units (raw
    scanner values 0..4095, nothing below 0, where air should be -1000) or an MR or normalised
    image under a CT window. Checked on every 4th voxel along each axis of a ``(z, y, x)``
    volume; the message names the values, what the window makes of them and what to do.
    """
    data = np.asarray(volume)
    sample = data[::4, ::4, ::4] if data.ndim == 3 else data
    if sample.size == 0:
        return None
    shown = apply_window(sample, window, stretch)
    lo, hi = float(sample.min()), float(sample.max())
    levels = int(np.unique(shown).size)
    white = float(np.mean(shown == 255))
    black = float(np.mean(shown == 0))
    if window.percentiles is None:
        name = f"the window L{window.level:g}/W{window.width:g}"
        p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
        # A CT in Hounsfield units always has air (-1000) or fat (-100) in it.
        if p1 > NOT_HU_ABOVE and white > NOT_HU_WHITE_FRACTION:
            return (f"the image's values (1st to 99th percentile: {p1:g} to {p99:g}) have no air or fat in Hounsfield "
                    f"units (-1000, -100): CT stored without its rescale, or an MR image? With {name} {white:.0%} of "
                    "the voxels are pure white. For MR use the MR (percentile) window; for CT fix the file's rescale "
                    "(slope/intercept) or give a level and width in the file's own units.")
    else:
        name = f"the MR window ({window.percentiles[0]:g}-{window.percentiles[1]:g} percentiles)"
    if levels < MIN_GREY_LEVELS:
        return (f"with {name} the image's values ({lo:g} to {hi:g}) give only {levels} grey level(s): the model "
                "would see an almost blank image. Choose a window that fits these values.")
    if max(white, black) > SATURATED_FRACTION:
        which = "white" if white > black else "black"
        return (f"with {name} {max(white, black):.0%} of the voxels are pure {which} (the image's values run from "
                f"{lo:g} to {hi:g}): the window does not fit this image. Choose a window that fits these values.")
    return None


# ---------------------------------------------------------------------------------------------
# Resampling that reproduces skimage.transform.resize(order=3) and cv2.resize(INTER_AREA)


def skimage_style_resize(image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order=3, preserve_range=True, anti_aliasing=True)``.

    Same steps as skimage: Gaussian anti-aliasing with ``sigma = max(0, (factor - 1) / 2)`` when
    shrinking, cubic spline zoom with ``grid_mode=True`` and mirror boundaries, then clipping to
    the input's range (so the cubic overshoot never wraps when cast to ``uint8``).

    Args:
        image: ``(H, W)`` array.
        shape: output ``(H', W')``.

    Returns:
        ``float64`` array of shape ``shape``.
    """
    img = np.asarray(image, dtype=np.float64)
    factors = np.asarray(img.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if np.any(sigma > 0):
        img = ndi.gaussian_filter(img, sigma, mode="mirror", cval=0.0)
    out = ndi.zoom(img, 1.0 / factors, order=3, mode="mirror", cval=0.0, grid_mode=True)
    return np.clip(out, image.min(), image.max())


def _area_weights(n_in: int, n_out: int, area_path: bool) -> np.ndarray:
    """1D weights ``(n_out, n_in)`` of OpenCV's ``INTER_AREA`` along one axis.

    Shrinking (``area_path``): each output pixel averages the input pixels it covers, weighted by
    overlap. Enlarging: OpenCV's modified linear interpolation (``fx = (dx+1) - (sx+1)/scale``).
    """
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out  # source pixels per output pixel
    if area_path:
        for o in range(n_out):
            start, stop = o * scale, (o + 1) * scale
            first, last = int(np.floor(start)), min(int(np.ceil(stop)), n_in)
            for i in range(first, last):
                overlap = min(stop, i + 1) - max(start, i)
                if overlap > 0:
                    weights[o, i] = overlap / scale
        return weights
    inv_scale = n_out / n_in
    for dx in range(n_out):
        sx = int(np.floor(dx * scale))
        fx = (dx + 1) - (sx + 1) * inv_scale
        fx = 0.0 if fx <= 0 else fx - np.floor(fx)
        if sx >= n_in - 1:
            sx, fx = n_in - 1, 0.0
        weights[dx, sx] += 1.0 - fx
        if fx > 0:
            weights[dx, sx + 1] += fx
    return weights


def _band(weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A banded ``(n_out, n_in)`` weight matrix as ``(indices, weights)``, both ``(n_out, k)``.

    Each output pixel of an area/linear resize reads a short run of neighbouring input pixels;
    ``k`` is the longest run. Padding entries repeat a valid index with weight 0.
    """
    nonzero = weights != 0
    first = np.argmax(nonzero, axis=1)
    last = weights.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    k = int((last - first).max()) + 1
    idx = first[:, None] + np.arange(k)[None, :]
    inside = idx <= last[:, None]
    idx = np.where(inside, idx, first[:, None])
    return idx, np.where(inside, np.take_along_axis(weights, idx, axis=1), 0.0)


def _separable(image: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """``wy @ image @ wx.T`` for banded weights, without BLAS.

    numpy's BLAS (OpenBLAS) runs a product this size on worker threads that keep spinning for
    about 0.1 s afterwards, which halves the speed of the torch work that follows on a 2-core
    machine (measured: LiteMedSAM's decoder 55 -> 110-160 ms per slice in a propagation). A
    banded product in elementwise numpy is as fast here and stays on this thread.
    """
    iy, cy = _band(wy)
    ix, cx = _band(wx)
    img = np.asarray(image, dtype=np.float64)
    rows = cy[:, 0, None] * img[iy[:, 0], :]
    for j in range(1, iy.shape[1]):
        rows += cy[:, j, None] * img[iy[:, j], :]
    out = cx[None, :, 0] * rows[:, ix[:, 0]]
    for j in range(1, ix.shape[1]):
        out += cx[None, :, j] * rows[:, ix[:, j]]
    return out


def area_resize(image: np.ndarray, shape: Tuple[int, int], as_uint8: bool = True) -> np.ndarray:
    """``cv2.resize(image, (W', H'), interpolation=cv2.INTER_AREA)`` for a ``(H, W)`` image.

    Returns ``uint8`` when ``as_uint8`` (OpenCV's rounding reproduced: integer-factor shrinking
    rounds halves up, fractional shrinking rounds half to even, enlarging uses OpenCV's 11-bit
    fixed-point coefficients), else the exact float64 result.
    """
    h, w = image.shape
    new_h, new_w = shape
    area_path = h >= new_h and w >= new_w
    wy = _area_weights(h, new_h, area_path)
    wx = _area_weights(w, new_w, area_path)
    if not as_uint8:
        return _separable(image, wy, wx)
    if area_path:
        out = _separable(image, wy, wx)
        integer = h % new_h == 0 and w % new_w == 0
        out = np.floor(out + 0.5) if integer else np.rint(out)
        return np.clip(out, 0, 255).astype(np.uint8)
    # Enlarging: OpenCV's fixed-point linear path (coefficients scaled by 2**11, vertical pass
    # with its shifts), so the 8-bit result matches OpenCV exactly.
    wx_q = np.round(wx * 2048).astype(np.int64)
    wy_q = np.round(wy * 2048).astype(np.int64)
    rows = np.asarray(image, dtype=np.int64) @ wx_q.T  # (h, new_w)
    first = np.argmax(wy_q > 0, axis=1)
    second = np.minimum(first + 1, h - 1)
    b0 = wy_q[np.arange(new_h), first][:, None]
    b1 = np.where(second != first, wy_q[np.arange(new_h), second], 0)[:, None]
    acc = ((b0 * (rows[first] >> 4)) >> 16) + ((b1 * (rows[second] >> 4)) >> 16)
    return np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)


def longest_side_shape(shape: Tuple[int, int], target: int) -> Tuple[int, int]:
    """LiteMedSAM's ``resize_longest_side`` target ``(new_h, new_w)`` for a ``(H, W)`` slice."""
    h, w = shape
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


# ---------------------------------------------------------------------------------------------
# Per-model slice preparation


@dataclass
class PreparedSlice:
    """A slice ready for a model, and what is needed to map boxes in and masks out.

    Attributes:
        image: ``(3, S, S)`` float32 tensor in [0, 1] (``S`` = model input size).
        original_hw: ``(H, W)`` of the slice.
        resized_hw: ``(h, w)`` of the image content inside the ``S x S`` input (LiteMedSAM pads
            the rest; MedSAM fills it, so ``(S, S)``).
        box_scale: ``(sx, sy)``: model pixels per slice pixel along x and y.
        method: ``"medsam"`` or ``"litemedsam"``.
    """

    image: torch.Tensor
    original_hw: Tuple[int, int]
    resized_hw: Tuple[int, int]
    box_scale: Tuple[float, float]
    method: str

    @property
    def input_size(self) -> int:
        """Model input size ``S``."""
        return int(self.image.shape[-1])


def _check_slice(slice_u8: np.ndarray) -> np.ndarray:
    arr = np.asarray(slice_u8)
    if arr.ndim != 2:
        raise MedSAMError(f"a slice must be a 2D (H, W) array; got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise MedSAMError(f"slice of shape {arr.shape} is too small to segment")
    return arr


def _minmax(img: np.ndarray) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / np.clip(hi - lo, a_min=1e-8, a_max=None)


def prepare_medsam(slice_u8: np.ndarray, input_size: int = 1024) -> PreparedSlice:
    """MedSAM's preprocessing of one ``(H, W)`` ``uint8`` slice (see module docstring)."""
    import torch
    arr = _check_slice(slice_u8)
    h, w = arr.shape
    resized = skimage_style_resize(arr, (input_size, input_size)).astype(np.uint8)
    norm = _minmax(resized.astype(np.float64)).astype(np.float32)
    image = torch.from_numpy(norm)[None].expand(3, -1, -1).contiguous()
    return PreparedSlice(image, (h, w), (input_size, input_size), (input_size / w, input_size / h), "medsam")


def prepare_litemedsam(slice_u8: np.ndarray, input_size: int = 256, enlarge: str = "area") -> PreparedSlice:
    """LiteMedSAM's preprocessing of one ``(H, W)`` ``uint8`` slice (see module docstring).

    ``enlarge``: how a slice smaller than the input is enlarged: ``"area"`` (OpenCV's
    ``INTER_AREA``, as LiteMedSAM: blocky when enlarging) or ``"cubic"`` (skimage's cubic spline,
    as MedSAM's preprocessing). Shrinking always uses ``INTER_AREA``.
    """
    import torch
    arr = _check_slice(slice_u8)
    h, w = arr.shape
    new_h, new_w = longest_side_shape((h, w), input_size)
    if enlarge == "cubic" and (new_h > h or new_w > w):
        resized = np.round(skimage_style_resize(arr, (new_h, new_w))).astype(np.uint8)
    elif enlarge in ("area", "cubic"):
        resized = area_resize(arr, (new_h, new_w))
    else:
        raise MedSAMError(f"enlarge is 'area' or 'cubic'; got '{enlarge}'")
    norm = _minmax(resized.astype(np.float64)).astype(np.float32)
    padded = np.zeros((input_size, input_size), dtype=np.float32)
    padded[:new_h, :new_w] = norm
    image = torch.from_numpy(padded)[None].expand(3, -1, -1).contiguous()
    scale = input_size / max(h, w)
    return PreparedSlice(image, (h, w), (new_h, new_w), (scale, scale), "litemedsam")


PREPARERS = {
    "medsam": prepare_medsam,
    "litemedsam": prepare_litemedsam,
    "litemedsam-cubic": lambda slice_u8, input_size: prepare_litemedsam(slice_u8, input_size, "cubic"),
}


def prepare_slice(slice_u8: np.ndarray, method: str, input_size: int) -> PreparedSlice:
    """Prepare a ``(H, W)`` ``uint8`` slice with the named method (``medsam``/``litemedsam``)."""
    if method not in PREPARERS:
        raise MedSAMError(f"unknown preprocessing '{method}'; known: {', '.join(PREPARERS)}")
    return PREPARERS[method](slice_u8, input_size)


def check_box(box: Sequence[float], hw: Tuple[int, int]) -> np.ndarray:
    """Validate a ``(x0, y0, x1, y1)`` box (inclusive pixel indices) on a slice of shape ``hw``.

    Returns the box as a float array, sorted; raises :class:`MedSAMError` when it has zero size or
    lies outside the slice (a box partly outside is clipped).
    """
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.size != 4 or not np.all(np.isfinite(b)):
        raise MedSAMError(f"a 2D box needs four numbers x0 y0 x1 y1; got {list(box)}")
    h, w = hw
    x0, x1 = sorted((b[0], b[2]))
    y0, y1 = sorted((b[1], b[3]))
    if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
        raise MedSAMError(
            f"box x {x0:g}..{x1:g}, y {y0:g}..{y1:g} lies outside the slice (x 0..{w - 1}, y 0..{h - 1})"
        )
    x0, x1 = max(x0, 0.0), min(x1, w - 1.0)
    y0, y1 = max(y0, 0.0), min(y1, h - 1.0)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise MedSAMError(
            f"box x {x0:g}..{x1:g}, y {y0:g}..{y1:g} has (almost) zero size: draw a box around the structure"
        )
    return np.array([x0, y0, x1, y1])


def box_to_model(box: Sequence[float], prepared: PreparedSlice) -> np.ndarray:
    """Scale a slice-pixel box ``(x0, y0, x1, y1)`` into model-input pixels, as the originals do."""
    sx, sy = prepared.box_scale
    b = np.asarray(box, dtype=np.float64)
    return b * np.array([sx, sy, sx, sy])


def logits_at_slice(logits: torch.Tensor, prepared: PreparedSlice) -> torch.Tensor:
    """Low-res logits ``(B, 1, 256, 256)`` -> logits ``(B, 1, H, W)`` at slice resolution: the
    region of the model input that holds the slice (LiteMedSAM's unpadded corner, MedSAM's whole
    input), resized bilinearly. A confidence per pixel that does not saturate like a probability."""
    import torch.nn.functional as F  # noqa: N812
    h, w = prepared.original_hw
    logits = logits.float()
    if prepared.method == "litemedsam":
        rh, rw = prepared.resized_hw
        low = logits.shape[-1]
        scale = low / prepared.input_size
        logits = logits[..., : int(round(rh * scale)), : int(round(rw * scale))]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def logits_to_probability(logits: torch.Tensor, prepared: PreparedSlice) -> torch.Tensor:
    """Low-res logits ``(B, 1, 256, 256)`` -> probabilities ``(B, 1, H, W)`` at slice resolution.

    MedSAM: sigmoid, then bilinear resize. LiteMedSAM: crop to the unpadded region, bilinear
    resize, then sigmoid (:func:`logits_at_slice`). (Both orders are kept as in the originals.)
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    if prepared.method == "litemedsam":
        return torch.sigmoid(logits_at_slice(logits, prepared))
    h, w = prepared.original_hw
    prob = torch.sigmoid(logits.float())
    return F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)


def logits_to_mask(logits: torch.Tensor, prepared: PreparedSlice) -> np.ndarray:
    """Low-res logits ``(1, 1, 256, 256)`` -> boolean mask ``(H, W)`` (probability > 0.5)."""
    prob = logits_to_probability(logits, prepared)
    return (prob[0, 0] > 0.5).cpu().numpy()


def mask_box_in_model(mask: np.ndarray, prepared: PreparedSlice, margin: float) -> Optional[np.ndarray]:
    """The box, in model-input pixels, that LiteMedSAM's 3D inference derives from a mask.

    As ``CVPR24_LiteMedSAM_infer.py``: the previous slice's mask is brought to model space with
    the same resize as the image (OpenCV rounds the resampled 0/1 mask, so a model pixel counts
    when its value exceeds 0.5), its bounding box is grown by ``margin`` pixels and clipped to
    ``[0, S]``. Returns ``None`` when the mask is empty in model space (the caller then falls
    back to the original box, as the original does).

    Args:
        mask: ``(H, W)`` boolean mask on the slice grid.
        prepared: the slice's :class:`PreparedSlice` (gives the resize).
        margin: pixels to add on each side, in model-input pixels.
    """
    if not mask.any():
        return None
    s = prepared.input_size
    rh, rw = prepared.resized_hw
    if prepared.method == "litemedsam":
        resized = area_resize(mask.astype(np.float64), (rh, rw), as_uint8=False) > 0.5
        if not resized.any():
            return None
        ys_m, xs_m = np.nonzero(resized)
        x0, x1, y0, y1 = xs_m.min(), xs_m.max(), ys_m.min(), ys_m.max()
    else:
        ys, xs = np.nonzero(mask)
        sx, sy = prepared.box_scale
        x0, x1 = xs.min() * sx, (xs.max() + 1) * sx - 1
        y0, y1 = ys.min() * sy, (ys.max() + 1) * sy - 1
    return np.array(
        [max(0.0, x0 - margin), max(0.0, y0 - margin), min(float(s), x1 + margin), min(float(s), y1 + margin)]
    )
