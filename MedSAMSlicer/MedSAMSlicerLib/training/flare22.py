"""FLARE22 label ids, names, and the map from TotalSegmentator's ids to them.

FLARE22 (MICCAI 2022 abdominal organ challenge) labels 13 organs. The training tests build a
FLARE22-layout dataset from the TotalSegmentator example CT shipped in ``Testing/Data`` by
remapping its ``total`` label ids with :data:`TOTALSEG_TO_FLARE22`.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

#: FLARE22 label id -> structure name.
FLARE22_LABELS: Dict[int, str] = {
    1: "liver",
    2: "kidney_right",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "adrenal_gland_right",
    8: "adrenal_gland_left",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "kidney_left",
}

#: TotalSegmentator ``total`` label id -> FLARE22 label id (every other id maps to background 0).
TOTALSEG_TO_FLARE22: Dict[int, int] = {
    5: 1,  # liver
    2: 2,  # kidney_right
    1: 3,  # spleen
    7: 4,  # pancreas
    52: 5,  # aorta
    63: 6,  # inferior_vena_cava
    8: 7,  # adrenal_gland_right
    9: 8,  # adrenal_gland_left
    4: 9,  # gallbladder
    15: 10,  # esophagus
    6: 11,  # stomach
    19: 12,  # duodenum
    3: 13,  # kidney_left
}

#: FLARE22's NSD tolerances in mm per label id (from the challenge's evaluation code).
FLARE22_NSD_TOLERANCE_MM: Dict[int, float] = {
    1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3,
}


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel an integer label array; ids missing from ``mapping`` become 0.

    Args:
        labels: integer array of any shape (e.g. ``(z, y, x)``), non-negative ids.
        mapping: old id -> new id (new ids must fit in ``uint8``).

    Returns:
        ``uint8`` array of the same shape.
    """
    arr = np.asarray(labels)
    top = int(max(int(arr.max()) if arr.size else 0, max(mapping, default=0)))
    lut = np.zeros(top + 1, dtype=np.uint8)
    for old, new in mapping.items():
        lut[int(old)] = int(new)
    return lut[arr.astype(np.int64)]


def label_name(label: int) -> str:
    """FLARE22 name of ``label`` (``"label_<id>"`` for ids outside FLARE22)."""
    return FLARE22_LABELS.get(int(label), f"label_{int(label)}")
