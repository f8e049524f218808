"""The one way files are published: written beside the target, then moved into place at once.

Every file the engine writes (masks, segmentations, checkpoints, manifests, caches) goes through
:func:`atomic_write`, so readers never see half a file and a failed or killed run never leaves a
half-written result under the target's name:

- the data goes to a hidden temporary file in the target's folder, named
  ``.<stem>.<host>-<pid>-<random>.medsam-tmp<ext>`` (the extension is kept because some writers,
  SimpleITK's, choose the format from it);
- it is published with ``os.replace`` when replacing is allowed, and otherwise with a hard link,
  which fails if the target exists: the "does it exist?" check and the write are one atomic step,
  so of two runs started at once exactly one wins and the other says so (file systems without
  hard links fall back to reserving the name with an exclusive create, also atomic);
- a temporary file left by a killed run is removed by the next write into that folder
  (:func:`remove_stale_temporaries`: its process is gone, or it is a day old);
- files that belong together (a mask and its review) are written inside
  :func:`published_together`: all of them are written first, where a full disk or a quota fails,
  and only then moved into place, so a run leaves all of them or none (never a new mask beside
  an old review).

:func:`check_destination` does, before any work starts, every check that can fail at the end
(folder writable, name length, a folder in the way, an existing file); :func:`check_output` adds,
for a result made from input files, that it is not one of them and has an extension we write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import MedSAMError
from .integrity import input_files

PathLike = Union[str, "os.PathLike[str]"]

#: Marks our temporary files (see the module doc); nothing else is ever removed as stale.
TEMP_MARK = ".medsam-tmp"
#: Extensions of two parts, kept whole in temporary names.
DOUBLE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".tar.gz")
#: A temporary file of another computer (shared folder) or of a process we cannot check is
#: removed only when it has not changed for this long.
STALE_AFTER_S = 24 * 3600

_TEMP_PATTERN = re.compile(r"^\..*\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_MARK))
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def split_extension(name: str) -> Tuple[str, str]:
    """``"liver.seg.nrrd"`` -> ``("liver", ".seg.nrrd")``; ``"ct.nii.gz"`` -> ``("ct", ".nii.gz")``."""
    low = name.lower()
    for ext in DOUBLE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, dot, suffix = name.rpartition(".")
    if dot and stem:
        return stem, "." + suffix
    return name, ""


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(str(folder), "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return 255


def _temp_name(target: Path, name_max: int) -> str:
    stem, ext = split_extension(target.name)
    tag = f".{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_MARK}{ext}"
    # The target's name may use the whole length limit; shorten the stem, never the tag.
    while stem and len(("." + stem + tag).encode("utf-8")) > name_max:
        stem = stem[:-1]
    return "." + stem + tag


def _process_running(pid: int) -> Optional[bool]:
    """Whether a process of this computer runs; ``None`` when it cannot be told safely."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Remove our temporary files in ``folder`` whose writer is gone; returns what was removed.

    A file is stale when the process that wrote it (named in the file name) no longer runs on
    this computer, or, for another computer's files and where processes cannot be checked, when
    it has not changed for :data:`STALE_AFTER_S`. Files not named by :func:`atomic_write` are
    never touched.
    """
    removed: List[Path] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if match.group("host") == _HOST and pid == os.getpid():
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        running = _process_running(pid) if match.group("host") == _HOST else None
        if running is False or (running is None and age > STALE_AFTER_S):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def check_destination(path: PathLike, overwrite: bool = True, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written; return it (``~`` expanded).

    Refuses (:class:`MedSAMError`, one line naming the problem): an existing folder at ``path``;
    a name longer than the file system allows; a parent that is a file; a folder where nothing
    can be written (tested by creating and removing one of our temporary files, so read-only
    disks, permissions and full quotas are all caught); an existing file when ``overwrite`` is
    false. A missing parent folder is fine when it can be created where it would be.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    if not target.name or target.name in (".", ".."):
        raise MedSAMError(f"{what} '{path}' is not a file name; give one such as 'mask.nii.gz'")
    try:
        is_dir = target.is_dir()
        exists = target.exists() or target.is_symlink()
    except OSError as exc:  # e.g. a name too long for the file system
        is_dir, exists = False, False
        if exc.errno != errno.ENAMETOOLONG:
            raise MedSAMError(f"{what} '{target}' cannot be used ({exc.strerror or exc})") from None
    if is_dir:
        raise MedSAMError(f"{what} '{target}' is a folder; give a file name inside it, e.g. '{target / 'mask.nii.gz'}'")
    folder = _existing_ancestor(target)
    if not folder.is_dir():
        raise MedSAMError(f"{what} '{target}' cannot be written: '{folder}' is a file, not a folder")
    limit = _name_max(folder)
    for part in [target.name, *[p.name for p in target.parents if not p.exists() and p.name]]:
        if len(part.encode("utf-8")) > limit:
            raise MedSAMError(
                f"{what} name '{part[:40]}...' is {len(part.encode('utf-8'))} bytes long; this file system allows "
                f"{limit}. Choose a shorter name"
            )
    if exists and not overwrite:
        raise MedSAMError(f"{what} '{target}' already exists; choose another name or pass --overwrite")
    probe = folder / _temp_name(folder / "probe", limit)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MedSAMError(
            f"cannot write {what} '{target}': nothing can be created in '{folder}' ({reason}). "
            "Choose a folder you can write to"
        ) from None
    return target


def check_folder(path: PathLike, what: str = "output folder") -> Path:
    """Check, before any work, that files can be written into the folder ``path`` (an existing
    folder, or one that can be created where it would be); return it (``~`` expanded).

    Refuses (:class:`MedSAMError`): a file (or anything but a folder) at ``path`` or on the way
    to it; a folder where nothing can be created (tested as :func:`check_destination` does).
    """
    folder = Path(os.path.expanduser(os.fspath(path)))
    try:
        if folder.exists() and not folder.is_dir():
            raise MedSAMError(f"{what} '{folder}' is a file, not a folder; give a folder (it is created if missing)")
    except OSError as exc:
        raise MedSAMError(f"{what} '{folder}' cannot be used ({exc.strerror or exc})") from None
    check_destination(folder / ".medsam-probe", overwrite=True, what=what)
    return folder


def check_output(path: PathLike, overwrite: bool = True, inputs: Sequence[PathLike] = (),
                 formats: Sequence[str] = (), what: str = "output", input_kind: str = "image") -> Path:
    """Check, before any work, that a result made from ``inputs`` can be written to ``path``; return it.

    Refuses (:class:`MedSAMError`): an extension not in ``formats`` (when given); a path that is one
    of the ``inputs`` (or a detached data file of one: writing there would destroy the image), even
    through a link; and everything :func:`check_destination` refuses (a folder at that path, a name
    too long, a folder where nothing can be written, an existing file or link without ``overwrite``).
    ``what`` names the file in messages ("output", "review", "summary"); ``input_kind`` the inputs.

    With ``overwrite``, a link at ``path`` is replaced by the new file, never written through: the
    file it points to is left as it was (:func:`atomic_write` publishes with ``os.replace``).
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    for source in inputs:
        for f in input_files(Path(os.path.expanduser(os.fspath(source)))):
            try:
                same = p.exists() and f.exists() and os.path.samefile(p, f)
            except OSError:
                same = False
            if same:
                raise MedSAMError(
                    f"The {what} '{p}' is the input {input_kind}{'' if f == Path(source) else f' data ({f})'}; "
                    f"writing the result there would destroy the {input_kind}. Choose another output name."
                )
    if formats and split_extension(p.name)[1].lower() not in formats and not p.is_dir():
        raise MedSAMError(
            f"Cannot write to '{p.name}': the name must end in one of {', '.join(formats)} "
            "(.mhd is not supported because it writes two files)."
        )
    return check_destination(p, overwrite=overwrite, what=what)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``target``; without ``overwrite``, never replace a file."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails with EEXIST if target exists: check and write in one step
    except FileExistsError:
        raise MedSAMError(
            f"'{target}' was created by someone else while this run was working (another run at the same "
            "time?); it was left as it is and this result was not saved. Run again with another name, or "
            "allow replacing it (--overwrite)"
        ) from None
    except OSError:
        # No hard links here (FAT, some network shares): reserve the name with an exclusive create.
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise MedSAMError(
                f"'{target}' was created by someone else while this run was working; it was left as it is "
                "and this result was not saved"
            ) from None
        os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(target)  # our own empty reservation
            raise
        return
    os.unlink(tmp)


