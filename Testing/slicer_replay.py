"""Replays, in plain Python, what the Slicer application does with our extension's files.

Qt, ctk, the module and effect base classes and Slicer's loaders exist only inside the Slicer
application. What Slicer does with our files is written here as Slicer's own source does it, so
that the faults only the application would show (a package replaced in ``sys.modules``, a class
that does not exist in a supported version) show up in this test suite. Each function names the
Slicer file it replays; the tags read are v5.10.0 and v5.12.1 (the supported line), and v5.6.2 /
v5.8.1 where older Slicer behaves differently.

The Qt, CTK and Slicer objects are strict stand-ins (:class:`StrictQObject`): a name, property
or signal that the class does not have in every supported Slicer (``Data/slicer_api_names.json``,
extracted from Slicer's, CTK's and Qt's sources by ``extract_slicer_api.py``) raises, as it would
in Slicer; connections are kept and signals call their slots in order; ``slicer.app.quit()``
replays Slicer's quit sequence. Module folders go to the end of ``sys.path``, as Slicer puts them.

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


# -- strict stand-ins: only names Slicer's, CTK's and Qt's API has at every supported tag ----------

_API = None


def api():
    """The allowed names (``Data/slicer_api_names.json``; see ``slicer_api.py``)."""
    global _API
    if _API is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import slicer_api

        _API = slicer_api.API()
    return _API


_DEFAULTS = {"findData": -1, "blockSignals": False, "isNull": False, "count": 0, "width": 0}


class StrictQObject:
    """A stand-in for one Qt/CTK/Slicer class: reading, writing or calling a name the class does
    not have at every supported tag raises ``AttributeError`` (as PythonQt does in Slicer);
    ``connect``/``disconnect`` accept only the class's signal signatures and keep the slots, and
    :meth:`emit` calls them. Properties written are read back; other calls return a neutral value."""

    _cls = "QObject"

    #: every stand-in made (to find connections left behind)
    created: List[StrictQObject] = []

    def __init__(self, *args, **kwargs) -> None:
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "calls", [])
        StrictQObject.created.append(self)

    def _check(self, name: str) -> None:
        if name not in api().names(self._cls):
            raise AttributeError(f"{self._cls} has no attribute '{name}' in Slicer {', '.join(api().sources['slicer'])}")

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_values", "_slots", "calls"):
            raise AttributeError(name)
        self._check(name)
        if name in self._values:
            return self._values[name]
        if name in ("connect", "disconnect"):
            return getattr(self, "_" + name)
        if name in api().properties(self._cls):
            return None  # a property never set

        def call(*args, **kwargs):
            self.calls.append((name, args))
            if name.startswith("set") and len(args) == 1 and name[3:4].isupper():
                self._values[name[3].lower() + name[4:]] = args[0]
            return _DEFAULTS.get(name)

        return call

    def __setattr__(self, name: str, value) -> None:
        self._check(name)
        self._values[name] = value

    def _signal(self, signal: str) -> None:
        if signal not in api().signals(self._cls):
            raise AttributeError(f"{self._cls} has no signal '{signal}' in Slicer {', '.join(api().sources['slicer'])}")

    def _connect(self, signal: str, slot) -> bool:
        self._signal(signal)
        self._slots.setdefault(signal, []).append(slot)
        return True

    def _disconnect(self, signal: str, slot=None) -> bool:
        self._signal(signal)
        slots = self._slots.get(signal, [])
        if slot in slots:
            slots.remove(slot)
            return True
        return False

    def emit(self, signal: str, *args) -> None:
        """What Qt does when the object emits ``signal``: its slots, in connection order."""
        for slot in list(self._slots.get(signal, [])):
            slot(*args)

    def connected(self, signal: str) -> list:
        return list(self._slots.get(signal, []))


class QSettings(StrictQObject):
    """``qt.QSettings``: a dictionary shared by every instance (one settings file)."""

    _cls = "QSettings"
    store: Dict[str, object] = {}

    def value(self, key, default=None):
        return QSettings.store.get(key, default)

    def setValue(self, key, value) -> None:
        QSettings.store[key] = value


class QComboBox(StrictQObject):
    """``qt.QComboBox`` that keeps its items (text, data), its current index and its blocked
    state, and emits ``currentIndexChanged(int)`` as Qt does (not while signals are blocked)."""

    _cls = "QComboBox"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        object.__setattr__(self, "items", [])
        object.__setattr__(self, "_index", -1)
        object.__setattr__(self, "_blocked", False)

    def addItem(self, text, data=None) -> None:
        self.items.append([text, data])
        if self._index < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self.items.clear()
        self.setCurrentIndex(-1)

    def setItemData(self, index, value, role=None) -> None:
        pass

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def setCurrentIndex(self, index) -> None:
        changed = index != self._index
        object.__setattr__(self, "_index", index)
        if changed and not self._blocked:
            self.emit("currentIndexChanged(int)", index)

    def blockSignals(self, block) -> bool:
        was = self._blocked
        object.__setattr__(self, "_blocked", bool(block))
        return was

    @property
    def currentIndex(self) -> int:
        return self._index

    @property
    def currentData(self):
        return self.itemData(self._index)

    @property
    def count(self) -> int:
        return len(self.items)


for _name in ("addItem", "clear", "setItemData", "findData", "itemData", "setCurrentIndex", "blockSignals",
              "currentIndex", "currentData", "count"):
    assert _name in api().names("QComboBox"), _name  # the stand-in's behaviour only for real Qt names


class _StrictModule(types.ModuleType):
    """``qt`` / ``ctk``: only classes the names file has, each a :class:`StrictQObject`."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in api().classes:
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}' in the supported Slicer/CTK/Qt")
        cls = {"QSettings": QSettings, "QComboBox": QComboBox}.get(name) or type(name, (StrictQObject,), {"_cls": name})
        for member in api().classes[name]["names"]:  # enumerators (capitalised): plain values
            if member[:1].isupper() and not hasattr(cls, member):
                setattr(cls, member, hash(member) & 0xFFFF)
        setattr(self, name, cls)
        return cls


