"""One structure from several boxes (issue 23): pieces on one slice, key slices on several, and
corrections with a box per piece, on the real CT and LiteMedSAM weights.

Kept cheap: z-ranges of a few slices around the liver's and the kidneys' largest slices, which the
shared ``lite_segmenter`` cache already holds from other tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.evaluation.runner import label_box
from MedSAMSlicerLib.metrics import dice
from MedSAMSlicerLib.segmentation.corrections import correct
from MedSAMSlicerLib.segmentation.preprocessing import Window
from MedSAMSlicerLib.segmentation.propagation import PropagationSettings, clip_box, propagate
from MedSAMSlicerLib.segmentation.results import Correction
from MedSAMSlicerLib.segmentation.structures import segment_boxes, segment_structures

KIDNEY_RIGHT, KIDNEY_LEFT = 2, 3


@pytest.fixture()
def predictor(lite_segmenter, ct):
    lite_segmenter.set_volume(ct.array, Window.preset("abdomen"))
    return lite_segmenter.predictor


@pytest.fixture(scope="module")
def kidneys(labels):
    """Both kidneys as one structure in two pieces: ``(mask, z, [box per piece])`` on the slice
    where both are largest together."""
    ref = np.isin(labels, [KIDNEY_RIGHT, KIDNEY_LEFT])
    both = (labels == KIDNEY_RIGHT).any(axis=(1, 2)) & (labels == KIDNEY_LEFT).any(axis=(1, 2))
    z = int(np.argmax(np.where(both, ref.sum(axis=(1, 2)), 0)))
    pieces, n = ndi.label(ref[z], structure=np.ones((3, 3), bool))
    assert n == 2
    return ref, z, [label_box(pieces == i) for i in (1, 2)]


def test_one_box_is_propagate_itself(predictor, kidneys):
    """A structure with one box is exactly the one-box propagation (nothing changes for it)."""
    _, z, boxes = kidneys
    prompt = BoxPrompt(z, boxes[0], (z - 2, z + 2))
    got = segment_boxes(predictor, [prompt])
    alone = propagate(predictor, z, boxes[0], z_range=prompt.z_range)
    assert np.array_equal(got.mask, alone.mask) and got.locked == alone.locked == (z,)


def test_pieces_follow_each_their_own_box_and_join(predictor, kidneys):
    """Two boxes on one slice of one structure (both kidneys) are its pieces: each piece is followed
    as it would be alone (own box, own passes), the result is their union, one segment; with one box
    around both, the model segments the tissue between them too."""
    ref, z, boxes = kidneys
    z_range = (z - 3, z + 3)
    got = segment_boxes(predictor, [BoxPrompt(z, b, z_range) for b in boxes])
    alone = [propagate(predictor, z, b, z_range=z_range).mask for b in boxes]
    assert np.array_equal(got.mask, alone[0] | alone[1])
    assert got.locked == (z,) and {r.z for r in got.slices} == set(range(z_range[0], z_range[1] + 1))
    assert set(got.stop_reasons) == {"up (box 1)", "down (box 1)", "up (box 2)", "down (box 2)"}
    span = slice(z_range[0], z_range[1] + 1)
    one_box = propagate(predictor, z, label_box(ref[z]), z_range=z_range).mask
    per_piece, around_both = dice(got.mask[span], ref[span]), dice(one_box[span], ref[span])
    print(f"both kidneys, slices {z_range}: box per piece {per_piece:.3f}, one box around both {around_both:.3f}")
    assert per_piece > around_both + 0.1


def test_pieces_of_one_structure_in_a_job_with_another(predictor, kidneys, labels):
    """In a job of several structures a structure's pieces are listed under its one name: the other
    structure's mask is what it gets beside a one-piece structure there, and the pieces' union is
    settled against it as one structure."""
    _, z, boxes = kidneys
    z_range = (z - 1, z + 1)
    values, counts = np.unique(labels[z][~np.isin(labels[z], [0, KIDNEY_RIGHT, KIDNEY_LEFT])], return_counts=True)
    other = int(values[np.argmax(counts)])  # the largest other structure on the slice
    liver = BoxPrompt(z, label_box(labels[z] == other), z_range)
    job = segment_structures(predictor, {"kidneys": [BoxPrompt(z, b, z_range) for b in boxes], "liver": liver},
                             settle=False)
    kid = segment_boxes(predictor, [BoxPrompt(z, b, z_range) for b in boxes])
    assert np.array_equal(job.results["kidneys"].mask, kid.mask)
    assert np.array_equal(job.results["liver"].mask, propagate(predictor, liver.z, liver.box, z_range=z_range).mask)
    settled = segment_structures(predictor, {"kidneys": [BoxPrompt(z, b, z_range) for b in boxes], "liver": liver})
    assert not (settled.results["kidneys"].mask & settled.results["liver"].mask).any()


def test_key_slices_lock_their_boxes_and_fill_between(predictor, labels):
    """Boxes on two slices of one structure (the left kidney) are key slices: both are locked with
    the masks of their boxes, the slices between are filled from both ends, beyond them the
    propagation goes on to the z-range's ends; a later correction keeps them."""
    ref = labels == KIDNEY_LEFT
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2])
    a, b = mid - 3, mid + 3
    prompts = [BoxPrompt(a, label_box(ref[a]), (a - 1, b + 1)), BoxPrompt(b, label_box(ref[b]), (a - 1, b + 1))]
    got = segment_boxes(predictor, prompts)
    assert got.locked == (a, b)
    for p in prompts:
        assert np.array_equal(got.mask[p.z], predictor.predict(p.z, p.box).mask)
    assert all(got.mask[z].any() for z in range(a - 1, b + 2))
    assert not got.mask[: a - 1].any() and not got.mask[b + 2:].any()
    assert f"between {a}..{b}" in got.stop_reasons
    assert dice(got.mask[a - 1: b + 2], ref[a - 1: b + 2]) > 0.85
    later = correct(predictor, got, [Correction.with_box(mid, label_box(ref[mid]))], z_range=(a - 1, b + 1))
    assert later.locked == (a, mid, b)
    for z in (a, b):
        assert np.array_equal(later.mask[z], got.mask[z])


