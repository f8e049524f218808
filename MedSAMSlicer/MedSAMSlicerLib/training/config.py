"""The training configuration (saved as ``config.json`` in a run folder) and the result of a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import MedSAMError
from ..fileio.atomic import write_text

PathLike = Union[str, "os.PathLike[str]"]

AMP_CHOICES = ("none", "bf16", "fp16")

# Fields that may change between a run and its resume (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "max_steps", "device", "num_workers", "val_every", "save_every", "log_every",
                      "out", "checkpoint", "embedding_cache_gb", "validate_at_start", "validation",
                      "allow_incomplete"}


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run folder.

    Attributes:
        data: preprocessed dataset folder (``medsam-train preprocess`` output).
        out: run folder (checkpoints, ``log.csv``, ``training.png``, ``config.json``).
        model: registry name, ``"litemedsam"`` or ``"medsam"``.
        checkpoint: initial weights (a ``.pth``); ``None``: the model's registered weights.
        epochs: passes over the training slices.
        max_steps: stop after this many optimizer steps in total (``None``: no limit).
        batch_size: slices per micro-batch (per process under DDP).
        accumulate: micro-batches per optimizer step (gradient accumulation).
        lr, weight_decay: AdamW settings (``train_one_gpu.py``: 1e-4, 0.01).
        seed: seeds the sampler order and every sample's random draws.
        jitter: box jitter in slice pixels (each side moved out by ``randint(0, jitter)``).
        labels: train and validate on these label ids only (``None``: all).
        freeze_image_encoder: train the mask decoder only.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` mixed precision (CUDA only; ignored elsewhere).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (torchrun: one GPU per rank).
        num_workers: DataLoader worker processes (0: load in the training process).
        val_every: optimizer steps between validations (0: at each epoch end).
        save_every: optimizer steps between ``latest.pth`` saves (0: at each epoch end); it is
            also saved at the end and when cancelled.
        log_every: optimizer steps between ``log.csv`` rows.
        validate_at_start: validate the initial weights first (the baseline in ``log.csv``).
        validation: validate at all (``False``: no validation and no ``best.pth``).
        embedding_cache_gb: with a frozen encoder, memory for cached slice embeddings.
        allow_incomplete: train on a preparation whose ``manifest.json`` says ``complete: false``
            (cases failed or the run was interrupted); refused otherwise.
    """

    data: str = ""
    out: str = ""
    model: str = "litemedsam"
    checkpoint: Optional[str] = None
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 4
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 2023
    jitter: int = 20
    labels: Optional[List[int]] = None
    freeze_image_encoder: bool = False
    amp: str = "none"
    device: str = "auto"
    num_workers: int = 0
    val_every: int = 0
    save_every: int = 0
    log_every: int = 10
    validate_at_start: bool = True
    validation: bool = True
    embedding_cache_gb: float = 4.0
    allow_incomplete: bool = False

    def validate(self) -> None:
        """Raise :class:`MedSAMError` for values that cannot work."""
        if not self.data:
            raise MedSAMError("no dataset given: set 'data' (--data) to a folder made by 'medsam-train preprocess'")
        if not self.out:
            raise MedSAMError("no run folder given: set 'out' (--out) to where checkpoints and logs should go")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accumulate": self.accumulate,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if int(value) < 1:
                raise MedSAMError(f"'{name}' must be at least 1; got {value}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise MedSAMError(f"'max_steps' must be at least 1 (or unset); got {self.max_steps}")
        for name in ("val_every", "save_every", "num_workers", "jitter"):
            if int(getattr(self, name)) < 0:
                raise MedSAMError(f"'{name}' must be >= 0; got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MedSAMError(f"'lr' must be a positive number; got {self.lr}")
        if self.weight_decay < 0:
            raise MedSAMError(f"'weight_decay' must be >= 0; got {self.weight_decay}")
        if self.amp not in AMP_CHOICES:
            raise MedSAMError(f"'amp' must be one of {', '.join(AMP_CHOICES)}; got '{self.amp}'")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> TrainConfig:
        """Build from a dict, every value checked against :func:`config_schema` (types and ranges:
        ``"5"`` or ``true`` is not a number of epochs); unknown keys raise :class:`MedSAMError`
        naming them."""
        from ..fileio.userfiles import SchemaError

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedSAMError(
                f"unknown training settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        schema = config_schema()
        try:
            values = {k: schema[k].check(v, f"setting '{k}'") for k, v in data.items()}
        except SchemaError as exc:
            raise MedSAMError(str(exc)) from None
        cfg = cls(**values)
        if isinstance(cfg.labels, int):
            cfg.labels = [cfg.labels]
        return cfg

    def to_file(self, path: PathLike) -> Path:
        """Write the config as JSON (atomically)."""
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: PathLike) -> TrainConfig:
        """Read a config from a ``.json`` file (or ``.toml`` on Python >= 3.11).

        Relative ``data``/``out``/``checkpoint`` paths are taken relative to the file's folder.
        """
        from ..fileio.userfiles import load_table

        p = Path(path).expanduser()
        data = load_table(p, "the training config")
        if not isinstance(data, dict) or not data:
            raise MedSAMError(f"the training config '{p}' must hold a table/object of settings (data, out, ...)")
        for key in ("data", "out", "checkpoint"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str((p.parent / value).resolve())
        try:
            return cls.from_dict(data)
        except MedSAMError as exc:
            raise MedSAMError(f"the training config '{p}': {exc}") from None


def config_schema() -> Dict[str, Any]:
    """Each :class:`TrainConfig` field's type and range (:mod:`~MedSAMSlicerLib.fileio.userfiles` specs)."""
    from ..fileio.userfiles import Bool, Either, Int, ListOf, Num, OrNone, Str

    path = Str(max_len=4096, empty=True)
    steps = Int(0, 10 ** 12)
    label = Int(0, 2 ** 31 - 1)
    return {
        "data": path, "out": path, "model": Str(max_len=60), "checkpoint": OrNone(Str(max_len=4096)),
        "epochs": Int(1, 1_000_000), "max_steps": OrNone(Int(1, 10 ** 12)), "batch_size": Int(1, 100_000),
        "accumulate": Int(1, 100_000), "lr": Num(0.0, 10.0, lo_open=True), "weight_decay": Num(0.0, 100.0),
        "seed": Int(0, 2 ** 32 - 1), "jitter": Int(0, 100_000),
        "labels": OrNone(Either(label, ListOf(label, 0, 1000))), "freeze_image_encoder": Bool(),
        "amp": Str(choices=AMP_CHOICES), "device": Str(max_len=40), "num_workers": Int(0, 1024),
        "val_every": steps, "save_every": steps, "log_every": Int(1, 10 ** 12), "validate_at_start": Bool(),
        "validation": Bool(), "embedding_cache_gb": Num(0.0, 1e6), "allow_incomplete": Bool(),
    }


@dataclass
class TrainResult:
    """What :func:`train` did."""

    run_dir: Path
    step: int
    epoch: int
    latest: Optional[Path]
    best: Optional[Path]
    best_mean_dice: Optional[float]
    last_validation: Optional[Dict[str, Any]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