class _ModuleManager(StrictQObject):
    """``slicer.app.moduleManager()`` (qSlicerModuleManager)."""

    _cls = "qSlicerModuleManager"


class _ScriptedModuleParent(StrictQObject):
    """The C++ module a scripted module's class is given as ``parent``
    (qSlicerScriptedLoadableModule: title, categories, helpText, ... as its Q_PROPERTYs)."""

    _cls = "qSlicerScriptedLoadableModule"


class _SlicerApplication(StrictQObject):
    """``slicer.app`` (qSlicerApplication), with the quit sequence of Slicer's source."""

    _cls = "qSlicerApplication"

    def __init__(self, major: int, minor: int) -> None:
        super().__init__()
        self._values.update(majorVersion=major, minorVersion=minor, applicationVersion=f"{major}.{minor}.0")
        object.__setattr__(self, "manager", _ModuleManager())
        object.__setattr__(self, "loaded", [])  # module names in load order

    @property
    def connections(self) -> Dict[str, list]:
        return self._slots

    def moduleManager(self):
        return self.manager

    def processEvents(self) -> None:
        pass

    def quit(self) -> None:
        """``aboutToQuit()``: first Slicer's own ``qSlicerCoreApplication::onAboutToQuit`` (connected
        in ``qSlicerCoreApplicationPrivate::init``, before any module exists), which unloads the
        modules in reverse load order (``qSlicerModuleFactoryManager::unloadModules``: each emits
        ``moduleAboutToBeUnloaded(QString)``, on which ``ScriptedLoadableModuleWidget`` calls
        ``cleanup()`` and disconnects); then the ``aboutToQuit()`` slots still connected
        (Base/QTCore/qSlicerCoreApplication.cxx, qSlicerModuleFactoryManager.cxx, v5.10.0 and v5.12.3)."""
        for name in reversed(self.loaded):
            self.manager.emit("moduleAboutToBeUnloaded(QString)", name)
        self.emit("aboutToQuit()")


class ScriptedLoadableModule:
    """``slicer.ScriptedLoadableModule.ScriptedLoadableModule`` (Base/Python/slicer/ScriptedLoadableModule.py):
    keeps ``parent`` and offers the documentation-link helper."""

    def __init__(self, parent) -> None:
        self.parent = parent

    def getDefaultModuleDocumentationLink(self, docPage=None) -> str:
        return ""


