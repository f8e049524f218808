"""DICOM series: choosing the series in a folder, reading it, and refusing a series with a gap.

SimpleITK (GDCM) drops unreadable slices without a word and puts a series on a uniform grid from
its first to its last slice, so a missing slice moves every slice after it; the spacing check here
compares the files' own positions (Image Position Patient along the slice normal).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import MedSAMError
from .itk_io import IMAGE_EXTENSIONS, SUPPORTED_INPUTS, check_layout, quiet_itk, sitk_reason
from .orientation import LPS_RAS_SIGN

_DICOM_TAG = re.compile(r"^[0-9a-fA-F]{4}\|[0-9a-fA-F]{4}$")


def is_dicom_file(reader: sitk.ImageFileReader) -> bool:
    """Whether a file whose information ``reader`` has read is a DICOM slice (DICOM tags in its metadata)."""
    return any(_DICOM_TAG.match(key) for key in reader.GetMetaDataKeys())


def read_series_of_file(p: Path, notes: List[str], allow_gaps: bool = False) -> Optional[sitk.Image]:
    """The whole series a single DICOM slice ``p`` belongs to (a note says so), or ``None`` when
    the file is a series of its own."""
    everything = _dicom_series(p.parent)
    target = os.path.realpath(p)
    series = next((files for _, files in everything if any(os.path.realpath(f) == target for f in files)), None)
    if series is None or len(series) < 2:
        return None
    notes.append(
        f"'{p.name}' is one DICOM slice; read the whole series it belongs to "
        f"({len(series)} files in '{p.parent}')."
    )
    return _read_dicom_files(series, f"The DICOM series in '{p.parent}'", notes, allow_gaps,
                             _unreadable_dicom_files(p.parent, everything))




def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_series(folder: Path) -> List[Tuple[str, List[str]]]:
    """``(series id, files in GDCM's order)`` of every DICOM series in ``folder``, largest first."""
    with quiet_itk():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        series = [(sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]
    series.sort(key=lambda item: -len(item[1]))
    return series


def _unreadable_dicom_files(folder: Path, series: Sequence[Tuple[str, List[str]]]) -> List[Path]:
    """Files in ``folder`` that look like DICOM (the ``DICM`` marker) but belong to none of its
    ``series`` (truncated or damaged slices are dropped by GDCM without a word)."""
    listed = {os.path.realpath(f) for _, files in series for f in files}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_file() and e.name.upper() != "DICOMDIR"
            and os.path.realpath(e) not in listed and _looks_like_dicom(e)]


def read_dicom_folder(folder: Path, notes: List[str], allow_gaps: bool = False) -> sitk.Image:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise MedSAMError(f"Folder '{folder}' cannot be listed ({exc.strerror or exc}). Check its permissions.") from None
    if not entries:
        raise MedSAMError(
            f"Folder '{folder}' is empty. Point to a folder holding the DICOM files of one series, "
            "or to an image file (NIfTI, NRRD, MHA)."
        )
    series = _dicom_series(folder)
    if not series:
        hints = []
        images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if images:
            hints.append(f" It holds image files such as '{images[0]}': give that file's path instead.")
        if any(e.is_dir() for e in entries):
            hints.append(" Subfolders are not searched: point to the folder that holds the DICOM slices.")
        raise MedSAMError(
            f"Folder '{folder}' holds no DICOM series (none of its files could be read as DICOM)."
            + "".join(hints)
            + f" Give {SUPPORTED_INPUTS}."
        )
    chosen_id, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"'{sid}' ({len(f)} files)" for sid, f in series[1:])
        notes.append(
            f"Folder '{folder}' holds {len(series)} DICOM series; reading '{chosen_id}' ({len(files)} files), "
            f"the one with the most files. Others: {others}. To read another, put its files in a folder of "
            "their own."
        )
    return _read_dicom_files(files, f"The DICOM series in '{folder}'", notes, allow_gaps,
                             _unreadable_dicom_files(folder, series))


#: Slice spacings of a DICOM series may differ by this much (mm, or this fraction of the
#: spacing, whichever is larger) before the series counts as unevenly spaced.
DICOM_SPACING_TOLERANCE_MM = 0.05
DICOM_SPACING_TOLERANCE_FRACTION = 0.05


