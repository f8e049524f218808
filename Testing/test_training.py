"""MedSAMTraining engine: FLARE22 preprocessing, dataset, trainer, resume, DDP, CLI, job runner.

Real data: the vendored TotalSegmentator CT (Apache-2.0, see ``Testing/Data/README.md``), its
labels remapped to FLARE22 ids and cut along z into two "cases": ``FLARE22_Tr_0001`` (slices
0-90, training) and ``FLARE22_Tr_0002`` (slices 91-111, held out), so validation runs on a body
region the model was not tuned on. Real LiteMedSAM weights, CPU, frozen image encoder; the
embedding cache is shared by the runs of this module, so each slice is encoded once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.progress import Cancelled, CancelToken
from MedSAMSlicerLib.training import cli
from MedSAMSlicerLib.training.dataset import SliceDataset, jitter_box, mask_box, mask_to_low_res
from MedSAMSlicerLib.training.flare22 import TOTALSEG_TO_FLARE22, remap_labels
from MedSAMSlicerLib.training.preprocess import (
    PreprocessSettings,
    clean_labels,
    default_holdout_count,
    load_case,
    load_manifest,
    preprocess_dataset,
    split_cases,
)
from MedSAMSlicerLib.training.trainer import (
    TrainConfig,
    dice_bce_loss,
    evaluate,
    export,
    load_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CASES = {"FLARE22_Tr_0001": (0, 91), "FLARE22_Tr_0002": (91, 112)}
PANCREAS, GALLBLADDER, DUODENUM = 4, 9, 12


def _write_flare_dir(root: Path, ct_path: Path, seg_path: Path, cases=CASES) -> Path:
    """FLARE22 layout from the CT: ``images/<case>_0000.nii.gz``, ``labels/<case>.nii.gz``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(ct_path))
    seg = sitk.ReadImage(str(seg_path))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(seg), TOTALSEG_TO_FLARE22))
    labels.CopyInformation(seg)
    for name, (k0, k1) in cases.items():
        sitk.WriteImage(image[:, :, k0:k1], str(root / "images" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(labels[:, :, k0:k1], str(root / "labels" / f"{name}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def flare_dir(tmp_path_factory, ct_path, ct_seg_path) -> Path:
    return _write_flare_dir(tmp_path_factory.mktemp("flare22"), ct_path, ct_seg_path)


@pytest.fixture(scope="module")
def prep_lite(tmp_path_factory, flare_dir) -> Path:
    """LiteMedSAM preset (dust 100/10): small organs such as the pancreas survive at 3 mm."""
    out = tmp_path_factory.mktemp("prep_lite")
    preprocess_dataset(flare_dir, out, PreprocessSettings.preset("litemedsam"))
    return out


def _pancreas_run(tmp_path_factory, prep_lite, name, **settings):
    run = tmp_path_factory.mktemp(name)
    config = TrainConfig(data=str(prep_lite), out=str(run), model="litemedsam", labels=[PANCREAS],
                         freeze_image_encoder=True, epochs=100, jitter=1, val_every=1000, save_every=1000,
                         device="cpu", **settings)
    events = []
    result = train(config, on_event=events.append)
    return config, result, events


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, prep_lite):
    """A short pancreas fine-tune, 20 steps of 4 (the held-out Dice test, ``-m slow``)."""
    return _pancreas_run(tmp_path_factory, prep_lite, "run_pancreas", batch_size=4, max_steps=20, log_every=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prep_lite):
    """Two pancreas steps of 2 and one validation at the end: a real run's checkpoints, for the
    checkpoint, export, evaluate and refusal tests (a fraction of the 20-step run's slices)."""
    return _pancreas_run(tmp_path_factory, prep_lite, "run_pancreas_short", batch_size=2, max_steps=2,
                         log_every=1, validate_at_start=False)


# ---------------------------------------------------------------------------------------------
# preprocessing


def _original_pre_ct_mr(image_path: Path, label_path: Path):
    """``pre_CT_MR.py``'s CT steps, transcribed (file voxel order, float64 arithmetic)."""
    gt = np.uint8(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))))
    gt[gt == 12] = 0
    gt = cc3d.dust(gt, threshold=1000, connectivity=26, in_place=True)
    for z in range(gt.shape[0]):
        gt[z] = cc3d.dust(gt[z].copy(), threshold=100, connectivity=8, in_place=True)
    z_index = np.unique(np.where(gt > 0)[0])
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    pre = np.clip(image, 40 - 200, 40 + 200)
    pre = (pre - np.min(pre)) / (np.max(pre) - np.min(pre)) * 255.0
    return np.uint8(pre)[z_index], gt[z_index], z_index


