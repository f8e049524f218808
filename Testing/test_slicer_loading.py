"""The extension as Slicer loads it: the installed tree, the scripted-module and scripted-effect
loaders replayed as Slicer's source does them (``slicer_replay.py`` names the files and tags), then
every import the panels, the effect, the training module and the headless script make.

Each replay runs in a fresh interpreter over a copy of what ``slicerMacroBuildScriptedModule``
installs, with the repository's module folders off ``sys.path``, as in an installed extension.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import slicer_replay  # noqa: E402


def _replay(tmp_path: Path, version: str = "5.12", site: Path = None) -> dict:
    install = slicer_replay.install_extension(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(HERE / "slicer_replay.py"), str(install), "--slicer-version", version,
         "--headless-script", str(ROOT / "scripts" / "medsam_headless.py"), *(["--site", str(site)] if site else [])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["install"] = str(install)
    return report


def test_effect_registration_keeps_every_package_importable(tmp_path):
    """Slicer loads the effect file under its folder's name; nothing of ours may be replaced."""
    report = _replay(tmp_path)
    assert not report["failures"], "imports that fail after Slicer's start-up:\n" + "\n".join(
        f"  {where}: {what} -> {error}" for where, what, error in report["failures"])
    assert report["registered"] == ["SegmentEditorEffect:SegmentEditorMedSAMLib"]
    assert report["startup_imports"] == [], "Slicer's start-up must not need torch or the other packages"
    # The engine comes from the installed tree, not from the repository.
    assert report["engine_file"].startswith(report["install"])
    for name in ("MedSAMSlicerLib", "MedSAMBridgeLib", "MedSAMTrainingLib"):
        assert report["packages"][name]["package"], f"{name} was replaced by a plain module: {report['packages'][name]}"


def test_an_older_slicer_gets_a_message_not_a_traceback(tmp_path):
    """On Slicer 5.8 (no vtkSlicerSegmentEditorLogic) nothing fails to import; the module says why
    it cannot work instead of registering an effect that would fail."""
    report = _replay(tmp_path, "5.8")
    assert not report["failures"], report["failures"]
    assert report["registered"] == []


def test_import_statements_are_found_at_any_depth(tmp_path):
    """The replay checks imports inside functions too (the panels import lazily)."""
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from json import dumps\n    import qt\n")
    assert slicer_replay.import_statements(path) == [(1, "import os"), (4, "from json import dumps")]


def test_a_pip_installed_engine_does_not_shadow_the_extensions(tmp_path):
    """Slicer appends the module folder to the END of sys.path, after site-packages: a
    ``medsam-slicer`` wheel pip-installed into Slicer's Python (here a decoy copy of our packages
    first on sys.path, as site-packages is) must not be the one the extension uses."""
    site = tmp_path / "site-packages"
    for package in ("MedSAMSlicerLib", "MedSAMBridgeLib"):
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text('"""A pip-installed copy (a decoy: it has no modules)."""\n')
    report = _replay(tmp_path / "replay", site=site)
    assert not report["failures"], report["failures"]
    assert report["engine_file"].startswith(report["install"]), report["engine_file"]
    for name in ("MedSAMSlicerLib", "MedSAMBridgeLib"):
        assert report["packages"][name]["file"].startswith(report["install"]), report["packages"][name]


def test_effect_lifecycle_on_strict_stand_ins_leaves_nothing_connected(tmp_path):
    """The effect's options, activation and cleanup run on stand-ins that accept only Slicer's,
    CTK's and Qt's real names; after ``cleanup()`` no connection to the effect is left (its pump
    timer's included), as ``AbstractScriptedSegmentEditorEffect.cleanup`` asks."""
    install = slicer_replay.install_extension(tmp_path)
    proc = subprocess.run([sys.executable, str(HERE / "slicer_replay.py"), str(install), "--effect-lifecycle"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failures"], report["failures"]
    assert report["left_connected"] == [], report["left_connected"]


def test_a_wrong_name_on_the_modules_cxx_parent_fails_the_replay(tmp_path):
    """The ``parent`` Slicer gives a scripted module's class is qSlicerScriptedLoadableModule: its
    stand-in accepts only that class's names at every supported tag, so a misspelt property in the
    module's ``__init__`` fails here as it would in Slicer."""
    install = slicer_replay.install_extension(tmp_path / "ok")
    module_file = next(install.rglob("MedSAMSlicer.py"))
    source = module_file.read_text(encoding="utf-8")
    assert "self.parent.categories = " in source, "the module no longer sets its categories: update this test"
    module_file.write_text(source.replace("self.parent.categories = ", "self.parent.categorys = "), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(HERE / "slicer_replay.py"), str(install), "--slicer-version", "5.12"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])["failures"]
    assert [f[:2] for f in failures] == [["MedSAMSlicer.py", "load scripted module"]], failures
    assert "qSlicerScriptedLoadableModule has no attribute 'categorys'" in failures[0][2]
