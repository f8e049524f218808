"""What the client and the server of ``medsam-slicer serve`` say to each other (numpy and the
standard library only: the Slicer side imports it without torch).

* A volume travels once, as the raw ``(z, y, x)`` array in ``.npy`` format compressed with zlib
  (:func:`pack_volume`); its :func:`~MedSAMSlicerLib.segmentation.provenance.volume_sha256` (the record's
  ``MedSAM.Volume``) goes with it and the server checks the voxels it decoded against it.
* Everything else is JSON: prompts (:class:`~MedSAMSlicerLib.boxes.BoxPrompt`), corrections,
  windows, and the results (:class:`~MedSAMSlicerLib.segmentation.results.Segmentation`,
  :class:`~MedSAMSlicerLib.segmentation.results.PropagationResult`, ...) with masks as zlib-compressed,
  bit-packed, base64 text (:func:`pack_mask`). Not-a-number floats travel as ``null``.
* No field names a file or a path on the server: the model, the weights and the device are the
  server's own (its command line), and a volume is bytes, never a file name.
* :func:`compatibility` is the one rule for "do this client and this server understand each
  other", used on both sides.
"""

from __future__ import annotations

import base64
import io
import math
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError
from ..segmentation.provenance import VERSION
from ..segmentation.results import (
    Conditioning,
    Correction,
    PropagationResult,
    Segmentation,
    SliceRecord,
    StructuresResult,
)

#: The protocol's number: changed whenever a request or an answer changes incompatibly.
API_VERSION = 1
#: Headers every client request carries (the server refuses another protocol with HTTP 426).
API_HEADER = "X-MedSAM-API"
VERSION_HEADER = "X-MedSAM-Version"
#: The upload's header: :func:`~MedSAMSlicerLib.segmentation.provenance.volume_sha256` of the array.
SHA_HEADER = "X-MedSAM-Volume-SHA256"
#: The environment variable holding the bearer token (client and server).
TOKEN_ENV = "MEDSAM_SLICER_TOKEN"


def compatibility(client_api: int, client_version: str, server_api: int, server_version: str) -> Optional[str]:
    """``None`` when client and server speak the same protocol, else what to update, in words.

    The side with the older protocol is the one to update; the message names both versions.
    """
    if int(client_api) == int(server_api):
        return None
    older = "client" if int(client_api) < int(server_api) else "server"
    what = ("update medsam-slicer here (pip install -U medsam-slicer; in Slicer: update the MedSAM "
            "extension in the Extensions Manager)" if older == "client"
            else "ask whoever runs the server to update it (pip install -U medsam-slicer, then restart "
                 "'medsam-slicer serve')")
    return (f"the server runs medsam-slicer {server_version} (protocol {server_api}) and this client is "
            f"medsam-slicer {client_version} (protocol {client_api}): they cannot work together; {what}")


