"""The panels, the effect and the training module use only names that exist in Slicer's, CTK's
and Qt's API at every supported tag (v5.10.0 and v5.12.3; ``Data/slicer_api_names.json``, made
from their sources by ``extract_slicer_api.py``), and a wrong name fails here, not in a user's Slicer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import extract_slicer_api  # noqa: E402
import slicer_api  # noqa: E402

PANELS = {
    "MedSAMSlicer": (ROOT / "MedSAMSlicer" / "MedSAMSlicer.py", ROOT / "MedSAMSlicer" / "Resources" / "UI" / "MedSAMSlicer.ui"),
    "MedSAMTraining": (ROOT / "MedSAMTraining" / "MedSAMTraining.py",
                       ROOT / "MedSAMTraining" / "Resources" / "UI" / "MedSAMTraining.ui"),
    "effect": (ROOT / "MedSAMSlicer" / "SegmentEditorMedSAMLib" / "SegmentEditorEffect.py", None),
}


@pytest.fixture(scope="module")
def api():
    return slicer_api.API()


@pytest.mark.parametrize("panel", sorted(PANELS))
def test_panels_use_only_names_that_exist_in_every_supported_slicer(panel, api):
    path, ui = PANELS[panel]
    checked = []
    problems = slicer_api.check_file(path, api, ui, checked)
    assert not problems, "\n".join(problems)
    assert len(checked) >= 50, f"only {len(checked)} names were checked"  # the checker sees the panel
    assert api.sources["slicer"].keys() == {"v5.10.0", "v5.12.3"}


@pytest.mark.parametrize("panel, original, wrong, expected", [
    ("MedSAMSlicer", "self.pumpTimer.setInterval(0)", "self.pumpTimer.setIntervall(0)", "QTimer has no 'setIntervall'"),
    ("MedSAMSlicer", "slicer.util.confirmOkCancelDisplay(", "slicer.util.executePythonModule(",
     "slicer.util has no 'executePythonModule'"),  # Slicer 5.12 only
    ("MedSAMSlicer", 'self.ui.deviceSelector.connect("currentIndexChanged(int)"',
     'self.ui.deviceSelector.connect("currentIndexChanged(double)"', "QComboBox has no such signal"),
    ("MedSAMSlicer", "self.ui.weightsStatusLabel.text =", "self.ui.weightsStatusLabel.txt =", "QLabel has no 'txt'"),
    ("MedSAMTraining", "self.timer.disconnect(\"timeout()\"", "self.timer.disconnect(\"timedOut()\"",
     "QTimer has no such signal"),
    ("effect", "self.scriptedEffect.addLabeledOptionsWidget(", "self.scriptedEffect.addLabelledOptionsWidget(",
     "qSlicerSegmentEditorScriptedEffect has no 'addLabelledOptionsWidget'"),
    ("effect", "qt.QApplication.setOverrideCursor(", "qt.QApplication.setOverideCursor(",
     "QApplication has no 'setOverideCursor'"),
    ("effect", "self.progressBar = qt.QProgressBar()", "self.progressBar = qt.QProgresBar()",
     "qt.QProgresBar is not a class"),
])
def test_a_wrong_name_injected_into_a_copy_of_a_panel_fails(panel, original, wrong, expected, api, tmp_path):
    path, ui = PANELS[panel]
    source = path.read_text(encoding="utf-8")
    assert original in source, f"the panel no longer contains {original!r}: update this test"
    copy = tmp_path / path.name
    copy.write_text(source.replace(original, wrong, 1), encoding="utf-8")
    problems = slicer_api.check_file(copy, api, ui)
    assert any(expected in p for p in problems), problems


def test_header_extraction_reads_methods_properties_enums_and_signals():
    header = """
    class Q_X_EXPORT qThing : public QWidget
    {
      Q_OBJECT
      Q_PROPERTY(QString currentPath READ currentPath WRITE setCurrentPath)
    public:
      enum Filter { Dirs = 0x1, Files = 0x2 };
      /// a comment mentioning notAMethod()
      QString currentPath() const;
      Q_INVOKABLE void setCurrentPath(const QString& path);
    public slots:
      void browse();
    signals:
      void currentPathChanged(const QString& path);
      void nodeChanged(vtkMRMLNode* node, bool on = false);
    protected:
      void helper();
    };
    """
    got = extract_slicer_api.cpp_class(header, "qThing")
    assert got["base"] == "QWidget"
    assert {"currentPath", "setCurrentPath", "Dirs", "Files", "browse", "currentPathChanged"} <= got["names"]
    assert "notAMethod" not in got["names"]
    assert got["signals"] == {"browse()", "currentPathChanged(QString)", "nodeChanged(vtkMRMLNode*,bool)"}
