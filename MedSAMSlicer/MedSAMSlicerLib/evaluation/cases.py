"""Labelled volumes to evaluate on: an image, its structures, and how to read them.

A :class:`Case` is an image in canonical ``(z, y, x)`` order with its spacing and a list of
:class:`Structure` s, each one or more label values of a labelmap layer. Cases come from

- an image and a labelmap (any format :func:`~MedSAMSlicerLib.fileio.volumes.read_volume` reads) or a
  Slicer ``.seg.nrrd`` (:func:`load_case`); labels on another grid (a ``.seg.nrrd`` cropped by
  Slicer, a labelmap stored flipped) are resampled onto the image's grid (nearest neighbour);
- a folder in the FLARE22 layout, ``images/<case>_0000.nii.gz`` + ``labels/<case>.nii.gz``
  (:func:`load_folder`);
- an *evaluation set* file, TOML or JSON (:func:`load_set`), the format of the set shipped in
  ``Testing/Data/evaluation_set.toml``::

      min_slices = 5                       # structures on fewer labelled slices are skipped

      [[case]]
      name = "ct"
      image = "totalsegmentator/example_ct.nii.gz"          # relative to the set file
      labels = "totalsegmentator/example_seg_fast_force_split.nii.gz"
      slice_thickness_mm = 5               # optional: resample to thicker slices first
      [case.structures]                    # name = label value, or a list of values (one structure)
      liver = 5
      aorta_iliac_arteries = [52, 65, 66]

  A case may say ``structures_from = "<other case>"`` to reuse another case's table; with a
  ``.seg.nrrd`` the segments' own names are used when no table is given.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MedSAMError
from ..fileio.files import read_table
from ..metrics import tolerance_for

PathLike = Union[str, Path]

#: Structures on fewer labelled slices than this are left out (the issue's evaluation set).
DEFAULT_MIN_SLICES = 5
#: A labelmap read without a structures table may hold at most this many label values.
MAX_LABELS_WITHOUT_TABLE = 512
#: The most memory a slice resampling may make (image and labels together).
MAX_RESAMPLED_BYTES = 2 * 2 ** 30


@dataclass(frozen=True)
class Structure:
    """One structure of a case: the voxels of ``layer`` whose label is one of ``labels``.

    Attributes:
        name: its name in reports.
        labels: label values that together make the structure (e.g. aorta + iliac arteries).
        layer: which labelmap layer of the case (a ``.seg.nrrd`` with overlapping segments has
            several).
        tolerance_mm: the NSD tolerance (FLARE22's for its organs, else 3 mm).
    """

    name: str
    labels: Tuple[int, ...]
    layer: int = 0
    tolerance_mm: float = 3.0


@dataclass
class Case:
    """A labelled volume.

    Attributes:
        name: short name (reports, ``--include`` patterns).
        image: raw intensities ``(z, y, x)`` in canonical axial order.
        spacing: ``(sz, sy, sx)`` in mm (the arrays' axis order).
        layers: labelmaps ``(z, y, x)``, integer, on the image's grid.
        structures: what to evaluate.
        source: where it came from (for reports).
    """

    name: str
    image: np.ndarray
    spacing: Tuple[float, float, float]
    layers: List[np.ndarray]
    structures: List[Structure] = field(default_factory=list)
    source: str = ""

    def mask(self, structure: Structure) -> np.ndarray:
        """The ``(z, y, x)`` boolean mask of ``structure``."""
        return np.isin(self.layers[structure.layer], structure.labels)


def labelled_slices(mask_zyx: np.ndarray) -> int:
    """How many slices of a ``(z, y, x)`` mask hold any voxel."""
    return int(np.asarray(mask_zyx, bool).any(axis=(1, 2)).sum())


# -------------------------------------------------------------------------------------------
# Reading


def _read_labels_on_grid(path: Path, volume) -> Tuple[List[np.ndarray], List[Tuple[str, int, int]]]:
    """Labelmap layers of ``path`` on ``volume``'s grid, and ``(name, layer, value)`` per
    ``.seg.nrrd`` segment (empty for a plain labelmap)."""
    import SimpleITK as sitk

    from ..fileio.segnrrd import read_seg_nrrd
    from ..fileio.volumes import read_volume

    if not path.exists():
        raise MedSAMError(f"labels not found: '{path}'")
    segments: List[Tuple[str, int, int]] = []
    if path.name.lower().endswith(".seg.nrrd"):
        seg = read_seg_nrrd(path)
        image = seg.image
        segments = [(s.name, s.layer, s.label) for s in seg.segments]
    else:
        image = read_volume(path, labels=True).image
    if image.GetDimension() != 3:
        raise MedSAMError(f"the labels '{path}' must be a 3D labelmap; got {image.GetDimension()}D")
    same = (
        image.GetSize() == volume.image.GetSize()
        and np.allclose(image.GetSpacing(), volume.image.GetSpacing(), atol=1e-4)
        and np.allclose(image.GetOrigin(), volume.image.GetOrigin(), atol=1e-3)
        and np.allclose(image.GetDirection(), volume.image.GetDirection(), atol=1e-5)
    )
    if not same:
        # Labels stored on another grid (cropped by Slicer, flipped, ...): nearest neighbour onto
        # the image's voxels, so every label value stays a label value.
        image = sitk.Resample(image, volume.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, layer])
    if not np.issubdtype(array.dtype, np.integer):
        if not np.allclose(array, np.round(array)):
            raise MedSAMError(f"'{path}' holds non-integer values: a labelmap has integer labels")
        array = np.round(array).astype(np.int32)
    stacked = array[..., None] if array.ndim == 3 else array
    layers = [volume.orientation.to_canonical(stacked[..., i]).copy() for i in range(stacked.shape[-1])]
    return layers, segments


def _label_values(name: str, value) -> Tuple[int, ...]:
    """A structure's label values (one, or a list) as given by a caller, checked: whole numbers
    from 1 (``True``, ``"5"`` and ``5.5`` are refused, never truncated)."""
    from ..fileio.userfiles import Either, Int, ListOf, SchemaError

    label = Int(1, MAX_LABEL)
    try:
        got = Either(label, ListOf(label, 1, 256)).check(list(value) if isinstance(value, tuple) else value,
                                                         f"structure '{name}'")
    except SchemaError as exc:
        raise MedSAMError(str(exc)) from None
    return tuple(got) if isinstance(got, list) else (got,)


def _tolerance(name: str, overrides: Mapping[str, float]) -> float:
    return float(overrides.get(name, tolerance_for(name)))


def load_case(
    image: PathLike,
    labels: PathLike,
    structures: Optional[Mapping[str, Union[int, Sequence[int]]]] = None,
    name: Optional[str] = None,
    min_slices: int = DEFAULT_MIN_SLICES,
    slice_thickness_mm: Optional[float] = None,
    tolerance_mm: Optional[Mapping[str, float]] = None,
) -> Case:
    """Read an image and its labels (labelmap or ``.seg.nrrd``) as a :class:`Case`.

    Args:
        image: a volume file or DICOM folder.
        labels: a labelmap file (same grid, or resampled onto it) or a ``.seg.nrrd``.
        structures: name -> label value(s). ``None``: every segment of a ``.seg.nrrd`` by its
            name, or every label value of a labelmap as ``label_<value>``.
        name: the case's name (default: the image file's name without extensions).
        min_slices: leave out structures on fewer labelled slices (after any resampling).
        slice_thickness_mm: resample to this slice spacing first (:func:`resample_slices`).
        tolerance_mm: NSD tolerance per structure name (default FLARE22's, else 3 mm).
    """
    from ..fileio.volumes import read_volume

    image_path, label_path = Path(image), Path(labels)
    if int(min_slices) < 1:
        raise MedSAMError(f"min_slices must be at least 1; got {min_slices}")
    try:
        same = image_path.exists() and label_path.exists() and os.path.samefile(image_path, label_path)
    except OSError:
        same = False
    if same:
        raise MedSAMError(f"the labels '{label_path}' are the image itself; give the image's labelmap or .seg.nrrd")
    volume = read_volume(image_path)
    layers, segments = _read_labels_on_grid(label_path, volume)
    sx, sy, sz = volume.spacing
    overrides = dict(tolerance_mm or {})
    found: List[Structure] = []
    if structures is not None:
        present = [set(int(v) for v in np.unique(layer)) for layer in layers]
        for sname, value in structures.items():
            values = _label_values(sname, value)
            layer = 0
            if segments:
                # With a .seg.nrrd a table value may also name a segment's label in its layer.
                match = [s for s in segments if s[0] == sname]
                layer = match[0][1] if match else 0
            absent = [v for v in values if v not in present[layer]]
            if absent:
                have = sorted(present[layer] - {0})
                listed = ", ".join(map(str, have[:20])) + (", ..." if len(have) > 20 else "")
                raise MedSAMError(f"structure '{sname}': label value {absent[0]} is not in '{label_path}' "
                                  f"(it holds {listed or 'no label'}); check the structures table")
            found.append(Structure(sname, values, layer, _tolerance(sname, overrides)))
    elif segments:
        for sname, layer, value in segments:
            found.append(Structure(sname, (value,), layer, _tolerance(sname, overrides)))
    else:
        values = np.unique(layers[0])
        if len(values) > MAX_LABELS_WITHOUT_TABLE + 1:
            raise MedSAMError(f"'{label_path}' holds {len(values):,} different values; a labelmap holds a few labels. "
                              "Is it an image? Give the labels of the image (or a structures table)")
        for value in values:
            if value != 0:
                found.append(Structure(f"label_{int(value)}", (int(value),), 0, _tolerance(f"label_{int(value)}", overrides)))
    case = Case(
        name=name or re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd|\.seg)+$", "", image_path.name) or image_path.name,
        image=volume.array,
        spacing=(float(sz), float(sy), float(sx)),
        layers=layers,
        structures=found,
        source=f"{image_path} + {label_path}",
    )
    if slice_thickness_mm is not None:
        case = resample_slices(case, float(slice_thickness_mm))
    case.structures = [s for s in case.structures if labelled_slices(case.mask(s)) >= int(min_slices)]
    return case


def resample_slices(case: Case, thickness_mm: float) -> Case:
    """The case with slices ``thickness_mm`` apart: the image interpolated linearly along z, the
    labels by nearest neighbour, the first slice kept in place (in memory; nothing written).

    Refuses (:class:`MedSAMError`) a thickness that is not a positive finite number, and one that
    would make the volume larger than :data:`MAX_RESAMPLED_BYTES` (1e-5 mm on a 3 mm CT would ask
    for 1.5 TiB)."""
    if not (isinstance(thickness_mm, (int, float)) and math.isfinite(thickness_mm) and thickness_mm > 0):
        raise MedSAMError(f"slice thickness must be a positive number of mm; got {thickness_mm!r}")
    sz = case.spacing[0]
    nz = case.image.shape[0]
    new_nz = int((nz - 1) * sz / thickness_mm) + 1
    per_slice = int(np.prod(case.image.shape[1:])) * (4 + sum(layer.dtype.itemsize for layer in case.layers))
    if new_nz * per_slice > MAX_RESAMPLED_BYTES:
        raise MedSAMError(f"slice_thickness_mm {thickness_mm:g} would make {new_nz:,} slices of {sz:g} mm ones "
                          f"({new_nz * per_slice / 2**30:,.1f} GiB); this resampling is meant for thicker slices: "
                          f"give at least {(nz - 1) * sz * per_slice / MAX_RESAMPLED_BYTES:.3g} mm")
    positions = np.arange(0.0, (nz - 1) * sz + 1e-6, thickness_mm) / sz  # in old slice indices
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, nz - 1)
    frac = (positions - low)[:, None, None]
    image = case.image.astype(np.float32)
    resampled = (1.0 - frac) * image[low] + frac * image[high]
    nearest = np.minimum(np.floor(positions + 0.5).astype(int), nz - 1)
    return replace(
        case,
        name=case.name,
        image=resampled,
        spacing=(float(thickness_mm), case.spacing[1], case.spacing[2]),
        layers=[layer[nearest] for layer in case.layers],
        source=f"{case.source}, resampled to {thickness_mm:g} mm slices",
    )


def load_folder(folder: PathLike, min_slices: int = DEFAULT_MIN_SLICES,
                structures: Optional[Mapping[str, Union[int, Sequence[int]]]] = None) -> List[Case]:
    """Cases from a FLARE22-layout folder: ``images/<case>_0000.nii.gz`` with ``labels/<case>.nii.gz``."""
    root = Path(folder)
    images = sorted((root / "images").glob("*_0000.nii.gz")) if (root / "images").is_dir() else []
    if not images:
        raise MedSAMError(
            f"'{root}' has no images/<case>_0000.nii.gz: give a FLARE22-layout folder, an evaluation set "
            "file (.toml/.json), or --image/--labels pairs"
        )
    cases = []
    for image in images:
        case_name = image.name[: -len("_0000.nii.gz")]
        label = root / "labels" / f"{case_name}.nii.gz"
        if not label.exists():
            raise MedSAMError(f"no labels for '{image}': expected '{label}'")
        cases.append(load_case(image, label, structures=structures, name=case_name, min_slices=min_slices))
    return cases


#: A structure's label values: whole numbers from 1 (0 is the background).
MAX_LABEL = 2 ** 31 - 1
#: Slice thicknesses a set may ask for (mm).
THICKNESS_RANGE_MM = (0.1, 100.0)


def _set_schemas():
    from ..fileio.userfiles import Either, Int, ListOf, MapOf, Num, Str, Table

    label = Int(1, MAX_LABEL)
    structures = MapOf(Either(label, ListOf(label, 1, 256)), key=Str(max_len=200), min_len=1, max_len=1000)
    case = Table({
        "name": Str(max_len=100),
        "image": Str(max_len=4096),
        "labels": Str(max_len=4096),
        "slice_thickness_mm": Num(*THICKNESS_RANGE_MM),
        "structures": structures,
        "structures_from": Str(max_len=100),
        "min_slices": Int(1, 100_000),
        "tolerance_mm": MapOf(Num(0.0, 100.0, lo_open=True), key=Str(max_len=200), max_len=1000),
    }, required=("image", "labels"), what="a [[case]] table")
    top = Table({"min_slices": Int(1, 100_000), "case": _AnyList()}, required=("case",), what="an evaluation set")
    return top, case


def load_set(path: PathLike) -> List[Case]:
    """Read an evaluation set file (TOML or JSON; format in the module docstring).

    The file is read by the one reader of user files (:mod:`~MedSAMSlicerLib.fileio.userfiles`) and
    checked against the set's schema before any image is read: label values are whole numbers
    from 1 (not ``"5"``, ``5.5``, ``true``), ``min_slices`` a whole number from 1, a slice
    thickness within :data:`THICKNESS_RANGE_MM`, tolerances positive; unknown keys are refused.
    Errors name the file, the case and the value.
    """
    from ..fileio.userfiles import SchemaError, shown

    p = Path(path)
    what = f"the evaluation set '{p}'"
    data = read_table(p, "the evaluation set")
    top, case_schema = _set_schemas()
    if not isinstance(data, dict):
        raise MedSAMError(f"{what} must be a table with [[case]] entries; got {shown(data)}")
    entries = data.get("case")
    if not isinstance(entries, list) or not entries:
        raise MedSAMError(f"{what} has no [[case]] entries")
    try:
        top.check(data, "")
    except SchemaError as exc:
        raise MedSAMError(f"{what}: {exc}") from None
    default_min = int(data.get("min_slices", DEFAULT_MIN_SLICES))
    checked_entries = []
    for n, entry in enumerate(entries):
        where = f"case {n + 1}" + (f" ({shown(entry['name'])})" if isinstance(entry, dict) and "name" in entry else "")
        try:
            checked_entries.append(case_schema.check(entry, where))
        except SchemaError as exc:
            raise MedSAMError(f"{what}: {exc}") from None
    tables: Dict[str, Mapping] = {}
    cases: List[Case] = []
    for n, entry in enumerate(checked_entries):
        name = str(entry.get("name") or f"case{n + 1}")
        structures = entry.get("structures")
        if "structures_from" in entry:
            source = entry["structures_from"]
            if source not in tables:
                raise MedSAMError(f"{what}: case '{name}': structures_from '{source}' names no earlier case with "
                                  "structures")
            structures = tables[source]
        if structures is not None:
            tables[name] = structures
        try:
            cases.append(load_case(
                (p.parent / entry["image"]).resolve(),
                (p.parent / entry["labels"]).resolve(),
                structures=structures,
                name=name,
                min_slices=entry.get("min_slices", default_min),
                slice_thickness_mm=entry.get("slice_thickness_mm"),
                tolerance_mm=entry.get("tolerance_mm"),
            ))
        except MedSAMError as exc:
            raise MedSAMError(f"{what}: case '{name}': {exc}") from None
    return cases


class _AnyList:
    """The ``case`` list itself (each entry is checked with its own schema)."""

    expected = "a list of [[case]] tables"

    def check(self, value, where):
        from ..fileio.userfiles import SchemaError

        if not isinstance(value, list) or not value:
            raise SchemaError(where, f"must be {self.expected}", value)
        return value


def load_inputs(
    inputs: Sequence[PathLike] = (),
    pairs: Sequence[Tuple[PathLike, PathLike]] = (),
    min_slices: int = DEFAULT_MIN_SLICES,
) -> List[Case]:
    """Cases from evaluation set files, FLARE22 folders and ``(image, labels)`` pairs; with none
    at all, the set shipped with the repository (``Testing/Data/evaluation_set.toml``)."""
    from ..data import evaluation_set

    cases: List[Case] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise MedSAMError(f"input not found: '{p}'")
        if p.is_dir():
            cases += load_folder(p, min_slices=min_slices)
        elif p.suffix.lower() in (".toml", ".json"):
            cases += load_set(p)
        else:
            raise MedSAMError(
                f"'{p}' is neither an evaluation set (.toml/.json) nor a FLARE22 folder; "
                "give an image with its labels as --image IMAGE --labels LABELS"
            )
    for image, labels in pairs:
        cases.append(load_case(image, labels, min_slices=min_slices))
    if not inputs and not pairs:
        cases = load_set(evaluation_set())
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MedSAMError(f"several cases are named {', '.join(duplicates)}: give each case its own name")
    return cases
