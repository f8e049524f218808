"""Where the shipped example data lives (real CT/MR from TotalSegmentator's tests, Apache-2.0).

See ``Testing/Data/README.md`` for the files, their attribution and the label ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import MedSAMError

PathLike = Union[str, "os.PathLike[str]"]

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


#: Environment variable naming the example data folder (``make demo`` and the tests set it).
DATA_ENV = "MEDSAM_SLICER_DATA"


def data_dir(folder: Optional[PathLike] = None) -> Path:
    """The folder with the example volumes: ``folder``, else ``$MEDSAM_SLICER_DATA``.

    The data is not part of the installed package; a clone of the repository has it in
    ``Testing/Data/totalsegmentator`` (what ``make demo`` and the test suite pass).

    Raises:
        MedSAMError: no folder given, or it has no ``example_ct.nii.gz``.
    """
    chosen = folder if folder is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise MedSAMError(
            f"no example data folder: pass --data FOLDER or set {DATA_ENV} (in a clone of the repository: "
            "Testing/Data/totalsegmentator, which 'make demo' uses)"
        )
    path = Path(chosen).expanduser()
    if not (path / "example_ct.nii.gz").is_file():
        raise MedSAMError(f"the example data folder '{path}' has no example_ct.nii.gz")
    return path


def example_ct(folder: Optional[PathLike] = None) -> Path:
    """The 122x101x112 abdominal CT (3 mm)."""
    return data_dir(folder) / "example_ct.nii.gz"


def example_ct_labels(folder: Optional[PathLike] = None) -> Path:
    """TotalSegmentator's labels for :func:`example_ct`."""
    return data_dir(folder) / "example_seg_fast_force_split.nii.gz"


def evaluation_set(folder: Optional[PathLike] = None) -> Path:
    """The evaluation set built from the example data (``evaluation_set.toml`` beside its folder)."""
    path = data_dir(folder).parent / "evaluation_set.toml"
    if not path.is_file():
        raise MedSAMError(f"the evaluation set was not found at '{path}'; give a set file or --image/--labels")
    return path
