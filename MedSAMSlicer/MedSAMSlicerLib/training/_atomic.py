"""Atomic file writes: write beside the target, then ``os.replace`` (readers never see half a file)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Union

from ..errors import MedSAMError

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then rename it to ``path``.

    A failure (or an interrupt) leaves any previous ``path`` untouched and no temporary file.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSAMError(f"cannot create the folder '{target.parent}' ({exc}); choose a writable location") from exc
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise MedSAMError(f"could not write '{target}' ({exc}); check free space and permissions") from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
    return target


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"

    def _write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, _write)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def torch_save(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write)
