"""Fine-tuning MedSAM / LiteMedSAM on a preprocessed dataset, with exact resume and DDP.

The recipe is MedSAM's ``train_one_gpu.py``: loss = Dice (sigmoid, squared denominator, as
MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)``) + binary cross-entropy with logits, equal
weights; AdamW, lr 1e-4, weight decay 0.01, no scheduler; prompt encoder frozen; seed 2023. What
this adds:

- the IoU head of the mask decoder is frozen too: no loss reaches it (as in the original, where
  it never changed), and DDP needs every trainable parameter to get a gradient;
- ``freeze_image_encoder``: train the mask decoder only (the encoder in eval mode, its embeddings
  computed without gradients and, within ``embedding_cache_gb``, cached per slice: an epoch after
  the first costs only the decoder);
- AMP (``bf16``/``fp16``) on CUDA only; gradient accumulation (``accumulate`` micro-batches per
  optimizer step);
- checkpoints are written atomically and contain only tensors and plain Python values, so
  ``torch.load(path, weights_only=True)`` reads them: ``latest.pth`` (every ``save_every`` steps,
  each epoch end, at the end, and when cancelled) and ``best.pth`` (best mean validation Dice);
- resume is step-exact: the sampler order is a function of ``(seed, epoch)``, a sample's random
  draws of ``(seed, epoch, index)``, and the checkpoint holds the step within the epoch, the
  optimizer and the torch RNG states, so an interrupted and resumed run ends with the weights of
  an uninterrupted one;
- validation on the held-out cases: each labelled structure of each slice is predicted from its
  tight bounding box (the model's inference transform, masks at the slice's resolution); Dice
  per case and label id, averaged over cases per label, and the mean over labels;
- ``log.csv`` (step, epoch, loss, lr, validation Dice per label) and ``training.png``;
- the same code runs on one process or many: under ``torchrun`` the process group is set up
  (NCCL on CUDA, else Gloo), the model wrapped in ``DistributedDataParallel``, the data split with
  ``DistributedSampler``, and only rank 0 validates and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..checkpoints import check_finite_weights
from ..errors import MedSAMError
from ..preprocessing import box_to_model, logits_to_mask
from ..progress import Cancelled, CancelToken, ProgressCallback, check_cancel, report
from ._atomic import torch_save, write_text
from .dataset import SliceDataset, mask_box
from .flare22 import label_name

PathLike = Union[str, "os.PathLike[str]"]
EventCallback = Callable[[Dict[str, Any]], None]

CHECKPOINT_FORMAT = "medsam-slicer-train/1"
LATEST = "latest.pth"
BEST = "best.pth"
LOG_CSV = "log.csv"
PLOT_PNG = "training.png"
CONFIG_JSON = "config.json"
AMP_CHOICES = ("none", "bf16", "fp16")

# Fields that may change between a run and its resume (they do not change what is computed).
_RESUMABLE_CHANGES = {"epochs", "max_steps", "device", "num_workers", "val_every", "save_every", "log_every",
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
        """Build from a dict; unknown keys raise :class:`MedSAMError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedSAMError(
                f"unknown training settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        cfg = cls(**data)
        if isinstance(cfg.labels, int):
            cfg.labels = [cfg.labels]
        if cfg.labels is not None:
            cfg.labels = [int(v) for v in cfg.labels]
        return cfg

    def to_file(self, path: PathLike) -> Path:
        """Write the config as JSON (atomically)."""
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: PathLike) -> TrainConfig:
        """Read a config from a ``.json`` file (or ``.toml`` on Python >= 3.11).

        Relative ``data``/``out``/``checkpoint`` paths are taken relative to the file's folder.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise MedSAMError(f"cannot read the training config '{p}' ({exc})") from exc
        try:
            if p.suffix.lower() == ".toml":
                import tomllib  # Python >= 3.11

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ImportError as exc:
            raise MedSAMError("TOML configs need Python 3.11 or newer; write the config as JSON") from exc
        except ValueError as exc:
            raise MedSAMError(f"the training config '{p}' is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        if not isinstance(data, dict):
            raise MedSAMError(f"the training config '{p}' must hold a table/object of settings")
        for key in ("data", "out", "checkpoint"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str((p.parent / value).resolve())
        return cls.from_dict(data)


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


# ---------------------------------------------------------------------------------------------
# loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """MedSAM's training loss: soft Dice (sigmoid, squared denominator) + BCE with logits.

    Args:
        logits: ``(B, 1, h, w)`` raw mask logits.
        target: ``(B, 1, h, w)`` 0/1 targets.
        smooth: added to numerator and denominator (MONAI's ``smooth_nr``/``smooth_dr``).

    Returns:
        Scalar: mean over the batch of ``1 - Dice`` plus the mean BCE over all pixels.
    """
    logits = logits.float()
    target = target.float()
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + (target * target).sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


# ---------------------------------------------------------------------------------------------
# distributed set-up


class _Dist:
    """The process group (torchrun) or a single process, behind one interface."""

    def __init__(self) -> None:
        self.owns_group = False
        env = os.environ
        self.enabled = "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env
        self.rank = int(env.get("RANK", 0)) if self.enabled else 0
        self.world = int(env.get("WORLD_SIZE", 1)) if self.enabled else 1
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if self.enabled else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device_name: str) -> torch.device:
        from ..devices import select_device

        if not self.enabled:
            return select_device(device_name)
        import torch.distributed as dist

        if device_name in ("auto", "cuda") and torch.cuda.is_available():
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        else:
            device = select_device(device_name)
            if device.type == "mps":
                device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        return device

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def teardown(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


# ---------------------------------------------------------------------------------------------
# the model as trained


class EmbeddingCache:
    """Slice embeddings of frozen encoders, shared by the runs of one process.

    Keys are ``(encoder fingerprint, slice id)``: an embedding is reused only for the very same
    encoder weights and the very same preprocessed slice, so a cached embedding is bit-identical
    to a fresh one. Tensors are kept on the CPU; an entry is added only while the cache stays
    under the caller's byte budget.
    """

    def __init__(self) -> None:
        self.used = 0
        self._data: Dict[Any, torch.Tensor] = {}

    def get(self, key: Any) -> Optional[torch.Tensor]:
        """The cached ``(1, 256, 64, 64)`` embedding, or ``None``."""
        return self._data.get(key)

    def put(self, key: Any, value: torch.Tensor, max_bytes: int) -> None:
        """Keep ``value`` (copied to the CPU) if the cache stays within ``max_bytes``."""
        size = value.numel() * value.element_size()
        if key not in self._data and self.used + size <= max_bytes:
            self._data[key] = value.detach().to("cpu", copy=True)
            self.used += size

    def clear(self) -> None:
        """Forget every embedding."""
        self._data.clear()
        self.used = 0


EMBEDDINGS = EmbeddingCache()


def encoder_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the image encoder's state (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, tensor in model.image_encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Trainable(nn.Module):
    """Wraps a ``SamModel`` so that one ``forward`` is what DDP synchronises."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, boxes: torch.Tensor, images: Optional[torch.Tensor] = None,
                embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self.model.encode(images)
        logits, _ = self.model.decode(embeddings, boxes)
        return logits


def set_trainable(model: nn.Module, freeze_image_encoder: bool) -> List[nn.Parameter]:
    """Freeze the prompt encoder and the IoU head (and the image encoder when asked).

    Returns:
        The parameters left trainable, in module order.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    frozen: List[nn.Module] = [model.prompt_encoder]
    head = getattr(model.mask_decoder, "iou_prediction_head", None)
    if head is not None:
        frozen.append(head)
    if freeze_image_encoder:
        frozen.append(model.image_encoder)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _set_mode(model: nn.Module, freeze_image_encoder: bool) -> None:
    model.train()
    if freeze_image_encoder:
        model.image_encoder.eval()


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# validation


class Validator:
    """Per-structure Dice on a split, from each structure's tight box on each slice.

    Args:
        prep_dir: preprocessed dataset.
        method, input_size: the model's preprocessing.
        split: which cases (``"val"`` by default).
        labels: only these label ids (``None``: all).
        cache_bytes: budget for reusing slice embeddings through :data:`EMBEDDINGS` (keyed by the
            encoder's fingerprint, so always safe; 0 turns it off).
        batch: slices encoded together.
    """

    def __init__(self, prep_dir: PathLike, method: str, input_size: int, split: str = "val",
                 labels: Optional[Sequence[int]] = None, cache_bytes: int = 0, batch: int = 4) -> None:
        self.dataset = SliceDataset(prep_dir, split, method, input_size, jitter=0, labels=labels)
        self.labels = sorted({v for i in range(len(self.dataset)) for v in self.dataset.slice_labels(i)})
        self.cache_bytes = int(cache_bytes)
        self.batch = batch

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device, amp: str = "none",
            progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
        """Validate ``model`` (put in eval mode; the caller restores its mode).

        Returns:
            ``{"dice": {label_id: mean Dice over cases}, "mean_dice": float, "per_case": {case:
            {label_id: Dice}}, "n_slices": int}``; label ids are ``str`` keys (JSON-friendly).
        """
        model.eval()
        ds = self.dataset
        fingerprint = encoder_fingerprint(model) if self.cache_bytes > 0 else None
        stats: Dict[Tuple[str, int], List[float]] = {}
        n = len(ds)
        for start in range(0, n, self.batch):
            check_cancel(cancel)
            idx = list(range(start, min(n, start + self.batch)))
            prepared = [ds.prepare(i) for i in idx]
            embeddings: List[Optional[torch.Tensor]] = [None] * len(idx)
            if fingerprint is not None:
                for k, i in enumerate(idx):
                    cached = EMBEDDINGS.get((fingerprint, ds.slice_id(i)))
                    embeddings[k] = cached.to(device) if cached is not None else None
            missing = [k for k, e in enumerate(embeddings) if e is None]
            if missing:
                images = torch.stack([prepared[k].image for k in missing]).to(device)
                with _autocast(device, amp):
                    new = model.encode(images)
                for j, k in enumerate(missing):
                    embeddings[k] = new[j: j + 1]
                    if fingerprint is not None:
                        EMBEDDINGS.put((fingerprint, ds.slice_id(idx[k])), new[j: j + 1], self.cache_bytes)
            for k, i in enumerate(idx):
                case, _ = ds.slice_key(i)
                _, labels = ds.slice_arrays(i)
                present = ds.slice_labels(i)
                masks = [labels == v for v in present]
                boxes = np.stack([box_to_model(mask_box(m), prepared[k]) for m in masks])
                with _autocast(device, amp):
                    logits, _ = model.decode(embeddings[k], torch.as_tensor(boxes, dtype=torch.float32, device=device))
                for j, (value, gt) in enumerate(zip(present, masks)):
                    pred = logits_to_mask(logits[j: j + 1].float(), prepared[k])
                    acc = stats.setdefault((case, value), [0.0, 0.0, 0.0])
                    acc[0] += float(np.count_nonzero(pred & gt))
                    acc[1] += float(np.count_nonzero(pred))
                    acc[2] += float(np.count_nonzero(gt))
            report(progress, idx[-1] + 1, n, "validating")
        per_case: Dict[str, Dict[str, float]] = {}
        for (case, value), (inter, p, g) in sorted(stats.items()):
            per_case.setdefault(case, {})[str(value)] = 2.0 * inter / (p + g) if p + g > 0 else 1.0
        dice: Dict[str, float] = {}
        for value in self.labels:
            scores = [d[str(value)] for d in per_case.values() if str(value) in d]
            if scores:
                dice[str(value)] = float(np.mean(scores))
        mean = float(np.mean(list(dice.values()))) if dice else float("nan")
        return {"dice": dice, "mean_dice": mean, "per_case": per_case, "n_slices": n}


# ---------------------------------------------------------------------------------------------
# logs


def _read_log(path: Path, max_step: int) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("step") and int(row["step"]) <= max_step]


def _write_log(path: Path, rows: List[Dict[str, Any]], labels: Sequence[int]) -> None:
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

    from ._atomic import atomic_write

    return atomic_write(path, _write)


# ---------------------------------------------------------------------------------------------
# checkpoints


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


def export(checkpoint: PathLike, out: PathLike) -> Path:
    """Write the model weights of a training checkpoint as a plain state dict.

    The result loads with ``checkpoints.load_model(model_name, out, device)`` (strict), in the
    Slicer effect and ``medsam-slicer segment --checkpoint``.

    Args:
        checkpoint: ``latest.pth`` / ``best.pth`` of a run.
        out: the ``.pth`` file to write (atomically).
    """
    from ..checkpoints import check_state_dict

    ckpt = load_checkpoint(checkpoint)
    state = ckpt["model"]
    check_state_dict(ckpt["architecture"], state, source=f"checkpoint {Path(checkpoint).name}")
    check_finite_weights(state, source=f"checkpoint {Path(checkpoint).name}")
    return torch_save(out, {k: v.contiguous() for k, v in state.items()})


def _build(spec, weights: Optional[Path], device: torch.device):
    from ..checkpoints import load_model
    from ..modeling import build_model

    if weights is None:
        return build_model(spec.architecture).to(device)
    return load_model(spec, weights, device)


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# training


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


def _check_resume_config(saved: Dict[str, Any], config: TrainConfig, world: int, saved_world: int) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
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


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_event: Optional[EventCallback] = None,
) -> TrainResult:
    """Fine-tune a model as described in the module docstring.

    Args:
        config: the :class:`TrainConfig`.
        resume: continue from ``<out>/latest.pth`` (its config must match, see
            ``_RESUMABLE_CHANGES`` for what may differ). Without it, a run folder that already
            holds a checkpoint is refused.
        progress: ``progress(step, total_steps, message)`` after each optimizer step (and
            ``progress(i, n, "validating")`` during validation).
        cancel: checked before each optimizer step; when set, ``latest.pth`` is saved for the
            current step (the previous one stays intact until the new one is complete) and
            :class:`~MedSAMSlicerLib.progress.Cancelled` is raised.
        on_event: called with dicts ``{"event": "step"|"validation"|"checkpoint"|"start"|"done"|"warning", ...}``.

    Returns:
        :class:`TrainResult`.
    """
    from ..registry import get_spec, resolve_weights

    config.validate()
    dist = _Dist()
    device = dist.setup(config.device)
    try:
        spec = get_spec(config.model)
        run_dir = Path(config.out)
        latest_path, best_path = run_dir / LATEST, run_dir / BEST
        ckpt: Optional[Dict[str, Any]] = None
        if latest_path.exists():
            if not resume:
                raise MedSAMError(
                    f"'{run_dir}' already holds a training run ({LATEST}); resume it (--resume) or choose "
                    "another run folder"
                )
            ckpt = load_checkpoint(latest_path, map_location="cpu")
            _check_resume_config(ckpt["config"], config, dist.world, int(ckpt.get("world_size", 1)))
        elif resume:
            raise MedSAMError(f"nothing to resume: '{latest_path}' does not exist")

        torch.manual_seed(config.seed)
        train_ds = SliceDataset(config.data, "train", spec.preprocessing, spec.input_size, config.jitter,
                                config.seed, config.labels)
        preparation_warnings = check_preparation(train_ds.manifest, config)
        sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
        if len(train_ds) == 0:
            which = f" with label(s) {config.labels}" if config.labels else ""
            raise MedSAMError(
                f"the training cases of '{config.data}' have no slices{which}; check 'labels' against the "
                "labels listed in its manifest.json"
            )
        batches_per_epoch = len(sampler) // config.batch_size
        steps_per_epoch = batches_per_epoch // config.accumulate
        if steps_per_epoch < 1:
            raise MedSAMError(
                f"the training split has {len(train_ds)} slices, fewer than one optimizer step needs "
                f"(batch_size {config.batch_size} x accumulate {config.accumulate} x {dist.world} process(es)); "
                "lower the batch size or add cases"
            )
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, int(config.max_steps))

        if ckpt is not None:
            check_finite_weights(ckpt["model"], source=f"'{latest_path}'")
            model = _build(spec, None, device)
            model.load_state_dict(ckpt["model"], strict=True)
        else:
            model = _build(spec, resolve_weights(spec, config.checkpoint), device)
        freeze = bool(config.freeze_image_encoder)
        params = set_trainable(model, freeze)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        use_scaler = device.type == "cuda" and config.amp == "fp16"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best_mean_dice": None, "best_step": None}
        rows: List[Dict[str, Any]] = []
        last_val: Optional[Dict[str, Any]] = None
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            for key in ("epoch", "step", "step_in_epoch"):
                state[key] = int(ckpt[key])
            metrics = ckpt.get("metrics") or {}
            state["best_mean_dice"] = metrics.get("best_mean_dice")
            state["best_step"] = metrics.get("best_step")
            last_val = metrics.get("validation")
            _set_rng_state(ckpt["rng"])
            rows = _read_log(run_dir / LOG_CSV, state["step"])
        del ckpt

        trainable = _Trainable(model)
        net: nn.Module = trainable
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)

        cache_bytes = int(config.embedding_cache_gb * (1 << 30)) if freeze else 0
        fingerprint = encoder_fingerprint(model) if freeze else ""
        validator: Optional[Validator] = None
        if dist.is_main and config.validation:
            validator = Validator(config.data, spec.preprocessing, spec.input_size, "val", config.labels,
                                  cache_bytes=cache_bytes)
        val_labels = validator.labels if validator is not None else []

        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.to_file(run_dir / CONFIG_JSON)

        def emit(event: Dict[str, Any]) -> None:
            if on_event is not None and dist.is_main:
                on_event(event)

        def checkpoint_dict() -> Dict[str, Any]:
            return {
                "format": CHECKPOINT_FORMAT,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "epoch": state["epoch"],
                "step": state["step"],
                "step_in_epoch": state["step_in_epoch"],
                "rng": _rng_state(),
                "config": config.to_dict(),
                "architecture": spec.architecture,
                "model_name": spec.name,
                "world_size": dist.world,
                "metrics": {"validation": last_val, "best_mean_dice": state["best_mean_dice"],
                            "best_step": state["best_step"]},
            }

        def save(path: Path, data: Optional[Dict[str, Any]] = None) -> None:
            if dist.is_main:
                torch_save(path, data if data is not None else checkpoint_dict())
                emit({"event": "checkpoint", "path": str(path), "step": state["step"]})
            dist.barrier()

        def write_logs(plot: bool = True) -> None:
            if dist.is_main:
                _write_log(run_dir / LOG_CSV, rows, val_labels)
                if plot:
                    with contextlib.suppress(Exception):  # a plot is never worth failing a run
                        plot_log(rows, run_dir / PLOT_PNG, val_labels)

        def validate() -> None:
            nonlocal last_val
            result = None
            if validator is not None:
                try:
                    result = validator.run(model, device, config.amp, progress=progress, cancel=cancel)
                except Cancelled:
                    result = None  # the step loop's (collective) cancel check stops the run
                _set_mode(model, freeze)
            if result is not None:
                last_val = {"step": state["step"], **result}
                row = {"step": state["step"], "epoch": state["epoch"], "lr": config.lr,
                       "val_mean_dice": round(result["mean_dice"], 6)}
                for key, value in result["dice"].items():
                    row[f"val_dice_{key}"] = round(value, 6)
                if rows and int(rows[-1]["step"]) == state["step"]:
                    rows[-1].update(row)
                else:
                    rows.append(row)
                emit({"event": "validation", "step": state["step"], "mean_dice": result["mean_dice"],
                      "dice": result["dice"]})
                best = state["best_mean_dice"]
                improved = best is None or result["mean_dice"] > best
                if improved:
                    state["best_mean_dice"] = result["mean_dice"]
                    state["best_step"] = state["step"]
                write_logs()
                if improved:
                    torch_save(best_path, checkpoint_dict())
                    emit({"event": "checkpoint", "path": str(best_path), "step": state["step"]})
            dist.barrier()

        for text in preparation_warnings:
            emit({"event": "warning", "message": text})
        emit({"event": "start", "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
              "train_slices": len(train_ds), "val_slices": len(validator) if validator else 0,
              "step": state["step"], "device": str(device), "world_size": dist.world})
        _set_mode(model, freeze)
        if config.validate_at_start and state["step"] == 0 and not rows:
            validate()

        loss_sum, loss_count = 0.0, 0
        t0 = time.perf_counter()
        while state["step"] < total_steps:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            indices = list(sampler)
            batches = [indices[i: i + config.batch_size] for i in range(0, batches_per_epoch * config.batch_size,
                                                                         config.batch_size)]
            batches = batches[: steps_per_epoch * config.accumulate][state["step_in_epoch"] * config.accumulate:]
            loader = DataLoader(train_ds, batch_sampler=batches, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda")
            it: Iterator[Dict[str, torch.Tensor]] = iter(loader)
            for _ in range(steps_per_epoch - state["step_in_epoch"]):
                if state["step"] >= total_steps:
                    break
                if dist.any(cancel is not None and cancel.cancelled, device):
                    save(latest_path)
                    write_logs()
                    raise Cancelled(f"training cancelled at step {state['step']}; resume with --resume")
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(config.accumulate):
                    batch = next(it)
                    boxes = batch["box"].to(device)
                    target = batch["mask"].to(device)
                    sync = micro == config.accumulate - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
                    ctx = contextlib.nullcontext() if sync else net.no_sync()
                    with ctx:
                        with _autocast(device, config.amp):
                            if freeze:
                                emb = _frozen_embeddings(model, batch, train_ds, fingerprint, cache_bytes, device,
                                                         config.amp)
                                logits = net(boxes, embeddings=emb)
                            else:
                                logits = net(boxes, images=batch["image"].to(device))
                        loss = dice_bce_loss(logits, target)
                        if not torch.isfinite(loss):
                            raise MedSAMError(
                                f"the loss became {loss.item()} at step {state['step'] + 1}; the last good "
                                f"checkpoint is kept. Lower the learning rate, or use --amp none"
                            )
                        scaler.scale(loss / config.accumulate).backward()
                    step_loss += float(loss.detach()) / config.accumulate
                scaler.step(optimizer)
                scaler.update()
                state["step"] += 1
                state["step_in_epoch"] += 1
                if state["step_in_epoch"] >= steps_per_epoch:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                step_loss = dist.mean(step_loss, device)
                loss_sum += step_loss
                loss_count += 1
                step = state["step"]
                epoch_end = state["step_in_epoch"] == 0
                last = step >= total_steps
                emit({"event": "step", "step": step, "total_steps": total_steps, "epoch": state["epoch"],
                      "loss": step_loss,
                      "lr": config.lr, "elapsed_s": time.perf_counter() - t0})
                if dist.is_main:
                    report(progress, step, total_steps, f"epoch {epoch + 1}/{config.epochs} loss {step_loss:.4f}")
                if step % config.log_every == 0 or epoch_end or last:
                    rows.append({"step": step, "epoch": state["epoch"], "loss": round(loss_sum / loss_count, 6),
                                 "lr": config.lr})
                    loss_sum, loss_count = 0.0, 0
                    write_logs(plot=False)
                do_val = (config.val_every and step % config.val_every == 0) or (not config.val_every and epoch_end)
                if do_val or last:
                    validate()
                do_save = ((config.save_every and step % config.save_every == 0)
                           or (not config.save_every and epoch_end) or last)
                if do_save:
                    save(latest_path)
            del it, loader
        write_logs()
        result = TrainResult(
            run_dir=run_dir, step=state["step"], epoch=state["epoch"],
            latest=latest_path if latest_path.exists() else None,
            best=best_path if best_path.exists() else None,
            best_mean_dice=state["best_mean_dice"], last_validation=last_val, history=rows,
        )
        emit({"event": "done", "step": state["step"], "best_mean_dice": state["best_mean_dice"],
              "latest": str(latest_path), "best": str(best_path) if result.best else None})
        return result
    finally:
        dist.teardown()


def _frozen_embeddings(model: nn.Module, batch: Dict[str, torch.Tensor], dataset: SliceDataset, fingerprint: str,
                       cache_bytes: int, device: torch.device, amp: str) -> torch.Tensor:
    """Embeddings ``(B, 256, 64, 64)`` of a batch from a frozen encoder.

    One slice at a time, so that cached and fresh embeddings are bit-identical and a resumed run
    computes exactly what the first one did.
    """
    out = []
    with torch.no_grad():
        for image, index in zip(batch["image"], batch["index"].tolist()):
            key = (fingerprint, dataset.slice_id(index))
            emb = EMBEDDINGS.get(key) if cache_bytes > 0 else None
            if emb is None:
                with _autocast(device, amp):
                    emb = model.encode(image[None].to(device))
                if cache_bytes > 0:
                    EMBEDDINGS.put(key, emb, cache_bytes)
            out.append(emb.to(device))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    checkpoint: Optional[PathLike],
    data: PathLike,
    model: Optional[str] = None,
    split: str = "val",
    labels: Optional[Sequence[int]] = None,
    device: str = "auto",
    cache_gb: float = 1.0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Dict[str, Any]:
    """Validation Dice of a checkpoint on a preprocessed dataset.

    Args:
        checkpoint: a training checkpoint (its model name is used), a plain state dict (give
            ``model``), or ``None`` for ``model``'s registered weights.
        data: preprocessed dataset folder.
        model: registry name (default: the checkpoint's, else ``"litemedsam"``).
        split: ``"val"``, ``"train"`` or ``"all"``.
        labels: only these label ids.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        cache_gb: memory for reusing slice embeddings of the same encoder within this process.

    Returns:
        As :meth:`Validator.run`, plus ``"model"`` and ``"checkpoint"``.
    """
    from ..checkpoints import load_model
    from ..devices import select_device
    from ..registry import get_spec, resolve_weights

    dev = select_device(device)
    name = model
    state = None
    if checkpoint is not None:
        try:
            ckpt = load_checkpoint(checkpoint)
        except MedSAMError:
            ckpt = None
        if ckpt is not None:
            name = name or ckpt["model_name"]
            state = ckpt["model"]
    spec = get_spec(name or "litemedsam")
    if state is not None:
        check_finite_weights(state, source=f"checkpoint {Path(checkpoint).name}")
        net = _build(spec, None, dev)
        net.load_state_dict(state, strict=True)
    else:
        net = load_model(spec, resolve_weights(spec, checkpoint), dev)
    validator = Validator(data, spec.preprocessing, spec.input_size, split, labels,
                          cache_bytes=int(cache_gb * (1 << 30)))
    if len(validator) == 0:
        raise MedSAMError(f"the '{split}' split of '{data}' has no labelled slices to evaluate")
    result = validator.run(net, dev, progress=progress, cancel=cancel)
    result["model"] = spec.name
    result["checkpoint"] = str(checkpoint) if checkpoint is not None else None
    return result
