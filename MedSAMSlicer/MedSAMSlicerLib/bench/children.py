"""Peak-memory measurements, each pipeline in a fresh child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import MedSAMError
from .cases import Case
from .measure import peak_rss, sync
from .pipelines import ours_box3d, run_ours_3d
from .reference import ReferenceLiteMedSAM, ReferenceMedSAM


def memory_in_child(model: str, pipeline: str, device: torch.device, n_slices: int,
                     weights: Optional[Path], warm: bool = False) -> Dict[str, Any]:
    """Peak memory and time of a 3D propagation in a fresh process (no allocator history).

    Each pipeline runs as it would on its own: the reference as the original script (glibc's
    default allocator), ours as shipped (with :mod:`.allocator` as the environment sets it). The first
    run gives the peak memory and ``seconds_cold``; with ``warm`` a second run gives
    ``seconds_warm``.
    """
    args = json.dumps({"model": model, "pipeline": pipeline, "device": str(device), "slices": n_slices,
                       "weights": str(weights) if weights else None, "threads": torch.get_num_threads(),
                       "warm": warm})
    env = dict(os.environ)
    lib_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = lib_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from MedSAMSlicerLib.bench.children import memory_child; memory_child(sys.argv[1])",
         args],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise MedSAMError(f"the memory measurement ({model}, {pipeline}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def memory_child(arg: str) -> None:
    """Entry point of the memory-measuring child process (prints one JSON line)."""
    spec = json.loads(arg)
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    case = Case(int(spec["slices"]))
    state = None
    weights = Path(spec["weights"]) if spec["weights"] else None
    if spec["model"] == "medsam":
        assert weights is not None
        state = torch.load(weights, map_location="cpu", weights_only=True)
    from ..segmenter import Segmenter

    if spec["pipeline"] == "reference":
        runner: Any = ReferenceLiteMedSAM(device) if spec["model"] == "litemedsam" else ReferenceMedSAM(device, state)
        box = None
    else:
        name = spec["model"]
        runner = Segmenter(name, checkpoint=weights if name == "medsam" else None, device=str(device))
        box = ours_box3d(name, case)
    del state
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    def run(key: str) -> float:
        t0 = time.perf_counter()
        if spec["pipeline"] == "reference":
            runner.segment_3d(case.image, case.ref_box3d)
        else:
            run_ours_3d(runner, case, box, key)
        sync(device)
        return time.perf_counter() - t0

    with peak_rss() as rss:
        cold = run("memory")
    out = {"peak_rss_delta_mb": (rss["peak"] - rss["base"]) / 2**20, "seconds_cold": cold}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    if spec.get("warm"):
        out["seconds_warm"] = run("memory-warm")
    print(json.dumps(out), flush=True)