_PENDING = threading.local()


@contextlib.contextmanager
def published_together() -> Iterator[None]:
    """The files :func:`atomic_write` writes inside the block are published together when it ends:
    each is written to its temporary file as the block runs (where a full disk fails), and all are
    moved into place only after the block finished without an error; otherwise none is, and every
    temporary file is removed. A failure while publishing (another run created a file meanwhile)
    removes the files this block had already created; a replaced file cannot be put back, but
    moving a finished file into place needs no free space. Nested blocks join the outer one."""
    if getattr(_PENDING, "files", None) is not None:
        yield
        return
    files: List[Tuple[Path, Path, bool]] = []
    _PENDING.files = files
    try:
        yield
        _PENDING.files = None
        created: List[Path] = []
        target = None
        try:
            for tmp, target, overwrite in files:
                existed = target.exists() or target.is_symlink()
                _publish(tmp, target, overwrite)
                if not existed:
                    created.append(target)
        except BaseException as exc:
            for path in created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if isinstance(exc, OSError):
                raise MedSAMError(f"could not write '{target}' ({exc.strerror or exc}); check free space and "
                                  "permissions") from None
            raise
    finally:
        _PENDING.files = None
        for tmp, _, _ in files:
            with contextlib.suppress(OSError):
                if tmp.exists():
                    tmp.unlink()


