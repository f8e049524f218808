"""The model choice and the checkpoint folder (``MedSAMSlicerLib.models.model_choice``): one name rule
for what MedSAM Training exports and what the MedSAM module lists, without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from MedSAMSlicerLib.models import model_choice as mc


def test_checkpoint_folder_listing(tmp_path, monkeypatch):
    monkeypatch.setenv(mc.CHECKPOINT_DIR_ENV, str(tmp_path))
    assert mc.default_checkpoint_dir() == tmp_path
    assert mc.list_checkpoints() == []
    for name in ("liver-litemedsam.pth", "kidney-medsam.pth", "notes.txt", "old.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.pth").mkdir()
    found = mc.list_checkpoints()
    assert sorted(p.name for p in found) == ["kidney-medsam.pth", "liver-litemedsam.pth"]
    assert [mc.checkpoint_model(p) for p in ("a/liver-litemedsam.pth", "kidney-medsam.pth", "medsam_vit_b.pth", "x.pth")] == [
        "litemedsam", "medsam", "medsam", "litemedsam"]


def test_listing_is_newest_first_and_survives_a_missing_folder(tmp_path):
    assert mc.list_checkpoints(tmp_path / "absent") == []
    old, new = tmp_path / "a-litemedsam.pth", tmp_path / "b-litemedsam.pth"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert mc.list_checkpoints(tmp_path) == [new, old]


def test_exported_names_are_read_back_as_their_model():
    for model in mc.model_names():
        name = mc.checkpoint_file_name("my run/liver", model)
        assert name == f"my_run_liver-{model}.pth"
        assert mc.checkpoint_model(name) == model
    with pytest.raises(ValueError, match="unknown model"):
        mc.checkpoint_file_name("x", "sam2")


def test_choices_list_the_registry_then_the_folder(tmp_path):
    (tmp_path / "liver-litemedsam.pth").write_bytes(b"x")
    elsewhere = mc.ModelChoice.for_file(tmp_path.parent / "other-medsam.pth")
    choices = mc.model_choices(tmp_path, extra=[elsewhere, mc.ModelChoice("litemedsam")])
    assert [c.model for c in choices] == ["litemedsam", "medsam", "medsam2", "litemedsam", "medsam"]
    assert choices[3] == mc.ModelChoice("litemedsam", str(tmp_path / "liver-litemedsam.pth"))
    assert choices[-1] is elsewhere
    assert choices[0].label() == "LiteMedSAM" and choices[2].label() == "MedSAM2"
    assert choices[3].label() == "liver-litemedsam.pth (LiteMedSAM, fine-tuned)"


def test_settings_with_a_stale_file_or_model_say_so(tmp_path):
    choice, problem = mc.parse_choice("medsam", "")
    assert choice == mc.ModelChoice("medsam") and problem is None
    choice, problem = mc.parse_choice("litemedsam", str(tmp_path / "gone.pth"))
    assert choice.checkpoint and "no longer exists" in problem
    choice, problem = mc.parse_choice("sam3", None)
    assert choice.model == "litemedsam" and "Unknown model" in problem


def test_listing_models_does_not_import_torch(tmp_path):
    """A panel opening lists models; that must not import torch on Slicer's GUI thread."""
    code = ("import sys; from MedSAMSlicerLib.models import model_choice as mc; "
            f"c = mc.model_choices({str(tmp_path)!r}); [x.label() for x in c]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
