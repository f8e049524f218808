"""Replays, in plain Python, what the Slicer application does with our extension's files.

Qt, ctk, the module and effect base classes and Slicer's loaders exist only inside the Slicer
application. What Slicer does with our files is written here as Slicer's own source does it, so
that the faults only the application would show (a package replaced in ``sys.modules``, a class
that does not exist in a supported version) show up in this test suite. Each function names the
Slicer file it replays; the tags read are v5.10.0 and v5.12.1 (the supported line), and v5.6.2 /
v5.8.1 where older Slicer behaves differently.

Everything that is only Qt (widgets, signals) is a permissive stand-in: it accepts any use and
does nothing, because no Qt logic is tested here, only the loading.

Run this module as a script (``python slicer_replay.py INSTALL_DIR [--slicer-version 5.8]``) to
replay a Slicer start-up over an installed extension tree in a fresh interpreter; it prints one
JSON line with what happened (see :func:`main`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("MedSAMSlicer", "MedSAMTraining")

#: Modules that only the Slicer application provides (Qt, ctk, PythonQt wrappers, other
#: extensions). Imports of these are not checked: they are stand-ins here.
APPLICATION_ONLY = ("qt", "ctk", "PythonQt", "SegmentEditorEffects", "qSlicerSegmentationsEditorEffectsPythonQt",
                    "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n",
                    "PyTorchUtils", "__main__")


# ---------------------------------------------------------------------------------------------
# The installed tree


def cmake_lists(module: str) -> Tuple[List[str], List[str]]:
    """``(scripts, resources)`` listed in ``<module>/CMakeLists.txt`` (``${MODULE_NAME}`` expanded)."""
    text = "\n".join(line.split("#", 1)[0] for line in (ROOT / module / "CMakeLists.txt").read_text().splitlines())
    sets = {name: re.findall(r"\S+", body) for name, body in re.findall(r"set\s*\(\s*(\w+)\s+(.*?)\)", text, flags=re.S)}
    name = sets["MODULE_NAME"][0]
    expand = [w.replace("${MODULE_NAME}", name) for w in sets.get("MODULE_PYTHON_SCRIPTS", [])]
    resources = [w.replace("${MODULE_NAME}", name) for w in sets.get("MODULE_PYTHON_RESOURCES", [])]
    return expand, resources


def install_extension(target: Path) -> Path:
    """Copy what ``slicerMacroBuildScriptedModule`` installs for both modules into ``target``.

    The macro (``CMake/SlicerMacroBuildScriptedModule.cmake`` -> ``ctkMacroCompilePythonScript``)
    copies every listed script and resource, keeping its path relative to the module folder, into
    one ``qt-scripted-modules`` folder shared by all modules of the extension; nothing else.
    Returns that folder.
    """
    out = target / "qt-scripted-modules"
    for module in MODULES:
        scripts, resources = cmake_lists(module)
        for rel in scripts + resources:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / module / rel, dst)
    return out


# ---------------------------------------------------------------------------------------------
# Stand-ins for what only the application has


class _Anything:
    """A Qt-like object that accepts any attribute, call, subclassing or connection."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())


