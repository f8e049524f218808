"""Extract the names our Slicer-side files may use from Slicer's, CTK's and Qt's own API, into
``Testing/Data/slicer_api_names.json`` (committed; ``slicer_api.py`` checks the panels against it).

For every supported Slicer tag (v5.10.0, v5.12.3) and the CTK commit each pins
(``SuperBuild/External_CTK.cmake``):

* C++ classes (Slicer's and CTK's headers): method, property and enumerator names, signal and slot
  signatures (normalised as Qt's ``connect`` strings), and the base class;
* Python: the functions of ``slicer.util`` (and ``slicer.packaging`` where it exists), the methods
  of ``ScriptedLoadableModule*`` and ``AbstractScriptedSegmentEditorEffect``;
* Qt 5.15 classes (Slicer's official builds use Qt 5.15: its top ``CMakeLists.txt``): from PyQt5
  5.15's ``dir()`` and ``QMetaObject`` (public methods, properties, signals, slots).

A class's names are those present at **every** tag (what works on all supported Slicers), plus
its bases'. PythonQt adds ``connect``/``disconnect``/``className``/``delete``/``help`` to every
wrapped ``QObject``, and exposes ``Q_PROPERTY`` values as attributes.

Regenerate (needs the two source mirrors and PyQt5 5.15 importable, e.g.
``pip install --target /tmp/pyqt5 "PyQt5==5.15.*"``)::

    PYTHONPATH=/tmp/pyqt5 python Testing/extract_slicer_api.py \\
        --slicer /path/to/Slicer.git --ctk /path/to/CTK.git --out Testing/Data/slicer_api_names.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from typing import Dict, List, Optional, Set, Tuple

TAGS = ("v5.10.0", "v5.12.3")
#: Slicer C++ classes: header path in Slicer's tree.
SLICER_CPP = {
    "qSlicerApplication": "Base/QTGUI/qSlicerApplication.h",
    "qSlicerCoreApplication": "Base/QTCore/qSlicerCoreApplication.h",
    "qSlicerSegmentEditorScriptedEffect": "Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.h",
    "qSlicerSegmentEditorAbstractEffect": "Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h",
    "qMRMLNodeComboBox": "Libs/MRML/Widgets/qMRMLNodeComboBox.h",
    "qMRMLWidget": "Libs/MRML/Widgets/qMRMLWidget.h",
    "qMRMLSegmentEditorWidget": "Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h",
    "qSlicerModuleManager": "Base/QTCore/qSlicerModuleManager.h",
    # The C++ parent a scripted module's class is given (qSlicerScriptedLoadableModule::setPythonSource).
    "qSlicerScriptedLoadableModule": "Base/QTGUI/qSlicerScriptedLoadableModule.h",
    "qSlicerLoadableModule": "Base/QTGUI/qSlicerLoadableModule.h",
    "qSlicerAbstractModule": "Base/QTGUI/qSlicerAbstractModule.h",
    "qSlicerAbstractCoreModule": "Base/QTCore/qSlicerAbstractCoreModule.h",
    # The view widget Slicer hands to an effect's processInteractionEvents / processViewNodeEvents,
    # and its view (qMRMLSliceWidget -> qMRMLAbstractViewWidget -> qMRMLWidget -> QWidget;
    # qMRMLSliceView -> ctkVTKSliceView -> ctkVTKAbstractView -> QWidget, at both tags).
    "qMRMLSliceWidget": "Libs/MRML/Widgets/qMRMLSliceWidget.h",
    "qMRMLAbstractViewWidget": "Libs/MRML/Widgets/qMRMLAbstractViewWidget.h",
    "qMRMLSliceView": "Libs/MRML/Widgets/qMRMLSliceView.h",
}
CTK_CPP = {
    "ctkPathLineEdit": "Libs/Widgets/ctkPathLineEdit.h",
    "ctkCollapsibleButton": "Libs/Widgets/ctkCollapsibleButton.h",
    "ctkVTKSliceView": "Libs/Visualization/VTK/Widgets/ctkVTKSliceView.h",
    "ctkVTKAbstractView": "Libs/Visualization/VTK/Widgets/ctkVTKAbstractView.h",
}
QT_CLASSES = {
    "QtWidgets": ("QApplication", "QWidget", "QComboBox", "QPushButton", "QAbstractButton", "QLabel", "QFrame",
                  "QProgressBar", "QCheckBox", "QHBoxLayout", "QVBoxLayout", "QBoxLayout", "QFormLayout", "QLayout", "QLineEdit",
                  "QSpinBox", "QDoubleSpinBox"),
    "QtCore": ("QObject", "QTimer", "QSettings", "QCoreApplication", "Qt", "QThread"),
    "QtGui": ("QIcon", "QPixmap", "QGuiApplication"),
}
PY_CLASSES = {
    "Base/Python/slicer/util.py": ("VTKObservationMixin",),
    "Base/Python/slicer/ScriptedLoadableModule.py": ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                                                    "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"),
    "Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py":
        ("AbstractScriptedSegmentEditorEffect",),
}
#: PythonQt decorators: methods Slicer adds to its classes for Python (``static_<Class>_<name>``, or
#: a first parameter ``<Class>*``).
DECORATORS = ("Base/QTCore/qSlicerBaseQTCorePythonQtDecorators.h", "Base/QTGUI/qSlicerBaseQTGUIPythonQtDecorators.h")
PYTHONQT_EXTRAS = ("connect", "disconnect", "className", "delete", "help")
_NOT_NAMES = {"Q_PROPERTY", "Q_OBJECT", "Q_ENUM", "Q_ENUMS", "Q_FLAGS", "Q_FLAG", "Q_DECLARE_PRIVATE",
              "Q_DECLARE_PUBLIC", "Q_DISABLE_COPY", "Q_DECLARE_FLAGS", "Q_INVOKABLE", "if", "return", "sizeof",
              "operator", "virtual", "static", "const", "void", "Q_D", "Q_Q", "QT_DEPRECATED", "defined"}


def git_show(repo: str, rev: str, path: str) -> Optional[str]:
    proc = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def ctk_commit(slicer_repo: str, tag: str) -> str:
    text = git_show(slicer_repo, tag, "SuperBuild/External_CTK.cmake") or ""
    found = re.search(r"Slicer_\$\{proj\}_GIT_TAG\s+\"([0-9a-f]{40})\"", text)
    if not found:
        raise SystemExit(f"no CTK commit in {tag}:SuperBuild/External_CTK.cmake")
    return found.group(1)


def _strip_comments(text: str) -> str:
    # String literals first: "https://..." in an inline method body is not a comment.
    text = re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _class_body(text: str, name: str) -> Tuple[str, Optional[str]]:
    match = re.search(r"\bclass\s+(?:\w+_EXPORT\s+)?" + name + r"\s*(?::\s*public\s+(\w+))?[^;{]*\{", text)
    if not match:
        raise SystemExit(f"class {name} not found")
    depth, i = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[match.end():i - 1], match.group(1)


def _normalise(params: str) -> str:
    out = []
    for param in filter(None, (p.strip() for p in re.sub(r"=[^,]*", "", params).split(","))):
        param = re.sub(r"\bconst\b", "", param).replace("&", " ").strip()
        tokens = re.findall(r"[\w:<>]+\**|\*+", param)
        if len(tokens) > 1 and re.match(r"^\w+$", tokens[-1]):
            tokens = tokens[:-1]  # the parameter's name
        out.append("".join(tokens).replace(" ", ""))
    return ",".join(out)


def cpp_class(text: str, name: str) -> Dict[str, object]:
    """Names of one C++ class declared in ``text`` (a header)."""
    body, base = _class_body(_strip_comments(text), name)
    properties: Set[str] = set(re.findall(r"Q_PROPERTY\s*\(\s*[\w:<>*\s]+?\s+\**(\w+)\s+READ", body))
    names: Set[str] = set(properties)
    for enum in re.findall(r"\benum\s+(?:class\s+)?\w*\s*(?::\s*\w+\s*)?\{([^}]*)\}", body):
        names |= {e.split("=")[0].strip() for e in enum.split(",") if e.split("=")[0].strip()}
    names |= {n for n in re.findall(r"\b([A-Za-z_]\w*)\s*\(", body) if n not in _NOT_NAMES and n != name}
    signals: Set[str] = set()
    for section in re.findall(r"(?:\bsignals|\bQ_SIGNALS|\bpublic\s+(?:Q_)?[sS][lL][oO][tT][sS])\s*:(.*?)(?=\b(?:public|protected|private|signals|Q_SIGNALS)\b[^:]*:|\Z)",
                              body, flags=re.S):
        for method, params in re.findall(r"\b(\w+)\s*\(([^()]*)\)", section):
            if method not in _NOT_NAMES:
                signals.add(f"{method}({_normalise(params)})")
    return {"base": base, "names": names, "signals": signals, "properties": properties}


def decorated(text: str) -> Dict[str, Set[str]]:
    """Class -> names a PythonQt decorator header adds."""
    out: Dict[str, Set[str]] = {}
    text = _strip_comments(text)
    for cls, name in re.findall(r"\bstatic_(q\w+?)_(\w+)\s*\(", text):
        out.setdefault(cls, set()).add(name)
    for name, cls in re.findall(r"\b(\w+)\s*\(\s*(q\w+)\s*\*\s*\w+\s*[,)]", text):
        out.setdefault(cls, set()).add(name)
    return out


def py_names(text: str, class_name: Optional[str] = None) -> Set[str]:
    """Public function names of a Python module, or methods of one of its classes."""
    tree = ast.parse(text)
    if class_name is None:
        return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("__")}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    names |= {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def qt_classes() -> Dict[str, Dict[str, object]]:
    from PyQt5 import QtCore, QtGui, QtWidgets  # noqa: F401  (Qt 5.15, what Slicer's builds use)

    out = {}
    modules = {"QtWidgets": QtWidgets, "QtCore": QtCore, "QtGui": QtGui}
    for module, classes in QT_CLASSES.items():
        for name in classes:
            cls = getattr(modules[module], name)
            names = {n for n in dir(cls) if not n.startswith("_")}
            signals: Set[str] = set()
            properties: Set[str] = set()
            meta = getattr(cls, "staticMetaObject", None)
            base = None
            if meta is not None and name != "Qt":
                for i in range(meta.propertyCount()):
                    properties.add(meta.property(i).name())
                names |= properties
                for i in range(meta.methodCount()):
                    method = meta.method(i)
                    if method.methodType() in (method.Signal, method.Slot):
                        signals.add(bytes(method.methodSignature()).decode())
                base = meta.superClass().className() if meta.superClass() is not None else None
            if meta is not None and name != "Qt" and "QObject" in {c.__name__ for c in cls.__mro__}:
                names |= set(PYTHONQT_EXTRAS)
            out[name] = {"base": None, "names": names, "signals": signals, "properties": properties, "qt_base": base}
    return out


def extract(slicer_repo: str, ctk_repo: str) -> dict:
    per_tag: List[Dict[str, Dict[str, object]]] = []
    sources = {"slicer": {}, "qt": None}
    for tag in TAGS:
        classes: Dict[str, Dict[str, object]] = {}
        ctk = ctk_commit(slicer_repo, tag)
        sources["slicer"][tag] = {"ctk": ctk}
        for name, path in SLICER_CPP.items():
            classes[name] = cpp_class(git_show(slicer_repo, tag, path), name)
        for name, path in CTK_CPP.items():
            classes[name] = cpp_class(git_show(ctk_repo, ctk, path), name)
        for path in DECORATORS:
            for cls, names in decorated(git_show(slicer_repo, tag, path) or "").items():
                if cls in classes:
                    classes[cls]["names"] = set(classes[cls]["names"]) | names
        util = py_names(git_show(slicer_repo, tag, "Base/Python/slicer/util.py"))
        packaging = git_show(slicer_repo, tag, "Base/Python/slicer/packaging.py")
        classes["slicer.util"] = {"base": None, "names": util, "signals": set()}
        classes["slicer.packaging"] = {"base": None, "names": py_names(packaging) if packaging else set(), "signals": set()}
        for path, names in PY_CLASSES.items():
            text = git_show(slicer_repo, tag, path)
            for name in names:
                classes[name] = {"base": None, "names": py_names(text, name), "signals": set()}
        per_tag.append(classes)
    merged: Dict[str, dict] = {}
    for name in per_tag[0]:
        names = set.intersection(*[set(t[name]["names"]) for t in per_tag])
        signals = set.intersection(*[set(t[name]["signals"]) for t in per_tag])
        properties = set.intersection(*[set(t[name].get("properties", ())) for t in per_tag])
        merged[name] = {"base": per_tag[-1][name]["base"], "names": sorted(names), "signals": sorted(signals),
                        "properties": sorted(properties)}
    from PyQt5.QtCore import PYQT_VERSION_STR, QT_VERSION_STR

    sources["qt"] = f"PyQt5 {PYQT_VERSION_STR} (Qt {QT_VERSION_STR})"
    for name, entry in qt_classes().items():
        merged[name] = {"base": entry["qt_base"], "names": sorted(entry["names"]), "signals": sorted(entry["signals"]),
                        "properties": sorted(entry["properties"])}
    return {"sources": sources, "pythonqt_extras": list(PYTHONQT_EXTRAS), "classes": dict(sorted(merged.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slicer", required=True, help="a git clone of Slicer/Slicer with the tags")
    parser.add_argument("--ctk", required=True, help="a git clone of commontk/CTK")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = extract(args.slicer, args.ctk)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=0, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()
