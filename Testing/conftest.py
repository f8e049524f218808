"""Shared pytest fixtures.

The vendored data (``Testing/Data/totalsegmentator/``, Apache-2.0, see ``Testing/Data/README.md``)
is exposed as session fixtures returning :class:`pathlib.Path` objects.  Keep this file small;
append fixtures that several test files need.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The MRML bridge (MedSAMBridgeLib) is not an installed package: Slicer puts the module folder on
# sys.path, and so does every test process, whichever test file runs first or alone.
_MODULE_DIR = str(Path(__file__).resolve().parent.parent / "MedSAMSlicer")
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

DATA_DIR = Path(__file__).resolve().parent / "Data" / "totalsegmentator"
# The engine does not know the repository's layout: the demo, the benchmark and `evaluate` (also
# as subprocesses) find the example data through this variable, as `make demo` passes it.
os.environ.setdefault("MEDSAM_SLICER_DATA", str(DATA_DIR))
#: The small CT and its labels ship with the module (its self-test uses them in Slicer).
MODULE_DATA_DIR = Path(__file__).resolve().parent.parent / "MedSAMSlicer" / "Resources" / "TestData"

#: TotalSegmentator ``total`` label ids used by the tests (see Testing/Data/README.md).
TOTALSEG_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                   "pancreas": 7, "aorta": 52, "inferior_vena_cava": 63}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the vendored TotalSegmentator reference files."""
    return DATA_DIR


@pytest.fixture(scope="session")
def ct_path() -> Path:
    """Abdominal CT, 122x101x112 voxels, 3 mm, direction diag(-1, -1, 1) in LPS."""
    return DATA_DIR / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def ct_seg_path() -> Path:
    """TotalSegmentator labels on the grid of ``ct_path`` (uint8)."""
    return DATA_DIR / "example_seg_fast_force_split.nii.gz"


@pytest.fixture(scope="session")
def ct(ct_path):
    """The shipped CT as the engine reads it (a ``volumes.Volume``), read once."""
    from MedSAMSlicerLib.fileio.volumes import read_volume

    return read_volume(ct_path)


@pytest.fixture(scope="session")
def labels(ct_seg_path):
    """The shipped CT's reference labels, canonical ``(z, y, x)``."""
    from MedSAMSlicerLib.fileio.volumes import read_volume

    return read_volume(ct_seg_path, labels=True).array


@pytest.fixture(scope="session")
def ct_sm_path() -> Path:
    """30-slice crop of the CT (122x101x30)."""
    return MODULE_DATA_DIR / "example_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def ct_sm_seg_path() -> Path:
    """Labels on the grid of ``ct_sm_path``."""
    return MODULE_DATA_DIR / "example_seg.nii.gz"


@pytest.fixture(scope="session")
def mr_path() -> Path:
    """Abdominal MR, 117x91x20."""
    return DATA_DIR / "example_mr_sm.nii.gz"


@pytest.fixture(scope="session")
def mr_seg_path() -> Path:
    """Labels on the grid of ``mr_path``."""
    return DATA_DIR / "example_seg_mr.nii.gz"


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """Folder with one CT series: 20 slices of 512x512 (JPEG2000)."""
    return DATA_DIR / "example_ct_dicom"


@pytest.fixture(scope="session")
def dicom_seg_path() -> Path:
    """Labels on the grid of the DICOM series (stored with the j axis flipped)."""
    return DATA_DIR / "example_seg_dicom.nii.gz"


@pytest.fixture(scope="session")
def lite_segmenter():
    """One LiteMedSAM Segmenter (real weights, CPU) for the whole run: the engine's
    ``shared_segmenter("litemedsam", None, "cpu")``, the one the bridge, the effect and the headless
    script use, so the engine's tests and theirs share the encoded slices (its embedding cache is
    keyed by volume content and window)."""
    from MedSAMSlicerLib.segmenter import shared_segmenter

    return shared_segmenter("litemedsam", None, "cpu")


@pytest.fixture(scope="session")
def kidney_box(ct_path, ct_seg_path):
    """A 3D box (input voxel indices i, j, k, inclusive) around 5 slices of the left kidney of
    ``ct_path``, centred on its largest slice."""
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_seg_path)))  # (k, j, i)
    ref = labels == TOTALSEG_LABELS["kidney_left"]
    k_mid = int(np.argmax(ref.sum(axis=(1, 2))))
    _, js, is_ = np.nonzero(ref[k_mid - 2 : k_mid + 3])
    return (int(is_.min()), int(js.min()), k_mid - 2, int(is_.max()), int(js.max()), k_mid + 2)