class _AnythingModule(types.ModuleType):
    """A module whose every attribute is a class deriving from :class:`_Anything`."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (_Anything,), {})
        setattr(self, name, cls)
        return cls


class _SlicerApplication(_Anything):
    """``slicer.app``: the version properties and the start-up signal the extension uses."""

    def __init__(self, major: int, minor: int) -> None:
        self.majorVersion = major
        self.minorVersion = minor
        self.applicationVersion = f"{major}.{minor}.0"
        self.connections: Dict[str, list] = {}

    def connect(self, signal: str, slot) -> None:
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal: str) -> None:
        for slot in self.connections.get(signal, []):
            slot()


class ScriptedLoadableModule:
    """``slicer.ScriptedLoadableModule.ScriptedLoadableModule`` (Base/Python/slicer/ScriptedLoadableModule.py):
    keeps ``parent`` and offers the documentation-link helper."""

    def __init__(self, parent) -> None:
        self.parent = parent

    def getDefaultModuleDocumentationLink(self, docPage=None) -> str:
        return ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        pass


class ScriptedLoadableModuleTest:
    pass


class AbstractScriptedSegmentEditorEffect:
    """``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect``: keeps the C++ effect object
    and registers it (``register()`` adds it to the effect factory)."""

    registered: List[object] = []

    def __init__(self, scriptedEffect) -> None:
        self.scriptedEffect = scriptedEffect

    def register(self) -> None:
        AbstractScriptedSegmentEditorEffect.registered.append(self)


def install_stand_ins(major: int = 5, minor: int = 12) -> _SlicerApplication:
    """Put the application-only modules into ``sys.modules`` and give ``slicer`` its ``app``.

    ``slicer`` itself stays the real slicer-core package (MRML, logics, ``slicer.util``).
    With ``minor < 10`` the classes Slicer first shipped in 5.10 are removed from ``slicer``,
    as an older Slicer would lack them (``vtkSlicerSegmentEditorLogic``).
    """
    import slicer

    for name in ("qt", "ctk", "PythonQt"):
        sys.modules[name] = _AnythingModule(name)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls  # Base/Python/slicer/parameterNodeWrapper: a class decorator
    sys.modules["slicer.parameterNodeWrapper"] = wrapper
    slicer.parameterNodeWrapper = wrapper
    effects = types.ModuleType("SegmentEditorEffects")
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    sys.modules["SegmentEditorEffects"] = effects
    wrappers = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    wrappers.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = wrappers
    app = _SlicerApplication(major, minor)
    slicer.app = app
    if (major, minor) < (5, 10) and hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        del slicer.vtkSlicerSegmentEditorLogic
    return app


# ---------------------------------------------------------------------------------------------
# Slicer's loaders


def load_source_as_module(module_name: str, file_path: str) -> types.ModuleType:
    """``qSlicerScriptedUtils::loadSourceAsModule`` (Base/QTCore/qSlicerScriptedUtils.cxx, v5.10.0
    and v5.12.1): runs, in Python::

        spec = importlib.util.spec_from_file_location(moduleName, filePath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[moduleName] = module
        spec.loader.exec_module(module)

    (v5.6.2 / v5.8.1 ran ``imp.load_source(moduleName, filePath)``, which also replaces
    ``sys.modules[moduleName]``.)
    """
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _find_or_load_class(module_name: str, class_name: str, file_path: str):
    """The lookup both ``setPythonSource`` implementations share: the class on
    ``sys.modules[moduleName]`` if it is there, else load the file under ``moduleName``."""
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    if cls is None:
        load_source_as_module(module_name, file_path)
        cls = getattr(sys.modules[module_name], class_name, None)
    if cls is None:
        raise RuntimeError(f"class {class_name} was not found in {file_path}")
    return cls


class ScriptedEffect(_Anything):
    """``qSlicerSegmentEditorScriptedEffect`` with ``setPythonSource`` as in
    Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx (v5.12.1):

    * module name = the parent folder's name ("Use parent directory name as module name");
    * class name = the file's base name, with "Effect" appended unless it ends so;
    * the class is taken from ``sys.modules[moduleName]`` if present, otherwise the file is
      loaded with ``loadSourceAsModule(moduleName, path)``;
    * the instance is created with this C++ object and set as ``slicer.<moduleName>``.
    """

    def __init__(self, parent=None) -> None:
        self._self = None
        self.name = ""
        self.title = ""

    def setPythonSource(self, path: str) -> bool:
        import slicer

        if not (path.endswith(".py") or path.endswith(".pyc")):
            return False
        module_name = Path(path).parent.name
        class_name = Path(path).name.split(".")[0]
        if not class_name.endswith("Effect"):
            class_name += "Effect"
        cls = _find_or_load_class(module_name, class_name, path)
        self._self = cls(self)
        setattr(slicer, module_name, self._self)
        return True

    def self(self):
        return self._self


def load_scripted_module(file_path: str):
    """``qSlicerScriptedLoadableModule::setPythonSource`` (Base/QTGUI/qSlicerScriptedLoadableModule.cxx,
    v5.12.1): module and class name = the file's base name; class from ``sys.modules`` or the
    file loaded with ``loadSourceAsModule``; then the class is instantiated with the module's
    C++ ``parent`` (here a stand-in). Returns the instance."""
    module_name = Path(file_path).name.split(".")[0]
    cls = _find_or_load_class(module_name, module_name, file_path)
    return cls(_Anything())


# ---------------------------------------------------------------------------------------------
# What the panels, the effect, the training module and the headless script import


def _application_only(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in APPLICATION_ONLY)


def import_statements(path: Path) -> List[Tuple[int, str]]:
    """Every ``import`` / ``from ... import`` in a file, at any depth (functions included), as
    ``(line, source)``; those of application-only modules are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = ["." * node.level + (node.module or "")]
            else:
                names = [node.module or ""]
        else:
            continue
        if all(_application_only(n) for n in names):
            continue
        out.append((node.lineno, ast.unparse(node)))
    return sorted(out)


def slicer_side_files(install_dir: Path) -> List[Path]:
    """The installed files that only Slicer runs: the two module files, the effect, and every
    module of the packages they bring (the MRML bridge, the training job runner)."""
    files = []
    for path in sorted(install_dir.rglob("*.py")):
        rel = path.relative_to(install_dir)
        if rel.parts[0] == "MedSAMSlicerLib":
            continue  # the engine: imported by the statements of the files above, tested on its own
        files.append(path)
    return files


def replay_startup(install_dir: Path, major: int = 5, minor: int = 12, headless_script: Optional[Path] = None) -> dict:
    """Replay a Slicer start-up over an installed extension and then every import our files make.

    1. Slicer puts the scripted-modules folder on ``sys.path`` and loads each module file
       (:func:`load_scripted_module`), whose constructor connects ``startupCompleted()``.
    2. ``startupCompleted()`` fires: the module registers the effect, i.e.
       ``qSlicerSegmentEditorScriptedEffect.setPythonSource(<effect file>)``.
    3. Each Segment Editor widget clones the effect (``clone()`` -> ``setPythonSource`` again).
    4. Every import statement of every Slicer-side file (and the headless script) is executed,
       as the panels, the effect and the training module do later, at run time.

    Returns a report: ``failures`` (``[file:line, statement, error]``), the names registered,
    and which of our packages ``sys.modules`` holds as packages.
    """
    # qSlicerScriptedLoadableModuleFactory.cxx -> qSlicerCorePythonManager::appendPythonPath
    # (v5.10.0, v5.12.3): the module folder goes to the END of sys.path, after site-packages.
    folder = os.path.abspath(str(install_dir))
    if folder not in sys.path:
        sys.path.append(folder)
    app = install_stand_ins(major, minor)
    report: dict = {"failures": [], "registered": [], "packages": {}, "messages": []}

    def fail(where: str, what: str, exc: BaseException) -> None:
        report["failures"].append([where, what, f"{type(exc).__name__}: {exc}"])

    modules = {}
    for module in MODULES:
        try:
            modules[module] = load_scripted_module(str(install_dir / f"{module}.py"))
        except Exception as exc:  # noqa: BLE001 - reported
            fail(f"{module}.py", "load scripted module", exc)
    try:
        app.emit("startupCompleted()")
    except Exception as exc:  # noqa: BLE001
        fail("startupCompleted()", "registerEditorEffect", exc)
    # What Slicer's start-up imported: nothing heavy, nothing the user may not have installed yet.
    report["startup_imports"] = sorted(m for m in ("torch", "scipy", "cc3d", "matplotlib") if m in sys.modules)
    for effect in AbstractScriptedSegmentEditorEffect.registered:
        report["registered"].append(type(effect).__name__ + ":" + type(effect).__module__)
        try:
            effect.clone()
        except Exception as exc:  # noqa: BLE001
            fail(type(effect).__module__, "clone()", exc)
    files = slicer_side_files(install_dir)
    if headless_script is not None:
        files.append(headless_script)
    for path in files:
        if path == headless_script:
            context = {"__name__": "__main__"}
        else:  # the file's own module and package, for its relative imports
            dotted = ".".join(path.relative_to(install_dir).with_suffix("").parts)
            package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
            context = {"__name__": dotted, "__package__": package.removesuffix(".__init__")}
        for line, statement in import_statements(path):
            try:
                exec(compile(statement, f"{path.name}:{line}", "exec"), dict(context))
            except Exception as exc:  # noqa: BLE001
                where = path.name if path == headless_script else path.relative_to(install_dir).as_posix()
                fail(f"{where}:{line}", statement, exc)
    for name, mod in sorted(sys.modules.items()):
        if name.split(".")[0] in {p.name for p in install_dir.iterdir() if p.is_dir()} and "." not in name:
            report["packages"][name] = {"package": hasattr(mod, "__path__"), "file": getattr(mod, "__file__", None)}
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python slicer_replay.py INSTALL_DIR [--slicer-version M.N] [--headless-script PATH]``:
    replay a start-up in this (fresh) interpreter and print the report as one JSON line."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("install_dir")
    parser.add_argument("--slicer-version", default="5.12")
    parser.add_argument("--headless-script")
    parser.add_argument("--site", help="a folder put first on sys.path, as site-packages is in Slicer's Python "
                                       "(e.g. holding a pip-installed copy of our packages)")
    args = parser.parse_args(argv)
    major, minor = (int(v) for v in args.slicer_version.split("."))
    # Slicer's Python does not have the repository's module folders on sys.path; neither do we.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in {ROOT / m for m in MODULES}]
    if args.site:
        sys.path.insert(0, os.path.abspath(args.site))
    report = replay_startup(Path(args.install_dir), major, minor,
                            Path(args.headless_script) if args.headless_script else None)
    report["engine_file"] = getattr(sys.modules.get("MedSAMSlicerLib"), "__file__", None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
