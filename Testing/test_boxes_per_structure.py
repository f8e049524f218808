"""One structure from several boxes at the command line (issue 23): boxes given the same ``--name``
(or several entries of one name in a ``--prompts`` file) are one structure, its pieces on one slice
or its key slices; the record keeps every box and ``--replay`` re-runs them, corrections with a box
per piece included. On the shipped CT with the real LiteMedSAM weights.

Kept cheap: the boxes are those of ``test_pieces_and_key_slices`` (both kidneys on their common
largest slice, the left kidney around its middle, z-ranges of a few slices), so the shared
``lite_segmenter`` cache holds their embeddings; the refusals run before any model loads (a
tripwire checkpoint: an empty file that would fail to load).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.cli import main
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.evaluation.runner import label_box
from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd, write_seg_nrrd
from MedSAMSlicerLib.segment_command import pair_boxes, read_prompts_file, replay_file, segment_file
from MedSAMSlicerLib.segmentation.preprocessing import Window
from MedSAMSlicerLib.segmentation.provenance import Provenance, new_job, prompt_ras, volume_sha256
from MedSAMSlicerLib.segmentation.results import Correction

KIDNEY_RIGHT, KIDNEY_LEFT = 2, 3


def _ijk(ct, box, z0, z1=None):
    """A canonical box ``(x0, y0, x1, y1)`` over slices ``z0..z1`` as the six file indices a user types."""
    z1 = z0 if z1 is None else z1
    a = ct.orientation.canonical_to_ijk((box[0], box[1], z0))
    b = ct.orientation.canonical_to_ijk((box[2], box[3], z1))
    return tuple(float(v) for v in (*a, *b))


def _masks(path, ct):
    seg = read_seg_nrrd(path)
    return seg, {s.name: ct.orientation.to_canonical(seg.mask_kji(s)) for s in seg.segments}


@pytest.fixture(scope="module")
def kidneys(labels):
    """Both kidneys on the slice where both are largest together: ``(z, [box per piece])``, and the
    largest other structure there (the liver) as ``(label, box)``."""
    ref = np.isin(labels, [KIDNEY_RIGHT, KIDNEY_LEFT])
    both = (labels == KIDNEY_RIGHT).any(axis=(1, 2)) & (labels == KIDNEY_LEFT).any(axis=(1, 2))
    z = int(np.argmax(np.where(both, ref.sum(axis=(1, 2)), 0)))
    pieces, n = ndi.label(ref[z], structure=np.ones((3, 3), bool))
    assert n == 2
    values, counts = np.unique(labels[z][~np.isin(labels[z], [0, KIDNEY_RIGHT, KIDNEY_LEFT])], return_counts=True)
    other = int(values[np.argmax(counts)])
    return z, [label_box(pieces == i) for i in (1, 2)], label_box(labels[z] == other)


@pytest.fixture()
def segmenter(lite_segmenter, ct):
    lite_segmenter.set_volume(ct.array, Window.preset("abdomen"))  # what segment_file's automatic window is
    return lite_segmenter


def test_boxes_of_one_name_are_the_pieces_of_one_structure(segmenter, ct, ct_path, kidneys, tmp_path):
    """``--box-ijk A --name kidneys --box-ijk B --name kidneys --box-ijk C --name liver``: two segments,
    the kidneys from both boxes as one structure's pieces in a job with the liver (exactly
    ``Segmenter.segment_structures`` with the list), both boxes in the record, and ``--replay`` gives
    the same masks."""
    z, boxes, liver = kidneys
    given = [("ijk", _ijk(ct, boxes[0], z - 1, z + 1)), ("ijk", _ijk(ct, boxes[1], z - 1, z + 1)),
             ("ijk", _ijk(ct, liver, z - 1, z + 1))]
    out = tmp_path / "pieces.seg.nrrd"
    summary = segment_file(str(ct_path), out, prompts=pair_boxes(given, ["kidneys", "kidneys", "liver"]),
                           segmenter=segmenter, progress=False)
    seg, masks = _masks(out, ct)
    assert [s.name for s in seg.segments] == ["kidneys", "liver"]
    lines = summary.splitlines()
    k = ct.orientation.slice_to_index(z)[1]
    assert lines[0].startswith("kidneys: ") and f"2 pieces on k={k}" in lines[0], summary
    assert "2 structures as one job" in lines[-1]

    zr = (z - 1, z + 1)
    job = segmenter.segment_structures({"kidneys": [BoxPrompt(z, b, zr) for b in boxes], "liver": BoxPrompt(z, liver, zr)})
    np.testing.assert_array_equal(masks["kidneys"], job.results["kidneys"].mask)
    np.testing.assert_array_equal(masks["liver"], job.results["liver"].mask)
    assert (ndi.label(masks["kidneys"][z])[1]) >= 2  # one segment, both pieces

    record = Provenance.from_tags(seg.segments[0].tags)
    assert len(record.prompts) == 2 and record.job["structures"] == ["kidneys", "liver"]
    for entry, (_, values) in zip(record.prompts, given):
        ijk = np.array([values[:3], values[3:]], dtype=float)
        lps = np.array([ct.image.TransformContinuousIndexToPhysicalPoint(p) for p in ijk.tolist()])
        np.testing.assert_allclose(entry["ras"], lps * [-1, -1, 1], atol=1e-6)

    again = tmp_path / "again.seg.nrrd"
    summary = replay_file(str(out), str(ct_path), again, segmenter=segmenter, progress=False)
    assert summary.count("the same mask as in the file") == 2, summary
    assert Provenance.from_tags(read_seg_nrrd(again).segments[0].tags).prompts == record.prompts


def test_key_slices_in_a_3d_box_run_alone_beside_a_job(segmenter, ct, ct_path, labels, kidneys, tmp_path):
    """The left kidney from a 3D box (its z-range) and two flat boxes inside it (key slices), named
    alike in a ``--prompts`` file, beside the liver: the kidney is ``Segmenter.segment_boxes`` on its
    own (flat boxes with the 3D box's range), the liver as alone, the summary says the kidney's
    overlaps are not settled; the record keeps the flat boxes flat and ``--replay`` re-runs both
    jobs to the same masks. A labelmap output is refused for such a run."""
    ref = labels == KIDNEY_LEFT
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2])
    a, b = mid - 3, mid + 3
    z, _, liver = kidneys
    entries = [{"name": "kidney", "box_ijk": list(_ijk(ct, label_box(ref[mid]), a - 1, b + 1))},
               {"name": "liver", "box_ijk": list(_ijk(ct, liver, z - 1, z + 1)), "color": [0.9, 0.5, 0.4]},
               {"name": "kidney", "box_ijk": list(_ijk(ct, label_box(ref[a]), a))},
               {"name": "kidney", "box_ijk": list(_ijk(ct, label_box(ref[b]), b)), "color": [0.2, 0.8, 0.2]}]
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(entries))
    prompts = read_prompts_file(prompts_file)

    refused = tmp_path / "labels.nii.gz"
    with pytest.raises(MedSAMError, match="'kidney' has boxes on several slices .key slices.*Write a .seg.nrrd"):
        segment_file(str(ct_path), refused, prompts=prompts, segmenter=segmenter, progress=False)
    assert not refused.exists()

    out = tmp_path / "keys.seg.nrrd"
    summary = segment_file(str(ct_path), out, prompts=prompts, segmenter=segmenter, progress=False)
    seg, masks = _masks(out, ct)
    assert [s.name for s in seg.segments] == ["kidney", "liver"]
    assert [s.color for s in seg.segments] == [(0.2, 0.8, 0.2), (0.9, 0.5, 0.4)]
    name = lambda zz: f"k={ct.orientation.slice_to_index(zz)[1]}"  # noqa: E731
    first = summary.splitlines()[0]
    assert all(name(zz) in first for zz in (a, mid, b)) and "key slices" in first, summary
    assert "segmented on its own (key slices)" in first and "2 structures in 2 jobs" in summary

    rng = (a - 1, b + 1)
    alone = segmenter.segment_boxes([BoxPrompt(mid, label_box(ref[mid]), rng), BoxPrompt(a, label_box(ref[a]), rng),
                                     BoxPrompt(b, label_box(ref[b]), rng)])
    np.testing.assert_array_equal(masks["kidney"], alone.mask)
    assert alone.locked == (a, mid, b)
    np.testing.assert_array_equal(masks["liver"], segmenter.segment(BoxPrompt(z, liver, (z - 1, z + 1))).mask)

    records = {s.name: Provenance.from_tags(s.tags) for s in seg.segments}
    assert records["kidney"].job["structures"] == ["kidney"] and records["liver"].job["structures"] == ["liver"]
    flat = [p["ras"] for p in records["kidney"].prompts[1:]]
    assert len(records["kidney"].prompts) == 3 and all(abs(c[0][2] - c[1][2]) < 1e-6 for c in flat)

    summary = replay_file(str(out), str(ct_path), tmp_path / "again.seg.nrrd", segmenter=segmenter, progress=False)
    assert summary.count("the same mask as in the file") == 2, summary


def test_a_replayed_correction_uses_a_box_per_piece(segmenter, ct, ct_path, labels, kidneys, tmp_path):
    """A record whose box correction has a box per piece (``"more"``) replays through
    ``Correction.with_boxes`` to the same mask; the same record without ``more`` gives another mask,
    so the pieces' boxes were used."""
    z, boxes, _ = kidneys
    zr = (z - 2, z + 2)
    start = BoxPrompt(z, boxes[0], zr)  # one kidney: a 3D box's 2D box is on its middle slice
    both = np.isin(labels, [KIDNEY_RIGHT, KIDNEY_LEFT])[z + 2]
    found, n = ndi.label(both, structure=np.ones((3, 3), bool))
    assert n == 2
    fix = [label_box(found == i) for i in (1, 2)]  # both kidneys on the range's top slice
    first = segmenter.segment_3d(start.z, start.box, z_range=zr)
    fixed = segmenter.correct(first, [Correction.with_boxes(z + 2, fix)], locked=first.locked, z_range=zr)
    correction = {"kind": "box", "ras": prompt_ras(ct, BoxPrompt(z + 2, fix[0])),
                  "more": [prompt_ras(ct, BoxPrompt(z + 2, fix[1]))]}
    record = Provenance.of(segmenter, [prompt_ras(ct, start)], "3d", "both", new_job(["kidneys"]),
                           volume_sha256(ct.array)).with_corrections([correction])
    out = tmp_path / "corrected.seg.nrrd"
    write_seg_nrrd([("kidneys", fixed.mask, (0.5, 0.5, 0.5), record.tags())], ct, out)
    assert Provenance.from_tags(read_seg_nrrd(out).segments[0].tags).corrections[0]["more"] == correction["more"]
    summary = replay_file(str(out), str(ct_path), tmp_path / "again.seg.nrrd", segmenter=segmenter, progress=False)
    assert "1 correction(s) replayed); the same mask as in the file" in summary, summary

    one_box = {k: v for k, v in correction.items() if k != "more"}
    without = tmp_path / "without.seg.nrrd"
    record = dataclasses.replace(record, corrections=[one_box])
    write_seg_nrrd([("kidneys", fixed.mask, (0.5, 0.5, 0.5), record.tags())], ct, without)
    summary = replay_file(str(without), str(ct_path), tmp_path / "x.seg.nrrd", segmenter=segmenter, progress=False)
    assert "voxels differ from the file's mask" in summary, summary


def _refused(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_boxes_of_one_structure_are_checked_together_before_the_model(ct, ct_path, kidneys, tmp_path, capsys):
    """Every refusal names the user's boxes as given, in one line, exit 2, before any model loads
    (the checkpoint is an empty file) and with nothing written."""
    z, boxes, liver = kidneys
    tripwire = tmp_path / "tripwire.pth"
    tripwire.write_bytes(b"")
    out = tmp_path / "o.seg.nrrd"
    k = lambda zz: ct.orientation.slice_to_index(zz)[1]  # noqa: E731
    run = ["segment", ct_path, "-o", out, "--checkpoint", tripwire]

    def box(b, z0, z1=None):
        return ["--box-ijk", *(f"{v:g}" for v in _ijk(ct, b, z0, z1))]

    code, err = _refused(run + box(boxes[0], z - 1, z + 1) + ["--name", "k"] + box(boxes[1], z - 2, z + 2)
                         + ["--name", "k"], capsys)
    assert code == 2 and ("box 1 ('k', --box-ijk) and box 2 ('k', --box-ijk) are 3D boxes of one structure over "
                          "different slices") in err, err
    assert f"k {min(k(z - 1), k(z + 1))}..{max(k(z - 1), k(z + 1))}" in err and err.count("\n") == 1
    code, err = _refused(run + box(boxes[0], z - 1, z + 1) + ["--name", "k"] + box(boxes[1], z + 4) + ["--name", "k"],
                         capsys)
    assert code == 2 and f"box 2 ('k', --box-ijk) (a flat box on k={k(z + 4)}) lies outside the slices of box 1" in err
    code, err = _refused(run + box(boxes[0], z) + ["--name", "k"] + box(boxes[0], z) + ["--name", "k"], capsys)
    assert code == 2 and "box 1 ('k', --box-ijk) and box 2 ('k', --box-ijk) are the same box" in err
    code, err = _refused(run + box(boxes[0], z) + ["--name", "k"] + box(boxes[1], z) + ["--name", "k", "--slice-only"],
                         capsys)
    assert code == 2 and "--slice-only works on one box; 'k' has 2" in err
    code, err = _refused(run + box(boxes[0], z) + ["--name", "k"] + box(boxes[1], z) + ["--name", "k", "--direction",
                                                                                        "up"], capsys)
    assert code == 2 and "--direction works on one box; 'k' has 2" in err
    code, err = _refused(["segment", ct_path, "-o", out, "--server", "http://127.0.0.1:9"] + box(boxes[0], z)
                         + ["--name", "k"] + box(boxes[1], z) + ["--name", "k"], capsys)  # nothing listens there
    assert code == 2 and "'k' has 2 boxes" in err and "the server (--server) takes one box per structure" in err
    # Same name once spaces are collapsed, spelled differently: still two structures, refused.
    code, err = _refused(run + box(boxes[0], z) + ["--name", "kidney"] + box(boxes[1], z) + ["--name", "kidney "],
                         capsys)
    assert code == 2 and "two structures are named 'kidney'" in err and "'kidney '" in err
    # Key slices beside another structure: the labelmap cannot hold their unsettled overlaps.
    code, err = _refused(["segment", ct_path, "-o", tmp_path / "o.nii.gz", "--checkpoint", tripwire]
                         + box(boxes[0], z) + ["--name", "k"] + box(boxes[0], z + 2) + ["--name", "k"]
                         + box(liver, z) + ["--name", "liver"], capsys)
    assert code == 2 and "'k' has boxes on several slices (key slices)" in err
    colours = tmp_path / "colours.json"
    colours.write_text(json.dumps([{"name": "k", "box_ijk": list(_ijk(ct, boxes[0], z)), "color": [1, 0, 0]},
                                   {"name": "k", "box_ijk": list(_ijk(ct, boxes[1], z)), "color": [0, 1, 0]}]))
    code, err = _refused(run + ["--prompts", colours], capsys)
    assert code == 2 and "structure 1 ('k')" in err and "structure 2 ('k')" in err and "two colours" in err
    assert not out.exists() and not (tmp_path / "o.nii.gz").exists()


def test_the_command_refuses_in_one_line_as_a_process(ct, ct_path, kidneys, tmp_path):
    """The real ``medsam-slicer`` process: two 3D boxes of one name over different slices end with
    exit code 2 and one line naming both boxes, no traceback."""
    z, boxes, _ = kidneys
    args = ["segment", str(ct_path), "-o", str(tmp_path / "o.seg.nrrd")]
    for name, zz in (("vessels", z - 1), ("vessels", z - 2)):
        args += ["--box-ijk", *(f"{v:g}" for v in _ijk(ct, boxes[0], zz, z + 1)), "--name", name]
    done = subprocess.run([str(Path(sys.executable).parent / "medsam-slicer"), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "box 1 ('vessels', --box-ijk) and box 2 ('vessels', --box-ijk) are 3D boxes of one structure" in done.stderr
    assert not (tmp_path / "o.seg.nrrd").exists()
