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


# The engine's map (README "Architecture", docs/CONTRACT.md): each folder one concern, and a module
# imports only from its own layer or those below it. Layer 0: the shared basics at the top of the
# package; then files, models, segmentation; the front doors on top.
LAYERS = {
    "errors": 0, "progress": 0, "background": 0, "boxes": 0, "metrics": 0, "data": 0,
    "fileio": 1,
    "models": 2,
    "segmentation": 3,
}
FRONT = 4  # segmenter, segment_command, cli, demo, evaluation, bench, training, remote, ...
#: At most this many modules at the top of MedSAMSlicerLib (issue 24); the rest live in folders.
MAX_TOP_MODULES = 15


def _layer(module: str) -> int:
    """``module``: a dotted name under MedSAMSlicerLib (without the prefix)."""
    return LAYERS.get(module.split(".")[0], FRONT)


def _imports(path: Path, package: str, module_level_only: bool):
    """Dotted names (under MedSAMSlicerLib, without the prefix) that ``path`` imports.

    ``package``: the file's package, dotted, under MedSAMSlicerLib ("" for the top).
    Imports inside functions count unless ``module_level_only``; ``if TYPE_CHECKING:`` ones count.
    """
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # also what sits under module-level if/try (TYPE_CHECKING, optional deps)
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef,
                 ast.AsyncFunctionDef, ast.ClassDef))]
    parts = package.split(".") if package else []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:
                    for alias in node.names:
                        yield ".".join(target + [alias.name])
                    continue
                yield ".".join(target)
            elif node.module and node.module.startswith("MedSAMSlicerLib."):
                yield node.module[len("MedSAMSlicerLib."):]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("MedSAMSlicerLib."):
                    yield alias.name[len("MedSAMSlicerLib."):]


def _engine_files():
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(ENGINE).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = ".".join(rel.parts[:-1])
        yield path, name, package


def test_the_engine_is_grouped_by_concern_and_nothing_imports_upwards():
    top = sorted(p.name for p in ENGINE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    upward = []
    for path, name, package in _engine_files():
        for target in _imports(path, package, module_level_only=False):
            if target and _layer(target) > _layer(name):
                upward.append(f"{path.relative_to(ENGINE)} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _module_graph(root: Path, prefix: str, files):
    graph = {}
    for path, name, package in files:
        graph[name] = {t for t in _imports(path, package, module_level_only=True) if t}
    # an import of a package's member counts as an import of the module or package that holds it
    names = set(graph)
    for name, targets in graph.items():
        graph[name] = {t if t in names else t.rsplit(".", 1)[0] for t in targets} & names - {name}
    return graph


def _cycles(graph):
    seen, stack, on_stack, found = set(), [], set(), []

    def visit(node):
        seen.add(node)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        on_stack.discard(node)

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    return found


def test_no_import_circle_in_the_engine_or_the_bridge():
    engine = _module_graph(ENGINE, "MedSAMSlicerLib", _engine_files())
    bridge_dir = ENGINE.parent / "MedSAMBridgeLib"
    bridge_files = [(p, p.stem if p.stem != "__init__" else "", "") for p in sorted(bridge_dir.glob("*.py"))]
    bridge = {}
    for path, name, _ in bridge_files:
        tree = ast.parse(path.read_text())
        targets = set()
        for top in tree.body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.ImportFrom) and node.level == 1:
                    targets.update([node.module] if node.module else [a.name for a in node.names])
        bridge[name] = targets - {name}
    circles = _cycles(engine) + _cycles(bridge)
    assert not circles, "import circles (module level, TYPE_CHECKING included): " + "; ".join(
        " -> ".join(c) for c in circles)
