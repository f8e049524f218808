"""Segment one structure from a box and save a Slicer segmentation, without the GUI.

Installed with the extension (``<extension>/lib/Slicer-X.Y/qt-scripted-modules/MedSAMBridgeLib/
medsam_headless.py``; docs/slicer.md, "Headless", gives the command per platform), and runs
unchanged in two places:

* in Slicer:  ``Slicer --no-main-window --python-script <that file> --volume CT.nii.gz
  --box-ras R0 A0 S0 R1 A1 S1 --output out.seg.nrrd [--model litemedsam] [--segment-name liver]``
* in plain Python with the ``slicer-core`` wheel:  ``python <that file> ...`` (the source tree's
  ``scripts/medsam_headless.py`` runs this file).

Without ``slicer.app`` it builds the MRML scene and the module logics itself
(``MedSAMBridgeLib.headless.create_headless_scene``). Either way it loads the volume with
the Volumes logic, runs the same bridge the Segment Editor effect uses, and writes the
``.seg.nrrd`` with the segmentation's storage node, through the engine's one writer. Bad input
ends, before any model loads, with exit code 2 and one line saying what to fix (as every
``medsam-slicer`` command: docs/safety.md); other failures with exit code 1; Ctrl+C with 130 and
SIGTERM with 143, nothing written.

``--install-dependencies`` installs what is missing with the first-use plan the panels use
(``MedSAMBridgeLib.installs``), in this process's terminal: no question, no dialog (Slicer 5.12's
``slicer.util.pip_install`` would open a modal progress dialog), so it needs no display.

The box is two opposite corners in RAS millimetres (Slicer's world coordinates). A box that
spans several slices bounds the propagation (LiteMedSAM's 3D box); a flat box (S0 == S1) is drawn
on one slice and the propagation finds the structure's extent (``--direction``). ``--box-ras``
given several times makes one segment from all the boxes (the bridge's ``boxes_ras``): flat boxes
on one slice are its pieces, on several slices its key slices; a 3D box among them gives the z-range
(``MedSAMSlicerLib.boxes.structure_prompts``).
"""

import argparse
import os
import sys
import time


