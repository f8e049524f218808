"""``run_bench``: the whole ``medsam-slicer bench`` run, written as JSON and Markdown."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import MedSAMError
from .compare import SLICES, bench_model
from .measure import machine_info
from .report import markdown_table

COMPARISONS = ("reference", "alternatives", "structures", "all", "remote")


def _command_line(models: List[str], device: str, out: Path, quick: bool, compare: str,
                  rounds: Optional[int] = None) -> str:
    if Path(sys.argv[0]).name.startswith("medsam-slicer") or sys.argv[1:2] == ["bench"]:
        return "medsam-slicer " + " ".join(sys.argv[1:])
    return f"run_bench(models={models!r}, device={device!r}, out={str(out)!r}, quick={quick}, compare={compare!r}, rounds={rounds!r})"


def run_bench(models: List[str], device: str = "auto", out: Path = Path("medsam-bench.json"),
              quick: bool = False, compare: str = "reference", rounds: Optional[int] = None) -> Dict[str, Any]:
    """Time the reference pipelines and ours side by side; print a markdown table, write ``out`` (JSON).

    Args:
        models: ``litemedsam``, ``medsam`` and/or ``medsam2`` (against MedSAM2's own inference:
            :mod:`.medsam2`).
        device: ``auto|cpu|cuda|mps``.
        out: the JSON results file.
        quick: fewer slices and repeats (a smoke run).
        rounds: rounds of the alternatives comparison (default 2; 1 with ``quick``).
        compare: ``reference`` (ours against the reference pipelines, per model), ``alternatives``
            (LiteMedSAM's CPU speed alternatives against our exact path and the reference:
            :mod:`.alternatives`; always on the CPU), ``structures`` (five structures as one job against
            the liver alone: :mod:`.structures`), ``all`` (those three), or ``remote`` (a
            ``medsam-slicer serve`` on loopback against a local run, and 8 clients at once: :mod:`.remote`).

    Returns:
        The results (also written to ``out``): ``machine``, ``command``, ``models`` (one row per
        model with ``encoder_s``, ``box_to_mask_ms``, ``propagation_3d_s``, ``peak_memory_mb``,
        each with ``reference``, ``ours``, ``ratio`` (ours / reference) and ``speedup``, and
        ``dice_3d``); with alternatives, ``alternatives`` (see :mod:`.alternatives`).
    """
    from ..models.devices import select_device

    if compare not in COMPARISONS:
        raise MedSAMError(f"unknown comparison '{compare}'; choose one of: {', '.join(COMPARISONS)}")
    unknown = [m for m in models if m not in SLICES and m != "medsam2"]
    if unknown or not models:
        raise MedSAMError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from: {', '.join([*SLICES, 'medsam2'])}")
    dev = select_device(device)
    result: Dict[str, Any] = {
        "machine": machine_info(dev),
        "command": _command_line(models, device, out, quick, compare, rounds),
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": {},
    }
    t0 = time.perf_counter()
    tables = []
    if compare in ("reference", "all"):
        with tempfile.TemporaryDirectory(prefix="medsam-bench-") as tmp:
            for model in models:
                if model == "medsam2":
                    from .medsam2 import bench_medsam2

                    result["models"][model] = bench_medsam2(dev, quick, Path(tmp))
                    continue
                result["models"][model] = bench_model(model, dev, quick, Path(tmp))
        tables.append(markdown_table(result))
        result["table_markdown"] = tables[-1]
    if compare in ("alternatives", "all"):
        from .alternatives import bench_alternatives
        from .alternatives import markdown_table as alternatives_table

        result["alternatives"] = bench_alternatives(quick, rounds=rounds)
        tables.append(alternatives_table(result["alternatives"]))
        result["alternatives"]["table_markdown"] = tables[-1]
    if compare in ("structures", "all"):
        from .structures import bench_structures
        from .structures import markdown_table as structures_table

        result["structures"] = bench_structures(device=device, quick=quick)
        tables.append(structures_table(result["structures"]))
        result["structures"]["table_markdown"] = tables[-1]
    if compare == "remote":
        from .remote import bench_remote
        from .remote import markdown_table as remote_table

        result["remote"] = bench_remote(device=dev.type, quick=quick, rounds=rounds or 3)
        tables.append(remote_table(result["remote"]))
        result["remote"]["table_markdown"] = tables[-1]
    result["seconds"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    m = result["machine"]
    for table in tables:
        print()
        print(table)
    print(f"\n{m['cpu']}, {m['physical_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"device {m['device_name']}")
    from ..models.cpu_features import summary_lines

    print("\n".join(summary_lines()[1:]))  # what this machine supports; skipped alternatives say why
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result
