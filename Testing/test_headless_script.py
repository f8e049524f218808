"""``scripts/medsam_headless.py`` on slicer-core: end to end as a subprocess, and its errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slicer_helpers import SPLEEN, dice, ijk_to_ras, label_box_ijk, segment_kji

pytest_plugins = ["conftest_slicer"]

ROOT = Path(__file__).resolve().parent.parent
#: The source tree's wrapper, and the script as the extension installs it.
SCRIPT = ROOT / "scripts" / "medsam_headless.py"
INSTALLED = ROOT / "MedSAMSlicer" / "MedSAMBridgeLib" / "medsam_headless.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("medsam_headless", INSTALLED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spleen_box_ras(ct_scene, slab=(15, 17)):
    lo, hi = label_box_ijk(ct_scene.label_array(SPLEEN), slab)
    m = ijk_to_ras(ct_scene.ct)
    return [float(v) for v in np.r_[(m @ np.r_[lo, 1])[:3], (m @ np.r_[hi, 1])[:3]]]


def test_script_end_to_end(ct_scene, ct_sm_path, tmp_path, record_property):
    """A box around the spleen on slices 15..17, in a fresh Python process: the .seg.nrrd has one
    segment named as asked, on the CT's grid, matching the reference spleen."""
    from MedSAMBridgeLib.headless import load_segmentation

    out = tmp_path / "spleen.seg.nrrd"
    box = _spleen_box_ras(ct_scene)
    cmd = [sys.executable, str(SCRIPT), "--volume", str(ct_sm_path), "--box-ras", *map(str, box),
           "--output", str(out), "--segment-name", "spleen", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "spleen:" in done.stdout and "segmented k 15..17" in done.stdout, done.stdout

    seg = load_segmentation(str(out), "result")
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment_id = segmentation.GetNthSegmentID(0)
    assert segmentation.GetSegment(segment_id).GetName() == "spleen"
    got = segment_kji(seg, segment_id, ct_scene.ct)
    assert set(np.nonzero(got.any(axis=(1, 2)))[0]) == {15, 16, 17}
    reference = np.zeros_like(got)
    reference[15:18] = ct_scene.label_array(SPLEEN)[15:18]
    d = dice(got, reference)
    record_property("dice_spleen_headless", round(d, 4))
    assert d >= 0.8, d


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--volume": "missing.nii.gz"}, "volume file 'missing.nii.gz' not found"),
        ({"--box-ras": ["500", "500", "500", "520", "520", "520"]}, "outside the volume"),
        ({"--output": "out.nii.gz"}, "must be a Slicer segmentation file"),
        ({"--checkpoint": "no-such.pth"}, "checkpoint file 'no-such.pth' not found"),
    ],
)
def test_script_bad_input_exits_non_zero(change, message, ct_scene, ct_sm_path, tmp_path, capsys):
    args = {"--volume": str(ct_sm_path), "--box-ras": [str(v) for v in _spleen_box_ras(ct_scene)],
            "--output": str(tmp_path / "out.seg.nrrd")}
    for key, value in change.items():
        args[key] = value if key != "--output" else str(tmp_path / value)
    argv = []
    for key, value in args.items():
        argv += [key, *(value if isinstance(value, list) else [value])]
    assert _script_module().main(argv) == 2  # bad input: 2, as every command (docs/safety.md)
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_script_refuses_to_replace_output_and_bad_arguments(ct_sm_path, tmp_path, capsys):
    existing = tmp_path / "out.seg.nrrd"
    existing.write_text("keep me")
    argv = ["--volume", str(ct_sm_path), "--box-ras", "0", "0", "0", "1", "1", "1", "--output", str(existing)]
    assert _script_module().main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    assert _script_module().main(["--volume", str(ct_sm_path)]) == 2


def test_script_adds_to_an_existing_segmentation(shared_segmenter, ct_scene, ct_sm_path, tmp_path, capsys):
    """--segmentation adds the new segment to a saved one; --others all takes its voxels from the
    other segments. Runs in this process (shared model and cached embeddings)."""
    from MedSAMBridgeLib.headless import load_segmentation, save_node

    seg = ct_scene.new_segmentation()
    reference_id = seg.GetSegmentation().AddEmptySegment("", "spleen (reference)")
    import slicer

    reference = ct_scene.label_array(SPLEEN)
    slicer.util.updateSegmentBinaryLabelmapFromArray(reference.astype(np.uint8), seg, reference_id, ct_scene.ct)
    existing = tmp_path / "existing.seg.nrrd"
    save_node(seg, str(existing))
    out = tmp_path / "both.seg.nrrd"
    argv = ["--volume", str(ct_sm_path), "--box-ras", *map(str, _spleen_box_ras(ct_scene)), "--output", str(out),
            "--segmentation", str(existing), "--others", "all", "--segment-name", "spleen (MedSAM)", "--device", "cpu"]
    assert _script_module().main(argv) == 0, capsys.readouterr().err
    result = load_segmentation(str(out), "both")
    segmentation = result.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(n)).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names == ["spleen (reference)", "spleen (MedSAM)"]
    medsam = segment_kji(result, segmentation.GetNthSegmentID(1), ct_scene.ct)
    kept = segment_kji(result, segmentation.GetNthSegmentID(0), ct_scene.ct)
    assert medsam.any()
    np.testing.assert_array_equal(kept, reference & ~medsam)


