"""Safe checkpoint loading.

- :func:`load_state_dict` reads a ``.pth`` with ``torch.load(..., weights_only=True)`` only: a
  file that would need to run code or rebuild arbitrary objects is refused, never executed.  It
  accepts plain state dicts, ``{"model": sd, "optimizer": ..., "epoch": ...}`` training
  checkpoints (MedSAM's ``train_one_gpu.py``), ``{"state_dict": sd}`` and ``module.`` (DDP) or
  ``_orig_mod.`` (``torch.compile``) key prefixes.
- :func:`load_model` builds the architecture and loads strictly; when the keys do not fit it says
  which model the file looks like; weights with NaN or infinite values are refused
  (:func:`check_finite_weights`).

Hashing, files inside wheels and downloads are in ``files.py``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import numpy as np
import torch

from ..errors import MedSAMError
from .modeling import (
    ARCHITECTURE_TITLES,
    ARCHITECTURES,
    NOT_ON_META,
    SamModel,
    build_model,
    describe_architecture,
)

PathLike = Union[str, "os.PathLike[str]"]

#: Keys of SAM's ``Sam`` that are not weights of ours (pixel normalisation buffers); dropped.
IGNORED_KEYS = ("pixel_mean", "pixel_std")
#: Wrapper prefixes stripped when every key carries them (DDP, torch.compile).
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
#: Keys only SAM 2's networks (MedSAM2) have.
SAM2_KEY_PREFIXES = ("memory_attention.", "memory_encoder.", "image_encoder.trunk.")
#: Keys under which training checkpoints keep the model's state dict.
NESTED_STATE_KEYS = ("model", "state_dict", "model_state_dict")



# -- loading --------------------------------------------------------------------------------------
def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Only ``torch.load(path, map_location="cpu", weights_only=True)`` touches the file.

    Raises:
        MedSAMError: the file is missing, truncated or corrupt, contains code or objects other
            than plain tensors and containers, or holds no dict of tensors.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise MedSAMError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise MedSAMError(f"checkpoint path is not a file: {p}")
    if p.stat().st_size == 0:
        raise MedSAMError(f"checkpoint file is empty: {p}; download or copy it again")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise MedSAMError(
                f"refusing to load: the file contains code/objects, not plain tensors ({p}). Nothing in it "
                "was run. If you made this file yourself and trust it, re-save only its tensors, e.g. "
                "torch.save(model.state_dict(), 'weights.pth')."
            ) from None
        raise MedSAMError(_corrupt_message(p, exc)) from None
    except Exception as exc:  # truncated zip, bad magic number, EOF, garbage: all mean a bad file
        raise MedSAMError(_corrupt_message(p, exc)) from None
    return _to_state_dict(obj, p)


def _corrupt_message(path: Path, exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (
        f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint ({detail}). "
        "Download or copy it again."
    )


def _to_state_dict(obj: object, path: Path) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints and wrapper prefixes; check that every value is a tensor."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        nested = next((k for k in NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise MedSAMError(
            f"{path} is not a model checkpoint: it holds {kind}, not a dict of tensors "
            f"(nor a training checkpoint with one under {' / '.join(repr(k) for k in NESTED_STATE_KEYS)})"
        )
    bad = [(k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        key, value = bad[0]
        raise MedSAMError(
            f"{path} is not a dict of tensors: {len(bad)} of its {len(obj)} entries are not tensors "
            f"(e.g. {key!r}: {type(value).__name__})"
        )
    sd: Dict[str, torch.Tensor] = dict(obj)
    for prefix in STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


_SHAPES: Dict[str, Dict[str, Tuple[int, ...]]] = {}


def expected_shapes(architecture: str) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of an architecture's state dict, built on the meta device (no memory; MedSAM2's,
    which cannot be, once on the CPU, or taken from the first model :func:`load_model` builds)."""
    shapes = _SHAPES.get(architecture)
    if shapes is None:
        if architecture in NOT_ON_META:
            model = build_model(architecture)
        else:
            with torch.device("meta"):
                model = build_model(architecture)
        shapes = _SHAPES[architecture] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes


def _buildable(architecture: str) -> bool:
    """Whether the architecture's code is installed (MedSAM2 needs the optional ``sam2`` package)."""
    try:
        expected_shapes(architecture)
        return True
    except MedSAMError:
        return False


def _resolve_architecture(architecture_or_spec: object) -> str:
    arch = getattr(architecture_or_spec, "architecture", None)
    if isinstance(arch, str):
        return arch
    if isinstance(architecture_or_spec, str):
        if architecture_or_spec in ARCHITECTURES:
            return architecture_or_spec
        from .registry import get_spec, list_specs  # a model name such as "medsam"

        try:
            return get_spec(architecture_or_spec).architecture
        except MedSAMError:
            raise MedSAMError(
                f'unknown model or architecture "{architecture_or_spec}": models are '
                f"{', '.join(s.name for s in list_specs())}; architectures are {', '.join(ARCHITECTURES)}"
            ) from None
    raise MedSAMError(f"expected an architecture name or a ModelSpec, got {architecture_or_spec!r}")


