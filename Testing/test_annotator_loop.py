"""The annotator's loop as a user would run it (issue 12, part 5): one box on the middle slice, then
corrections of the worst slice from the label (MedSAMSlicerLib.evaluation.loop), on the real CT.

The default run checks the loop's guarantees on the gallbladder (its corrections erase slices and
box one); a second small structure and the whole measurement (every CT structure on at least 10
slices, docs/evaluation.md's table) are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedSAMSlicerLib.evaluation import load_set
from MedSAMSlicerLib.evaluation.loop import run_loop, run_loops, user_correction, worst_slice
from MedSAMSlicerLib.metrics import dice


@pytest.fixture(scope="module")
def ct_case(data_dir):
    return next(c for c in load_set(data_dir.parent / "evaluation_set.toml") if c.name == "ct")


def _structure(case, name):
    return next(s for s in case.structures if s.name == name)


# The gallbladder's three corrections are two erased slices and a box (both kinds); the left adrenal
# gland (the same kinds, a structure the loop lifts from 0.56) under -m slow (issue 27: the suite's time).
@pytest.mark.parametrize("name", ["gallbladder", pytest.param("adrenal_gland_left", marks=pytest.mark.slow)])
def test_corrections_keep_locked_slices_and_do_not_lower_dice(lite_segmenter, ct_case, name):
    """Three corrections of the worst slice of a small structure (slices erased and a box):
    each keeps every slice locked before it and the slices beyond the locked slices around it,
    and the Dice against the label does not go down."""
    seg = lite_segmenter
    seg.set_volume(ct_case.image)
    ref = ct_case.mask(_structure(ct_case, name))
    results = []
    row = run_loop(seg, ref, corrections=3, case="ct", structure=name, on_result=lambda k, r: results.append(r))
    assert len(results) == len(row.dice) == 4 and len(row.corrected) == 3
    assert row.slices_true == int(ref.any(axis=(1, 2)).sum()) and results[0].locked == (row.box_slice,)
    for before, after, how in zip(results, results[1:], row.corrected):
        target, kind = int(how.split()[0]), how.split()[1]
        assert target == worst_slice(before.mask, ref, before.locked, row.box_slice)
        assert after.locked == tuple(sorted(set(before.locked) | {target}))
        for k in before.locked:
            assert np.array_equal(after.mask[k], before.mask[k]), f"locked slice {k} changed"
        below = [k for k in before.locked if k < target]
        above = [k for k in before.locked if k > target]
        if below:
            assert np.array_equal(after.mask[: below[-1] + 1], before.mask[: below[-1] + 1])
        if above:
            assert np.array_equal(after.mask[above[0]:], before.mask[above[0]:])
        if kind == "erase":  # a slice the label does not hold, erased and accepted
            assert not ref[target].any() and not after.mask[target].any()
        else:  # the label's box there
            _, fix = user_correction(before, ref, target)
            assert fix.boxes and np.array_equal(
                after.mask[target], np.logical_or.reduce([seg.segment_slice(target, b).mask for b in fix.boxes]))
    assert {how.split()[1] for how in row.corrected} == {"erase", "box"}, row.corrected  # both kinds checked
    assert row.dice == [dice(r.mask, ref) for r in results]
    print(f"{name}: Dice " + " -> ".join(f"{d:.3f}" for d in row.dice) + f" ({', '.join(row.corrected)})")
    assert all(b >= a for a, b in zip(row.dice, row.dice[1:])), row.dice
    assert row.dice[-1] > row.dice[0]


@pytest.fixture(scope="module")
def whole_loop(ct_case, lite_segmenter):
    """Every CT structure labelled on at least 10 slices through the loop (about an hour on 2 busy cores)."""
    return run_loops([ct_case], lite_segmenter, corrections=3, min_slices=10)


@pytest.mark.slow
def test_loop_liver_after_one_correction(whole_loop):
    liver = next(r for r in whole_loop if r.structure == "liver")
    assert liver.dice[1] >= 0.93


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met: 21 of 171 corrections lower the Dice, 18 by at most "
                                       "0.01, the portal vein by 0.094 (docs/evaluation.md, 'The annotator's loop, measured')")
def test_loop_never_lower_after_a_correction(whole_loop):
    lower = [(r.structure, a, b) for r in whole_loop for a, b in zip(r.dice, r.dice[1:]) if b < a]
    assert not lower, lower


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met: mean 0.524 after three; lungs (abdomen window), ribs, bones, "
                                       "bowel stay low (docs/evaluation.md)")
def test_loop_mean_after_three_corrections(whole_loop):
    assert np.mean([r.dice[min(3, len(r.dice) - 1)] for r in whole_loop]) > 0.90


def test_loop_is_a_mode_of_evaluate(lite_segmenter, ct_case, tmp_path):
    """``evaluate --modes 2d,loop --corrections N`` (issue 23, part 4): rows ``loop-0`` .. ``loop-N``
    for each structure, the same simulated user as the loop command: ``loop-0`` is the 2d row (the
    same box, automatic extent), each later row the loop's Dice after that many corrections, with
    the slices fixed so far; the rows reach the CSV and the summary."""
    from MedSAMSlicerLib.errors import MedSAMError
    from MedSAMSlicerLib.evaluation.runner import check_modes

    name = "adrenal_gland_left"
    from MedSAMSlicerLib.evaluation import evaluate
    from MedSAMSlicerLib.evaluation.report import format_summary, summarize, write_csv
    from MedSAMSlicerLib.evaluation.runner import builtin_variants

    structure = _structure(ct_case, name)
    rows = evaluate([ct_case], [builtin_variants()["default"]], segmenter=lite_segmenter, modes=("2d", "loop"),
                    corrections=1, include=lambda c, s: s is structure)
    assert [r.mode for r in rows] == ["2d", "loop-0", "loop-1"]
    lite_segmenter.set_volume(ct_case.image)
    looped = run_loop(lite_segmenter, ct_case.mask(structure), corrections=1)
    assert rows[1].dice == pytest.approx(rows[0].dice) and rows[1].corrected == ""
    assert [r.dice for r in rows[1:]] == pytest.approx(looped.dice)
    assert rows[2].corrected == "; ".join(looped.corrected)
    write_csv(rows, tmp_path / "evaluation.csv")
    header, *lines = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert "corrected" in header.split(",") and len(lines) == 3
    assert "loop-1" in format_summary(summarize(rows))
    for bad in (-1, 51, True, 1.5):
        with pytest.raises(MedSAMError, match="--corrections must be a whole number from 0 to 50"):
            check_modes(("loop",), bad)
