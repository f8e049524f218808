"""``medsam-slicer``: box-prompted MedSAM / LiteMedSAM segmentation from the command line.

Subcommands: ``segment`` (one structure from one box), ``demo`` (the shipped CT, five organs),
``models`` (what is installed), ``serve`` (the model over HTTP(S) for ``segment --server`` and
Slicer's Remote mode, :mod:`MedSAMSlicerLib.remote`), ``bench`` (speed against the reference pipeline), ``evaluate``
(quality on labelled volumes, :mod:`MedSAMSlicerLib.evaluation`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .boxes import DIRECTIONS
from .errors import MedSAMError
from .models.speed import SPEED_TIERS
from .progress import Cancelled, Terminated, sigterm_as_interrupt
from .segment_command import review_path, segment_file  # noqa: F401  (re-exported: the command's API)

DESCRIPTION = """\
Segment a structure in a CT or MR volume with MedSAM or LiteMedSAM from one box.

Draw (or compute) a box around the structure on one axial slice; the model segments that slice
and follows the structure up and down slice by slice. Results are written on the input's own
grid, so they overlay the input in any viewer (3D Slicer, ITK-SNAP, ...).

examples:
  medsam-slicer demo
  medsam-slicer segment ct.nii.gz --box-ijk 30 20 60 80 70 60 -o liver.seg.nrrd --name liver
  medsam-slicer segment ct.nii.gz --box-ras -50 10 -300 20 80 -250 -o spleen.nii.gz
  medsam-slicer segment ct.nii.gz --box-ijk ... --name liver --box-ijk ... --name spleen -o organs.seg.nrrd
  medsam-slicer segment ct.nii.gz --box-ijk ... --name iliacs --box-ijk ... --name iliacs -o iliacs.seg.nrrd
  medsam-slicer segment ct.nii.gz --replay organs.seg.nrrd -o again.seg.nrrd
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

Several structures: repeat --box-ijk / --box-ras, each with a --name (the n-th --name goes with the
n-th box), or list them in a --prompts file (JSON or TOML: name, box_ijk or box_ras, optional
color). They run as one job: each slice is encoded once for all of them, a slice's boxes are
decoded together, and a voxel two structures claim goes to the one the model is most confident
in (never to the first listed). A .seg.nrrd gets one segment each; a labelmap gets the value n
for the n-th structure (the summary lists them).

One structure from several boxes: give its boxes the same --name (in a --prompts file, several
entries with the same name). Boxes on one slice are its pieces (two iliac arteries, bowel loops):
each piece is followed from its own box and the masks are joined into one segment. Boxes on
several slices are its key slices: each keeps what its box gives, the slices between are filled
from both ends, and beyond the outermost the extent is found as from one box. A structure's 3D
boxes give its z-range: they must cover the same slices, and its flat boxes must lie inside it
(key slices within a known extent); without a 3D box the extent is found. A structure
with key slices is segmented on its own beside the others' job, so its overlaps with them are not
settled: the summary counts them, and such a run writes a .seg.nrrd only. Names equal only once
their spaces are collapsed ('liver' and 'liver ') are refused as two spellings.

Each .seg.nrrd segment records how it was made, in its Slicer segment tags (MedSAM.*): the boxes in
RAS, the model and the SHA-256 of its weights, the window, the speed and precision, the version
and the date. --replay FILE.seg.nrrd re-runs it on the same volume (refused if the volume's voxels
or the weights differ) and says whether each mask came out the same.

