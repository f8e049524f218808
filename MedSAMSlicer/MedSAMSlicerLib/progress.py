"""Progress reporting and cancellation shared by every long-running engine call.

Long work (encoding many slices, propagation, preprocessing, training, downloads) takes an
optional ``progress`` callback ``progress(done, total, message)`` and an optional
:class:`CancelToken`; it calls ``cancel.raise_if_cancelled()`` between units of work, so a
cancelled run stops at a clean boundary and the caller decides what to keep (usually nothing).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional, TextIO

ProgressCallback = Callable[[int, int, str], None]


class Cancelled(Exception):
    """Raised inside long work when its :class:`CancelToken` was cancelled."""


class CancelToken:
    """A thread-safe flag that a front end sets and long work checks between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` if :meth:`cancel` was called."""
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` when ``cancel`` is given and set."""
    if cancel is not None:
        cancel.raise_if_cancelled()


def report(progress: Optional[ProgressCallback], done: int, total: int, message: str = "") -> None:
    """Call ``progress`` when it is given."""
    if progress is not None:
        progress(done, total, message)


class TerminalProgress:
    """A dependency-free progress bar for the command line (writes to stderr).

    Use it as the ``progress`` callback: ``TerminalProgress("encoding")(done, total, msg)``.
    It redraws at most ten times a second and ends the line when ``done == total``.

    Why not ``tqdm`` (issue 14 asked): every long task here reports through the engine's own
    ``progress(done, total, message)`` callback (the Slicer panels and the worker-thread pump use
    the same one), so ``tqdm`` would still need an adapter of about this size (a bar created per
    task, ``total`` that may change, ``n`` set rather than incremented, ``refresh`` rate), and it
    would be one more package to install into Slicer's Python for the command line alone.
    """

    def __init__(self, label: str = "", stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._last = 0.0
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.perf_counter()
        finished = total > 0 and done >= total
        if not finished and now - self._last < 0.1:
            return
        self._last = now
        frac = min(1.0, done / total) if total > 0 else 0.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"\r{self.label} [{bar}] {done}/{total} {now - self._start:5.1f}s {message}"
        self.stream.write(text[:120].ljust(120) if not finished else text)
        if finished:
            self.stream.write("\n")
        self.stream.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a closing terminal, a job scheduler), raised like Ctrl+C's
    :class:`KeyboardInterrupt` so that the same clean-up runs (no temporary file is left)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, as SIGINT raises
    :class:`KeyboardInterrupt`: the one rule of the command-line front ends (``medsam-slicer``,
    the headless script). Outside the main thread (or without SIGTERM) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