# -- arrays ----------------------------------------------------------------------------------------
def pack_volume(array: np.ndarray) -> bytes:
    """A ``(z, y, x)`` numeric array as zlib-compressed ``.npy`` bytes (level 1: fast, and CT
    compresses ~3x)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return zlib.compress(buffer.getvalue(), 1)


def unpack_volume(data: bytes, max_bytes: int) -> np.ndarray:
    """The array of :func:`pack_volume`'s bytes, at most ``max_bytes`` decompressed.

    Raises:
        MedSAMError: not zlib-compressed ``.npy`` data, more than ``max_bytes``, object arrays,
            or not a 3D array of numbers.
    """
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        raise MedSAMError("the upload is not a zlib-compressed .npy array (damaged in transit, or not sent by "
                          "a medsam-slicer client)") from None
    if len(raw) > max_bytes or inflater.unconsumed_tail:
        raise MedSAMError(f"the volume is larger than this server accepts ({max_bytes >> 20} MiB uncompressed)")
    if not inflater.eof:
        raise MedSAMError("the upload ends early (truncated in transit): send it again")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise MedSAMError("the upload is not a .npy array") from None
    if array.ndim != 3 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MedSAMError(f"the volume must be a 3D array of numbers (z, y, x); got {array.ndim}D {array.dtype}")
    return array


def pack_mask(mask: np.ndarray) -> Dict[str, Any]:
    """A bool array as JSON-ready data: shape and zlib-compressed, bit-packed, base64 bytes."""
    mask = np.asarray(mask, dtype=bool)
    bits = zlib.compress(np.packbits(mask, axis=None).tobytes(), 6)
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits).decode("ascii")}


def unpack_mask(data: Mapping[str, Any]) -> np.ndarray:
    """:func:`pack_mask` read back."""
    try:
        shape = tuple(int(v) for v in data["shape"])
        bits = np.frombuffer(zlib.decompress(base64.b64decode(data["bits"])), dtype=np.uint8)
        count = int(np.prod(shape))
        if bits.size * 8 < count:
            raise ValueError("too few bits")
        return np.unpackbits(bits, count=count).astype(bool).reshape(shape)
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise MedSAMError(f"a mask in the message is damaged ({exc})") from None


# -- numbers ---------------------------------------------------------------------------------------
def _num(value: float) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _float(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


# -- prompts, windows, corrections ----------------------------------------------------------------
def prompt_json(prompt: BoxPrompt) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.boxes.BoxPrompt` as JSON."""
    return {"z": int(prompt.z), "box": [int(v) for v in prompt.box],
            "z_range": None if prompt.z_range is None else [int(v) for v in prompt.z_range]}


def prompt_from_json(data: Mapping[str, Any]) -> BoxPrompt:
    """:func:`prompt_json` read back."""
    z_range = data.get("z_range")
    return BoxPrompt(int(data["z"]), tuple(int(v) for v in data["box"]),  # type: ignore[arg-type]
                     None if z_range is None else (int(z_range[0]), int(z_range[1])))


def window_json(window) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window` as JSON (the record's form)."""
    from ..segmentation.provenance import window_record

    return window_record(window)


def window_from_json(data: Mapping[str, Any]):
    """:func:`window_json` read back, as a :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window`."""
    from ..segmentation.preprocessing import Window

    if "percentiles" in data:
        lo, hi = data["percentiles"]
        return Window(percentiles=(float(lo), float(hi)))
    return Window(level=float(data["level"]), width=float(data["width"]))


def correction_json(correction: Correction) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.results.Correction` as JSON (``more``: the boxes of
    further pieces on the slice, only when there are some)."""
    out: Dict[str, Any] = {"z": int(correction.z),
                           "box": None if correction.box is None else [float(v) for v in correction.box]}
    if correction.more:
        out["more"] = [[float(v) for v in b] for b in correction.more]
    return out


def correction_from_json(data: Mapping[str, Any]) -> Correction:
    """:func:`correction_json` read back."""
    box = data.get("box")
    if box is None:
        return Correction.accept(int(data["z"]))
    return Correction.with_boxes(int(data["z"]), [box] + list(data.get("more") or []))


# -- results ---------------------------------------------------------------------------------------
def _record_json(r: SliceRecord) -> List[Any]:
    return [int(r.z), int(r.area), _num(r.score), bool(r.accepted), r.reason, _num(r.agreement),
            _num(r.overlap), _num(r.intensity)]


def _record_from_json(v: Sequence[Any]) -> SliceRecord:
    return SliceRecord(int(v[0]), int(v[1]), _float(v[2]), bool(v[3]), str(v[4]), _float(v[5]), _float(v[6]),
                       _float(v[7]))


