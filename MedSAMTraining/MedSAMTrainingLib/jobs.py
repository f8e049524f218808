"""Run ``medsam-train`` in a background process and follow it: plain Python, no Qt, no Slicer.

A :class:`TrainingJob` runs one or more ``python -m MedSAMSlicerLib.training.cli ... --progress-json``
commands one after the other (in Slicer the Python is ``PythonSlicer``), reads their JSON
progress lines on a reader thread, and hands them out through :meth:`TrainingJob.poll`, which a
GUI timer calls without ever blocking.

Stopping goes through the process's standard input, not signals (``medsam-train ...
--stop-on-stdin``): in Slicer the Python is ``PythonSlicer``, a CTK launcher that runs
``python-real`` as its child, forwards no signals, and hands its standard input to that child
(``QProcess::ForwardedInputChannel``; commontk/AppLauncher ``Base/ctkAppLauncher.cpp``, versions
0.1.33 and 0.1.34 that Slicer 5.10.0 and 5.12.3 ship, ``SuperBuild/External_CTKAPPLAUNCHER.cmake``;
``python-real`` is installed by ``CMake/SlicerBlockInstallPython.cmake``). A signal to the
launcher would end the launcher and leave the trainer running. So:

* :meth:`TrainingJob.cancel` writes ``stop`` to the pipe and closes it: the trainer saves
  ``latest.pth`` for the current step (resumable), exports, and exits; after ``grace_s`` the
  whole tree is killed: the launcher's process group (POSIX) or its tree (Windows ``taskkill /T``)
  and the trainer itself, whose own id it reported in its first line (``{"event": "started",
  "pid"}``), even when the launcher is already gone.
* If the program that started the job goes away without cancelling (Slicer quits, crashes or is
  killed), the pipe's writing end closes with it; the trainer reads end-of-file and stops the same
  way by itself, then exits (at the latest ``--stop-grace`` seconds later), on Linux, macOS and
  Windows alike.

Typical use::

    job = TrainingJob({"data": "/data/flare22", "out": "/runs/liver", "model": "litemedsam", "epochs": 5})
    job.start()
    while job.running:
        for event in job.poll():
            print(event)          # {"event": "step", "step": 3, "total_steps": 40, "loss": 0.21, ...}
        time.sleep(0.5)
    print(job.returncode, job.error_text())

``settings["data"]`` may be a preprocessed dataset (a folder with ``manifest.json``) or a raw
FLARE22-layout folder (``images/`` + ``labels/``); the latter is preprocessed first into
``<out>/dataset`` (skipped on later runs: the preprocessing resumes).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence

CLI_MODULE = "MedSAMSlicerLib.training.cli"
DATASET_SUBFOLDER = "dataset"
JOB_CONFIG = "job-config.json"
CANCELLED_EXIT_CODE = 130  # what medsam-train returns when it stopped on request


def engine_folder() -> Optional[str]:
    """The folder that holds the ``MedSAMSlicerLib`` package (to put on ``PYTHONPATH``), if found."""
    spec = importlib.util.find_spec("MedSAMSlicerLib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)


def cli_command(python: str, args: Sequence[str]) -> List[str]:
    """``[python, "-m", "MedSAMSlicerLib.training.cli", *args, "--progress-json", "--stop-on-stdin"]``."""
    return [python, "-m", CLI_MODULE, *[str(a) for a in args], "--progress-json", "--stop-on-stdin"]


def is_prepared(folder: os.PathLike) -> bool:
    """Whether ``folder`` is a preprocessed dataset (has ``manifest.json``)."""
    return (Path(folder) / "manifest.json").is_file()


def preprocess_args(data_dir: str, out_dir: str, options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Command-line arguments of ``medsam-train preprocess`` for ``options``.

    ``options`` keys: ``preset``, ``modality``, ``window_level``, ``window_width``, ``stretch``,
    ``dust_3d``, ``dust_2d``, ``exclude_labels`` (list), ``holdout`` (int) or ``holdout_cases``
    (list), ``workers``.
    """
    opts = dict(options or {})
    args = ["preprocess", data_dir, out_dir]
    for key in ("preset", "modality", "window_level", "window_width", "dust_3d", "dust_2d", "holdout", "workers"):
        if opts.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(opts[key])]
    if opts.get("stretch") is False:
        args.append("--no-stretch")
    if opts.get("exclude_labels") is not None:
        ids = ",".join(str(int(v)) for v in opts["exclude_labels"])
        args += ["--exclude-labels", ids or "none"]
    if opts.get("holdout_cases"):
        args += ["--holdout-cases", *[str(c) for c in opts["holdout_cases"]]]
    return args


