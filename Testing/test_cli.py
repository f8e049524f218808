"""``medsam-slicer`` on real files: geometry variants, bad input, a real subprocess, the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSAMSlicerLib.cli import main, segment_file
from MedSAMSlicerLib.demo import run_demo
from MedSAMSlicerLib.fileio.orientation import AxialOrientation
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.metrics import dice

BIN = Path(sys.executable).parent


def _variants(src: sitk.Image):
    """The same voxels stored differently: flipped, permuted, identity direction, 10-degree oblique."""
    flipped = sitk.Flip(src, [True, False, True])
    permuted = sitk.PermuteAxes(src, [1, 0, 2])
    oblique = sitk.Image(src)
    a = np.deg2rad(10.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique.SetDirection(tuple((rot @ np.array(src.GetDirection()).reshape(3, 3)).ravel()))
    return {"flipped": flipped, "permuted": permuted, "oblique": oblique}


def test_same_segmentation_on_flipped_permuted_and_oblique_volumes(tmp_path, ct_path, kidney_box, lite_segmenter):
    src = sitk.ReadImage(str(ct_path))
    base_out = tmp_path / "base.nii.gz"
    segment_file(str(ct_path), base_out, box_ijk=kidney_box, segmenter=lite_segmenter, progress=False)
    base = sitk.ReadImage(str(base_out))
    base_canonical = AxialOrientation.from_image(base).to_canonical(sitk.GetArrayFromImage(base)).astype(bool)
    assert base_canonical.sum() > 500
    for name, image in _variants(src).items():
        path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(image, str(path))
        vol = read_volume(path)
        # The box: the same voxels, expressed in this file's own indices.
        corners = [image.TransformPhysicalPointToIndex(src.TransformIndexToPhysicalPoint(c))
                   for c in (kidney_box[:3], kidney_box[3:])] if name != "oblique" else [kidney_box[:3], kidney_box[3:]]
        out = tmp_path / f"{name}_seg.nii.gz"
        segment_file(str(path), out, box_ijk=[*corners[0], *corners[1]], segmenter=lite_segmenter, progress=False)
        result = sitk.ReadImage(str(out))
        assert result.GetSize() == image.GetSize()
        assert np.allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
        assert np.allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-4)
        canonical = vol.orientation.to_canonical(sitk.GetArrayFromImage(result)).astype(bool)
        assert dice(canonical, base_canonical) >= 0.98, name
        if name != "oblique":
            # On the right voxels: resampling the variant's result onto the original grid gives
            # back the original result (nearest neighbour, identical physical grid points).
            back = sitk.Resample(result, base, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            assert dice(sitk.GetArrayFromImage(back).astype(bool), sitk.GetArrayFromImage(base).astype(bool)) >= 0.98


def _write(path: Path, array: np.ndarray, **kw) -> Path:
    img = sitk.GetImageFromArray(array, **kw)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, ct_path):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.nii.gz").write_text("this is not an image")
    _write(d / "flat.nii.gz", np.zeros((40, 50), np.int16))
    _write(d / "movie.nii.gz", np.zeros((3, 10, 20, 30), np.int16))
    torch.save({"not": "a model"}, d / "junk.pth")
    return d


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist|not found|No such"),
        ("notes", "not an image|could not read|cannot read"),
        ("flat", "2D"),
        ("movie", "4D|frames|components|time"),
        ("outside", "outside"),
        ("zero", r"single voxel wide \(i0=30 and i1=30\)"),
        ("slice", "out of range|outside"),
        ("model", "(?i)unknown model"),
        ("device", "unknown device"),
        ("checkpoint", "(?i)checkpoint|not a|missing"),
    ],
)
def test_bad_input_gives_a_clear_error_and_writes_nothing(case, match, bad_inputs, ct_path, tmp_path, capsys):
    out = tmp_path / "out.seg.nrrd"
    volume, box = str(ct_path), ["30", "20", "80", "60", "60", "80"]
    extra = []
    if case in ("missing", "notes", "flat", "movie"):
        volume = str(bad_inputs / ("nothing.nii.gz" if case == "missing" else f"{case}.nii.gz"))
    elif case == "outside":
        box = ["500", "500", "80", "600", "600", "80"]
    elif case == "zero":
        box = ["30", "20", "80", "30", "60", "80"]
    elif case == "slice":
        box = ["30", "20", "400", "60", "60", "400"]
    elif case == "model":
        extra = ["--model", "medsam3"]
    elif case == "device":
        extra = ["--device", "quantum"]
    elif case == "checkpoint":
        extra = ["--checkpoint", str(bad_inputs / "junk.pth")]
    code, err = _cli(["segment", volume, "--box-ijk", *box, "-o", str(out), *extra], capsys)
    assert code == 2
    assert "error:" in err
    assert re.search(match, err), err
    assert not out.exists()
    assert not any(p.name.startswith(".") or p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_checkpoint_for_the_other_model_is_refused(ct_path, tmp_path, capsys):
    from MedSAMSlicerLib.models.registry import get_spec, resolve_weights

    lite = resolve_weights(get_spec("litemedsam"))
    out = tmp_path / "x.nii.gz"
    code, err = _cli(["segment", str(ct_path), "--box-ijk", "30", "20", "80", "60", "60", "80", "-o", str(out),
                      "--model", "medsam", "--checkpoint", str(lite)], capsys)
    assert code == 2 and "LiteMedSAM" in err and not out.exists()


def test_existing_output_is_not_replaced(ct_path, tmp_path, capsys):
    out = tmp_path / "keep.nii.gz"
    out.write_bytes(b"precious")
    code, err = _cli(["segment", str(ct_path), "--box-ijk", "30", "20", "80", "60", "60", "80", "-o", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert out.read_bytes() == b"precious"


def test_help_is_for_newcomers():
    res = subprocess.run([str(BIN / "medsam-slicer"), "segment", "--help"], capture_output=True, text=True, check=True)
    for word in ("--box-ijk", "--box-ras", ".seg.nrrd", "--model", "--device", "--preset", "--window", "--name"):
        assert word in res.stdout
    res = subprocess.run([str(BIN / "medsam-slicer"), "--help"], capture_output=True, text=True, check=True)
    assert "demo" in res.stdout and "examples" in res.stdout


def test_segment_as_a_real_subprocess(ct_path, kidney_box, tmp_path):
    import slicerio

    out = tmp_path / "kidney.seg.nrrd"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run(
        [str(BIN / "medsam-slicer"), "segment", str(ct_path), "--box-ijk", *map(str, kidney_box), "-o", str(out),
         "--name", "kidney_left", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "kidney_left:" in res.stdout
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["kidney_left"]


def test_box_ras_matches_box_ijk(ct_path, kidney_box, tmp_path, lite_segmenter):
    img = sitk.ReadImage(str(ct_path))
    lps = [np.array(img.TransformIndexToPhysicalPoint(c)) for c in (kidney_box[:3], kidney_box[3:])]
    ras = [p * np.array([-1, -1, 1]) for p in lps]
    a = tmp_path / "ijk.nii.gz"
    b = tmp_path / "ras.nii.gz"
    segment_file(str(ct_path), a, box_ijk=kidney_box, segmenter=lite_segmenter, progress=False)
    segment_file(str(ct_path), b, box_ras=[*ras[0], *ras[1]], segmenter=lite_segmenter, progress=False)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a))), sitk.GetArrayFromImage(sitk.ReadImage(str(b))))


def test_demo_writes_segmentation_figure_and_dice(tmp_path, lite_segmenter, capsys):
    import slicerio

    rows = run_demo(tmp_path, structures={"kidney_left": 3}, segmenter=lite_segmenter)
    printed = capsys.readouterr().out
    assert "kidney_left" in printed and "Dice" in printed
    assert rows[0].dice >= 0.85
    seg = slicerio.read_segmentation(str(tmp_path / "demo.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["kidney_left"]
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
