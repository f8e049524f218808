"""``medsam-train``: prepare FLARE22-style data, fine-tune MedSAM/LiteMedSAM, evaluate, export.

Run ``medsam-train --help`` (or ``python -m MedSAMSlicerLib.training.cli --help``).

Exit codes: 0 done; 2 bad input (the message on stderr says what to do; nothing is left half
written); 130 cancelled (Ctrl+C or SIGTERM: training saves ``latest.pth`` first, so
``--resume`` continues exactly).

``--progress-json`` prints one JSON object per line on stdout, for programs that follow the
run (the Slicer training panel does): ``{"event": "progress", "stage", "done", "total",
"message"}``, the trainer's events (``warning``, ``start``, ``step``, ``validation``, ``checkpoint``,
``done``), then ``{"event": "result", ...}``, or ``{"event": "error", "message"}`` /
``{"event": "cancelled", "message"}``; with ``--stop-on-stdin`` first ``{"event": "started", "pid"}``
(this process's id: behind a launcher such as Slicer's ``PythonSlicer`` it is not the child id
the starting program knows).

``--stop-on-stdin``: stop cleanly (save ``latest.pth``, export) when the line ``stop`` arrives on
stdin or stdin closes. A program that starts the run with a pipe as stdin (Slicer's training
panel) stops it by writing ``stop``; and when that program goes away, however it ends (quit,
crash, killed), its end of the pipe closes and the run stops by itself. Signals are not needed, so
this works behind launchers that forward none (CTK's launcher runs ``python-real`` as a child
with the standard input forwarded to it: ``QProcess::ForwardedInputChannel``,
commontk/AppLauncher ``Base/ctkAppLauncher.cpp`` v0.1.33/v0.1.34, the launchers of Slicer
5.10.0/5.12.3). If the run has not ended ``--stop-grace`` seconds after the stop, it exits at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import MedSAMError
from ..progress import Cancelled, CancelToken, TerminalProgress

EXIT_ERROR = 2
EXIT_CANCELLED = 130
#: Seconds a run stopped through --stop-on-stdin may take to save and exit before it exits at once.
STOP_GRACE_S = 120.0

DESCRIPTION = """\
Fine-tune MedSAM or LiteMedSAM on your own labelled volumes, in four steps:

  1. medsam-train preprocess DATA_DIR PREP_DIR
       DATA_DIR holds images/<case>_0000.nii.gz and labels/<case>.nii.gz (the FLARE22 layout).
       Windows the images, removes tiny objects, keeps the labelled axial slices, and writes one
       small .npz per case plus manifest.json (which cases train, which are held out).
  2. medsam-train train --data PREP_DIR --out RUN_DIR --model litemedsam
       Fine-tunes and writes RUN_DIR/latest.pth, best.pth (best held-out Dice), log.csv,
       training.png and config.json. Stop any time (Ctrl+C); continue with --resume.
  3. medsam-train evaluate --checkpoint RUN_DIR/best.pth --data PREP_DIR
       Dice per structure on the held-out cases (each structure prompted with its tight box).
  4. medsam-train export RUN_DIR/best.pth my_model.pth
       A plain weights file for the Slicer effect or `medsam-slicer segment --checkpoint`.
"""

EPILOG = """\
examples:
  medsam-train preprocess ~/FLARE22Train prep --workers 4
  medsam-train train --data prep --out runs/lite --model litemedsam --epochs 20
  medsam-train train --config runs/lite/config.json --resume
  medsam-train evaluate --checkpoint runs/lite/best.pth --data prep
  medsam-train export runs/lite/best.pth lite_finetuned.pth
