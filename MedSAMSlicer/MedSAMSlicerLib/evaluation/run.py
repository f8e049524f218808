"""The whole ``evaluate`` command as one function: inputs and settings in, files and rows out."""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import MedSAMError
from ..fileio.atomic import check_folder, check_output, write_text
from .cases import DEFAULT_MIN_SLICES, load_inputs
from .report import CsvLog, format_summary, plot, summarize, write_csv
from .runner import (
    DEFAULT_CORRECTIONS,
    EvaluationRow,
    Variant,
    apply_assignments,
    builtin_variants,
    check_model_fits,
    check_modes,
    evaluate,
    parse_variant,
)

PathLike = Union[str, "os.PathLike[str]"]


#: The files ``evaluate`` writes into its folder.
RESULT_FILES = ("evaluation.csv", "evaluation.partial.csv", "summary.md", "evaluation.png")


def check_outputs(out: PathLike, overwrite: bool) -> Path:
    """Before anything runs: ``out`` is a folder we may write into and none of
    :data:`RESULT_FILES` is in the way (a folder there, or an existing file or link without
    ``overwrite``)."""
    folder = check_folder(out, "evaluation output folder")
    for name in RESULT_FILES:
        check_output(folder / name, overwrite, what="evaluation result")
    return folder


def run_evaluation(
    inputs: Sequence[PathLike] = (),
    pairs: Sequence[Tuple[PathLike, PathLike]] = (),
    variants: Sequence[Sequence[str]] = (),
    common: Sequence[str] = (),
    modes: Sequence[str] = ("3d", "2d"),
    box_margin: int = 0,
    include: Sequence[str] = (),
    min_slices: int = DEFAULT_MIN_SLICES,
    out: Optional[PathLike] = "medsam-evaluation",
    embedding_cache: Optional[PathLike] = None,
    segmenter=None,
    model: str = "litemedsam",
    checkpoint: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    quiet: bool = False,
    threads: Optional[int] = None,
    overwrite: bool = True,
    corrections: int = DEFAULT_CORRECTIONS,
) -> List[EvaluationRow]:
    """Evaluate and write ``evaluation.csv``, ``summary.md`` and ``evaluation.png`` to ``out``.

    Args:
        inputs: evaluation set files and FLARE22 folders (none and no ``pairs``: the shipped set).
        pairs: ``(image, labels)`` files.
        variants: each ``[NAME, key=value, ...]`` (:func:`~.runner.parse_variant`); none:
            ``default``. ``original`` is LiteMedSAM's own algorithm on the same boxes.
        common: ``key=value`` settings applied to every variant.
        modes: some of :data:`~.runner.MODES`: ``3d`` (true z-range), ``2d`` (automatic extent),
            ``per-slice`` (the label's box on every labelled slice, no propagation), ``per-part``
            (the same, one box per piece of the label), ``loop`` (the simulated annotator: rows
            ``loop-0`` .. ``loop-N``, the first box then each correction of the worst slice).
        box_margin: pixels around the label's box on the middle slice.
        include: glob patterns on ``case/structure`` (e.g. ``mr/*``, ``*/aorta*``).
        min_slices: leave out structures on fewer slices (folders and pairs; sets say their own).
        out: output folder (``None``: write nothing).
        embedding_cache: a folder that keeps slice embeddings between runs.
        segmenter: a loaded Segmenter to reuse; else one is loaded from ``model`` etc.
        overwrite: replace result files of an earlier run in ``out`` (the command line's
            ``--overwrite``; without it they are refused before anything runs). A link there is
            replaced, never written through.
        threads: CPU threads for torch (default: torch's choice). On a machine shared with other
            work, 1 thread avoids oversubscription (measured on 2 busy cores: decoder 0.64 s per
            box with 2 threads, 0.16 s with 1).
        corrections: the loop's corrections at most (``loop`` mode).
    """
    import torch

    from ..models.registry import get_spec
    from ..segmenter import Segmenter
    from .store import EmbeddingStore

    spec = get_spec(segmenter.spec if segmenter is not None else model)
    if threads is not None:
        if threads < 1:
            raise MedSAMError(f"--threads must be at least 1; got {threads}")
        torch.set_num_threads(int(threads))

    check_modes(modes, corrections)
    chosen: List[Variant] = [parse_variant(v) for v in variants] or [builtin_variants()["default"]]
    chosen = [apply_assignments(v, common) for v in chosen]
    check_model_fits(spec, chosen, bool(embedding_cache))  # before the model loads
    if out is not None:
        check_outputs(out, overwrite)
    if embedding_cache:
        check_folder(embedding_cache, "embedding cache folder")
    cases = load_inputs(inputs, pairs, min_slices=min_slices)
    patterns = list(include)

    def wanted(case, structure) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(f"{case.name}/{structure.name}", p) for p in patterns)

    total = sum(1 for c in cases for s in c.structures if wanted(c, s))
    if total == 0:
        raise MedSAMError("no structure to evaluate: check the inputs and --include patterns")
    seg = segmenter or Segmenter(model, checkpoint=checkpoint, device=device, precision=precision, cache_mb=4096)
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"{seg.describe()}\n{total} structures in {len(cases)} cases; variants: "
        f"{', '.join(v.name for v in chosen)}; modes: {', '.join(modes)}")
    store = EmbeddingStore(embedding_cache) if embedding_cache else None
    partial = CsvLog(Path(out) / "evaluation.partial.csv") if out is not None else None
    rows = evaluate(cases, chosen, segmenter=seg, modes=modes, box_margin=box_margin, include=wanted,
                    embedding_store=store, log=say, on_row=partial, corrections=corrections)
    summary = summarize(rows)
    if out is not None:
        folder = Path(out)
        write_csv(rows, folder / "evaluation.csv", overwrite=overwrite)
        write_text(folder / "summary.md", format_summary(summary) + "\n", overwrite=overwrite)
        plot(rows, folder / "evaluation.png", overwrite=overwrite)
        (folder / "evaluation.partial.csv").unlink(missing_ok=True)
    if not quiet:
        print(format_summary(summary, groups=["all"]))
        if out is not None:
            print(f"wrote {Path(out) / 'evaluation.csv'}, summary.md (per case too) and evaluation.png")
    return rows