def _position_label(normal_lps: np.ndarray) -> Tuple[str, float]:
    """The RAS axis name closest to a slice normal (LPS) and the sign turning LPS into it."""
    axis = int(np.argmax(np.abs(normal_lps)))
    sign = float(np.sign(normal_lps[axis])) * float(LPS_RAS_SIGN[axis])
    return "RAS"[axis], sign


def _read_dicom_files(files: List[str], source: str, notes: Optional[List[str]] = None, allow_gaps: bool = False,
                      unreadable: Sequence[Path] = ()) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_itk() as native:
            image = reader.Execute()
    except RuntimeError as exc:
        raise MedSAMError(
            f"{source} could not be read ({sitk_reason(exc, native)}). Check that the files are complete; "
            "compressed DICOM needs a SimpleITK build with the matching codec."
        ) from None
    check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                  image.GetPixelIDTypeAsString(), source)
    if image.GetDimension() == 3 and len(files) > 1:
        _check_dicom_spacing(reader, image, files, source, notes if notes is not None else [], allow_gaps,
                             unreadable)
    return image


def _check_dicom_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, files: List[str], source: str,
                         notes: List[str], allow_gaps: bool, unreadable: Sequence[Path]) -> None:
    """Refuse (or, with ``allow_gaps``, note) missing slices and uneven slice spacing.

    SimpleITK places the slices of a series on a uniform grid spanning the first and last
    positions; with a slice missing, every slice after it is moved (a 2 mm series missing one
    slice is read as 2.111 mm throughout), and its warning about it is not shown.
    """
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")]
                              for n in range(len(files))])
    except (RuntimeError, ValueError):
        return  # no Image Position (Patient) in every file: SimpleITK's grid is all there is
    if positions.shape != (len(files), 3):
        return
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, names = along[order], [Path(files[n]).name for n in order]
    steps = np.diff(along)
    if steps.size == 0:
        return
    typical = float(np.median(steps))
    tolerance = max(DICOM_SPACING_TOLERANCE_MM, DICOM_SPACING_TOLERANCE_FRACTION * abs(typical))
    bad = np.flatnonzero(np.abs(steps - typical) > tolerance)
    if bad.size == 0:
        if unreadable:
            notes.append(
                f"{source}: {len(unreadable)} file(s) look like DICOM but could not be read and were left out "
                f"({', '.join(repr(u.name) for u in unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}); the "
                "series itself has no gap."
            )
        return
    axis, sign = _position_label(normal)
    problems = []
    for n in bad[:3]:
        a, b, step = names[n], names[n + 1], float(steps[n])
        where = f"between '{a}' ({axis} {sign * along[n]:.1f} mm) and '{b}' ({axis} {sign * along[n + 1]:.1f} mm)"
        if abs(typical) > 1e-6 and step > 1.5 * typical:
            missing = int(round(step / typical)) - 1
            problems.append(f"{missing} slice(s) missing {where}: {step:.2f} mm apart")
        elif abs(step) <= tolerance:
            problems.append(f"two slices at the same position {where}")
        else:
            problems.append(f"uneven spacing {where}: {step:.2f} mm apart")
    more = f" (and {bad.size - 3} more)" if bad.size > 3 else ""
    culprits = ""
    if unreadable:
        culprits = (f" These files look like DICOM but could not be read: "
                    f"{', '.join(repr(u.name) for u in unreadable[:5])}{', ...' if len(unreadable) > 5 else ''}.")
    spacing = float(image.GetSpacing()[2])
    uniform = along[0] + spacing * np.arange(along.size)
    moved = float(np.max(np.abs(uniform - along)))
    if not allow_gaps:
        raise MedSAMError(
            f"{source} is incomplete or unevenly spaced: {'; '.join(problems)}{more}, where the other slices are "
            f"{typical:.2f} mm apart.{culprits} Read as one volume, slices would be moved by up to {moved:.1f} mm. "
            "Restore the missing files (re-export the series), or pass --allow-gaps to read it anyway."
        )
    notes.append(
        f"{source}: {'; '.join(problems)}{more}; read anyway (--allow-gaps) on a uniform grid of {spacing:.3f} mm, "
        f"so slices are up to {moved:.1f} mm from where the files put them.{culprits}"
    )
