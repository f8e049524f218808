"""``medsam-slicer``: box-prompted MedSAM / LiteMedSAM segmentation from the command line.

Subcommands: ``segment`` (one structure from one box), ``demo`` (the shipped CT, five organs),
``models`` (what is installed), ``bench`` (speed against the reference pipeline), ``evaluate``
(quality on labelled volumes, :mod:`MedSAMSlicerLib.evaluation`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .boxes import DIRECTIONS
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
is never replaced unless --overwrite is given (not even one created while the model runs), and
the input itself never is.

Before the model loads, the input is checked: a truncated or damaged file, a DICOM series with
a missing or unreadable slice or uneven spacing (--allow-gaps reads it anyway), NaN or infinite
voxels, or a blank volume end the run with a message, as do a box under 2 voxels across and an
output that cannot be written. A window that shows next to nothing of the image gets a warning.
"""


EVALUATE_HELP = """\
Measure segmentation quality on labelled volumes. For each structure a simulated user draws the
label's bounding box on the middle slice of its extent; the structure is segmented with its true
z-range ("3d") and from the box alone, its extent found automatically ("2d"). Per structure:
Dice, normalised surface Dice (FLARE22's NSD; FLARE22's tolerance for its organs, else 3 mm),
slices found vs true, seconds. Writes evaluation.csv, summary.md and evaluation.png.

Variants compare settings in one run (slices are encoded once for all of them):
  medsam-slicer evaluate --variant default --variant original
  medsam-slicer evaluate --variant default --variant narrow wider_box=0 --include 'ct/*'
Settings (PropagationSettings): margin, wider_box, confidence_gain, auto_stop, wider_box_when,
wider_max_growth, follow_parts, part_min_fraction, part_min_px, box_jitter, zoom_below,
zoom_context; stop.<field> (StopRule: min_pixels, max_intensity_shift, intensity_scale,
min_spread, min_area_fraction, min_overlap, grow_px, min_score, max_slices); window.
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
    g.add_argument("--preset", default="auto",
                   help="auto (default: CT abdomen window L40/W400 for CT, percentile scaling for MR), "
                        "abdomen, lung, bone, brain, or mr")


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
    seg.add_argument("--direction", default="both", choices=DIRECTIONS, help="propagation direction (2D box)")
    seg.add_argument("--slice-only", action="store_true",
                     help="segment only the box's slice (a 3D box: its middle slice), no propagation")
    seg.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    seg.add_argument("--allow-gaps", action="store_true",
                     help="read a DICOM series with missing slices or uneven spacing anyway (slices are moved "
                          "onto a uniform grid; the note says by how much)")
    _add_model_args(seg)
    _add_window_args(seg)

    demo = sub.add_parser("demo", help="segment five organs of the shipped CT and compare with its reference labels")
    demo.add_argument("--out", default="medsam-demo", help="output folder (default ./medsam-demo)")
    demo.add_argument("--data", help="the example data folder (default $MEDSAM_SLICER_DATA; in a clone of the "
                                     "repository: Testing/Data/totalsegmentator)")
    _add_model_args(demo)

    sub.add_parser("models", help="list the models, where their weights come from, and whether they are installed")

    ev = sub.add_parser(
        "evaluate",
        help="measure segmentation quality on labelled volumes, as a user would draw boxes",
        description=EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("inputs", nargs="*", help="evaluation set files (.toml/.json) or FLARE22-layout folders "
                    "(none: the set built from the shipped data, Testing/Data/evaluation_set.toml)")
    ev.add_argument("--image", action="append", default=[], help="an image to evaluate on (with --labels; repeatable)")
    ev.add_argument("--labels", action="append", default=[], help="its labelmap or .seg.nrrd (one per --image)")
    ev.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a variant to compare (repeatable): 'default', 'original' (LiteMedSAM's own 3D "
                         "algorithm), or a new name followed by settings, e.g. --variant strict stop.min_overlap=0.7")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="common",
                    help="a setting for every variant (repeatable)")
    ev.add_argument("--modes", default="3d,2d", help="3d (true z-range), 2d (automatic extent) or both (default 3d,2d)")
    ev.add_argument("--box-margin", type=int, default=0, help="pixels around the label's box (default 0: tight)")
    ev.add_argument("--include", action="append", default=[], metavar="PATTERN",
                    help="only structures matching case/structure glob patterns, e.g. 'mr/*' (repeatable)")
    ev.add_argument("--min-slices", type=int, default=5, help="skip structures on fewer slices (default 5)")
    ev.add_argument("--out", default="medsam-evaluation", help="output folder (default ./medsam-evaluation)")
    ev.add_argument("--embedding-cache", metavar="DIR", help="keep slice embeddings in DIR between runs")
    ev.add_argument("--threads", type=int, help="CPU threads (default: all; 1 is fastest on a busy machine)")
    _add_model_args(ev)

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
    if getattr(args, "preset", None) and args.preset.lower() != "auto":
        return Window.preset(args.preset)
    return None  # automatic: chosen from the volume by Segmenter.set_volume (Window.automatic)


#: Embedding-cache cap of a one-shot ``segment`` run. The propagation needs only the batch of
#: slices being encoded (1 on a CPU, 16 x 4 MB on a GPU); keeping every slice's embedding, as
#: the interactive front ends do, only grew the process (liver, 43 slices, CPU: +398 MiB during
#: the propagation; +220 MiB with this cap; README "Memory, as measured").
ONE_SHOT_CACHE_MB = 80


def _box_too_thin(volume, box, box_ijk, box_ras) -> Optional[str]:
    """Why a canonical box is too thin for the model (< 2 voxels across in the axial plane),
    said in the coordinates the user typed; ``None`` when it is fine."""
    x0, y0, _, x1, y1, _ = box
    thin = [c for c, (a, b) in enumerate(((x0, x1), (y0, y1))) if b - a < 1]
    if not thin:
        return None
    axes = volume.orientation.axes
    if box_ijk is not None:
        names = ["ijk"[axes[c]] for c in (0, 1)]
        parts = [f"{'ijk'[axes[c]]}0={box_ijk[axes[c]]:g} and {'ijk'[axes[c]]}1={box_ijk[axes[c] + 3]:g}" for c in thin]
        return (f"the box is a single voxel wide ({'; '.join(parts)}); on its axial slice it must span at least 2 "
                f"voxels in {names[0]} and in {names[1]}: draw it around the structure")
    spacing = volume.spacing
    parts = [f"{'RA'[c]}0={box_ras[c]:g} and {'RA'[c]}1={box_ras[c + 3]:g} mm" for c in thin]
    return (f"the box covers a single voxel across ({'; '.join(parts)}; the voxels are {spacing[0]:g} x "
            f"{spacing[1]:g} mm); it must span at least 2 voxels in R and in A: draw it around the structure")


def _slices_text(volume, zs: Sequence[int]) -> str:
    """Canonical slices as the file's indices, e.g. ``"k 70..95"``."""
    named = [volume.orientation.slice_to_index(z) for z in zs]
    if not named:
        return "no slice"
    axis = named[0][0]
    values = sorted(v for _, v in named)
    return f"{axis}={values[0]}" if values[0] == values[-1] else f"{axis} {values[0]}..{values[-1]}"


