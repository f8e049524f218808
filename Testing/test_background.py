"""Background work followed from a GUI thread (``MedSAMSlicerLib.background``).

Slicer's Qt event loop keeps Python's GIL while it is idle, so a worker thread only runs while
the GUI thread releases it. These tests make the main thread behave like that idle loop (a long C
call that holds the GIL) and check that the worker makes progress only through
:meth:`BackgroundTask.pump`, the same call the effect's and the module's timers make.
"""

from __future__ import annotations

import threading

import pytest

from MedSAMSlicerLib.background import BackgroundTask, run_in_background
from MedSAMSlicerLib.progress import Cancelled


def _hold_gil(n: int = 3_000_000) -> None:
    """A C-level loop that keeps the GIL (as Slicer's idle event loop does)."""
    sum(range(n))


def _counting_work(steps: int, started: threading.Event):
    def work(progress, cancel):
        started.set()
        for i in range(steps):
            cancel.raise_if_cancelled()
            total = 0
            for k in range(2000):  # Python bytecode: needs the GIL
                total += k
            progress(i + 1, steps, f"step {i + 1}")
        return steps
    return work


class _Follower:
    """Reads a task's progress as a GUI would: the last step reported so far."""

    def __init__(self, task: BackgroundTask) -> None:
        self.task = task
        self.step = 0

    def pump(self, budget_s: float) -> int:
        reports = self.task.pump(budget_s)
        if reports:
            self.step = reports[-1][0]
        return self.step


def test_the_worker_moves_only_when_the_gui_thread_pumps():
    """The GUI thread idles (a C loop holding the GIL) for as long as five idle periods with a pump
    after each: the worker barely moves without the pumps (the control), many times more with them."""
    started = threading.Event()
    task = BackgroundTask(_counting_work(1_000_000, started)).start()
    assert started.wait(10)
    follower = _Follower(task)
    start = follower.pump(0)
    _hold_gil(5 * 3_000_000)  # one idle period as long as the five below, with no bytecode in it
    idle_only = follower.pump(0) - start
    start = follower.step
    for _ in range(5):
        _hold_gil()
        follower.pump(0.04)
    pumped = follower.step - start
    task.cancel()
    task.wait(30)
    with pytest.raises(Cancelled):
        task.result()
    assert pumped > 4 * idle_only + 4, (idle_only, pumped)


def test_pumping_lets_the_worker_finish_while_the_gui_thread_idles():
    started = threading.Event()
    steps = 300
    task = BackgroundTask(_counting_work(steps, started)).start()
    seen = []
    pumps = 0
    while not task.done and pumps < 2000:
        _hold_gil()          # the event loop handles input and paints
        seen += task.pump()  # the timer: the worker runs while we wait
        pumps += 1
    seen += task.pump()
    assert task.done, f"the worker did not finish after {pumps} pumps"
    assert task.result() == steps
    assert [s[0] for s in seen] == list(range(1, steps + 1))
    assert seen[-1] == (steps, steps, f"step {steps}")


def test_errors_and_cancel_reach_the_owner():
    def fails(progress, cancel):
        raise ValueError("bad box")

    task = run_in_background(fails)
    task.wait(10)
    assert isinstance(task.error, ValueError)
    with pytest.raises(ValueError, match="bad box"):
        task.result()
    pending = BackgroundTask(lambda p, c: 1)
    with pytest.raises(RuntimeError, match="has not finished"):
        pending.result()
    pending.start()
    with pytest.raises(RuntimeError, match="already started"):
        pending.start()


def test_a_real_propagation_runs_in_the_background(lite_segmenter, ct_path):
    """The model in a worker, followed from a GIL-holding main thread: the result equals the same
    call made directly."""
    from MedSAMSlicerLib.fileio.volumes import read_volume
    from MedSAMSlicerLib.segmentation.preprocessing import Window

    volume = read_volume(ct_path)
    lite_segmenter.set_volume(volume.array, Window.preset("abdomen"))
    box = (45, 30, 100, 85)

    def work(progress, cancel):
        return lite_segmenter.segment_3d(90, box, z_range=(89, 91), progress=progress, cancel=cancel)

    task = run_in_background(work)
    reports = []
    while not task.done:
        _hold_gil()
        reports += task.pump()
    background = task.result()
    direct = lite_segmenter.segment_3d(90, box, z_range=(89, 91))
    assert reports and reports[-1][0] == reports[-1][1]
    assert (background.mask == direct.mask).all() and background.mask.any()
