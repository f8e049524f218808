"""The Slicer segmentation file (``.seg.nrrd``): writing it on a volume's grid and reading it back.

A ``.seg.nrrd`` is a gzip NRRD in LPS: one shared 3D labelmap, or a 4D one (``kinds: list domain
domain domain``) with a layer per group of non-overlapping segments, plus header keys per segment
(``Segment<N>_ID``, ``_Name``, ``_Color``, ``_LabelValue``, ``_Layer``, ``_Extent``, ``_Tags``) and
the ``Segmentation_*`` keys Slicer reads (Slicer's ``vtkMRMLSegmentationStorageNode``).

Segment tags are written as Slicer writes them: ``key:value|`` for each tag, sorted by key, with no
escaping; Slicer reads them back by splitting at ``|`` and then at the first ``:``. So a key may hold
neither ``:`` nor ``|``, a value no ``|``, and neither a line break: :func:`write_seg_nrrd` refuses
those (callers that store free text, such as :mod:`~MedSAMSlicerLib.segmentation.provenance`, encode it first).

Every header value (names, tags, ...) is then written as teem's NRRD writer writes it, which is how
Slicer writes (``vtkMRMLSegmentationStorageNode`` -> ``vtkTeemNRRDWriter::SetAttribute``) and reads
(ITK's NrrdIO, ``airUnescape``) these files, Slicer 5.12.3: a backslash as ``\\\\``, a line break
as ``\\n``, any other whitespace but a tab as a space (:func:`nrrd_value`). Without this a name with
a backslash came back changed, and the record holding it (JSON, whose escapes use backslashes) was
called damaged by ``--replay``.

Segment names follow one rule (:func:`segment_name`): whitespace runs (spaces, tabs, line breaks)
become one space and the ends are trimmed, as Slicer's users see names; other control characters
are refused. Two names that differ only in whitespace are therefore the same name, and
``segment`` refuses them as two structures with one name.

Why our own reader and writer and not ``slicerio`` (1.4.0, maintained by Slicer's developers, over
``pynrrd`` 1.1.3), measured on the shipped CT with five segments:

* names and tags that are not ASCII: ``slicerio.write_segmentation`` raises ``UnicodeEncodeError``
  for a segment named "foie é", and ``read_segmentation`` drops the "é" of a file Slicer (or we)
  wrote ("liver (Leber, foie )"); Slicer reads and writes these headers as UTF-8;
* a tag value holding ``|`` is written as is, and ``slicerio`` then cannot read its own file back
  (``ValueError`` in ``read_segmentation``);
* it adds ``pynrrd`` (and ``requests``) to Slicer's Python, where SimpleITK, which reads these files,
  is already installed;
* speed is no reason either way: writing took 25 ms (ours, gzip level 6, 14.4 kB) against 12 ms
  (``slicerio``, level 6, 14.5 kB) and 47 ms (its default level 9, 13.5 kB).

The tests read our files with ``slicerio`` (an independent reader) and with Slicer itself.

Plain Python over numpy and SimpleITK; no Slicer, Qt or VTK.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import MedSAMError
from .atomic import atomic_write, check_output
from .orientation import LPS_RAS_SIGN

PathLike = Union[str, "Path"]
Color = Tuple[float, float, float]
#: What :func:`write_seg_nrrd` takes per segment: ``(name, mask_zyx, colour)`` or
#: ``(name, mask_zyx, colour, tags)``.
Segment = Union[Tuple[str, np.ndarray, Color], Tuple[str, np.ndarray, Color, Mapping[str, str]]]

#: File extensions a segmentation is written to.
SEG_NRRD_EXTENSIONS = (".seg.nrrd", ".nrrd")

# Distinct colours (RGB in 0..1) for segments written without an explicit colour.
DEFAULT_COLORS = (
    (0.945, 0.839, 0.569),
    (0.847, 0.396, 0.310),
    (0.565, 0.933, 0.565),
    (0.416, 0.600, 0.839),
    (0.863, 0.706, 0.886),
    (0.988, 0.667, 0.247),
    (0.502, 0.682, 0.502),
    (0.737, 0.416, 0.196),
    (0.298, 0.749, 0.792),
    (0.933, 0.510, 0.655),
    (0.710, 0.710, 0.314),
    (0.600, 0.450, 0.800),
)


@dataclass(frozen=True)
class SegmentEntry:
    """One segment of a ``.seg.nrrd``, as written or read.

    Attributes:
        id: ``Segment_1``, ...
        name: the segment's name.
        color: RGB in 0..1.
        layer: which labelmap layer holds it.
        label: its value in that layer.
        extent: Slicer's ``(i0, i1, j0, j1, k0, k1)`` (empty: ``0 -1 0 -1 0 -1``).
        tags: Slicer's segment tags (key -> value).
    """

    id: str
    name: str
    color: Color
    layer: int
    label: int
    extent: Tuple[int, int, int, int, int, int] = (0, -1, 0, -1, 0, -1)
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class SegmentationFile:
    """A ``.seg.nrrd`` as read by :func:`read_seg_nrrd`.

    Attributes:
        path: the file.
        image: its grid (size, spacing, origin, direction, in SimpleITK's LPS), one component per layer.
        layers_kji: per layer, the labels ``(k, j, i)`` on the file's own grid.
        segments: the segments in the file's order.
    """

    path: Path
    image: sitk.Image
    layers_kji: List[np.ndarray]
    segments: List[SegmentEntry]

    def mask_kji(self, segment: SegmentEntry) -> np.ndarray:
        """The segment's voxels ``(k, j, i)`` bool on the file's grid."""
        return self.layers_kji[segment.layer] == segment.label


def extent_kji(mask_kji: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    """Slicer's segment extent ``(i0, i1, j0, j1, k0, k1)`` of a (k, j, i) mask; empty -> 0 -1 ..."""
    if not mask_kji.any():
        return (0, -1, 0, -1, 0, -1)
    out: List[int] = []
    for numpy_axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != numpy_axis)
        hits = np.flatnonzero(mask_kji.any(axis=other))
        out += [int(hits[0]), int(hits[-1])]
    return (out[0], out[1], out[2], out[3], out[4], out[5])