Before the model loads, the input is checked: a truncated or damaged file, a DICOM series with
a missing or unreadable slice or uneven spacing (--allow-gaps reads it anyway), NaN or infinite
voxels, or a blank volume end the run with a message, as do a box under 2 voxels across and an
output that cannot be written. A window that shows next to nothing of the image gets a warning.
A --prompts file and a --replay record are checked whole (types, ranges, every box) first too;
names are compared with their spaces collapsed. Exit code 2 and one line for any bad input,
nothing written (docs/safety.md).
"""


EVALUATE_HELP = """\
Measure segmentation quality on labelled volumes. For each structure a simulated user draws the
label's bounding box on the middle slice of its extent; the structure is segmented with its true
z-range ("3d") and from the box alone, its extent found automatically ("2d"); on request
("--modes per-slice") every labelled slice gets the label's own box, no propagation: the most box
prompts can give, as MedSAM's papers evaluate ("per-part": one box per piece). Per structure:
Dice, normalised surface Dice (FLARE22's NSD; FLARE22's tolerance for its organs, else 3 mm),
slices found vs true, seconds. Writes evaluation.csv, summary.md and evaluation.png (an earlier
run's results in --out are replaced only with --overwrite; docs/safety.md).

Variants compare settings in one run (slices are encoded once for all of them):
  medsam-slicer evaluate --variant default --variant original
  medsam-slicer evaluate --variant default --variant narrow wider_box=0 --include 'ct/*'
Settings (PropagationSettings): margin, wider_box, wider_box_relative, confidence_gain, auto_stop,
wider_box_when, wider_max_growth, follow_parts, part_min_fraction, part_min_px, box_jitter,
zoom_below, zoom_context, zoom_enlarge, rejoin (corrections), wider_first, key_corridor (key slices); stop.<field> (StopRule: min_pixels,
max_intensity_shift, intensity_scale, min_spread, min_area_fraction, min_overlap, grow_px,
min_score, max_slices, tip_growth, tip_slack_px); window (a preset,
LEVEL,WIDTH, or box: per structure, from the intensities around its box);
enlarge (area or cubic: how LiteMedSAM enlarges slices smaller than its input).

MedSAM2 (--model medsam2 --checkpoint YOUR_FILE) runs every mode its own way (SAM 2's memory; the
extent from its presence score and largest component); of the settings only window applies, and
--embedding-cache is for LiteMedSAM and MedSAM (docs/medsam2.md).
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="litemedsam",
                   help="litemedsam (fast on a CPU, default), medsam (ViT-B, for a GPU) or medsam2 (SAM 2 memory "
                        "propagation, for a GPU; needs the sam2 package and your weights file as --checkpoint)")
    g.add_argument("--checkpoint", help="weights file to use instead of the default (e.g. one made by medsam-train)")
    g.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda or mps")
    g.add_argument("--precision", default="auto",
                   help="auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16; bfloat16 on a CPU is "
                        "native only with AVX512-BF16 or AMX, emulated and slower elsewhere ('medsam-slicer models' "
                        "lists what this computer supports)")
    g.add_argument("--download", action="store_true", help="allow downloading the model's weights if they are missing")
    g.add_argument("--speed", default="exact", choices=list(SPEED_TIERS),
                   help="; ".join(f"{t.name}: {t.note}" for t in SPEED_TIERS.values()))


def _add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote GPU (docs/remote.md)")
    g.add_argument("--server", metavar="URL",
                   help="run the model on a 'medsam-slicer serve' server, e.g. https://gpu.example.org:8765 "
                        "(token from $MEDSAM_SLICER_TOKEN); the output and its record are the same as a local run's")
    g.add_argument("--server-ca", metavar="FILE",
                   help="CA certificate that signed the server's own certificate (default $MEDSAM_SLICER_CA)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a server request may take, and how long a server that went away is waited for "
                        "(default 60)")


def _add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intensity window").add_mutually_exclusive_group()
    g.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window, e.g. 40 400")
    g.add_argument("--preset", default="auto",
                   help="auto (default: CT abdomen window L40/W400 for CT, percentile scaling for MR), "
                        "abdomen, lung, bone, brain, or mr")


