"""The benchmark case: the shipped CT, its window and a 3D box around a labelled structure."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ..errors import MedSAMError

LIVER_LABEL = 5  # TotalSegmentator "total" id, see data.DEMO_STRUCTURES


class Case:
    """The volume, window and 3D box (by default the liver's) both pipelines get.

    Args:
        n_slices: slices in the box, a run around the structure's middle; ``None``: the
            structure's whole extent (within slices ``1 .. depth - 2``, as the original's loop
            skips both end slices of its box).
        label: the TotalSegmentator label id of the structure (default the liver).
        name: the structure's name.

    Attributes:
        raw: ``(z, y, x)`` CT in HU (canonical axial order).
        image: the windowed ``uint8`` volume (L40/W400), the reference pipelines' input.
        truth: ``(z, y, x)`` boolean reference label of the structure.
        box3d: ``(x0, y0, z0, x1, y1, z1)`` inclusive, for ours: the x/y extent is the label's
            bounding box on the middle slice.
        ref_box3d: the same box as the original's loop takes it (``z0 - 1``, ``z1 + 1``: it skips
            both end slices of its box).
    """

    def __init__(self, n_slices: Optional[int], label: int = LIVER_LABEL, name: str = "liver") -> None:
        from ..data import example_ct, example_ct_labels
        from ..fileio.volumes import read_volume
        from ..segmentation.preprocessing import Window, apply_window

        self.name = name
        self.raw = read_volume(example_ct()).array
        labels = read_volume(example_ct_labels(), labels=True).array
        self.window = Window.preset("abdomen")
        self.image = apply_window(self.raw, self.window)
        self.truth = labels == label
        zs = np.nonzero(self.truth.any(axis=(1, 2)))[0]
        if zs.size == 0:
            raise MedSAMError(f"the example CT's labels have no {name}")
        depth = self.raw.shape[0]
        if n_slices is None:
            z0, z1 = max(1, int(zs.min())), min(depth - 2, int(zs.max()))
        else:
            zc = int((zs.min() + zs.max()) // 2)
            z0 = max(1, zc - (n_slices - 1) // 2)
            z1 = min(depth - 2, z0 + n_slices - 1)
            z0 = max(1, z1 - n_slices + 1)
        z_mid = int((z1 - z0) / 2 + z0)
        ys, xs = np.nonzero(self.truth[z_mid])
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        self.box3d = (x0, y0, z0, x1, y1, z1)
        self.ref_box3d = (x0, y0, z0 - 1, x1, y1, z1 + 1)
        self.z_mid = z_mid
        self.box2d = (x0, y0, x1, y1)
        self.zs = list(range(z0, z1 + 1))

    def describe(self) -> Dict[str, Any]:
        """JSON-ready description."""
        return {
            "volume": "example_ct.nii.gz (TotalSegmentator test data, 122x101x112, 3 mm)",
            "window": "L40/W400",
            "structure": self.name,
            "box3d_inclusive": list(self.box3d),
            "slices": len(self.zs),
            "middle_slice": self.z_mid,
        }