def test_preprocess_matches_pre_ct_mr(tmp_path, flare_dir):
    out = tmp_path / "prep"
    seen = []
    result = preprocess_dataset(flare_dir, out, workers=2, progress=lambda d, t, m: seen.append((d, t)))
    manifest = load_manifest(out)
    assert manifest["complete"] and sorted(result.processed) == sorted(CASES)
    assert seen[-1] == (2, 2)
    # 2 cases (< 50): the last one is held out
    assert manifest["split"] == {"train": ["FLARE22_Tr_0001"], "val": ["FLARE22_Tr_0002"]}
    assert manifest["settings"]["dust_3d"] == 1000 and manifest["settings"]["exclude_labels"] == [12]
    for name in CASES:
        entry = manifest["cases"][name]
        data = load_case(out / entry["file"])
        imgs, gts, zs = _original_pre_ct_mr(flare_dir / "images" / f"{name}_0000.nii.gz",
                                            flare_dir / "labels" / f"{name}.nii.gz")
        # the file's direction is diag(-1, -1, 1): canonical (LPS voxel order) flips x and y
        np.testing.assert_array_equal(data.labels, gts[:, ::-1, ::-1])
        np.testing.assert_array_equal(data.z, zs)
        diff = np.abs(data.images.astype(int) - imgs[:, ::-1, ::-1].astype(int))
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3  # float32 vs float64 truncation only
        assert data.images.dtype == np.uint8 and data.labels.dtype == np.uint8
        assert data.labels.reshape(len(zs), -1).any(1).all()  # only labelled slices
        assert DUODENUM not in np.unique(data.labels) and DUODENUM in entry["removed"]["excluded"]
        assert entry["n_slices"] == len(zs) and entry["spacing_zyx"] == [3.0, 3.0, 3.0]
        assert entry["labels"] == sorted(int(v) for v in np.unique(data.labels) if v)
        for key, count in entry["label_slices"].items():
            assert count == int((data.labels == int(key)).reshape(len(zs), -1).any(1).sum())
    # at 3 mm the 100 px 2D rule removes the pancreas, adrenals and vessels entirely
    removed = manifest["cases"]["FLARE22_Tr_0001"]["removed"]["small"]
    assert PANCREAS in removed and 5 in removed and 6 in removed


def test_clean_labels_thresholds_and_connectivity():
    vol = np.zeros((12, 40, 40), np.uint8)
    vol[0:10, 0:10, 0:10] = 1  # 1000 voxels: kept (dust removes < threshold)
    vol[0:9, 20:31, 0:10] = 2  # 990 voxels: removed
    vol[0:10, 0:10, 20:30] = 3  # 1000 voxels, but ...
    vol[10, 10, 30] = 3  # ... a diagonal neighbour joins it only with connectivity 26
    out = clean_labels(vol, PreprocessSettings(dust_3d=1000, dust_2d=0, exclude_labels=()))
    assert (out == 1).sum() == 1000 and (out == 2).sum() == 0 and (out == 3).sum() == 1001
    out6 = clean_labels(vol, PreprocessSettings(dust_3d=1000, dust_3d_connectivity=6, dust_2d=0, exclude_labels=()))
    assert (out6 == 3).sum() == 1000
    sl = np.zeros((1, 40, 40), np.uint8)
    sl[0, 0:10, 0:10] = 5  # 100 px: kept
    sl[0, 20:29, 20:31] = 6  # 99 px: removed
    sl[0, 30:35, 0:5] = 12  # excluded label
    out2d = clean_labels(sl, PreprocessSettings(dust_3d=0, dust_2d=100))
    assert (out2d == 5).sum() == 100 and not (out2d == 6).any() and not (out2d == 12).any()
    lite = PreprocessSettings.preset("litemedsam")
    assert (lite.dust_3d, lite.dust_2d, lite.exclude_labels) == (100, 10, (12,))


def test_mr_percentile_window():
    rng = np.random.default_rng(0)
    vol = rng.uniform(10, 1000, (4, 16, 16)).astype(np.float32)
    vol[:, :4] = 0
    from MedSAMSlicerLib.training.preprocess import window_volume

    out = window_volume(vol, PreprocessSettings(modality="MR"))
    lo, hi = np.percentile(vol[vol > 0], [0.5, 99.5])
    expected = np.uint8((np.clip(vol, lo, hi) - lo) / (hi - lo) * 255.0)
    expected[vol == 0] = 0
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1 and (out[:, :4] == 0).all()