#: The longest segment name we write.
MAX_NAME_LENGTH = 200


def segment_name(name: str, where: str = "a segment") -> str:
    """The one rule for a segment's name: whitespace runs (spaces, tabs, line breaks) become one
    space, the ends are trimmed; an empty name, other control characters, or more than
    :data:`MAX_NAME_LENGTH` characters are refused (:class:`MedSAMError` naming ``where``)."""
    if not isinstance(name, str):
        raise MedSAMError(f"{where}: a name must be text; got {name!r:.60}")
    text = " ".join(name.split())
    if not text:
        raise MedSAMError(f"{where}: every structure needs a name (got {name!r:.60})")
    bad = [c for c in text if ord(c) < 32 or 127 <= ord(c) < 160]
    if bad:
        raise MedSAMError(f"{where}: the name {name!r:.60} holds the control character {bad[0]!r}; "
                          "names are plain text")
    if len(text) > MAX_NAME_LENGTH:
        raise MedSAMError(f"{where}: the name is {len(text)} characters long; at most {MAX_NAME_LENGTH}")
    return text


def nrrd_value(text: str) -> str:
    """A header value as teem's NRRD writer writes it (``_nrrdWriteEscaped``, used by Slicer):
    ``\\`` -> ``\\\\``, a line break -> ``\\n``, other whitespace but a tab -> a space. ITK and
    Slicer read it back (``airUnescape``) as ``text``, apart from those other whitespace characters."""
    out = text.replace("\\", "\\\\").replace("\n", "\\n")
    return "".join(" " if c in "\r\v\f" else c for c in out)


def check_color(color: Sequence[float], name: str) -> Color:
    """Three floats in 0..1, or :class:`MedSAMError` naming the segment."""
    try:
        rgb = tuple(float(v) for v in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rgb):
        raise MedSAMError(
            f"Segment '{name}' has colour {color!r}; give three numbers in 0..1 (red, green, blue)."
        )
    return (rgb[0], rgb[1], rgb[2])