class ScriptedLoadableModuleWidget:
    """``ScriptedLoadableModuleWidget`` as Base/Python/slicer/ScriptedLoadableModule.py (v5.10.0,
    v5.12.3) builds it: ``moduleName`` from the class name, ``parent`` and ``layout``, and the
    connection to ``moduleAboutToBeUnloaded(QString)`` whose slot calls ``cleanup()`` for this module
    and then disconnects itself."""

    def __init__(self, parent=None) -> None:
        import slicer

        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = False
        if not parent:
            parent = sys.modules["qt"].__getattr__("QWidget")()
        self.parent = parent
        self.layout = sys.modules["qt"].__getattr__("QVBoxLayout")()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def setup(self) -> None:
        pass

    def resourcePath(self, filename: str) -> str:
        import slicer

        return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

    def cleanup(self) -> None:
        pass

    def _onModuleAboutToBeUnloaded(self, moduleName: str) -> None:
        import slicer

        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)


class ScriptedLoadableModuleLogic:
    """``ScriptedLoadableModuleLogic``: ``getParameterNode`` returns the module's singleton
    ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene`` (real MRML, slicer-core)."""

    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


def parameter_node_wrapper(cls):
    """``@parameterNodeWrapper``: the wrapped class is built on a parameter node and holds its
    fields' defaults (the GUI connection is the real wrapper's job, not replayed)."""

    class Wrapped:
        def __init__(self, node) -> None:
            self.parameterNode = node
            for name in getattr(cls, "__annotations__", {}):
                setattr(self, name, getattr(cls, name, None))

        def connectGui(self, ui):
            return object()

        def disconnectGui(self, tag) -> None:
            pass

        # forwarded to the node, as Base/Python/slicer/parameterNodeWrapper/wrapper.py (v5.10.0, v5.12.3) does
        def StartModify(self):
            return self.parameterNode.StartModify()

        def EndModify(self, wasModified):
            return self.parameterNode.EndModify(wasModified)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            return self.parameterNode.RemoveObserver(tag)

        def Modified(self):
            return self.parameterNode.Modified()

    Wrapped.__name__ = cls.__name__
    return Wrapped


class Messages:
    """What ``slicer.util``'s message boxes would have shown; ``confirm`` is the answer to questions."""

    shown: List[str] = []
    confirm = True


def _load_ui(path: str):
    """``slicer.util.loadUI``: the ``.ui`` file's widgets as strict stand-ins of their classes."""
    import xml.etree.ElementTree as ET

    widgets = {}
    top = None
    for element in ET.parse(path).getroot().iter("widget"):
        name = element.get("class")
        if name not in api().classes:
            raise AttributeError(f"{path}: widget class {name} is not in the supported Slicer/CTK/Qt")
        cls = QComboBox if name == "QComboBox" else type(name, (StrictQObject,), {"_cls": name})
        widget = cls()
        widget.objectName = element.get("name")
        widgets[element.get("name")] = widget
        top = top or widget
    object.__setattr__(top, "_children", widgets)
    return top


def install_panel_stand_ins(install_dir: Path) -> None:
    """What the panels need besides the loaders: the ``slicer.util`` functions that only work with
    the application (dialogs, ``.ui`` files) and a scene."""
    import slicer
    import slicer.util as util

    util.loadUI = _load_ui
    util.childWidgetVariables = lambda widget: types.SimpleNamespace(**widget._children)
    util.modulePath = lambda name: str(install_dir / f"{name}.py")

    def shown(message, *args, **kwargs):
        Messages.shown.append(str(message))
        return Messages.confirm

    util.errorDisplay = util.warningDisplay = util.infoDisplay = shown
    util.confirmOkCancelDisplay = util.confirmYesNoDisplay = shown
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
    for name in ("qMRMLNodeComboBox", "qMRMLWidget", "qMRMLSegmentEditorWidget"):  # Slicer's Qt widgets
        setattr(slicer, name, type(name, (StrictQObject,), {"_cls": name}))


