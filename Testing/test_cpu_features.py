"""What this CPU can run (cpu_features.py): probed once, and every path that needs a feature falls back.

The fallback is tested on every machine by running a real child process whose oneDNN and torch
kernels are limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``): what a CPU
without AVX-512 gets (issue 27: a 2-core AMD EPYC where the bfloat16 path crashed in
``mkldnn._linear_pointwise``). On such a CPU itself the variables change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from MedSAMSlicerLib.bench.alternatives import alternatives, runnable
from MedSAMSlicerLib.models import cpu_features as C
from MedSAMSlicerLib.models import optimize as O
from MedSAMSlicerLib.models.speed import SPEED_TIERS, SpeedTier, speed_choices

LIB = str(Path(__file__).resolve().parents[1] / "MedSAMSlicer")
#: Limit oneDNN and torch's own kernels to AVX2, as on a CPU without AVX-512.
WITHOUT_AVX512 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _child(code: str, *args: str, env: dict) -> dict:
    full = dict(os.environ, PYTHONPATH=LIB + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""), **env)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_probes_run_once_and_the_paths_use_them():
    report = C.report()
    assert set(C.FEATURES) <= set(report) and report["torch_kernels"] == C.torch_kernels()
    for name, probe in C.FEATURES.items():
        assert probe() is report[name]  # remembered: the same answer object, no second probe
        assert report[name] is None or (isinstance(report[name], str) and report[name])
    assert O.fused_cpu_ops_available() == (C.fused_float32_missing() is None)
    assert O.bfloat16_matmuls_available() == (C.bfloat16_matmuls_missing() is None)
    if not C.cpu_has_native_bfloat16():
        assert "no native bfloat16" in C.bfloat16_matmuls_missing()
    lines = C.summary_lines()
    assert lines[0].startswith("CPU: ") and len(lines) == 1 + len(C.FEATURES)


def test_speed_settings_and_alternatives_say_what_this_cpu_runs():
    bf16 = SpeedTier("torch-bf16", "torch bf16", precision="bf16")
    assert bf16.unsupported() == C.bfloat16_matmuls_missing()
    assert all(t.unsupported() is None for t in SPEED_TIERS.values() if t.precision == "f32")
    assert [c[3] for c in speed_choices()] == [t.missing() or t.unsupported() for t in SPEED_TIERS.values()]
    tiers, skipped = runnable(alternatives())
    assert ("torch-bf16" in skipped) == (C.bfloat16_matmuls_missing() is not None)
    assert {t.name for t in tiers} | set(skipped) == {t.name for t in alternatives()}


_WITHOUT_AVX512_CHILD = """
import contextlib, io, json, sys, warnings
import numpy as np
from MedSAMSlicerLib.cli import main
from MedSAMSlicerLib.models import cpu_features as C
from MedSAMSlicerLib.bench.alternatives import alternatives, runnable
from MedSAMSlicerLib.models.optimize import BFloat16Linear
from MedSAMSlicerLib.segmenter import Segmenter
from MedSAMSlicerLib.models.speed import SpeedTier
from MedSAMSlicerLib.fileio.volumes import read_volume
ct, boxes = sys.argv[1], json.loads(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    asked = Segmenter("litemedsam", device="cpu", bfloat16_matmuls=True)
    emulated = Segmenter("litemedsam", device="cpu", precision="bfloat16", optimize=False)
exact = Segmenter("litemedsam", device="cpu")
volume = read_volume(ct).array
masks = {}
for name, seg in (("asked", asked), ("exact", exact)):
    seg.set_volume(volume, key="ct-sm")
    masks[name] = [seg.segment_slice(z, box).mask for z, box in boxes]
_, skipped = runnable(alternatives())
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    code = main(["models"])
print(json.dumps({
    "models": [code, listing.getvalue()],
    "kernels": C.torch_kernels(), "native": C.cpu_has_native_bfloat16(),
    "flags_bf16": bool(C.cpu_flags() & set(C.NATIVE_BF16_FLAGS)),
    "missing": C.bfloat16_matmuls_missing(), "call_error": C.bfloat16_matmul_call_error(),
    "asked": [asked.bfloat16_matmuls, any(isinstance(m, BFloat16Linear) for m in asked.model.modules()), asked.notes],
    "tier": SpeedTier("x", "x", precision="bf16").unsupported(), "emulated": [str(emulated.dtype), emulated.notes],
    "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    "same_masks": all(bool(np.array_equal(a, b)) for a, b in zip(masks["asked"], masks["exact"])),
    "mask_pixels": [int(m.sum()) for m in masks["exact"]], "skipped": skipped,
}))
"""


def test_without_avx512_bfloat16_falls_back_with_one_line_and_the_plain_masks(ct_sm_path, ct_sm_seg_path):
    """Issue 27 on any machine: bfloat16 asked for on a CPU limited to AVX2 gives the exact path's
    masks and one note per setting, never the oneDNN crash. (A speed recipe's bfloat16 takes the same
    switch in the Segmenter; here the menu's answer for one is checked.)"""
    from MedSAMSlicerLib.fileio.volumes import read_volume

    labels = read_volume(ct_sm_seg_path).array
    ys, xs = np.nonzero(labels[24] == 5)  # the liver on slice 24
    boxes = [[24, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]]]
    out = _child(_WITHOUT_AVX512_CHILD, str(ct_sm_path), json.dumps(boxes), env=WITHOUT_AVX512)
    assert out["kernels"] == "AVX2" and not out["native"]
    assert "no native bfloat16 (AVX512-BF16 or AMX)" in out["missing"]
    if out["flags_bf16"]:  # this CPU has it, the limit hides it: the crash of issue 27, caught by the probe
        assert "could not create a primitive descriptor" in out["call_error"]
    used, has_layers, notes = out["asked"]
    assert not used and not has_layers
    assert notes == [C.fallback_note("bfloat16_matmuls", out["missing"])] and "\n" not in notes[0]
    assert out["tier"] == out["missing"]  # a bfloat16 speed recipe: "not on this CPU", and the same fallback
    dtype, emulated_notes = out["emulated"]
    assert dtype == "torch.bfloat16" and len(emulated_notes) == 1 and "emulated" in emulated_notes[0]
    assert sorted(out["warnings"]) == sorted(notes + emulated_notes)  # each once, in the user's words
    assert out["same_masks"] and min(out["mask_pixels"]) > 50
    assert {"torch-bf16", "openvino-bf16"} <= set(out["skipped"])
    code, listing = out["models"]  # `medsam-slicer models` says what this CPU supports
    assert code == 0 and "torch kernels: AVX2; native bfloat16: no" in listing
    assert "bfloat16 matrix products: no, this CPU has no native bfloat16 (AVX512-BF16 or AMX)" in listing
    assert "bfloat16 autocast: yes, emulated (slower than float32)" in listing