def _stops_text(volume, result, z_start: int) -> str:
    """Why each direction of a propagation ended, with slices named by the file's index."""
    parts = []
    for direction in result.stop_reasons:
        rejected = [r for r in result.slices if not r.accepted and (r.z > z_start if direction == "up" else r.z < z_start)]
        if rejected:
            parts.append(f"{direction}: stopped at {_slices_text(volume, [rejected[0].z])}: {rejected[0].reason}")
        else:
            parts.append(f"{direction}: {result.stop_reasons[direction]}")
    return "; ".join(parts)


def _note(text: str) -> None:
    print(f"medsam-slicer: note: {text}", file=sys.stderr)


def review_path(output: Path) -> Path:
    """Where ``segment`` writes a result's review: beside the output, ``liver.seg.nrrd`` ->
    ``liver.review.json``."""
    name = output.name
    for ext in sorted((".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha"), key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return output.with_name(name + ".review.json")


def write_review_report(volume, result, output: Path, name: str, overwrite: bool = False) -> Path:
    """Write the review of a 3D result (:func:`~MedSAMSlicerLib.review.review_report`: per slice, as
    the file's index, the predicted IoU, area, doubtful flag and reason; why each end stopped)
    beside ``output`` (:func:`review_path`), atomically, never over an existing file without
    ``overwrite``; returns its path."""
    import json

    from .atomic import atomic_write
    from .review import review_report

    report = {"segment": name, "output": output.name, **review_report(result, volume.orientation.slice_to_index)}
    text = json.dumps(report, indent=2) + "\n"
    return atomic_write(review_path(output), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


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
    allow_gaps: bool = False,
    speed: str = "exact",
) -> str:
    """Segment one structure of a volume file and write it on the file's grid.

    Everything that can be checked without the model is checked first, before torch is even
    imported: the output (name, extension, folder writable, not the input, not existing without
    ``overwrite``), the volume (:func:`~MedSAMSlicerLib.volumes.read_volume`'s checks) and the
    box. The output is published atomically and, without ``overwrite``, never replaces a file,
    even one created while the model ran. ``window`` is a
    :class:`~MedSAMSlicerLib.preprocessing.Window`, or a function returning one (called after
    the checks). ``segmenter`` reuses a loaded :class:`~MedSAMSlicerLib.segmenter.Segmenter`
    (and its embedding cache); otherwise one is made with a small cache (one-shot run) and
    ``speed``, a :data:`~MedSAMSlicerLib.speed.SPEED_TIERS` name.

    ``slice_only`` segments one slice: the box's slice, or a 3D box's middle slice (the slice its
    3D inference starts from). Slices are reported as the file's indices (e.g. ``k=21``).

    Returns:
        A one-line summary.
    """
    import warnings

    from .volumes import check_output, ijk_box_to_canonical, ras_box_to_canonical, read_volume

    if (box_ijk is None) == (box_ras is None):
        raise MedSAMError("give exactly one box: --box-ijk or --box-ras")
    if box_ijk is not None and len(box_ijk) != 6:
        raise MedSAMError(f"--box-ijk needs six numbers I0 J0 K0 I1 J1 K1; got {len(box_ijk)}")
    if box_ras is not None and len(box_ras) != 6:
        raise MedSAMError(f"--box-ras needs six numbers R0 A0 S0 R1 A1 S1; got {len(box_ras)}")
    out = check_output(output, overwrite, inputs=[volume_path])
    if not slice_only and not overwrite and review_path(out).exists():
        raise MedSAMError(f"{review_path(out)} exists (the review written beside the output); "
                          "pass --overwrite to replace it or choose another output name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the notes are printed below, in our words
        volume = read_volume(volume_path, allow_gaps=allow_gaps)
    for text in volume.notes:
        _note(text)
    if box_ijk is not None:
        box = ijk_box_to_canonical(volume, *box_ijk)
    else:
        box = ras_box_to_canonical(volume, box_ras[:3], box_ras[3:])
    problem = _box_too_thin(volume, box, box_ijk, box_ras)
    if problem:
        raise MedSAMError(problem)
    x0, y0, z0, x1, y1, z1 = box

    # Only now the model side (torch).
    import numpy as np

    from .preprocessing import Window, window_note
    from .propagation import box3d_middle_slice
    from .segmenter import Segmenter
    from .volumes import write_labelmap, write_seg_nrrd

    window = window() if callable(window) else window
    window = window or Window.automatic(volume.array)
    warning = window_note(volume.array, window)
    if warning:
        print(f"medsam-slicer: warning: {warning}", file=sys.stderr)
    t0 = time.perf_counter()
    if segmenter is None:
        segmenter = Segmenter(model, checkpoint=checkpoint, device=device, precision=precision, download=download,
                              cache_mb=ONE_SHOT_CACHE_MB, speed=speed,
                              progress=TerminalProgress("weights") if progress else None)
        print(segmenter.describe(), file=sys.stderr)
    segmenter.set_volume(volume.array, window)
    bar = TerminalProgress("propagating") if progress else None
    if slice_only:
        z = box3d_middle_slice(z0, z1)
        mask = np.zeros(volume.array.shape, dtype=bool)
        mask[z] = segmenter.segment_slice(z, (x0, y0, x1, y1)).mask
        how = f"slice {_slices_text(volume, [z])} only" + ("" if z0 == z1 else ", the 3D box's middle slice")
    elif z0 == z1:
        result = segmenter.segment_3d(z0, (x0, y0, x1, y1), direction=direction, progress=bar)
        mask = result.mask
        how = _stops_text(volume, result, z0)
    else:
        result = segmenter.segment_box3d(box, progress=bar)
        mask = result.mask
        how = f"3D box, slices {_slices_text(volume, [z0, z1])}"
    if out.name.lower().endswith(".seg.nrrd"):
        write_seg_nrrd([(name, mask, (0.85, 0.35, 0.25))], volume, out, overwrite=overwrite)
    else:
        write_labelmap(mask.astype(np.uint8), volume, out, overwrite=overwrite)
    reviewed = "" if slice_only else f" and {write_review_report(volume, result, out, name, overwrite).name}"
    found = [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    where = f" ({_slices_text(volume, found)})" if found else ""
    return (f"{name}: {int(mask.sum())} voxels on {len(found)} slices{where} ({how}); "
            f"{time.perf_counter() - t0:.1f} s; wrote {out}{reviewed}")


def cmd_segment(args: argparse.Namespace) -> int:
    """``medsam-slicer segment``."""
    summary = segment_file(
        args.volume, Path(args.output), box_ijk=args.box_ijk, box_ras=args.box_ras, name=args.name,
        direction=args.direction, slice_only=args.slice_only, window=lambda: _window(args), overwrite=args.overwrite,
        model=args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
        download=args.download, allow_gaps=args.allow_gaps, speed=args.speed,
    )
    print(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medsam-slicer evaluate``: a thin wrapper of :func:`MedSAMSlicerLib.evaluation.run_evaluation`."""
    from .evaluation import run_evaluation

    if len(args.image) != len(args.labels):
        raise MedSAMError(f"give one --labels per --image; got {len(args.image)} images and {len(args.labels)} labels")
    run_evaluation(
        inputs=args.inputs, pairs=list(zip(args.image, args.labels)), variants=args.variant, common=args.common,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()], box_margin=args.box_margin,
        include=args.include, min_slices=args.min_slices, out=args.out, embedding_cache=args.embedding_cache,
        model=args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
        threads=args.threads,
    )
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
                     precision=args.precision, download=args.download, data=args.data,
                     speed=args.speed)
            return 0
        if args.command == "evaluate":
            return cmd_evaluate(args)
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
    except OSError as exc:  # the file system refused something no check foresaw (disk full, I/O error)
        where = f": '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"medsam-slicer: error: {exc.strerror or exc}{where}; nothing was written", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
