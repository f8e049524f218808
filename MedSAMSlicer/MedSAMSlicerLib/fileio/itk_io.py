"""SimpleITK plumbing shared by the readers: its errors in the user's words, the C++ warnings it
prints caught, and the one rule for which image layouts MedSAM takes (3D, one channel)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator, List, Optional, Sequence

import SimpleITK as sitk

from ..errors import MedSAMError

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_INPUTS = (
    "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
    "or a folder holding one DICOM series"
)


def check_layout(dimension: int, size: Sequence[int], components: int, pixel_type: str, source: str) -> None:
    """Refuse anything but a 3D single-component image (a 4D image with one frame is allowed)."""
    size = list(size)
    dims = "x".join(str(n) for n in size)
    if components != 1:
        raise MedSAMError(
            f"{source} has {components} components per voxel ({pixel_type}, size {dims}), e.g. colour "
            "(RGB) or a vector field; MedSAM needs a single-channel (scalar) volume. Extract one channel "
            "first, e.g. with SimpleITK `sitk.VectorIndexSelectionCast(image, 0)` or Slicer's "
            "'Vector to Scalar Volume' module, and save it as a new file."
        )
    if dimension == 2:
        raise MedSAMError(
            f"MedSAM needs a 3D volume; got a 2D image of size {dims} from {source}. Give the 3D volume "
            "(for DICOM, the folder holding all slices of the series)."
        )
    if dimension == 4:
        if size[3] == 1:
            return
        raise MedSAMError(
            f"{source} is a 4D image ({'x'.join(str(n) for n in size[:3])} voxels with {size[3]} frames or "
            "time points); MedSAM needs one 3D volume. Extract one frame first, e.g. with SimpleITK "
            f"`sitk.Extract(image, [{size[0]}, {size[1]}, {size[2]}, 0], [0, 0, 0, frame])` or Slicer's "
            "Sequences module, and save it as a new file."
        )
    if dimension != 3:
        raise MedSAMError(f"MedSAM needs a 3D volume; {source} is a {dimension}D image of size {dims}.")


_ITK_NOISE = re.compile(r"^(Exception thrown in SimpleITK \S+:)?\s*\S+\.(h|hxx|cxx|cpp|txx):\d+:?$")
_ITK_PREFIX = re.compile(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?(ERROR:\s*)?")


def sitk_reason(exc: BaseException, native: Sequence[str] = ()) -> str:
    """What a SimpleITK exception (and what ITK printed meanwhile, ``native``) says, in plain words.

    Source-file lines (``itkImageBase.hxx:145:``), object addresses and library prefixes are
    dropped; reasons we know are put in the user's terms.
    """
    lines = [line.strip() for line in [*str(exc).splitlines(), *native] if line.strip()]
    text = " ".join(lines)
    ideal = re.search(r"ideal = (\d+) : actual = (\d+)", text)
    if ideal:
        return (f"the file holds {int(ideal.group(2)):,} of the {int(ideal.group(1)):,} bytes of voxel data its "
                "header promises: it is truncated")
    if "fread got only" in text or "expected" in text and "bytes but received" in text:
        return "the file holds fewer voxel bytes than its header promises: it is truncated"
    if "Unable to determine ImageIO reader" in text or "Could not create IO object" in text:
        return "it is not in a format SimpleITK can read"
    if "nifti library failed to write" in text or "cannot open output file" in text:
        return "the file could not be created there"
    useful = []
    for line in lines:
        if _ITK_NOISE.match(line) or line.startswith(("WARNING: In ", "MetaImage: ")):
            continue
        line = _ITK_PREFIX.sub("", line).strip()
        if line.startswith("Exception thrown in SimpleITK"):
            line = line.split(":", 1)[1].strip() if ":" in line else ""
        if line and not line.startswith("Reason: No such file or directory"):
            useful.append(line)
    return useful[0] if useful else type(exc).__name__


@contextlib.contextmanager
def quiet_itk() -> Iterator[List[str]]:
    """Silence ITK for a moment and collect what its C++ code prints on stderr.

    ITK's warnings (GDCM's 'No Series were found', MetaIO's 'data not read completely', niftilib's
    '** ERROR') are written straight to the process's stderr, past Python; they are collected in
    the yielded list (to explain a failure in plain words) instead of reaching the user.
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    captured: List[str] = []
    saved: Optional[int] = None
    sink = None
    try:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        try:
            sink = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
        except OSError:  # no file descriptor 2 (some embedded interpreters): leave stderr alone
            saved = None
        yield captured
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.seek(0)
                captured.extend(sink.read().decode("utf-8", "replace").splitlines())
            sink.close()
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