"""


class _Output:
    """Where progress and results go: a terminal bar, JSON lines, or nothing."""

    def __init__(self, json_lines: bool, quiet: bool) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self._bars: Dict[str, TerminalProgress] = {}
        self._lock = threading.Lock()

    def event(self, data: Dict[str, Any]) -> None:
        if self.json_lines:
            line = json.dumps(_jsonable(data))
            with self._lock:
                try:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    # Nobody reads any more (the program that started the run is gone): keep
                    # training or saving; the output goes nowhere from now on.
                    self.json_lines = False
                    sys.stdout = sys.stderr = open(os.devnull, "w")

    def progress(self, stage: str) -> Callable[[int, int, str], None]:
        def callback(done: int, total: int, message: str = "") -> None:
            sub = "validate" if message == "validating" else stage
            if self.json_lines:
                self.event({"event": "progress", "stage": sub, "done": done, "total": total, "message": message})
            elif not self.quiet:
                bar = self._bars.setdefault(sub, TerminalProgress(sub))
                bar(done, total, "" if message == "validating" else message)

        return callback

    def info(self, text: str) -> None:
        if self.json_lines:
            self.event({"event": "log", "message": text})
        elif not self.quiet:
            print(text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _int_list(text: str) -> List[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label ids such as '12' or '7,8'; got '{text}'") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-json", action="store_true",
                   help="print progress and results as JSON lines on stdout (for programs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-on-stdin", action="store_true",
                   help="stop cleanly (saving the current step) on a line 'stop' on stdin or when stdin closes "
                        "(the program that started the run went away)")
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S, metavar="S",
                   help=f"with --stop-on-stdin: exit at once if still running S seconds after the stop "
                        f"(default {STOP_GRACE_S:.0f})")


def build_parser() -> argparse.ArgumentParser:
    """The ``medsam-train`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="medsam-train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # -- preprocess
    p = sub.add_parser(
        "preprocess", help="FLARE22-layout volumes -> compact training dataset",
        description="Turn DATA_DIR/images/<case>_0000.nii.gz + DATA_DIR/labels/<case>.nii.gz into OUT_DIR "
                    "(one .npz per case + manifest.json), with the rules of MedSAM's pre_CT_MR.py. "
                    "Running it again skips the cases that are already done.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with images/ and labels/")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    p.add_argument("--preset", choices=("medsam", "litemedsam"), default="medsam",
                   help="small-object thresholds: medsam (default) 1000 voxels (3D) / 100 px (2D); litemedsam 100 / 10")
    p.add_argument("--modality", choices=("CT", "MR"), default="CT",
                   help="CT (default): level/width window; MR: 0.5-99.5 percentile window of non-zero voxels")
    p.add_argument("--window-level", type=float, default=40.0, help="CT window level in HU (default 40)")
    p.add_argument("--window-width", type=float, default=400.0, help="CT window width in HU (default 400)")
    p.add_argument("--no-stretch", action="store_true",
                   help="CT: map the window to 0-255 directly instead of min-max of the clipped volume "
                        "(pre_CT_MR.py stretches)")
    p.add_argument("--dust-3d", type=int, default=None, metavar="VOXELS",
                   help="remove 3D objects smaller than this (0 keeps all; default from --preset)")
    p.add_argument("--dust-2d", type=int, default=None, metavar="PIXELS",
                   help="then remove per-slice 2D objects smaller than this (default from --preset)")
    p.add_argument("--exclude-labels", type=_int_list, default=[12], metavar="IDS",
                   help="label ids to drop: '12' (default, FLARE22's duodenum), e.g. '7,8', or 'none'")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--holdout", type=int, default=None, metavar="N",
                       help="hold out the last N cases (sorted by name) for validation "
                            "(default: 10 when there are >= 50 cases, else a fifth)")
    group.add_argument("--holdout-cases", nargs="+", default=None, metavar="CASE",
                       help="hold out these cases for validation")
    p.add_argument("--workers", type=int, default=1, help="cases processed in parallel (default 1)")
    _add_common(p)

    # -- train
    t = sub.add_parser(
        "train", help="fine-tune a model on a preprocessed dataset",
        description="Fine-tune with MedSAM's recipe (Dice + BCE loss, AdamW, prompt encoder frozen). Give "
                    "--config FILE (JSON; see --write-config) and/or the options below; options given on "
                    "the command line override the file.",
    )
    t.add_argument("--config", metavar="FILE", help="training config (JSON, or TOML on Python >= 3.11)")
    t.add_argument("--data", metavar="PREP_DIR", help="preprocessed dataset (output of 'preprocess')")
    t.add_argument("--out", metavar="RUN_DIR", help="run folder for checkpoints and logs")
    t.add_argument("--model", help="model to fine-tune: litemedsam (default) or medsam")
    t.add_argument("--checkpoint", metavar="PTH", help="start from these weights (default: the model's own)")
    t.add_argument("--epochs", type=int, help="passes over the training slices (default 10)")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--batch-size", type=int, help="slices per step (per GPU; default 4)")
    t.add_argument("--accumulate", type=int, help="gradient accumulation: micro-batches per step (default 1)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    t.add_argument("--seed", type=int, help="random seed (default 2023)")
    t.add_argument("--jitter", type=int, help="box jitter in pixels (default 20)")
    t.add_argument("--labels", type=_int_list, metavar="IDS", help="train on these label ids only, e.g. '4' or '1,3'")
    t.add_argument("--freeze-image-encoder", action="store_true", default=None,
                   help="train the mask decoder only (much faster, less memory)")
    t.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision on CUDA (default none)")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--workers", dest="num_workers", type=int, help="data loading processes (default 0)")
    t.add_argument("--val-every", type=int, help="validate every N steps (default: each epoch)")
    t.add_argument("--save-every", type=int, help="save latest.pth every N steps (default: each epoch)")
    t.add_argument("--log-every", type=int, help="log.csv row every N steps (default 10)")
    t.add_argument("--no-validate-at-start", dest="validate_at_start", action="store_false", default=None,
                   help="skip the baseline validation of the initial weights")
    t.add_argument("--no-validation", dest="validation", action="store_false", default=None,
                   help="never validate (no best.pth)")
    t.add_argument("--allow-incomplete", action="store_true", default=None,
                   help="train even though the preparation is incomplete (failed or unfinished cases)")
    t.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from latest.pth")
    t.add_argument("--write-config", metavar="FILE", help="write the resulting config to FILE and exit")
    t.add_argument("--export-to", metavar="PTH",
                   help="when the run ends, finished or cancelled, also write its best (else latest) weights "
                        "as a plain weights file here (what MedSAM Training in Slicer uses); checked before "
                        "training starts")
    t.add_argument("--overwrite", action="store_true",
                   help="with --export-to: replace an existing weights file there (never the run's own checkpoints)")
    _add_common(t)

    # -- evaluate
    e = sub.add_parser(
        "evaluate", help="held-out Dice per structure of a checkpoint",
        description="Predict every labelled structure of every slice from its tight box and report Dice "
                    "per label (averaged over cases) and their mean.",
    )
    e.add_argument("--checkpoint", metavar="PTH",
                   help="training checkpoint or weights file (default: the model's own weights)")
    e.add_argument("--data", required=True, metavar="PREP_DIR", help="preprocessed dataset")
    e.add_argument("--model", help="model of a plain weights file (litemedsam or medsam)")
    e.add_argument("--split", choices=("val", "train", "all"), default="val", help="which cases (default val)")
    e.add_argument("--labels", type=_int_list, metavar="IDS", help="only these label ids")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    e.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    _add_common(e)

    # -- export
    x = sub.add_parser(
        "export", help="training checkpoint -> plain weights file",
        description="Write the model weights of CHECKPOINT (latest.pth/best.pth) as a plain state dict that "
                    "the Slicer effect and `medsam-slicer segment --checkpoint` load.",
    )
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="latest.pth or best.pth of a run")
    x.add_argument("out", metavar="OUT", help="weights file to write, e.g. my_model.pth (never the checkpoint "
                   "itself; an existing file only with --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_common(x)
    return parser


def _cmd_preprocess(args: argparse.Namespace, out: _Output, cancel: CancelToken) -> Dict[str, Any]:
    from .preprocess import PreprocessSettings, preprocess_dataset

    overrides: Dict[str, Any] = {
        "modality": args.modality, "window_level": args.window_level, "window_width": args.window_width,
        "stretch": not args.no_stretch, "exclude_labels": tuple(args.exclude_labels),
    }
    if args.dust_3d is not None:
        overrides["dust_3d"] = args.dust_3d
    if args.dust_2d is not None:
        overrides["dust_2d"] = args.dust_2d
    settings = PreprocessSettings.preset(args.preset, **overrides)
    holdout = args.holdout_cases if args.holdout_cases is not None else args.holdout
    if args.workers < 1:
        raise MedSAMError(f"--workers must be at least 1; got {args.workers}")
    result = preprocess_dataset(args.data_dir, args.out_dir, settings, holdout=holdout, workers=args.workers,
                                progress=out.progress("preprocess"), cancel=cancel)
    m = result.manifest
    summary = {
        "out_dir": str(Path(args.out_dir).resolve()), "cases": len(m["cases"]), "processed": result.processed,
        "skipped": result.skipped, "train": m["split"]["train"], "val": m["split"]["val"],
        "slices": m["n_slices"], "labels": m["labels"],
    }
    for entry in m["cases"].values():
        for text in entry.get("warnings", []):
            out.event({"event": "warning", "message": text})
            if not out.json_lines:
                _err(f"medsam-train preprocess: warning: {text}")
    out.info(f"preprocessed {len(result.processed)} case(s), skipped {len(result.skipped)} already done; "
             f"{m['n_slices']['train']} training and {m['n_slices']['val']} validation slices in {args.out_dir}")
    return summary


_TRAIN_FIELDS = ("data", "out", "model", "checkpoint", "epochs", "max_steps", "batch_size", "accumulate", "lr",
                 "weight_decay", "seed", "jitter", "labels", "freeze_image_encoder", "amp", "device", "num_workers",
                 "val_every", "save_every", "log_every", "validate_at_start", "validation", "allow_incomplete")


def _train_config(args: argparse.Namespace):
    from .trainer import TrainConfig

    data: Dict[str, Any] = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    for name in _TRAIN_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = str(Path(value).expanduser().resolve()) if name in ("data", "out", "checkpoint") else value
    if data.get("labels") == []:
        data["labels"] = None
    return TrainConfig.from_dict(data)


def _cmd_train(args: argparse.Namespace, out: _Output, cancel: CancelToken) -> Dict[str, Any]:
    from .trainer import train

    config = _train_config(args)
    if args.export_to and not args.write_config:
        from .runfiles import check_export_target

        # Before any training: the export at the end must not fail, nor replace what it may not.
        check_export_target(args.export_to, args.overwrite,
                            sources=[Path(config.out) / "latest.pth", *([config.checkpoint] if config.checkpoint else [])])
    if args.write_config:
        config.to_file(args.write_config)
        out.info(f"wrote {args.write_config}")
        return {"config": str(Path(args.write_config).resolve())}
    def on_event(event: Dict[str, Any]) -> None:
        out.event(event)
        if event.get("event") == "warning" and not out.json_lines:
            _err(f"medsam-train train: warning: {event['message']}")

    try:
        result = train(config, resume=args.resume, progress=out.progress("train"), cancel=cancel, on_event=on_event)
    except Cancelled:
        # A cancelled run saved its current step: export it too, so that the weights reach the
        # model list even when nobody is left to do it (Slicer closed while training).
        if args.export_to:
            _export_run(Path(config.out), args.export_to, out, args.overwrite)
        raise
    if result.best_mean_dice is not None:
        out.info(f"best held-out mean Dice {result.best_mean_dice:.4f}; checkpoints in {result.run_dir}")
    summary = {"run_dir": str(result.run_dir), "step": result.step, "epoch": result.epoch,
               "latest": result.latest, "best": result.best, "best_mean_dice": result.best_mean_dice}
    if args.export_to:
        summary["exported"] = _export_run(Path(result.run_dir), args.export_to, out, args.overwrite)
    return summary


def _export_run(run_dir: Path, target: str, out: _Output, overwrite: bool = False) -> Optional[str]:
    """Export ``best.pth``, else ``latest.pth``, of a run to ``target``; ``None`` if it has neither."""
    from .trainer import export

    for name in ("best.pth", "latest.pth"):
        if (run_dir / name).is_file():
            path = export(run_dir / name, Path(target).expanduser(), overwrite=overwrite)
            out.event({"event": "exported", "path": str(path), "source": name})
            out.info(f"exported {name} to {path}")
            return str(path)
    return None


def _cmd_evaluate(args: argparse.Namespace, out: _Output, cancel: CancelToken) -> Dict[str, Any]:
    from ..fileio.atomic import write_json
    from .flare22 import label_name
    from .trainer import evaluate

    result = evaluate(args.checkpoint, args.data, model=args.model, split=args.split,
                      labels=args.labels or None, device=args.device, progress=out.progress("evaluate"),
                      cancel=cancel)
    if args.json:
        write_json(args.json, _jsonable(result))
    if not out.json_lines:
        print(f"{'label':>5}  {'structure':<22} Dice")
        for key, value in result["dice"].items():
            print(f"{key:>5}  {label_name(int(key)):<22} {value:.4f}")
        print(f"{'':>5}  {'mean':<22} {result['mean_dice']:.4f}")
    return result


def _cmd_export(args: argparse.Namespace, out: _Output, cancel: CancelToken) -> Dict[str, Any]:
    from .trainer import export

    path = export(args.checkpoint, args.out, overwrite=args.overwrite)
    out.info(f"wrote {path}")
    return {"out": str(Path(path).resolve())}


COMMANDS = {"preprocess": _cmd_preprocess, "train": _cmd_train, "evaluate": _cmd_evaluate, "export": _cmd_export}


def _err(text: str) -> None:
    """A line on stderr; nothing when nobody reads it any more (a broken pipe)."""
    try:
        print(text, file=sys.stderr)
    except (OSError, ValueError):
        pass


def watch_stdin(cancel: CancelToken, grace_s: float, stream=None, exit=os._exit) -> threading.Thread:
    """Cancel when the line ``stop`` arrives on ``stream`` (default stdin) or it closes; then, if
    the process is still alive ``grace_s`` seconds later, ``exit(EXIT_CANCELLED)`` it. Returns the
    (daemon) watching thread."""
    stream = sys.stdin if stream is None else stream

    def watch() -> None:
        try:
            for line in stream:
                if line.strip() == "stop":
                    break
        except (OSError, ValueError):
            pass
        cancel.cancel()
        threading.Event().wait(max(0.0, grace_s))
        exit(EXIT_CANCELLED)

    thread = threading.Thread(target=watch, name="medsam-stop-on-stdin", daemon=True)
    thread.start()
    return thread


def _install_signal_handlers(cancel: CancelToken) -> None:
    """First SIGINT/SIGTERM: ask the work to stop cleanly; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame) -> None:
        if cancel.cancelled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        cancel.cancel()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``medsam-train``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = _Output(json_lines=args.progress_json, quiet=args.quiet)
    cancel = CancelToken()
    _install_signal_handlers(cancel)
    if args.stop_on_stdin:
        out.event({"event": "started", "pid": os.getpid()})
        watch_stdin(cancel, args.stop_grace)
    try:
        result = COMMANDS[args.command](args, out, cancel)
    except MedSAMError as exc:
        out.event({"event": "error", "message": str(exc)})
        _err(f"medsam-train {args.command}: error: {exc}")
        return EXIT_ERROR
    except (Cancelled, KeyboardInterrupt) as exc:
        message = str(exc) or "cancelled"
        out.event({"event": "cancelled", "message": message})
        _err(f"medsam-train {args.command}: {message}")
        return EXIT_CANCELLED
    out.event({"event": "result", "command": args.command, **_jsonable(result)})
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
