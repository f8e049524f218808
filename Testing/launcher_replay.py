"""What Slicer's ``PythonSlicer`` does with the program it launches, replayed in plain Python.

``PythonSlicer`` is CTK's application launcher configured for ``python-real``
(Slicer ``SuperBuild/python_configure_python_launcher.cmake``, ``SPLASHSCREEN_DISABLED``;
``CMake/SlicerBlockInstallPython.cmake`` installs ``python-real``). Its ``runProcess``
(commontk/AppLauncher ``Base/ctkAppLauncher.cpp``, v0.1.33 for Slicer 5.10.0 and v0.1.34 for
5.12.3, ``SuperBuild/External_CTKAPPLAUNCHER.cmake``) starts the real interpreter as a child with
``QProcess``:

* no splash screen -> ``QProcess::ForwardedChannels``: the child writes straight to the
  launcher's stdout and stderr;
* ``QProcess::ForwardedInputChannel``: the child reads the launcher's stdin;
* the child stays in the launcher's process group (``QProcess`` starts no new session);
* no signal handler: a SIGTERM or SIGINT ends the launcher only; nothing is forwarded;
* when the child finishes, the launcher exits with its exit code (``applicationFinished``).

Usage (what a ``PythonSlicer`` shim runs): ``python launcher_replay.py REAL_PYTHON ARGS...``.
:func:`make_python_slicer` writes such a shim, an executable named ``PythonSlicer``.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path


def make_python_slicer(folder: Path, real_python: str = sys.executable) -> Path:
    """An executable ``folder/PythonSlicer`` that runs ``real_python`` behind this launcher replay (POSIX)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "PythonSlicer"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "{real_python}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim


def main(argv) -> int:
    real, *args = argv
    # A Qt application installs no handler: SIGINT and SIGTERM end the launcher at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # stdin, stdout, stderr inherited (forwarded channels); same process group; no new session.
    child = subprocess.Popen([real, *args], close_fds=True)
    code = child.wait()
    return code if code >= 0 else 1  # a crash: EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