def check_tags(tags: Mapping[str, str], name: str) -> Dict[str, str]:
    """Tags that survive Slicer's ``key:value|`` format, or :class:`MedSAMError` naming the segment."""
    out: Dict[str, str] = {}
    for key, value in tags.items():
        key, value = str(key), str(value)
        if not key or any(c in key for c in ":|\r\n"):
            raise MedSAMError(f"Segment '{name}': tag name {key!r} must be non-empty, without ':', '|' or line breaks.")
        if any(c in value for c in "|\r\n"):
            raise MedSAMError(f"Segment '{name}': the value of tag '{key}' holds '|' or a line break, which "
                              "Slicer's segment tags cannot store; encode it first.")
        out[key] = value
    return out


def format_tags(tags: Mapping[str, str]) -> str:
    """Slicer's ``Segment<N>_Tags`` value: ``key:value|`` per tag, sorted by key (``|`` when none,
    as older Slicer versions need the closing bar)."""
    return "".join(f"{k}:{tags[k]}|" for k in sorted(tags)) or "|"


def parse_tags(text: str) -> Dict[str, str]:
    """Read a ``Segment<N>_Tags`` value as Slicer does: split at ``|``, then at the first ``:``;
    a piece without ``:`` is skipped."""
    tags: Dict[str, str] = {}
    for piece in text.split("|"):
        if ":" in piece:
            key, value = piece.split(":", 1)
            tags[key] = value
    return tags


def write_seg_nrrd(segments: Sequence[Segment], volume, path: PathLike, overwrite: bool = True) -> Path:
    """Write segments as a Slicer segmentation file (``.seg.nrrd``) on the volume's exact grid.

    Args:
        segments: per segment ``(name, mask_zyx, color_rgb)`` or ``(name, mask_zyx, color_rgb, tags)``:
            ``mask_zyx`` a bool array of shape ``volume.shape`` = ``(nz, ny, nx)`` (non-zero =
            inside), ``color_rgb`` three floats in 0..1, ``tags`` Slicer segment tags (see the module
            doc for what they may hold). Segment IDs are ``Segment_1``, ``Segment_2``, ... in this order.
        volume: the :class:`~MedSAMSlicerLib.fileio.volumes.Volume` the segments belong to (its
            ``orientation``, ``image`` and ``path`` are used).
        path: destination, normally ending in ``.seg.nrrd`` (``.nrrd`` is accepted too).
        overwrite: replace an existing file; when false, an existing file (even one that appears
            while this is written) is left as it is and :class:`MedSAMError` is raised.

    The file is what Slicer writes: one shared 3D labelmap when no two segments overlap; when they
    do, a 4D NRRD with as few layers as possible (each segment goes to the first layer it does not
    overlap), so no segment loses voxels. Segments keep their order; label values count from 1
    within each layer.

    Returns:
        The written path.

    Raises:
        MedSAMError: a mask of the wrong shape, a bad colour, name or tag, a wrong extension or an
            unwritable destination. Nothing is left behind on failure.
    """
    p = check_output(path, overwrite, inputs=[volume.path] if volume.path is not None else [],
                     formats=SEG_NRRD_EXTENSIONS)
    orientation = volume.orientation
    checked: List[Tuple[str, np.ndarray, Color, Dict[str, str]]] = []
    for n, segment in enumerate(segments):
        try:
            name, mask, color, *rest = segment
        except (TypeError, ValueError) as exc:
            raise MedSAMError(f"Segment {n} must be (name, mask, colour) or (name, mask, colour, tags).") from exc
        if len(rest) > 1:
            raise MedSAMError(f"Segment {n} must be (name, mask, colour) or (name, mask, colour, tags).")
        name = segment_name(str(name), f"Segment {n}")
        mask_zyx = orientation.check_canonical(mask, f"mask of segment '{name}'").astype(bool, copy=False)
        tags = check_tags(rest[0] if rest else {}, name)
        checked.append((name, orientation.from_canonical(mask_zyx), check_color(color, name), tags))

    layers: List[np.ndarray] = []
    layer_counts: List[int] = []
    entries: List[SegmentEntry] = []
    for n, (name, mask_kji, color, tags) in enumerate(checked):
        for index, layer in enumerate(layers):
            if layer_counts[index] < 255 and not np.any(layer[mask_kji]):
                break
        else:
            layers.append(np.zeros(orientation.shape_kji, dtype=np.uint8))
            layer_counts.append(0)
            index = len(layers) - 1
        layer_counts[index] += 1
        label = layer_counts[index]
        layers[index][mask_kji] = label
        entries.append(SegmentEntry(f"Segment_{n + 1}", name, color, index, label, extent_kji(mask_kji), tags))
    if not layers:
        layers.append(np.zeros(orientation.shape_kji, dtype=np.uint8))
    atomic_write(p, lambda tmp: _write_file(tmp, layers, entries, volume.image), overwrite)
    return p


