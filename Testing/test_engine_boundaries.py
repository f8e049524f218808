"""The engine (``MedSAMSlicerLib``) stays plain Python over numpy and torch: it imports none of
slicer, qt, ctk or vtk, and it does not reach into the repository's ``Testing/`` folder (its data
comes from the caller: ``--data`` or ``$MEDSAM_SLICER_DATA``)."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import MedSAMSlicerLib

ENGINE = Path(MedSAMSlicerLib.__file__).resolve().parent
FORBIDDEN = ("slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt")


def _engine_modules():
    return sorted(m.name for m in pkgutil.walk_packages([str(ENGINE)], prefix="MedSAMSlicerLib."))


def test_every_engine_module_imports_without_slicer_qt_or_vtk():
    """Each module imported in turn in one fresh interpreter, sys.modules checked after each, so a
    forbidden import is attributed to the first module that brought it in."""
    modules = _engine_modules()
    assert len(modules) > 30, modules
    code = (
        "import importlib, json, sys\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "found = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = sorted(m for m in sys.modules if m.split('.')[0] in forbidden)\n"
        "    if bad:\n"
        "        found[name] = bad\n"
        "        break\n"
        "print(json.dumps(found))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def _code_strings(path: Path):
    """String constants of a module, without its docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_engine_does_not_reach_into_the_repository():
    hits = []
    for path in sorted(ENGINE.rglob("*.py")):
        for line, text in _code_strings(path):
            # A path to it (a literal "Testing" joined to a path, or "Testing/..."); messages that
            # tell the user where a clone keeps its data are fine.
            if text == "Testing" or text.startswith(("Testing/", "Testing\\\\")):
                hits.append(f"{path.relative_to(ENGINE)}:{line}: {text[:80]!r}")
    assert not hits, "engine code naming the repository's Testing folder:\n" + "\n".join(hits)


def test_the_example_data_comes_from_the_caller(tmp_path, monkeypatch):
    import pytest

    from MedSAMSlicerLib import data
    from MedSAMSlicerLib.errors import MedSAMError

    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(MedSAMError, match="no example data folder: pass --data FOLDER"):
        data.example_ct()
    with pytest.raises(MedSAMError, match="has no example_ct.nii.gz"):
        data.example_ct(tmp_path)
