"""Speed settings give the masks they claim (``speed.py``, ``strided.py``, ``encoder_runtimes.py``).

Real CT, real LiteMedSAM weights. The exact tier must give today's masks; the others must stay
within the agreement floors measured by ``medsam-slicer bench --compare alternatives``
(docs/performance.md, "Speed settings"). Speed itself is the benchmark's business, not asserted here. The boxes are on
the left kidney's slices, which ``test_segmenter.py`` already encodes with the shared segmenter;
the OpenVINO and ONNX Runtime checks encode a few slices of their own and are skipped when the
runtime is not installed (``pip install medsam-slicer[fast]``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from MedSAMSlicerLib.demo import reference_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.metrics import dice
from MedSAMSlicerLib.models.encoder_runtimes import EXPORT_DIR_ENV, RuntimeEncoder
from MedSAMSlicerLib.models.speed import SPEED_TIERS, SpeedTier, get_speed, runtime_missing, speed_choices
from MedSAMSlicerLib.segmentation.preprocessing import Window
from MedSAMSlicerLib.segmentation.propagation import propagate
from MedSAMSlicerLib.segmentation.strided import (
    SliceSubset,
    computed_slices,
    interpolate_masks,
    propagate_strided,
)
from MedSAMSlicerLib.segmenter import Segmenter

KIDNEY_LEFT = 3
#: "fastest" on this test's case (docs/performance.md, "Speed settings", has the benchmark's cases).
FASTEST_FLOOR_VS_EXACT = 0.93
FASTEST_LOSS_VS_LABELS = 0.02


@pytest.fixture(scope="module")
def ct(ct_path):
    return read_volume(ct_path).array


@pytest.fixture(scope="module")
def kidney(ct_seg_path):
    """The left kidney's label, its largest slice and box there, and its z-extent."""
    ref = read_volume(ct_seg_path).array == KIDNEY_LEFT
    z, box = reference_box(ref)
    zs = np.nonzero(ref.any(axis=(1, 2)))[0]
    return ref, z, box, (int(zs.min()), int(zs.max()))


@pytest.fixture()
def seg(lite_segmenter, ct):
    lite_segmenter.set_volume(ct, Window.preset("abdomen"))
    return lite_segmenter


