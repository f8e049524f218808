"""Correct a 3D result and propagate again (corrections.py), on the real CT and weights.

Cheap: the liver within a few slices of its largest slice (the box ``test_segmenter`` and
``test_structures`` use), so the shared ``lite_segmenter`` cache holds most embeddings.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from MedSAMSlicerLib.demo import reference_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.progress import Cancelled, CancelToken
from MedSAMSlicerLib.segmentation.corrections import Correction, correct
from MedSAMSlicerLib.segmentation.preprocessing import Window
from MedSAMSlicerLib.segmentation.propagation import REJOIN_DICE, PropagationSettings, propagate

LIVER = 5


@pytest.fixture(scope="module")
def liver(ct_seg_path):
    return read_volume(ct_seg_path).array == LIVER


@pytest.fixture()
def seg(lite_segmenter, ct):
    lite_segmenter.set_volume(ct.array, Window.preset("abdomen"))
    return lite_segmenter


def _label_box(ref, z):
    ys, xs = np.nonzero(ref[z])
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


@pytest.fixture()
def first(seg, liver):
    """The liver from its box on its largest slice, within 4 slices of it (z-range)."""
    z, box = reference_box(liver)
    return seg.segment_3d(z, box, z_range=(z - 4, z + 4))


def test_one_box_on_an_empty_mask_is_propagate(seg, liver):
    """With nothing locked, a correction is a propagation: bit-identical masks and records."""
    z, box = reference_box(liver)
    alone = propagate(seg.predictor, z, box, z_range=(z - 2, z + 2))
    got = correct(seg.predictor, np.zeros(seg.shape, bool), [Correction.with_box(z, box)], z_range=(z - 2, z + 2))
    assert np.array_equal(got.mask, alone.mask)
    assert got.locked == alone.locked == (z,)
    assert [(r.z, r.area, r.score) for r in got.slices] == sorted((r.z, r.area, r.score) for r in alone.slices)
    assert set(got.stop_reasons) == {"up", "down"}


def test_box_correction_keeps_locked_and_outside_slices(seg, liver, first):
    z = first.locked[0]
    fix_z = z + 3
    box = _label_box(liver, fix_z)
    fixed = seg.correct(first, [Correction.with_box(fix_z, box)], z_range=(z - 4, z + 4))
    assert fixed.locked == (z, fix_z)
    # The locked slice and everything below it (outside the two spans next to the fix) are kept.
    assert np.array_equal(fixed.mask[: z + 1], first.mask[: z + 1])
    assert np.array_equal(fixed.mask[z + 5 :], first.mask[z + 5 :])
    # The corrected slice is the model's mask for the box; the input is not changed (undo).
    assert np.array_equal(fixed.mask[fix_z], seg.segment_slice(fix_z, box).mask)
    assert not np.array_equal(first.mask[fix_z], fixed.mask[fix_z])
    # Every slice of the z-range is recorded once, sorted; the fix says how it was made.
    assert [r.z for r in fixed.slices] == list(range(z - 4, z + 5))
    assert {r.z: r.reason for r in fixed.slices}[fix_z] == "box"
    assert "between" in " ".join(fixed.stop_reasons) and "down" in fixed.stop_reasons
    # Between two locked slices each slice comes from the more confident of the two passes.
    assert fixed.mask[z + 1 : fix_z].any(axis=(1, 2)).all()


def test_accepted_slice_is_kept_as_edited(seg, first):
    z = first.locked[0]
    edited = first.mask.copy()
    half = edited[z + 2].copy()
    half[:, : half.shape[1] // 2] = False  # the user erased the left half of slice z+2
    edited[z + 2] = half
    fixed = seg.correct(edited, [Correction.accept(z + 2)], locked=first.locked, z_range=(z - 4, z + 4))
    assert fixed.locked == (z, z + 2)
    assert np.array_equal(fixed.mask[z + 2], half)
    assert np.array_equal(fixed.mask[: z + 1], first.mask[: z + 1])
    record = {r.z: r for r in fixed.slices}[z + 2]
    assert record.reason == "accepted" and np.isnan(record.score) and record.area == int(half.sum())


def test_pass_that_rejoins_the_earlier_result_keeps_the_slices_beyond(seg, first):
    """A box on a slice the result already had right: the pass from it toward the z-range's end
    meets the earlier result at once and ends there; the slices beyond are the earlier ones, bit
    for bit, and their records are kept. Without the rule (rejoin=0) the pass runs to the end."""
    z = first.locked[0]
    fix_z = z + 2
    ys, xs = np.nonzero(first.mask[fix_z])
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    fixed = seg.correct(first, [Correction.with_box(fix_z, box)], z_range=(z - 4, z + 4))
    match = re.fullmatch(r"rejoined the earlier result at slice (\d+)", fixed.stop_reasons["up"])
    assert match, fixed.stop_reasons
    met = int(match.group(1))
    assert fix_z < met <= z + 4
    assert np.array_equal(fixed.mask[met + 1 :], first.mask[met + 1 :])
    earlier = {r.z: r for r in first.slices}
    assert all(r is earlier[r.z] for r in fixed.slices if r.z > met)
    assert [r.z for r in fixed.slices] == list(range(z - 4, z + 5))
    full = seg.correct(first, [Correction.with_box(fix_z, box)], z_range=(z - 4, z + 4),
                       settings=PropagationSettings(rejoin=0.0))
    assert full.stop_reasons["up"] == "reached the end of the z-range"


@pytest.mark.parametrize("rejoin", [REJOIN_DICE, 0.0])
def test_slice_locked_empty_ends_the_structure(seg, first, rejoin):
    """Erasing a slice and accepting it: nothing is propagated from it, so the slices beyond it
    (toward the z-range's end) are empty; the slices between it and the box keep the structure:
    as they were (the pass from the box rejoins the earlier result at once), or, without the
    rejoin rule, propagated again with the stop rule."""
    z = first.locked[0]
    erased = first.mask.copy()
    erased[z + 2] = False
    settings = PropagationSettings(rejoin=rejoin)
    fixed = seg.correct(erased, [Correction.accept(z + 2)], locked=first.locked, z_range=(z - 4, z + 4),
                        settings=settings)
    assert not fixed.mask[z + 2 :].any()
    assert fixed.mask[z + 1].any()
    assert fixed.z_extent == (z - 4, z + 1)
    reason = fixed.stop_reasons[f"between {z}..{z + 2}"]
    if rejoin:
        assert reason == f"rejoined the earlier result at slice {z + 1}"
        assert np.array_equal(fixed.mask[: z + 2], first.mask[: z + 2])
    else:
        assert reason.endswith("locked empty")


def test_two_boxes_propagate_between_them(seg, liver, first):
    """Boxes on two slices of one structure, on an empty mask: both locked, the slices between them
    filled from both ends, nothing outside the z-range."""
    z = first.locked[0]
    lo, hi = z - 3, z + 3
    fixes = [Correction.with_box(lo, _label_box(liver, lo)), Correction.with_box(hi, _label_box(liver, hi))]
    got = correct(seg.predictor, np.zeros(seg.shape, bool), fixes, z_range=(lo, hi))
    assert got.locked == (lo, hi)
    assert got.z_extent == (lo, hi)
    assert got.mask[lo : hi + 1].any(axis=(1, 2)).all()
    assert [r.z for r in got.slices] == list(range(lo, hi + 1))
    assert f"between {lo}..{hi}" in got.stop_reasons


def test_cancel_leaves_the_input(seg, liver, first):
    z = first.locked[0]
    token = CancelToken()
    token.cancel()
    before = first.mask.copy()
    with pytest.raises(Cancelled):
        seg.correct(first, [Correction.with_box(z + 3, _label_box(liver, z + 3))], cancel=token)
    assert np.array_equal(first.mask, before) and first.locked == (z,)


def test_bad_corrections(seg, first):
    z = first.locked[0]
    with pytest.raises(MedSAMError, match=r"mask has shape \(3, 4, 5\)"):
        seg.correct(np.zeros((3, 4, 5), bool), [Correction.accept(1)])
    with pytest.raises(MedSAMError, match="at least one correction"):
        seg.correct(first, [])
    with pytest.raises(MedSAMError, match=f"one correction per slice; slice {z + 1}"):
        seg.correct(first, [Correction.accept(z + 1), Correction.with_box(z + 1, (10, 10, 40, 40))])
    with pytest.raises(MedSAMError, match="slice"):
        seg.correct(first, [Correction.accept(500)])
    with pytest.raises(MedSAMError, match="outside the slice"):
        seg.correct(first, [Correction.with_box(z + 1, (500, 500, 600, 600))])
    with pytest.raises(MedSAMError, match="outside the z-range"):
        seg.correct(first, [Correction.accept(z - 6)], z_range=(z - 4, z + 4))
