"""``medsam-slicer segment``: one or several named boxes -> one output file on the input's grid, with a
record of how each segment was made; ``--replay`` re-runs such a file.

* :func:`segment_file`: the boxes (``--box-ijk`` / ``--box-ras``, each with a ``--name``, and/or a
  prompts file: :func:`read_prompts_file`), run as one job: one structure through
  :meth:`Segmenter.segment <MedSAMSlicerLib.segmenter.Segmenter.segment>` exactly as before, several
  through :meth:`Segmenter.segment_structures <MedSAMSlicerLib.segmenter.Segmenter.segment_structures>`
  (each slice encoded once, a slice's boxes decoded together, overlaps settled by the decoder's logits).
  Boxes with the same name are one structure (:func:`group_structures`; the rule for its 3D boxes:
  :func:`~MedSAMSlicerLib.boxes.structure_prompts`):
  its pieces on one slice, or its key slices, through :meth:`Segmenter.segment_boxes
  <MedSAMSlicerLib.segmenter.Segmenter.segment_boxes>` (pieces also within a job of several); a
  structure with key slices runs on its own beside the others' job (:func:`job_groups`).
  A ``.seg.nrrd`` gets one segment per structure, its record in the segment tags
  (:mod:`~MedSAMSlicerLib.segmentation.provenance`); a labelmap gets label ``n`` for the ``n``-th structure.
* :func:`replay_file`: reads the records of a ``.seg.nrrd``, checks the volume (same voxels, same grid)
  and the weights (same SHA-256), and runs the same prompts with the same model, window, speed and
  precision; the summary says whether each mask equals the file's.

Everything that can be checked without the model is checked before torch is imported.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .boxes import BoxPrompt, structure_prompts
from .errors import MedSAMError
from .progress import TerminalProgress

#: Embedding-cache cap of a one-shot ``segment`` run. The propagation needs only the batch of
#: slices being encoded (1 on a CPU, 16 x 4 MB on a GPU); keeping every slice's embedding, as
#: the interactive front ends do, only grew the process (liver, 43 slices, CPU: +398 MiB during
#: the propagation; +220 MiB with this cap; docs/performance.md, "Memory, as measured"). Several structures
#: hold the slices they share beyond the cap (``Predictor.holding``).
ONE_SHOT_CACHE_MB = 80

#: The colour of a single structure written without one (as before several structures existed).
SINGLE_COLOR = (0.85, 0.35, 0.25)


@dataclass(frozen=True)
class NamedBox:
    """One prompt as the user gave it.

    Attributes:
        name: the structure's name (the segment's name).
        kind: ``"ijk"`` (voxel indices of the input file, inclusive) or ``"ras"`` (RAS mm).
        values: ``(I0, J0, K0, I1, J1, K1)`` or ``(R0, A0, S0, R1, A1, S1)``.
        color: RGB in 0..1, or ``None`` (a default colour).
        where: how the user finds it again in errors, e.g. ``"prompt 2 'spleen'"``.
        from_file: it comes from a prompts file (``where`` names the file; every error about it
            starts with ``where``).
    """

    name: str
    kind: str
    values: Tuple[float, ...]
    color: Optional[Tuple[float, float, float]] = None
    where: str = ""
    from_file: bool = False


def _note(text: str) -> None:
    print(f"medsam-slicer: note: {text}", file=sys.stderr)


def pair_boxes(boxes: Sequence[Tuple[str, Sequence[float]]], names: Optional[Sequence[str]]) -> List[NamedBox]:
    """Command-line boxes (``("ijk"|"ras", six numbers)`` in the order given) with their ``--name``
    options (the ``n``-th name goes with the ``n``-th box). One box may go without a name (``segment``)."""
    names = list(names or [])
    if len(boxes) == 1 and len(names) <= 1:
        names = names or ["segment"]
    elif len(names) != len(boxes):
        raise MedSAMError(f"give one --name per box, in the same order: {len(boxes)} boxes and {len(names)} names "
                          "(or list the structures in a --prompts file)")
    return [NamedBox(name, kind, tuple(values), None, f"box {n + 1} ('{name}', --box-{kind})")
            for n, ((kind, values), name) in enumerate(zip(boxes, names))]


#: At most this many structures in one run (a labelmap gives the n-th the value n, in uint8).
MAX_STRUCTURES = 255


def _prompt_schema():
    from .fileio.userfiles import Int, ListOf, Num, Str, Table

    coordinate = Int(-(2 ** 31), 2 ** 31 - 1, integral_floats=True)
    return Table({
        "name": Str(max_len=200),
        "box_ijk": ListOf(coordinate, 6, 6, "six whole numbers I0 J0 K0 I1 J1 K1 (voxel indices)"),
        "box_ras": ListOf(Num(-1e7, 1e7), 6, 6, "six finite numbers R0 A0 S0 R1 A1 S1 (mm)"),
        "color": ListOf(Num(0.0, 1.0), 3, 3, "three numbers in 0..1 (red, green, blue)"),
    }, required=["name"], what="a table")


def read_prompts_file(path: Path) -> List[NamedBox]:
    """Structures from a JSON or TOML file (TOML needs Python 3.11)::

        [[structure]]                       # JSON: {"structure": [{...}, ...]} or a plain list
        name = "liver"
        box_ijk = [30, 20, 60, 80, 70, 60]  # or box_ras = [R0, A0, S0, R1, A1, S1]
        color = [0.86, 0.55, 0.4]           # optional, RGB in 0..1

    Read by the one reader of user files (:mod:`~MedSAMSlicerLib.fileio.userfiles`: a regular file of at
    most 1 MiB, UTF-8, strict JSON/TOML) and checked against its schema before anything else:
    a name is text, ``box_ijk`` six whole numbers, ``box_ras`` six finite numbers (``true``,
    ``"5"``, NaN are refused), ``color`` three numbers in 0..1, at most :data:`MAX_STRUCTURES`
    structures. Errors name the file, the structure and the value.
    """
    from .fileio.userfiles import SchemaError, load_table, shown

    p = Path(path)
    what = f"the prompts file '{p}'"
    data = load_table(p, "the prompts file")
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"structure"})
        if unknown:
            raise MedSAMError(f"{what}: unknown key {unknown[0]!r} at the top; list the structures as "
                              "[[structure]] tables (JSON: {\"structure\": [...]})")
        entries = data.get("structure")
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise MedSAMError(f"{what} lists no structures: give a list of "
                          "{name, box_ijk or box_ras[, color]} (in TOML: [[structure]] tables)")
    if len(entries) > MAX_STRUCTURES:
        raise MedSAMError(f"{what} lists {len(entries)} structures; at most {MAX_STRUCTURES} run as one job")
    schema = _prompt_schema()
    out = []
    for n, entry in enumerate(entries, 1):
        where = f"structure {n}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            where += f" ({shown(entry['name'])})"
        try:
            entry = schema.check(entry, where)
        except SchemaError as exc:
            raise MedSAMError(f"{what}: {exc}") from None
        kinds = [k for k in ("box_ijk", "box_ras") if k in entry]
        if len(kinds) != 1:
            raise MedSAMError(f"{what}: {where}: give exactly one of box_ijk or box_ras; got "
                              f"{' and '.join(kinds) or 'neither'}")
        color = entry.get("color")
        out.append(NamedBox(entry["name"], kinds[0][4:], tuple(float(v) for v in entry[kinds[0]]),
                            None if color is None else (color[0], color[1], color[2]),
                            f"{what}: {where}", from_file=True))
    return out


def _box_too_thin(volume, box, spec: NamedBox) -> Optional[str]:
    """Why a canonical box is too thin for the model (< 2 voxels across in the axial plane),
    said in the coordinates the user typed; ``None`` when it is fine."""
    x0, y0, _, x1, y1, _ = box
    thin = [c for c, (a, b) in enumerate(((x0, x1), (y0, y1))) if b - a < 1]
    if not thin:
        return None
    v = spec.values
    if spec.kind == "ijk":
        axes = volume.orientation.axes
        names = ["ijk"[axes[c]] for c in (0, 1)]
        parts = [f"{'ijk'[axes[c]]}0={v[axes[c]]:g} and {'ijk'[axes[c]]}1={v[axes[c] + 3]:g}" for c in thin]
        return (f"the box is a single voxel wide ({'; '.join(parts)}); on its axial slice it must span at least 2 "
                f"voxels in {names[0]} and in {names[1]}: draw it around the structure")
    spacing = volume.spacing
    parts = [f"{'RA'[c]}0={v[c]:g} and {'RA'[c]}1={v[c + 3]:g} mm" for c in thin]
    return (f"the box covers a single voxel across ({'; '.join(parts)}; the voxels are {spacing[0]:g} x "
            f"{spacing[1]:g} mm); it must span at least 2 voxels in R and in A: draw it around the structure")


def canonical_box(volume, spec: NamedBox, several: bool) -> Tuple[int, int, int, int, int, int]:
    """The canonical voxel box ``(x0, y0, z0, x1, y1, z1)`` of a prompt; errors name the prompt
    (when there are several) in the user's own indices or millimetres."""
    from .fileio.volumes import ijk_box_to_canonical, ras_box_to_canonical

    try:
        if len(spec.values) != 6 or not all(math.isfinite(v) for v in spec.values):
            axes = "I0 J0 K0 I1 J1 K1" if spec.kind == "ijk" else "R0 A0 S0 R1 A1 S1"
            shown = ", ".join(f"{v:g}" for v in spec.values)
            raise MedSAMError(f"box_{spec.kind} needs six finite numbers {axes}; got [{shown}]" if spec.from_file
                              else f"--box-{spec.kind} needs six finite numbers {axes}; got {shown}")
        if spec.kind == "ijk":
            box = ijk_box_to_canonical(volume, *spec.values)
        else:
            box = ras_box_to_canonical(volume, spec.values[:3], spec.values[3:])
        problem = _box_too_thin(volume, box, spec)
        if problem:
            raise MedSAMError(problem)
    except MedSAMError as exc:
        if several or spec.from_file:
            raise MedSAMError(f"{spec.where}: {exc}") from None
        raise
    return box


