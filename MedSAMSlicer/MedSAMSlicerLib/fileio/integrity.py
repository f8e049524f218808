"""Are all the voxel bytes there? Checked before SimpleITK reads a file.

SimpleITK zero-fills truncated NIfTI files and reads damaged compressed data of every format
without an error, so :func:`check_file_complete` reads the header itself (NIfTI-1/2, NRRD,
MetaImage), compares the number of voxel bytes it promises with the bytes on disk (the file size
for raw data; one decompression pass for compressed data, which also verifies the stream's
checksum) and names what is missing.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import MedSAMError

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20
_GZIP_WBITS = 31
_ZLIB_OR_GZIP_WBITS = 47
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}
# MetaIO's MET_ValueTypeSize (MET_LONG is 4 bytes there).
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}


@dataclass(frozen=True)
class _DataLayout:
    """Where a file's voxel bytes are and how many its header promises."""

    data_file: Path
    offset: int  # where the voxel data start: in the file, or in the decompressed stream (inside)
    expected: int
    encoding: str  # "raw", "gzip", "zlib" (zlib or gzip), "bzip2"
    inside: bool = False  # the whole file is one compressed stream holding header and data (.nii.gz)


def _inflated_size(handle, wbits: int) -> Tuple[int, Optional[str]]:
    """Decompress a stream without keeping it: ``(bytes, None)``, or a problem: ``"truncated"``
    (it stops before its end marker) or ``"damaged"`` (bad data or checksum).  Gzip streams of
    several members (pigz, bgzip) are followed to the end."""
    total = 0
    inflater = zlib.decompressobj(wbits)
    data = b""
    try:
        while True:
            if not data:
                data = handle.read(_CHUNK)
                if not data:
                    return total, None if inflater.eof else "truncated"
            out = inflater.decompress(data, 4 * _CHUNK)
            total += len(out)
            data = inflater.unconsumed_tail
            if inflater.eof:
                rest = inflater.unused_data or handle.read(_CHUNK)
                if wbits == _GZIP_WBITS and rest[:2] == b"\x1f\x8b":
                    inflater, data = zlib.decompressobj(wbits), rest
                    continue
                return total, None
    except zlib.error:
        return total, "damaged"


def _bz2_size(handle) -> Tuple[int, Optional[str]]:
    import bz2

    total = 0
    inflater = bz2.BZ2Decompressor()
    try:
        while not inflater.eof:
            data = handle.read(_CHUNK)
            if not data:
                return total, "truncated"
            total += len(inflater.decompress(data))
    except (OSError, ValueError):
        return total, "damaged"
    return total, None


