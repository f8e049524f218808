"""Where the shipped example data lives (real CT/MR from TotalSegmentator's tests, Apache-2.0).

See ``Testing/Data/README.md`` for the files, their attribution and the label ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MedSAMError

# TotalSegmentator "total" label ids of the structures the demo segments.
DEMO_STRUCTURES = {
    "liver": 5,
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "aorta": 52,
}

# Colours (RGB 0-1) close to Slicer's GenericAnatomyColors for these organs.
STRUCTURE_COLORS = {
    "liver": (0.87, 0.51, 0.36),
    "spleen": (0.62, 0.42, 0.72),
    "kidney_right": (0.72, 0.40, 0.29),
    "kidney_left": (0.90, 0.75, 0.40),
    "aorta": (0.88, 0.20, 0.20),
}


def data_dir() -> Path:
    """The folder with the example volumes (``MEDSAM_SLICER_DATA`` overrides it)."""
    env = os.environ.get("MEDSAM_SLICER_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "Testing" / "Data" / "totalsegmentator")
    for candidate in candidates:
        if (candidate / "example_ct.nii.gz").is_file():
            return candidate
    raise MedSAMError(
        "the example data was not found: run from a clone of the repository (Testing/Data), "
        "or set MEDSAM_SLICER_DATA to a folder with example_ct.nii.gz"
    )


def example_ct() -> Path:
    """The 122x101x112 abdominal CT (3 mm)."""
    return data_dir() / "example_ct.nii.gz"


def example_ct_labels() -> Path:
    """TotalSegmentator's labels for :func:`example_ct`."""
    return data_dir() / "example_seg_fast_force_split.nii.gz"


def evaluation_set() -> Path:
    """The evaluation set built from the shipped data (``Testing/Data/evaluation_set.toml``)."""
    path = data_dir().parent / "evaluation_set.toml"
    if not path.is_file():
        raise MedSAMError(f"the shipped evaluation set was not found at '{path}': run from a clone of the repository")
    return path