def _add_module_path():
    """Put the folder holding MedSAMBridgeLib / MedSAMSlicerLib (this file's package's parent)
    first on sys.path: this file's own engine is the one used, also when another copy is installed."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0])))
    if sys.path[:1] != [here]:
        sys.path.insert(0, here)


def build_parser():
    from MedSAMSlicerLib.boxes import DIRECTIONS  # main() has put the engine on sys.path
    from MedSAMSlicerLib.models.speed import DEFAULT_SPEED, SPEED_TIERS

    parser = argparse.ArgumentParser(
        prog="medsam_headless.py",
        description="Segment one structure with MedSAM from a box in RAS and save a .seg.nrrd.",
    )
    parser.add_argument("--volume", required=True, help="input volume (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--box-ras", required=True, nargs=6, type=float, action="append",
                        metavar=("R0", "A0", "S0", "R1", "A1", "S1"),
                        help="two opposite box corners in RAS millimetres; repeat it for one segment from several "
                             "boxes: on one slice its pieces, on several slices its key slices")
    parser.add_argument("--output", required=True, help="output segmentation, .seg.nrrd")
    parser.add_argument("--segment-name", default="MedSAM", help="name of the new segment (default MedSAM)")
    parser.add_argument("--segmentation", help="add the segment to this existing .seg.nrrd instead of a new one")
    parser.add_argument("--others", default="none", choices=["none", "all"],
                        help="with --segmentation: 'all' removes the new segment's voxels from the other segments")
    parser.add_argument("--model", default="litemedsam", help="litemedsam (default), medsam or medsam2")
    parser.add_argument("--checkpoint", help="weights file to use instead of the registry's (e.g. fine-tuned)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--speed", default=DEFAULT_SPEED, choices=list(SPEED_TIERS),
                        help="exact (default), fast or fastest: what the model may trade for speed on a CPU "
                             "(fast and fastest need OpenVINO; see docs/performance.md)")
    parser.add_argument("--direction", default="both", choices=DIRECTIONS,
                        help="propagation direction for a flat box")
    parser.add_argument("--slice-only", action="store_true", help="segment only the box's slice (2D)")
    window = parser.add_mutually_exclusive_group()
    window.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window, e.g. 40 400")
    window.add_argument("--preset", default="auto",
                        help="auto (default: CT abdomen window L40/W400 for CT, percentile scaling for MR), "
                             "abdomen, lung, bone, brain, mr, or display (the volume's display window)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="first install what is missing (PyTorch, scipy, the model's weights, OpenVINO for "
                             "--speed fast/fastest) into this Python, without asking and without a dialog")
    return parser


def run(args):
    """Do the work; returns the new segment's ID. Raises MedSAMError on bad input."""

    from MedSAMBridgeLib import headless
    from MedSAMBridgeLib.MRMLBridge import MedSAMBridge
    from MedSAMSlicerLib.errors import MedSAMError
    from MedSAMSlicerLib.fileio.atomic import check_output
    from MedSAMSlicerLib.fileio.integrity import check_image_file
    from MedSAMSlicerLib.fileio.userfiles import check_regular_file
    from MedSAMSlicerLib.fileio.volumes import check_volume_file
    from MedSAMSlicerLib.progress import TerminalProgress

    # Everything the command line checks, before any module or model loads: the inputs (regular
    # files, complete, readable headers) and the output (name, folder, links, --overwrite).
    if not args.output.lower().endswith(".seg.nrrd"):
        raise MedSAMError(f"the output must be a Slicer segmentation file ending in .seg.nrrd; got '{args.output}'")
    check_volume_file(args.volume, "volume file")
    inputs = [args.volume]
    if args.segmentation:
        check_image_file(args.segmentation, "segmentation file")
        inputs.append(args.segmentation)
    if args.checkpoint:
        check_regular_file(args.checkpoint, "checkpoint file")
    output = os.fspath(check_output(os.path.abspath(args.output), args.overwrite, inputs=inputs,
                                    formats=(".seg.nrrd",)))
    if args.install_dependencies:
        from MedSAMBridgeLib import installs

        setup = installs.FirstUse(lambda: installs.plan_installs(args.model, args.checkpoint,
                                                                 installs.speed_requirements(args.speed)))
        if setup.problem or (not setup.ready and not setup.run(TerminalProgress("install"), log=print)):
            raise MedSAMError(setup.message)

    scene = headless.create_headless_scene()
    volume = headless.load_volume(args.volume)
    if args.segmentation:
        segmentation = headless.load_segmentation(args.segmentation)
    else:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAM")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)

    window = tuple(args.window) if args.window else args.preset
    boxes = [[r[:3], r[3:]] for r in args.box_ras]
    bridge = MedSAMBridge(model=args.model, checkpoint=args.checkpoint, device=args.device, speed=args.speed)
    start = time.perf_counter()
    segment_id, prediction = bridge.segment(
        volume,
        segmentation,
        None,
        box_ras=boxes[0] if len(boxes) == 1 else None,
        boxes_ras=boxes if len(boxes) > 1 else None,
        mode="2d" if args.slice_only else "3d",
        direction=args.direction,
        window=window,
        overwrite=args.others,
        segment_name=args.segment_name,
        progress=TerminalProgress("MedSAM"),
    )
    headless.save_node(segmentation, output, overwrite=args.overwrite)
    # Slices named as the volume's own index (what Slicer's Data Probe shows), not our canonical z.
    name_slice = prediction.source.orientation.slice_to_index
    axis, k = name_slice(prediction.prompt.z)
    where = f"box on slice {axis}={k}"
    if len(boxes) > 1:
        zs = sorted({name_slice(z)[1] for z in prediction.result.locked})
        where = f"{len(boxes)} boxes on slice(s) {', '.join(f'{axis}={z}' for z in zs)}"
    if prediction.covered:
        ends = sorted(name_slice(z)[1] for z in (prediction.covered[0], prediction.covered[-1]))
        where += f", segmented {axis} {ends[0]}..{ends[1]}"
    print(
        f"{args.segment_name}: {prediction.voxel_count} voxels on {len(prediction.covered)} slice(s) "
        f"({where}) in {time.perf_counter() - start:.1f} s -> {output}"
    )
    for direction, note in prediction.notes.items():
        print(f"  {direction}: {note}")
    return segment_id


def main(argv=None):
    """Exit status: 0 done, 2 bad input or command-line error (one line on stderr), 1 another
    failure, 130 interrupted, 143 terminated."""
    _add_module_path()
    try:
        from MedSAMSlicerLib.errors import MedSAMError
    except ImportError as exc:
        print(f"error: cannot import the MedSAM engine ({exc}); run from the source tree or install the extension",
              file=sys.stderr)
        return 1
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage
        return int(exc.code or 0)
    from MedSAMSlicerLib.progress import Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            run(args)
    except MedSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("\nterminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except ImportError as exc:
        print(f"error: a Python package is missing ({exc}); pass --install-dependencies to install what MedSAM "
              "needs", file=sys.stderr)
        return 1
    except Exception as exc:  # anything else: say so, with a non-zero status
        import traceback

        traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    try:
        import slicer

        in_slicer = getattr(slicer, "app", None) is not None
    except ImportError:
        in_slicer = False
    if in_slicer:
        slicer.util.exit(status)
    else:
        sys.exit(status)
