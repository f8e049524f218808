"""Machine facts and measurement helpers: interleaved timing, medians and ratios, peak memory."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> Optional[int]:
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip() and core is not None:
                    pairs.add((phys, core))
                    phys = core = None
        if core is not None:
            pairs.add((phys, core))
        return len(pairs) or None
    except OSError:
        return None


def machine_info(device: torch.device) -> Dict[str, Any]:
    """CPU model, cores, load, torch version and threads, and the accelerator's name."""
    from ..models import cpu_features

    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cpu_native_bfloat16": cpu_features.cpu_has_native_bfloat16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onednn_fused_ops": cpu_features.fused_float32_missing() is None,
        # What this machine supports: None where a feature runs, else why not (cpu_features.py).
        "cpu_features": cpu_features.report(),
        "device": str(device),
        "device_name": _cpu_model(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


@contextmanager
def peak_rss(interval: float = 0.002) -> Iterator[Dict[str, int]]:
    """Sample the resident set size in a thread; yields a dict that gets ``base`` and ``peak`` bytes."""
    result = {"base": _rss_bytes(), "peak": 0}
    result["peak"] = result["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], _rss_bytes())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True, name="medsam-bench-rss")
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss_bytes())


def interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    """Run each function ``repeats`` times, interleaved; seconds per call."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def metric(ref: Sequence[float], ours: Sequence[float], unit: str, speed: bool = True) -> Dict[str, Any]:
    """Medians of each side, and ``ratio`` = ours / reference as the median of the interleaved pairs.

    The pairs were measured back to back, so a pair shares the machine's state (other jobs come
    and go on a shared machine and can change both sides' times severalfold within a run): the
    median of per-pair ratios is robust to that, the ratio of the medians is not (it is kept as
    ``ratio_of_medians``). ``speedup`` = 1 / ``ratio`` for times.
    """
    r, o = float(np.median(ref)), float(np.median(ours))
    if len(ref) == len(ours) and all(v > 0 for v in ref):
        ratio = float(np.median([b / a for a, b in zip(ref, ours)]))
    else:
        ratio = o / r if r else float("nan")
    return {
        "unit": unit,
        "reference": r,
        "ours": o,
        "ratio": ratio,
        "ratio_of_medians": o / r if r else None,
        "speedup": 1.0 / ratio if (speed and ratio) else None,
        "samples": {"reference": [float(v) for v in ref], "ours": [float(v) for v in ours]},
    }
