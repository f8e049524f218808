"""The one reader of every file a user hands us, and the schemas their contents must fit.

Prompt files (``segment --prompts``), evaluation sets (``evaluate SET.toml``), training configs
(``medsam-train train --config``) and the records in a ``.seg.nrrd``'s segment tags
(``segment --replay``) are all read here, before any model loads:

1. :func:`open_regular` / :func:`read_user_bytes`: the path must be a regular file (a FIFO, a
   device such as a link to ``/dev/zero``, a socket or a folder is refused before a byte is read,
   so nothing hangs or fills the memory) of at most ``max_bytes``;
2. :func:`read_user_text`: UTF-8 (the offset of the first bad byte is named);
3. :func:`load_table`: JSON or TOML, strictly: ``NaN``/``Infinity``, numbers too large for a
   float and integers of more than :data:`MAX_INT_DIGITS` digits become a :class:`Rejected`
   marker that no schema accepts (so the error names their entry); nesting deeper than
   :data:`MAX_DEPTH` is refused;
4. a schema (:class:`Table`, :class:`ListOf`, :class:`Int`, :class:`Num`, :class:`Str`, ...):
   types and ranges. ``true`` is not a number, ``"5"`` is not a number, ``5.5`` is not a label,
   a list is not a name.

Every error is a :class:`~MedSAMSlicerLib.errors.MedSAMError` of one line naming the file, the
entry (``structure 2 ('spleen'), box_ijk``) and the value that was given.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

from ..errors import MedSAMError

PathLike = Union[str, "os.PathLike[str]"]

#: The largest table file (prompts, evaluation set, training config) we read: 1 MiB.
MAX_TABLE_BYTES = 1 << 20
#: Deepest nesting of lists and tables in such a file.
MAX_DEPTH = 16
#: Longest integer literal (digits) in such a file; every range we accept is far shorter.
MAX_INT_DIGITS = 20

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 8
_short.maxdict = 6
_short.maxlevel = 3


def shown(value: Any) -> str:
    """A value as an error message shows it: ``repr``, shortened."""
    return _short.repr(value)


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: PathLike, what: str) -> Path:
    """``path`` (``~`` expanded) if it is a regular file (links followed); else :class:`MedSAMError`.

    A FIFO would block the reader forever and a device (a link to ``/dev/zero``) would be read
    until memory runs out: both are refused here, before anything is opened.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MedSAMError(f"{what} '{p}' not found") from None
    except OSError as exc:
        raise MedSAMError(f"{what} '{p}' cannot be used ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MedSAMError(f"{what} '{p}' is {_kind_of(st.st_mode)}, not a file; give a regular file")
    return p


def read_user_bytes(path: PathLike, what: str, max_bytes: int = MAX_TABLE_BYTES) -> bytes:
    """The bytes of a user's file: a regular file of at most ``max_bytes`` (:class:`MedSAMError` else).

    The file is opened without blocking and checked again once open, so a file swapped for a FIFO
    between the check and the open cannot hang the reader either.
    """
    p = check_regular_file(path, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise MedSAMError(f"cannot read {what} '{p}' ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MedSAMError(f"{what} '{p}' is {_kind_of(st.st_mode)}, not a file; give a regular file")
        if st.st_size > max_bytes:
            raise MedSAMError(f"{what} '{p}' is {st.st_size:,} bytes; such a file is at most {max_bytes:,} bytes "
                              "(is it the right file?)")
        chunks: List[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise MedSAMError(f"{what} '{p}' is more than {max_bytes:,} bytes; such a file is at most "
                                  f"{max_bytes:,} bytes (is it the right file?)")
            chunks.append(chunk)
    except OSError as exc:
        raise MedSAMError(f"cannot read {what} '{p}' ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_user_text(path: PathLike, what: str, max_bytes: int = MAX_TABLE_BYTES) -> str:
    """:func:`read_user_bytes` decoded as UTF-8 (a leading byte-order mark is dropped)."""
    data = read_user_bytes(path, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MedSAMError(f"{what} '{Path(path)}' is not UTF-8 text: byte {exc.start} (line {line}) is "
                          f"0x{data[exc.start]:02x}; save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


# -------------------------------------------------------------------------------------------
# Strict JSON and TOML


class Rejected:
    """A literal the reader does not turn into a number: ``NaN``, ``Infinity``, ``1e999``, an
    integer of more than :data:`MAX_INT_DIGITS` digits. It is kept as this marker, which no schema
    accepts, so that the error names the entry that holds it (``box_ras[1]: ... got NaN``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        digits = len(self.text.lstrip("-"))
        return self.text if len(self.text) <= 30 else f"{self.text[:12]}... (a number of {digits} digits)"


def _number_or_rejected(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else Rejected(text)


def _bounded_int(text: str) -> Any:
    return Rejected(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _depth(value: Any) -> int:
    """Nesting depth of lists and tables, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str, what: str) -> Any:
    """JSON text as data, strictly: NaN, Infinity, numbers beyond a float and integers of more than
    :data:`MAX_INT_DIGITS` digits become :class:`Rejected` markers (refused by every schema, naming
    their entry); nesting at most :data:`MAX_DEPTH`; ``what`` names the text in the error."""
    try:
        data = json.loads(text, parse_constant=Rejected, parse_float=_number_or_rejected, parse_int=_bounded_int)
    except RecursionError:
        raise MedSAMError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise MedSAMError(f"{what} is not valid JSON: {exc}") from None
    if _depth(data) > MAX_DEPTH:
        raise MedSAMError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)")
    return data


def load_table(path: PathLike, what: str, max_bytes: int = MAX_TABLE_BYTES) -> Any:
    """A user's JSON or TOML (``.toml``) file as data (see the module doc for what is refused)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    text = read_user_text(p, what, max_bytes)
    if p.suffix.lower() == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:
            raise MedSAMError(f"TOML files ({what} '{p}') need Python 3.11 or newer; write it as JSON") from None
        try:
            data = tomllib.loads(text, parse_float=_number_or_rejected)
        except RecursionError:
            raise MedSAMError(f"{what} '{p}' is nested too deeply (more than {MAX_DEPTH} levels)") from None
        except ValueError as exc:
            raise MedSAMError(f"{what} '{p}' is not valid TOML: {exc}") from None
        if _depth(data) > MAX_DEPTH:
            raise MedSAMError(f"{what} '{p}' is nested too deeply (more than {MAX_DEPTH} levels)")
        return data
    return parse_json(text, f"{what} '{p}'")


# -------------------------------------------------------------------------------------------
# Schemas


class SchemaError(MedSAMError):
    """A value that does not fit its schema: ``where`` (the entry) and ``problem``."""

    def __init__(self, where: str, problem: str, value: Any) -> None:
        self.where, self.problem, self.value = where, problem, value
        super().__init__(f"{where}: {problem}; got {shown(value)}" if where else f"{problem}; got {shown(value)}")


class Spec:
    """A schema: :meth:`check` returns the value (normalised) or raises :class:`SchemaError`."""

    #: How the expected value is described in errors ("a whole number in 0..255").
    expected = "a value"

    def check(self, value: Any, where: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fail(self, value: Any, where: str, problem: Optional[str] = None) -> SchemaError:
        return SchemaError(where, problem or f"must be {self.expected}", value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool = False) -> str:
    if lo is not None and hi is not None and not lo_open:
        return f" in {_num(lo)}..{_num(hi)}"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"<= {_num(hi)}")
    return (" " + " and ".join(parts)) if parts else ""


class Int(Spec):
    """A whole number (not a bool, not a string, not ``5.5``; ``5.0`` only with ``integral_floats``)."""

    def __init__(self, lo: Optional[int] = None, hi: Optional[int] = None, integral_floats: bool = False) -> None:
        self.lo, self.hi, self.integral_floats = lo, hi, integral_floats
        self.expected = "a whole number" + _range_text(lo, hi)

    def check(self, value: Any, where: str) -> int:
        if isinstance(value, bool):
            raise self._fail(value, where)
        if isinstance(value, float) and self.integral_floats and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise self._fail(value, where)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise self._fail(value, where)
        return value


class Num(Spec):
    """A finite number (int or float, not a bool or a string) in a range."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        self.expected = "a finite number" + _range_text(lo, hi, lo_open)

    def check(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(value, where)
        try:
            number = float(value)
        except OverflowError:
            raise self._fail(value, where) from None
        if not math.isfinite(number):
            raise self._fail(value, where)
        if self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo):
            raise self._fail(value, where)
        if self.hi is not None and number > self.hi:
            raise self._fail(value, where)
        return number


class Str(Spec):
    """Text of 1..``max_len`` characters without control characters (tab, newline allowed only
    with ``lines``); ``choices`` limits it to some words."""

    def __init__(self, max_len: int = 200, choices: Sequence[str] = (), empty: bool = False) -> None:
        self.max_len, self.choices, self.empty = max_len, tuple(choices), empty
        self.expected = ("one of " + ", ".join(repr(c) for c in choices)) if choices else "text"

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self._fail(value, where)
        if self.choices and value not in self.choices:
            raise self._fail(value, where)
        if not value.strip() and not self.empty:
            raise self._fail(value, where, "must not be empty")
        if len(value) > self.max_len:
            raise self._fail(value, where, f"is {len(value)} characters long; at most {self.max_len}")
        bad = [c for c in value if ord(c) < 32 and c not in "\t\n" or ord(c) == 127]
        if bad:
            raise self._fail(value, where, f"holds the control character {bad[0]!r}")
        return value


class Bool(Spec):
    """``true`` or ``false`` (not 0/1, not ``"yes"``)."""

    expected = "true or false"

    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self._fail(value, where)
        return value


class OrNone(Spec):
    """``null`` (JSON), or a value of ``spec``."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.expected = f"{spec.expected}, or null"

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.spec.check(value, where)


class ListOf(Spec):
    """A list of ``min_len..max_len`` items, each checked by ``item`` (``where[n]``, from 1)."""

    def __init__(self, item: Spec, min_len: int = 0, max_len: int = 10_000, expected: str = "") -> None:
        self.item, self.min_len, self.max_len = item, min_len, max_len
        count = str(min_len) if min_len == max_len else f"{min_len}..{max_len}"
        self.expected = expected or f"a list of {count} items, each {item.expected}"

    def check(self, value: Any, where: str) -> list:
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            raise self._fail(value, where)
        return [self.item.check(v, f"{where}[{n}]") for n, v in enumerate(value, 1)]


class Either(Spec):
    """The first of ``specs`` that fits."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs
        self.expected = " or ".join(s.expected for s in specs)

    def check(self, value: Any, where: str) -> Any:
        for spec in self.specs:
            try:
                return spec.check(value, where)
            except SchemaError:
                continue
        raise self._fail(value, where)


class MapOf(Spec):
    """A table of ``name = value``: names by ``key`` (a :class:`Str`), values by ``value``."""

    def __init__(self, value: Spec, key: Optional[Str] = None, min_len: int = 0, max_len: int = 1000) -> None:
        self.value, self.key = value, key or Str(max_len=200)
        self.min_len, self.max_len = min_len, max_len
        self.expected = f"a table of name = {value.expected}"

    def check(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict) or not self.min_len <= len(value) <= self.max_len:
            raise self._fail(value, where)
        return {self.key.check(k, f"{where}, name {k!r}"): self.value.check(v, f"{where}, {k}") for k, v in value.items()}


class Table(Spec):
    """A table with known keys: ``fields`` (key -> spec), of which ``required`` must be there;
    any other key is refused (a misspelt setting would otherwise be ignored)."""

    def __init__(self, fields: Mapping[str, Spec], required: Iterable[str] = (), what: str = "a table") -> None:
        self.fields, self.required = dict(fields), set(required)
        self.expected = f"{what} with {', '.join(self.fields)}"

    def check(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self._fail(value, where)
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise SchemaError(where, f"unknown key {str(unknown[0])!r}; the keys are {', '.join(self.fields)}",
                              unknown[0])
        missing = [k for k in self.fields if k in self.required and k not in value]
        if missing:
            raise SchemaError(where, f"needs {' and '.join(missing)}", value)
        return {k: self.fields[k].check(v, f"{where}, {k}" if where else k) for k, v in value.items()}


def checked(spec: Spec, value: Any, what: str, where: str = "") -> Any:
    """``spec.check(value)`` with ``what`` (e.g. "the prompts file 'p.toml'") before the entry."""
    try:
        return spec.check(value, where)
    except SchemaError as exc:
        raise MedSAMError(f"{what}: {exc}") from None


__all__ = ["MAX_TABLE_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS", "check_regular_file", "read_user_bytes",
           "read_user_text", "parse_json", "load_table", "Rejected", "Spec", "Int", "Num", "Str", "Bool", "OrNone", "ListOf", "Either",
           "MapOf", "Table", "SchemaError", "checked", "shown"]
