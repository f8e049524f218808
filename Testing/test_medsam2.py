"""MedSAM2 as the registry's third model, on identical random weights (no MedSAM2 weights are reachable).

The reference is MedSAM2's own inference, ``medsam2_infer_3D_CT.py`` (bowang-lab/MedSAM2, commit
332f30d), replayed step by step on Meta's ``sam2`` package by the benchmark's
:class:`~MedSAMSlicerLib.bench.medsam2.ReferenceMedSAM2` (the one home of that replay, shared with
``medsam-slicer bench --models medsam2``): MedSAM2's predictor ``SAM2VideoPredictorNPZ`` is the
package's ``sam2_video_predictor_legacy.SAM2VideoPredictor`` line for line except that ``init_state``
takes the frames instead of a JPEG folder, so the reference calls the package's own ``init_state``
with its frame loader handing over the frames MedSAM2's script makes. Windowing,
``resize_grayscale_to_rgb_and_resize``, the normalisation, the two passes and ``getLargestCC`` are
written as the script writes them, none of it shared with the engine.

The real CT is cut to a few slices. MedSAM2's encoder costs 1-7 s per 512 px slice on a shared
2-core CPU, so the engine's behaviour is checked on the same network built for 128 px frames
(``build_medsam2(image_size=128)``: the same code and weights, 1/16 of the pixels), on both sides; the
512 px model goes through the Segmenter front door (2D, the command line's record and replay), and
the full 512 px comparison in 3D is marked slow (``pytest -m slow Testing/test_medsam2.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("sam2")

from MedSAMSlicerLib.bench.medsam2 import (  # noqa: E402
    ReferenceMedSAM2,
    get_largest_cc,
    medsam2_frames,
    medsam2_window,
)
from MedSAMSlicerLib.boxes import BoxPrompt  # noqa: E402
from MedSAMSlicerLib.errors import MedSAMError  # noqa: E402
from MedSAMSlicerLib.segmentation.corrections import Correction  # noqa: E402
from MedSAMSlicerLib.segmenter import Segmenter  # noqa: E402

#: Slices of the shipped CT (canonical z) the model runs on: liver and spleen on all four.
Z0, DEPTH = 80, 4
#: The engine tests' frame size (MedSAM2's is 512).
SMALL = 128
LIVER, SPLEEN = 5, 1
LEVEL_WIDTH = (40.0, 400.0)
LOWER, UPPER = -160.0, 240.0

# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine SAM 2's many small matrix products ran ~10x
    slower with two threads fighting other processes (3D on 4 slices at 128 px: 3.2 s vs 0.34 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded random MedSAM2 weights in MedSAM2's checkpoint layout ``{"model": state_dict}``."""
    from MedSAMSlicerLib.segmentation.medsam2 import build_medsam2

    torch.manual_seed(2024)
    model = build_medsam2()
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def crop(ct, labels, tmp_path_factory):
    """Slices ``Z0..Z0+3`` of the shipped CT as a file, read back: ``(volume, labels, path)``."""
    from MedSAMSlicerLib.fileio.volumes import read_volume

    image = sitk.GetImageFromArray(np.ascontiguousarray(ct.array[Z0:Z0 + DEPTH]).astype(np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))
    path = tmp_path_factory.mktemp("medsam2-ct") / "ct_crop.nii.gz"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    lab = sitk.GetImageFromArray(np.ascontiguousarray(labels[Z0:Z0 + DEPTH]).astype(np.uint8))
    lab.CopyInformation(image)
    lab_path = path.with_name("labels.nii.gz")
    sitk.WriteImage(lab, str(lab_path))
    return volume, read_volume(lab_path, labels=True).array, path


@pytest.fixture(scope="module")
def seg(weights, crop):
    """The front door at MedSAM2's 512 px: the process's shared Segmenter for these weights on the
    CPU (the one the Slicer effect's bridge gets for the same choice, :func:`shared_segmenter`)."""
    from MedSAMSlicerLib.segmenter import shared_segmenter

    segmenter = shared_segmenter("medsam2", weights, "cpu")
    segmenter.set_volume(crop[0].array, LEVEL_WIDTH)
    return segmenter


@pytest.fixture(scope="module")
def engine(weights, crop):
    """The engine on the same weights with 128 px frames (MedSAM2's windowing, as the Segmenter's)."""
    from MedSAMSlicerLib.segmentation.medsam2 import MedSAM2Engine, build_medsam2, window_volume

    model = build_medsam2(image_size=SMALL)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
    small = MedSAM2Engine(model.eval(), "random-128", torch.device("cpu"))
    small.set_volume(window_volume(crop[0].array, LOWER, UPPER))
    return small


