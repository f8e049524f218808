"""What this CPU can run: probed once per process by tiny real calls, and remembered.

The optimised CPU paths rest on processor features that not every x86-64 CPU has:

- **oneDNN fused float32 kernels** (``mkldnn._convolution_pointwise``, ``mkldnn._linear_pointwise``):
  convolution / linear + GELU or + residual in one call (:mod:`.optimize`, the default path).
  Present in torch's x86 and ARM builds; checked against the plain ops.
- **bfloat16 matrix products** (the opt-in ``bfloat16_matmuls`` and the ``bf16`` torch speed
  recipe): only worth it, and on some CPUs only possible, with native bfloat16 (AVX512-BF16 or
  AMX). Without it oneDNN has no bfloat16 inner-product kernel: the fused call raises
  ``could not create a primitive descriptor for the inner product forward propagation primitive``
  (a 2-core AMD EPYC without AVX-512, issue 27).
- **bfloat16 autocast** (``precision="bfloat16"`` on a CPU): runs on any x86-64 CPU, but without
  native bfloat16 it is emulated and several times slower than float32.
- **OpenVINO bfloat16** (the ``bf16`` OpenVINO recipe): OpenVINO computes in bfloat16 only where the
  CPU has it and silently in float32 elsewhere; the probe asks a compiled one-layer model which
  precision it actually uses.

Each ``*_missing()`` function returns ``None`` when the feature runs here, else one line saying
why not, in the user's terms (the same convention as :func:`.speed.runtime_missing`). Every path
built on a feature asks here before it is offered and otherwise takes the plain path with that
line as a note (:data:`FALLBACK_NOTES`). A probe is a real call in a ``try``: CPU flags alone
are not enough (a virtual machine or ``ONEDNN_MAX_CPU_ISA`` can hide what ``/proc/cpuinfo``
lists), and a failed probe never raises.

To see what a CPU without AVX-512 gets on one that has it, limit oneDNN and torch's own kernels
before Python starts: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (docs/cpu-support.md).
"""

from __future__ import annotations

import functools
import platform
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

#: Native bfloat16 in the CPU's instruction set (x86: AVX512-BF16 or AMX).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _first_line(exc: BaseException) -> str:
    """The error's message in one line, without OpenVINO's source locations and oneDNN's debug hint."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip() and not s.startswith("Exception from")]
    line = lines[0] if lines else type(exc).__name__
    return line.split(". Run workload")[0]


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_kernels() -> str:
    """The instruction set torch's own CPU kernels use here (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX) and oneDNN may use it.

    The CPU's flags (torch's cpuinfo, else ``/proc/cpuinfo``) and oneDNN's own view (which
    ``ONEDNN_MAX_CPU_ISA`` or a virtual machine hiding AVX-512 state can narrow) must both say so.
    """
    flags = False
    has = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        flags = bool(has is not None and (has() or (amx is not None and amx())))
    except RuntimeError:
        pass
    flags = flags or bool(cpu_flags() & set(NATIVE_BF16_FLAGS))
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return flags and (onednn is None or bool(onednn()))
    except RuntimeError:
        return flags


def _mkldnn_ops_present() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            torch.backends.mkldnn.is_available()
            and ops is not None
            and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def fused_float32_missing() -> Optional[str]:
    """``None`` when oneDNN's fused float32 convolution/linear + GELU/residual calls run here and give
    the plain ops' result (tolerance 1e-4 on small random inputs), else why not."""
    if not _mkldnn_ops_present():
        return f"this torch build ({torch.__version__}) has no oneDNN fused kernels"
    try:
        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last
        x = torch.randn(1, 8, 9, 9, generator=gen).contiguous(memory_format=cl)
        r = torch.randn(1, 8, 9, 9, generator=gen).contiguous(memory_format=cl)
        w = torch.randn(8, 1, 3, 3, generator=gen).contiguous(memory_format=cl)
        b = torch.randn(8, generator=gen)
        xl = torch.randn(5, 16, generator=gen)
        wl = torch.randn(12, 16, generator=gen)
        bl = torch.randn(12, generator=gen)
        mk = torch.ops.mkldnn
        with torch.no_grad():
            added = mk._convolution_pointwise.binary(x, r, w, b, [1, 1], [1, 1], [1, 1], 8, "add", None, None, [],
                                                     None)
            pairs = [
                (added, F.conv2d(x, w, b, 1, 1, 1, 8) + r),
                (mk._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 8, "gelu", [], "none"),
                 F.gelu(F.conv2d(x, w, b, 1, 1, 1, 8))),
                (mk._linear_pointwise(xl, wl, bl, "gelu", [], "none"), F.gelu(F.linear(xl, wl, bl))),
            ]
        if not all(torch.allclose(got, want, atol=1e-4, rtol=1e-4) for got, want in pairs):
            return "oneDNN's fused kernels disagree with the plain ones on this CPU"
    except Exception as exc:  # a missing op, a changed signature, a CPU oneDNN cannot serve
        return f"oneDNN's fused kernels do not run here ({_first_line(exc)})"
    return None


@functools.cache
def bfloat16_matmuls_missing() -> Optional[str]:
    """``None`` when bfloat16 matrix products (fused with GELU through oneDNN, and plain) run here on
    native bfloat16 hardware and agree with float32 to bfloat16 rounding, else why not."""
    if not cpu_has_native_bfloat16():
        return "this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
    return bfloat16_matmul_call_error()