def replay_first_use_failure(install_dir: Path, action: str, wait_s: float = 300.0) -> dict:
    """The MedSAM module panel on strict stand-ins: ``action`` "weights" presses *Get weights*,
    "speed" chooses the *fast* speed in its menu; the user agrees to the one question; the
    installs then run in the background, pumped by the panel's timer as Slicer's event loop would.
    Reports every message box, the status line, the speed in force and the one the menu shows,
    and how many timer ticks the install took (the window was live during each)."""
    import time

    replay = replay_startup(install_dir)
    install_panel_stand_ins(install_dir)
    import MedSAMSlicer

    widget = MedSAMSlicer.MedSAMSlicerWidget()
    widget.setup()
    report = {"failures": replay["failures"], "speed_before": widget.logic.speed()}
    if action == "weights":
        widget.ui.getWeightsButton.emit("clicked()")
    else:
        widget.ui.speedSelector.setCurrentIndex(widget.ui.speedSelector.findData("fast"))  # emits, as Qt does
    report["menu_while_installing"] = widget.ui.speedSelector.currentData
    report["installing"] = widget.install is not None
    ticks, deadline = 0, time.monotonic() + wait_s
    while widget.install is not None and time.monotonic() < deadline:
        widget.install.timer.emit("timeout()")
        ticks += 1
    report.update(ticks=ticks, status=widget.ui.statusLabel.text, speed_after=widget.logic.speed(),
                  menu_after=widget.ui.speedSelector.currentData, messages=list(Messages.shown),
                  apply_text=widget.ui.applyButton.text)
    return report


def replay_effect_lifecycle(install_dir: Path) -> dict:
    """Register the effect as Slicer does, build its options (``setupOptionsFrame``), activate,
    deactivate and clean it up, all on strict stand-ins; report the connections to the effect that
    are left afterwards (``AbstractScriptedSegmentEditorEffect.cleanup``: they keep it alive)."""
    replay = replay_startup(install_dir)
    install_panel_stand_ins(install_dir)
    effect = AbstractScriptedSegmentEditorEffect.registered[-1]
    report = {"failures": replay["failures"]}
    for step in ("setupOptionsFrame", "setMRMLDefaults", "activate", "deactivate", "cleanup"):
        try:
            getattr(effect, step)()
        except Exception as exc:  # noqa: BLE001 - reported
            report["failures"].append([step, f"{type(exc).__name__}: {exc}"])
    left = []
    for obj in StrictQObject.created:
        for signal, slots in obj._slots.items():
            left += [f"{obj._cls}.{signal} -> {getattr(s, '__name__', s)}" for s in slots
                     if getattr(s, "__self__", None) is effect]
    report["left_connected"] = left
    return report


class SliceView(StrictQObject):
    """``qMRMLSliceView`` (what ``qMRMLSliceWidget.sliceView()`` returns): only its names at every
    supported tag (with ``ctkVTKSliceView``'s and ``ctkVTKAbstractView``'s); counts the renders
    scheduled (``ctkVTKAbstractView::scheduleRender``)."""

    _cls = "qMRMLSliceView"

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_renders", 0)

    def scheduleRender(self) -> None:
        object.__setattr__(self, "_renders", self._renders + 1)


class SliceWidget(StrictQObject):
    """The ``qMRMLSliceWidget`` Slicer hands to ``processInteractionEvents`` and
    ``processViewNodeEvents``: a name the class lacks at a supported tag (with its bases
    ``qMRMLAbstractViewWidget``, ``qMRMLWidget``, ``QWidget``) raises, as PythonQt does.
    Underneath: a real axial ``vtkMRMLSliceNode`` in the scene (its XYToRAS is the one Slicer
    computes) and the real ``vtkMRMLSliceLogic`` (slicer-core) observing it, as Slicer's layout
    manager pairs them; ``sliceView()`` is a strict :class:`SliceView`."""

    _cls = "qMRMLSliceWidget"

    def __init__(self, scene) -> None:
        import slicer

        super().__init__()
        node = slicer.vtkMRMLSliceNode()
        node.SetName("Red")
        node.SetLayoutName("Red")
        node.SetSliceToRASByNTP(0, 0, 1, -1, 0, 0, 0, 0, 0, 0)  # axial, as Slicer's "Axial" preset
        node.SetDimensions(400, 400, 1)
        node.SetFieldOfView(400.0, 400.0, 1.0)
        scene.AddNode(node)
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(node)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_logic", logic)
        object.__setattr__(self, "_view", SliceView())

    def className(self) -> str:
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        return self._logic

    def mrmlSliceNode(self):
        return self._node

    def sliceView(self) -> SliceView:
        return self._view


for _cls, _names in ((SliceWidget, ("className", "sliceLogic", "mrmlSliceNode", "sliceView")),
                     (SliceView, ("scheduleRender",))):
    for _name in _names:
        assert _name in api().names(_cls._cls), (_cls._cls, _name)  # the stand-ins' behaviour only for real names


