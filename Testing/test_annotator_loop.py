"""The annotator's loop as a user would run it (issue 12, part 5): one box on the middle slice, then
corrections of the worst slice from the label (MedSAMSlicerLib.evaluation.loop), on the real CT.

The default run checks the loop's guarantees on two small structures; the whole measurement (every
CT structure on at least 10 slices, the README's table) is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedSAMSlicerLib.evaluation import load_set
from MedSAMSlicerLib.evaluation.loop import run_loop, run_loops, user_correction, worst_slice
from MedSAMSlicerLib.evaluation.runner import simulated_box
from MedSAMSlicerLib.metrics import dice


@pytest.fixture(scope="module")
def ct_case(data_dir):
    return next(c for c in load_set(data_dir.parent / "evaluation_set.toml") if c.name == "ct")


def _structure(case, name):
    return next(s for s in case.structures if s.name == name)


@pytest.mark.parametrize("name", ["gallbladder", "kidney_left"])
def test_corrections_keep_locked_slices_and_do_not_lower_dice(lite_segmenter, ct_case, name):
    """Three corrections of the worst slice: each keeps every slice locked before it and the slices
    beyond the locked slices around it, and the Dice against the label does not go down."""
    seg = lite_segmenter
    seg.set_volume(ct_case.image)
    ref = ct_case.mask(_structure(ct_case, name))
    z, box, _ = simulated_box(ref)
    result = seg.segment_3d(z, box)
    dices = [dice(result.mask, ref)]
    for _ in range(3):
        target = worst_slice(result.mask, ref, result.locked, z)
        assert target is not None and target not in result.locked
        current, fix = user_correction(result, ref, target)
        fixed = seg.correct(current, [fix])
        assert fixed.locked == tuple(sorted(set(result.locked) | {target}))
        for k in result.locked:
            assert np.array_equal(fixed.mask[k], result.mask[k]), f"locked slice {k} changed"
        below = [k for k in result.locked if k < target]
        above = [k for k in result.locked if k > target]
        if below:
            assert np.array_equal(fixed.mask[: below[-1] + 1], result.mask[: below[-1] + 1])
        if above:
            assert np.array_equal(fixed.mask[above[0]:], result.mask[above[0]:])
        if fix.box is None:
            assert not fixed.mask[target].any()  # erased and accepted
        dices.append(dice(fixed.mask, ref))
        result = fixed
    print(f"{name}: Dice " + " -> ".join(f"{d:.3f}" for d in dices))
    assert all(b >= a for a, b in zip(dices, dices[1:])), dices
    assert dices[-1] > dices[0]


@pytest.fixture(scope="module")
def whole_loop(ct_case, lite_segmenter):
    """Every CT structure labelled on at least 10 slices through the loop (~50 min on 2 busy cores)."""
    return run_loops([ct_case], lite_segmenter, corrections=3, min_slices=10)


@pytest.mark.slow
def test_loop_liver_after_one_correction(whole_loop):
    liver = next(r for r in whole_loop if r.structure == "liver")
    assert liver.dice[1] >= 0.93


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met: a few structures lose up to 0.02 on one correction (README, "
                                       "'The annotator's loop, measured')")
def test_loop_never_lower_after_a_correction(whole_loop):
    lower = [(r.structure, a, b) for r in whole_loop for a, b in zip(r.dice, r.dice[1:]) if b < a]
    assert not lower, lower


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met: lungs (abdomen window), ribs, bowel stay low (README)")
def test_loop_mean_after_three_corrections(whole_loop):
    assert np.mean([r.dice[min(3, len(r.dice) - 1)] for r in whole_loop]) > 0.90


def test_run_loop_reports_each_step(lite_segmenter, ct_case):
    """``run_loop``'s row: Dice after each step and which slices were fixed, how."""
    seg = lite_segmenter
    seg.set_volume(ct_case.image)
    ref = ct_case.mask(_structure(ct_case, "gallbladder"))
    row = run_loop(seg, ref, corrections=1, case="ct", structure="gallbladder")
    assert len(row.dice) == 2 and len(row.corrected) == 1
    assert row.corrected[0].split()[1] in ("box", "erase") and row.dice[1] >= row.dice[0]
    assert row.slices_true == int(ref.any(axis=(1, 2)).sum())
