"""Device and precision selection: CUDA, Apple MPS or CPU, chosen automatically."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import MedSAMError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|mps`` (or ``cuda:N``) into a usable :class:`torch.device`.

    ``auto`` takes CUDA when present, then MPS, else the CPU. Asking for a device that this
    torch build cannot use raises :class:`MedSAMError` saying what to do.
    """
    key = (name or "auto").lower()
    base = key.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise MedSAMError(f"unknown device '{name}'; choose one of: {', '.join(DEVICE_CHOICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise MedSAMError(
            f"device '{name}' was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu (or auto), or install a CUDA build of torch"
        )
    if base == "mps" and not _mps_available():
        raise MedSAMError(f"device '{name}' was asked for, but Apple MPS is not available here; use --device cpu")
    return torch.device(key)


def select_precision(name: Optional[str], device: torch.device) -> torch.dtype:
    """The compute dtype for the image encoder.

    ``auto``: bfloat16 on CUDA GPUs that support it (the masks stay the same, see the tests and
    the benchmark), float16 on MPS, float32 on the CPU.
    """
    key = (name or "auto").lower()
    if key not in PRECISION_CHOICES:
        raise MedSAMError(f"unknown precision '{name}'; choose one of: {', '.join(PRECISION_CHOICES)}")
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[key]