def _nifti_layout(p: Path) -> Optional[_DataLayout]:
    compressed = p.name.lower().endswith(".gz")
    try:
        with (gzip.open(p, "rb") if compressed else open(p, "rb")) as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return None  # not readable as such: SimpleITK's own error says why
    for endian in "<>":
        if len(head) >= 348 and struct.unpack_from(endian + "i", head, 0)[0] == 348:
            if head[344:347] != b"n+1":
                return None  # a .hdr/.img pair: the data are elsewhere
            dims = struct.unpack_from(endian + "8h", head, 40)
            bitpix = struct.unpack_from(endian + "h", head, 72)[0]
            offset = int(struct.unpack_from(endian + "f", head, 108)[0])
            break
        if len(head) >= 540 and struct.unpack_from(endian + "i", head, 0)[0] == 540:
            if head[4:7] != b"n+2":
                return None
            bitpix = struct.unpack_from(endian + "h", head, 14)[0]
            dims = struct.unpack_from(endian + "8q", head, 16)
            offset = int(struct.unpack_from(endian + "q", head, 168)[0])
            break
    else:
        return None
    n = int(dims[0])
    if not 1 <= n <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    count = 1
    for d in dims[1 : n + 1]:
        count *= max(int(d), 1)
    return _DataLayout(p, max(offset, 0), count * bitpix // 8, "gzip" if compressed else "raw", compressed)


def _text_header(p: Path, separator: str) -> Tuple[Dict[str, str], int]:
    """``key -> value`` of a text header and its length in bytes.

    NRRD (``separator=":"``): ``key: value`` lines up to the first blank line.  MetaImage
    (``"="``): ``Key = Value`` lines up to and including ``ElementDataFile``.
    """
    fields: Dict[str, str] = {}
    length = 0
    with open(p, "rb") as handle:
        for raw in iter(lambda: handle.readline(1 << 16), b""):
            length += len(raw)
            line = raw.decode("latin-1").strip()
            if separator == ":" and not line:
                break
            if separator == ":" and line.startswith("#"):
                continue
            key, sep, value = line.partition(separator)
            if sep:
                fields[key.strip().lower().replace(" ", "")] = value.strip()
            if separator == "=" and key.strip().lower() == "elementdatafile":
                break
            if length > (1 << 20):
                break
    return fields, length


def _nrrd_layout(p: Path) -> Optional[_DataLayout]:
    fields, header_bytes = _text_header(p, ":")
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        item = _NRRD_TYPE_BYTES[fields.get("type", "").lower()]
    except (KeyError, ValueError):
        return None
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(
        fields.get("encoding", "").lower())
    skip = int(fields.get("byteskip", "0") or 0)
    if not sizes or encoding is None or skip < 0 or int(fields.get("lineskip", "0") or 0) != 0:
        return None  # text encodings, data at the end of the file, or skipped lines: not checked
    data_file, offset = p, header_bytes
    detached = fields.get("datafile") or fields.get("data_file")
    if detached:
        if detached.upper().startswith("LIST") or "%" in detached or " " in detached:
            return None
        data_file, offset = (p.parent / detached), 0
    expected = int(np.prod(sizes, dtype=np.int64)) * item
    if encoding == "raw":
        offset += skip
    return _DataLayout(data_file, offset, expected, encoding)


def _metaimage_layout(p: Path) -> Optional[_DataLayout]:
    fields, header_bytes = _text_header(p, "=")
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
        item = _MET_TYPE_BYTES[fields["elementtype"].upper()] * int(fields.get("elementnumberofchannels", "1"))
        where = fields["elementdatafile"]
    except (KeyError, ValueError):
        return None
    if fields.get("binarydata", "True").lower() != "true" or where.upper().startswith("LIST") or "%" in where:
        return None
    data_file, offset = (p, header_bytes) if where.upper() == "LOCAL" else (p.parent / where, 0)
    skip = int(fields.get("headersize", "0") or 0)
    if skip < 0:
        return None  # "data at the end of the file": nothing to compare with
    compressed = fields.get("compresseddata", "False").lower() == "true"
    expected = int(np.prod(sizes, dtype=np.int64)) * item
    return _DataLayout(data_file, offset + (0 if compressed else skip), expected, "zlib" if compressed else "raw")


def check_file_complete(path: PathLike) -> None:
    """Refuse an image file whose voxel data are shorter than its header says, or whose
    compressed data are damaged.

    NIfTI (``.nii``, ``.nii.gz``), NRRD (raw, gzip, bzip2; attached or detached data) and
    MetaImage (``.mha``, ``.mhd``; raw or compressed): raw data must have at least the bytes the
    header implies (file size minus header); compressed data are decompressed once, without
    keeping them (about a quarter of SimpleITK's own reading time), which also verifies the
    stream's checksum. Text encodings and other formats are left to SimpleITK.

    Raises:
        MedSAMError: naming the file, how many bytes it holds of how many, and what to do.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        layout = _nifti_layout(p)
    elif name.endswith((".nrrd", ".nhdr")):
        layout = _nrrd_layout(p)
    elif name.endswith((".mha", ".mhd")):
        layout = _metaimage_layout(p)
    else:
        return
    if layout is None or layout.expected <= 0:
        return
    data = layout.data_file
    try:
        if layout.encoding == "raw":
            have, problem = max(0, data.stat().st_size - layout.offset), None
        elif layout.inside:
            with open(data, "rb") as handle:
                total, problem = _inflated_size(handle, _GZIP_WBITS)
            have = max(0, total - layout.offset)
        else:
            with open(data, "rb") as handle:
                handle.seek(layout.offset)
                if layout.encoding == "bzip2":
                    have, problem = _bz2_size(handle)
                else:
                    have, problem = _inflated_size(handle, _GZIP_WBITS if layout.encoding == "gzip" else _ZLIB_OR_GZIP_WBITS)
    except OSError as exc:
        raise MedSAMError(
            f"The voxel data of '{p}' cannot be read from '{data}' ({exc.strerror or exc}). Check that the file is "
            "there and readable."
        ) from None
    where = f"'{p}'" if data == p else f"'{data}' (the voxel data of '{p}')"
    if problem == "damaged":
        raise MedSAMError(
            f"{where} is damaged: its compressed voxel data fail their integrity check (after {have:,} of "
            f"{layout.expected:,} bytes), so some voxels would be wrong. Copy or export the file again."
        )
    if problem == "truncated" and have >= layout.expected:
        raise MedSAMError(
            f"{where} is truncated: its compressed data stop before their end and checksum, so they cannot be "
            "verified. Copy or export the file again (an interrupted download or copy?)."
        )
    if problem == "truncated" or have < layout.expected:
        raise MedSAMError(
            f"{where} is truncated: it holds {min(have, layout.expected):,} of the {layout.expected:,} bytes of voxel "
            f"data its header promises ({100.0 * min(have, layout.expected) / layout.expected:.0f}%); the rest "
            "would be read as zeros. Copy or export the file again (an interrupted download or copy?)."
        )


def check_image_file(path: PathLike, what: str = "input") -> Path:
    """The one check of every image file any command reads (volumes, labelmaps, ``.seg.nrrd``),
    before SimpleITK, ITK or Slicer opens it: a regular file (a FIFO, a device or a folder is
    refused: :func:`~MedSAMSlicerLib.fileio.userfiles.check_regular_file`) with every voxel byte its
    header promises and intact compressed data (:func:`check_file_complete`). Returns the path.

    Raises:
        MedSAMError: naming the file and the problem.
    """
    from .userfiles import check_regular_file

    p = check_regular_file(path, what)
    check_file_complete(p)
    return p


def input_files(path: Path) -> List[Path]:
    """The files a volume is read from: the file itself and, for a header with detached voxel data
    (``.nhdr``, ``.mhd``), its data file (a DICOM folder: none, since none can be an output)."""
    try:
        if not path.is_file():
            return []
    except OSError:  # unreadable: read_volume will say so
        return []
    files = [path]
    name = path.name.lower()
    layout = _nrrd_layout(path) if name.endswith(".nhdr") else _metaimage_layout(path) if name.endswith(".mhd") else None
    if layout is not None and layout.data_file != path:
        files.append(layout.data_file)
    return files
