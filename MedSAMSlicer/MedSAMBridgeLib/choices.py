"""The choices the MedSAM panels offer, as ``(value, label)`` pairs in menu order.

Plain data (the standard library, and the engine's torch-free ``boxes``): the module files read
these at Slicer's start-up, before torch or the engine's other dependencies may be installed. ``MRMLBridge`` checks values against them.
"""

import enum
from typing import List, Optional, Sequence, Tuple

from MedSAMSlicerLib.boxes import DIRECTIONS as ENGINE_DIRECTIONS  # numpy only: safe at start-up
from MedSAMSlicerLib.boxes import MODES as ENGINE_MODES
from MedSAMSlicerLib.models.speed import DEFAULT_SPEED, speed_choices  # standard library only


def choice_enum(name: str, choices: Sequence[Tuple[str, str]]) -> type:
    """An ``enum.Enum`` whose members are the choices' values (member name = value) and whose
    ``label()`` is the choice's label: what Slicer's parameter node wrapper shows in a combo box
    (``QComboBoxToEnumConnector``) and saves by member name (``EnumSerializer``)."""
    labels = dict(choices)

    class _Labelled:
        def label(self) -> str:
            return labels[self.value]

    return enum.Enum(name, [(value, value) for value, _ in choices], type=_Labelled)


#: The intensity windows a panel offers (value for :func:`window_for`, label), in menu order.
WINDOW_CHOICES = (
    ("auto", "Automatic (the view's if set, else CT abdomen / MR)"),
    ("display", "Display (exactly as shown in the view)"),
    ("abdomen", "CT abdomen (L40/W400)"),
    ("lung", "CT lung (L-160/W1500)"),
    ("bone", "CT bone (L400/W1000)"),
    ("brain", "CT brain (L40/W80)"),
    ("mr", "MR (0.5-99.5 percentiles)"),
)
#: Where a new result goes in the segment (value for ``combine``, label), in menu order.
COMBINE_CHOICES = (
    ("slices", "Replace on segmented slices"),
    ("add", "Add to segment"),
    ("replace", "Replace whole segment"),
)
#: 3D propagation directions from the box's slice (value, label), in the engine's order.
_DIRECTION_LABELS = {"both": "Up and down", "up": "Up (superior)", "down": "Down (inferior)"}
DIRECTION_CHOICES = tuple((value, _DIRECTION_LABELS[value]) for value in ENGINE_DIRECTIONS)
#: Where the model runs (value for the engine's ``device``, label), in menu order.
DEVICE_CHOICES = (
    ("auto", "Automatic (CUDA, then Apple MPS, then CPU)"),
    ("cpu", "CPU"),
    ("cuda", "CUDA (NVIDIA GPU)"),
    ("mps", "Apple MPS"),
)
_MODE_LABELS = {"3d": "3D (propagate)", "2d": "2D (this slice only)"}
MODE_CHOICES = tuple((value, _MODE_LABELS[value]) for value in ENGINE_MODES)
MODES = tuple(value for value, _ in MODE_CHOICES)
DIRECTIONS = tuple(value for value, _ in DIRECTION_CHOICES)
COMBINE_MODES = tuple(value for value, _ in COMBINE_CHOICES)


def speed_items() -> List[Tuple[str, str, str, Optional[str]]]:
    """The speed settings a panel offers, fastest last: ``(value, label, tooltip, missing)``;
    ``missing`` is ``None`` when the setting can run here, else why not and what to install.
    The tooltip states what the setting costs in accuracy (measured; docs/performance.md, "Speed settings")."""
    items = []
    for value, label, note, missing in speed_choices():
        if value == DEFAULT_SPEED:
            label += " (default)"
        items.append((value, label, note[:1].upper() + note[1:] + ".", missing))
    return items