@functools.cache
def bfloat16_matmul_call_error() -> Optional[str]:
    """The real call behind :func:`bfloat16_matmuls_missing`, whatever the flags say: ``None`` when
    bfloat16 products (``F.linear`` and oneDNN's fused ``_linear_pointwise``) run and agree with
    float32 to bfloat16 rounding, else why not (without native bfloat16 oneDNN has no kernel)."""
    try:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(6, 32, generator=gen)
        w = torch.randn(16, 32, generator=gen)
        b = torch.randn(16, generator=gen)
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        want = F.linear(xb.float(), wb.float(), bb.float())
        with torch.no_grad():
            outs = [(F.linear(xb, wb, bb), want)]
            if _mkldnn_ops_present():
                mk = torch.ops.mkldnn
                outs.append((mk._linear_pointwise(xb, wb, bb, "gelu", [], "none"), F.gelu(want)))
                outs.append((mk._linear_pointwise(xb, wb, bb, "none", [], ""), want))
        scale = float(want.abs().max())
        if not all(got.dtype == torch.bfloat16 and float((got.float() - ref).abs().max()) <= 0.05 * scale
                   for got, ref in outs):
            return "bfloat16 matrix products give wrong numbers on this CPU"
    except Exception as exc:
        return f"oneDNN cannot compute bfloat16 matrix products on this CPU ({_first_line(exc)})"
    return None


@functools.cache
def bfloat16_autocast_missing() -> Optional[str]:
    """``None`` when a convolution and a linear layer run under CPU bfloat16 autocast, else why not.

    It runs on any x86-64 CPU; without native bfloat16 (:func:`cpu_has_native_bfloat16`) it is
    emulated and several times slower than float32 (:func:`bfloat16_autocast_note`)."""
    try:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(1, 4, 6, 6, generator=gen)
        w = torch.randn(4, 4, 3, 3, generator=gen)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.linear(F.conv2d(x, w, padding=1).flatten(1), torch.randn(3, 144, generator=gen))
        if y.dtype != torch.bfloat16 or not bool(torch.isfinite(y).all()):
            return "bfloat16 autocast does not compute in bfloat16 on this CPU"
    except Exception as exc:
        return f"bfloat16 autocast fails on this CPU ({_first_line(exc)})"
    return None


def bfloat16_autocast_note() -> Optional[str]:
    """The one line for ``precision="bfloat16"`` on this CPU: ``None`` where it runs natively."""
    missing = bfloat16_autocast_missing()
    if missing is not None:
        return fallback_note("bfloat16_autocast", missing)
    if not cpu_has_native_bfloat16():
        return ("bfloat16 on this CPU is emulated (no native bfloat16: AVX512-BF16 or AMX), several times "
                "slower than float32; --precision float32 (the default on a CPU) is faster here")
    return None


@functools.cache
def openvino_bfloat16_missing() -> Optional[str]:
    """``None`` when OpenVINO computes in bfloat16 on this CPU, else why not (it then uses float32)."""
    try:
        import numpy as np
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return "OpenVINO is not installed (pip install openvino)"
    try:
        p = ops.parameter([2, 8], np.float32)
        w = ops.constant(np.ones((4, 8), dtype=np.float32))
        model = ov.Model([ops.matmul(p, w, False, True)], [p])
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        used = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception as exc:
        return f"OpenVINO cannot compile for this CPU ({_first_line(exc)})"
    if "bf16" not in used and "bfloat16" not in used:
        return "OpenVINO computes in float32 on this CPU (no native bfloat16: AVX512-BF16 or AMX)"
    return None


#: The features, by the name reports use, and their probes.
FEATURES = {
    "onednn_fused_float32": fused_float32_missing,
    "bfloat16_matmuls": bfloat16_matmuls_missing,
    "bfloat16_autocast": bfloat16_autocast_missing,
    "openvino_bfloat16": openvino_bfloat16_missing,
}
#: What each feature's path does where the feature is missing (the fallback note's second half).
FALLBACK_NOTES = {
    "onednn_fused_float32": "the encoder runs plain torch ops (the same masks, slower)",
    "bfloat16_matmuls": "the transformer's matrix products stay in float32 (the exact masks)",
    "bfloat16_autocast": "the encoder runs in float32",
    "openvino_bfloat16": "OpenVINO runs in float32 (the same masks as the fast setting)",
}
_LABELS = {
    "onednn_fused_float32": "oneDNN fused float32 kernels",
    "bfloat16_matmuls": "bfloat16 matrix products",
    "bfloat16_autocast": "bfloat16 autocast",
    "openvino_bfloat16": "OpenVINO bfloat16",
}


def fallback_note(feature: str, reason: str) -> str:
    """The one line a user sees when ``feature`` was asked for but is not used: what and why."""
    return f"{_LABELS[feature]} not used: {reason}; {FALLBACK_NOTES[feature]}"


def report() -> Dict[str, object]:
    """What this machine supports, for the benchmark's JSON: the CPU, torch's kernels, each feature's
    ``None`` (runs) or reason (does not)."""
    return {
        "cpu": cpu_name(),
        "torch_kernels": torch_kernels(),
        "native_bfloat16": cpu_has_native_bfloat16(),
        **{name: probe() for name, probe in FEATURES.items()},
    }


def summary_lines() -> List[str]:
    """What this machine supports, one line per feature, for a person (``medsam-slicer models``)."""
    native = cpu_has_native_bfloat16()
    lines = [f"CPU: {cpu_name()}; torch kernels: {torch_kernels()}; native bfloat16: {'yes' if native else 'no'}"]
    for name, probe in FEATURES.items():
        reason = probe()
        text = "yes" if reason is None else "no, " + reason
        if name == "bfloat16_autocast" and reason is None and not native:
            text = "yes, emulated (slower than float32)"
        lines.append(f"  {_LABELS[name]}: {text}")
    return lines
