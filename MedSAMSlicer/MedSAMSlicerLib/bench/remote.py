"""``medsam-slicer bench --compare remote``: what running on a ``medsam-slicer serve`` costs over a
local run, and how the server holds up under several clients. Both on loopback, in one command.

* **Overhead**: the liver of the shipped CT in a 40-slice 3D box (:class:`~.cases.Case`), run
  locally (a :class:`~MedSAMSlicerLib.segmenter.Segmenter` in this process) and on a server started
  here (:class:`~MedSAMSlicerLib.remote.client.RemoteSegmenter`: upload, job, result), interleaved,
  ``rounds`` pairs; the ratio remote / local is the median of the per-pair ratios
  (:func:`~.measure.metric`). On a busy shared machine the two runs of a pair meet different loads,
  so the remote run's own cost is also measured within it: its wall time at the client over the
  time the server's engine spent on the job (``protocol_ratio``: upload, queue, polls, result). Both sides run cold (embedding caches of 0 MB: every slice encoded
  in every run, the same work on both sides), on the same device, one after the other (the server
  idles while the local run works). The masks are compared too.
* **Load**: a second server (default cache) and ``clients`` threads, each its own user (its own
  token, its own session with the CT), each sending ``requests`` box prompts one after another
  (2D boxes on the liver's slices, the slices cycling); per request the latency seen by the
  client, p50 and p95; the errors; the server's resident memory before the load and after it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _stop(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_overhead(device: str, rounds: int, n_slices: int = 40) -> Dict[str, Any]:
    """Local against remote on the same case, interleaved; see the module doc."""
    from ..remote.client import RemoteSegmenter
    from ..remote.server import free_port, launch
    from ..segmenter import Segmenter
    from .cases import Case
    from .measure import metric

    case = Case(n_slices)
    prompt = BoxPrompt.from_voxel_box(case.box3d[:3], case.box3d[3:])
    local = Segmenter("litemedsam", device=device, cache_mb=0)
    env = {k: v for k, v in os.environ.items() if k != "MEDSAM_SLICER_TOKEN"}
    proc, url = launch(free_port(), ["--device", device, "--cache-mb", "0"], env=env)
    try:
        remote = RemoteSegmenter(url, timeout=600)
        times: Dict[str, List[float]] = {"local": [], "remote": [], "server_engine": []}
        masks: Dict[str, np.ndarray] = {}
        upload_s = []
        # One untimed run each first (the first calls of a fresh process pay one-off costs).
        local.set_volume(case.raw, case.window)
        local.segment(BoxPrompt(prompt.z, prompt.box), "2d")
        remote.set_volume(case.raw, case.window)
        remote.segment(BoxPrompt(prompt.z, prompt.box), "2d")
        for _ in range(rounds):
            t0 = time.perf_counter()
            local.set_volume(case.raw, case.window)
            masks["local"] = local.segment(prompt, "3d").mask
            times["local"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            remote.close()  # a new session each round: the upload is part of the cost
            remote.set_volume(case.raw, case.window)
            upload_s.append(time.perf_counter() - t0)
            masks["remote"] = remote.segment(prompt, "3d").mask
            times["remote"].append(time.perf_counter() - t0)
            times["server_engine"].append(remote.last_run_s)
        remote.close()
    finally:
        _stop(proc)
    return {"case": case.describe(), "rounds": rounds, "local_s": times["local"], "remote_s": times["remote"],
            "upload_s": upload_s, "ratio": metric(times["local"], times["remote"], "s"),
            # The remote run's own cost, measured within the remote run (immune to the machine's load
            # changing between the local and the remote run): client wall time / the engine's time.
            "server_engine_s": times["server_engine"],
            "protocol_ratio": float(np.median([r / e for r, e in zip(times["remote"], times["server_engine"])])),
            "same_mask": bool(np.array_equal(masks["local"], masks["remote"])),
            "voxels": int(masks["remote"].sum())}


def bench_load(device: str, clients: int = 8, requests: int = 50) -> Dict[str, Any]:
    """``clients`` users at once, ``requests`` box prompts each; see the module doc."""
    from ..remote.client import RemoteSegmenter
    from ..remote.server import free_port, launch
    from .cases import Case

    case = Case(40)
    tokens = [secrets.token_urlsafe(24) for _ in range(clients)]
    with tempfile.TemporaryDirectory(prefix="medsam-bench-remote-") as tmp:
        token_file = Path(tmp) / "tokens"
        token_file.write_text("\n".join(tokens) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "MEDSAM_SLICER_TOKEN"}
        proc, url = launch(free_port(), ["--device", device, "--token-file", str(token_file),
                                         "--max-sessions", str(clients + 2)], env=env)
        try:
            rss_start = _rss_mb(proc.pid)
            latencies: List[float] = []
            errors: List[str] = []
            lock = threading.Lock()
            start = threading.Barrier(clients)

            def user(n: int) -> None:
                try:
                    seg = RemoteSegmenter(url, tokens[n], timeout=600)
                    seg.set_volume(case.raw, case.window)
                except MedSAMError as exc:
                    with lock:
                        errors.append(str(exc))
                    start.abort()
                    return
                start.wait()
                for i in range(requests):
                    z = case.zs[(n * 7 + i) % len(case.zs)]
                    ys, xs = np.nonzero(case.truth[z])
                    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if xs.size else case.box2d
                    t0 = time.perf_counter()
                    try:
                        seg.segment(BoxPrompt(z, box), "2d")
                        with lock:
                            latencies.append(time.perf_counter() - t0)
                    except MedSAMError as exc:
                        with lock:
                            errors.append(str(exc))
                seg.close()

            t0 = time.perf_counter()
            threads = [threading.Thread(target=user, args=(n,)) for n in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rss_end = _rss_mb(proc.pid)
        finally:
            _stop(proc)
    lat = np.array(latencies) * 1000.0
    return {"clients": clients, "requests_each": requests, "completed": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p95_ms": float(np.percentile(lat, 95)) if lat.size else float("nan"),
            "max_ms": float(lat.max()) if lat.size else float("nan"), "wall_s": wall,
            "server_rss_mb_start": rss_start, "server_rss_mb_end": rss_end,
            "note": "each request a 2D box on one of the liver's 40 slices; the first request on a slice encodes it"}


def bench_remote(device: str = "cpu", quick: bool = False, rounds: int = 3) -> Dict[str, Any]:
    """The overhead and the load runs."""
    overhead = bench_overhead(device, 1 if quick else rounds, 10 if quick else 40)
    load = bench_load(device, clients=2 if quick else 8, requests=5 if quick else 50)
    return {"overhead": overhead, "load": load}


def markdown_table(result: Dict[str, Any]) -> str:
    """The two runs as markdown."""
    o, ld = result["overhead"], result["load"]
    r = o["ratio"]
    return "\n".join([
        f"| remote on loopback vs local, {o['case']['structure']} {o['case']['slices']} slices, cold | local s | "
        "remote s | remote/local | same mask |",
        "|---|---|---|---|---|",
        f"| median of {o['rounds']} interleaved pairs | {r['reference']:.2f} | {r['ours']:.2f} | {r['ratio']:.3f} | "
        f"{o['same_mask']} |",
        "",
        f"remote wall time / the server engine's own time in the same run (upload, polls, result): "
        f"{o['protocol_ratio']:.3f}",
        "",
        "| load | requests | errors | p50 ms | p95 ms | max ms | wall s | server RSS start -> end MiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {ld['clients']} clients x {ld['requests_each']} | {ld['completed']} | {ld['errors']} | {ld['p50_ms']:.0f} | "
        f"{ld['p95_ms']:.0f} | {ld['max_ms']:.0f} | {ld['wall_s']:.1f} | {ld['server_rss_mb_start']:.0f} -> "
        f"{ld['server_rss_mb_end']:.0f} |",
    ])
