"""Fine-tuning MedSAM and LiteMedSAM: FLARE22 preprocessing, dataset, trainer, ``medsam-train``.

Plain Python over numpy, SimpleITK, cc3d and torch (no Slicer imports). The parts, by job:

- :mod:`.preprocess`: FLARE22-layout volumes -> one compressed ``.npz`` per case + ``manifest.json``
  (``preprocess_dataset``, ``PreprocessSettings``, ``load_manifest``, ``load_case``);
- :mod:`.dataset`: ``SliceDataset``, one axial slice + one structure + one jittered box per sample,
  transformed exactly as the model's inference does;
- :mod:`.config`: ``TrainConfig`` (saved as ``config.json``), ``TrainResult``;
- :mod:`.trainer`: ``train`` and the ``TrainingRun`` it performs (exact resume, DDP under
  ``torchrun``), ``dice_bce_loss``;
- :mod:`.model`: the model as trained (which parameters train, mixed precision, frozen-encoder
  embeddings cached per slice); :mod:`.distributed`: one process or many behind one interface;
- :mod:`.validation`: held-out Dice (``Validator``) and ``evaluate``;
- :mod:`.runfiles`: what a run folder holds (``load_checkpoint``, ``export``, ``log.csv`` and its
  plot) and the checks of a preparation and of a resume;
- :mod:`.flare22`: FLARE22 label names and ``TOTALSEG_TO_FLARE22``;
- :mod:`.cli`: the ``medsam-train`` command (``preprocess``, ``train``, ``evaluate``, ``export``).

The names below are imported lazily, so ``import MedSAMSlicerLib.training`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PreprocessSettings": "preprocess",
    "preprocess_dataset": "preprocess",
    "load_manifest": "preprocess",
    "load_case": "preprocess",
    "split_cases": "preprocess",
    "SliceDataset": "dataset",
    "TrainConfig": "config",
    "TrainResult": "config",
    "train": "trainer",
    "evaluate": "validation",
    "export": "runfiles",
    "dice_bce_loss": "trainer",
    "load_checkpoint": "runfiles",
    "FLARE22_LABELS": "flare22",
    "TOTALSEG_TO_FLARE22": "flare22",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
