"""The MedSAM Training panel's plain-Python side: :mod:`.jobs` runs ``medsam-train`` in a background
process and reads its JSON progress lines (no Qt, no Slicer; tested with pytest)."""