def test_key_slice_corridor_bounds_the_prompts(predictor, labels):
    """With ``key_corridor`` the prompts between two key slices stay inside the key boxes'
    corridor: a drifting prompt is clipped, one outside it restarts from it."""
    limit = np.array([10.0, 10.0, 50.0, 50.0])
    assert np.array_equal(clip_box(np.array([0.0, 20.0, 40.0, 80.0]), limit), [10, 20, 40, 50])
    assert np.array_equal(clip_box(np.array([60.0, 60.0, 90.0, 90.0]), limit), limit)
    assert np.array_equal(clip_box(np.array([0.0, 20.0, 40.0, 80.0]), None), [0, 20, 40, 80])
    ref = labels == KIDNEY_LEFT
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2])
    a, b = mid - 2, mid + 2
    prompts = [BoxPrompt(a, label_box(ref[a]), (a, b)), BoxPrompt(b, label_box(ref[b]), (a, b))]
    free = segment_boxes(predictor, prompts)
    tight = segment_boxes(predictor, prompts, settings=PropagationSettings(key_corridor=0.0001))
    # A corridor of nothing but the interpolated boxes: the masks between can only shrink toward them.
    for z in range(a + 1, b):
        assert tight.mask[z].sum() <= free.mask[z].sum() + 0.02 * free.mask[z].sum()
    assert np.array_equal(tight.mask[a], free.mask[a]) and np.array_equal(tight.mask[b], free.mask[b])


