"""``medsam-slicer``: box-prompted MedSAM / LiteMedSAM segmentation from the command line.

Subcommands: ``segment`` (one structure from one box), ``demo`` (the shipped CT, five organs),
``models`` (what is installed), ``bench`` (speed against the reference pipeline).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import MedSAMError
from .progress import Cancelled, TerminalProgress
from .speed import SPEED_TIERS

DESCRIPTION = """\
Segment a structure in a CT or MR volume with MedSAM or LiteMedSAM from one box.

Draw (or compute) a box around the structure on one axial slice; the model segments that slice
and follows the structure up and down slice by slice. Results are written on the input's own
grid, so they overlay the input in any viewer (3D Slicer, ITK-SNAP, ...).

examples:
  medsam-slicer demo
  medsam-slicer segment ct.nii.gz --box-ijk 30 20 60 80 70 60 -o liver.seg.nrrd --name liver
  medsam-slicer segment ct.nii.gz --box-ras -50 10 -300 20 80 -250 -o spleen.nii.gz
  medsam-slicer models
"""

SEGMENT_HELP = """\
The box is given either in voxel indices of the input file (--box-ijk I0 J0 K0 I1 J1 K1,
inclusive, as shown by 3D Slicer or ITK-SNAP) or in millimetres in RAS patient coordinates
(--box-ras R0 A0 S0 R1 A1 S1, the coordinates 3D Slicer shows). If both corners lie on the same
axial slice, that slice gets the 2D box and the structure's extent is found automatically. If the
corners span several slices, the box is a 3D box: its 2D box goes on its middle slice and its
height bounds the propagation (LiteMedSAM's 3D inference).

The output format follows the file name: .seg.nrrd (a 3D Slicer segmentation with the segment's
name and colour), or .nii.gz / .nii / .nrrd / .mha (a labelmap, value 1). An existing output file
is never replaced unless --overwrite is given.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="litemedsam", help="litemedsam (fast on a CPU, default) or medsam (ViT-B, for a GPU)")
    g.add_argument("--checkpoint", help="weights file to use instead of the default (e.g. one made by medsam-train)")
    g.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda or mps")
    g.add_argument("--precision", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16")
    g.add_argument("--download", action="store_true", help="allow downloading the model's weights if they are missing")
    g.add_argument("--speed", default="exact", choices=list(SPEED_TIERS),
                   help="; ".join(f"{t.name}: {t.note}" for t in SPEED_TIERS.values()))


def _add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intensity window").add_mutually_exclusive_group()
    g.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window, e.g. 40 400")
    g.add_argument("--preset", help="abdomen (default, L40/W400), lung, bone, brain, or mr (percentile scaling)")


def build_parser() -> argparse.ArgumentParser:
    """The ``medsam-slicer`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="medsam-slicer", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment one structure from one box",
        description=SEGMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument("volume", help="input volume: .nii/.nii.gz, .nrrd, .mha/.mhd, or a DICOM series folder")
    box = seg.add_mutually_exclusive_group(required=True)
    box.add_argument("--box-ijk", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"), help="box corners in voxel indices of the input (inclusive)")
    box.add_argument("--box-ras", nargs=6, type=float, metavar=("R0", "A0", "S0", "R1", "A1", "S1"), help="box corners in RAS millimetres")
    seg.add_argument("-o", "--output", required=True, help="output file: .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    seg.add_argument("--name", default="segment", help="segment name (in .seg.nrrd)")
    seg.add_argument("--direction", default="both", choices=["both", "up", "down"], help="propagation direction (2D box)")
    seg.add_argument("--slice-only", action="store_true", help="segment only the box's slice, no propagation")
    seg.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_model_args(seg)
    _add_window_args(seg)

    demo = sub.add_parser("demo", help="segment five organs of the shipped CT and compare with its reference labels")
    demo.add_argument("--out", default="medsam-demo", help="output folder (default ./medsam-demo)")
    _add_model_args(demo)

    sub.add_parser("models", help="list the models, where their weights come from, and whether they are installed")

    bench = sub.add_parser("bench", help="time our pipeline against the reference pipeline on the shipped CT")
    bench.add_argument("--models", default="litemedsam", help="comma-separated: litemedsam,medsam")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--out", default="medsam-bench.json", help="JSON results file")
    bench.add_argument("--quick", action="store_true", help="fewer slices and repeats (a smoke run)")
    bench.add_argument("--compare", default="reference", choices=["reference", "alternatives", "all"],
                       help="reference: ours against the reference pipelines (default); alternatives: LiteMedSAM's "
                            "CPU speed alternatives (OpenVINO, ONNX Runtime, bfloat16, every 2nd slice) against our "
                            "exact path, on the CPU; all: both")
    return parser


def _window(args: argparse.Namespace):
    from .preprocessing import Window

    if getattr(args, "window", None):
        return Window(level=args.window[0], width=args.window[1])
    if getattr(args, "preset", None):
        return Window.preset(args.preset)
    return Window.preset("abdomen")


def _check_output(path: Path, overwrite: bool) -> None:
    name = path.name.lower()
    if not name.endswith((".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")):
        raise MedSAMError(f"output '{path}' must end in .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    if path.exists() and not overwrite:
        raise MedSAMError(f"output '{path}' already exists; choose another name or pass --overwrite")


def segment_file(
    volume_path: str,
    output: Path,
    box_ijk: Optional[Sequence[float]] = None,
    box_ras: Optional[Sequence[float]] = None,
    name: str = "segment",
    direction: str = "both",
    slice_only: bool = False,
    window=None,
    overwrite: bool = False,
    segmenter=None,
    model: str = "litemedsam",
    checkpoint: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    download: bool = False,
    progress: bool = True,
    speed: str = "exact",
) -> str:
    """Segment one structure of a volume file and write it on the file's grid.

    Everything that can be checked without the model (output name, the volume, the box) is
    checked first; nothing is written unless the whole run succeeds. ``segmenter`` reuses a
    loaded :class:`~MedSAMSlicerLib.segmenter.Segmenter` (and its embedding cache); ``speed`` is
    a :data:`~MedSAMSlicerLib.speed.SPEED_TIERS` name for a new one.

    Returns:
        A one-line summary.
    """
    import numpy as np

    from .preprocessing import Window
    from .segmenter import Segmenter
    from .volumes import (
        ijk_box_to_canonical,
        ras_box_to_canonical,
        read_volume,
        write_labelmap,
        write_seg_nrrd,
    )

    out = Path(output)
    _check_output(out, overwrite)
    window = window or Window.preset("abdomen")
    volume = read_volume(volume_path)
    if (box_ijk is None) == (box_ras is None):
        raise MedSAMError("give exactly one box: --box-ijk or --box-ras")
    if box_ijk is not None:
        if len(box_ijk) != 6:
            raise MedSAMError(f"--box-ijk needs six numbers I0 J0 K0 I1 J1 K1; got {len(box_ijk)}")
        box = ijk_box_to_canonical(volume, *box_ijk)
    else:
        if len(box_ras) != 6:
            raise MedSAMError(f"--box-ras needs six numbers R0 A0 S0 R1 A1 S1; got {len(box_ras)}")
        box = ras_box_to_canonical(volume, box_ras[:3], box_ras[3:])
    x0, y0, z0, x1, y1, z1 = box
    t0 = time.perf_counter()
    if segmenter is None:
        segmenter = Segmenter(model, checkpoint=checkpoint, device=device, precision=precision,
                              download=download, progress=TerminalProgress("weights") if progress else None,
                              speed=speed)
        print(segmenter.describe(), file=sys.stderr)
    segmenter.set_volume(volume.array, window)
    bar = TerminalProgress("propagating") if progress else None
    if slice_only:
        mask = np.zeros(volume.array.shape, dtype=bool)
        mask[z0] = segmenter.segment_slice(z0, (x0, y0, x1, y1)).mask
        how = f"slice {z0} only"
    elif z0 == z1:
        result = segmenter.segment_3d(z0, (x0, y0, x1, y1), direction=direction, progress=bar)
        mask = result.mask
        how = "; ".join(f"{k}: {v}" for k, v in result.stop_reasons.items())
    else:
        result = segmenter.segment_box3d(box, progress=bar)
        mask = result.mask
        how = f"3D box, slices {z0}..{z1}"
    if out.name.lower().endswith(".seg.nrrd"):
        write_seg_nrrd([(name, mask, (0.85, 0.35, 0.25))], volume, out)
    else:
        write_labelmap(mask.astype(np.uint8), volume, out)
    return (f"{name}: {int(mask.sum())} voxels on {int(mask.any(axis=(1, 2)).sum())} slices ({how}); "
            f"{time.perf_counter() - t0:.1f} s; wrote {out}")


def cmd_segment(args: argparse.Namespace) -> int:
    """``medsam-slicer segment``."""
    summary = segment_file(
        args.volume, Path(args.output), box_ijk=args.box_ijk, box_ras=args.box_ras, name=args.name,
        direction=args.direction, slice_only=args.slice_only, window=_window(args), overwrite=args.overwrite,
        model=args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
        download=args.download, speed=args.speed,
    )
    print(summary)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``medsam-slicer models``."""
    from .registry import list_specs, resolve_weights

    for spec in list_specs():
        try:
            where = str(resolve_weights(spec))
        except MedSAMError as exc:
            where = f"not installed: {exc}"
        print(f"{spec.name:11s} {spec.title}: {spec.architecture}, {spec.input_size}px input\n            weights: {where}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``medsam-slicer``; returns the exit code (2 for bad input, 130 cancelled)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "segment":
            return cmd_segment(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(Path(args.out), model=args.model, checkpoint=args.checkpoint, device=args.device,
                     precision=args.precision, download=args.download, speed=args.speed)
            return 0
        if args.command == "bench":
            from .bench import run_bench

            run_bench(models=[m.strip() for m in args.models.split(",") if m.strip()], device=args.device,
                      out=Path(args.out), quick=args.quick, compare=args.compare)
            return 0
    except MedSAMError as exc:
        print(f"medsam-slicer: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("medsam-slicer: cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nmedsam-slicer: interrupted; nothing was written", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
