"""Reports of an evaluation: CSV, summary tables (mean and worst structure), a figure."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..fileio.atomic import atomic_write
from .runner import EvaluationRow, mean

PathLike = Union[str, "os.PathLike[str]"]

#: The issue's "no structure below 0.70" counts structures on at least this many slices.
LONG_STRUCTURE_SLICES = 10
LOW_DICE = 0.70


def _csv_text(names: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(names))
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _write_csv_text(path: Path, text: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(text)


def write_csv(rows: Sequence[EvaluationRow], path: PathLike, overwrite: bool = True) -> Path:
    """One line per structure, variant and mode (all :class:`EvaluationRow` fields), written
    atomically (:func:`~MedSAMSlicerLib.fileio.atomic.atomic_write`: a link at ``path`` is replaced,
    never written through)."""
    names = [f.name for f in dataclasses.fields(EvaluationRow)]
    text = _csv_text(names, [_formatted(row) for row in rows])
    return atomic_write(path, lambda tmp: _write_csv_text(tmp, text), overwrite=overwrite)


class CsvLog:
    """Rows kept in a CSV as they are measured, so an interrupted run keeps what it measured
    (``evaluation.partial.csv`` until the run ends). The file is published again, whole and
    atomically, after each row (a few hundred rows: microseconds against seconds per row), so it
    is never appended to through a link."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._names = [f.name for f in dataclasses.fields(EvaluationRow)]
        self._rows: List[dict] = []
        self._publish()

    def _publish(self) -> None:
        text = _csv_text(self._names, self._rows)
        atomic_write(self.path, lambda tmp: _write_csv_text(tmp, text))

    def __call__(self, row: EvaluationRow) -> None:
        self._rows.append(_formatted(row))
        self._publish()


def _formatted(row: EvaluationRow) -> dict:
    values = dataclasses.asdict(row)
    for key in ("dice", "nsd", "mean_score"):
        values[key] = f"{values[key]:.4f}"
    values["seconds"] = f"{values['seconds']:.2f}"
    return values