def test_split_rules():
    names = [f"FLARE22_Tr_{i:04d}" for i in range(1, 51)]
    train_names, val = split_cases(names)
    assert val == names[40:] and train_names == names[:40]  # pre_CT_MR.py: first 40 train
    assert default_holdout_count(3) == 1 and default_holdout_count(1) == 0
    assert split_cases(names, 0)[1] == []
    assert split_cases(names, ["FLARE22_Tr_0003"])[1] == ["FLARE22_Tr_0003"]
    with pytest.raises(MedSAMError, match="not found"):
        split_cases(names, ["nope"])
    with pytest.raises(MedSAMError, match="at least one"):
        split_cases(names[:2], 2)


def test_preprocess_resumes(tmp_path, flare_dir):
    data = tmp_path / "data"
    shutil.copytree(flare_dir, data)
    out = tmp_path / "prep"
    preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    again = preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    assert again.processed == [] and sorted(again.skipped) == sorted(CASES)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == stamps
    label = data / "labels" / "FLARE22_Tr_0002.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    changed = preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    assert changed.processed == ["FLARE22_Tr_0002"] and changed.skipped == ["FLARE22_Tr_0001"]
    other = preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam", dust_2d=20))
    assert sorted(other.processed) == sorted(CASES)  # new settings: everything again
    assert load_manifest(out)["settings"]["dust_2d"] == 20


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_preprocess_bad_inputs(tmp_path, flare_dir):
    data = tmp_path / "data"
    shutil.copytree(flare_dir, data)
    out = tmp_path / "prep"
    preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    before = _snapshot(out)
    image = sitk.ReadImage(str(data / "images" / "FLARE22_Tr_0002_0000.nii.gz"))
    labels = sitk.ReadImage(str(data / "labels" / "FLARE22_Tr_0002.nii.gz"))

    # 1. a label file is missing: refused before anything is written
    sitk.WriteImage(image, str(data / "images" / "FLARE22_Tr_0003_0000.nii.gz"))
    with pytest.raises(MedSAMError, match=r"label file .*FLARE22_Tr_0003_0000.*missing.*FLARE22_Tr_0003\.nii\.gz"):
        preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    assert _snapshot(out) == before

    # 2. the label is on another grid: that case fails, the others stay done and intact
    shifted = sitk.Image(labels)
    shifted.SetSpacing((3.0, 3.0, 2.5))
    sitk.WriteImage(shifted, str(data / "labels" / "FLARE22_Tr_0003.nii.gz"))
    with pytest.raises(MedSAMError, match=r"FLARE22_Tr_0003\.nii\.gz.*not on the grid.*spacing"):
        preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    manifest = load_manifest(out)
    assert not manifest["complete"] and "FLARE22_Tr_0003" in manifest["failed"]
    assert sorted(manifest["cases"]) == sorted(CASES)
    now = _snapshot(out)
    assert {k: v for k, v in now.items() if k.endswith(".npz")} == {k: v for k, v in before.items() if k.endswith(".npz")}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # 3. an empty label map
    empty = sitk.Image(labels)
    empty = empty * 0
    sitk.WriteImage(empty, str(data / "labels" / "FLARE22_Tr_0003.nii.gz"))
    with pytest.raises(MedSAMError, match=r"FLARE22_Tr_0003\.nii\.gz.*empty"):
        preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))

    # 4. an image file that is not an image
    (data / "labels" / "FLARE22_Tr_0003.nii.gz").unlink()
    sitk.WriteImage(labels, str(data / "labels" / "FLARE22_Tr_0003.nii.gz"))
    (data / "images" / "FLARE22_Tr_0003_0000.nii.gz").write_text("not an image")
    with pytest.raises(MedSAMError, match=r"image file .*FLARE22_Tr_0003_0000\.nii\.gz.*cannot be used"):
        preprocess_dataset(data, out, PreprocessSettings.preset("litemedsam"))
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".npz")} == {
        k: v for k, v in before.items() if k.endswith(".npz")}

    # 5. not a FLARE22 folder at all
    with pytest.raises(MedSAMError, match="images/"):
        preprocess_dataset(tmp_path / "nothing", tmp_path / "prep2")
    assert not (tmp_path / "prep2").exists()