@pytest.fixture(scope="module")
def reference(weights):
    return ReferenceMedSAM2(weights, torch.device("cpu"), SMALL)


def _box(labels, label, z):
    ys, xs = np.nonzero(labels[z] == label)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


# -- the preprocessing and post-processing steps, each against the script's ---------------------
def test_windowing_frames_and_largest_component_match_medsam2(crop):
    from MedSAMSlicerLib.segmentation.medsam2 import (
        Frames,
        connected_components_8,
        largest_component,
        window_volume,
    )

    raw = crop[0].array
    u8 = window_volume(raw, LOWER, UPPER)
    assert np.array_equal(u8, medsam2_window(raw, LOWER, UPPER))
    ref = medsam2_frames(u8[:2]).float()  # _get_image_feature's .float()
    frames = Frames(u8, [0, 1])
    assert len(frames) == 2
    assert all(torch.equal(frames[i], ref[i]) for i in range(2))

    rng = np.random.default_rng(7)
    blobs = rng.random((6, 20, 20)) > 0.7
    assert np.array_equal(largest_component(blobs), get_largest_cc(blobs))
    assert not largest_component(np.zeros((2, 3, 3), bool)).any()

    from skimage import measure

    masks = torch.from_numpy(rng.random((2, 1, 16, 16)) > 0.6)
    lab, counts = connected_components_8(masks)
    for i in range(2):
        ref_lab = measure.label(masks[i, 0].numpy(), connectivity=2)
        areas = np.bincount(ref_lab.ravel())
        areas[0] = 0
        assert np.array_equal(counts[i, 0].numpy(), areas[ref_lab])
        assert np.array_equal(lab[i, 0].numpy() > 0, ref_lab > 0)


# -- the masks, against MedSAM2's script ----------------------------------------------------------
def test_2d_and_3d_masks_equal_medsam2s_inference(engine, reference, crop):
    volume, lab, _ = crop
    box = _box(lab, LIVER, 1)
    key_mask, ref_3d = reference.segment(volume.array, [(1, box)])
    assert 0 < ref_3d.sum() < ref_3d.size  # random weights, yet masks with edges: the check can fail

    two = engine.segment_slice(1, box)
    assert np.array_equal(two.mask, key_mask)
    three = engine.propagate(1, box)
    assert np.array_equal(three.mask, ref_3d)
    assert three.locked == (1,) and len(three.prompts) == 1
    assert set(three.stop_reasons) == {"up", "down"}
    assert [r.z for r in three.slices] == list(range(DEPTH))
    # Features are computed once per slice and kept: the 2D slice was not encoded again.
    assert engine.encoded_slices == DEPTH


def test_one_direction_and_z_range(engine, crop):
    volume, lab, _ = crop
    box = _box(lab, LIVER, 1)
    up = engine.propagate(1, box, direction="up")
    assert not up.mask[0].any() and up.mask[1].any() and set(up.stop_reasons) == {"up"}
    ranged = engine.propagate(1, box, z_range=(1, 2))
    assert not ranged.mask[[0, 3]].any() and ranged.mask[1].any()
    assert "z-range" in ranged.stop_reasons["up"]
    with pytest.raises(MedSAMError, match="outside the z-range"):
        engine.propagate(0, box, z_range=(1, 2))
    assert engine.encoded_slices == DEPTH


def test_correction_is_a_new_prompt_in_sam2s_memory(engine, reference, crop):
    """A box on another slice joins the first as a conditioning frame (SAM 2's video predictor's
    way): the result is MedSAM2's passes with both boxes in the memory."""
    volume, lab, _ = crop
    first, fix = _box(lab, LIVER, 1), _box(lab, LIVER, 3)
    before = engine.propagate(1, first)
    after = engine.correct(before, [Correction.with_box(3, fix)])
    _, expected = reference.segment(volume.array, [(1, first), (3, fix)])
    assert np.array_equal(after.mask, expected)
    assert after.locked == (1, 3) and [p.z for p in after.prompts] == [1, 3]
    assert before.locked == (1,)  # not changed
    # A slice accepted as it is goes into the memory as a mask (add_new_mask).
    accepted = engine.correct(after, [Correction.accept(0)])
    assert accepted.locked == (0, 1, 3) and accepted.prompts[0].box is None
    assert [r.reason for r in accepted.slices if r.z in (0, 1, 3)] == ["accepted", "box", "box"]
    with pytest.raises(MedSAMError, match="one correction per slice"):
        engine.correct(after, [Correction.with_box(2, fix), Correction.accept(2)])


