"""The Slicer extension's packaging: CMake lists every shipped file, the Extensions Index entry
matches the CMake metadata, and the Slicer-only Python files have the classes Slicer looks for.

``slicerMacroBuildScriptedModule`` copies only the files its SCRIPTS and RESOURCES list, so a
file added to a module folder but not to its CMakeLists.txt is silently missing from the
installed extension; these tests catch that without building Slicer.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: File types a module can load at run time: all of them must be listed in CMake.
SHIPPED_SUFFIXES = {".py", ".json", ".png", ".svg", ".ui", ".toml", ".yaml", ".yml", ".csv", ".gz", ".txt"}
#: Keys allowed by the Extensions Index schema (slicer-extension-catalog-entry-schema-v1.0.2.json,
#: "additionalProperties": false) and the ones it requires.
INDEX_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
              "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
INDEX_REQUIRED = {"$schema", "category", "scm_url"}


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _cmake_sets(path: Path) -> dict:
    """``set(NAME value...)`` blocks of a CMakeLists.txt: name -> list of words (quotes kept whole)."""
    text = _strip_comments(path.read_text())
    out = {}
    for name, body in re.findall(r"set\s*\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        out[name] = re.findall(r'"[^"]*"|\S+', body)
    return out


def _unquote(words) -> str:
    return " ".join(w[1:-1] if w.startswith('"') else w for w in words)


def _top():
    text = (ROOT / "CMakeLists.txt").read_text()
    project = re.search(r"project\s*\(\s*(\w+)", text).group(1)
    meta = {name: _unquote(words) for name, words in _cmake_sets(ROOT / "CMakeLists.txt").items()}
    modules = re.findall(r"add_subdirectory\s*\(\s*(\w+)\s*\)", _strip_comments(text))
    return project, meta, modules


def _module_lists(module: str):
    sets = _cmake_sets(ROOT / module / "CMakeLists.txt")
    name = sets["MODULE_NAME"][0]
    expand = [w.replace("${MODULE_NAME}", name) for w in sets.get("MODULE_PYTHON_SCRIPTS", [])]
    resources = [w.replace("${MODULE_NAME}", name) for w in sets.get("MODULE_PYTHON_RESOURCES", [])]
    return name, expand, resources


def test_extension_modules_are_the_two_module_folders():
    _, _, modules = _top()
    assert modules == ["MedSAMSlicer", "MedSAMTraining"]


@pytest.mark.parametrize("module", ["MedSAMSlicer", "MedSAMTraining"])
def test_cmake_lists_every_shipped_file(module):
    name, scripts, resources = _module_lists(module)
    assert name == module
    folder = ROOT / module
    listed = scripts + resources
    assert len(listed) == len(set(listed)), f"{module}/CMakeLists.txt lists a file twice"
    missing_on_disk = [f for f in listed if not (folder / f).is_file()]
    assert not missing_on_disk, f"{module}/CMakeLists.txt lists files that do not exist: {missing_on_disk}"
    assert all(f.endswith(".py") for f in scripts), "MODULE_PYTHON_SCRIPTS is for .py files"
    assert not any(f.endswith(".py") for f in resources), "Python files go to MODULE_PYTHON_SCRIPTS"
    assert f"{module}.py" in scripts

    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SHIPPED_SUFFIXES
        and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.relative_to(folder).parts[0] != "Testing"
        and p.name != "CMakeLists.txt"
    )
    unlisted = [f for f in on_disk if f not in listed]
    assert not unlisted, (
        f"{module}/CMakeLists.txt does not list these files, so the installed extension would lack "
        "them; add to MODULE_PYTHON_SCRIPTS (.py) or MODULE_PYTHON_RESOURCES:\n  " + "\n  ".join(unlisted)
    )


def test_lib_package_names_are_unique_across_modules():
    """Slicer installs all scripted modules into one folder: package names must not collide."""
    seen = {}
    for module in ("MedSAMSlicer", "MedSAMTraining"):
        _, scripts, _ = _module_lists(module)
        for package in {s.split("/")[0] for s in scripts if "/" in s}:
            assert package not in seen, f"{package} shipped by {seen.get(package)} and {module}"
            seen[package] = module


def test_index_json_matches_cmake_metadata():
    project, meta, _ = _top()
    index_file = ROOT / f"{project}.json"
    assert index_file.is_file(), "the Extensions Index entry is <project name>.json"
    entry = json.loads(index_file.read_text())
    assert INDEX_REQUIRED <= set(entry) <= INDEX_KEYS, set(entry) ^ INDEX_KEYS
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-")
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    depends = [] if meta["EXTENSION_DEPENDS"] in ("", "NA") else meta["EXTENSION_DEPENDS"].split()
    assert entry.get("build_dependencies", []) == depends
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    assert entry.get("build_subdirectory", ".") == "."
    # The repository is the homepage; Index conventions on names.
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == meta["EXTENSION_HOMEPAGE"].rstrip("/")
    repo_name = urlsplit(entry["scm_url"]).path.rstrip("/").split("/")[-1].removesuffix(".git")
    assert repo_name.startswith("Slicer"), "the Index wants the repository name to start with 'Slicer'"
    assert not project.lower().startswith("slicer"), "the extension name must not start with 'Slicer'"
    assert (ROOT / "LICENSE.txt").is_file()


def test_icon_and_screenshot_urls_point_at_files_in_this_repository():
    project, meta, _ = _top()
    entry = json.loads((ROOT / f"{project}.json").read_text())
    owner_repo = urlsplit(meta["EXTENSION_HOMEPAGE"]).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{entry.get('scm_revision', 'main')}/"
    urls = [meta["EXTENSION_ICONURL"], *meta["EXTENSION_SCREENSHOTURLS"].split()]
    assert len(urls) >= 2, "an icon and at least one screenshot"
    for url in urls:
        assert url.startswith(prefix), f"{url} is not a raw file of {owner_repo} at {entry.get('scm_revision')}"
        assert (ROOT / url[len(prefix):]).is_file(), f"{url}: no such file in the repository"
    for description in ("EXTENSION_DESCRIPTION", "EXTENSION_CONTRIBUTORS", "EXTENSION_CATEGORY"):
        assert meta[description].strip(), description
    assert "Apache-2.0" in meta["EXTENSION_DESCRIPTION"]
    # The supported Slicer versions are stated where users see them, and match the code's rule.
    sys.path.insert(0, str(ROOT / "MedSAMSlicer"))  # as Slicer puts the module folder on sys.path
    from MedSAMBridgeLib.compat import MINIMUM_SLICER_VERSION

    stated = "Slicer {}.{} or later".format(*MINIMUM_SLICER_VERSION)
    assert stated in meta["EXTENSION_DESCRIPTION"] and stated in (ROOT / "README.md").read_text(encoding="utf-8")


def _classes(path: Path) -> dict:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name: {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            for node in tree.body if isinstance(node, ast.ClassDef)}


@pytest.mark.parametrize("module", ["MedSAMSlicer", "MedSAMTraining"])
def test_scripted_module_classes(module):
    """Slicer finds Module, Widget, Logic and Test classes by these names."""
    classes = _classes(ROOT / module / f"{module}.py")
    for suffix in ("", "Widget", "Logic", "Test"):
        assert module + suffix in classes, f"{module}.py lacks class {module + suffix}"
    assert "runTest" in classes[f"{module}Test"]
    assert "setup" in classes[f"{module}Widget"]


def test_effect_follows_the_template():
    folder = ROOT / "MedSAMSlicer" / "SegmentEditorMedSAMLib"
    classes = _classes(folder / "SegmentEditorEffect.py")
    methods = classes["SegmentEditorEffect"]
    for name in ("clone", "icon", "helpText", "setupOptionsFrame", "processInteractionEvents", "setMRMLDefaults",
                 "updateGUIFromMRML", "updateMRMLFromGUI", "activate", "deactivate", "cleanup"):
        assert name in methods, name
    # Slicer loads the effect file under this folder's name, replacing any package of that name:
    # the folder holds the effect alone and is not a package (test_slicer_loading replays it).
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == [
        "SegmentEditorEffect.png", "SegmentEditorEffect.py"]
    # The module registers the effect from this file at startup.
    module_source = (ROOT / "MedSAMSlicer" / "MedSAMSlicer.py").read_text()
    assert "qSlicerSegmentEditorScriptedEffect" in module_source and '"SegmentEditorEffect.py"' in module_source


def _ui_widgets(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    widgets = {}
    for w in root.iter("widget"):
        params = [p.findtext("string") for p in w.findall("property") if p.get("name") == "SlicerParameterName"]
        widgets[w.get("name")] = {"class": w.get("class"), "parameter": params[0] if params else None}
    return widgets


def _ui_attributes(path: Path) -> set:
    """Names ``X`` of every ``self.ui.X`` a module file uses."""
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _parameter_fields(path: Path, class_name: str) -> dict:
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


@pytest.mark.parametrize("module", ["MedSAMSlicer", "MedSAMTraining"])
def test_ui_file_has_every_widget_the_module_uses(module):
    """``slicer.util.childWidgetVariables`` exposes the .ui's widgets by object name; a name the
    module uses but the .ui lacks would fail only inside Slicer, when the panel opens."""
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    widgets = _ui_widgets(ui)
    used = _ui_attributes(ROOT / module / f"{module}.py")
    assert used, "the module uses its .ui"
    missing = sorted(used - set(widgets))
    assert not missing, f"{ui.name} has no widgets named {missing}"
    known = {"qMRMLWidget", "QLabel", "QComboBox", "QPushButton", "QLineEdit", "QProgressBar", "QSpinBox",
             "QDoubleSpinBox", "QCheckBox", "ctkCollapsibleButton", "ctkPathLineEdit", "qMRMLNodeComboBox"}
    assert {w["class"] for w in widgets.values()} <= known, {w["class"] for w in widgets.values()} - known


@pytest.mark.parametrize("module", ["MedSAMSlicer", "MedSAMTraining"])
def test_ui_parameters_are_the_parameter_node_fields(module):
    """Widgets with a SlicerParameterName are connected by ``connectGui`` to the parameter node
    field of that name: each must exist, with a type the widget can show."""
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    fields = _parameter_fields(ROOT / module / f"{module}.py", f"{module}ParameterNode")
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    enums = {t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "choice_enum" for t in n.targets}
    bound = {w["parameter"]: w["class"] for w in _ui_widgets(ui).values() if w["parameter"]}
    assert set(bound) == set(fields), (set(bound) ^ set(fields))
    for name, widget_class in bound.items():
        annotation = fields[name]
        if widget_class == "qMRMLNodeComboBox":
            assert annotation.startswith("slicer.vtkMRML"), (name, annotation)
        elif widget_class == "QLineEdit":
            assert annotation == "str", (name, annotation)
        elif widget_class == "ctkPathLineEdit":
            assert annotation in ("Path", "pathlib.Path"), (name, annotation)
        elif widget_class in ("QSpinBox",):
            assert annotation.startswith(("int", "Annotated[int")), (name, annotation)
        elif widget_class in ("QDoubleSpinBox",):
            assert annotation.startswith(("float", "Annotated[float")), (name, annotation)
        elif widget_class == "QCheckBox":
            assert annotation == "bool", (name, annotation)
        elif widget_class == "QComboBox":
            # an Enum made by choices.choice_enum: labels shown, values saved by name
            assert annotation in enums, (name, annotation)


def test_icons_are_real_pngs():
    for path, size in (
        (ROOT / "MedSAMSlicer" / "Resources" / "Icons" / "MedSAMSlicer.png", (128, 128)),
        (ROOT / "MedSAMTraining" / "Resources" / "Icons" / "MedSAMTraining.png", (128, 128)),
        (ROOT / "MedSAMSlicer" / "SegmentEditorMedSAMLib" / "SegmentEditorEffect.png", (21, 21)),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == size, path


def test_index_entries_for_the_stable_branches():
    """The Extensions Index builds its ``main`` branch for the Preview only; each stable Slicer
    (5.10, 5.12) builds the entry on the index branch of that name (Slicer Docs/developer_guide/
    extensions.md, v5.12.3). The entries to submit there differ from ``MedSAMSlicer.json`` only in
    ``scm_revision``: this repository's branch of the same name (docs/slicer.md, 'Extensions Index')."""
    main = json.loads((ROOT / "MedSAMSlicer.json").read_text())
    assert main["scm_revision"] == "main"
    for branch in ("5.10", "5.12"):
        entry = json.loads((ROOT / "Resources" / "ExtensionsIndex" / branch / "MedSAMSlicer.json").read_text())
        assert entry == {**main, "scm_revision": branch}