def check_state_dict(architecture: str, state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Raise :class:`MedSAMError` unless ``state_dict`` fits ``architecture`` exactly.

    The message names the architecture the keys look like when it is another known one, and
    counts the missing, unexpected and wrongly shaped tensors.
    """
    expected = expected_shapes(architecture)
    keys = set(state_dict)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    wrong_shape = sorted(
        k for k in keys & set(expected) if tuple(state_dict[k].shape) != expected[k]
    )
    if not (missing or unexpected or wrong_shape):
        return

    def overlap(arch: str) -> float:
        other = expected_shapes(arch)
        same = sum(1 for k in keys if k in other and tuple(state_dict[k].shape) == other[k])
        return same / max(len(keys | set(other)), 1)

    def candidate(arch: str) -> bool:
        # MedSAM2's network is built for real (not on the meta device): only for files that look like SAM 2.
        if arch == architecture:
            return True
        if arch in NOT_ON_META and not any(k.startswith(SAM2_KEY_PREFIXES) for k in keys):
            return False
        return _buildable(arch)

    scores = {arch: overlap(arch) for arch in ARCHITECTURES if candidate(arch)}
    best = max(scores, key=scores.__getitem__)
    counts = f"{len(missing)} missing keys, {len(unexpected)} unexpected keys, {len(wrong_shape)} tensors of the wrong shape"
    examples = []
    if missing:
        examples.append(f"missing e.g. {missing[0]}")
    if unexpected:
        examples.append(f"unexpected e.g. {unexpected[0]}")
    if wrong_shape:
        k = wrong_shape[0]
        examples.append(f"{k} is {tuple(state_dict[k].shape)}, expected {expected[k]}")
    detail = f"{counts} ({'; '.join(examples)})"
    if best != architecture and scores[best] > 0.9:
        raise MedSAMError(
            f"this checkpoint is for {describe_architecture(best)}, not {describe_architecture(architecture)} "
            f"({source}: {detail}). Choose the {ARCHITECTURE_TITLES.get(best, best)} model for it, "
            "or give a checkpoint of the chosen model."
        )
    closest = (
        f"the closest is {describe_architecture(best)} with {scores[best]:.0%} of the keys matching"
        if scores[best] > 0 else f"none of its keys belong to {' or '.join(map(describe_architecture, ARCHITECTURES))}"
    )
    raise MedSAMError(
        f"{source} does not fit {describe_architecture(architecture)}: {detail}. "
        f"It does not look like any known model either ({closest})."
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    # numpy's isfinite: exact and much faster than torch's on a busy CPU (no thread pool).
    t = tensor.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # numpy has no bfloat16
    return bool(np.isfinite(t.numpy()).all())


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Refuse weights holding NaN or infinite values (a diverged fine-tune).

    Such a model loads and runs, and answers every box with an empty or garbage mask.

    Raises:
        MedSAMError: naming how many tensors are affected, the first one, and what to do.
    """
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not _all_finite(v)]
    if bad:
        raise MedSAMError(
            f"{source} holds NaN or infinite weights in {len(bad)} of its {len(state_dict)} tensors (e.g. {bad[0]}): "
            "the training that wrote it diverged, and the model would answer every box with an empty or "
            "meaningless mask. Use an earlier checkpoint (e.g. best.pth of the run), or train again with a lower "
            "learning rate."
        )


def load_model(
    architecture_or_spec: object,
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
) -> SamModel:
    """Build a model and load a checkpoint into it strictly; returned in eval mode on ``device``.

    Args:
        architecture_or_spec: an architecture name ("vit_b", "tiny_vit"), a registry model name
            ("medsam", "litemedsam"), or a ``registry.ModelSpec``.
        path: the checkpoint (see :func:`load_state_dict` for the accepted layouts).
        device: where to put the model.

    Raises:
        MedSAMError: unreadable or unsafe file, keys or shapes that do not fit (the message says
            which model the file looks like), NaN or infinite weights, or an unusable device.
    """
    architecture = _resolve_architecture(architecture_or_spec)
    if architecture not in ARCHITECTURES:
        build_model(architecture)  # raises the standard unknown-architecture error
    sd = load_state_dict(path)
    for key in IGNORED_KEYS:
        sd.pop(key, None)
    model = None
    if architecture in NOT_ON_META and architecture not in _SHAPES:
        # Built for real anyway: its shapes serve the check (no second build).
        model = build_model(architecture)
        _SHAPES[architecture] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(architecture, sd, source=f"checkpoint {Path(os.fspath(path)).name}")
    check_finite_weights(sd, source=f"checkpoint {Path(os.fspath(path)).name}")
    model = model if model is not None else build_model(architecture)
    model.load_state_dict(sd, strict=True)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise MedSAMError(f"cannot put the model on device {device!s}: {exc}") from None
    return model.eval()
