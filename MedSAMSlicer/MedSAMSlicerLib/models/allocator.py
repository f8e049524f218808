"""Keep freed tensor memory in the process heap while the model runs (glibc, i.e. Linux only).

Why: PyTorch's CPU tensors come from ``malloc``. glibc serves a large request with a fresh
``mmap`` and gives it back to the kernel on ``free``, so every forward pass faults its
activations in again, page by page (the kernel zeroes each page). The image encoder allocates
and frees hundreds of MB per slice, so this costs system time, a lot of it on a VM: on our 2-core
benchmark machine a script running a 20-slice LiteMedSAM propagation twice spent 9 s in the
kernel, 1 s with freed memory kept.

Keeping freed memory costs resident memory (freed blocks that do not fit the next request stay
mapped). Measured in a fresh process per setting, that propagation (time / peak resident-set
growth): glibc's defaults 16.0 s / 323 MB, a 64 MiB mmap threshold 14.9 s / 341 MB, 128 MiB
13.8 s / 405 MB, 256 MiB 13.5 s / 421 MB; the reference pipeline takes 27.4 s / 381 MB. So it
is opt-in: the default keeps our peak memory below the reference's, and a user on Linux who
prefers speed sets ``MEDSAM_REUSE_FREED_MEMORY=1`` (256 MiB: 16% faster, about 100 MB more).

:func:`reuse_freed_memory`, when switched on, raises glibc's mmap and trim thresholds for as long
as model work runs, then hands the free memory back to the system (``malloc_trim``) and restores
glibc's documented defaults (128 KiB each; the adaptive threshold stays off afterwards). The
settings are process-wide (``mallopt``), so nested and concurrent uses share one depth count:
only the outermost exit restores. Elsewhere (Windows, macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # buffers above it are still mmapped; the trade is in the docstring
TRIM_THRESHOLD = 512 << 20
GLIBC_DEFAULT_THRESHOLD = 128 << 10
ENV_SWITCH = "MEDSAM_REUSE_FREED_MEMORY"

_lock = threading.Lock()
_depth = 0
_libc: Optional[Any] = None
_libc_checked = False


def _glibc() -> Optional[Any]:
    """The process's C library when it is glibc (has ``gnu_get_libc_version``), else ``None``."""
    global _libc, _libc_checked
    if not _libc_checked:
        _libc_checked = True
        try:
            lib = ctypes.CDLL(None)
            lib.gnu_get_libc_version  # noqa: B018 - raises AttributeError where it is not glibc
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.mallopt.restype = ctypes.c_int
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_trim.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError, TypeError):
            _libc = None
    return _libc


def supported() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here: glibc, and switched on.

    On when the environment variable ``MEDSAM_REUSE_FREED_MEMORY`` is ``1``/``true``/``yes``/``on``.
    """
    return os.environ.get(ENV_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on") and _glibc() is not None


def active() -> bool:
    """Whether a :func:`reuse_freed_memory` block is running in this process now."""
    return _depth > 0


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, large freed buffers stay in the heap for the next allocation.

    Yields whether the allocator was tuned (``False`` where it is not glibc or it is switched
    off). On the outermost exit: free memory goes back to the system and glibc's default
    thresholds return.
    """
    global _depth
    lib = _glibc() if supported() else None
    if lib is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            lib.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
                lib.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
                lib.malloc_trim(0)