def _slices_text(volume, zs: Sequence[int]) -> str:
    """Canonical slices as the file's indices, e.g. ``"k 70..95"``."""
    named = [volume.orientation.slice_to_index(z) for z in zs]
    if not named:
        return "no slice"
    axis = named[0][0]
    values = sorted(v for _, v in named)
    return f"{axis}={values[0]}" if values[0] == values[-1] else f"{axis} {values[0]}..{values[-1]}"


def _stops_text(volume, result, z_start: int) -> str:
    """Why each direction of a propagation ended, with slices named by the file's index."""
    parts = []
    for direction in result.stop_reasons:
        rejected = [r for r in result.slices if not r.accepted and (r.z > z_start if direction == "up" else r.z < z_start)]
        if rejected:
            parts.append(f"{direction}: stopped at {_slices_text(volume, [rejected[0].z])}: {rejected[0].reason}")
        else:
            name = volume.orientation.name_slices
            parts.append(f"{name(direction)}: {name(result.stop_reasons[direction])}")
    return "; ".join(parts)


def _mask_text(volume, name: str, mask, how: str) -> str:
    import numpy as np

    found = [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    where = f" ({_slices_text(volume, found)})" if found else ""
    return f"{name}: {int(mask.sum())} voxels on {len(found)} slices{where} ({how})"


@dataclass
class _Done:
    """What one structure of a run gave."""

    name: str
    prompts: List[BoxPrompt]  # every box of the structure as run (one: the one-box path)
    mask: object  # (z, y, x) bool
    how: str
    result: object = None  # 3D: the PropagationResult (what the review report reads)
    given: Optional[List[BoxPrompt]] = None  # the boxes as the user gave them (what the record keeps)

    def __post_init__(self) -> None:
        if self.given is None:
            self.given = list(self.prompts)

    @property
    def prompt(self) -> BoxPrompt:
        """The structure's first box (its z-range is every box's: :func:`check_structure_boxes`)."""
        return self.prompts[0]


def _boxes_how(volume, prompts: Sequence[BoxPrompt], result) -> str:
    """How a structure made from several boxes was found: its pieces or key slices, the z-range,
    and why each pass ended (slices named as the file's indices)."""
    zs = sorted({p.z for p in prompts})
    if len(zs) == 1:
        kind = f"{len(prompts)} pieces on {_slices_text(volume, zs)}"
    else:
        kind = "key slices " + ", ".join(_slices_text(volume, [z]) for z in zs)
    if prompts[0].z_range is not None:
        kind += f", z-range {_slices_text(volume, list(prompts[0].z_range))}"
    name = volume.orientation.name_slices
    stops = "; ".join(f"{name(k)}: {name(v)}" for k, v in result.stop_reasons.items())
    return f"{kind}; {stops}" if stops else kind


def _several_boxes_run_here(segmenter, name: str) -> None:
    """A structure from several boxes needs :meth:`Segmenter.segment_boxes
    <MedSAMSlicerLib.segmenter.Segmenter.segment_boxes>` (a ``medsam-slicer serve`` has no such call)."""
    if not hasattr(segmenter, "segment_boxes"):
        raise MedSAMError(f"'{name}' has several boxes: a structure's pieces and key slices run on this computer; "
                          "the server (--server) takes one box per structure")


def _run(segmenter, volume, prompts: Dict[str, List[BoxPrompt]], mode: str, direction: str, progress: bool
         ) -> List[_Done]:
    """Run the structures (in their order, each with its boxes) as one job; the masks and how each
    was found. One structure with one box: :meth:`Segmenter.segment`, exactly as before; one
    structure with several boxes (its pieces on one slice, or its key slices):
    :meth:`Segmenter.segment_boxes`; several structures: :meth:`Segmenter.segment_structures`
    (a structure's pieces listed under its name; key slices never reach it: :func:`job_groups`)."""
    bar = TerminalProgress("propagating") if progress else None
    if len(prompts) == 1:
        name, plist = next(iter(prompts.items()))
        if len(plist) > 1:
            if mode != "3d" or direction != "both":
                raise MedSAMError(f"'{name}' has {len(plist)} boxes: they are followed in 3D both ways; --slice-only "
                                  "and --direction work on one box")
            _several_boxes_run_here(segmenter, name)
            result = segmenter.segment_boxes(plist, progress=bar)
            return [_Done(name, list(plist), result.mask, _boxes_how(volume, plist, result), result)]
        prompt = plist[0]
        done = segmenter.segment(prompt, mode, direction=direction, progress=bar)
        if mode == "2d":
            how = f"slice {_slices_text(volume, [prompt.z])} only" + (
                "" if prompt.z_range is None else ", the 3D box's middle slice")
        elif prompt.z_range is None:
            how = _stops_text(volume, done.result, prompt.z)
        else:
            how = f"3D box, slices {_slices_text(volume, list(prompt.z_range))}"
        return [_Done(name, [prompt], done.mask, how, done.result)]
    if mode != "3d" or direction != "both":
        raise MedSAMError("several structures are segmented in 3D both ways from their boxes: --slice-only and "
                          "--direction work on one structure at a time")
    if segmenter.speed.stride > 1:
        _note(f"several structures: every slice is computed (the '{segmenter.speed.name}' speed's every-"
              f"{segmenter.speed.stride}th-slice path follows one structure)")
    for name, plist in prompts.items():
        if len(plist) > 1:
            _several_boxes_run_here(segmenter, name)
    job = segmenter.segment_structures({n: p[0] if len(p) == 1 else list(p) for n, p in prompts.items()},
                                       progress=bar)
    out = []
    for name, plist in prompts.items():
        result, prompt = job.results[name], plist[0]
        if len(plist) > 1:
            how = _boxes_how(volume, plist, result)
        elif prompt.z_range is None:
            how = _stops_text(volume, result, prompt.z)
        else:
            how = f"3D box, slices {_slices_text(volume, list(prompt.z_range))}"
        lost = int((job.contested & ~result.mask).sum())
        if lost:
            how += f"; {lost} voxels claimed by another structure with more confidence"
        out.append(_Done(name, list(plist), result.mask, how, result))
    return out


def review_path(output: Path) -> Path:
    """Where ``segment`` writes a 3D result's review: beside the output, ``liver.seg.nrrd`` ->
    ``liver.review.json``."""
    from .fileio.atomic import split_extension

    stem, _ = split_extension(output.name)
    return output.with_name(stem + ".review.json")


def write_review_report(volume, done: Sequence[_Done], output: Path, overwrite: bool = False) -> Path:
    """Write the review of 3D results (:func:`~MedSAMSlicerLib.segmentation.review.review_report`: per slice, as
    the file's index, the predicted IoU, area, doubtful flag and reason; why each end stopped)
    beside ``output`` (:func:`review_path`), atomically, never over an existing file without
    ``overwrite``; returns its path. One structure: its report with ``segment`` and ``output``;
    several: ``{"output", "structures": [one such report per structure]}``."""
    import json

    from .fileio.atomic import atomic_write
    from .segmentation.review import review_report

    reports = [{"segment": d.name, "output": output.name, **review_report(d.result, volume.orientation.slice_to_index)}
               for d in done]
    data = reports[0] if len(reports) == 1 else {"output": output.name, "structures": reports}
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(review_path(output), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _write(volume, out: Path, done: List[_Done], colors: List[Tuple[float, float, float]], records, overwrite: bool
           ) -> str:
    """Write the masks (a ``.seg.nrrd`` with their records, or a labelmap); a note on label values."""
    import numpy as np

    from .fileio.segnrrd import write_seg_nrrd
    from .fileio.volumes import write_labelmap

    if out.name.lower().endswith(".seg.nrrd"):
        write_seg_nrrd([(d.name, d.mask, c, r.tags()) for d, c, r in zip(done, colors, records)], volume, out,
                       overwrite=overwrite)
        return ""
    if len(done) == 1:
        write_labelmap(done[0].mask.astype(np.uint8), volume, out, overwrite=overwrite)
        return ""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for n, d in enumerate(done, 1):
        labels[d.mask] = n  # overlaps are settled: each voxel is in one mask at most
    write_labelmap(labels, volume, out, overwrite=overwrite)
    return "labels: " + ", ".join(f"{n} {d.name}" for n, d in enumerate(done, 1))


def _new_segmenter(model, checkpoint, device, precision, download, speed, progress, server=None):
    if server:
        from .remote.client import RemoteClient, RemoteSegmenter

        note = RemoteClient(server["url"], server.get("token")).insecure_note()
        if note:
            print(f"medsam-slicer: warning: {note}", file=sys.stderr)
        segmenter = RemoteSegmenter(server["url"], server.get("token"), float(server.get("timeout", 60.0)),
                                    server.get("cafile"), model=model, speed=speed)
        print(segmenter.describe(), file=sys.stderr)
        return segmenter
    import warnings

    from .segmenter import Segmenter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the segmenter's notes are printed below, in our words
        segmenter = Segmenter(model, checkpoint=checkpoint, device=device, precision=precision, download=download,
                              cache_mb=ONE_SHOT_CACHE_MB, speed=speed,
                              progress=TerminalProgress("weights") if progress else None)
    print(segmenter.describe(), file=sys.stderr)
    for text in segmenter.notes:
        _note(text)
    return segmenter


def _read_checked_volume(volume_path, allow_gaps: bool):
    import warnings

    from .fileio.volumes import read_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the notes are printed below, in our words
        volume = read_volume(volume_path, allow_gaps=allow_gaps)
    for text in volume.notes:
        _note(text)
    return volume


def segment_file(
    volume_path: str,
    output: Path,
    box_ijk: Optional[Sequence[float]] = None,
    box_ras: Optional[Sequence[float]] = None,
    name: str = "segment",
    direction: str = "both",
    slice_only: bool = False,
    window=None,
    overwrite: bool = False,
    segmenter=None,
    model: str = "litemedsam",
    checkpoint: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    download: bool = False,
    progress: bool = True,
    allow_gaps: bool = False,
    speed: str = "exact",
    prompts: Optional[Sequence[NamedBox]] = None,
    server: Optional[Mapping[str, object]] = None,
) -> str:
    """Segment one or several structures of a volume file and write them on the file's grid.

    Everything that can be checked without the model is checked first, before torch is even
    imported: the output (name, extension, folder writable, not the input, not existing without
    ``overwrite``), the volume (:func:`~MedSAMSlicerLib.fileio.volumes.read_volume`'s checks) and every
    box. The output is published atomically and, without ``overwrite``, never replaces a file,
    even one created while the model ran. ``window`` is a
    :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window`, or a function returning one (called after
    the checks; ``None``: automatic). ``segmenter`` reuses a loaded
    :class:`~MedSAMSlicerLib.segmenter.Segmenter` (and its embedding cache); otherwise one is
    made with a small cache (one-shot run) and ``speed``, a
    :data:`~MedSAMSlicerLib.models.speed.SPEED_TIERS` name.

    The structures: ``prompts`` (several :class:`NamedBox`), or one box ``box_ijk`` / ``box_ras``
    named ``name``. ``slice_only`` segments one slice: the box's slice, or a 3D box's middle slice
    (one structure). Slices are reported as the file's indices (e.g. ``k=21``).

    Returns:
        A summary: one line per structure, then the time and the output.

    ``server`` (``{"url", "token", "timeout", "cafile"}``) runs the model on a ``medsam-slicer serve``
    (:class:`~MedSAMSlicerLib.remote.client.RemoteSegmenter`): the same checks first, the same output
    and record after; the session is closed at the end.
    """
    if prompts is None:
        if (box_ijk is None) == (box_ras is None):
            raise MedSAMError("give exactly one box: --box-ijk or --box-ras")
        kind, values = ("ijk", box_ijk) if box_ijk is not None else ("ras", box_ras)
        prompts = [NamedBox(name, kind, tuple(values), None, f"--box-{kind}")]
    if not prompts:
        raise MedSAMError("give at least one box (--box-ijk / --box-ras) or a --prompts file")
    structures = group_structures(prompts)
    if len(structures) > MAX_STRUCTURES:
        raise MedSAMError(f"{len(structures)} structures; at most {MAX_STRUCTURES} run as one job")
    several = len(structures) > 1
    if several and slice_only:
        raise MedSAMError("--slice-only works on one structure; give one box")
    if several and direction != "both":
        raise MedSAMError("--direction works on one structure; several are segmented both ways from their boxes")
    for name, specs in structures.items():
        if len(specs) > 1 and server:
            raise MedSAMError(f"'{name}' has {len(specs)} boxes: a structure's pieces and key slices run on this "
                              "computer; the server (--server) takes one box per structure")
        if len(specs) > 1 and (slice_only or direction != "both"):
            flag = "--slice-only" if slice_only else "--direction"
            raise MedSAMError(f"{flag} works on one box; '{name}' has {len(specs)} (its pieces or key slices are "
                              "followed in 3D both ways)")
    from .fileio.atomic import check_output
    from .fileio.volumes import LABELMAP_EXTENSIONS

    out = check_output(output, overwrite, inputs=[volume_path], formats=LABELMAP_EXTENSIONS)
    if not slice_only:  # the review beside it: checked with the output, before anything is written
        check_output(review_path(out), overwrite, inputs=[volume_path], what="the review written beside the output")
    volume = _read_checked_volume(volume_path, allow_gaps)
    given = {name: [BoxPrompt.from_voxel_box(b[:3], b[3:]) for b in (canonical_box(volume, spec, len(prompts) > 1)
                                                                     for spec in specs)]
             for name, specs in structures.items()}
    boxed = {name: structure_prompts(given[name], [spec.where for spec in structures[name]],
                                     volume.orientation.slice_to_index) for name in structures}
    keyed = [name for name, plist in boxed.items() if len({p.z for p in plist}) > 1]
    if several and keyed and not out.name.lower().endswith(".seg.nrrd"):
        raise MedSAMError(f"'{keyed[0]}' has boxes on several slices (key slices): it is segmented on its own, so its "
                          "overlaps with the other structures are not settled, and a labelmap holds one structure per "
                          "voxel. Write a .seg.nrrd (its segments may overlap), or segment it in a run of its own")

    # Only now the model side (torch).
    from .segmentation.preprocessing import Window, window_note

    window = window() if callable(window) else window
    window = window or Window.automatic(volume.array)
    warning = window_note(volume.array, window)
    if warning:
        print(f"medsam-slicer: warning: {warning}", file=sys.stderr)
    t0 = time.perf_counter()
    own = segmenter is None
    if own:
        segmenter = _new_segmenter(model, checkpoint, device, precision, download, speed, progress, server)
    try:
        colors = [_structure_color(name, specs) or (SINGLE_COLOR if not several else _default_color(n))
                  for n, (name, specs) in enumerate(structures.items())]
        return _segment_and_write(segmenter, volume, window, boxed, given, colors, slice_only, direction, out,
                                  overwrite, progress, t0)
    finally:
        if own and server:
            segmenter.close()


def group_structures(prompts: Sequence[NamedBox]) -> Dict[str, List[NamedBox]]:
    """The user's boxes grouped into structures, in the order of each structure's first box.

    Boxes given with exactly the same name are one structure (its pieces, or its key slices:
    :func:`check_structure_boxes`). Names follow the one rule for segment names
    (:func:`~MedSAMSlicerLib.fileio.segnrrd.segment_name`: whitespace runs collapsed); two names
    that are equal only once collapsed (``"liver"`` and ``"liver "``) are refused, as before
    structures could have several boxes: they look like two structures that were meant to differ.

    Raises:
        MedSAMError: an invalid name, two spellings of one name, or two colours for one structure
            (naming the boxes as the user gave them).
    """
    from dataclasses import replace as _replace

    from .fileio.segnrrd import segment_name

    groups: Dict[str, List[NamedBox]] = {}
    spelled: Dict[str, NamedBox] = {}
    for spec in prompts:
        name = segment_name(spec.name, spec.where)
        first = spelled.setdefault(name, spec)
        if first.name != spec.name:
            raise MedSAMError(f"two structures are named '{name}' ({first.where} and {spec.where}) (given as "
                              f"{first.name!r} and {spec.name!r}: names are compared with their spaces collapsed); "
                              "give each its own name, or spell it the same way for boxes of one structure")
        groups.setdefault(name, []).append(_replace(spec, name=name))
    for name, specs in groups.items():
        given = [s for s in specs if s.color is not None]
        other = next((s for s in given if s.color != given[0].color), None)
        if other is not None:
            raise MedSAMError(f"{given[0].where} and {other.where} give '{name}' two colours; give one (or the same "
                              "on each box)")
    return groups


def _structure_color(name: str, specs: Sequence[NamedBox]) -> Optional[Tuple[float, float, float]]:
    return next((s.color for s in specs if s.color is not None), None)


def job_groups(boxed: Mapping[str, Sequence[BoxPrompt]]) -> List[List[str]]:
    """How a run's structures are segmented, in order: the structures without key slices as one
    job (:meth:`Segmenter.segment_structures <MedSAMSlicerLib.segmenter.Segmenter.segment_structures>`:
    their overlaps settled), and each structure with key slices (boxes on several slices) on its
    own (:meth:`Segmenter.segment_boxes <MedSAMSlicerLib.segmenter.Segmenter.segment_boxes>`), as a
    job of one, since a job of several structures follows each from boxes on one slice. Each group
    gets its own job record, so ``--replay`` runs them the same way."""
    keyed = [n for n, plist in boxed.items() if len({p.z for p in plist}) > 1]
    rest = [n for n in boxed if n not in keyed]
    return ([rest] if rest else []) + [[n] for n in keyed]


def _segment_and_write(segmenter, volume, window, boxed, given, colors, slice_only, direction, out, overwrite,
                       progress, t0) -> str:
    """:func:`segment_file` once its checks passed: run each job (:func:`job_groups`), write the output,
    the review and the summary."""
    import numpy as np

    from .fileio.atomic import published_together
    from .segmentation.provenance import Provenance, new_job, prompt_ras, volume_sha256

    segmenter.set_volume(volume.array, window)
    mode = "2d" if slice_only else "3d"
    groups = job_groups(boxed)
    by_name, jobs = {}, {}
    for group in groups:
        job = new_job(group)
        for d in _run(segmenter, volume, {n: boxed[n] for n in group}, mode, direction, progress):
            d.given = list(given[d.name])
            by_name[d.name], jobs[d.name] = d, job
    done = [by_name[n] for n in boxed]
    if len(done) > 1:  # a structure with key slices ran on its own: say where it overlaps the others
        for d in done:
            if len({p.z for p in d.prompts}) == 1:
                continue
            overlap = sum(int((np.asarray(d.mask) & np.asarray(o.mask)).sum()) for o in done if o is not d)
            d.how += (f"; segmented on its own (key slices): {overlap} voxels overlap other structures, not settled"
                      if overlap else "; segmented on its own (key slices), no overlap with the others")
    vsha = volume_sha256(volume.array)
    records = [Provenance.of(segmenter, [prompt_ras(volume, p) for p in d.given], mode, direction, jobs[d.name],
                             vsha) for d in done]
    with published_together():  # the mask and its review: both or neither (a full disk)
        labels = _write(volume, out, done, colors, records, overwrite)
        reviewed = "" if slice_only else f" and {write_review_report(volume, done, out, overwrite).name}"
    lines = [_mask_text(volume, d.name, d.mask, d.how) for d in done]
    tail = f"{time.perf_counter() - t0:.1f} s; wrote {out}{reviewed}" + (f" ({labels})" if labels else "")
    if len(done) == 1:
        return f"{lines[0]}; {tail}"
    jobs_text = "as one job" if len(groups) == 1 else f"in {len(groups)} jobs"
    return "\n".join(lines + [f"{len(done)} structures {jobs_text}; {tail}"])


def _default_color(n: int) -> Tuple[float, float, float]:
    from .fileio.segnrrd import DEFAULT_COLORS

    return DEFAULT_COLORS[n % len(DEFAULT_COLORS)]


#: What must be the same for all structures of one job (they ran in one segmenter, on one volume).
_JOB_FIELDS = ("model", "weights_sha256", "speed", "precision", "window", "mode", "direction", "volume_sha256")


def _check_replayable(name: str, record) -> None:
    """Refuse a record whose corrections cannot be re-run: a slice the user edited by hand (its
    voxels are not in the record) or a result added to or removed from the segment."""
    for i, c in enumerate(record.corrections, 1):
        kind = c.get("kind")
        where = f"segment '{name}', correction {i} of {len(record.corrections)}"
        if c.get("combine"):
            raise MedSAMError(f"{where}: a result {c['combine']}ed to the segment, which a replay does not redo; "
                              "only box corrections and slices accepted as predicted are replayed")
        if kind == "accept" and c.get("edited"):
            raise MedSAMError(f"{where}: a slice edited by hand and accepted; its voxels are not in the record, so "
                              "the segment cannot be re-run")
        if kind not in ("box", "accept"):
            raise MedSAMError(f"{where}: unknown kind {kind!r}")
        if record.mode != "3d":
            raise MedSAMError(f"{where}: corrections apply to 3D results; the record says mode {record.mode}")


def _recorded_prompt(volume, corners_ras) -> BoxPrompt:
    """The prompt a record's box stands for (:func:`~MedSAMSlicerLib.segmentation.provenance.prompt_ras` read
    back): its two voxel centres in RAS -> the voxel box on ``volume`` -> a :class:`BoxPrompt`.

    Raises:
        BoxOutside: the box misses the volume.
    """
    import numpy as np

    from .boxes import voxel_box

    first_v, last_v = voxel_box(volume.ras_to_canonical(np.asarray(corners_ras, dtype=float)), volume.shape)
    return BoxPrompt.from_voxel_box(first_v, last_v)


def _correction_steps(volume, name: str, corrections: Sequence[Mapping[str, object]]) -> List[Tuple[int, object]]:
    """A record's corrections on ``volume``, checked before the model loads: per correction
    ``(z, boxes)`` for new boxes (one, or with ``"more"`` one per piece of the structure on that
    slice), ``(z, None)`` for an accepted slice (canonical slice ``z``).

    Raises:
        MedSAMError: a correction whose box or slice misses the volume, or whose boxes lie on
            different slices (naming the segment and the correction).
    """
    import numpy as np

    from .boxes import BoxOutside

    steps: List[Tuple[int, object]] = []
    for i, c in enumerate(corrections, 1):
        try:
            if c["kind"] == "box":
                fixes = [_recorded_prompt(volume, ras) for ras in [c["ras"], *(c.get("more") or [])]]
                steps.append((fixes[0].z, [f.box for f in fixes]))
            else:
                z = int(round(float(volume.ras_to_canonical(np.asarray([c["slice_ras"]], dtype=float))[0][2])))
                if not 0 <= z < volume.shape[0]:
                    raise BoxOutside(2)
                steps.append((z, None))
        except (BoxOutside, KeyError, TypeError, ValueError):
            raise MedSAMError(f"segment '{name}', correction {i}: its slice or box lies outside the volume "
                              f"({dict(c)})") from None
        if c["kind"] == "box" and len({f.box3d[2::3] for f in fixes}) > 1:
            raise MedSAMError(f"segment '{name}', correction {i}: its boxes lie on different slices; the boxes of "
                              "one correction are the pieces of the structure on one slice")
    return steps


def _replay_corrections(segmenter, done: _Done, steps: Sequence[Tuple[int, object]]) -> None:
    """Apply a record's corrections (:func:`_correction_steps`) to a replayed 3D result, in order,
    as the Slicer effect made them (:meth:`MedSAMBridge._correct <MedSAMBridgeLib.MRMLBridge.MedSAMBridge>`)."""
    import numpy as np

    from .segmentation.corrections import Correction

    result = done.result
    for z, boxes in steps:
        correction = Correction.accept(z) if boxes is None else Correction.with_boxes(z, boxes)
        result = segmenter.correct(result, [correction], locked=result.locked, z_range=done.prompt.z_range)
    done.result = result
    done.mask = np.asarray(result.mask, dtype=bool)
    done.how += f"; {len(steps)} correction(s) replayed"


def replay_file(
    seg_path: str,
    volume_path: str,
    output: Path,
    overwrite: bool = False,
    segmenter=None,
    checkpoint: Optional[str] = None,
    device: str = "auto",
    download: bool = False,
    progress: bool = True,
    allow_gaps: bool = False,
    server: Optional[Mapping[str, object]] = None,
) -> str:
    """Re-run the segments of a ``.seg.nrrd`` written by :func:`segment_file` and write the result.

    Each segment's record (:class:`~MedSAMSlicerLib.segmentation.provenance.Provenance`) gives its prompts, model,
    weights' SHA-256, window, speed, precision, mode and direction; structures made as one job run as
    one job again, and each segment's box corrections and accepted slices are applied after, in
    order, as the effect made them. ``checkpoint`` points at the weights when they are not the registry's; ``segmenter``
    reuses a loaded one (its model, weights, speed and precision must match the record); ``server``
    replays on a ``medsam-slicer serve`` (as :func:`segment_file`), whose weights must be the record's.

    Returns:
        A summary: per segment, whether the new mask equals the file's.

    Raises:
        MedSAMError: a segment without a record, or with a correction a replay cannot redo (a slice
            edited by hand, a result added or removed: :func:`_check_replayable`); a volume
            whose voxels or grid differ from the one the file was made on; weights whose SHA-256
            differs from the record's; the output checks of :func:`segment_file`.
    """
    import numpy as np

    from .fileio.atomic import check_output
    from .fileio.segnrrd import read_seg_nrrd
    from .fileio.volumes import LABELMAP_EXTENSIONS
    from .segmentation.provenance import Provenance, first_difference, volume_sha256

    out = check_output(output, overwrite, inputs=[volume_path, seg_path], formats=LABELMAP_EXTENSIONS)
    seg = read_seg_nrrd(seg_path)
    records = [(s.name, Provenance.from_tags(s.tags, f"segment '{s.name}' of '{seg.path.name}'")) for s in seg.segments]
    names = [name for name, _ in records]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MedSAMError(f"'{seg.path.name}' has several segments named '{twice[0]}'; a replay could not tell their "
                          "results apart. Rename them (e.g. in Slicer) and save the file again")
    for name, record in records:
        _check_replayable(name, record)
    first = records[0][1]
    differs = first_difference([r for _, r in records], _JOB_FIELDS)
    if differs:
        raise MedSAMError(f"the segments of '{seg.path.name}' were made with different {differs.replace('_', ' ')}s; "
                          "replay them from separate files")
    volume = _read_checked_volume(volume_path, allow_gaps)
    if volume_sha256(volume.array) != first.volume_sha256:
        raise MedSAMError(f"'{seg.path.name}' was made from another volume: the voxels of '{volume_path}' differ "
                          "from the ones it was made from. Give the volume it was made from")
    same_grid = (seg.image.GetSize() == volume.image.GetSize()
                 and np.allclose(seg.image.GetSpacing(), volume.image.GetSpacing(), atol=1e-6)
                 and np.allclose(seg.image.GetOrigin(), volume.image.GetOrigin(), atol=1e-4)
                 and np.allclose(seg.image.GetDirection(), volume.image.GetDirection(), atol=1e-6))
    if not same_grid:
        raise MedSAMError(f"'{seg.path.name}' is not on the grid of '{volume_path}' (size, spacing, origin or "
                          "direction differ): give the volume it was made from")
    own = segmenter is None and bool(server)
    if own:
        segmenter = _new_segmenter(first.model, None, device, first.precision, download, first.speed, progress, server)
    try:
        return _replay(seg, records, first, volume, volume_path, segmenter, checkpoint, device, download, progress,
                       out, overwrite)
    finally:
        if own:
            segmenter.close()


def _replay(seg, records, first, volume, volume_path, segmenter, checkpoint, device, download, progress, out,
            overwrite) -> str:
    """:func:`replay_file` once the file and the volume passed their checks."""

    from .boxes import BoxOutside
    from .models.registry import file_digest, get_spec, resolve_weights
    from .segmentation.provenance import Provenance, prompt_ras, replay_groups

    if segmenter is not None:
        weights, digest = segmenter.weights, segmenter.weights_sha256
    else:
        weights = resolve_weights(get_spec(first.model), checkpoint=checkpoint, download=download)
        digest = file_digest(Path(weights))
    if digest != first.weights_sha256:
        raise MedSAMError(f"'{seg.path.name}' was made with other weights (SHA-256 {first.weights_sha256[:16]}...); "
                          f"'{weights}' has {digest[:16]}.... Give those weights with --checkpoint")
    given: Dict[str, List[BoxPrompt]] = {}
    prompts: Dict[str, List[BoxPrompt]] = {}
    for name, record in records:
        try:
            given[name] = [_recorded_prompt(volume, p["ras"]) for p in record.prompts]
        except BoxOutside:
            raise MedSAMError(f"segment '{name}': a box of it lies outside '{volume_path}'") from None
        several = len(record.prompts) > 1
        prompts[name] = structure_prompts(given[name], [f"segment '{name}', box {n}" if several else
                                                                f"segment '{name}'" for n in range(1, len(given[name]) + 1)])
    steps = {name: _correction_steps(volume, name, record.corrections) for name, record in records}

    t0 = time.perf_counter()
    if segmenter is None:
        segmenter = _new_segmenter(first.model, checkpoint, device, first.precision, download, first.speed, progress)
    elif (segmenter.spec.name, segmenter.speed.name, segmenter.precision) != (first.model, first.speed, first.precision):
        raise MedSAMError(f"the segmenter runs {segmenter.spec.name} at speed {segmenter.speed.name} in "
                          f"{segmenter.precision}; the record says {first.model} at {first.speed} in {first.precision}")
    segmenter.set_volume(volume.array, first.window_object())
    done: List[_Done] = []
    for group in replay_groups(records):
        for d in _run(segmenter, volume, {n: prompts[n] for n, _ in group}, first.mode, first.direction, progress):
            d.given = list(given[d.name])
            done.append(d)
    by_name = {d.name: d for d in done}
    done = [by_name[name] for name, _ in records]
    for d, (_, record) in zip(done, records):
        if record.corrections:
            _replay_corrections(segmenter, d, steps[d.name])
    colors = [s.color for s in seg.segments]
    new = [Provenance.of(segmenter, [prompt_ras(volume, p) for p in d.given], r.mode, r.direction, r.job, r.volume_sha256)
           .with_corrections(r.corrections) for d, (_, r) in zip(done, records)]
    labels = _write(volume, out, done, colors, new, overwrite)
    lines = []
    for d, s in zip(done, seg.segments):
        before = volume.orientation.to_canonical(seg.mask_kji(s))
        changed = int((before != d.mask).sum())
        lines.append(_mask_text(volume, d.name, d.mask, d.how) + (
            "; the same mask as in the file" if changed == 0 else f"; {changed} voxels differ from the file's mask"))
    tail = f"replayed {len(done)} segment(s); {time.perf_counter() - t0:.1f} s; wrote {out}"
    return "\n".join(lines + [tail + (f" ({labels})" if labels else "")])