def test_several_structures_each_as_alone(engine, crop):
    volume, lab, _ = crop
    prompts = {"liver": BoxPrompt(1, _box(lab, LIVER, 1)), "spleen": BoxPrompt(2, _box(lab, SPLEEN, 2))}
    alone = {n: engine.propagate(p.z, p.box).mask for n, p in prompts.items()}
    job = engine.segment_structures(prompts)
    assert job.encoded_slices == 0  # every slice's features were computed before, once
    for name in prompts:
        mask = job.results[name].mask
        assert np.array_equal(mask, alone[name] & ~job.contested | (mask & job.contested))
        assert np.array_equal(mask & ~job.contested, alone[name] & ~job.contested)
    assert not (job.results["liver"].mask & job.results["spleen"].mask).any()
    assert (job.contested == (alone["liver"] & alone["spleen"])).all()


def test_front_door_2d_command_line_record_and_replay(seg, crop, tmp_path):
    """MedSAM2 at 512 px through the Segmenter and ``medsam-slicer segment``: the mask, the record
    in the segment's tags, and ``--replay`` giving the same mask."""
    from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd
    from MedSAMSlicerLib.segment_command import replay_file, segment_file
    from MedSAMSlicerLib.segmentation.provenance import Provenance

    volume, lab, path = crop
    x0, y0, x1, y1 = _box(lab, LIVER, 1)
    two = seg.segment(BoxPrompt(1, (x0, y0, x1, y1)), "2d")
    assert two.mask[1].any() and not two.mask[[0, 2, 3]].any() and two.covered == [1]
    out = tmp_path / "liver.seg.nrrd"
    box_ras = volume.canonical_to_ras(np.array([[x0, y0, 1], [x1, y1, 1]], dtype=float)).ravel().tolist()
    summary = segment_file(str(path), out, box_ras=box_ras, name="liver", slice_only=True, segmenter=seg,
                           progress=False)
    assert summary.startswith("liver:")
    written = read_seg_nrrd(out)
    assert np.array_equal(volume.orientation.to_canonical(written.mask_kji(written.segments[0])), two.mask)
    record = Provenance.from_tags(written.segments[0].tags)
    assert (record.model, record.mode, record.speed) == ("medsam2", "2d", "exact")
    again = replay_file(str(out), str(path), tmp_path / "again.seg.nrrd", segmenter=seg, progress=False)
    assert "the same mask as in the file" in again
    assert seg.memory.encoded_slices == 1  # the file's volume is the same voxels: its features were reused


