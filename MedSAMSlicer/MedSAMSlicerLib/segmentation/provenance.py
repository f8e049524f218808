"""How a segment was made: the record every front end writes into its ``.seg.nrrd`` segment tags,
and reads back to replay it (``medsam-slicer segment --replay``).

>>> record = Provenance.of(segmenter, prompts_ras=[corners], mode="3d", job=job, volume_sha=vk)
>>> tags = record.tags()          # {"MedSAM.Model": "litemedsam", ...}: one segment's tags
>>> Provenance.from_tags(tags)    # back, exactly

One function builds the record (:meth:`Provenance.of`); the command line calls it now, and the
headless script and the Slicer bridge are meant to call the same one. Each field is one Slicer
segment tag named ``MedSAM.<Field>`` (Slicer shows and keeps them: ``segment.GetTag``); values
that are lists or objects are compact JSON, with every ``|`` written as ``\\u007c`` (still valid JSON)
because Slicer's tag format ``key:value|`` has no escaping (:mod:`~MedSAMSlicerLib.fileio.segnrrd`).

Prompts are stored in RAS millimetres, as the positions of the voxel box's first and last voxel
centres (opposite corners of the box that was segmented; on an oblique volume they are not the
corners of an RAS-aligned box), so a replay on the same volume finds exactly the same voxels.

Fields:

* ``MedSAM.Prompts``: the prompts, each ``{"kind": "box", "ras": [[R, A, S], [R, A, S]]}``: one box,
  or every box of a structure made from several (its pieces on one slice, or its key slices:
  :meth:`~MedSAMSlicerLib.segmenter.Segmenter.segment_boxes`), in the order given.
* ``MedSAM.Corrections``: the corrections made after the first result, in order, each
  ``{"kind": ..., ...}`` (e.g. ``{"kind": "box", "ras": ...}``, ``{"kind": "accept", "slice_ras": S}``);
  a box correction with a box per piece of the structure on its slice keeps the first in ``ras``
  and the others in ``"more": [[[R, A, S], [R, A, S]], ...]`` (records without ``more`` read as
  before); empty until the correction tools fill it (:meth:`Provenance.with_corrections`).
* ``MedSAM.Mode`` (``3d`` / ``2d``), ``MedSAM.Direction`` (``both`` / ``up`` / ``down``).
* ``MedSAM.Model`` (registry name), ``MedSAM.WeightsSHA256`` (of the weights file used),
  ``MedSAM.Speed`` (speed setting), ``MedSAM.Precision`` (encoder precision).
* ``MedSAM.Window``: ``{"level": L, "width": W}`` or ``{"percentiles": [lo, hi]}``.
* ``MedSAM.Job``: ``{"id": ..., "structures": [names]}``: structures segmented together (their
  overlaps were settled between them, so a replay runs them together again).
* ``MedSAM.Volume``: a content hash of the volume's voxels (:func:`volume_sha256`).
* ``MedSAM.Version`` (ours), ``MedSAM.Date`` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import MedSAMError

#: Every tag of the record starts with this.
PREFIX = "MedSAM."
#: Our version (pyproject.toml reads it from here).
VERSION = "0.1.0"

#: Every tag a record may hold (what a reader of one segment's tags asks for).
TAG_NAMES = tuple(PREFIX + name for name in (
    "Prompts", "Corrections", "Mode", "Direction", "Model", "WeightsSHA256", "Speed", "Precision", "Window", "Job",
    "Volume", "Version", "Date",
))

RasCorners = Tuple[Tuple[float, float, float], Tuple[float, float, float]]

#: At most this many boxes in one segment's prompts, and in one correction (a record is read whole
#: before anything runs; the bound keeps a damaged or hostile file from asking for a huge job).
MAX_BOXES = 1000


def _dumps(value: Any) -> str:
    # '|' appears only inside JSON strings, where \u007c means the same character.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, sort_keys=True).replace("|", "\\u007c")


def volume_sha256(array: np.ndarray) -> str:
    """SHA-256 of a volume's voxels (shape, dtype, then the bytes in canonical ``(z, y, x)`` order)."""
    digest = hashlib.sha256()
    digest.update(str((tuple(array.shape), array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def prompt_ras(volume, prompt) -> List[List[float]]:
    """How a record stores a box: the RAS positions (mm) of its voxel box's first and last voxel
    centres. ``volume`` is anything with ``canonical_to_ras`` (a file's ``volumes.Volume``, the
    Slicer bridge's ``SourceVolume``); ``prompt`` a :class:`~MedSAMSlicerLib.boxes.BoxPrompt`."""
    x0, y0, z0, x1, y1, z1 = prompt.box3d
    corners = volume.canonical_to_ras(np.array([[x0, y0, z0], [x1, y1, z1]], dtype=float))
    return [[float(v) for v in c] for c in corners]


def window_record(window) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window` as JSON-ready data."""
    if window.percentiles is not None:
        return {"percentiles": [float(v) for v in window.percentiles]}
    return {"level": float(window.level), "width": float(window.width)}


@dataclass(frozen=True)
class Provenance:
    """How one segment was made (see the module doc for each field)."""

    prompts: List[Dict[str, Any]]
    mode: str
    direction: str
    model: str
    weights_sha256: str
    speed: str
    precision: str
    window: Dict[str, Any]
    job: Dict[str, Any]
    volume_sha256: str
    version: str = VERSION
    date: str = ""
    corrections: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        segmenter,
        prompts_ras: Sequence[RasCorners],
        mode: str,
        direction: str,
        job: Mapping[str, Any],
        volume_sha: str,
        corrections: Sequence[Mapping[str, Any]] = (),
    ) -> Provenance:
        """The record of a segment made by ``segmenter`` (a :class:`~MedSAMSlicerLib.segmenter.Segmenter`,
        or a :class:`~MedSAMSlicerLib.remote.client.RemoteSegmenter`, with its volume set: its model,
        weights' SHA-256, speed, precision and window are read from it).

        Args:
            prompts_ras: per prompt, its voxel box's first and last voxel centres in RAS mm.
            mode: ``"3d"`` or ``"2d"``.
            direction: ``"both"``, ``"up"`` or ``"down"``.
            job: ``{"id": ..., "structures": [...]}`` (:func:`new_job`).
            volume_sha: :func:`volume_sha256` of the raw volume.
            corrections: what the user corrected afterwards (see the module doc).
        """
        if segmenter.window is None:
            raise MedSAMError("the segmenter has no volume yet: nothing to record")
        return cls(
            prompts=[{"kind": "box", "ras": [[float(v) for v in c] for c in corners]} for corners in prompts_ras],
            mode=mode, direction=direction, model=segmenter.spec.name,
            weights_sha256=segmenter.weights_sha256, speed=segmenter.speed.name,
            precision=segmenter.precision, window=window_record(segmenter.window),
            job=dict(job), volume_sha256=volume_sha,
            date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            corrections=[dict(c) for c in corrections],
        )

    def with_corrections(self, corrections: Sequence[Mapping[str, Any]]) -> Provenance:
        """The same record with ``corrections`` appended (each ``{"kind": ..., ...}``)."""
        for c in corrections:
            if "kind" not in c:
                raise MedSAMError(f"a correction needs a 'kind'; got {dict(c)}")
        return replace(self, corrections=[*self.corrections, *(dict(c) for c in corrections)])

    def tags(self) -> Dict[str, str]:
        """The record as Slicer segment tags (``MedSAM.<Field>`` -> value)."""
        return {
            PREFIX + "Prompts": _dumps(self.prompts), PREFIX + "Corrections": _dumps(self.corrections),
            PREFIX + "Mode": self.mode, PREFIX + "Direction": self.direction, PREFIX + "Model": self.model,
            PREFIX + "WeightsSHA256": self.weights_sha256, PREFIX + "Speed": self.speed,
            PREFIX + "Precision": self.precision, PREFIX + "Window": _dumps(self.window),
            PREFIX + "Job": _dumps(self.job), PREFIX + "Volume": self.volume_sha256,
            PREFIX + "Version": self.version, PREFIX + "Date": self.date,
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], where: str = "the segment") -> Provenance:
        """Read a record back from segment tags, checked whole before anything uses it.

        The JSON fields are parsed by the one strict reader (:func:`~MedSAMSlicerLib.fileio.userfiles.parse_json`:
        no NaN, no numbers beyond a float, bounded nesting) and every field is checked against
        the record's schema (:func:`_record_schema`): prompts and corrections of a known kind with
        finite RAS numbers, a window with a finite level and a positive width (or percentiles
        ``0 <= low < high <= 100``), a job with an id and its structures' names, known mode,
        direction, speed and precision, SHA-256 digests of 64 hex digits.

        Raises:
            MedSAMError: the tags hold no record (``where`` names the segment), or a damaged one
                (naming the tag, the entry and the value).
        """
        from ..fileio.userfiles import SchemaError, parse_json

        if PREFIX + "Prompts" not in tags:
            raise MedSAMError(f"{where} has no record of how it was made (no {PREFIX}Prompts tag): only segments "
                              "written by medsam-slicer 0.1 or later can be replayed")
        what = f"the record of {where} is damaged"
        missing = [n for n in TAG_NAMES if n not in tags and n not in _OPTIONAL_TAGS]
        if missing:
            raise MedSAMError(f"{what}: it has no {missing[0]} tag")
        values: Dict[str, Any] = {}
        for name in TAG_NAMES:
            if name not in tags:
                continue
            text = tags[name]
            values[name] = parse_json(text, f"{what}: {name}") if name in _JSON_TAGS else text
        values.setdefault(PREFIX + "Corrections", [])
        schema = _record_schema()
        try:
            for name, value in values.items():
                values[name] = schema[name].check(value, name)
            for n, c in enumerate(values[PREFIX + "Corrections"], 1):
                _correction_schema(c, f"{PREFIX}Corrections[{n}]").check(c, f"{PREFIX}Corrections[{n}]")
        except SchemaError as exc:
            raise MedSAMError(f"{what}: {exc}") from None
        record = cls(
            prompts=values[PREFIX + "Prompts"], mode=values[PREFIX + "Mode"],
            direction=values[PREFIX + "Direction"], model=values[PREFIX + "Model"],
            weights_sha256=values[PREFIX + "WeightsSHA256"], speed=values[PREFIX + "Speed"],
            precision=values[PREFIX + "Precision"], window=values[PREFIX + "Window"],
            job=values[PREFIX + "Job"], volume_sha256=values[PREFIX + "Volume"],
            version=values.get(PREFIX + "Version", ""), date=values.get(PREFIX + "Date", ""),
            corrections=values[PREFIX + "Corrections"],
        )
        try:
            record.window_object()
        except MedSAMError as exc:
            raise MedSAMError(f"{what}: {PREFIX}Window: {exc}") from None
        return record

    def window_object(self):
        """The :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window` recorded."""
        from .preprocessing import Window

        if "percentiles" in self.window:
            return Window(percentiles=tuple(self.window["percentiles"]))
        return Window(level=self.window["level"], width=self.window["width"])


#: Tags a record may lack (written by older versions, or empty).
_OPTIONAL_TAGS = (PREFIX + "Corrections", PREFIX + "Version", PREFIX + "Date")
#: Tags that hold JSON.
_JSON_TAGS = (PREFIX + "Prompts", PREFIX + "Corrections", PREFIX + "Window", PREFIX + "Job")


def _record_schema():
    """The schema of each tag of a record (:meth:`Provenance.from_tags`)."""
    from ..boxes import DIRECTIONS
    from ..fileio.userfiles import Either, ListOf, Num, Str, Table
    from ..models.speed import SPEED_TIERS

    point = ListOf(Num(-1e7, 1e7), 3, 3)
    box = Table({"kind": Str(choices=("box",)), "ras": ListOf(point, 2, 2), "combine": Str(max_len=40),
                 "mode": Str(choices=("3d", "2d"))}, required=("kind", "ras"))
    digest = _Digest()
    return {
        PREFIX + "Prompts": ListOf(box, 1, MAX_BOXES),
        PREFIX + "Corrections": ListOf(_AnyTable(), 0, 10_000),
        PREFIX + "Mode": Str(choices=("3d", "2d")),
        PREFIX + "Direction": Str(choices=tuple(DIRECTIONS)),
        PREFIX + "Model": Str(max_len=60),
        PREFIX + "WeightsSHA256": digest,
        PREFIX + "Speed": Str(choices=tuple(SPEED_TIERS)),
        PREFIX + "Precision": Str(choices=("float32", "bfloat16", "float16")),
        PREFIX + "Window": Either(
            Table({"level": Num(-1e7, 1e7), "width": Num(0.0, 1e7, lo_open=True)}, required=("level", "width"),
                  what="a level/width window"),
            Table({"percentiles": ListOf(Num(0.0, 100.0), 2, 2)}, required=("percentiles",),
                  what="a percentile window")),
        PREFIX + "Job": Table({"id": Str(max_len=100), "structures": ListOf(Str(max_len=200), 1, 1000)},
                              required=("id", "structures")),
        PREFIX + "Volume": digest,
        PREFIX + "Version": Str(max_len=40, empty=True),
        PREFIX + "Date": Str(max_len=40, empty=True),
    }


def _correction_schema(value: Any, where: str):
    """The schema of one correction, chosen by its ``kind`` (``box`` or ``accept``)."""
    from ..fileio.userfiles import Bool, ListOf, Num, SchemaError, Str, Table

    point = ListOf(Num(-1e7, 1e7), 3, 3)
    common = {"combine": Str(max_len=40), "mode": Str(choices=("3d", "2d"))}
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "box":
        return Table({"kind": Str(), "ras": ListOf(point, 2, 2), "more": ListOf(ListOf(point, 2, 2), 1, MAX_BOXES - 1),
                      **common}, required=("kind", "ras"))
    if kind == "accept":
        return Table({"kind": Str(), "slice_ras": point, "edited": Bool(), **common}, required=("kind", "slice_ras"))
    raise SchemaError(f"{where}, kind", "must be 'box' or 'accept'", kind)


class _AnyTable:
    """Each item a table (its kind's schema is checked after: :func:`_correction_schema`)."""

    expected = "a table"

    def check(self, value: Any, where: str) -> Any:
        from ..fileio.userfiles import SchemaError

        if not isinstance(value, dict):
            raise SchemaError(where, "must be a table", value)
        return value


class _Digest:
    """A SHA-256 digest: 64 lower-case hex digits."""

    expected = "a SHA-256 digest (64 hex digits)"

    def check(self, value: Any, where: str) -> str:
        from ..fileio.userfiles import SchemaError

        if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
            raise SchemaError(where, f"must be {self.expected}", value)
        return value


def new_job(structures: Sequence[str]) -> Dict[str, Any]:
    """A job record: a fresh id and the names of the structures segmented together."""
    return {"id": uuid.uuid4().hex[:12], "structures": list(structures)}


def replay_groups(records: Sequence[Tuple[str, Provenance]]) -> List[List[Tuple[str, Provenance]]]:
    """Segments grouped by job, in file order: each group is replayed as one job."""
    groups: Dict[str, List[Tuple[str, Provenance]]] = {}
    for name, record in records:
        groups.setdefault(str(record.job.get("id", name)), []).append((name, record))
    return list(groups.values())


def first_difference(records: Sequence[Provenance], fields: Sequence[str]) -> Optional[str]:
    """The first of ``fields`` on which ``records`` (one job) disagree, or ``None``."""
    for f in fields:
        if len({json.dumps(getattr(r, f), sort_keys=True) for r in records}) > 1:
            return f
    return None