def write_label_values(labels_kji: np.ndarray, image: sitk.Image, path: Path, overwrite: bool = True) -> Path:
    """A uint8 labelmap ``(k, j, i)`` on ``image``'s grid as a ``.seg.nrrd`` with one segment per
    non-zero label, named ``Segment_<label>`` and keeping the label values (``path`` already checked)."""
    values = [int(v) for v in np.unique(labels_kji) if v != 0]
    entries = [SegmentEntry(f"Segment_{n + 1}", f"Segment_{v}", DEFAULT_COLORS[n % len(DEFAULT_COLORS)], 0, v,
                            extent_kji(labels_kji == v)) for n, v in enumerate(values)]
    atomic_write(path, lambda tmp: _write_file(tmp, [labels_kji], entries, image), overwrite)
    return path


def read_seg_nrrd(path: PathLike) -> SegmentationFile:
    """Read a ``.seg.nrrd`` (ours or Slicer's): its grid, layers and segments with their tags.

    The file is checked first as every image file is (:func:`~MedSAMSlicerLib.fileio.integrity.check_image_file`:
    a regular file whose voxel bytes are all there and whose compressed data pass their checksum).

    Raises:
        MedSAMError: the file is missing, not a regular file, truncated or damaged, unreadable,
            not 3D, or has no segments.
    """
    from .integrity import check_image_file
    from .itk_io import quiet_itk, sitk_reason

    p = check_image_file(path, "segmentation")
    try:
        with quiet_itk() as native:
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise MedSAMError(f"cannot read the segmentation '{p}': {sitk_reason(exc, native)}") from None
    if image.GetDimension() != 3:
        raise MedSAMError(f"'{p}' is not a 3D segmentation (it has {image.GetDimension()} dimensions)")

    def meta(key: str, default: str = "") -> str:
        return image.GetMetaData(key) if image.HasMetaDataKey(key) else default

    segments: List[SegmentEntry] = []
    n = 0
    while image.HasMetaDataKey(f"Segment{n}_ID"):
        try:
            color = tuple(float(v) for v in meta(f"Segment{n}_Color", "0.5 0.5 0.5").split())
            extent = tuple(int(v) for v in meta(f"Segment{n}_Extent", "0 -1 0 -1 0 -1").split())
            segments.append(SegmentEntry(
                id=meta(f"Segment{n}_ID"), name=meta(f"Segment{n}_Name", f"segment_{n}"),
                color=(color + (0.5, 0.5, 0.5))[:3],  # type: ignore[arg-type]
                layer=int(meta(f"Segment{n}_Layer", "0")), label=int(meta(f"Segment{n}_LabelValue", "1")),
                extent=(extent + (0, -1, 0, -1, 0, -1))[:6],  # type: ignore[arg-type]
                tags=parse_tags(meta(f"Segment{n}_Tags")),
            ))
        except ValueError:
            raise MedSAMError(f"'{p}': the header of segment {n} is damaged (a colour, extent, layer or label "
                              "value that is not a number)") from None
        n += 1
    if not segments:
        raise MedSAMError(f"'{p}' has no segments (no Segment0_ID in its header): is it a Slicer segmentation?")
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, layer])
    stacked = array[..., None] if array.ndim == 3 else array
    layers = [np.ascontiguousarray(stacked[..., i]) for i in range(stacked.shape[-1])]
    for segment in segments:
        if not 0 <= segment.layer < len(layers):
            raise MedSAMError(f"'{p}': segment '{segment.name}' is on layer {segment.layer}, but the file has "
                              f"{len(layers)} layer(s)")
    return SegmentationFile(p, image, layers, segments)


def _num(v: float) -> str:
    value = float(v)
    if value == 0.0:
        return "0"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