def atomic_write(path: PathLike, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then publish it as ``path``.

    Args:
        path: the file to create (its folder is created when missing).
        write: writes the whole file at the path it is given (which keeps ``path``'s extension).
        overwrite: replace an existing ``path``; when false, a ``path`` that exists at the moment
            of publishing (even one created while ``write`` ran) is left untouched and
            :class:`MedSAMError` is raised.

    A failure (or an interrupt) leaves any previous ``path`` untouched and no temporary file;
    stale temporary files of killed runs in that folder are removed first.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSAMError(
            f"cannot create the folder '{target.parent}' ({exc.strerror or exc}); choose a writable location"
        ) from None
    remove_stale_temporaries(target.parent)
    tmp = target.parent / _temp_name(target, _name_max(target.parent))
    pending = getattr(_PENDING, "files", None)
    queued = False
    try:
        write(tmp)
        if pending is not None:  # published_together(): moved into place when the block ends
            pending.append((tmp, target, overwrite))
            queued = True
            return target
        _publish(tmp, target, overwrite)
    except OSError as exc:
        raise MedSAMError(
            f"could not write '{target}' ({exc.strerror or exc}); check free space and permissions"
        ) from None
    finally:
        if not queued:
            with contextlib.suppress(OSError):
                if tmp.exists():
                    tmp.unlink()
    return target


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"

    def _write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, _write)


def write_text(path: PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8), atomically (without ``overwrite``, never over an existing file)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def torch_save(path: PathLike, obj: Any, overwrite: bool = True) -> Path:
    """``torch.save(obj)`` atomically (without ``overwrite``, never over an existing file)."""
    import torch

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write, overwrite=overwrite)
