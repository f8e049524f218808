"""What a run folder holds: checkpoints (load, export), ``log.csv`` and its plot, the checks of a
preparation and of a resume against the run's config."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from ..errors import MedSAMError
from ..fileio.atomic import torch_save, write_text
from ..models.checkpoints import check_finite_weights
from .config import RESUMABLE_CHANGES, TrainConfig
from .flare22 import label_name

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_FORMAT = "medsam-slicer-train/1"
LATEST = "latest.pth"
BEST = "best.pth"
LOG_CSV = "log.csv"
PLOT_PNG = "training.png"
CONFIG_JSON = "config.json"


def read_log(path: Path, max_step: int) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("step") and int(row["step"]) <= max_step]


def write_log(path: Path, rows: List[Dict[str, Any]], labels: Sequence[int]) -> None:
    columns = ["step", "epoch", "loss", "lr", "val_mean_dice"] + [f"val_dice_{v}" for v in labels]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buf.getvalue())


def plot_log(rows: Sequence[Dict[str, Any]], path: PathLike, labels: Sequence[int] = ()) -> Path:
    """Plot the training loss and the validation Dice of ``log.csv`` rows to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    def series(key: str) -> Tuple[List[float], List[float]]:
        xs, ys = [], []
        for row in rows:
            value = row.get(key)
            if value not in (None, ""):
                xs.append(float(row["step"]))
                ys.append(float(value))
        return xs, ys

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    xs, ys = series("loss")
    ax_loss.plot(xs, ys, color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (Dice + BCE)")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    for value in labels:
        xs, ys = series(f"val_dice_{value}")
        if xs:
            ax_dice.plot(xs, ys, marker=".", linewidth=1, label=label_name(value))
    xs, ys = series("val_mean_dice")
    if xs:
        ax_dice.plot(xs, ys, color="black", linewidth=2, marker="o", label="mean")
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_title("validation Dice (held-out cases)")
    ax_dice.set_ylim(0, 1)
    ax_dice.grid(alpha=0.3)
    if ax_dice.lines:
        ax_dice.legend(fontsize=7, loc="lower right")
    fig.tight_layout()

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png")

    from ..fileio.atomic import atomic_write

    return atomic_write(path, _write)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a training checkpoint written by :func:`train` (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise MedSAMError(f"checkpoint not found: '{p}'")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or it would run code
        raise MedSAMError(f"'{p}' cannot be read as a training checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedSAMError(
            f"'{p}' is not a training checkpoint of 'medsam-train' (a plain state dict? use it as the "
            "model checkpoint directly, or as 'checkpoint' to start a new run from it)"
        )
    return ckpt


#: What an exported weights file may be called.
WEIGHTS_EXTENSIONS = (".pth", ".pt")
#: A run's own checkpoints: an export never lands on one (``--resume`` and ``best.pth`` need them).
RUN_CHECKPOINTS = ("latest.pth", "best.pth")


def check_export_target(out: PathLike, overwrite: bool, sources: Sequence[PathLike] = ()) -> Path:
    """Check, before anything is loaded or trained, that weights may be exported to ``out``; return it.

    The one output rule (:func:`~MedSAMSlicerLib.fileio.atomic.check_output`): a ``.pth``/``.pt`` name, a
    folder we may write into, no existing file (or link) without ``overwrite``; and never one of
    ``sources`` (the checkpoint exported from, a run's starting weights) nor a run's own
    ``latest.pth`` / ``best.pth`` beside them, even with ``overwrite``: writing there would destroy
    the checkpoint (``--resume`` would then fail).
    """
    from ..fileio.atomic import check_output

    inputs: List[Path] = []
    for source in sources:
        p = Path(os.path.expanduser(os.fspath(source)))
        inputs.append(p)
        folder = p if p.is_dir() else p.parent
        inputs += [folder / name for name in RUN_CHECKPOINTS]
    target = check_output(out, overwrite, inputs=inputs, formats=WEIGHTS_EXTENSIONS, what="exported weights file",
                          input_kind="training checkpoint")
    if os.path.realpath(target) in {os.path.realpath(p) for p in inputs}:
        raise MedSAMError(f"The exported weights file '{target}' is a training checkpoint of the run; exporting there "
                          "would destroy it. Choose another output name.")
    if target.name in RUN_CHECKPOINTS and (target.parent / "config.json").is_file():
        raise MedSAMError(f"'{target}' is a run's own checkpoint name in a run folder; exporting there would replace "
                          "the training checkpoint. Choose another name")
    return target


def export(checkpoint: PathLike, out: PathLike, overwrite: bool = True) -> Path:
    """Write the model weights of a training checkpoint as a plain state dict.

    The result loads with ``checkpoints.load_model(model_name, out, device)`` (strict), in the
    Slicer effect and ``medsam-slicer segment --checkpoint``. ``out`` is checked first
    (:func:`check_export_target`: never the checkpoint itself or its run's other checkpoint;
    without ``overwrite`` never an existing file, not even one created meanwhile).

    Args:
        checkpoint: ``latest.pth`` / ``best.pth`` of a run.
        out: the ``.pth`` file to write (atomically).
        overwrite: replace an existing ``out`` (the command line's ``--overwrite``).
    """
    from ..models.checkpoints import check_state_dict

    target = check_export_target(out, overwrite, sources=[checkpoint])
    ckpt = load_checkpoint(checkpoint)
    state = ckpt["model"]
    check_state_dict(ckpt["architecture"], state, source=f"checkpoint {Path(checkpoint).name}")
    check_finite_weights(state, source=f"checkpoint {Path(checkpoint).name}")
    return torch_save(target, {k: v.contiguous() for k, v in state.items()}, overwrite=overwrite)


def check_preparation(manifest: Dict[str, Any], config: TrainConfig) -> List[str]:
    """Refuse a preparation that cannot give what the config asks; return warnings to show.

    - ``complete: false`` (cases failed, or preprocessing was interrupted) is refused unless
      ``config.allow_incomplete``: the model would silently train (and validate) on part of the
      data;
    - with ``config.validation``, a held-out split without slices (none held out, its cases
      failed, or none has ``config.labels``) is refused: there would be no validation and no
      ``best.pth``, without a word.
    """
    warnings: List[str] = []
    cases = manifest.get("cases") or {}
    if not manifest.get("complete", False):
        failed = manifest.get("failed") or {}
        names = sorted(failed)
        what = (f"{len(failed)} case(s) could not be prepared ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                if failed else "its preprocessing did not finish (interrupted, or still running)")
        if not config.allow_incomplete:
            raise MedSAMError(
                f"the prepared dataset '{config.data}' is incomplete: {what}; {len(cases)} case(s) are prepared. Fix "
                "them and run 'medsam-train preprocess' again (finished cases are kept), or pass --allow-incomplete "
                "to train on the prepared cases only"
            )
        warnings.append(f"training on an incomplete preparation (--allow-incomplete): {what}")
    if config.validation:
        planned = list((manifest.get("split") or {}).get("val") or [])
        val = [e for e in cases.values() if e.get("split") == "val" and e.get("file")]
        wanted = None if config.labels is None else {str(v) for v in config.labels}
        n = sum(e.get("n_slices", 0) if wanted is None else
                max([int(c) for k, c in (e.get("label_slices") or {}).items() if k in wanted] or [0]) for e in val)
        if n == 0:
            if not planned:
                why = "no case is held out"
            elif not val:
                why = f"its held-out case(s) ({', '.join(planned[:5])}) are not prepared"
            else:
                why = f"its held-out cases have no slice with label(s) {sorted(config.labels or [])}"
            raise MedSAMError(
                f"the held-out (validation) split of '{config.data}' is empty: {why}, so there would be no "
                "validation and no best.pth. Hold out cases when preparing ('medsam-train preprocess --holdout N' or "
                "--holdout-cases), or pass --no-validation to train without validation"
            )
    return warnings


def check_resume_config(saved: Dict[str, Any], config: TrainConfig, world: int, saved_world: int) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise MedSAMError(
            f"cannot resume: these settings differ from the run's ({detail}). Resume with the run's "
            f"config ({CONFIG_JSON} in the run folder) or start a new run in another folder."
        )
    if saved_world != world:
        raise MedSAMError(
            f"cannot resume exactly: the run used {saved_world} process(es), this one has {world}; "
            "resume with the same number of processes"
        )