_CONVERSION_PARAMETERS = (
    ("Collapse labelmaps", "1", "Merge the labelmaps into as few shared labelmaps as possible 1 = created "
     "labelmaps will be shared if possible without overwriting each other."),
    ("Compute surface normals", "1", "Compute surface normals. 1 (default) = surface normals are computed. "
     "0 = surface normals are not computed (slightly faster but produces less smooth surface display)."),
    ("Crop to reference image geometry", "0", "Crop the model to the extent of reference geometry. 0 (default) "
     "= created labelmap will contain the entire model. 1 = created labelmap extent will be within reference "
     "image extent."),
    ("Decimation factor", "0.0", "Desired reduction in the total number of polygons. Range: 0.0 (no "
     "decimation) to 1.0 (as much simplification as possible)."),
    ("Default slice thickness", "0.0", "Default thickness for contours if slice spacing cannot be calculated."),
    ("End capping", "1", "Create end cap to close surface inside contours on the top and bottom of the structure."),
    ("Fractional labelmap oversampling factor", "1", "Determines the oversampling of the reference image "
     "geometry. All segments are oversampled with the same value (value of 1 means no oversampling)."),
    ("Joint smoothing", "0", "Perform joint smoothing."),
    ("Oversampling factor", "1", "Determines the oversampling of the reference image geometry. If it's a "
     "number, then all segments are oversampled with the same value (value of 1 means no oversampling)."),
    ("Smoothing factor", "0.5", "Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing)."),
    ("Threshold fraction", "0.5", "Determines the threshold that the closed surface is created at as a "
     "fractional value between 0 and 1."),
)


def _write_file(path: Path, layers_kji: List[np.ndarray], entries: List[SegmentEntry], image: sitk.Image) -> None:
    """Write a Slicer ``.seg.nrrd``: a gzip NRRD in LPS with the segmentation header keys."""
    ni, nj, nk = image.GetSize()
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    columns = direction * spacing  # column a = index axis a scaled by its spacing, in LPS
    origin = np.asarray(image.GetOrigin(), dtype=float)
    vectors = " ".join("(" + ",".join(_num(v) for v in columns[:, a]) + ")" for a in range(3))

    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_RAS_SIGN[:, None] * columns
    ijk_to_ras[:3, 3] = LPS_RAS_SIGN * origin
    geometry = "".join(f"{_num(v)};" for v in ijk_to_ras.reshape(-1))
    geometry += "".join(f"{v};" for v in (0, ni - 1, 0, nj - 1, 0, nk - 1))
    parameters = list(_CONVERSION_PARAMETERS)
    parameters.insert(9, ("Reference image geometry", geometry, "Image geometry description string determining "
                          "the geometry of the labelmap that is created in course of conversion."))

    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", "type: unsigned char"]
    if len(layers_kji) == 1:
        data = np.ascontiguousarray(layers_kji[0], dtype=np.uint8)
        lines += ["dimension: 3", "space: left-posterior-superior", f"sizes: {ni} {nj} {nk}",
                  f"space directions: {vectors}", "kinds: domain domain domain"]
    else:
        data = np.ascontiguousarray(np.stack(layers_kji, axis=-1), dtype=np.uint8)  # (k, j, i, layer)
        lines += ["dimension: 4", "space: left-posterior-superior", f"sizes: {len(layers_kji)} {ni} {nj} {nk}",
                  f"space directions: none {vectors}", "kinds: list domain domain domain"]
    lines += ["encoding: gzip", "space origin: (" + ",".join(_num(v) for v in origin) + ")"]
    for n, entry in enumerate(entries):
        lines += [
            f"Segment{n}_Color:=" + " ".join(_num(round(v, 6)) for v in entry.color),
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_Extent:=" + " ".join(str(v) for v in entry.extent),
            f"Segment{n}_ID:={nrrd_value(entry.id)}",
            f"Segment{n}_LabelValue:={entry.label}",
            f"Segment{n}_Layer:={entry.layer}",
            f"Segment{n}_Name:={nrrd_value(entry.name)}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Tags:={nrrd_value(format_tags(entry.tags))}",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_ConversionParameters:=" + "".join(f"{a}|{b}|{c}&" for a, b, c in parameters),
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(gzip.compress(data.tobytes(), compresslevel=6, mtime=0))
