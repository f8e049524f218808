"""Several structures as one job (structures.py over lockstep.py) on the real CT and weights.

Kept cheap: 5-slice z-ranges around the boxes' slices of ``test_segmenter`` (the label's largest
slice), so the shared ``lite_segmenter`` cache already holds most embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.demo import reference_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.segmentation.preprocessing import Window
from MedSAMSlicerLib.segmentation.propagation import propagate
from MedSAMSlicerLib.segmentation.structures import segment_structures, settle_overlaps

LIVER, SPLEEN = 5, 1


@pytest.fixture()
def predictor(lite_segmenter, ct):
    lite_segmenter.set_volume(ct.array, Window.preset("abdomen"))
    return lite_segmenter.predictor


def _prompt(labels, value, half=2):
    z, box = reference_box(labels == value)
    return BoxPrompt(z, box, (z - half, z + half))


def _alone(predictor, prompt):
    return propagate(predictor, prompt.z, prompt.box, z_range=prompt.z_range)


def test_disjoint_structures_equal_single_runs(predictor, labels):
    """Liver and spleen as one job: each mask is bit-identical to its own run where no other
    structure claims the voxel, and the job encodes each slice once."""
    prompts = {"liver": _prompt(labels, LIVER), "spleen": _prompt(labels, SPLEEN)}
    alone = {n: _alone(predictor, p) for n, p in prompts.items()}
    job = segment_structures(predictor, prompts)
    for name, prompt in prompts.items():
        got = job.results[name]
        assert np.array_equal(got.mask & ~job.contested, alone[name].mask & ~job.contested), name
        # Overlaps only take voxels away from a structure, never add any.
        assert not (got.mask & ~alone[name].mask).any()
        assert got.locked == (prompt.z,)
        assert [r.z for r in got.slices][0] == prompt.z
        assert {r.z for r in got.slices} == set(range(prompt.z_range[0], prompt.z_range[1] + 1))
        assert got.stop_reasons == {"up": "reached the end of the z-range", "down": "reached the end of the z-range"}
    assert not (job.results["liver"].mask & job.results["spleen"].mask).any()
    # Both sweeps and the start slices: no slice was encoded twice.
    assert job.encoded_slices <= len(set().union(*(range(p.z_range[0], p.z_range[1] + 1) for p in prompts.values())))


def test_overlaps_settled_by_logits_not_by_order(predictor, labels):
    """Two overlapping structures (the liver's box and the same box grown by 6 px): every contested
    voxel goes to the higher logit, each voxel to exactly one structure, and swapping the prompts'
    order changes nothing."""
    base = _prompt(labels, LIVER, half=1)
    x0, y0, x1, y1 = base.box
    grown = BoxPrompt(base.z, (x0 - 6, y0 - 6, x1 + 6, y1 + 6), base.z_range)
    one = segment_structures(predictor, {"a": base, "b": grown})
    two = segment_structures(predictor, {"b": grown, "a": base})
    assert one.contested.any()
    for name in ("a", "b"):
        assert np.array_equal(one.results[name].mask, two.results[name].mask), name
    a, b = one.results["a"].mask, one.results["b"].mask
    assert not (a & b).any()
    unsettled = segment_structures(predictor, {"a": base, "b": grown}, settle=False)
    ua, ub = unsettled.results["a"].mask, unsettled.results["b"].mask
    settled, contested = settle_overlaps({"b": ub, "a": ua}, unsettled.logits)
    assert np.array_equal(settled["a"], a) and np.array_equal(settled["b"], b)
    assert np.array_equal(a | b, ua | ub)
    assert np.array_equal(one.contested, ua & ub)
    # The winner of each contested voxel has the higher logit there.
    for z in np.flatnonzero(one.contested.any(axis=(1, 2))):
        la = np.full(ua.shape[1:], -np.inf, np.float32)
        lb = la.copy()
        la[ua[z]] = one.logits["a"][int(z)]
        lb[ub[z]] = one.logits["b"][int(z)]
        here = one.contested[z]
        assert np.array_equal(a[z][here], (la >= lb)[here])


def test_bad_structures(predictor):
    with pytest.raises(MedSAMError, match="at least one structure"):
        segment_structures(predictor, {})
    with pytest.raises(MedSAMError, match="kidney: .*slice"):
        segment_structures(predictor, {"kidney": BoxPrompt(999, (10, 10, 30, 30))})