def slice_xy(view: SliceWidget, ras) -> Tuple[int, int]:
    """The pixel of ``view`` showing a RAS point (what the user points at)."""
    import vtk

    transform = vtk.vtkTransform()
    transform.SetMatrix(view.mrmlSliceNode().GetXYToRAS())
    transform.Inverse()
    x, y, _ = transform.TransformPoint([float(v) for v in ras])
    return int(round(x)), int(round(y))


def slice_xy_to_ras(view: SliceWidget, xy) -> List[float]:
    """``qSlicerSegmentEditorAbstractEffect::xyToRas`` (v5.12.3): XYToRAS times ``(x, y, 0, 1)``."""
    return list(view.mrmlSliceNode().GetXYToRAS().MultiplyPoint([float(xy[0]), float(xy[1]), 0.0, 1.0])[:3])


def replay_effect_boxes(install_dir: Path, volume: str, labels: str, ka: int, kb: int, wait_s: float = 300.0) -> dict:
    """The effect on strict stand-ins and a real scene (the small CT, its segmentation, a Segment
    Editor parameter node): *Add boxes* checked, the user drags a box around each kidney (labels 2
    and 3) on slice ``ka`` and one around the left kidney on ``kb`` in an axial view, selects box 2 in the list and
    presses *Delete box*, then *Preview*; the effect's timer is pumped until the model is done (as
    Slicer's event loop would). Reports the list after each step, what each view showed, the boxes
    in the preview's record (what reached the bridge) and the boxes expected from the drags."""
    import time

    import numpy as np
    import slicer
    import vtk

    replay = replay_startup(install_dir)
    install_panel_stand_ins(install_dir)
    from MedSAMBridgeLib import MRMLBridge
    from MedSAMBridgeLib.headless import create_headless_scene, load_volume
    from MedSAMSlicerLib.segmentation.provenance import prompt_ras

    app, slicer.app = slicer.app, None  # the headless scene's logics, then the application again
    scene = create_headless_scene()
    ct, label_node = load_volume(volume, "CT"), load_volume(labels, "labels", labelmap=True)
    slicer.app = app
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("kidneys", "kidneys")
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(segmentation)
    editor.SetAndObserveSourceVolumeNode(ct)
    editor.SetSelectedSegmentID(segment_id)

    effect = AbstractScriptedSegmentEditorEffect.registered[-1]
    scripted = effect.scriptedEffect
    parameters: Dict[str, object] = {}
    # The C++ effect's parameter calls (names checked by the stand-in), kept in a dictionary.
    scripted.parameterSetNode  # noqa: B018 - a real name of qSlicerSegmentEditorScriptedEffect
    scripted._values.update(parameterSetNode=lambda: editor, parameter=lambda name: parameters.get(name, ""),
                            setParameter=parameters.__setitem__, setParameterDefault=parameters.setdefault)
    view = SliceWidget(scene)
    effect.xyToRas = lambda xy, viewWidget: slice_xy_to_ras(viewWidget, xy)  # AbstractScriptedSegmentEditorEffect.xyToRas
    report: Dict[str, object] = {"failures": replay["failures"]}
    ijk_to_ras = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(ijk_to_ras)
    m = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    label_array = slicer.util.arrayFromVolume(label_node)

    def drag(value: int, k: int):
        """Show slice k and drag from one corner of the label's box there to the other."""
        jj, ii = np.nonzero(label_array[k] == value)
        lo, hi = (m @ np.r_[ii.min(), jj.min(), k, 1])[:3], (m @ np.r_[ii.max(), jj.max(), k, 1])[:3]
        view.mrmlSliceNode().JumpSlice(*lo)
        start, end = slice_xy(view, lo), slice_xy(view, hi)
        interactor = vtk.vtkRenderWindowInteractor()
        for event, xy in ((vtk.vtkCommand.LeftButtonPressEvent, start), (vtk.vtkCommand.MouseMoveEvent, end),
                          (vtk.vtkCommand.LeftButtonReleaseEvent, end)):
            interactor.SetEventPosition(*xy)
            effect.processInteractionEvents(interactor, event, view)
        corners = [start, (end[0], start[1]), end, (start[0], end[1])]
        return [slice_xy_to_ras(view, xy) for xy in corners]

    def shown(k: int) -> int:
        """How many listed boxes the view draws when it shows slice k (scrolled there)."""
        view.mrmlSliceNode().JumpSlice(*(m @ np.r_[0, 0, k, 1])[:3])
        effect.processViewNodeEvents(view.mrmlSliceNode(), vtk.vtkCommand.ModifiedEvent, view)
        return sum(p.points.GetNumberOfPoints() > 0 for p in effect.listPipelines.get(view, []))

    try:
        for step in ("setupOptionsFrame", "setMRMLDefaults", "activate", "updateGUIFromMRML"):
            getattr(effect, step)()
        effect.addBoxesCheckBox.checked = True
        drawn = [drag(2, ka), drag(3, ka), drag(3, kb)]
        report["rows"] = [effect.boxSelector.items[i][0] for i in range(effect.boxSelector.count)]
        report["status_after_adding"] = effect.statusLabel.text
        report["shown"] = [shown(ka), shown((ka + kb) // 2), shown(kb)]
        report["renders"] = view.sliceView()._renders  # scheduleRender() on the real qMRMLSliceView name
        effect.boxSelector.setCurrentIndex(2)  # box 2 (emits currentIndexChanged, as Qt does)
        effect.deleteBoxButton.emit("clicked()")
        report["rows_after_delete"] = [effect.boxSelector.items[i][0] for i in range(effect.boxSelector.count)]
        report["status_after_delete"] = effect.statusLabel.text
        effect.previewButton.emit("clicked()")
        deadline = time.monotonic() + wait_s
        while effect.task is not None and time.monotonic() < deadline:
            effect.pumpTimer.emit("timeout()")
        report["status"] = effect.statusLabel.text
        prediction = effect.prediction
        src = MRMLBridge.source_volume(ct)
        report["expected"] = [prompt_ras(src, MRMLBridge.prompt_from_points(src, drawn[i])) for i in (0, 2)]
        report["expected_slices"] = [MRMLBridge.prompt_from_points(src, drawn[i]).z for i in (0, 2)]
        if prediction is not None:
            report["record"] = prediction.record.prompts
            report["locked"] = [int(z) for z in prediction.result.locked]
            report["review"] = effect.reviewLabel.text
            report["mask_slices"] = sorted(int(z) for z in np.nonzero(prediction.mask.any(axis=(1, 2)))[0])
        effect.deactivate()
        effect.cleanup()
    except Exception as exc:  # noqa: BLE001 - reported
        import traceback

        report["failures"].append(["boxes", f"{type(exc).__name__}: {exc}", traceback.format_exc()[-2000:]])
    return report


def replay_quit_during_training(install_dir: Path, data: str, out: str, wait_s: float = 180.0) -> dict:
    """Open the MedSAM Training panel, start a run from it as a user would (its Python is whatever
    ``PythonSlicer`` is on PATH: the launcher replay in the tests), wait for the first training
    progress report, then quit Slicer as Slicer's source does (:meth:`_SlicerApplication.quit`) while this
    process, Slicer, is still alive. Reports whether the trainer ended before Slicer's process did."""
    import time

    replay = replay_startup(install_dir)
    install_panel_stand_ins(install_dir)
    import MedSAMTraining

    widget = MedSAMTraining.MedSAMTrainingWidget()
    widget.setup()
    widget.ui.dataSelector.currentPath = data
    widget.ui.outputSelector.currentPath = out
    p = widget._parameterNode
    p.batchSize, p.freezeEncoder, p.epochs = 1, True, 50
    p.device = MedSAMTraining.TrainingDevice.cpu
    widget.onStartOrCancel()
    job = widget.run.job if widget.run else None
    report = {"failures": replay["failures"], "messages": list(Messages.shown), "started": job is not None}
    if job is None:
        return report
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and job.running:
        widget.timer.emit("timeout()")  # the panel's poll timer fires
        if job.worker_pid and job.last_progress:  # the trainer runs and reports progress
            break
        time.sleep(0.2)
    report.update(trainer=job.worker_pid, launcher=job._proc.pid if job._proc else None,
                  python=job.commands[-1][0], progress=job.last_progress)
    quit_at = time.monotonic()
    sys.modules["slicer"].app.quit()
    report["timer_slots_after_quit"] = len(widget.timer.connected("timeout()"))
    report["stopped_before_slicer_exit"] = job.wait(wait_s) is not None
    report["stop_s"] = round(time.monotonic() - quit_at, 1)
    report["log"] = job.log_lines()[-5:]
    report["returncode"] = job.returncode
    report["status"] = widget.ui.statusLabel._values.get("text")
    return report


def replay_remote_panel(install_dir: Path, url: str, token: str, volume: str, roi: dict, out: str,
                        wait_s: float = 300.0) -> dict:
    """The MedSAM module's *Where the model runs* panel on strict stand-ins, in a Python where
    ``import torch`` fails (Remote mode must not need it), against a real server at ``url``:

    1. *Run on* -> Remote GPU server (the menu emits ``currentIndexChanged(int)``), no URL yet;
    2. the URL and a wrong token typed (``editingFinished()``), *Test connection* pressed: the
       question runs in a worker thread, pumped by the panel's timer as Slicer's event loop would;
    3. the right token, *Test connection* again;
    4. the panel's *Segment* (Apply) with an ROI (``roi``: RAS ``center`` and ``size``) on
       ``volume``, pumped by its timer to the end; the new segment's mask goes to ``out`` (.npy).

    Reports the connection line after each step, the status line, Slicer's settings, every
    message box and the torch modules loaded (none may be)."""
    import time

    import numpy as np

    sys.modules["torch"] = None  # importing torch now fails, as in a Slicer without PyTorch
    replay = replay_startup(install_dir, every_import=False)
    import slicer

    from MedSAMBridgeLib.headless import create_headless_scene, load_volume

    # The application's scene and its Volumes and Segmentations logics, made by the headless
    # bootstrap (which makes them only where there is no slicer.app).
    app = slicer.app
    del slicer.app
    create_headless_scene()
    slicer.app = app
    install_panel_stand_ins(install_dir)

    import MedSAMSlicer

    widget = MedSAMSlicer.MedSAMSlicerWidget()
    widget.setup()
    report: dict = {"failures": replay["failures"], "ticks": []}

    def test_connection() -> str:
        widget.testConnectionButton.emit("clicked()")
        ticks, deadline = 0, time.monotonic() + wait_s
        while widget.connectionTask is not None and time.monotonic() < deadline:
            widget.connectionTimer.emit("timeout()")  # the event loop runs the timer's slot
            ticks += 1
            time.sleep(0.01)
        report["ticks"].append(ticks)
        return widget.connectionLabel.text

    def type_into(edit, text: str) -> None:
        edit.text = text
        edit.emit("editingFinished()")

    widget.backendSelector.setCurrentIndex(widget.backendSelector.findData("remote"))
    report["without_url"] = widget.connectionLabel.text
    type_into(widget.serverUrlEdit, url)
    type_into(widget.serverTokenEdit, "wrong-" + "x" * 24)
    report["wrong_token"] = test_connection()
    type_into(widget.serverTokenEdit, token)
    report["right_token"] = test_connection()
    report["backend"] = repr(widget.logic.backend())
    report["settings"] = {k: v for k, v in QSettings.store.items() if k.startswith("MedSAM/Server")}

    ct = load_volume(volume, "CT")
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi_node.SetCenter(*roi["center"])
    roi_node.SetSize(*roi["size"])
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    p = widget._parameterNode
    p.inputVolume, p.roi, p.segmentation, p.segmentName = ct, roi_node, segmentation, "liver"
    widget.ui.applyButton.emit("clicked()")
    report["running"] = widget.run is not None
    ticks, deadline = 0, time.monotonic() + wait_s
    while widget.run is not None and time.monotonic() < deadline:
        widget.pumpTimer.emit("timeout()")
        ticks += 1
        time.sleep(0.01)
    report["segment_ticks"] = ticks
    report["status"] = widget.ui.statusLabel.text
    segment_ids = list(segmentation.GetSegmentation().GetSegmentIDs())
    report["segments"] = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in segment_ids]
    if segment_ids:
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_ids[0], ct) > 0
        np.save(out, mask)
    report["messages"] = list(Messages.shown)
    report["torch"] = sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None)
    return report


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

    for name in ("qt", "ctk"):
        sys.modules[name] = _StrictModule(name)
    sys.modules["PythonQt"] = types.ModuleType("PythonQt")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper  # Base/Python/slicer/parameterNodeWrapper: a class decorator
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