def read_csv(path: PathLike) -> List[EvaluationRow]:
    """Rows written by :func:`write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(EvaluationRow)}
    out = []
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            values = {}
            for key, text in record.items():
                kind = types[key]
                values[key] = float(text) if kind in (float, "float") else int(text) if kind in (int, "int") else text
            out.append(EvaluationRow(**values))
    return out


@dataclass
class SummaryRow:
    """Aggregate of one variant and mode over a group of structures (``all`` or one case)."""

    variant: str
    mode: str
    group: str
    structures: int
    mean_dice: float
    mean_nsd: float
    median_dice: float
    worst: str
    worst_dice: float
    low: int  # structures on >= LONG_STRUCTURE_SLICES slices with Dice < LOW_DICE
    mean_seconds: float


def summarize(rows: Sequence[EvaluationRow], per_case: bool = True) -> List[SummaryRow]:
    """Per variant and mode: over all structures, then (``per_case``) per case."""
    out: List[SummaryRow] = []
    combos = list(dict.fromkeys((r.variant, r.mode) for r in rows))
    for variant, mode in combos:
        chosen = [r for r in rows if r.variant == variant and r.mode == mode]
        groups = [("all", chosen)]
        if per_case:
            for case in dict.fromkeys(r.case for r in chosen):
                groups.append((case, [r for r in chosen if r.case == case]))
        for group, members in groups:
            worst = min(members, key=lambda r: r.dice)
            out.append(SummaryRow(
                variant=variant, mode=mode, group=group, structures=len(members),
                mean_dice=mean([r.dice for r in members]), mean_nsd=mean([r.nsd for r in members]),
                median_dice=float(np.median([r.dice for r in members])),
                worst=f"{worst.case}/{worst.structure}" if group == "all" else worst.structure,
                worst_dice=worst.dice,
                low=sum(1 for r in members if r.slices_true >= LONG_STRUCTURE_SLICES and r.dice < LOW_DICE),
                mean_seconds=mean([r.seconds for r in members]),
            ))
    return out


def format_summary(summary: Sequence[SummaryRow], groups: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of :func:`summarize`'s rows (only ``groups`` when given)."""
    lines = [
        "| variant | mode | structures | mean Dice | mean NSD | median Dice | worst structure (Dice) "
        f"| >= {LONG_STRUCTURE_SLICES} slices below {LOW_DICE:.2f} | s per structure |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for s in summary:
        if groups is not None and s.group not in groups:
            continue
        label = s.mode if s.group == "all" else f"{s.mode}, {s.group}"
        lines.append(
            f"| {s.variant} | {label} | {s.structures} | {s.mean_dice:.3f} | {s.mean_nsd:.3f} | {s.median_dice:.3f} "
            f"| {s.worst} ({s.worst_dice:.3f}) | {s.low} | {s.mean_seconds:.1f} |"
        )
    return "\n".join(lines)


def format_structures(rows: Sequence[EvaluationRow], mode: str, variants: Optional[Sequence[str]] = None) -> str:
    """A Markdown table: one line per structure, Dice of each variant in ``mode``, slices found
    (first variant) vs true."""
    chosen = [r for r in rows if r.mode == mode]
    names = list(variants or dict.fromkeys(r.variant for r in chosen))
    by = {(r.case, r.structure, r.variant): r for r in chosen}
    keys = list(dict.fromkeys((r.case, r.structure) for r in chosen))
    head = "| case | structure | slices | " + " | ".join(f"{n} Dice" for n in names) + f" | {names[0]} NSD | slices found ({names[0]}) |"
    lines = [head, "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: | --- |"]
    for case, structure in keys:
        first = by.get((case, structure, names[0]))
        if first is None:
            continue
        cells = [f"{by[(case, structure, n)].dice:.3f}" if (case, structure, n) in by else "" for n in names]
        lines.append(f"| {case} | {structure} | {first.slices_true} | " + " | ".join(cells)
                     + f" | {first.nsd:.3f} | {first.z_found} (true {first.z_true}) |")
    return "\n".join(lines)


#: How the plot names each mode.
MODE_TITLES = {"3d": "with the true z-range (3d)", "2d": "automatic extent (2d box)",
               "per-slice": "the label's box on every slice (per-slice)",
               "per-part": "the label's box around each piece on every slice (per-part)"}


def mode_title(mode: str) -> str:
    """How the plot and the summary name a mode (``loop-2``: the loop after two corrections)."""
    if mode.startswith("loop-") and mode[5:].isdigit():
        k = int(mode[5:])
        return f"one box, then {k} correction{'s' if k != 1 else ''} of the worst slice ({mode})"
    return MODE_TITLES.get(mode, mode)


def plot(rows: Sequence[EvaluationRow], path: PathLike, overwrite: bool = True) -> Path:
    """Dice per structure (sorted by the first variant), one panel per mode, one marker per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.6 * len(modes)), squeeze=False)
    markers = "o^sDvP*X"
    for ax, mode in zip(axes[:, 0], modes):
        first = {r.key: r.dice for r in rows if r.mode == mode and r.variant == variants[0]}
        order = sorted(first, key=lambda k: first[k])
        x = np.arange(len(order))
        for i, variant in enumerate(variants):
            values = {r.key: r.dice for r in rows if r.mode == mode and r.variant == variant}
            if not values:
                continue
            ys = [values.get(k, np.nan) for k in order]
            ax.plot(x, ys, markers[i % len(markers)], markersize=3.5, alpha=0.8,
                    label=f"{variant} (mean {np.nanmean(ys):.3f})")
        ax.axhline(LOW_DICE, color="grey", linewidth=0.6, linestyle=":")
        title = MODE_TITLES.get(mode) or mode_title(mode)
        ax.set_title(f"Dice per structure, {title}; sorted by {variants[0]}", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-1, len(order))
        ax.set_xlabel("structure (case/name in the CSV)")
        ax.set_ylabel("3D Dice")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100), overwrite=overwrite)
    finally:
        plt.close(fig)
