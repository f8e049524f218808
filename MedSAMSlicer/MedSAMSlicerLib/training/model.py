"""The model as it is trained: the DDP-friendly wrapper, which parameters train, modes, mixed precision,
building from weights, and frozen-encoder embeddings (cached per slice, bit-identical to fresh ones)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .dataset import SliceDataset


class FrozenEmbeddingCache:
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


EMBEDDINGS = FrozenEmbeddingCache()


def encoder_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the image encoder's state (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, tensor in model.image_encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Trainable(nn.Module):
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


def set_train_mode(model: nn.Module, freeze_image_encoder: bool) -> None:
    model.train()
    if freeze_image_encoder:
        model.image_encoder.eval()


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def build_model_for(spec, weights: Optional[Path], device: torch.device):
    from ..models.checkpoints import load_model
    from ..models.modeling import build_model

    if weights is None:
        return build_model(spec.architecture).to(device)
    return load_model(spec, weights, device)


def frozen_embeddings(model: nn.Module, batch: Dict[str, torch.Tensor], dataset: SliceDataset, fingerprint: str,
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
                with autocast(device, amp):
                    emb = model.encode(image[None].to(device))
                if cache_bytes > 0:
                    EMBEDDINGS.put(key, emb, cache_bytes)
            out.append(emb.to(device))
    return torch.cat(out)
