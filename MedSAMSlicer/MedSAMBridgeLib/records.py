"""How a segment was made, kept in its Slicer segment tags (``MedSAM.*``), so that a saved
``.seg.nrrd`` says it and ``medsam-slicer segment --replay`` can re-run it.

The record itself is the engine's (:class:`MedSAMSlicerLib.segmentation.provenance.Provenance`, one builder for
every front end); this module reads and writes it on ``vtkSegment`` tags. A result applied on top
of a segment that already has a record (combining by slices or adding) is a correction of that
segment: it is appended to the record's corrections, not written over it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import vtk

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.segmentation.provenance import TAG_NAMES, Provenance


def segment_tags(segment) -> Dict[str, str]:
    """The ``MedSAM.*`` tags of a ``vtkSegment``."""
    tags = {}
    for name in TAG_NAMES:
        value = vtk.mutable("")
        if segment.GetTag(name, value):
            tags[name] = str(value)
    return tags


def segment_record(segment) -> Optional[Provenance]:
    """The record of a ``vtkSegment``, or ``None`` when it has none (or a damaged one)."""
    tags = segment_tags(segment)
    if not tags:
        return None
    try:
        return Provenance.from_tags(tags, f"segment '{segment.GetName()}'")
    except MedSAMError:
        return None


def write_record(segmentation_node, segment_id: str, record: Provenance, combine: str) -> Provenance:
    """Keep ``record`` (how the result just applied was made) in the segment's tags.

    ``combine == "replace"``, or a segment without a record: the segment's record becomes
    ``record`` (its job names the segment). Otherwise the new prompt is appended to the existing
    record's corrections (``{"kind": "box", "ras": ..., "combine": ...}``). Returns what was written.
    """
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise MedSAMError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
    previous = segment_record(segment) if combine != "replace" else None
    if previous is None:
        # A job of one names its segment; a queued job names all its segments (given by id).
        segmentation = segmentation_node.GetSegmentation()
        structures = [segmentation.GetSegment(s).GetName() if segmentation.GetSegment(s) is not None else s
                      for s in record.job.get("structures") or [segment_id]]
        written = dataclasses.replace(record, job={**record.job, "structures": structures})
    else:
        written = previous.with_corrections(
            [{**prompt, "combine": combine, "mode": record.mode} for prompt in record.prompts])
    for name in TAG_NAMES:
        segment.RemoveTag(name)
    for name, value in written.tags().items():
        segment.SetTag(name, value)
    return written
