"""Preprocessing matches the originals' formulas (skimage / OpenCV / pre_CT_MR.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import transform

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.segmentation import preprocessing as P


@pytest.fixture(scope="module")
def ct_volume(ct_path):
    from MedSAMSlicerLib.fileio.volumes import read_volume

    return read_volume(ct_path)


@pytest.fixture(scope="module")
def mr_volume(mr_path):
    from MedSAMSlicerLib.fileio.volumes import read_volume

    return read_volume(mr_path)


@pytest.fixture(scope="module")
def ct_u8(ct_volume):
    return P.apply_window(ct_volume.array, P.Window.preset("abdomen"))


def test_ct_window_matches_pre_ct_mr(ct_volume):
    raw = ct_volume.array
    # pre_CT_MR.py: clip to [L - W/2, L + W/2], min-max over the volume to 0-255, np.uint8.
    clipped = np.clip(raw, 40 - 200, 40 + 200)
    expected = np.uint8((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0)
    got = P.apply_window(raw, P.Window(level=40, width=400), stretch=True)
    assert np.array_equal(got, expected)
    # Fixed mapping (what a viewer shows): level - width/2 -> 0, level + width/2 -> 255.
    fixed = P.apply_window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), P.Window(level=40, width=400))
    assert fixed.tolist() == [0, 0, 127, 255, 255]


def test_mr_percentile_window_matches_pre_ct_mr(mr_volume):
    raw = mr_volume.array.astype(np.float64)
    lo, hi = np.percentile(raw[raw > 0], 0.5), np.percentile(raw[raw > 0], 99.5)
    pre = np.clip(raw, lo, hi)
    pre = (pre - pre.min()) / (pre.max() - pre.min()) * 255.0
    pre[raw == 0] = 0
    got = P.apply_window(raw, P.Window.preset("mr"))
    assert np.abs(got.astype(int) - np.uint8(pre).astype(int)).max() <= 1


def test_medsam_resize_matches_skimage(ct_u8):
    for img in (ct_u8[80], np.random.RandomState(0).randint(0, 256, (512, 512)).astype(np.uint8)):
        img_3c = np.repeat(img[:, :, None], 3, axis=-1)
        ref = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        ours = P.skimage_style_resize(img, (1024, 1024)).astype(np.uint8)
        assert np.array_equal(ours, ref[..., 0])
    # Shrinking (anti-aliasing on) too.
    big = np.random.RandomState(1).randint(0, 256, (1500, 1300)).astype(np.uint8)
    ref = transform.resize(big, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
    assert np.abs(P.skimage_style_resize(big, (1024, 1024)) - ref).max() < 1e-6


def test_medsam_prepared_slice_is_the_reference_formula(ct_u8):
    img = ct_u8[80]
    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    ref = torch.tensor(img_1024).float().permute(2, 0, 1)
    prepared = P.prepare_medsam(img)
    assert torch.allclose(prepared.image, ref, atol=1e-6)
    h, w = img.shape
    box = np.array([10, 20, 60, 70])
    assert np.allclose(P.box_to_model(box, prepared), box / np.array([w, h, w, h]) * 1024)


@pytest.mark.parametrize("shape", [(101, 122), (512, 512), (300, 517), (100, 77), (91, 117), (255, 300)])
def test_area_resize_matches_opencv(shape):
    src = np.random.RandomState(sum(shape)).randint(0, 256, shape).astype(np.uint8)
    new_h, new_w = P.longest_side_shape(shape, 256)
    ref = cv2.resize(np.repeat(src[:, :, None], 3, axis=-1), (new_w, new_h), interpolation=cv2.INTER_AREA)[..., 0]
    ours = P.area_resize(src, (new_h, new_w))
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # Exact but for float rounding in OpenCV's fractional-shrink path (a pixel in ~10^4 differs by 1).
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("shape, out", [((101, 122), (212, 256)), ((300, 517), (149, 256)), ((1024, 1024), (256, 256)),
                                        ((91, 117), (199, 256))])
def test_banded_resize_equals_the_dense_weight_product(shape, out):
    """area_resize's BLAS-free banded product (see _separable) is the dense ``wy @ x @ wx.T``."""
    rs = np.random.RandomState(sum(shape))
    area = shape[0] >= out[0] and shape[1] >= out[1]
    wy, wx = P._area_weights(shape[0], out[0], area), P._area_weights(shape[1], out[1], area)
    for x in (rs.randint(0, 256, shape).astype(np.float64), (rs.rand(*shape) > 0.5).astype(np.float64)):
        dense = wy @ x @ wx.T
        banded = P._separable(x, wy, wx)
        assert banded.shape == out
        np.testing.assert_allclose(banded, dense, rtol=0, atol=1e-9)
    assert P._band(wy)[0].shape[1] < shape[0]  # a band, not the whole row


def test_litemedsam_prepared_slice_is_the_reference_formula(ct_u8):
    img = ct_u8[80]
    h, w = img.shape
    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    scale = 256 / max(h, w)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    img_256 = cv2.resize(img_3c, (new_w, new_h), interpolation=cv2.INTER_AREA)
    img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    padded = np.pad(img_256, ((0, 256 - new_h), (0, 256 - new_w), (0, 0)))
    ref = torch.tensor(padded).float().permute(2, 0, 1)
    prepared = P.prepare_litemedsam(img)
    assert prepared.resized_hw == (new_h, new_w)
    assert torch.allclose(prepared.image, ref, atol=1e-6)
    box = np.array([10.0, 20.0, 60.0, 70.0])
    assert np.allclose(P.box_to_model(box, prepared), box / max(h, w) * 256)