class _BoxAction(argparse.Action):
    """``--box-ijk`` / ``--box-ras``: appended to one list in the order given, with their kind."""

    def __call__(self, parser, namespace, values, option_string=None):
        boxes = list(getattr(namespace, self.dest, None) or [])
        boxes.append(("ijk" if option_string == "--box-ijk" else "ras", list(values)))
        setattr(namespace, self.dest, boxes)


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
    seg.add_argument("--box-ijk", nargs=6, type=float, action=_BoxAction, dest="boxes", default=[],
                     metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                     help="box corners in voxel indices of the input (inclusive); repeat for several structures")
    seg.add_argument("--box-ras", nargs=6, type=float, action=_BoxAction, dest="boxes",
                     metavar=("R0", "A0", "S0", "R1", "A1", "S1"),
                     help="box corners in RAS millimetres; repeat for several structures")
    seg.add_argument("-o", "--output", required=True, help="output file: .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    seg.add_argument("--name", action="append", dest="names",
                     help="the structure's name (the segment's name in .seg.nrrd); with several boxes one --name "
                          "per box, the n-th name for the n-th box; boxes with the same name are one structure (its "
                          "pieces, or key slices)")
    seg.add_argument("--prompts", metavar="FILE",
                     help="several structures from a JSON or TOML file: name, box_ijk or box_ras, optional color")
    seg.add_argument("--replay", metavar="SEG_NRRD",
                     help="re-run a .seg.nrrd written by medsam-slicer on the same volume (its boxes, model, weights, "
                          "window and speed come from the file)")
    seg.add_argument("--direction", default="both", choices=DIRECTIONS, help="propagation direction (2D box)")
    seg.add_argument("--slice-only", action="store_true",
                     help="segment only the box's slice (a 3D box: its middle slice), no propagation")
    seg.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    seg.add_argument("--allow-gaps", action="store_true",
                     help="read a DICOM series with missing slices or uneven spacing anyway (slices are moved "
                          "onto a uniform grid; the note says by how much)")
    _add_model_args(seg)
    _add_window_args(seg)
    _add_server_args(seg)

    demo = sub.add_parser("demo", help="segment five organs of the shipped CT and compare with its reference labels")
    demo.add_argument("--out", default="medsam-demo", help="output folder (default ./medsam-demo)")
    demo.add_argument("--data", help="the example data folder (default $MEDSAM_SLICER_DATA; in a clone of the "
                                     "repository: Testing/Data/totalsegmentator)")
    _add_model_args(demo)

    sub.add_parser("models", help="list the models, where their weights come from, whether they are installed, and "
                                  "which CPU features (bfloat16, fused kernels) this computer supports")

    srv = sub.add_parser("serve", help="serve the model over HTTP(S) to 'segment --server' and Slicer's Remote mode",
                         description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                          "needs a token)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    srv.add_argument("--token-file", help="file with the accepted bearer tokens, one per line (default: "
                                          "$MEDSAM_SLICER_TOKEN)")
    srv.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve https:// directly")
    srv.add_argument("--ssl-keyfile", help="its private key (PEM)")
    srv.add_argument("--cache-mb", type=int, default=4096, help="memory cap of the slice embeddings of all "
                                                               "sessions together (default 4096)")
    srv.add_argument("--session-cache-mb", type=int, default=None,
                     help=f"memory cap of one session's slice embeddings, 4 MiB a slice; over it a session drops its "
                          f"own least recently used ones and recomputes them when needed (default "
                          f"${SESSION_CACHE_ENV} or 1024)")
    srv.add_argument("--max-sessions", type=int, default=16, help="sessions (uploaded volumes) held at once (16)")
    srv.add_argument("--session-ttl", type=float, default=900.0, help="seconds an idle session is kept (900)")
    srv.add_argument("--max-upload-mb", type=int, default=256, help="largest upload, compressed (256 MiB)")
    srv.add_argument("--max-volume-mb", type=int, default=1024, help="largest volume, uncompressed (1024 MiB)")
    srv.add_argument("--rate-limit", type=float, default=50.0, help="requests a second per token (50; bursts "
                                                                   "twice that; 0: no limit)")
    _add_model_args(srv)

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
    ev.add_argument("--modes", default="3d,2d", help="comma-separated: 3d (true z-range), 2d (automatic extent), per-slice (the label's box on "
                    "every labelled slice, no propagation: the most box prompts give), per-part (the same, one box "
                    "per piece of the label), loop (the simulated annotator: rows loop-0 .. loop-N, the "
                    "first box then each fix of the worst slice from the label) (default 3d,2d)")
    ev.add_argument("--corrections", type=int, default=3, help="the loop's corrections at most (default 3)")
    ev.add_argument("--box-margin", type=int, default=0, help="pixels around the label's box (default 0: tight)")
    ev.add_argument("--include", action="append", default=[], metavar="PATTERN",
                    help="only structures matching case/structure glob patterns, e.g. 'mr/*' (repeatable)")
    ev.add_argument("--min-slices", type=int, default=5, help="skip structures on fewer slices (default 5)")
    ev.add_argument("--out", default="medsam-evaluation", help="output folder (default ./medsam-evaluation)")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace the result files of an earlier run in --out (refused otherwise)")
    ev.add_argument("--embedding-cache", metavar="DIR", help="keep slice embeddings in DIR between runs")
    ev.add_argument("--threads", type=int, help="CPU threads (default: all; 1 is fastest on a busy machine)")
    _add_model_args(ev)

    bench = sub.add_parser("bench", help="time our pipeline against the reference pipeline on the shipped CT")
    bench.add_argument("--models", default="litemedsam", help="comma-separated: litemedsam,medsam,medsam2 (medsam2: against MedSAM2's own "
                       "inference on the same random weights)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--out", default="medsam-bench.json", help="JSON results file")
    bench.add_argument("--quick", action="store_true", help="fewer slices and repeats (a smoke run)")
    bench.add_argument("--rounds", type=int, default=None,
                       help="rounds of --compare alternatives (default 2, 1 with --quick)")
    bench.add_argument("--compare", default="reference", choices=["reference", "alternatives", "structures", "all", "remote"],
                       help="reference: ours against the reference pipelines (default); alternatives: LiteMedSAM's "
                            "CPU speed alternatives (OpenVINO, ONNX Runtime, bfloat16, every 2nd slice) against our "
                            "exact path, on the CPU; structures: liver, spleen, both kidneys and aorta as one job "
                            "against the liver alone (LiteMedSAM); all: all three; remote: a 'medsam-slicer serve' on "
                            "loopback against a local run (liver, 40 slices) and 8 clients x 50 requests at once")
    return parser


SERVE_HELP = """\
Serve the model to clients without a GPU: 'medsam-slicer segment --server URL' and the Slicer
module's Remote mode. The model loads once; each client uploads its volume once (a session) and
sends boxes; one queue runs them on the device, fairly across sessions.

Every request but GET /health needs the token (MEDSAM_SLICER_TOKEN or --token-file, one token per
line for several users; each user's sessions are their own). Without a token the server listens
on 127.0.0.1 only. Serve https:// with --ssl-certfile/--ssl-keyfile or behind a TLS reverse proxy
(docs/remote.md).

examples:
  MEDSAM_SLICER_TOKEN=$(cat token.txt) medsam-slicer serve --host 0.0.0.0 --model medsam --device cuda \\
      --ssl-certfile cert.pem --ssl-keyfile key.pem
  medsam-slicer serve            # loopback only, no token: one user on this machine
"""


def _server(args: argparse.Namespace):
    """The ``--server`` connection settings of ``segment`` (``None``: run locally)."""
    import os

    from .remote.protocol import TOKEN_ENV

    if not getattr(args, "server", None):
        return None
    chosen = [flag for flag, on in (("--checkpoint", args.checkpoint), ("--device", args.device != "auto"),
                                    ("--precision", args.precision != "auto"), ("--download", args.download)) if on]
    if chosen:
        raise MedSAMError(f"{', '.join(chosen)} choose the local model; with --server the server's model, weights, "
                          "device and precision are used (its operator sets them)")
    return {"url": args.server, "token": os.environ.get(TOKEN_ENV) or None, "timeout": args.timeout,
            "cafile": args.server_ca}


#: The environment variable giving ``serve --session-cache-mb`` its default.
SESSION_CACHE_ENV = "MEDSAM_SLICER_SESSION_CACHE_MB"


def _session_cache_mb(args: argparse.Namespace) -> int:
    """``--session-cache-mb``, else ``$MEDSAM_SLICER_SESSION_CACHE_MB``, else 1024."""
    import os

    if args.session_cache_mb is not None:
        return int(args.session_cache_mb)
    value = os.environ.get(SESSION_CACHE_ENV, "").strip()
    if not value:
        return 1024
    try:
        return int(value)
    except ValueError:
        raise MedSAMError(f"{SESSION_CACHE_ENV} must be a whole number of MiB; got {value!r}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """``medsam-slicer serve``."""
    import os

    from .remote.server import ServeOptions, read_tokens, serve
    from .remote.sessions import Limits

    options = ServeOptions(
        host=args.host, port=args.port, tokens=read_tokens(args.token_file, dict(os.environ)),
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, model=args.model, checkpoint=args.checkpoint,
        device=args.device, precision=args.precision, speed=args.speed, download=args.download,
        limits=Limits(max_sessions=args.max_sessions, session_ttl=args.session_ttl, max_upload_mb=args.max_upload_mb,
                      max_volume_mb=args.max_volume_mb, rate_limit=args.rate_limit, cache_mb=args.cache_mb,
                      session_cache_mb=_session_cache_mb(args)),
    )
    serve(options)
    return 0


def _window(args: argparse.Namespace):
    from .segmentation.preprocessing import Window

    if getattr(args, "window", None):
        return Window(level=args.window[0], width=args.window[1])
    if getattr(args, "preset", None) and args.preset.lower() != "auto":
        return Window.preset(args.preset)
    return None  # automatic: chosen from the volume by Segmenter.set_volume (Window.automatic)


def cmd_segment(args: argparse.Namespace) -> int:
    """``medsam-slicer segment``."""
    from .segment_command import pair_boxes, read_prompts_file, replay_file

    if args.replay:
        if args.boxes or args.prompts or args.names:
            raise MedSAMError("--replay takes its boxes and names from the file: give no --box-ijk, --box-ras, "
                              "--name or --prompts with it")
        summary = replay_file(args.replay, args.volume, Path(args.output), overwrite=args.overwrite,
                              checkpoint=args.checkpoint, device=args.device, download=args.download,
                              allow_gaps=args.allow_gaps, server=_server(args))
        print(summary)
        return 0
    prompts = read_prompts_file(Path(args.prompts)) if args.prompts else []
    if args.boxes or not prompts:
        if not args.boxes:
            raise MedSAMError("give a box (--box-ijk or --box-ras), a --prompts file, or --replay FILE.seg.nrrd")
        prompts += pair_boxes(args.boxes, args.names)
    elif args.names:
        raise MedSAMError("the structures of a --prompts file are named in the file; --name goes with a --box-ijk "
                          "or --box-ras")
    summary = segment_file(
        args.volume, Path(args.output), prompts=prompts, direction=args.direction, slice_only=args.slice_only,
        window=lambda: _window(args), overwrite=args.overwrite, model=args.model, checkpoint=args.checkpoint,
        device=args.device, precision=args.precision, download=args.download, allow_gaps=args.allow_gaps,
        speed=args.speed, server=_server(args),
    )
    print(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medsam-slicer evaluate``: a thin wrapper of :func:`MedSAMSlicerLib.evaluation.run_evaluation`."""
    from .evaluation import run_evaluation

    if len(args.image) != len(args.labels):
        raise MedSAMError(f"give one --labels per --image; got {len(args.image)} images and {len(args.labels)} labels")
    if args.speed != "exact":  # the model options are shared with segment; evaluate runs every slice exactly
        raise MedSAMError(f"evaluate measures the 'exact' speed (every slice, the plain encoder); --speed {args.speed} "
                          "is for segment")
    run_evaluation(
        inputs=args.inputs, pairs=list(zip(args.image, args.labels)), variants=args.variant, common=args.common,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()], box_margin=args.box_margin,
        include=args.include, min_slices=args.min_slices, out=args.out, embedding_cache=args.embedding_cache,
        model=args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
        threads=args.threads, overwrite=args.overwrite, corrections=args.corrections,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``medsam-slicer models``."""
    from .models.registry import list_specs, resolve_weights

    for spec in list_specs():
        try:
            where = str(resolve_weights(spec))
        except MedSAMError as exc:
            where = f"not installed: {exc}"
        print(f"{spec.name:11s} {spec.title}: {spec.architecture}, {spec.input_size}px input\n            weights: {where}")
    from .models.cpu_features import summary_lines

    print("\n".join(summary_lines()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``medsam-slicer``; returns the exit code (2 for bad input, 130 cancelled)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    with sigterm_as_interrupt():
        return _run_command(parser, args)


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """One subcommand, with every failure turned into its message and exit code (2 bad input,
    130 interrupted by Ctrl+C, 143 terminated by SIGTERM)."""
    try:
        if args.command == "segment":
            return cmd_segment(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "serve":
            return cmd_serve(args)
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
                      out=Path(args.out), quick=args.quick, compare=args.compare, rounds=args.rounds)
            return 0
    except MedSAMError as exc:
        print(f"medsam-slicer: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("medsam-slicer: cancelled; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("\nmedsam-slicer: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
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