def test_truncated_case_is_skipped_and_training_refuses_the_incomplete_preparation(tmp_path, flare_dir):
    """Issue 11: SimpleITK reads a truncated NIfTI with zeros in place of the missing voxels, which
    became blank training slices that still carried labels; and `train` then ran on the half-failed
    preparation with no validation, no best.pth and no word."""
    data = tmp_path / "data"
    shutil.copytree(flare_dir, data)
    held_out = data / "images" / "FLARE22_Tr_0002_0000.nii.gz"
    held_out.write_bytes(held_out.read_bytes()[: held_out.stat().st_size // 2])
    prep = tmp_path / "prep"
    with pytest.raises(MedSAMError, match=r"FLARE22_Tr_0002_0000\.nii\.gz.*is truncated: it holds"):
        preprocess_dataset(data, prep, PreprocessSettings.preset("litemedsam"))
    manifest = load_manifest(prep)
    assert not manifest["complete"] and list(manifest["failed"]) == ["FLARE22_Tr_0002"]
    assert list(manifest["cases"]) == ["FLARE22_Tr_0001"]
    assert sorted(p.name for p in prep.glob("*.npz")) == ["FLARE22_Tr_0001.npz"]  # never training data

    run = tmp_path / "run"
    args = ["train", "--data", prep, "--out", run, "--model", "litemedsam", "--labels", str(GALLBLADDER),
            "--freeze-image-encoder", "--batch-size", "1", "--max-steps", "1", "--device", "cpu", "--quiet"]
    code, _, err = _cli(args)
    assert code == 2 and "is incomplete: 1 case(s) could not be prepared (FLARE22_Tr_0002)" in err
    assert "--allow-incomplete" in err and not run.exists()
    code, _, err = _cli([*args, "--allow-incomplete"])  # the held-out case was the one that failed
    assert code == 2 and "held-out (validation) split" in err and "are not prepared" in err
    assert "--no-validation" in err and not run.exists()
    code, _, err = _cli([*args, "--allow-incomplete", "--no-validation"])  # knowingly: runs, and says so
    assert code == 0, err
    assert "warning: training on an incomplete preparation (--allow-incomplete)" in err
    assert (run / "latest.pth").is_file() and not (run / "best.pth").exists()


def test_window_warning_is_recorded_for_ct_without_its_rescale(tmp_path, flare_dir):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copytree(flare_dir / "labels", data / "labels")
    for name in CASES:
        image = sitk.ReadImage(str(flare_dir / "images" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(image + 1024, str(data / "images" / f"{name}_0000.nii.gz"))  # raw scanner values
    code, out, err = _cli(["preprocess", data, tmp_path / "prep", "--preset", "litemedsam", "--quiet"])
    assert code == 0, err
    assert "warning: case 'FLARE22_Tr_0001': the image's values" in err and "no air or fat" in err
    entry = load_manifest(tmp_path / "prep")["cases"]["FLARE22_Tr_0001"]
    assert "Hounsfield" in entry["warnings"][0]


# ---------------------------------------------------------------------------------------------
# dataset


def test_dataset_samples(prep_lite):
    ds = SliceDataset(prep_lite, "train", "litemedsam", 256, jitter=3, seed=7)
    manifest = load_manifest(prep_lite)
    assert len(ds) == manifest["n_slices"]["train"]
    item = ds[5]
    assert item["image"].shape == (3, 256, 256) and item["mask"].shape == (1, 256, 256)
    assert item["box"].shape == (4,) and item["mask"].dtype == torch.float32
    again = ds[5]
    assert all(torch.equal(item[k], again[k]) for k in item)  # deterministic per (seed, epoch, index)
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.add((int(ds[5]["label"]), tuple(ds[5]["box"].tolist())))
    assert len(draws) > 1
    # geometry: the slice (101 x 122) fills 212 x 256 of the input; the mask follows it
    image, labels = ds.slice_arrays(5)
    prepared = ds.prepare(5)
    assert prepared.resized_hw == (212, 256)
    label = int(item["label"])
    mask = labels == label
    low = mask_to_low_res(mask, prepared)
    assert low[212:].sum() == 0 and abs(low.sum() / (212 * 256) - mask.mean()) < 0.02
    np.testing.assert_array_equal(item["mask"][0].numpy(), low)
    x0, y0, x1, y1 = mask_box(mask)
    scale = 256 / 122
    bx = item["box"].numpy() / scale
    assert x0 - 3 - 1e-4 <= bx[0] <= x0 + 1e-4 and y0 - 3 - 1e-4 <= bx[1] <= y0 + 1e-4
    assert x1 - 1e-4 <= bx[2] <= x1 + 3 + 1e-4 and y1 - 1e-4 <= bx[3] <= y1 + 3 + 1e-4
    # jitter is clipped to the slice
    rng = np.random.default_rng(0)
    box = jitter_box((0, 0, 121, 100), (101, 122), 20, rng)
    assert box.tolist() == [0, 0, 121, 100]
    # MedSAM geometry: the whole slice stretched to 1024 -> 256x256 mask grid
    med = SliceDataset(prep_lite, "val", "medsam", 1024, jitter=0, labels=[GALLBLADDER])
    s = med[0]
    assert s["image"].shape == (3, 1024, 1024)
    img, lab = med.slice_arrays(0)
    m = lab == GALLBLADDER
    gx0, gy0, gx1, gy1 = mask_box(m)
    np.testing.assert_allclose(s["box"].numpy(), [gx0 * 1024 / 122, gy0 * 1024 / 101, gx1 * 1024 / 122,
                                                  gy1 * 1024 / 101], rtol=1e-5)
    assert abs(s["mask"].sum().item() / 256**2 - m.mean()) < 0.01


# ---------------------------------------------------------------------------------------------
# loss and config


def test_loss_is_dice_plus_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    inter = (p * target).sum((2, 3))
    dice = 1 - (2 * inter + 1e-5) / ((p**2).sum((2, 3)) + (target**2).sum((2, 3)) + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(dice_bce_loss(logits, target), dice.mean() + bce)
    perfect = dice_bce_loss(target * 40 - 20, target)
    assert perfect.item() < 1e-6


def test_config_file_roundtrip(tmp_path):
    cfg = TrainConfig(data="prep", out="run", labels=[4, 9], freeze_image_encoder=True, max_steps=5)
    path = cfg.to_file(tmp_path / "cfg.json")
    back = TrainConfig.from_file(path)
    assert back.data == str((tmp_path / "prep").resolve()) and back.labels == [4, 9] and back.max_steps == 5
    (tmp_path / "bad.json").write_text(json.dumps({"data": "x", "out": "y", "learning_rate": 1}))
    with pytest.raises(MedSAMError, match="learning_rate"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(MedSAMError, match="amp"):
        TrainConfig(data="x", out="y", amp="fp8").validate()


# ---------------------------------------------------------------------------------------------
# fine-tuning


def _log(run: Path):
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_finetune_raises_heldout_dice(finetuned):
    """Pancreas on the held-out upper slices: pretrained LiteMedSAM is weak (~0.63); 20 decoder
    steps (batch 4, lr 1e-4) on the lower slices' pancreas raise it (measured: 0.627 -> 0.675).

    A quality measurement, two thirds of this file's time (355 of 542 s with a load of ~10 on
    2 cores, 2026-12-07): ``-m slow``. The default run trains for real in ``trained`` (2 steps) and
    in the resume, job-runner and torchrun tests."""
    config, result, events = finetuned
    run = Path(config.out)
    vals = [e for e in events if e["event"] == "validation"]
    before, after = vals[0], vals[-1]
    assert before["step"] == 0 and after["step"] == 20 == result.step
    d0, d1 = before["dice"][str(PANCREAS)], after["dice"][str(PANCREAS)]
    print(f"held-out pancreas Dice: pretrained {d0:.4f} -> fine-tuned {d1:.4f}")
    assert d0 < 0.75, "the pretrained model should be weak here"
    assert d1 > d0 + 0.025
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21)) and all(e["total_steps"] == 20 for e in steps)
    rows = _log(run)
    assert rows[0]["step"] == "0" and float(rows[0]["val_dice_4"]) == pytest.approx(d0, abs=1e-5)
    assert rows[-1]["step"] == "20" and float(rows[-1]["val_mean_dice"]) == pytest.approx(d1, abs=1e-5)
    logged = [r["step"] for r in rows if r["loss"]]
    assert {"5", "10", "15", "20"} <= set(logged) and not rows[0]["loss"]  # every 5 steps and each epoch end
    png = (run / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainConfig.from_file(run / "config.json") == config


def test_checkpoints_load_weights_only_and_export(trained, tmp_path):
    config, result, _ = trained
    run = Path(config.out)
    for name in ("latest.pth", "best.pth"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "epoch", "step", "rng", "config", "architecture", "model_name",
                "metrics"} <= set(ckpt)
        assert ckpt["architecture"] == "tiny_vit" and ckpt["model_name"] == "litemedsam"
    latest = load_checkpoint(run / "latest.pth")
    assert latest["step"] == config.max_steps == latest["metrics"]["validation"]["step"]
    best = load_checkpoint(run / "best.pth")
    assert best["metrics"]["best_mean_dice"] == pytest.approx(result.best_mean_dice)
    # frozen parts did not move; the decoder did
    from MedSAMSlicerLib.models.registry import get_spec, resolve_weights

    original = torch.load(resolve_weights(get_spec("litemedsam")), map_location="cpu", weights_only=True)
    sd = latest["model"]
    assert all(torch.equal(sd[k], original[k]) for k in sd if k.startswith(("image_encoder.", "prompt_encoder.",
                                                                            "mask_decoder.iou_prediction_head")))
    assert any(not torch.equal(sd[k], original[k]) for k in sd if k.startswith("mask_decoder.transformer"))
    # export -> plain state dict that checkpoints.load_model loads strictly
    from MedSAMSlicerLib.models.checkpoints import load_model

    out = export(run / "latest.pth", tmp_path / "exported.pth")
    plain = torch.load(out, map_location="cpu", weights_only=True)
    assert set(plain) == set(sd) and all(isinstance(v, torch.Tensor) for v in plain.values())
    model = load_model("litemedsam", out, "cpu")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # evaluate the exported weights: the trainer's last validation, again
    res = evaluate(out, config.data, model="litemedsam", labels=[PANCREAS], device="cpu")
    assert res["dice"][str(PANCREAS)] == pytest.approx(latest["metrics"]["validation"]["dice"][str(PANCREAS)],
                                                       abs=1e-6)
    with pytest.raises(MedSAMError, match="not a training checkpoint"):
        export(out, tmp_path / "again.pth")


def test_diverged_training_checkpoint_is_refused(trained, tmp_path):
    """NaN weights (a diverged fine-tune) are refused by export, evaluate and resume."""
    config, _, _ = trained
    ckpt = torch.load(Path(config.out) / "latest.pth", map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["model"] if k.startswith("mask_decoder.transformer"))
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "latest.pth")
    with pytest.raises(MedSAMError, match="NaN or infinite weights"):
        export(run / "latest.pth", tmp_path / "plain.pth")
    assert not (tmp_path / "plain.pth").exists()
    with pytest.raises(MedSAMError, match="NaN or infinite weights"):
        evaluate(run / "latest.pth", config.data, labels=[PANCREAS], device="cpu")
    resumed = TrainConfig.from_dict({**config.to_dict(), "out": str(run)})
    with pytest.raises(MedSAMError, match="NaN or infinite weights.*diverged"):
        train(resumed, resume=True)


def _resume_config(prep: Path, out: Path) -> TrainConfig:
    # 6 gallbladder slices, batch 1 x accumulate 2: 3 steps per epoch; step 4 is in epoch 2
    return TrainConfig(data=str(prep), out=str(out), labels=[GALLBLADDER], freeze_image_encoder=True,
                       batch_size=1, accumulate=2, max_steps=4, epochs=10, jitter=4, validation=False,
                       log_every=1, device="cpu")


def test_resume_is_step_exact(prep_lite, tmp_path):
    straight = train(_resume_config(prep_lite, tmp_path / "straight"))
    assert straight.step == 4 and straight.epoch == 1

    cancel = CancelToken()

    def stop_after_two(done, total, message):
        if done == 2:
            cancel.cancel()

    run = tmp_path / "interrupted"
    with pytest.raises(Cancelled):
        train(_resume_config(prep_lite, run), progress=stop_after_two, cancel=cancel)
    ck = load_checkpoint(run / "latest.pth")
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (2, 0, 2)
    with pytest.raises(MedSAMError, match="resume"):
        train(_resume_config(prep_lite, run))
    changed = _resume_config(prep_lite, run)
    changed.lr = 1e-3
    with pytest.raises(MedSAMError, match="lr"):
        train(changed, resume=True)
    resumed = train(_resume_config(prep_lite, run), resume=True)
    assert resumed.step == 4
    a = load_checkpoint(tmp_path / "straight" / "latest.pth")
    b = load_checkpoint(run / "latest.pth")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    assert [r["step"] for r in _log(run)] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in _log(run)] == [r["loss"] for r in _log(tmp_path / "straight")]


# ---------------------------------------------------------------------------------------------
# command line


def _cli(args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_cli_preprocess_evaluate_and_errors(tmp_path, flare_dir, trained):
    config, _, _ = trained
    code, out, err = _cli(["preprocess", flare_dir, tmp_path / "prep", "--preset", "litemedsam", "--progress-json"])
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["event"] == "result" and lines[-1]["val"] == ["FLARE22_Tr_0002"]
    assert any(e["event"] == "progress" and e["stage"] == "preprocess" for e in lines)
    code, out, err = _cli(["evaluate", "--checkpoint", Path(config.out) / "best.pth", "--data", config.data,
                           "--labels", "4", "--device", "cpu", "--json", tmp_path / "eval.json", "--quiet"])
    assert code == 0, err
    assert "pancreas" in out and json.loads((tmp_path / "eval.json").read_text())["model"] == "litemedsam"
    # bad input: exit code 2, a message on stderr, nothing written
    code, out, err = _cli(["preprocess", tmp_path / "missing", tmp_path / "never"])
    assert code == 2 and "images/" in err and not (tmp_path / "never").exists()
    code, out, err = _cli(["train", "--data", tmp_path / "missing", "--out", tmp_path / "run", "--progress-json"])
    assert code == 2 and "manifest.json" in err and json.loads(out.splitlines()[-1])["event"] == "error"
    assert not (tmp_path / "run").exists()
    code, out, err = _cli(["export", tmp_path / "nope.pth", tmp_path / "x.pth"])
    assert code == 2 and "not found" in err and not (tmp_path / "x.pth").exists()
    code, _, err = _cli(["train", "--data", "p", "--out", "r", "--write-config", tmp_path / "c.json"])
    assert code == 0 and TrainConfig.from_file(tmp_path / "c.json").out.endswith("r")
    with pytest.raises(SystemExit) as info:
        _cli(["--help"])
    assert info.value.code == 0


# ---------------------------------------------------------------------------------------------
# background job runner (what the Slicer panel uses) and DDP


def _job_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_job_runner_trains_from_raw_data_and_cancels(tmp_path, flare_dir):
    from MedSAMTrainingLib.jobs import TrainingJob

    settings = {"data": str(flare_dir), "out": str(tmp_path / "run"), "model": "litemedsam", "labels": [GALLBLADDER],
                "freeze_image_encoder": True, "batch_size": 1, "epochs": 50, "jitter": 2, "validation": False,
                "save_every": 1, "device": "cpu"}
    exported = tmp_path / "models" / "run-litemedsam.pth"
    # The limits below only guard against a hang: a loaded 2-core machine is slow, not wrong.
    job = TrainingJob(settings, env=_job_env(), preprocess={"preset": "litemedsam"}, grace_s=300, export_to=exported)
    job.start()
    assert job.command[3] == "preprocess" and len(job.commands) == 2
    assert job.commands[1][-4:] == ["--export-to", str(exported), "--progress-json", "--stop-on-stdin"]
    events, deadline = [], time.monotonic() + 900
    while job.running and time.monotonic() < deadline:
        events += job.poll()
        if any(e.get("event") == "step" for e in events):
            # What the Slicer panel does when Slicer closes: stop, wait, nothing left running.
            assert job.stop(300) == cli.EXIT_CANCELLED, job.error_text()
        time.sleep(0.2)
    assert job.wait(300) == cli.EXIT_CANCELLED, job.error_text()
    events += job.poll()
    # The process exported the step it stopped at by itself: a plain LiteMedSAM weights file.
    assert any(e.get("event") == "exported" and e.get("source") == "latest.pth" for e in events), events
    from MedSAMSlicerLib.models.checkpoints import load_model

    load_model("litemedsam", exported, device="cpu")
    assert any(e.get("event") == "progress" and e.get("stage") == "preprocess" for e in events)
    assert events[-1] == {"event": "exit", "returncode": cli.EXIT_CANCELLED, "cancelled": True}
    ck = load_checkpoint(tmp_path / "run" / "latest.pth")  # the step it stopped at, complete
    assert ck["step"] >= 1
    assert load_manifest(tmp_path / "run" / "dataset")["complete"]
    # a failing command: exit code 2 and its message
    bad = TrainingJob(commands=[["export", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")]], env=_job_env())
    bad.start()
    assert bad.wait(600) == 2 and "not found" in bad.error_text()


def test_torchrun_two_cpu_processes(prep_lite, tmp_path):
    run = tmp_path / "ddp"
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "MedSAMSlicerLib.training.cli",
               "train", "--data", str(prep_lite), "--out", str(run), "--labels", str(GALLBLADDER),
               "--freeze-image-encoder", "--batch-size", "1", "--max-steps", "2", "--no-validation",
               "--device", "cpu", "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=_job_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck = load_checkpoint(run / "latest.pth")
    assert ck["world_size"] == 2 and ck["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "latest.pth", "log.csv", "training.png"]


# ---------------------------------------------------------------------------------------------
# stopping a run behind Slicer's launcher (PythonSlicer -> python-real; Testing/launcher_replay.py)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())  # a zombie has ended


def _launcher_settings(prep_lite, run):
    return {"data": str(prep_lite), "out": str(run), "model": "litemedsam", "labels": [GALLBLADDER],
            "freeze_image_encoder": True, "batch_size": 1, "epochs": 50, "jitter": 2, "validation": False,
            "save_every": 1, "device": "cpu"}


@pytest.mark.skipif(os.name != "posix", reason="the launcher shim is a POSIX shell script")
def test_cancel_stops_the_real_trainer_behind_slicers_launcher(prep_lite, tmp_path):
    """Cancel with PythonSlicer as the Python: the launcher forwards no signals, so the stop goes
    through the trainer's stdin; the real trainer (not the launcher) saves a resumable step and
    exits, and nothing is left running."""
    sys.path.insert(0, str(REPO / "Testing"))
    from launcher_replay import make_python_slicer

    from MedSAMTrainingLib.jobs import TrainingJob

    python_slicer = make_python_slicer(tmp_path / "bin")
    exported = tmp_path / "models" / "run-litemedsam.pth"
    job = TrainingJob(_launcher_settings(prep_lite, tmp_path / "run"), python=str(python_slicer), env=_job_env(),
                      grace_s=300, export_to=exported)
    job.start()
    # The limits below only guard against a hang: a loaded 2-core machine is slow, not wrong.
    events, deadline = [], time.monotonic() + 900
    while job.running and time.monotonic() < deadline and not any(e.get("event") == "step" for e in events):
        events += job.poll()
        time.sleep(0.2)
    assert any(e.get("event") == "step" for e in events), job.error_text()
    launcher, trainer = job._proc.pid, job.worker_pid
    assert trainer and trainer != launcher  # the trainer is the launcher's child, as in Slicer
    job.cancel()
    assert job.wait(600) == cli.EXIT_CANCELLED, job.error_text()
    assert not _alive(trainer) and not _alive(launcher)
    events += job.poll()
    assert any(e.get("event") == "cancelled" for e in events)
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["step"] >= 1  # resumable
    assert exported.is_file()


SLICER_STAND_IN = """
import json, sys, time
from MedSAMTrainingLib.jobs import TrainingJob
job = TrainingJob(json.loads(sys.argv[1]), python=sys.argv[2])
job.start()
while job.running:
    for event in job.poll():
        if event.get("event") == "step":
            print(job.worker_pid, flush=True)
    time.sleep(0.2)
"""


@pytest.mark.skipif(os.name != "posix", reason="the launcher shim is a POSIX shell script")
def test_trainer_stops_by_itself_when_slicer_is_killed(prep_lite, tmp_path):
    """The program that started the run (here a stand-in for Slicer, through the launcher) is
    killed without any chance to clean up: the trainer sees its stdin close, saves the step and
    exits by itself."""
    sys.path.insert(0, str(REPO / "Testing"))
    from launcher_replay import make_python_slicer

    from MedSAMTrainingLib.jobs import engine_folder

    env = _job_env()
    env["PYTHONPATH"] = os.pathsep.join([engine_folder(), str(REPO / "MedSAMTraining"), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    slicer = subprocess.Popen([sys.executable, "-c", SLICER_STAND_IN, json.dumps(_launcher_settings(prep_lite, run)),
                               str(make_python_slicer(tmp_path / "bin"))],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        trainer = int(slicer.stdout.readline())
        slicer.kill()  # SIGKILL: no quit handler, no cleanup
        slicer.wait(300)
        deadline = time.monotonic() + 600  # a hang guard: saving the step on a loaded machine is slow, not wrong
        while _alive(trainer) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(trainer), "the trainer kept running after Slicer went away"
    finally:
        slicer.kill()
    assert load_checkpoint(run / "latest.pth")["step"] >= 1


@pytest.mark.slow  # 1-2 min on 2 busy cores: the panel's run validates first (not configurable there)
@pytest.mark.skipif(os.name != "posix", reason="the launcher shim is a POSIX shell script")
def test_quitting_slicer_stops_the_run_the_panel_started(prep_lite, tmp_path):
    """The training panel, replayed on strict stand-ins, starts a run as a user would (its Python
    is PythonSlicer: the launcher replay, found on PATH as Slicer finds it); then Slicer quits in
    its own order (its onAboutToQuit unloads the modules first: the panel's cleanup() runs). The
    trainer, the launcher's child, saves its step and ends while Slicer is still alive."""
    sys.path.insert(0, str(REPO / "Testing"))
    import slicer_replay
    from launcher_replay import make_python_slicer

    install = slicer_replay.install_extension(tmp_path / "ext")
    bin_dir = tmp_path / "bin"
    make_python_slicer(bin_dir)
    env = _job_env()
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    env["MEDSAM_SLICER_CHECKPOINTS"] = str(tmp_path / "models")
    env.pop("PYTHONPATH", None)  # Slicer's Python has only the installed extension
    done = subprocess.run([sys.executable, str(REPO / "Testing" / "slicer_replay.py"), str(install),
                           "--quit-during-training", str(prep_lite), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"] and report["started"], report
    assert report["python"] == str(bin_dir / "PythonSlicer") and report["trainer"] != report["launcher"]
    assert report["stopped_before_slicer_exit"] and report["returncode"] == cli.EXIT_CANCELLED, report
    assert report["timer_slots_after_quit"] == 0  # cleanup() undid the timer's connection
    assert not _alive(report["trainer"])
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["step"] >= 0  # saved where it stopped: resumable
    assert list((tmp_path / "models").glob("*-litemedsam.pth")), "the stopped run's weights reach the model list"