@pytest.fixture(scope="module", autouse=True)
def export_dir(tmp_path_factory):
    """Converted encoders go to a folder of this test run, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("exported")
        mp.setenv(EXPORT_DIR_ENV, str(folder))
        yield folder


# -- the tiers as names -------------------------------------------------------------------------
def test_tier_names_and_bad_settings():
    assert list(SPEED_TIERS) == ["exact", "fast", "fastest"]
    assert get_speed(None).name == "exact" and get_speed(" Fast ").name == "fast"
    assert get_speed(SPEED_TIERS["fastest"]) is SPEED_TIERS["fastest"]
    assert SPEED_TIERS["exact"].stride == 1 and SPEED_TIERS["exact"].encoder == "torch"
    assert all(note for _, _, note, _ in speed_choices())
    with pytest.raises(MedSAMError, match="unknown speed 'turbo'; choose one of: exact, fast, fastest"):
        get_speed("turbo")
    with pytest.raises(MedSAMError, match="ONNX Runtime is used in float32 only"):
        SpeedTier("x", "x", encoder="onnxruntime", precision="bf16")
    with pytest.raises(MedSAMError, match="stride"):
        SpeedTier("x", "x", stride=0)
    with pytest.raises(MedSAMError, match="unknown encoder runtime"):
        runtime_missing("tensorrt")


def test_a_tier_whose_runtime_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # Python's own way of blocking an import
    tier = SpeedTier("ov", "ov", encoder="openvino")
    assert "pip install openvino" in tier.missing()
    with pytest.raises(MedSAMError, match=r"the 'ov' speed cannot be used: openvino is not installed \(pip install openvino\)"):
        Segmenter("litemedsam", device="cpu", speed=tier)


# -- exact: today's masks ---------------------------------------------------------------------------
def test_exact_tier_gives_the_plain_propagation(seg, kidney):
    _, z, box, (lo, hi) = kidney
    assert seg.speed.name == "exact"
    ours = seg.segment_3d(z, box, z_range=(z - 3, z + 3)).mask
    plain = propagate(seg.predictor, z, box, z_range=(z - 3, z + 3)).mask
    assert np.array_equal(ours, plain)


# -- every 2nd slice --------------------------------------------------------------------------------
def test_interpolation_moves_a_shape_between_its_neighbours():
    yy, xx = np.mgrid[:40, :60]
    a = (yy - 20) ** 2 + (xx - 15) ** 2 <= 100
    b = (yy - 20) ** 2 + (xx - 27) ** 2 <= 100
    (mid,) = interpolate_masks(a, b, 1)
    ys, xs = np.nonzero(mid)
    assert abs(xs.mean() - 21) < 0.5 and abs(ys.mean() - 20) < 0.5  # halfway: neither a union nor an overlap
    assert 0.9 * a.sum() <= mid.sum() <= 1.1 * a.sum()
    thirds = interpolate_masks(a, b, 2)
    assert [round(float(np.nonzero(m)[1].mean())) for m in thirds] == [19, 23]
    small = (yy - 20) ** 2 + (xx - 15) ** 2 <= 16
    (shrinking,) = interpolate_masks(a, small, 1)
    assert small.sum() < shrinking.sum() < a.sum() and (shrinking <= a).all()
    far = (yy - 20) ** 2 + (xx - 45) ** 2 <= 100  # no overlap with a: still a shape between them
    (between,) = interpolate_masks(a, far, 1)
    assert abs(np.nonzero(between)[1].mean() - 30) < 0.5 and 0.9 * a.sum() <= between.sum() <= 1.1 * a.sum()
    assert not any(m.any() for m in interpolate_masks(a, np.zeros_like(a), 3))  # a structure's end


def test_computed_slices():
    assert computed_slices(10, 5, 15, 2, ends=True) == [5, 6, 8, 10, 12, 14, 15]
    assert computed_slices(10, 0, 13, 3, ends=False) == [1, 4, 7, 10, 13]


def test_slice_subset_shares_the_parents_cache(seg, kidney):
    _, z, _, _ = kidney
    subset = SliceSubset(seg.predictor, [z - 2, z, z + 2])
    seg.predictor.encode([z])
    assert subset.is_encoded(1) and subset.cache_key(1) == seg.predictor.cache_key(z)
    assert np.array_equal(subset.volume[2], seg.predictor.volume[z + 2])
    with pytest.raises(MedSAMError, match="increasing"):
        SliceSubset(seg.predictor, [z, z])
    with pytest.raises(MedSAMError, match="out of range"):
        subset.check_slice_index(3)


def test_every_second_slice_stays_close_to_exact(seg, kidney):
    """The whole left kidney (33 slices) with the box on its largest slice and its z-extent."""
    ref, z, box, (lo, hi) = kidney
    exact = seg.segment_3d(z, box, z_range=(lo, hi)).mask
    before = seg.predictor.encoded_slices
    strided = propagate_strided(seg.predictor, z, box, stride=2, z_range=(lo, hi))
    assert [r.z for r in strided.slices] == [z] + [zz for zz in computed_slices(z, lo, hi, 2, True) if zz > z] + \
        [zz for zz in computed_slices(z, lo, hi, 2, True) if zz < z][::-1]
    assert seg.predictor.encoded_slices - before <= 0  # the exact run encoded all of them already
    mask = strided.mask
    assert mask[lo : hi + 1].any(axis=(1, 2)).all() and not mask[:lo].any() and not mask[hi + 1 :].any()
    d_exact, d_ref, d_ref_exact = dice(mask, exact), dice(mask, ref), dice(exact, ref)
    print(f"stride 2, left kidney: Dice vs exact {d_exact:.4f}, vs labels {d_ref:.4f} (exact {d_ref_exact:.4f})")
    assert d_exact >= 0.90
    assert d_ref >= d_ref_exact - 0.03
    decoded = propagate_strided(seg.predictor, z, box, stride=2, z_range=(lo, hi), fill="decode").mask
    assert np.array_equal(decoded[computed_slices(z, lo, hi, 2, True)], mask[computed_slices(z, lo, hi, 2, True)])
    print(f"stride 2 decoded: Dice vs exact {dice(decoded, exact):.4f}, vs labels {dice(decoded, ref):.4f}")
    assert dice(decoded, exact) >= 0.90


# -- other encoder runtimes ---------------------------------------------------------------------------
RUNTIME_CASES = [
    pytest.param("openvino", "f32", 1e-3, 0.999, id="openvino-f32"),
    pytest.param("onnxruntime", "f32", 1e-3, 0.999, id="onnxruntime-f32"),
]


@pytest.mark.parametrize("runtime, precision, max_diff, min_dice", RUNTIME_CASES)
def test_runtime_encoder_gives_torchs_embeddings_and_masks(seg, kidney, runtime, precision, max_diff, min_dice,
                                                           export_dir):
    for module in ("openvino",) if runtime == "openvino" else ("onnxruntime", "onnx"):
        pytest.importorskip(module)
    _, z, box, _ = kidney
    other = Segmenter("litemedsam", device="cpu", speed=SpeedTier("t", "t", encoder=runtime, precision=precision))
    assert isinstance(other.model.image_encoder, RuntimeEncoder)
    other.predictor.set_volume(seg.predictor.volume, key="speed-test")
    zs = [z - 1, z, z + 1]
    seg.predictor.encode(zs)
    for zz in zs:
        got, want = other.predictor.embedding(zz), seg.predictor.embedding(zz)
        assert got.shape == want.shape == (1, 256, 64, 64) and got.dtype == torch.float32
        assert float((got - want).abs().max()) < max_diff
    a = other.segment_3d(z, box, z_range=(z - 1, z + 1)).mask
    b = seg.segment_3d(z, box, z_range=(z - 1, z + 1)).mask
    assert dice(a, b) >= min_dice
    # The converted model is kept and reused: a second encoder does not convert again.
    files = sorted(p.name for p in export_dir.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()}
    again = Segmenter("litemedsam", device="cpu", speed=SpeedTier("t", "t", encoder=runtime, precision=precision))
    assert sorted(p.name for p in export_dir.iterdir()) == files
    assert {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()} == mtimes
    assert runtime.replace("onnxruntime", "ONNX Runtime").replace("openvino", "OpenVINO") in again.describe()


# -- the named tiers ----------------------------------------------------------------------------------
def test_fast_and_fastest_tiers_are_what_they_say(seg, ct, kidney):
    """The left kidney (box on its largest slice): "fast" gives the exact masks on a 7-slice run;
    "fastest" is "fast"'s encoder on every 2nd slice (its own segmenter on a 9-slice run, mask for
    mask, encoding only the slices it computes). The loss "fastest" may cost on the whole kidney is
    measured by :func:`test_fastest_tier_keeps_its_measured_agreement` (``-m slow``, issue 27)."""
    pytest.importorskip("openvino")
    _, z, box, _ = kidney
    fast = Segmenter("litemedsam", device="cpu", speed="fast")
    fast.set_volume(ct, Window.preset("abdomen"))
    assert "OpenVINO" in fast.describe() and "speed fast" in fast.describe()
    short = (z - 3, z + 3)
    d_fast = dice(fast.segment_3d(z, box, z_range=short).mask, seg.segment_3d(z, box, z_range=short).mask)
    fastest = Segmenter("litemedsam", device="cpu", speed="fastest")
    fastest.set_volume(ct, Window.preset("abdomen"))
    run = (z - 4, z + 4)
    own = fastest.segment_3d(z, box, z_range=run)
    assert fastest.predictor.encoded_slices == len(computed_slices(z, *run, 2, True)) < run[1] - run[0] + 1
    like = dict(stride=fastest.speed.stride, fill=fastest.speed.fill, settings=fastest.propagation)
    assert np.array_equal(own.mask, propagate_strided(fast.predictor, z, box, z_range=run, **like).mask)
    print(f"left kidney, 7 slices: fast vs exact {d_fast:.4f}")
    assert d_fast >= 0.999


@pytest.mark.slow
def test_fastest_tier_keeps_its_measured_agreement(seg, ct, kidney):
    """"fastest" (every 2nd slice through OpenVINO, the rest filled) on the whole left kidney stays
    within its stated loss against the exact run and against the labels."""
    pytest.importorskip("openvino")
    ref, z, box, (lo, hi) = kidney
    fastest = Segmenter("litemedsam", device="cpu", speed="fastest")
    fastest.set_volume(ct, Window.preset("abdomen"))
    result = fastest.segment_3d(z, box, z_range=(lo, hi))
    exact = seg.segment_3d(z, box, z_range=(lo, hi)).mask
    d_fastest, d_ref, d_ref_exact = dice(result.mask, exact), dice(result.mask, ref), dice(exact, ref)
    print(f"left kidney: fastest vs exact {d_fastest:.4f}, vs labels {d_ref:.4f} (exact {d_ref_exact:.4f})")
    assert d_fastest >= FASTEST_FLOOR_VS_EXACT
    assert d_ref >= d_ref_exact - FASTEST_LOSS_VS_LABELS
