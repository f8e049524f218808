"""Slice embeddings kept on disk between evaluation runs (``evaluate --embedding-cache DIR``).

Comparing settings means running the same volumes again and again; encoding is ~90% of the
work on a CPU. The in-memory cache already serves every variant of one run; this store keeps
the embeddings between runs. Files are named by a hash of the predictor's cache key (volume
content, window, weights, preprocessing, slice), so a changed volume, window or checkpoint never
matches an old file.
"""

from __future__ import annotations

import hashlib
import os
from typing import Set, Union

import numpy as np
import torch

from ..errors import MedSAMError
from ..fileio.atomic import atomic_write, check_folder


class EmbeddingStore:
    """A folder of ``.npy`` embeddings (float32, 4 MiB per LiteMedSAM slice)."""

    def __init__(self, folder: Union[str, os.PathLike[str]]) -> None:
        self.folder = check_folder(folder, "embedding cache folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedSAMError(f"cannot use '{self.folder}' as an embedding cache ({exc.strerror})") from None
        self._saved: Set[str] = {p.stem for p in self.folder.glob("*.npy")}

    @staticmethod
    def _name(key) -> str:
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def load(self, predictor) -> int:
        """Put every stored embedding of the predictor's current volume into its cache; returns how many."""
        n = 0
        for z in range(predictor.depth):
            key = predictor.cache_key(z)
            name = self._name(key)
            if name in self._saved and key not in predictor.cache:
                array = np.load(self.folder / f"{name}.npy")
                predictor.cache.put(key, torch.from_numpy(array))
                n += 1
        return n

    def save(self, predictor) -> int:
        """Write the cached embeddings of the predictor's current volume not stored yet; returns how many."""
        n = 0
        for z in range(predictor.depth):
            key = predictor.cache_key(z)
            name = self._name(key)
            if name in self._saved or key not in predictor.cache:
                continue
            array = predictor.cache.get(key).cpu().numpy()
            atomic_write(self.folder / f"{name}.npy", lambda tmp, a=array: np.save(tmp, a))
            self._saved.add(name)
            n += 1
        return n