class ScriptedEffect(StrictQObject):
    """``qSlicerSegmentEditorScriptedEffect`` with ``setPythonSource`` as in
    Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx (v5.12.1):

    * module name = the parent folder's name ("Use parent directory name as module name");
    * class name = the file's base name, with "Effect" appended unless it ends so;
    * the class is taken from ``sys.modules[moduleName]`` if present, otherwise the file is
      loaded with ``loadSourceAsModule(moduleName, path)``;
    * the instance is created with this C++ object and set as ``slicer.<moduleName>``.
    """

    _cls = "qSlicerSegmentEditorScriptedEffect"

    def __init__(self, parent=None) -> None:
        super().__init__()
        object.__setattr__(self, "_self", None)

    def setPythonSource(self, path: str) -> bool:
        import slicer

        if not (path.endswith(".py") or path.endswith(".pyc")):
            return False
        module_name = Path(path).parent.name
        class_name = Path(path).name.split(".")[0]
        if not class_name.endswith("Effect"):
            class_name += "Effect"
        cls = _find_or_load_class(module_name, class_name, path)
        object.__setattr__(self, "_self", cls(self))
        setattr(slicer, module_name, self._self)
        return True

    def self(self):
        return self._self


def load_scripted_module(file_path: str):
    """``qSlicerScriptedLoadableModule::setPythonSource`` (Base/QTGUI/qSlicerScriptedLoadableModule.cxx,
    v5.12.1): module and class name = the file's base name; class from ``sys.modules`` or the
    file loaded with ``loadSourceAsModule``; then the class is instantiated with the module's
    C++ ``parent`` (here a stand-in). Returns the instance."""
    import slicer

    module_name = Path(file_path).name.split(".")[0]
    cls = _find_or_load_class(module_name, module_name, file_path)
    instance = cls(_ScriptedModuleParent())  # only what qSlicerScriptedLoadableModule has at our tags
    slicer.app.loaded.append(module_name)
    return instance


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