def propagation_json(result: PropagationResult) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.results.PropagationResult` as JSON: mask, extent, stop reasons,
    per-slice records and locked slices: everything a correction or a review reads."""
    return {"mask": pack_mask(result.mask), "z_extent": None if result.z_extent is None else list(result.z_extent),
            "stop_reasons": dict(result.stop_reasons), "slices": [_record_json(r) for r in result.slices],
            "locked": [int(z) for z in result.locked],
            "prompts": [[int(p.z), None if p.box is None else [float(v) for v in p.box]] for p in result.prompts]}


def propagation_from_json(data: Mapping[str, Any]) -> PropagationResult:
    """:func:`propagation_json` read back."""
    extent = data.get("z_extent")
    return PropagationResult(unpack_mask(data["mask"]), None if extent is None else (int(extent[0]), int(extent[1])),
                             {str(k): str(v) for k, v in data.get("stop_reasons", {}).items()},
                             [_record_from_json(v) for v in data.get("slices", [])],
                             tuple(int(z) for z in data.get("locked", ())),
                             tuple(Conditioning(int(z), None if box is None else tuple(float(v) for v in box))
                                   for z, box in data.get("prompts", ())))


def segmentation_json(done: Segmentation) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.results.Segmentation` as JSON (a 3D one carries its full result
    and no second copy of the mask)."""
    out: Dict[str, Any] = {"prompt": prompt_json(done.prompt), "mode": done.mode, "covered": list(done.covered),
                           "score": _num(done.score), "stop_reasons": dict(done.stop_reasons)}
    if done.result is not None:
        out["result"] = propagation_json(done.result)
    else:
        out["mask"] = pack_mask(done.mask)
    return out


def segmentation_from_json(data: Mapping[str, Any]) -> Segmentation:
    """:func:`segmentation_json` read back."""
    result = propagation_from_json(data["result"]) if data.get("result") is not None else None
    mask = result.mask if result is not None else unpack_mask(data["mask"])
    return Segmentation(prompt_from_json(data["prompt"]), str(data["mode"]), mask,
                        [int(z) for z in data.get("covered", [])], _float(data.get("score")),
                        {str(k): str(v) for k, v in data.get("stop_reasons", {}).items()}, result)


def structures_json(job: StructuresResult) -> Dict[str, Any]:
    """A :class:`~MedSAMSlicerLib.segmentation.results.StructuresResult` as JSON (the logits stay on the server)."""
    return {"results": {name: propagation_json(r) for name, r in job.results.items()},
            "contested": pack_mask(job.contested), "encoded_slices": int(job.encoded_slices),
            "decoded_boxes": int(job.decoded_boxes)}


def structures_from_json(data: Mapping[str, Any]) -> StructuresResult:
    """:func:`structures_json` read back (in the order the prompts were given)."""
    return StructuresResult({str(n): propagation_from_json(r) for n, r in data["results"].items()},
                            unpack_mask(data["contested"]), int(data.get("encoded_slices", 0)),
                            int(data.get("decoded_boxes", 0)))


def result_json(value) -> Dict[str, Any]:
    """Any result a job gives, tagged with its kind."""
    if isinstance(value, Segmentation):
        return {"kind": "segmentation", "value": segmentation_json(value)}
    if isinstance(value, StructuresResult):
        return {"kind": "structures", "value": structures_json(value)}
    if isinstance(value, PropagationResult):
        return {"kind": "propagation", "value": propagation_json(value)}
    raise TypeError(f"no wire form for {type(value).__name__}")


def result_from_json(data: Mapping[str, Any]):
    """:func:`result_json` read back."""
    readers = {"segmentation": segmentation_from_json, "structures": structures_from_json,
               "propagation": propagation_from_json}
    try:
        return readers[data["kind"]](data["value"])
    except KeyError as exc:
        raise MedSAMError(f"the server's answer is not understood (missing {exc})") from None


def client_headers(token: Optional[str]) -> Dict[str, str]:
    """The headers of every client request."""
    headers = {API_HEADER: str(API_VERSION), VERSION_HEADER: VERSION, "User-Agent": f"medsam-slicer/{VERSION}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def decode_box(values: Sequence[Any]) -> Tuple[int, int, int, int]:
    """Four integers of a box sent as JSON."""
    if len(values) != 4:
        raise MedSAMError(f"a box needs four numbers (x0, y0, x1, y1); got {len(values)}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]