def test_evaluate_command_runs_medsam2_through_the_segmenter(seg, weights, crop, tmp_path):
    """``medsam-slicer evaluate --model medsam2 --checkpoint FILE`` in a fresh process, every mode,
    on the real CT's liver (its label cut to slices 1..3 of 4, so the true z-range and the automatic
    extent differ). Random weights make the Dice meaningless; what is checked is that the rows, the
    CSV and the summary are written and that each row's mask is what the Segmenter's own calls give
    with the same weights (its Dice and extent against the label, recomputed here from those masks).
    The variant sets the window (the one setting that applies to MedSAM2), as the ``seg`` fixture's."""
    import dataclasses
    import os
    import subprocess
    import sys

    from scipy import ndimage as ndi

    from MedSAMSlicerLib.evaluation import report as R
    from MedSAMSlicerLib.evaluation.runner import label_box  # the simulated user's box (at least 2 px)
    from MedSAMSlicerLib.metrics import dice

    volume, lab, path = crop
    # The labels in the image's file order, the liver's removed from canonical slice 0.
    raw = sitk.ReadImage(str(path.with_name("labels.nii.gz")))
    kji = sitk.GetArrayFromImage(raw)
    k_of_z = volume.orientation.to_canonical(np.broadcast_to(np.arange(DEPTH)[:, None, None], kji.shape).copy())
    k0 = int(k_of_z[0, 0, 0])
    kji = np.where((kji == LIVER) & (np.arange(DEPTH)[:, None, None] == k0), 0, kji).astype(np.uint8)
    labels = sitk.GetImageFromArray(kji)
    labels.CopyInformation(raw)
    labels_path = tmp_path / "liver_1_3.nii.gz"
    sitk.WriteImage(labels, str(labels_path))
    ref = volume.orientation.to_canonical(kji) == LIVER
    assert [bool(ref[z].any()) for z in range(DEPTH)] == [False, True, True, True]

    out = tmp_path / "ev"
    modes = ["3d", "2d", "per-slice", "per-part", "loop"]
    cmd = [sys.executable, "-m", "MedSAMSlicerLib.cli", "evaluate", "--image", str(path), "--labels", str(labels_path),
           "--include", f"*/label_{LIVER}", "--min-slices", "3", "--modes", ",".join(modes), "--corrections", "1",
           "--set", "window=40,400",
           "--model", "medsam2", "--checkpoint", str(weights), "--device", "cpu", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MedSAM2 (hiera_t512, 512px) on cpu" in done.stderr
    rows = R.read_csv(out / "evaluation.csv")
    expected_modes = ["3d", "2d", "per-slice", "per-part", "loop-0", "loop-1"]
    assert [(r.case, r.structure, r.variant, r.mode) for r in rows] == [
        ("ct_crop", f"label_{LIVER}", "default", m) for m in expected_modes]
    for mode in expected_modes:
        assert f"| default | {mode} | 1 |" in done.stdout, done.stdout
    assert (out / "summary.md").read_text().count("| ct_crop") >= len(expected_modes)
    assert (out / "evaluation.png").stat().st_size > 10_000 and not (out / "evaluation.partial.csv").exists()
    box = _box(lab, LIVER, 2)
    assert all((r.z_true, r.slices_true, r.box_slice, r.box) == ("1-3", 3, 2, " ".join(map(str, box))) for r in rows)
    by_mode = {r.mode: r for r in rows}

    # The same masks from the Segmenter in this process (same weights, the window the variant set).
    seg.set_volume(volume.array, LEVEL_WIDTH)
    ranged = seg.segment(BoxPrompt(2, box, (1, 3)), "3d")
    auto = seg.segment(BoxPrompt(2, box), "3d")
    one_box = np.zeros_like(ref)
    parts = np.zeros_like(ref)
    for z in (1, 2, 3):
        one_box |= seg.segment(BoxPrompt(z, label_box(ref[z])), "2d").mask
        pieces, n = ndi.label(ref[z], structure=np.ones((3, 3), bool))
        for i in range(1, n + 1):
            parts |= seg.segment(BoxPrompt(z, label_box(pieces == i)), "2d").mask
    z_fix, kind = by_mode["loop-1"].corrected.split()
    z_fix = int(z_fix)
    if kind == "box":
        fixed = seg.correct(auto.result, [Correction.with_box(z_fix, label_box(ref[z_fix]))])
    else:
        erased = auto.result.mask.copy()
        erased[z_fix] = False
        fixed = seg.correct(dataclasses.replace(auto.result, mask=erased), [Correction.accept(z_fix)])
    masks = {"3d": ranged.mask, "2d": auto.mask, "per-slice": one_box, "per-part": parts, "loop-0": auto.mask,
             "loop-1": fixed.mask}
    assert ranged.mask.any() and not ranged.mask[0].any()  # random weights, yet masks: the checks can fail
    for mode, mask in masks.items():
        row = by_mode[mode]
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        found = f"{zs[0]}-{zs[-1]}" if zs.size else "-"
        assert (row.dice, row.slices_found, row.z_found) == (round(dice(mask, ref), 4), zs.size, found), mode


def test_effect_path_takes_medsam2_from_the_users_file_as_data(seg, weights, crop):
    """What the MedSAM module and its effect do with the user's weights file (MedSAMSlicer.py:
    ``checkpointChoice`` -> ``ModelChoice.for_file``; ``setModelChoice`` stores the model and the path
    as text, ``modelChoice`` reads them back with ``parse_choice``; ``bridge()`` builds
    ``MedSAMBridge(model=choice.model, checkpoint=choice.checkpoint)``), then a 2D box through the
    bridge on real MRML nodes (slicer-core): MedSAM2 is picked from the file's name, nothing in the
    bridge names it, and the segment is the Segmenter's mask (the shared model, its features reused)."""
    pytest.importorskip("slicer")
    from slicer_helpers import segment_kji

    from MedSAMBridgeLib import headless
    from MedSAMBridgeLib.MRMLBridge import MedSAMBridge
    from MedSAMSlicerLib.models.model_choice import ModelChoice, parse_choice

    volume, lab, path = crop
    chosen = ModelChoice.for_file(weights)
    stored, problem = parse_choice(chosen.model, chosen.checkpoint)  # through the settings, as text
    assert (stored, problem) == (ModelChoice("medsam2", str(weights)), None)
    bridge = MedSAMBridge(model=stored.model, checkpoint=stored.checkpoint, device="cpu")
    assert bridge.segmenter is seg  # one model per (model, weights, device, speed) in the process

    scene = headless.create_headless_scene()
    node = headless.load_volume(path)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAM")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    x0, y0, x1, y1 = _box(lab, LIVER, 1)
    box_ras = volume.canonical_to_ras(np.array([[x0, y0, 1], [x1, y1, 1]], dtype=float))
    encoded = seg.memory.encoded_slices
    segment_id, prediction = bridge.segment(node, segmentation, None, box_ras=[box_ras[0], box_ras[1]], mode="2d",
                                            window=LEVEL_WIDTH, segment_name="liver")
    got = volume.orientation.to_canonical(segment_kji(segmentation, segment_id, node))
    seg.set_volume(volume.array, LEVEL_WIDTH)
    expected = seg.segment(BoxPrompt(1, (x0, y0, x1, y1)), "2d").mask
    assert got.any() and np.array_equal(got.astype(bool), expected)
    assert seg.memory.encoded_slices == encoded  # the same voxels and window: slice 1's features reused


@pytest.mark.slow
def test_512px_3d_equals_medsam2s_inference_and_replays(seg, weights, crop):
    """MedSAM2's own 512 px network, 3D, against its script; then a 3D segment with a correction,
    recorded, replayed."""
    from MedSAMSlicerLib.segment_command import _correction_steps, _Done, _replay_corrections
    from MedSAMSlicerLib.segmentation.provenance import Provenance

    volume, lab, path = crop
    box = _box(lab, LIVER, 1)
    key_mask, ref_3d = ReferenceMedSAM2(weights, torch.device("cpu")).segment(volume.array, [(1, box)])
    three = seg.segment(BoxPrompt(1, box), "3d")
    assert np.array_equal(three.mask, ref_3d) and np.array_equal(seg.segment_slice(1, box).mask, key_mask)
    fixed = seg.correct(three.result, [Correction.with_box(3, _box(lab, LIVER, 3))])
    done = _Done("liver", BoxPrompt(1, box), three.mask, "", three.result)
    record = Provenance.of(seg, [[[0, 0, 0], [1, 1, 1]]], "3d", "both", {"id": "x", "structures": ["liver"]}, "v")
    assert record.model == "medsam2"
    corners = volume.canonical_to_ras(np.array([[*_box(lab, LIVER, 3)[:2], 3], [*_box(lab, LIVER, 3)[2:], 3]],
                                               dtype=float))
    steps = _correction_steps(volume, "liver", [{"kind": "box", "ras": corners.tolist()}])
    _replay_corrections(seg, done, steps)
    assert np.array_equal(done.mask, fixed.mask)


# -- registry, weights, model lists -------------------------------------------------------------
def test_registry_lists_medsam2_and_refuses_what_it_cannot_check(capsys, weights, tmp_path, monkeypatch):
    from MedSAMSlicerLib.cli import main
    from MedSAMSlicerLib.models.model_choice import checkpoint_model, model_choices
    from MedSAMSlicerLib.models.registry import get_spec, resolve_weights

    spec = get_spec("medsam2")
    assert (spec.architecture, spec.input_size, spec.propagation) == ("hiera_t512", 512, "memory")
    monkeypatch.setenv("MEDSAM_SLICER_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MedSAMError, match="no checksum"):
        resolve_weights(spec, download=True)
    assert main(["models"]) == 0
    assert "medsam2" in capsys.readouterr().out
    # The Slicer module's model list reads the registry.
    assert "medsam2" in [c.model for c in model_choices(tmp_path)]
    assert checkpoint_model("/x/MedSAM2_latest.pt") == "medsam2"
    # evaluate: what does not apply to MedSAM2 is refused by name, one line, before the model loads
    # (the checkpoint named here does not exist: a load would fail on it instead).
    for extra, message in ((["--variant", "original"], "variant 'original': MedSAM2 propagates with SAM 2's memory"),
                           (["--set", "stop.min_overlap=0.7"], "variant 'default': MedSAM2 propagates"),
                           (["--set", "enlarge=cubic"], "enlarge=cubic applies to LiteMedSAM and MedSAM"),
                           (["--embedding-cache", str(tmp_path / "emb")], "--embedding-cache keeps LiteMedSAM"),
                           (["--speed", "fastest"], "evaluate measures the 'exact' speed")):
        assert main(["evaluate", "--model", "medsam2", "--checkpoint", str(tmp_path / "absent.pt"),
                     "--out", str(tmp_path / "ev"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # Speed tiers convert LiteMedSAM/MedSAM encoders; MedSAM2 runs exact.
    with pytest.raises(MedSAMError, match="'exact' speed"):
        Segmenter("medsam2", checkpoint=weights, device="cpu", speed="fastest")


def test_wrong_model_weights_are_refused_by_name(weights):
    from MedSAMSlicerLib.models.checkpoints import load_model
    from MedSAMSlicerLib.models.registry import resolve_weights

    with pytest.raises(MedSAMError, match="for MedSAM2"):
        load_model("litemedsam", weights)
    with pytest.raises(MedSAMError, match="for LiteMedSAM"):
        load_model("medsam2", resolve_weights("litemedsam"))


def test_slicer_installs_medsam2s_packages_without_touching_torch(tmp_path):
    """Slicer's first-use plan for MedSAM2: Meta's sam2 and its helpers with --no-deps (the torch
    there stays) and --no-build-isolation, SAM2_BUILD_CUDA=0 in the pip child's environment; no
    weights download (no checksum: the user chooses the file)."""
    import sys

    from MedSAMBridgeLib import installs

    have = {"torch": "2.14.1", "scipy": "1.14.0", "tqdm": "4.67.1", "pillow": "11.0.0"}
    plan = installs.plan_installs("medsam2", version_of=have.get, weights_present=lambda name: False)
    assert [s.what for s in plan.steps] == ["MedSAM2's code (sam2==1.1.0 and its helpers)"]
    step = plan.steps[0]
    assert step.args[:5] == ("-m", "pip", "install", "--no-deps", "--no-build-isolation")
    assert "sam2==1.1.0" in step.args and not any(a.startswith("torch") for a in step.args)
    assert dict(step.env) == {"SAM2_BUILD_CUDA": "0"}
    assert installs.consent_question(plan)[1].startswith("SAM2_BUILD_CUDA=0 PythonSlicer -m pip install --no-deps")
    assert installs.plan_installs("medsam2").ready  # this environment has everything
    # The step's environment reaches the child process that runs it.
    probe = installs.InstallStep("probe", ("x",), ("-c", "import os; print('flag', os.environ['SAM2_BUILD_CUDA'])"),
                                 env=(("SAM2_BUILD_CUDA", "0"),))
    lines = []
    installs.run_plan(installs.InstallPlan([probe]), python=sys.executable, log=lines.append)
    assert "flag 0" in lines


@pytest.mark.slow
def test_headless_script_runs_medsam2(weights, crop, tmp_path):
    """``scripts/medsam_headless.py --model medsam2`` in a fresh process (slicer-core): the bridge and
    the engine take MedSAM2 as data; one slice (``--slice-only``) keeps it to one encoder run (still
    ~20-35 s on the shared machine: a fresh process builds the network and encodes at 512 px)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("slicer")
    volume, lab, path = crop
    x0, y0, x1, y1 = _box(lab, LIVER, 1)
    box = volume.canonical_to_ras(np.array([[x0, y0, 1], [x1, y1, 1]], dtype=float)).ravel()
    out = tmp_path / "liver.seg.nrrd"
    script = Path(__file__).resolve().parent.parent / "scripts" / "medsam_headless.py"
    cmd = [sys.executable, str(script), "--volume", str(path), "--box-ras", *map(str, box), "--output", str(out),
           "--segment-name", "liver", "--model", "medsam2", "--checkpoint", str(weights), "--device", "cpu",
           "--slice-only", "--window", "40", "400"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "liver" in done.stdout and out.is_file(), done.stdout
    from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd

    written = read_seg_nrrd(out)
    assert written.segments[0].tags["MedSAM.Model"] == "medsam2"
    mask = volume.orientation.to_canonical(written.mask_kji(written.segments[0]))
    assert mask[1].any() and not mask[[0, 2, 3]].any()
