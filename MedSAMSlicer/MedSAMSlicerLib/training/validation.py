"""Validation Dice of a model on a split of a prepared dataset, and ``medsam-train evaluate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import MedSAMError
from ..models.checkpoints import check_finite_weights
from ..progress import CancelToken, ProgressCallback, check_cancel, report
from ..segmentation.preprocessing import box_to_model, logits_to_mask
from .dataset import SliceDataset, mask_box
from .model import EMBEDDINGS, autocast, build_model_for, encoder_fingerprint
from .runfiles import load_checkpoint

PathLike = Union[str, "os.PathLike[str]"]


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
                with autocast(device, amp):
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
                with autocast(device, amp):
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
    from ..models.checkpoints import load_model
    from ..models.devices import select_device
    from ..models.registry import get_spec, resolve_weights

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
        net = build_model_for(spec, None, dev)
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
