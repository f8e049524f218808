"""The network architectures by name: plain data, importable without torch.

``modeling.build`` maps each name to its factory; the registry checks its entries against these
names without importing torch, so that listing models (a panel opening) stays cheap.
"""

from __future__ import annotations

from typing import Dict

#: architecture name -> the model users know it as (for messages).
ARCHITECTURE_TITLES: Dict[str, str] = {
    "vit_b": "MedSAM",
    "tiny_vit": "LiteMedSAM",
    "hiera_t512": "MedSAM2",
}