def test_litemedsam_cubic_enlargement_only_changes_enlarged_slices():
    """``enlarge="cubic"`` (measured against LiteMedSAM's area enlargement by ``evaluate``): a slice
    smaller than 256 px is enlarged with skimage's cubic spline; a larger one is shrunk as before."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (101, 122), dtype=np.uint8)
    cubic = P.prepare_litemedsam(small, enlarge="cubic")
    nh, nw = cubic.resized_hw
    expect = np.round(P.skimage_style_resize(small, (nh, nw))).astype(np.uint8).astype(np.float64)
    expect = (expect - expect.min()) / (expect.max() - expect.min())
    assert np.allclose(cubic.image[0, :nh, :nw].numpy(), expect, atol=1e-6)
    assert not torch.equal(cubic.image, P.prepare_litemedsam(small).image)
    large = rng.integers(0, 256, (300, 280), dtype=np.uint8)
    assert torch.equal(P.prepare_litemedsam(large, enlarge="cubic").image, P.prepare_litemedsam(large).image)
    assert torch.equal(P.prepare_slice(small, "litemedsam-cubic", 256).image, cubic.image)
    with pytest.raises(MedSAMError, match="enlarge is 'area' or 'cubic'"):
        P.prepare_litemedsam(small, enlarge="lanczos")


def test_logits_to_mask_follow_each_original():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 256, 256, generator=rng) * 4
    img = np.zeros((101, 122), np.uint8)
    lite = P.prepare_litemedsam(img)
    nh, nw = lite.resized_hw
    ref = torch.sigmoid(F.interpolate(logits[..., :nh, :nw], size=(101, 122), mode="bilinear", align_corners=False))
    assert np.array_equal(P.logits_to_mask(logits, lite), (ref[0, 0] > 0.5).numpy())
    med = P.prepare_medsam(img)
    ref = F.interpolate(torch.sigmoid(logits), size=(101, 122), mode="bilinear", align_corners=False)
    assert np.array_equal(P.logits_to_mask(logits, med), (ref[0, 0] > 0.5).numpy())


def test_mask_box_matches_litemedsam_get_bbox256():
    mask = np.zeros((101, 122), bool)
    mask[30:52, 40:77] = True
    prepared = P.prepare_litemedsam(mask.astype(np.uint8))
    nh, nw = prepared.resized_hw
    pre = cv2.resize(mask.astype(np.uint16), (nw, nh), interpolation=cv2.INTER_AREA)
    pre = np.pad(pre, ((0, 256 - nh), (0, 256 - nw)))
    ys, xs = np.nonzero(pre > 0)
    ref = [max(0, xs.min() - 3), max(0, ys.min() - 3), min(256, xs.max() + 3), min(256, ys.max() + 3)]
    assert P.mask_box_in_model(mask, prepared, 3).tolist() == ref
    assert P.mask_box_in_model(np.zeros_like(mask), prepared, 3) is None


def test_window_presets_and_bad_windows():
    assert P.Window.preset("abdomen") == P.Window(level=40, width=400)
    assert P.Window.preset("LUNG") == P.Window(level=-160, width=1500)
    assert P.Window.preset("mr").percentiles == (0.5, 99.5)
    with pytest.raises(MedSAMError, match="unknown window preset 'liver'.*abdomen"):
        P.Window.preset("liver")
    with pytest.raises(MedSAMError, match="positive"):
        P.Window(level=40, width=0)


@pytest.mark.parametrize(
    "box, match",
    [((-50, -50, -10, -10), "outside"), ((10, 10, 10, 40), "zero size"), ((1, 2, 3), "four numbers")],
)
def test_bad_boxes(box, match):
    with pytest.raises(MedSAMError, match=match):
        P.check_box(box, (101, 122))


def test_automatic_window_ct_and_mr(ct_volume, mr_volume, dicom_dir, lite_segmenter):
    from MedSAMSlicerLib.fileio.volumes import read_volume

    abdomen, mr = P.Window.preset("abdomen"), P.Window.preset("mr")
    assert P.Window.automatic(ct_volume.array) == abdomen
    assert P.Window.automatic(read_volume(dicom_dir).array) == abdomen  # another scanner, DICOM
    assert P.Window.automatic(mr_volume.array) == mr  # MR: -47..833, no air values
    # The rule is the air threshold: CT shifted above it reads as "not CT".
    assert P.Window.automatic(ct_volume.array - ct_volume.array.min() + P.CT_AIR_THRESHOLD) == mr
    # resolve_window: None/"auto" -> automatic; names, pairs and Windows as given.
    assert P.resolve_window(None, mr_volume.array) == mr
    assert P.resolve_window("AUTO", ct_volume.array) == abdomen
    assert P.resolve_window("lung", mr_volume.array) == P.Window.preset("lung")
    assert P.resolve_window((50, 350), mr_volume.array) == P.Window(level=50, width=350)
    with pytest.raises(MedSAMError, match="auto"):
        P.Window.preset("auto")
    with pytest.raises(MedSAMError, match="window"):
        P.resolve_window(("a", "b"), mr_volume.array)
    # The engine's default is the automatic window (no encoding happens in set_volume).
    lite_segmenter.set_volume(mr_volume.array)
    assert lite_segmenter.window == mr
    lite_segmenter.set_volume(ct_volume.array)
    assert lite_segmenter.window == abdomen
