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
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..errors import MedSAMError
from ..fileio.atomic import torch_save
from ..models.checkpoints import check_finite_weights
from ..progress import Cancelled, CancelToken, ProgressCallback, report
from .config import TrainConfig, TrainResult
from .dataset import SliceDataset
from .distributed import Distributed
from .model import (
    Trainable,
    autocast,
    build_model_for,
    cpu_state,
    encoder_fingerprint,
    frozen_embeddings,
    set_train_mode,
    set_trainable,
)
from .runfiles import (
    BEST,
    CHECKPOINT_FORMAT,
    CONFIG_JSON,
    LATEST,
    LOG_CSV,
    PLOT_PNG,
    check_preparation,
    check_resume_config,
    export,
    load_checkpoint,
    plot_log,
    read_log,
    write_log,
)
from .validation import Validator, evaluate

PathLike = Union[str, "os.PathLike[str]"]
EventCallback = Callable[[Dict[str, Any]], None]

__all__ = ["TrainConfig", "TrainResult", "dice_bce_loss", "evaluate", "export", "load_checkpoint", "train"]


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


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# training


class TrainingRun:
    """One training run, from set-up to the last checkpoint (what :func:`train` runs).

    The set-up (``__init__``) builds the data, the model, the optimizer and, when resuming,
    restores them from ``latest.pth``; :meth:`run` performs the optimizer steps. The steps of a
    run (:meth:`validate`, :meth:`save`, :meth:`write_logs`) are methods so that the step loop
    reads as the recipe. Only rank 0 writes files and emits events.
    """

    def __init__(
        self,
        config: TrainConfig,
        dist: Distributed,
        device: torch.device,
        resume: bool = False,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        on_event: Optional[EventCallback] = None,
    ) -> None:
        from ..models.registry import get_spec, resolve_weights

        self.config, self.dist, self.device = config, dist, device
        self.progress, self.cancel, self.on_event = progress, cancel, on_event
        self.spec = spec = get_spec(config.model)
        self.run_dir = run_dir = Path(config.out)
        self.latest_path, self.best_path = run_dir / LATEST, run_dir / BEST
        ckpt: Optional[Dict[str, Any]] = None
        if self.latest_path.exists():
            if not resume:
                raise MedSAMError(
                    f"'{run_dir}' already holds a training run ({LATEST}); resume it (--resume) or choose "
                    "another run folder"
                )
            ckpt = load_checkpoint(self.latest_path, map_location="cpu")
            check_resume_config(ckpt["config"], config, dist.world, int(ckpt.get("world_size", 1)))
        elif resume:
            raise MedSAMError(f"nothing to resume: '{self.latest_path}' does not exist")

        torch.manual_seed(config.seed)
        self.train_ds = train_ds = SliceDataset(config.data, "train", spec.preprocessing, spec.input_size,
                                                config.jitter, config.seed, config.labels)
        self.preparation_warnings = check_preparation(train_ds.manifest, config)
        self.sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        if len(train_ds) == 0:
            which = f" with label(s) {config.labels}" if config.labels else ""
            raise MedSAMError(
                f"the training cases of '{config.data}' have no slices{which}; check 'labels' against the "
                "labels listed in its manifest.json"
            )
        self.batches_per_epoch = len(self.sampler) // config.batch_size
        self.steps_per_epoch = self.batches_per_epoch // config.accumulate
        if self.steps_per_epoch < 1:
            raise MedSAMError(
                f"the training split has {len(train_ds)} slices, fewer than one optimizer step needs "
                f"(batch_size {config.batch_size} x accumulate {config.accumulate} x {dist.world} process(es)); "
                "lower the batch size or add cases"
            )
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, int(config.max_steps))

        if ckpt is not None:
            check_finite_weights(ckpt["model"], source=f"'{self.latest_path}'")
            self.model = build_model_for(spec, None, device)
            self.model.load_state_dict(ckpt["model"], strict=True)
        else:
            self.model = build_model_for(spec, resolve_weights(spec, config.checkpoint), device)
        self.freeze = bool(config.freeze_image_encoder)
        params = set_trainable(self.model, self.freeze)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.use_scaler = device.type == "cuda" and config.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)

        self.state: Dict[str, Any] = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best_mean_dice": None,
                                      "best_step": None}
        self.rows: List[Dict[str, Any]] = []
        self.last_val: Optional[Dict[str, Any]] = None
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            for key in ("epoch", "step", "step_in_epoch"):
                self.state[key] = int(ckpt[key])
            metrics = ckpt.get("metrics") or {}
            self.state["best_mean_dice"] = metrics.get("best_mean_dice")
            self.state["best_step"] = metrics.get("best_step")
            self.last_val = metrics.get("validation")
            set_rng_state(ckpt["rng"])
            self.rows = read_log(run_dir / LOG_CSV, self.state["step"])
        del ckpt

        self.net: nn.Module = Trainable(self.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)

        self.cache_bytes = int(config.embedding_cache_gb * (1 << 30)) if self.freeze else 0
        self.fingerprint = encoder_fingerprint(self.model) if self.freeze else ""
        self.validator: Optional[Validator] = None
        if dist.is_main and config.validation:
            self.validator = Validator(config.data, spec.preprocessing, spec.input_size, "val", config.labels,
                                       cache_bytes=self.cache_bytes)
        self.val_labels = self.validator.labels if self.validator is not None else []
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.to_file(run_dir / CONFIG_JSON)

    # -- what a step can do -----------------------------------------------------------------------
    def emit(self, event: Dict[str, Any]) -> None:
        if self.on_event is not None and self.dist.is_main:
            self.on_event(event)

    def checkpoint_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (only tensors and plain values)."""
        state = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "model": cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler else None,
            "epoch": state["epoch"],
            "step": state["step"],
            "step_in_epoch": state["step_in_epoch"],
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "architecture": self.spec.architecture,
            "model_name": self.spec.name,
            "world_size": self.dist.world,
            "metrics": {"validation": self.last_val, "best_mean_dice": state["best_mean_dice"],
                        "best_step": state["best_step"]},
        }

    def save(self, path: Path) -> None:
        if self.dist.is_main:
            torch_save(path, self.checkpoint_dict())
            self.emit({"event": "checkpoint", "path": str(path), "step": self.state["step"]})
        self.dist.barrier()

    def write_logs(self, plot: bool = True) -> None:
        if self.dist.is_main:
            write_log(self.run_dir / LOG_CSV, self.rows, self.val_labels)
            if plot:
                with contextlib.suppress(Exception):  # a plot is never worth failing a run
                    plot_log(self.rows, self.run_dir / PLOT_PNG, self.val_labels)

    def validate(self) -> None:
        """Held-out Dice (rank 0); a better mean Dice writes ``best.pth``."""
        state, rows = self.state, self.rows
        result = None
        if self.validator is not None:
            try:
                result = self.validator.run(self.model, self.device, self.config.amp, progress=self.progress,
                                            cancel=self.cancel)
            except Cancelled:
                result = None  # the step loop's (collective) cancel check stops the run
            set_train_mode(self.model, self.freeze)
        if result is not None:
            self.last_val = {"step": state["step"], **result}
            row = {"step": state["step"], "epoch": state["epoch"], "lr": self.config.lr,
                   "val_mean_dice": round(result["mean_dice"], 6)}
            for key, value in result["dice"].items():
                row[f"val_dice_{key}"] = round(value, 6)
            if rows and int(rows[-1]["step"]) == state["step"]:
                rows[-1].update(row)
            else:
                rows.append(row)
            self.emit({"event": "validation", "step": state["step"], "mean_dice": result["mean_dice"],
                       "dice": result["dice"]})
            best = state["best_mean_dice"]
            improved = best is None or result["mean_dice"] > best
            if improved:
                state["best_mean_dice"] = result["mean_dice"]
                state["best_step"] = state["step"]
            self.write_logs()
            if improved:
                torch_save(self.best_path, self.checkpoint_dict())
                self.emit({"event": "checkpoint", "path": str(self.best_path), "step": state["step"]})
        self.dist.barrier()

    def optimizer_step(self, it: Iterator[Dict[str, torch.Tensor]]) -> float:
        """One optimizer step over ``accumulate`` micro-batches; returns its loss (mean over ranks)."""
        config, device, net = self.config, self.device, self.net
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.accumulate):
            batch = next(it)
            boxes = batch["box"].to(device)
            target = batch["mask"].to(device)
            sync = micro == config.accumulate - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else net.no_sync()
            with ctx:
                with autocast(device, config.amp):
                    if self.freeze:
                        emb = frozen_embeddings(self.model, batch, self.train_ds, self.fingerprint, self.cache_bytes,
                                                device, config.amp)
                        logits = net(boxes, embeddings=emb)
                    else:
                        logits = net(boxes, images=batch["image"].to(device))
                loss = dice_bce_loss(logits, target)
                if not torch.isfinite(loss):
                    raise MedSAMError(
                        f"the loss became {loss.item()} at step {self.state['step'] + 1}; the last good "
                        f"checkpoint is kept. Lower the learning rate, or use --amp none"
                    )
                self.scaler.scale(loss / config.accumulate).backward()
            step_loss += float(loss.detach()) / config.accumulate
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.dist.mean(step_loss, device)

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``total_steps``; saves ``latest.pth`` as configured and when cancelled."""
        config, state, rows, dist = self.config, self.state, self.rows, self.dist
        for text in self.preparation_warnings:
            self.emit({"event": "warning", "message": text})
        self.emit({"event": "start", "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                   "train_slices": len(self.train_ds), "val_slices": len(self.validator) if self.validator else 0,
                   "step": state["step"], "device": str(self.device), "world_size": dist.world})
        set_train_mode(self.model, self.freeze)
        if config.validate_at_start and state["step"] == 0 and not rows:
            self.validate()

        loss_sum, loss_count = 0.0, 0
        t0 = time.perf_counter()
        while state["step"] < self.total_steps:
            epoch = state["epoch"]
            self.sampler.set_epoch(epoch)
            self.train_ds.set_epoch(epoch)
            indices = list(self.sampler)
            batches = [indices[i: i + config.batch_size]
                       for i in range(0, self.batches_per_epoch * config.batch_size, config.batch_size)]
            batches = batches[: self.steps_per_epoch * config.accumulate][state["step_in_epoch"] * config.accumulate:]
            loader = DataLoader(self.train_ds, batch_sampler=batches, num_workers=config.num_workers,
                                pin_memory=self.device.type == "cuda")
            it: Iterator[Dict[str, torch.Tensor]] = iter(loader)
            for _ in range(self.steps_per_epoch - state["step_in_epoch"]):
                if state["step"] >= self.total_steps:
                    break
                if dist.any(self.cancel is not None and self.cancel.cancelled, self.device):
                    self.save(self.latest_path)
                    self.write_logs()
                    raise Cancelled(f"training cancelled at step {state['step']}; resume with --resume")
                step_loss = self.optimizer_step(it)
                state["step"] += 1
                state["step_in_epoch"] += 1
                if state["step_in_epoch"] >= self.steps_per_epoch:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                loss_sum += step_loss
                loss_count += 1
                step = state["step"]
                epoch_end = state["step_in_epoch"] == 0
                last = step >= self.total_steps
                self.emit({"event": "step", "step": step, "total_steps": self.total_steps, "epoch": state["epoch"],
                           "loss": step_loss, "lr": config.lr, "elapsed_s": time.perf_counter() - t0})
                if dist.is_main:
                    report(self.progress, step, self.total_steps,
                           f"epoch {epoch + 1}/{config.epochs} loss {step_loss:.4f}")
                if step % config.log_every == 0 or epoch_end or last:
                    rows.append({"step": step, "epoch": state["epoch"], "loss": round(loss_sum / loss_count, 6),
                                 "lr": config.lr})
                    loss_sum, loss_count = 0.0, 0
                    self.write_logs(plot=False)
                do_val = (config.val_every and step % config.val_every == 0) or (not config.val_every and epoch_end)
                if do_val or last:
                    self.validate()
                do_save = ((config.save_every and step % config.save_every == 0)
                           or (not config.save_every and epoch_end) or last)
                if do_save:
                    self.save(self.latest_path)
            del it, loader
        self.write_logs()
        result = TrainResult(
            run_dir=self.run_dir, step=state["step"], epoch=state["epoch"],
            latest=self.latest_path if self.latest_path.exists() else None,
            best=self.best_path if self.best_path.exists() else None,
            best_mean_dice=state["best_mean_dice"], last_validation=self.last_val, history=rows,
        )
        self.emit({"event": "done", "step": state["step"], "best_mean_dice": state["best_mean_dice"],
                   "latest": str(self.latest_path), "best": str(self.best_path) if result.best else None})
        return result


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
            ``config.RESUMABLE_CHANGES`` for what may differ). Without it, a run folder that already
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
    config.validate()
    dist = Distributed()
    device = dist.setup(config.device)
    try:
        return TrainingRun(config, dist, device, resume, progress, cancel, on_event).run()
    finally:
        dist.teardown()
