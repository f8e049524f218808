"""Speed settings: what a user may trade for speed, chosen from measured alternatives.

A :class:`SpeedTier` is a recipe: which runtime computes the image encoder on a CPU
(:mod:`.encoder_runtimes`), at which precision, and whether 3D propagation computes every slice
or every ``stride``-th slice and fills the others (:mod:`.strided`). The named tiers users choose
from are :data:`SPEED_TIERS`; each one's speed and its measured agreement with the exact tier are
in its ``note`` (the numbers come from ``medsam-slicer bench --compare alternatives``,
docs/performance.md, "Speed settings"). ``Segmenter(speed=...)`` and ``medsam-slicer segment --speed`` take a name.

The encoder runtime and precision apply on the CPU only: on a GPU the encoder is torch's there
(already batched and in bfloat16) and a tier changes only the stride.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from ..errors import MedSAMError

ENCODERS = ("torch", "openvino", "onnxruntime")
#: How the slices between computed ones are filled (:mod:`.strided`).
FILLS = ("interpolate", "decode")
#: Encoder runtime -> (the Python modules it needs, the pip command that installs them).
RUNTIMES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "openvino": (("openvino",), "pip install openvino"),
    "onnxruntime": (("onnxruntime", "onnx"), "pip install onnxruntime onnx"),
}


def _importable(module: str) -> bool:
    # A None entry in sys.modules is Python's way of blocking an import: count it as absent.
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_missing(runtime: str) -> Optional[str]:
    """``None`` when encoder ``runtime`` can be used here, else a one-line reason with the install command."""
    if runtime not in RUNTIMES:
        raise MedSAMError(f"unknown encoder runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}")
    modules, command = RUNTIMES[runtime]
    absent = [m for m in modules if not _importable(m)]
    if absent:
        return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed ({command})"
    return None


@dataclass(frozen=True)
class SpeedTier:
    """One speed recipe.

    Attributes:
        name: the value front ends pass (``"exact"``, ``"fast"``, ``"fastest"``).
        label: what a user interface shows for it.
        encoder: the CPU encoder runtime, ``"torch"``, ``"openvino"`` or ``"onnxruntime"``.
        precision: ``"f32"``, or ``"bf16"`` (OpenVINO: bfloat16 inference where the CPU has it;
            torch: the transformer stages' matrix products in bfloat16, see ``optimize.py``).
        stride: 3D propagation runs the model on every ``stride``-th slice (1: every slice).
        fill: how the slices between are filled, ``"interpolate"`` or ``"decode"`` (:mod:`.strided`).
        note: the measured cost in accuracy and the gain in speed, for the user.
    """

    name: str
    label: str
    encoder: str = "torch"
    precision: str = "f32"
    stride: int = 1
    fill: str = "interpolate"
    note: str = ""

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise MedSAMError(f"unknown encoder runtime '{self.encoder}'; choose one of: {', '.join(ENCODERS)}")
        if self.precision not in ("f32", "bf16"):
            raise MedSAMError(f"unknown precision '{self.precision}'; choose f32 or bf16")
        if self.encoder == "onnxruntime" and self.precision != "f32":
            raise MedSAMError("ONNX Runtime is used in float32 only")
        if int(self.stride) != self.stride or self.stride < 1:
            raise MedSAMError(f"the stride must be a whole number >= 1; got {self.stride}")
        if self.fill not in FILLS:
            raise MedSAMError(f"unknown fill '{self.fill}'; choose one of: {', '.join(FILLS)}")

    def missing(self) -> Optional[str]:
        """``None`` when this tier's packages are installed, else what to install (one line)."""
        return None if self.encoder == "torch" else runtime_missing(self.encoder)

    def unsupported(self) -> Optional[str]:
        """``None`` when this CPU can run the tier as written, else why not (one line): its bfloat16
        needs native bfloat16 (:mod:`.cpu_features`, probed once; imports torch only for such a tier).
        A :class:`~MedSAMSlicerLib.segmenter.Segmenter` given such a tier runs it in float32 with a note."""
        if self.precision != "bf16" or self.missing():
            return None
        from . import cpu_features

        if self.encoder == "torch":
            return cpu_features.bfloat16_matmuls_missing()
        return cpu_features.openvino_bfloat16_missing()

    def describe(self) -> str:
        """E.g. ``"fast (OpenVINO f32 encoder, every slice)"``."""
        runtime = {"torch": "torch", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}[self.encoder]
        slices = ("every slice" if self.stride == 1
                  else f"every {self.stride}{_ordinal(self.stride)} slice, the others {self.fill}d")
        return f"{self.name} ({runtime} {self.precision} encoder, {slices})"


def _ordinal(n: int) -> str:
    return {2: "nd", 3: "rd"}.get(n, "th")


#: The tiers users choose from, in order of speed. The measurements behind each ``note`` are in
#: docs/performance.md ("Speed settings") and ``docs/perf/``.
SPEED_TIERS: Dict[str, SpeedTier] = {
    tier.name: tier
    for tier in (
        SpeedTier("exact", "Exact", note="the model on every slice in float32 (torch): the reference masks"),
        SpeedTier("fast", "Fast (OpenVINO)", encoder="openvino",
                  note="OpenVINO computes the encoder: the same masks as exact (3D Dice 1.0000 on the liver, "
                       "a kidney and the aorta), 1.3-1.5x faster in 3D on a CPU; needs OpenVINO"),
        SpeedTier("fastest", "Fastest (OpenVINO, every 2nd slice)", encoder="openvino", stride=2, fill="interpolate",
                  note="OpenVINO, and in 3D only every 2nd slice computed, the others interpolated: about 2x "
                       "faster than exact in 3D; masks differ from exact (3D Dice 0.88-0.96), Dice against "
                       "reference labels up to 0.007 lower (liver; kidney and aorta 0.004-0.007 higher); "
                       "needs OpenVINO"),
    )
}
DEFAULT_SPEED = "exact"


def get_speed(speed: Union[str, SpeedTier, None]) -> SpeedTier:
    """The :class:`SpeedTier` for a name (or the tier itself); unknown names raise :class:`MedSAMError`."""
    if speed is None:
        return SPEED_TIERS[DEFAULT_SPEED]
    if isinstance(speed, SpeedTier):
        return speed
    tier = SPEED_TIERS.get(str(speed).strip().lower())
    if tier is None:
        raise MedSAMError(f"unknown speed '{speed}'; choose one of: {', '.join(SPEED_TIERS)}")
    return tier


def speed_choices() -> List[Tuple[str, str, str, Optional[str]]]:
    """``(name, label, note, missing)`` per tier, for a user interface: ``missing`` is ``None`` when
    the tier can run here, else why not: what to install (:meth:`SpeedTier.missing`) or what this
    CPU lacks (:meth:`SpeedTier.unsupported`)."""
    return [(t.name, t.label, t.note, t.missing() or t.unsupported()) for t in SPEED_TIERS.values()]
