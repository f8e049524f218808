"""Long engine work in a worker thread, followed from a GUI thread that must stay responsive.

A :class:`BackgroundTask` runs ``work(progress, cancel)`` in a worker thread and hands its
progress, its result or its exception to the thread that started it. The GUI side calls
:meth:`BackgroundTask.pump` from a timer: it waits a few tens of milliseconds for the worker with
:meth:`threading.Event.wait`, which releases Python's global interpreter lock (GIL), and then
returns what the worker reported meanwhile.

Why the waiting matters: an embedded interpreter whose host event loop keeps the GIL while it is
idle (3D Slicer's Qt event loop through PythonQt does; SlicerNNInteractive waits on an event in
short slices for the same reason) never lets a worker thread run Python code, so the worker would
only move while the user clicks. A timer that fires whenever the event loop is idle and waits up
to ``budget_s`` in :meth:`pump` gives the worker nearly all the time, while the event loop still
handles input, paints and the Cancel button between two pumps.

Every started task is cancelled and joined at interpreter exit: a daemon thread still inside
torch when Python finalises aborts the process, which would turn a clean exit into a crash.

Plain Python: no Qt, no Slicer; the same waiting code runs in the tests.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any, Callable, List, Optional, Tuple

from .progress import Cancelled, CancelToken

#: ``work(progress, cancel)``: the function a task runs; ``progress(done, total, message)``.
Work = Callable[[Callable[[int, int, str], None], CancelToken], Any]
Progress = Tuple[int, int, str]

_LIVE: weakref.WeakSet[BackgroundTask] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class BackgroundTask:
    """``work(progress, cancel)`` in a worker thread, observed without blocking.

    Args:
        work: the function to run; it must not touch GUI or scene objects (those belong to the
            thread that owns them) and should check ``cancel`` between units of work.
        name: the thread's name (shown in debuggers and logs).

    Typical GUI use (a zero-interval timer calls ``onTimer``)::

        task = BackgroundTask(lambda progress, cancel: engine_call(progress=progress, cancel=cancel))
        task.start()
        def onTimer():
            for done, total, message in task.pump():
                showProgress(done, total, message)
            if task.done:
                timer.stop()
                use(task.result())   # raises the worker's exception, Cancelled included
    """

    def __init__(self, work: Work, name: str = "medsam-task") -> None:
        self._work = work
        self.name = name
        self.cancel_token = CancelToken()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._progress: List[Progress] = []
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    # -- worker side ------------------------------------------------------------------------------
    def _report(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            self._progress.append((int(done), int(total), str(message)))

    def _run(self) -> None:
        try:
            self._result = self._work(self._report, self.cancel_token)
        except BaseException as exc:  # handed to the GUI thread by result()
            self._error = exc
        finally:
            self._done.set()

    # -- owner side -------------------------------------------------------------------------------
    def start(self) -> BackgroundTask:
        """Start the worker thread (once); returns ``self``."""
        if self._thread is not None:
            raise RuntimeError(f"task '{self.name}' was already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._thread is not None

    @property
    def done(self) -> bool:
        """Whether the work has returned or raised."""
        return self._done.is_set()

    @property
    def running(self) -> bool:
        """Started and not done."""
        return self.started and not self.done

    def cancel(self) -> None:
        """Ask the work to stop at its next check (it then raises :class:`Cancelled`)."""
        self.cancel_token.cancel()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self.cancel_token.cancelled

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block up to ``timeout`` seconds (``None``: until done), releasing the GIL; ``True`` when done."""
        return self._done.wait(timeout)

    def pump(self, budget_s: float = 0.04) -> List[Progress]:
        """Give the worker up to ``budget_s`` seconds (waiting releases the GIL) and return the
        progress reports ``(done, total, message)`` that arrived since the last call, oldest first.

        Call it from a GUI timer; it returns early when the work ends.
        """
        if self.started and not self.done:
            self._done.wait(max(0.0, float(budget_s)))
        with self._lock:
            reports, self._progress = self._progress, []
        return reports

    def result(self) -> Any:
        """The work's return value; raises its exception (``Cancelled`` for a cancelled run).

        Raises:
            RuntimeError: the work has not finished.
        """
        if not self.done:
            raise RuntimeError(f"task '{self.name}' has not finished")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def error(self) -> Optional[BaseException]:
        """The exception the work raised, if any (``None`` while running or after success)."""
        return self._error if self.done else None

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the worker thread itself to end."""
        if self._thread is not None:
            self._thread.join(timeout)


def run_in_background(work: Work, name: str = "medsam-task") -> BackgroundTask:
    """Create and start a :class:`BackgroundTask`."""
    return BackgroundTask(work, name).start()


def cancel_all(timeout: float = 120.0) -> None:
    """Cancel every running task and wait for its thread (called at interpreter exit)."""
    with _LIVE_LOCK:
        tasks = list(_LIVE)
    for task in tasks:
        task.cancel()
    for task in tasks:
        task.join(timeout)


atexit.register(cancel_all)

__all__ = ["BackgroundTask", "Cancelled", "cancel_all", "run_in_background"]
