"""Doubtful slices (review.py) and the review report ``medsam-slicer segment`` writes beside its output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from MedSAMSlicerLib.cli import main, review_path, segment_file
from MedSAMSlicerLib.segmentation.propagation import PropagationResult, SliceRecord
from MedSAMSlicerLib.segmentation.review import DoubtRule, doubtful_slices, end_reasons, next_doubtful, review


def _result(records, locked=(5,)):
    """A result whose mask holds a square on every accepted record's slice."""
    mask = np.zeros((12, 16, 16), bool)
    for r in records:
        if r.accepted:
            mask[r.z, 4:10, 4:10] = True
    return PropagationResult(mask, None, {"up": "stopped at slice 9: empty mask (0 px)", "down": "reached the volume's edge"},
                             list(records), tuple(locked))


def test_doubt_rule_flags_and_orders_slices():
    rule = DoubtRule()
    fine = dict(score=0.9, agreement=0.97, overlap=0.99, intensity=120.0)
    records = [
        SliceRecord(5, 36, 0.9, True, "start", intensity=120.0),
        SliceRecord(6, 36, accepted=True, **fine),
        SliceRecord(2, 36, accepted=True, **fine),
        SliceRecord(7, 36, accepted=True, **{**fine, "agreement": rule.min_agreement - 0.1}),
        SliceRecord(4, 36, accepted=True, **{**fine, "score": rule.min_score - 0.05}),
        # Two signals: the most doubtful, whatever its predicted IoU.
        SliceRecord(3, 36, accepted=True, **{**fine, "score": rule.min_score - 0.01,
                                              "intensity": 120.0 + rule.max_intensity_shift + 5}),
        SliceRecord(9, 0, 0.2, False, "empty mask (0 px)"),  # rejected: not in the mask, not reviewed
    ]
    result = _result(records)
    # Two signals first; then one signal each, lowest predicted IoU first (slice 7's is 0.9).
    assert doubtful_slices(result, rule) == [3, 4, 7]
    by_z = {s.z: s for s in review(result, rule)}
    assert sorted(by_z) == [2, 3, 4, 5, 6, 7]
    assert not by_z[5].doubtful and by_z[5].locked and by_z[5].reason == "start"
    assert "narrow and wider box agree" in by_z[7].reason and "predicted IoU" in by_z[4].reason
    assert by_z[3].signals == 2 and "intensity" in by_z[3].reason
    assert not by_z[6].doubtful and by_z[6].signals == 0
    # The button: the most doubtful first, then on in that order, wrapping around.
    assert next_doubtful(result, None, rule) == 3
    assert next_doubtful(result, 3, rule) == 4
    assert next_doubtful(result, 7, rule) == 3
    assert end_reasons(result) == {"down": "reached the volume's edge", "up": "stopped at slice 9: empty mask (0 px)"}


def test_locked_and_unrecorded_slices_are_not_doubtful():
    records = [SliceRecord(5, 36, float("nan"), True, "accepted"), SliceRecord(6, 36, 0.1, True, "box")]
    result = _result(records, locked=(5, 6))
    result.mask[8, 1:3, 1:3] = True  # painted by hand: no record
    assert doubtful_slices(result) == []
    assert next_doubtful(result) is None
    by_z = {s.z: s for s in review(result)}
    assert by_z[8].reason == "no record" and math.isnan(by_z[8].score)


@pytest.fixture(scope="module")
def kidney_2d_box(kidney_box):
    """The kidney box on its middle slice only: a 2D box, so the extent is found automatically."""
    i0, j0, k0, i1, j1, k1 = kidney_box
    k = (k0 + k1) // 2
    return (i0, j0, k, i1, j1, k)


def test_segment_writes_the_review_beside_the_output(ct_path, kidney_2d_box, tmp_path, lite_segmenter):
    out = tmp_path / "kidney.seg.nrrd"
    summary = segment_file(str(ct_path), out, box_ijk=kidney_2d_box, name="kidney_left", segmenter=lite_segmenter,
                           progress=False)
    path = review_path(out)
    assert path == tmp_path / "kidney.review.json" and path.name in summary
    report = json.loads(path.read_text())
    assert report["segment"] == "kidney_left" and report["output"] == "kidney.seg.nrrd"
    assert report["slice_axis"] == "k"  # this CT's slices are its k index
    ks = [s["k"] for s in report["slices"]]
    assert ks == sorted(ks) and len(ks) > 10 and kidney_2d_box[2] in ks
    start = next(s for s in report["slices"] if s["k"] == kidney_2d_box[2])
    assert start["locked"] and start["reason"] == "start" and not start["doubtful"]
    assert all(0 < s["iou"] <= 1 and s["area"] > 0 for s in report["slices"])
    flagged = {s["k"] for s in report["slices"] if s["doubtful"]}
    assert set(report["doubtful"]) == flagged
    assert all(s["reason"] for s in report["slices"] if s["doubtful"])
    assert set(report["ends"]) == {"up", "down"}
    for end in report["ends"].values():
        assert end["reason"] and end["last"] in ks
        if end["stopped_at"] is not None:
            assert end["stopped_at"] not in ks

def test_existing_review_is_replaced_only_with_overwrite(ct_path, kidney_box, tmp_path, lite_segmenter, capsys):
    out = tmp_path / "kidney.nii.gz"
    path = review_path(out)
    path.write_text("precious")
    code = main(["segment", str(ct_path), "--box-ijk", *map(str, kidney_box), "-o", str(out)])
    assert code == 2 and "kidney.review.json' already exists" in capsys.readouterr().err
    assert path.read_text() == "precious" and not out.exists()
    segment_file(str(ct_path), out, box_ijk=kidney_box, segmenter=lite_segmenter, progress=False, overwrite=True)
    report = json.loads(path.read_text())
    assert report["output"] == "kidney.nii.gz"
    # A 3D box: the z-range ends the structure at both ends.
    assert [e["reason"] for e in report["ends"].values()] == ["reached the end of the z-range"] * 2
