"""Check the names our Slicer-side files use on Qt, CTK and Slicer objects against the API that
exists at every supported tag (``Data/slicer_api_names.json``, made by ``extract_slicer_api.py``
from Slicer's, CTK's and Qt's own sources).

Without the application, a wrong method name in a panel (``self.timer.setIntervall(0)``), a
signal that does not exist (``combo.connect("currentIndexChanged(QString)", ...)``) or a
``slicer.util`` function a supported version lacks (``executePythonModule`` is 5.12 only) would
only fail inside Slicer, when a user clicks. :func:`check_file` finds the object each name is
used on and looks the name up:

* ``qt.X`` / ``ctk.X`` / ``slicer.qX`` class names, and ``qt.X.attr`` (enums, static methods);
* objects made in the file: ``self.a = qt.X(...)``, ``name = qt.X(...)``, ``slicer.qMRMLX()``,
  ``ctk.X()`` -> ``self.a.attr`` / ``name.attr`` (methods and properties, read or written);
* ``self.ui.w.attr`` (``w``'s class from the module's ``.ui`` file), ``self.layout.attr``;
* ``slicer.app.attr`` (qSlicerApplication), ``slicer.util.attr``, ``self.scriptedEffect.attr``
  (qSlicerSegmentEditorScriptedEffect), and calls of the base classes' methods;
* ``x.connect("signal(types)", slot)`` / ``disconnect``: the signal signature on ``x``'s class.

A name used on an object whose class it cannot tell is not checked (the effect's view widgets,
nodes: those are real VTK/MRML classes, tested on slicer-core).
"""

from __future__ import annotations

import ast
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Set

HERE = Path(__file__).resolve().parent
NAMES_FILE = HERE / "Data" / "slicer_api_names.json"


class API:
    """The allowed names, with each class's bases folded in."""

    def __init__(self, path: Path = NAMES_FILE) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        self.classes: Dict[str, dict] = data["classes"]
        self.sources = data["sources"]

    def names(self, cls: str) -> Set[str]:
        out: Set[str] = set()
        while cls in self.classes:
            out |= set(self.classes[cls]["names"])
            cls = self.classes[cls]["base"]
        return out

    def properties(self, cls: str) -> Set[str]:
        out: Set[str] = set()
        while cls in self.classes:
            out |= set(self.classes[cls].get("properties", ()))
            cls = self.classes[cls]["base"]
        return out

    def signals(self, cls: str) -> Set[str]:
        out: Set[str] = set()
        while cls in self.classes:
            out |= set(self.classes[cls]["signals"])
            cls = self.classes[cls]["base"]
        return out


def ui_classes(ui_file: Path) -> Dict[str, str]:
    """Widget object name -> class, from a Qt Designer file."""
    root = ET.parse(ui_file).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


#: Receivers known by their place, whatever the file.
FIXED = {"slicer.app": "qSlicerApplication", "slicer.util": "slicer.util", "self.scriptedEffect":
         "qSlicerSegmentEditorScriptedEffect", "self.layout": "QVBoxLayout", "qt.Qt": "Qt"}
#: Python base classes our classes derive from (their methods may be called on ``self``).
BASES = {"ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModule",
         "ScriptedLoadableModuleTest", "AbstractScriptedSegmentEditorEffect", "VTKObservationMixin"}