def test_script_speed_setting_reaches_the_engine(shared_segmenter, ct_scene, ct_sm_path, tmp_path, capsys,
                                                   monkeypatch):
    """--speed fast: the bridge's segmenter runs the encoder through OpenVINO and the spleen comes
    out as with the exact setting (the 'fast' tier's claim, docs/performance.md, "Speed settings")."""
    pytest.importorskip("openvino")
    from MedSAMBridgeLib.headless import load_segmentation
    from MedSAMSlicerLib.models.encoder_runtimes import EXPORT_DIR_ENV

    monkeypatch.setenv(EXPORT_DIR_ENV, str(tmp_path / "exported"))
    masks = {}
    for speed in ("exact", "fast"):
        out = tmp_path / f"{speed}.seg.nrrd"
        argv = ["--volume", str(ct_sm_path), "--box-ras", *map(str, _spleen_box_ras(ct_scene)), "--output", str(out),
                "--device", "cpu", "--speed", speed]
        assert _script_module().main(argv) == 0, capsys.readouterr().err
        result = load_segmentation(str(out), speed)
        masks[speed] = segment_kji(result, result.GetSegmentation().GetNthSegmentID(0), ct_scene.ct)
    assert masks["fast"].any()
    assert dice(masks["fast"], masks["exact"]) >= 0.999
    assert _script_module().main(["--volume", str(ct_sm_path), "--box-ras", "0", "0", "0", "1", "1", "1",
                                  "--output", str(tmp_path / "x.seg.nrrd"), "--speed", "turbo"]) == 2
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_the_installed_script_runs_from_the_installed_extension(tmp_path, ct_sm_path):
    """The script ships with the extension (CMake lists it) and runs from the installed tree
    alone: its own engine is used (not the repository's), bad input exits 1 with one line."""
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "Testing"))
    import slicer_replay

    install = slicer_replay.install_extension(tmp_path / "ext")
    script = install / "MedSAMBridgeLib" / "medsam_headless.py"
    assert script.is_file()
    probe = ("import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]; "
             "g = runpy.run_path(sys.argv[0]); g['_add_module_path'](); import MedSAMSlicerLib; "
             "print(MedSAMSlicerLib.__file__); sys.exit(g['main'](sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", probe, str(script), "--volume", str(tmp_path / "missing.nii.gz"),
                           "--box-ras", "0", "0", "0", "1", "1", "1", "--output", str(tmp_path / "o.seg.nrrd")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # bad input
    assert done.stdout.strip().startswith(str(install)), done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: volume file") and "not found" in lines[0], lines


def _box_ras(ct_scene, label, slab):
    lo, hi = label_box_ijk(ct_scene.label_array(label), slab)
    m = ijk_to_ras(ct_scene.ct)
    return [str(float(v)) for v in np.r_[(m @ np.r_[lo, 1])[:3], (m @ np.r_[hi, 1])[:3]]]


def test_script_makes_one_segment_from_several_boxes(shared_segmenter, ct_scene, ct_sm_path, tmp_path, capsys):
    """--box-ras given twice: one segment from both boxes (both kidneys as its pieces), the record
    holding both; boxes that do not go together end with exit code 2 and one line. In this process
    (shared model, cached embeddings)."""
    from MedSAMBridgeLib.headless import load_segmentation
    from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd
    from MedSAMSlicerLib.segmentation.provenance import Provenance

    out = tmp_path / "kidneys.seg.nrrd"
    argv = ["--volume", str(ct_sm_path), "--box-ras", *_box_ras(ct_scene, 2, (15, 17)), "--box-ras",
            *_box_ras(ct_scene, 3, (15, 17)), "--output", str(out), "--segment-name", "kidneys", "--device", "cpu",
            "--preset", "abdomen"]
    assert _script_module().main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.startswith("kidneys: ") and "2 boxes on slice(s) k=16" in printed, printed
    node = load_segmentation(str(out), "kidneys")
    mask = segment_kji(node, node.GetSegmentation().GetNthSegmentID(0), ct_scene.ct)
    for label in (2, 3):
        assert (mask[16] & ct_scene.label_array(label)[16]).any()
    segments = read_seg_nrrd(out).segments
    assert len(segments) == 1 and len(Provenance.from_tags(segments[0].tags).prompts) == 2

    bad = ["--volume", str(ct_sm_path), "--box-ras", *_box_ras(ct_scene, 2, (15, 17)), "--box-ras",
           *_box_ras(ct_scene, 3, (14, 18)), "--output", str(tmp_path / "bad.seg.nrrd")]
    assert _script_module().main(bad) == 2
    err = capsys.readouterr().err
    assert "box 1 of 2 and box 2 of 2 are 3D boxes of one structure over different slices" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "bad.seg.nrrd").exists()