def replay_startup(install_dir: Path, major: int = 5, minor: int = 12, headless_script: Optional[Path] = None,
                   every_import: bool = True) -> dict:
    """Replay a Slicer start-up over an installed extension and then every import our files make.

    1. Slicer puts the scripted-modules folder on ``sys.path`` and loads each module file
       (:func:`load_scripted_module`), whose constructor connects ``startupCompleted()``.
    2. ``startupCompleted()`` fires: the module registers the effect, i.e.
       ``qSlicerSegmentEditorScriptedEffect.setPythonSource(<effect file>)``.
    3. Each Segment Editor widget clones the effect (``clone()`` -> ``setPythonSource`` again).
    4. Every import statement of every Slicer-side file (and the headless script) is executed,
       as the panels, the effect and the training module do later, at run time (unless
       ``every_import`` is false: a replay that must see what one path imports, and no more).

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
    files = slicer_side_files(install_dir) if every_import else []
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
    parser.add_argument("--first-use-failure", choices=("weights", "speed"), help="replay_first_use_failure")
    parser.add_argument("--effect-lifecycle", action="store_true", help="replay_effect_lifecycle")
    parser.add_argument("--effect-boxes", nargs=4, metavar=("VOLUME", "LABELS", "KA", "KB"), help="replay_effect_boxes")
    parser.add_argument("--quit-during-training", nargs=2, metavar=("DATA", "OUT"),
                        help="replay_quit_during_training: start a run from the training panel, then quit")
    parser.add_argument("--remote-panel", metavar="JSON",
                        help="replay_remote_panel: its arguments (url, token, volume, roi, out) as a JSON object")
    args = parser.parse_args(argv)
    major, minor = (int(v) for v in args.slicer_version.split("."))
    # Slicer's Python does not have the repository's module folders on sys.path; neither do we.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in {ROOT / m for m in MODULES}]
    if args.site:
        sys.path.insert(0, os.path.abspath(args.site))
    if args.first_use_failure:
        print(json.dumps(replay_first_use_failure(Path(args.install_dir), args.first_use_failure)))
        return 0
    if args.effect_lifecycle:
        print(json.dumps(replay_effect_lifecycle(Path(args.install_dir))))
        return 0
    if args.effect_boxes:
        volume, labels, ka, kb = args.effect_boxes
        print(json.dumps(replay_effect_boxes(Path(args.install_dir), volume, labels, int(ka), int(kb))))
        return 0
    if args.remote_panel:
        print(json.dumps(replay_remote_panel(Path(args.install_dir), **json.loads(args.remote_panel))))
        return 0
    if args.quit_during_training:
        report = replay_quit_during_training(Path(args.install_dir), *args.quit_during_training)
        print(json.dumps(report))
        return 0
    report = replay_startup(Path(args.install_dir), major, minor,
                            Path(args.headless_script) if args.headless_script else None)
    report["engine_file"] = getattr(sys.modules.get("MedSAMSlicerLib"), "__file__", None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