def check_source(source: str, filename: str, api: API, ui: Optional[Dict[str, str]] = None,
                 checked: Optional[List[str]] = None) -> List[str]:
    """Problems (``file:line: ...``) in one file's source; empty when every checked name exists.
    ``checked`` collects every ``Class.name`` that was looked up."""
    checked = [] if checked is None else checked
    tree = ast.parse(source, filename=filename)
    problems: List[str] = []
    types: Dict[str, str] = dict(FIXED)

    def class_of_call(call: ast.AST) -> Optional[str]:
        if isinstance(call, ast.Call):
            name = _dotted(call.func)
            if name and name.split(".")[0] in ("qt", "ctk", "slicer") and name.count(".") == 1:
                cls = name.split(".")[1]
                if cls in api.classes:
                    return cls
        return None

    # 1. what each assigned name holds: self.x for the whole file, plain names per function
    scopes: List[ast.AST] = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]
    local_types: Dict[ast.AST, Dict[str, str]] = {}
    for scope in scopes:
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                cls = class_of_call(node.value)
                for target in node.targets if cls else ():
                    name = _dotted(target)
                    if name and name.startswith("self."):
                        types[name] = cls
                    elif name and "." not in name:
                        local_types.setdefault(scope, {})[name] = cls
    for widget, cls in (ui or {}).items():
        types[f"self.ui.{widget}"] = cls

    def report(node: ast.AST, message: str) -> None:
        problems.append(f"{filename}:{getattr(node, 'lineno', '?')}: {message}")

    def nodes_with_types():
        """Every node, with the names known where it is (file-wide + its function's locals)."""
        seen = set()
        for scope in scopes:
            known = {**types, **local_types.get(scope, {})}
            for node in ast.walk(scope):
                if id(node) not in seen:
                    seen.add(id(node))
                    yield node, known
        for node in ast.walk(tree):
            if id(node) not in seen:
                yield node, types

    for node, known in nodes_with_types():
        # 2. class names on the application-only modules
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("qt", "ctk"):
            if node.attr not in api.classes:
                report(node, f"{node.value.id}.{node.attr} is not a class of the supported Slicer/CTK/Qt")
        if not isinstance(node, ast.Attribute):
            continue
        owner = _dotted(node.value)
        if owner is None:
            continue
        cls = known.get(owner)
        if cls is None and owner.count(".") == 1 and owner.split(".")[0] in ("qt", "ctk", "slicer"):
            candidate = owner.split(".")[1]
            cls = candidate if candidate in api.classes and candidate[0] in "qQc" else None
        if cls is None:
            continue
        checked.append(f"{cls}.{node.attr}")
        if node.attr not in api.names(cls):
            report(node, f"{owner}.{node.attr}: {cls} has no '{node.attr}' in Slicer {', '.join(api.sources['slicer'])}")
    # 3. connect / disconnect signal strings
    for node, known in nodes_with_types():
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("connect", "disconnect")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            owner = _dotted(node.func.value)
            cls = known.get(owner or "")
            if cls:
                checked.append(f"{cls}:{node.args[0].value}")
            if cls and node.args[0].value not in api.signals(cls):
                report(node, f"{owner}.{node.func.attr}(\"{node.args[0].value}\"): {cls} has no such signal")
    # 4. base-class methods called on self in classes deriving from Slicer's Python bases
    for cls_node in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        bases = {_dotted(b) for b in cls_node.bases} & BASES
        if not bases:
            continue
        own = {n.name for n in cls_node.body if isinstance(n, ast.FunctionDef)}
        assigned = {t.attr for n in ast.walk(cls_node) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Attribute) and _dotted(t.value) == "self"}
        inherited = set().union(*(api.names(b) for b in bases))
        if "ScriptedLoadableModuleTest" in bases:
            import unittest

            inherited |= set(dir(unittest.TestCase))
        for node in ast.walk(cls_node):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _dotted(node.func.value) == "self":
                checked.append(f"{cls_node.name}.{node.func.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and _dotted(node.func.value) == "self" and node.func.attr not in own | assigned | inherited):
                report(node, f"self.{node.func.attr}(): not defined in {cls_node.name} nor in {', '.join(sorted(bases))}")
    return problems


def check_file(path: Path, api: Optional[API] = None, ui_file: Optional[Path] = None,
               checked: Optional[List[str]] = None) -> List[str]:
    """:func:`check_source` for a file (with its module's ``.ui`` file, if any)."""
    return check_source(path.read_text(encoding="utf-8"), path.name, api or API(),
                        ui_classes(ui_file) if ui_file else None, checked)