class TrainingJob:
    """A ``medsam-train`` pipeline in a background process (see the module docstring).

    Args:
        settings: :class:`~MedSAMSlicerLib.training.trainer.TrainConfig` keys (``data``, ``out``,
            ``model``, ``epochs``, ...), written to ``<out>/job-config.json`` and given to ``train``.
        python: the Python to run (Slicer: ``PythonSlicer``); default ``sys.executable``.
        env: the process environment (default: this one, with the engine folder on ``PYTHONPATH``).
        resume: continue the run in ``out`` from its ``latest.pth``.
        preprocess: options for the preprocessing of a raw ``data`` folder (see :func:`preprocess_args`).
        commands: run these argument lists instead (each becomes a :func:`cli_command`); ``settings``
            is then ignored.
        grace_s: seconds between the stop request and killing the process tree: a last resort,
            after the trainer's own ``--stop-grace`` (120 s), since a kill loses the step in progress
            (a slow step, validation or saving on a busy CPU can take tens of seconds).
        export_to: when the run ends (finished or cancelled), the training process itself writes its
            best (else latest) weights there as a plain weights file (``medsam-train train --export-to``).
    """

    def __init__(
        self,
        settings: Optional[Mapping[str, Any]] = None,
        python: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        resume: bool = False,
        preprocess: Optional[Mapping[str, Any]] = None,
        commands: Optional[Sequence[Sequence[str]]] = None,
        grace_s: float = 150.0,
        cwd: Optional[str] = None,
        export_to: Optional[str] = None,
    ) -> None:
        self.settings = dict(settings or {})
        self.python = python or sys.executable
        self.resume = resume
        self.preprocess_options = dict(preprocess or {})
        self.grace_s = float(grace_s)
        self.cwd = cwd
        self.export_to = str(export_to) if export_to else None
        if env is None:
            env = dict(os.environ)
            folder = engine_folder()
            if folder:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
        self.env = dict(env)
        self.env["PYTHONUNBUFFERED"] = "1"
        self._explicit = [list(c) for c in commands] if commands is not None else None
        self.commands: List[List[str]] = []
        self.command: List[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.last_progress: Optional[Dict[str, Any]] = None
        #: The trainer's own process id (behind a launcher, not ``proc.pid``), once it reported it.
        self.worker_pid: Optional[int] = None
        self.result: Optional[Dict[str, Any]] = None
        self._events: queue.Queue[Dict[str, Any]] = queue.Queue()
        self._log: Deque[str] = collections.deque(maxlen=400)
        self._stderr: Deque[str] = collections.deque(maxlen=200)
        self._errors: List[str] = []
        self._proc: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._cancel_event = threading.Event()
        self._kill_at = 0.0
        self._done = threading.Event()

    # -- building the commands

    def _plan(self) -> List[List[str]]:
        if self._explicit is not None:
            return [cli_command(self.python, c) for c in self._explicit]
        for key in ("data", "out"):
            if not self.settings.get(key):
                raise ValueError(f"settings need '{key}'")
        out = Path(self.settings["out"]).expanduser().resolve()
        data = Path(self.settings["data"]).expanduser().resolve()
        plan: List[List[str]] = []
        config = dict(self.settings)
        config["out"] = str(out)
        if not is_prepared(data):
            prep = out / DATASET_SUBFOLDER
            plan.append(cli_command(self.python, preprocess_args(str(data), str(prep), self.preprocess_options)))
            config["data"] = str(prep)
        else:
            config["data"] = str(data)
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / JOB_CONFIG
        tmp = config_path.with_name(f".{config_path.name}.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, config_path)
        train = ["train", "--config", str(config_path)] + (["--resume"] if self.resume else [])
        if self.export_to:
            # The panel names the export after the run and replaces that run's previous export.
            train += ["--overwrite", "--export-to", self.export_to]
        plan.append(cli_command(self.python, train))
        return plan

    # -- running

    def start(self) -> None:
        """Start the pipeline in the background (returns at once)."""
        if self._thread is not None:
            raise RuntimeError("this job was already started")
        self.commands = self._plan()
        self.command = self.commands[0]
        self._thread = threading.Thread(target=self._run_all, name="medsam-train-job", daemon=True)
        self._thread.start()

    def _popen(self, command: List[str]) -> subprocess.Popen:
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
            # No console window for the child, as Slicer's slicer.util.launchConsoleProcess does.
            info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
            info.wShowWindow = 0  # SW_HIDE
            kwargs["startupinfo"] = info
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel kills the whole tree
        # stdin: the stop channel (see the module docstring); only this process holds its writing end.
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )

    def _run_all(self) -> None:
        code: Optional[int] = 0
        try:
            for command in self.commands:
                if self._cancel_event.is_set():
                    code = CANCELLED_EXIT_CODE  # cancelled between two commands
                    break
                with self._lock:
                    self.command = command
                    self.worker_pid = None
                    try:
                        self._proc = self._popen(command)
                    except OSError as exc:
                        self._errors.append(f"cannot start {command[0]}: {exc}")
                        self._events.put({"event": "error", "message": self._errors[-1]})
                        code = -1
                        break
                proc = self._proc
                if self._cancel_event.is_set():  # cancelled while it was starting
                    self._send_stop(proc)
                err_thread = threading.Thread(target=self._read_stderr, args=(proc,), daemon=True)
                err_thread.start()
                out_thread = threading.Thread(target=self._read_stdout, args=(proc,), daemon=True)
                out_thread.start()
                code = self._wait(proc, out_thread)
                err_thread.join(timeout=5)
                if proc.stdin is not None:
                    try:
                        proc.stdin.close()
                    except (OSError, ValueError):
                        pass
                if code != 0:
                    break
        finally:
            self.returncode = code
            self._events.put({"event": "exit", "returncode": code, "cancelled": self.cancelled})
            self._done.set()

    def _wait(self, proc: subprocess.Popen, out_thread: threading.Thread) -> int:
        """Until the launcher has exited AND the trainer closed its output (behind a launcher the
        trainer may outlive it); after a cancel's grace period, kill them."""
        killed = False
        while out_thread.is_alive() or proc.poll() is None:
            out_thread.join(0.2)
            if self._cancel_event.is_set() and not killed and time.monotonic() > self._kill_at:
                self._kill_tree(proc)
                killed = True
        return proc.wait()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            text = line.rstrip("\n")
            if not text:
                continue
            event = None
            if text.startswith("{"):
                try:
                    event = json.loads(text)
                except ValueError:
                    event = None
            if not isinstance(event, dict):
                self._log.append(text)
                continue
            kind = event.get("event")
            if kind == "started":
                self.worker_pid = int(event.get("pid") or 0) or None
            elif kind == "progress":
                self.last_progress = event
            elif kind == "error":
                self._errors.append(str(event.get("message", "")))
            elif kind == "result":
                self.result = event
            elif kind == "log":
                self._log.append(str(event.get("message", "")))
            self._events.put(event)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            text = line.rstrip("\n")
            if "\r" in text:  # a terminal progress bar: keep its last state
                text = text.split("\r")[-1]
            if text.strip():
                self._stderr.append(text)
                self._log.append(text)

    # -- the GUI side

    def poll(self) -> List[Dict[str, Any]]:
        """The events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def running(self) -> bool:
        """Whether the pipeline was started and has not ended yet."""
        return self._thread is not None and not self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the pipeline ends (or ``timeout`` s); returns the exit code (None if running)."""
        self._done.wait(timeout)
        return self.returncode if self._done.is_set() else None

    def cancel(self) -> None:
        """Ask the running process to stop cleanly; kill its process tree after ``grace_s`` seconds."""
        self.cancelled = True
        self._kill_at = time.monotonic() + self.grace_s
        self._cancel_event.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._send_stop(proc)

    @staticmethod
    def _send_stop(proc: subprocess.Popen) -> None:
        """Write ``stop`` to the process's stdin and close it (the trainer stops after saving)."""
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.write("stop\n")
                proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it already ended, or closed its end
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except (OSError, ValueError):
            pass

    def stop(self, timeout: float) -> Optional[int]:
        """Cancel, wait up to ``timeout`` seconds for the process to save and exit, then kill its
        process tree if it has not; returns the exit code (``None`` if it is somehow still running).

        For an application that is closing: the run's current step is saved (and exported with
        ``export_to``) when the process gets the time, and nothing is left running detached.
        """
        if not self.running:
            return self.returncode
        self.cancel()
        if self.wait(timeout) is None:
            with self._lock:
                proc = self._proc
            if proc is not None:
                self._kill_tree(proc)
            self.wait(10)
        return self.returncode if self._done.is_set() else None

    def _kill_tree(self, proc: subprocess.Popen) -> None:
        """Kill the launcher's tree and the trainer, also when the launcher has already exited."""
        pids = [proc.pid] + ([self.worker_pid] if self.worker_pid and self.worker_pid != proc.pid else [])
        for pid in pids:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
                elif pid == proc.pid:
                    os.killpg(pid, signal.SIGKILL)  # its own session: launcher, trainer, data loaders
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def log_lines(self) -> List[str]:
        """The latest lines of output that were not progress events (for a log panel)."""
        return list(self._log)

    def error_text(self) -> str:
        """What went wrong: the error messages the command reported, else the end of its stderr."""
        if self._errors:
            return "\n".join(self._errors)
        return "\n".join(list(self._stderr)[-20:])
