"""Training samples: one preprocessed axial slice, one structure, one jittered box.

Per sample, as MedSAM's ``train_one_gpu.py``: pick one label present in the slice at random,
binarise it, take its bounding box and move each side outward by ``randint(0, jitter)`` pixels
(inclusive, clipped to the slice). Differences, on purpose:

- the jitter is in pixels of the *stored* slice (the original resolution), not of the model input,
  so the same dataset gives the same boxes to MedSAM (1024) and LiteMedSAM (256);
- image and box go through the chosen model's own inference transform
  (:func:`~MedSAMSlicerLib.segmentation.preprocessing.prepare_slice`, :func:`~MedSAMSlicerLib.segmentation.preprocessing.box_to_model`),
  so training sees exactly what the Slicer effect and the command line feed the model;
- the target mask is put on the model's ``256x256`` low-resolution logit grid and the loss is
  computed there, for both models (what LiteMedSAM's training does; MedSAM's upsamples the logits
  to 1024 instead, 16 times the loss pixels for no gain in what the decoder can express). The grid
  covers the model input: for LiteMedSAM the slice's longest side goes to 256 and the rest is
  padding (mask 0 there); for MedSAM the whole slice is stretched to 256x256. The mask is resized
  with nearest neighbour at pixel centres, the geometry of the image resize.
- the randomness of sample ``i`` in epoch ``e`` comes from ``numpy.random.default_rng([seed, e, i])``:
  it does not depend on worker processes, the order of loading, or a resumed run.

Arrays: a slice is ``(H, W)`` = ``(y, x)``; boxes are ``(x0, y0, x1, y1)``, inclusive pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MedSAMError
from ..segmentation.preprocessing import PreparedSlice, box_to_model, prepare_slice
from .preprocess import CaseArrays, load_case, load_manifest

LOW_RES = 256  # side of the mask decoder's logit grid


def mask_to_low_res(mask: np.ndarray, prepared: PreparedSlice, low_res: int = LOW_RES) -> np.ndarray:
    """Put a slice mask on the model's ``low_res x low_res`` logit grid.

    Args:
        mask: ``(H, W)`` boolean (or 0/1) mask on the slice grid.
        prepared: the slice's :class:`~MedSAMSlicerLib.segmentation.preprocessing.PreparedSlice` (its
            ``resized_hw`` inside the ``S x S`` input gives the region the image fills).
        low_res: side of the logit grid (256 for SAM's decoder).

    Returns:
        ``(low_res, low_res)`` ``float32`` 0/1 mask; zero in the padding.
    """
    m = np.asarray(mask).astype(bool)
    h, w = m.shape
    s = prepared.input_size
    rh, rw = prepared.resized_hw
    mh = max(1, int(round(rh * low_res / s)))
    mw = max(1, int(round(rw * low_res / s)))
    rows = np.minimum(((np.arange(mh) + 0.5) * h / mh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(mw) + 0.5) * w / mw).astype(np.int64), w - 1)
    out = np.zeros((low_res, low_res), dtype=np.float32)
    out[:mh, :mw] = m[np.ix_(rows, cols)]
    return out


def mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """Tight bounding box ``(x0, y0, x1, y1)`` (inclusive) of a non-empty ``(H, W)`` mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise MedSAMError("cannot take the box of an empty mask")
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def jitter_box(box: Sequence[int], hw: Tuple[int, int], jitter: int, rng: np.random.Generator) -> np.ndarray:
    """Move each side of ``box`` outward by ``randint(0, jitter)`` px (inclusive), clipped to ``hw``.

    Draws four integers from ``rng`` in the order x0, y0, x1, y1.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = hw
    d = rng.integers(0, int(jitter) + 1, size=4) if jitter > 0 else np.zeros(4, dtype=np.int64)
    return np.array(
        [max(0, x0 - d[0]), max(0, y0 - d[1]), min(w - 1, x1 + d[2]), min(h - 1, y1 + d[3])], dtype=np.float64
    )


@dataclass
class _Slice:
    case: int
    row: int
    labels: Tuple[int, ...]


class SliceDataset(Dataset):
    """The slices of one split of a preprocessed dataset, as model-ready samples.

    Each item is a dict:

    - ``image``: ``(3, S, S)`` float32 in [0, 1] (``S`` = model input size),
    - ``mask``: ``(1, 256, 256)`` float32 0/1 target on the logit grid (see module doc),
    - ``box``: ``(4,)`` float32 ``(x0, y0, x1, y1)`` in model-input pixels,
    - ``label``: int64 label id of the structure, ``index``: int64 the item's index.

    Args:
        prep_dir: folder written by :func:`~MedSAMSlicerLib.training.preprocess.preprocess_dataset`.
        split: ``"train"``, ``"val"`` or ``"all"``.
        method: the model's preprocessing, ``"litemedsam"`` or ``"medsam"``.
        input_size: the model's input size ``S`` (256 or 1024).
        jitter: box jitter in slice pixels (``train_one_gpu.py``: 20).
        seed: base of the per-sample random generators.
        labels: train only on these label ids (``None``: all).

    The preprocessed cases are read once and kept in memory (``uint8``; about 0.5 MB per
    512x512 slice with its labels).
    """

    def __init__(
        self,
        prep_dir: Union[str, Path],
        split: str = "train",
        method: str = "litemedsam",
        input_size: int = 256,
        jitter: int = 20,
        seed: int = 2023,
        labels: Optional[Sequence[int]] = None,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise MedSAMError(f"split must be train, val or all; got '{split}'")
        if jitter < 0:
            raise MedSAMError(f"box jitter must be >= 0 pixels; got {jitter}")
        self.prep_dir = Path(prep_dir)
        self.manifest = load_manifest(self.prep_dir)
        self.split = split
        self.method = method
        self.input_size = int(input_size)
        self.jitter = int(jitter)
        self.seed = int(seed)
        self.epoch = 0
        self.only_labels = None if labels is None else tuple(sorted(int(v) for v in labels))
        self.case_names: List[str] = []
        self._files: List[Path] = []
        self._stamps: List[int] = []
        self._cases: Dict[int, CaseArrays] = {}
        self._slices: List[_Slice] = []
        for name, entry in self.manifest["cases"].items():
            if entry.get("file") is None or (split != "all" and entry.get("split") != split):
                continue
            self.case_names.append(name)
            path = (self.prep_dir / entry["file"]).resolve()
            if not path.is_file():
                raise MedSAMError(
                    f"'{path}' is listed in the manifest but missing; run 'medsam-train preprocess' again"
                )
            self._files.append(path)
            self._stamps.append(path.stat().st_mtime_ns)
        for ci in range(len(self.case_names)):
            arrays = self.case(ci)
            for row in range(arrays.labels.shape[0]):
                present = tuple(int(v) for v in np.unique(arrays.labels[row]) if v != 0)
                if self.only_labels is not None:
                    present = tuple(v for v in present if v in self.only_labels)
                if present:
                    self._slices.append(_Slice(ci, row, present))

    def case(self, ci: int) -> CaseArrays:
        """The arrays of case number ``ci`` (loaded on first use)."""
        if ci not in self._cases:
            self._cases[ci] = load_case(self._files[ci])
        return self._cases[ci]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws :meth:`__getitem__` makes."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._slices)

    def slice_key(self, index: int) -> Tuple[str, int]:
        """``(case name, canonical z)`` of item ``index``."""
        s = self._slices[index]
        return self.case_names[s.case], int(self.case(s.case).z[s.row])

    def slice_id(self, index: int) -> Tuple[str, int, int]:
        """A key that names item ``index``'s slice across datasets: ``(npz path, its mtime_ns, row)``."""
        s = self._slices[index]
        return str(self._files[s.case]), self._stamps[s.case], s.row

    def slice_labels(self, index: int) -> Tuple[int, ...]:
        """Label ids present on item ``index``'s slice (after the ``labels`` filter)."""
        return self._slices[index].labels

    def slice_arrays(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(image (H, W) uint8, labels (H, W) uint8)`` of item ``index``."""
        s = self._slices[index]
        arrays = self.case(s.case)
        return arrays.images[s.row], arrays.labels[s.row]

    def prepare(self, index: int) -> PreparedSlice:
        """The model input of item ``index``'s slice (the same in every epoch)."""
        image, _ = self.slice_arrays(index)
        return prepare_slice(image, self.method, self.input_size)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        s = self._slices[index]
        image, labels = self.slice_arrays(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        label = int(s.labels[int(rng.integers(0, len(s.labels)))])
        mask = labels == label
        box = jitter_box(mask_box(mask), mask.shape, self.jitter, rng)
        prepared = prepare_slice(image, self.method, self.input_size)
        return {
            "image": prepared.image,
            "mask": torch.from_numpy(mask_to_low_res(mask, prepared))[None],
            "box": torch.from_numpy(box_to_model(box, prepared).astype(np.float32)),
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(int(index), dtype=torch.int64),
        }
