"""``medsam-slicer segment`` with several named structures, the record of how each segment was made,
and ``--replay``, on the shipped CT with the real LiteMedSAM weights.

Kept cheap: liver and spleen with 5-slice z-ranges around their largest slices (the boxes of
``test_structures``), so the shared ``lite_segmenter`` cache already holds most embeddings.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from MedSAMSlicerLib.cli import main
from MedSAMSlicerLib.demo import reference_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd, write_seg_nrrd
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.models.registry import file_digest
from MedSAMSlicerLib.segment_command import NamedBox, read_prompts_file, replay_file, segment_file
from MedSAMSlicerLib.segmentation.provenance import PREFIX, Provenance

LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def named_boxes(ct, ct_seg_path):
    """Liver and spleen: 3D boxes (file indices) of 5 slices around each label's largest slice."""
    labels = read_volume(ct_seg_path).array
    out = []
    for name, value in (("liver", LIVER), ("spleen", SPLEEN)):
        z, (x0, y0, x1, y1) = reference_box(labels == value)
        a = ct.orientation.canonical_to_ijk((x0, y0, z - 2))
        b = ct.orientation.canonical_to_ijk((x1, y1, z + 2))
        out.append(NamedBox(name, "ijk", (*a, *b), None, f"box {len(out) + 1} ('{name}', --box-ijk)"))
    return out


def _canonical_masks(path, ct):
    seg = read_seg_nrrd(path)
    return seg, {s.name: ct.orientation.to_canonical(seg.mask_kji(s)) for s in seg.segments}


def test_several_structures_one_file_with_records_and_replay(lite_segmenter, ct, ct_path, ct_sm_path, named_boxes,
                                                             tmp_path):
    """Two named boxes -> one .seg.nrrd, one segment each, the masks of one segment_structures job,
    each segment's record in its tags; the same job as a labelmap (one value per structure); a replay
    gives identical masks, and a replay on another volume or with other weights is refused."""
    out = tmp_path / "organs.seg.nrrd"
    summary = segment_file(str(ct_path), out, prompts=named_boxes, segmenter=lite_segmenter, progress=False)
    assert "2 structures as one job" in summary and summary.startswith("liver: ")
    seg, masks = _canonical_masks(out, ct)
    assert [s.name for s in seg.segments] == ["liver", "spleen"]

    # Each structure on its box's slices only (the z-range bounds it); overlaps settled.
    for spec in named_boxes:
        k0, k1 = sorted((int(spec.values[2]), int(spec.values[5])))
        zs = sorted(ct.orientation.ijk_to_canonical((0, 0, k))[2] for k in (k0, k1))
        found = np.flatnonzero(masks[spec.name].any(axis=(1, 2)))
        assert found.size and zs[0] <= found[0] and found[-1] <= zs[1], spec.name
    assert not (masks["liver"] & masks["spleen"]).any()

    # The record: prompts in RAS (the voxel box's first and last voxel centres), model, weights, window...
    for entry, spec in zip(seg.segments, named_boxes):
        record = Provenance.from_tags(entry.tags)
        assert record.model == "litemedsam" and record.speed == "exact" and record.precision == "float32"
        assert record.weights_sha256 == file_digest(lite_segmenter.weights)
        assert record.window == {"level": 40.0, "width": 400.0}
        assert record.mode == "3d" and record.direction == "both" and record.corrections == []
        assert record.job["structures"] == ["liver", "spleen"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record.date)
        ijk = np.array([spec.values[:3], spec.values[3:]], dtype=float)
        lps = np.array([ct.image.TransformContinuousIndexToPhysicalPoint(p) for p in ijk.tolist()])
        np.testing.assert_allclose(record.prompts[0]["ras"], lps * [-1, -1, 1], atol=1e-6)
        assert all("|" not in v and "\n" not in v for v in entry.tags.values())
        assert set(entry.tags) >= {PREFIX + k for k in ("Prompts", "Model", "WeightsSHA256", "Window", "Speed",
                                                         "Version", "Date", "Corrections")}

    # Replay, written as a labelmap (value n for the n-th structure, said in the summary): the same masks.
    again = tmp_path / "again.nii.gz"
    summary = replay_file(str(out), str(ct_path), again, segmenter=lite_segmenter, progress=False)
    assert summary.count("the same mask as in the file") == 2, summary
    assert "labels: 1 liver, 2 spleen" in summary
    values = read_volume(again, labels=True).array
    np.testing.assert_array_equal(values == 1, masks["liver"])
    np.testing.assert_array_equal(values == 2, masks["spleen"])

    # Another volume, or other weights: refused before anything is written.
    with pytest.raises(MedSAMError, match="made from another volume"):
        replay_file(str(out), str(ct_sm_path), tmp_path / "x.seg.nrrd", segmenter=lite_segmenter, progress=False)
    tampered = tmp_path / "tampered.seg.nrrd"
    segments = [(s.name, masks[s.name], s.color, {**s.tags, PREFIX + "WeightsSHA256": "0" * 64})
                for s in seg.segments]
    write_seg_nrrd(segments, ct, tampered)
    with pytest.raises(MedSAMError, match="made with other weights.*--checkpoint"):
        replay_file(str(tampered), str(ct_path), tmp_path / "y.seg.nrrd", segmenter=lite_segmenter, progress=False)
    assert not (tmp_path / "x.seg.nrrd").exists() and not (tmp_path / "y.seg.nrrd").exists()


