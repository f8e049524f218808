"""The benchmark's Markdown table."""

from __future__ import annotations

from typing import Any, Dict, Optional


def _fmt(v: Optional[float], digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def markdown_table(result: Dict[str, Any]) -> str:
    """The results as a markdown table (one block of rows per model)."""
    lines = [
        "| model | measure | reference (median) | ours (median) | ours / reference (median of pairs) | speed-up |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    titles = {"litemedsam": "LiteMedSAM", "medsam": "MedSAM (ViT-B, random weights)"}
    for name, row in result["models"].items():
        if name == "medsam2":
            from .medsam2 import markdown_rows

            lines += markdown_rows(row)
            continue
        title = titles.get(name, name)
        n = row["propagation_3d_s"]["slices"]
        entries = [
            ("encoder, 1 slice (s)", row["encoder_s"], 2),
            ("box to mask, cached embedding (ms)", row["box_to_mask_ms"], 1),
            (f"3D propagation, {n} slices (s)", row["propagation_3d_s"], 1),
            (f"3D propagation, {n} slices, each in a fresh process as shipped (s)",
             row["propagation_3d_fresh_process_s"], 1),
            ("peak memory, 3D propagation (MB)", row["peak_memory_mb"], 0),
        ]
        if "encoder_bf16matmuls_s" in row:
            entries.insert(1, ("encoder, 1 slice, ours + bfloat16 matmuls, opt-in (s)", row["encoder_bf16matmuls_s"], 2))
        if "encoder_plain_s" in row:
            entries.insert(1, ("encoder, 1 slice, ours without optimize (s)", row["encoder_plain_s"], 2))
        for label, m, digits in entries:
            speed = f"{m['speedup']:.2f}x" if m.get("speedup") else "-"
            lines.append(f"| {title} | {label} | {_fmt(m['reference'], digits)} | {_fmt(m['ours'], digits)} | "
                         f"{_fmt(m['ratio'])} | {speed} |")
        lines.append(f"| {title} | Dice ours vs reference, 3D (min per slice) | | {row['dice_3d']:.4f} "
                     f"({row['dice_per_slice_min']:.4f}) | | |")
    return "\n".join(lines)
