"""``medsam-slicer demo``: five organs of a real CT, each from one box on one slice.

The boxes play the user: each is the tight bounding box of the reference label on the slice
where that label is largest. The extent in z is found automatically. Each structure's 3D Dice
against TotalSegmentator's labels is printed with the seconds it took, and the result is written
as a Slicer ``.seg.nrrd`` plus a PNG figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .data import DEMO_STRUCTURES, STRUCTURE_COLORS, example_ct, example_ct_labels
from .metrics import dice
from .progress import TerminalProgress


def reference_box(mask_zyx: np.ndarray, pad: int = 0) -> Tuple[int, Tuple[int, int, int, int]]:
    """The slice where ``mask_zyx`` is largest and its bounding box there, ``(z, (x0, y0, x1, y1))``."""
    areas = mask_zyx.sum(axis=(1, 2))
    z = int(np.argmax(areas))
    ys, xs = np.nonzero(mask_zyx[z])
    h, w = mask_zyx.shape[1:]
    box = (max(0, int(xs.min()) - pad), max(0, int(ys.min()) - pad),
           min(w - 1, int(xs.max()) + pad), min(h - 1, int(ys.max()) + pad))
    return z, box


@dataclass
class DemoRow:
    """One structure's demo result."""

    name: str
    dice: float
    seconds: float
    z_extent: Optional[Tuple[int, int]]
    reference_extent: Tuple[int, int]
    mask: np.ndarray


def run_demo(
    out_dir: Path,
    model: str = "litemedsam",
    checkpoint: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    download: bool = False,
    structures: Optional[Dict[str, int]] = None,
    quiet: bool = False,
    segmenter=None,
    data: Optional[Path] = None,
    speed: str = "exact",
) -> List[DemoRow]:
    """Run the demo; write ``demo.seg.nrrd`` and ``demo.png`` to ``out_dir``; return the rows.

    ``structures`` maps names to TotalSegmentator label ids (default: five organs); ``segmenter``
    reuses a loaded :class:`~MedSAMSlicerLib.segmenter.Segmenter`; ``data`` is the example data
    folder (default ``$MEDSAM_SLICER_DATA``, see :func:`~MedSAMSlicerLib.data.data_dir`);
    ``speed`` is a :data:`~MedSAMSlicerLib.models.speed.SPEED_TIERS` name for a new segmenter.
    """
    from .fileio.segnrrd import write_seg_nrrd
    from .fileio.volumes import read_volume
    from .segmentation.preprocessing import Window
    from .segmenter import Segmenter

    structures = structures or DEMO_STRUCTURES
    volume = read_volume(example_ct(data))
    labels = read_volume(example_ct_labels(data), labels=True).array
    t0 = time.perf_counter()
    seg = segmenter or Segmenter(model, checkpoint=checkpoint, device=device, precision=precision, download=download,
                                 speed=speed)
    seg.set_volume(volume.array, Window.preset("abdomen"))
    if not quiet:
        print(f"{seg.describe()} (loaded in {time.perf_counter() - t0:.1f} s)")
        print(f"volume {example_ct(data).name}: {volume.array.shape[::-1]} voxels (x, y, z), spacing {volume.spacing} mm")
    rows: List[DemoRow] = []
    for name, label in structures.items():
        ref = labels == label
        z, box = reference_box(ref)
        t = time.perf_counter()
        progress = None if quiet else TerminalProgress(f"{name:13s}")
        result = seg.segment_3d(z, box, progress=progress)
        seconds = time.perf_counter() - t
        zs = np.nonzero(ref.any(axis=(1, 2)))[0]
        row = DemoRow(name, dice(result.mask, ref), seconds, result.z_extent, (int(zs.min()), int(zs.max())), result.mask)
        rows.append(row)
        if not quiet:
            print(f"{name:13s} Dice {row.dice:.3f}  {seconds:5.1f} s  slices {row.z_extent} "
                  f"(reference {row.reference_extent})  box on slice {z}: {box}")
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / "demo.seg.nrrd"
    write_seg_nrrd([(r.name, r.mask, STRUCTURE_COLORS.get(r.name, (0.5, 0.5, 0.5))) for r in rows], volume, seg_path)
    png = out_dir / "demo.png"
    save_figure(volume.array, rows, labels, png, spacing=volume.spacing)
    if not quiet:
        mean = float(np.mean([r.dice for r in rows]))
        print(f"mean Dice {mean:.3f}; total {time.perf_counter() - t0:.1f} s; wrote {seg_path} and {png}")
    return rows


def save_figure(
    ct_zyx: np.ndarray,
    rows: List[DemoRow],
    labels: np.ndarray,
    path: Path,
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    """Axial slices through each structure and a coronal view, results as coloured outlines
    (filled) and the reference as thin white contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .segmentation.preprocessing import Window, apply_window

    img = apply_window(ct_zyx, Window.preset("abdomen"))
    panels = [("axial", r.name, int(np.argmax(r.mask.sum(axis=(1, 2))))) for r in rows[:4]]
    union = np.zeros(ct_zyx.shape, dtype=bool)
    for r in rows:
        union |= r.mask
    y_cor = int(np.argmax(union.sum(axis=(0, 2))))
    panels.append(("coronal", "all", y_cor))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (view, name, index) in zip(axes, panels):
        if view == "axial":
            base = img[index]
            layers = [(r, r.mask[index]) for r in rows]
            aspect = spacing[1] / spacing[0]
            title = f"axial z={index} ({name})"
            origin = "upper"
        else:
            base = img[:, index, :]
            layers = [(r, r.mask[:, index, :]) for r in rows]
            aspect = spacing[2] / spacing[0]
            title = f"coronal y={index}"
            origin = "lower"
        ax.imshow(base, cmap="gray", aspect=aspect, origin=origin, interpolation="nearest")
        for r, m in layers:
            if m.any():
                color = STRUCTURE_COLORS.get(r.name, (1.0, 1.0, 0.0))
                ax.imshow(np.ma.masked_where(~m, m), cmap=ListedColormap([color]), alpha=0.45,
                          aspect=aspect, origin=origin, interpolation="nearest")
                ax.contour(m, levels=[0.5], colors=[color], linewidths=1.0)
        ref_slice = labels[index] if view == "axial" else labels[:, index, :]
        ax.contour(np.isin(ref_slice, list(DEMO_STRUCTURES.values())), levels=[0.5], colors="white",
                   linewidths=0.6, linestyles="dotted")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    legend = ", ".join(f"{r.name} {r.dice:.2f}" for r in rows)
    fig.suptitle(f"MedSAM for 3D Slicer demo (LiteMedSAM, one box per organ). 3D Dice: {legend}\n"
                 "filled: ours; white dotted: TotalSegmentator reference", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