def test_a_correction_with_a_box_per_piece(predictor, kidneys):
    """A box correction may give one box per piece of the structure on its slice: the slice is the
    union of the pieces' masks, each piece followed from its own box."""
    ref, z, boxes = kidneys
    z_range = (z - 2, z + 2)
    first = propagate(predictor, z + 2, label_box(ref[z + 2]), z_range=z_range)
    fixed = correct(predictor, first, [Correction.with_boxes(z, boxes)], z_range=z_range)
    assert fixed.locked == (z, z + 2)
    assert np.array_equal(fixed.mask[z], predictor.predict(z, boxes[0]).mask | predictor.predict(z, boxes[1]).mask)
    assert np.array_equal(fixed.mask[z + 2], first.mask[z + 2])
    assert Correction.with_boxes(z, boxes).boxes == tuple(tuple(float(v) for v in b) for b in boxes)
    with pytest.raises(MedSAMError, match="at least one box"):
        Correction.with_boxes(z, [])


def test_boxes_of_one_structure_share_one_z_range(predictor, kidneys):
    _, z, boxes = kidneys
    with pytest.raises(MedSAMError, match="share one z-range"):
        segment_boxes(predictor, [BoxPrompt(z, boxes[0], (z - 1, z + 1)), BoxPrompt(z, boxes[1])])
    with pytest.raises(MedSAMError, match="at least one box"):
        segment_boxes(predictor, [])


def test_a_correction_with_pieces_crosses_the_remote_protocol_whole():
    """The remote protocol carries every box of a correction (a dropped piece would pass silently)."""
    from MedSAMSlicerLib.remote.protocol import correction_from_json, correction_json

    for c in (Correction.with_boxes(7, [(1, 2, 10, 12), (20, 2, 30, 12)]), Correction.with_box(3, (1, 1, 5, 5)),
              Correction.accept(4)):
        assert correction_from_json(correction_json(c)) == c


def test_a_pieces_pass_rejoins_the_earlier_parts_it_touches():
    """A pass that follows one piece rejoins the earlier result where it agrees with the earlier
    parts it touches (the other piece is another pass's); a whole-structure pass compares the whole
    slice. Without this a piece never rejoined and ran to its end over good slices (the colon of the
    shipped CT lost 0.17 Dice at a correction with a box per piece)."""
    from MedSAMSlicerLib.segmentation.corrections import _untouched_parts
    from MedSAMSlicerLib.segmentation.lockstep import Pass, _rejoins

    earlier = np.zeros((1, 20, 20), bool)
    earlier[0, 2:6, 2:6] = True  # this piece
    earlier[0, 12:18, 12:18] = True  # the other piece
    mine = earlier[0].copy()
    mine[12:18, 12:18] = False
    whole = Pass(0, "up", 0, 1, 0, mine, np.zeros(4), previous=earlier)
    piece = Pass(0, "up", 0, 1, 0, mine, np.zeros(4), previous=earlier, piece=True)
    assert not _rejoins(whole, 0, mine, 0.9) and _rejoins(piece, 0, mine, 0.9)
    assert not _rejoins(piece, 0, np.roll(mine, 8, axis=0), 0.9)  # moved off its earlier part
    assert np.array_equal(_untouched_parts(earlier[0], mine), earlier[0] & ~mine)


def test_key_slices_of_the_simulated_user(labels):
    """The loop's key slices: the label's box on K slices spread over its extent, both ends included;
    fewer than 2 refused, and the loop command refuses --key-slices 0 in one line."""
    from MedSAMSlicerLib.evaluation.loop import key_slice_prompts, main

    ref = labels == KIDNEY_LEFT
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    prompts = key_slice_prompts(ref, 5)
    assert [p.z for p in prompts][0] == zs[0] and prompts[-1].z == zs[-1] and len(prompts) == 5
    assert all(p.box == label_box(ref[p.z]) and p.z_range is None for p in prompts)
    with pytest.raises(MedSAMError, match="at least 2"):
        key_slice_prompts(ref, 1)
    assert main(["--key-slices", "0"]) == 2
