"""One segment's boxes as the Segment Editor effect collects them (issue 23): several boxes drawn
for one segment make one structure; on one slice they are its pieces, on several slices its key
slices (:meth:`MRMLBridge.MedSAMBridge.boxes_request`).

Qt-free: the effect only draws what :class:`SegmentBoxes` says and hands its :meth:`request` to
the bridge. The rules, written once here:

* A drawn box is **added** to the list; with a box selected in the list and drawn on that box's
  slice it **replaces** it (that is how a box is moved or resized). The same box twice is refused.
* **One box** is today's one-box path exactly (:meth:`MedSAMBridge.request` with the effect's
  mode and direction); **several** go through :meth:`MedSAMBridge.boxes_request`, in 3D both ways
  (other settings are refused in one line, not changed silently).
* The list names each box by its slice as the viewer numbers it and its size in mm
  (``"box 2: k 16, 31 x 24 mm"``); a box is shown in a slice view showing its slice.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.errors import MedSAMError

from .reviewing import slice_name, slice_of_point
from .sources import SourceVolume


@dataclasses.dataclass(frozen=True)
class DrawnBox:
    """One box as drawn: its prompt (canonical voxels of ``source``) and the RAS corners the view
    showed (kept to draw it again), ``corners_ras`` a list of four ``(r, a, s)`` points."""

    prompt: BoxPrompt
    corners_ras: Sequence[Sequence[float]]


class SegmentBoxes:
    """The boxes drawn for one segment of one volume, in the order drawn."""

    def __init__(self) -> None:
        self.source: Optional[SourceVolume] = None
        self.boxes: List[DrawnBox] = []

    def __len__(self) -> int:
        return len(self.boxes)

    def draw(self, source: SourceVolume, box: DrawnBox, selected: Optional[int] = None) -> int:
        """Add ``box`` (or, with ``selected`` the index of a box on the same slice, replace that
        one). A box on another volume than the list's starts a new list. Returns the box's index.

        Raises:
            MedSAMError: the same box is already in the list.
        """
        if self.source is None or self.source.key != source.key:
            self.source, self.boxes = source, []
        replace = selected is not None and 0 <= selected < len(self.boxes) and \
            self.boxes[selected].prompt.z == box.prompt.z
        same = next((i for i, b in enumerate(self.boxes) if b.prompt == box.prompt and not (replace and i == selected)),
                    None)
        if same is not None:
            raise MedSAMError(f"This box is box {same + 1} already ({self.row(same)}).")
        if replace:
            self.boxes[selected] = box
            return selected
        self.boxes.append(box)
        return len(self.boxes) - 1

    def delete(self, index: int) -> None:
        """Remove box ``index`` (0-based); an index outside the list changes nothing."""
        if 0 <= index < len(self.boxes):
            del self.boxes[index]

    def clear(self) -> None:
        self.boxes = []

    def row(self, index: int) -> str:
        """How the list shows box ``index``: ``"box 2: k 16, 31 x 24 mm"`` (a 3D box adds its slices)."""
        prompt = self.boxes[index].prompt
        src = self.source
        x0, y0, x1, y1 = prompt.box
        spacing = [float(np.linalg.norm(src.ijk_to_ras[:3, src.orientation.axes[a]])) for a in (0, 1)]
        size = f"{(x1 - x0 + 1) * spacing[0]:.0f} x {(y1 - y0 + 1) * spacing[1]:.0f} mm"
        extent = ""
        if prompt.z_range is not None:
            extent = f" (3D, {slice_name(src, prompt.z_range[0])}..{slice_name(src, prompt.z_range[1]).split()[-1]})"
        return f"box {index + 1}: {slice_name(src, prompt.z)}, {size}{extent}"

    def rows(self) -> List[str]:
        """Every box's :meth:`row`, in the list's order."""
        return [self.row(i) for i in range(len(self.boxes))]

    def summary(self) -> str:
        """One line on what the boxes make: ``"3 boxes: 2 pieces on k 16, key slices k 16, k 20"``."""
        if not self.boxes:
            return "No box."
        slices = sorted({b.prompt.z for b in self.boxes})
        parts = []
        for z in slices:
            n = sum(b.prompt.z == z for b in self.boxes)
            if n > 1:
                parts.append(f"{n} pieces on {slice_name(self.source, z)}")
        if len(slices) > 1:
            parts.append("key slices " + ", ".join(slice_name(self.source, z) for z in slices))
        n = len(self.boxes)
        return f"{n} box{'es' if n > 1 else ''}" + (": " + "; ".join(parts) if parts else "") + "."

    def on_slice(self, point_ras: Sequence[float]) -> List[int]:
        """The boxes on the slice through a RAS point (a slice view's centre): those a view shows."""
        if self.source is None or not self.boxes:
            return []
        z = slice_of_point(self.source, point_ras)
        return [i for i, b in enumerate(self.boxes) if b.prompt.z == z]

    def request(self, bridge, volume_node, mode: str = "3d", direction: str = "both", window=None):
        """The bridge's request for these boxes (call on the scene's thread): one box is
        :meth:`MedSAMBridge.request` with ``mode`` and ``direction``; several are
        :meth:`MedSAMBridge.boxes_request` (one structure, 3D both ways).

        Raises:
            MedSAMError: no box; several boxes with 2D or one-way propagation; boxes that do not
                go together (the bridge's message).
        """
        if not self.boxes:
            raise MedSAMError("Draw a box in an axial view first.")
        if len(self.boxes) == 1:
            return bridge.request(volume_node, self.boxes[0].prompt, mode=mode, direction=direction, window=window)
        if mode != "3d" or direction != "both":
            raise MedSAMError(f"{len(self.boxes)} boxes make one structure followed in 3D, both ways: set Mode to 3D "
                              "and Propagate to both, or keep one box.")
        return bridge.boxes_request(volume_node, [b.prompt for b in self.boxes], window=window)
