"""Which model a front end uses, and where fine-tuned checkpoints are kept.

One home for three rules the Slicer module, the effect, the training panel and the command line
share:

* :class:`ModelChoice`: a registry model (``"litemedsam"``, ``"medsam"``), optionally with a
  weights file for that architecture (e.g. fine-tuned by MedSAM Training).
* The checkpoint folder (:func:`default_checkpoint_dir`): ``$MEDSAM_SLICER_CHECKPOINTS``, else
  ``~/.cache/medsam-slicer/checkpoints``. MedSAM Training exports its results there and the
  MedSAM module lists them.
* The name of an exported checkpoint: ``<run>-<model>.pth`` (:func:`checkpoint_file_name`), read
  back by :func:`checkpoint_model`.

Plain Python (no torch): listing choices must stay cheap, it runs when a panel opens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Environment variable that overrides where fine-tuned checkpoints are looked for.
CHECKPOINT_DIR_ENV = "MEDSAM_SLICER_CHECKPOINTS"
#: Weight files we can load (``torch.load(weights_only=True)``).
CHECKPOINT_SUFFIXES = (".pth", ".pt")


def model_names() -> List[str]:
    """The registry's model names, in ``models.json`` order (what checkpoint names end with)."""
    from .registry import list_specs

    return [spec.name for spec in list_specs()]


def model_titles() -> dict:
    """Registry model name -> title shown to users."""
    from .registry import list_specs

    return {spec.name: spec.title for spec in list_specs()}


def default_model() -> str:
    """The registry's default model."""
    from .registry import default_model_name

    return default_model_name()


@dataclass(frozen=True)
class ModelChoice:
    """A registry model and, optionally, a weights file to use instead of the registry's.

    Attributes:
        model: the registry name, which fixes the architecture and the preprocessing.
        checkpoint: absolute path of a weights file for that architecture, or ``None``.
    """

    model: str = "litemedsam"
    checkpoint: Optional[str] = None

    @classmethod
    def for_file(cls, path: PathLike, model: Optional[str] = None) -> ModelChoice:
        """The choice for a weights file; its model from ``model`` or from its name
        (:func:`checkpoint_model`)."""
        path = os.path.abspath(os.fspath(path))
        return cls(model or checkpoint_model(path), path)

    def label(self) -> str:
        """What a model list shows: ``"LiteMedSAM"`` or ``"liver-litemedsam.pth (LiteMedSAM, fine-tuned)"``."""
        title = model_titles().get(self.model, self.model)
        if not self.checkpoint:
            return title
        return f"{os.path.basename(self.checkpoint)} ({title}, fine-tuned)"


def default_checkpoint_dir() -> Path:
    """Folder where fine-tuned checkpoints are looked for (and MedSAM Training exports them)."""
    folder = os.environ.get(CHECKPOINT_DIR_ENV)
    if folder:
        return Path(folder).expanduser()
    return Path("~/.cache/medsam-slicer/checkpoints").expanduser()


def checkpoint_file_name(run: str, model: str) -> str:
    """``<run>-<model>.pth``: the name MedSAM Training gives an exported checkpoint.

    ``run`` is made safe for a file name (letters, digits, ``.``, ``_``, ``-``; others become ``_``).
    """
    if model not in model_names():
        raise ValueError(f"unknown model '{model}'; choose one of: {', '.join(model_names())}")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(run)).strip("._") or "run"
    return f"{safe}-{model}.pth"


def checkpoint_model(path: PathLike) -> str:
    """The registry model a checkpoint file is for, from its name.

    ``<run>-<model>.pth`` names it; otherwise names containing ``medsam2`` or ``sam2`` are MedSAM2
    (its authors' ``MedSAM2_latest.pt``), ``lite`` LiteMedSAM, ``vit`` MedSAM (ViT-B), and the rest
    LiteMedSAM. Loading checks the weights
    strictly and names the right architecture if this guess is wrong.
    """
    stem = os.path.basename(os.fspath(path)).lower().rsplit(".", 1)[0]
    for model in sorted(model_names(), key=len, reverse=True):
        if stem.endswith("-" + model):
            return model
    if "medsam2" in stem or "sam2" in stem:  # MedSAM2's own files: MedSAM2_latest.pt, MedSAM2_CTLesion.pt, ...
        return "medsam2"
    if "lite" in stem:
        return "litemedsam"
    if "vit" in stem:
        return "medsam"
    return default_model()


def list_checkpoints(folder: Optional[PathLike] = None) -> List[Path]:
    """Weight files (:data:`CHECKPOINT_SUFFIXES`) directly in ``folder``, newest first.

    A missing or unreadable folder gives an empty list.
    """
    folder = Path(os.fspath(folder)) if folder else default_checkpoint_dir()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    files = []
    for entry in entries:
        try:
            if entry.name.lower().endswith(CHECKPOINT_SUFFIXES) and entry.is_file():
                files.append((entry.stat().st_mtime, Path(entry.path)))
        except OSError:
            continue
    return [path for _, path in sorted(files, key=lambda item: item[0], reverse=True)]


def model_choices(folder: Optional[PathLike] = None, extra: Iterable[ModelChoice] = ()) -> List[ModelChoice]:
    """What a model list offers: the registry models, then the checkpoints in ``folder``, then
    ``extra`` choices not already listed (e.g. the current one, from another folder)."""
    choices = [ModelChoice(m) for m in model_names()]
    choices += [ModelChoice.for_file(p) for p in list_checkpoints(folder)]
    for choice in extra:
        if choice not in choices:
            choices.append(choice)
    return choices


def parse_choice(model: str, checkpoint: Optional[str]) -> Tuple[ModelChoice, Optional[str]]:
    """A :class:`ModelChoice` from stored settings, and a problem to show (or ``None``).

    Unknown model names fall back to the default, a checkpoint that no longer exists is kept (so
    the user sees what is missing) with a message.
    """
    problem = None
    if model not in model_names():
        problem = f"Unknown model '{model}' in the settings; using {default_model()}."
        model = default_model()
    checkpoint = checkpoint or None
    if checkpoint and not os.path.isfile(checkpoint):
        problem = f"The weights file {checkpoint} no longer exists; choose another model or file."
    return ModelChoice(model, checkpoint), problem