def test_one_structure_replays_through_the_single_path(lite_segmenter, ct, ct_path, named_boxes, tmp_path):
    """One box: the same path as before (its summary line), a record, and a replay with the same mask."""
    out = tmp_path / "liver.seg.nrrd"
    spec = named_boxes[0]
    summary = segment_file(str(ct_path), out, box_ijk=spec.values, name="liver", segmenter=lite_segmenter,
                           progress=False)
    assert summary.startswith("liver: ") and "3D box, slices k " in summary and "\n" not in summary
    seg, masks = _canonical_masks(out, ct)
    assert Provenance.from_tags(seg.segments[0].tags).job["structures"] == ["liver"]
    summary = replay_file(str(out), str(ct_path), tmp_path / "again.seg.nrrd", segmenter=lite_segmenter,
                          progress=False)
    assert "the same mask as in the file" in summary
    again, replayed = _canonical_masks(tmp_path / "again.seg.nrrd", ct)
    np.testing.assert_array_equal(replayed["liver"], masks["liver"])
    assert again.segments[0].color == seg.segments[0].color
    assert Provenance.from_tags(again.segments[0].tags).prompts == Provenance.from_tags(seg.segments[0].tags).prompts


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_prompt_errors_name_the_prompt(ct, ct_path, named_boxes, tmp_path, capsys):
    """Errors (before any model loads) name the prompt in the user's terms; nothing is written."""
    out = tmp_path / "o.seg.nrrd"
    liver = [str(int(v)) for v in named_boxes[0].values]
    ni, nj, _ = ct.orientation.shape_ijk
    outside = ["1", "1", "5", str(ni + 10), str(nj + 10), "5"]
    outside[0] = str(ni + 5)
    code, err = _cli(["segment", str(ct_path), "--box-ijk", *liver, "--name", "liver", "--box-ijk", *outside,
                      "--name", "spleen", "-o", str(out)], capsys)
    assert code == 2 and "box 2 ('spleen', --box-ijk): Box index i0=" in err, err
    code, err = _cli(["segment", str(ct_path), "--box-ijk", *liver, "--box-ijk", *liver, "--name", "a", "-o",
                      str(out)], capsys)
    assert code == 2 and "one --name per box" in err and "2 boxes and 1 names" in err
    # The same name twice is one structure (issue 23: its pieces or key slices); the same box twice is refused.
    code, err = _cli(["segment", str(ct_path), "--box-ijk", *liver, "--name", "a", "--box-ijk", *liver, "--name",
                      "a", "-o", str(out)], capsys)
    assert code == 2 and "box 1 ('a', --box-ijk) and box 2 ('a', --box-ijk) are the same box" in err
    code, err = _cli(["segment", str(ct_path), "--box-ijk", *liver, "--name", "a", "--box-ijk", *liver, "--name",
                      "a ", "-o", str(out)], capsys)
    assert code == 2 and "two structures are named 'a'" in err
    code, err = _cli(["segment", str(ct_path), "--box-ijk", *liver, "--name", "a", "--box-ijk", *liver, "--name",
                      "b", "--slice-only", "-o", str(out)], capsys)
    assert code == 2 and "--slice-only works on one structure" in err
    code, err = _cli(["segment", str(ct_path), "--replay", str(out), "--box-ijk", *liver, "-o", str(out)], capsys)
    assert code == 2 and "--replay takes its boxes" in err
    code, err = _cli(["segment", str(ct_path), "--replay", str(ct_path), "-o", str(out)], capsys)
    assert code == 2 and "has no segments" in err
    code, err = _cli(["segment", str(ct_path), "-o", str(out)], capsys)
    assert code == 2 and "give a box" in err

    # A prompts file: read in order, with colours; a bad entry is named by its position and name.
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps({"structure": [
        {"name": "liver", "box_ijk": [float(v) for v in named_boxes[0].values], "color": [0.9, 0.5, 0.4]},
        {"name": "spleen", "box_ras": [-50, 10, -300, 20, 80, -250]}]}))
    read = read_prompts_file(good)
    assert [(p.name, p.kind, p.color) for p in read] == [("liver", "ijk", (0.9, 0.5, 0.4)), ("spleen", "ras", None)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "liver", "box_ijk": [1, 2, 3]}]))
    code, err = _cli(["segment", str(ct_path), "--prompts", str(bad), "-o", str(out)], capsys)
    assert code == 2 and ("bad.json': structure 1 ('liver'), box_ijk: must be six whole numbers I0 J0 K0 I1 J1 K1 "
                          "(voxel indices); got [1, 2, 3]") in err
    bad.write_text(json.dumps([{"name": "liver", "box_ijk": [1, 2, 3, 4, 5, 6], "box_ras": [1, 2, 3, 4, 5, 6]}]))
    code, err = _cli(["segment", str(ct_path), "--prompts", str(bad), "-o", str(out)], capsys)
    assert code == 2 and "exactly one of box_ijk or box_ras" in err
    assert not out.exists()
