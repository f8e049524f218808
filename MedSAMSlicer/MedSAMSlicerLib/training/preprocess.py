"""FLARE22-layout volumes -> a compact, resumable training dataset.

Input layout (FLARE22, nnU-Net style)::

    DATA_DIR/images/<case>_0000.nii.gz     CT or MR volume
    DATA_DIR/labels/<case>.nii.gz          integer label map on the same grid

The rules follow MedSAM's ``pre_CT_MR.py`` by default, so a model trained here sees the data the
original saw:

1. labels in ``exclude_labels`` (default ``[12]``, the duodenum) are set to 0;
2. small objects are removed with ``cc3d.dust``: components under ``dust_3d`` voxels (default
   1000, connectivity 26) in 3D, then, slice by slice, under ``dust_2d`` pixels (default 100,
   connectivity 8). The LiteMedSAM preset uses 100 / 10;
3. only axial slices that still contain a label are kept;
4. CT: window level 40 / width 400 (clip to [-160, 240]) and min-max of the clipped *volume* to
   0-255 (``stretch``), truncated to ``uint8``. MR: clip to the 0.5-99.5 percentiles of the
   non-zero voxels, min-max to 0-255, background kept at 0.

What differs from the original, on purpose:

- one compressed ``<case>.npz`` per case with the ``uint8`` slices at the *original* resolution
  (``images`` and ``labels``, both ``(n, H, W)``, plus their ``z`` indices and ``spacing_zyx``)
  instead of one float64 1024x1024 ``.npy`` per slice: the model-specific resize happens in the
  :class:`~MedSAMSlicerLib.training.dataset.SliceDataset`, so one preprocessing serves MedSAM and
  LiteMedSAM, and a FLARE22 case takes a few MB instead of gigabytes;
- volumes are read in the canonical axial order (``volumes.read_volume``) whatever the file's
  direction matrix, so ``images[i]`` is an axial slice as Slicer shows it;
- held-out cases (default: the last 10 of the sorted names when there are >= 50 cases, as the
  original; else the last fifth) are preprocessed too, marked ``"val"`` in the manifest, and used
  for validation;
- cases run in parallel (``workers``), every file is written atomically, and a second run skips
  the cases whose output exists and whose manifest entry matches (same settings, same input file
  sizes and modification times). A bad case never destroys earlier outputs: the other cases are
  finished, the manifest records what is done, and one :class:`MedSAMError` lists the bad cases.

``manifest.json`` (written after each case, atomically) holds the settings, the split, and per
case: the npz file, slice count, labels present (and on how many slices), spacing, shape and
what the cleaning removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MedSAMError
from ..fileio.atomic import atomic_write, write_json
from ..progress import Cancelled, CancelToken, ProgressCallback, check_cancel, report

if TYPE_CHECKING:
    from ..segmentation.preprocessing import Window

MANIFEST_NAME = "manifest.json"
FORMAT = "medsam-slicer-prep/1"
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

HoldOut = Union[None, int, Sequence[str]]


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the content of a preprocessed case.

    Attributes:
        modality: ``"CT"`` (level/width window) or ``"MR"`` (percentile window).
        window_level, window_width: CT window in HU (default abdomen 40 / 400).
        stretch: CT only: min-max the clipped volume to 0-255 as ``pre_CT_MR.py`` does (``False``:
            the fixed level/width mapping a viewer shows, the one inference uses).
        mr_percentiles: MR clipping percentiles of the non-zero voxels.
        dust_3d, dust_3d_connectivity: remove 3D components smaller than this (0 = keep all).
        dust_2d, dust_2d_connectivity: then remove per-slice 2D components smaller than this.
        exclude_labels: label ids set to background first.
        image_suffix: image file name = ``<case><image_suffix><ext>``.
    """

    modality: str = "CT"
    window_level: float = 40.0
    window_width: float = 400.0
    stretch: bool = True
    mr_percentiles: Tuple[float, float] = (0.5, 99.5)
    dust_3d: int = 1000
    dust_3d_connectivity: int = 26
    dust_2d: int = 100
    dust_2d_connectivity: int = 8
    exclude_labels: Tuple[int, ...] = (12,)
    image_suffix: str = "_0000"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", str(self.modality).upper())
        object.__setattr__(self, "exclude_labels", tuple(sorted(int(v) for v in self.exclude_labels)))
        object.__setattr__(self, "mr_percentiles", tuple(float(v) for v in self.mr_percentiles))
        if self.modality not in ("CT", "MR"):
            raise MedSAMError(f"modality must be CT or MR; got '{self.modality}'")
        if self.dust_3d_connectivity not in (6, 18, 26):
            raise MedSAMError(f"3D connectivity must be 6, 18 or 26; got {self.dust_3d_connectivity}")
        if self.dust_2d_connectivity not in (4, 8):
            raise MedSAMError(f"2D connectivity must be 4 or 8; got {self.dust_2d_connectivity}")
        if self.dust_3d < 0 or self.dust_2d < 0:
            raise MedSAMError("small-object thresholds must be >= 0 (0 keeps every object)")
        self.window()  # validates the window

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PreprocessSettings:
        """``"medsam"`` (``pre_CT_MR.py``: dust 1000/100) or ``"litemedsam"`` (dust 100/10)."""
        key = name.lower()
        if key == "medsam":
            base = cls()
        elif key == "litemedsam":
            base = cls(dust_3d=100, dust_2d=10)
        else:
            raise MedSAMError(f"unknown preprocessing preset '{name}'; choose medsam or litemedsam")
        return replace(base, **overrides)

    def window(self) -> Window:
        """The :class:`~MedSAMSlicerLib.segmentation.preprocessing.Window` these settings describe."""
        from ..segmentation.preprocessing import Window

        if self.modality == "MR":
            return Window(percentiles=self.mr_percentiles)
        return Window(level=float(self.window_level), width=float(self.window_width))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["mr_percentiles"] = list(self.mr_percentiles)
        d["exclude_labels"] = list(self.exclude_labels)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> PreprocessSettings:
        """Inverse of :meth:`to_dict` (unknown keys raise :class:`MedSAMError`)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise MedSAMError(f"unknown preprocessing settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    def key(self) -> str:
        """Short hash of the settings (a changed setting re-runs every case)."""
        text = json.dumps({"format": FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CaseFiles:
    """One case of a FLARE22-layout folder."""

    name: str
    image: Path
    label: Path


@dataclass
class CaseArrays:
    """One preprocessed case, as stored in its npz.

    Attributes:
        images: ``(n, H, W)`` ``uint8`` windowed axial slices (canonical ``y, x``).
        labels: ``(n, H, W)`` ``uint8`` label slices.
        z: ``(n,)`` the slices' indices in the canonical volume.
        spacing_zyx: voxel spacing in mm along ``(z, y, x)``.
    """

    images: np.ndarray
    labels: np.ndarray
    z: np.ndarray
    spacing_zyx: Tuple[float, float, float]


@dataclass
class PreprocessResult:
    """What :func:`preprocess_dataset` did."""

    manifest: Dict[str, Any]
    processed: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# finding cases and splitting them


def _strip_ext(name: str) -> Tuple[str, str]:
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return name[: len(name) - len(ext)], name[len(name) - len(ext):]
    return name, ""


def find_cases(data_dir: Union[str, Path], image_suffix: str = "_0000") -> List[CaseFiles]:
    """List the cases of a FLARE22-layout folder, sorted by name.

    Args:
        data_dir: folder with ``images/`` and ``labels/``.
        image_suffix: what follows the case name in image file names (``_0000``).

    Raises:
        MedSAMError: the folders are missing, hold no images, or an image has no label file.
    """
    root = Path(data_dir)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise MedSAMError(
            f"'{root}' is not a FLARE22-layout folder: it needs 'images/<case>{image_suffix}.nii.gz' and "
            "'labels/<case>.nii.gz'. Put the volumes and their label maps in these two sub-folders."
        )
    cases: List[CaseFiles] = []
    for path in sorted(images_dir.iterdir()):
        stem, ext = _strip_ext(path.name)
        if not ext or path.name.startswith("."):
            continue
        if not stem.endswith(image_suffix):
            continue
        name = stem[: len(stem) - len(image_suffix)] if image_suffix else stem
        label = labels_dir / f"{name}{ext}"
        if not label.exists():
            others = [labels_dir / f"{name}{e}" for e in IMAGE_EXTENSIONS if (labels_dir / f"{name}{e}").exists()]
            if not others:
                raise MedSAMError(
                    f"the label file for '{path}' is missing: expected '{label}'. Add the label map "
                    "or remove the image from images/."
                )
            label = others[0]
        cases.append(CaseFiles(name, path, label))
    if not cases:
        raise MedSAMError(
            f"no images named '<case>{image_suffix}.nii.gz' (or .nii/.nrrd/.mha) in '{images_dir}'"
        )
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MedSAMError(f"cases with several image files in '{images_dir}': {', '.join(dup)}; keep one each")
    return cases


def default_holdout_count(n_cases: int) -> int:
    """How many (last, sorted) cases are held out by default.

    10 when there are >= 50 cases (FLARE22's 50: the original trains on the first 40); otherwise a
    fifth, at least one when there are two or more cases.
    """
    if n_cases >= 50:
        return 10
    if n_cases < 2:
        return 0
    return max(1, n_cases // 5)


def split_cases(names: Sequence[str], holdout: HoldOut = None) -> Tuple[List[str], List[str]]:
    """Split case names into ``(train, val)``.

    Args:
        names: case names (sorted here).
        holdout: ``None`` for :func:`default_holdout_count`; an int ``N`` for the last ``N`` sorted
            cases; or a list of case names.
    """
    ordered = sorted(names)
    if holdout is None:
        holdout = default_holdout_count(len(ordered))
    if isinstance(holdout, (int, np.integer)) and not isinstance(holdout, bool):
        count = int(holdout)
        if count < 0:
            raise MedSAMError(f"the number of held-out cases must be >= 0; got {count}")
        if count > 0 and count >= len(ordered):
            raise MedSAMError(
                f"cannot hold out {count} of {len(ordered)} cases: at least one must stay for training"
            )
        val = ordered[len(ordered) - count:] if count else []
    else:
        val = sorted({str(n) for n in holdout})
        unknown = [n for n in val if n not in ordered]
        if unknown:
            raise MedSAMError(f"held-out cases not found in the data: {', '.join(unknown)}")
        if len(val) >= len(ordered):
            raise MedSAMError("every case is held out; leave at least one for training")
    val_set = set(val)
    return [n for n in ordered if n not in val_set], val


# ---------------------------------------------------------------------------------------------
# one case


def _fingerprint(case: CaseFiles) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, path in (("image", case.image), ("label", case.label)):
        st = path.stat()
        out[key] = {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _read(path: Path, what: str, case: str):
    import warnings

    from ..fileio.volumes import read_volume

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # notes on DICOM folders; case files are files
            return read_volume(path, labels=what == "label")
    except MedSAMError as exc:
        raise MedSAMError(
            f"case '{case}': the {what} file '{path}' cannot be used: {exc} "
            "Replace the file or remove the case from the folder."
        ) from exc


def _check_same_grid(image, label, case: CaseFiles) -> None:
    a, b = image.image, label.image
    problems = []
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    else:
        if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-4):
            problems.append(f"spacing {tuple(round(v, 4) for v in a.GetSpacing())} vs "
                            f"{tuple(round(v, 4) for v in b.GetSpacing())}")
        tol = 1e-3 * max(1.0, float(np.max(a.GetSpacing())))
        if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol):
            problems.append(f"origin {tuple(round(v, 3) for v in a.GetOrigin())} vs "
                            f"{tuple(round(v, 3) for v in b.GetOrigin())}")
        if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
            problems.append("direction matrices differ")
    if problems:
        raise MedSAMError(
            f"case '{case.name}': the label '{case.label}' is not on the grid of the image '{case.image}' "
            f"({'; '.join(problems)}). Resample the label map onto the image (e.g. in 3D Slicer: "
            "Resample Image (BRAINS) with nearest neighbour) or fix the file."
        )


def _labels_uint8(array: np.ndarray, case: CaseFiles) -> np.ndarray:
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise MedSAMError(
                f"case '{case.name}': '{case.label}' holds non-integer values; a label map must hold "
                "integer label ids (0 = background). Did you swap the image and the label?"
            )
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise MedSAMError(
            f"case '{case.name}': '{case.label}' has label ids from {lo:g} to {hi:g}; ids must be 0-255 "
            "(0 = background). Did you swap the image and the label?"
        )
    return arr.astype(np.uint8)


def clean_labels(labels: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Exclude labels and remove small objects as ``pre_CT_MR.py`` does.

    Args:
        labels: ``(z, y, x)`` ``uint8`` label volume (canonical axial order: ``labels[z]`` is an
            axial slice, so the 2D pass runs on axial slices).
        settings: exclusions and ``cc3d.dust`` thresholds/connectivities.

    Returns:
        A cleaned copy, ``uint8`` ``(z, y, x)``.
    """
    import cc3d

    out = np.ascontiguousarray(labels, dtype=np.uint8).copy()
    for label in settings.exclude_labels:
        out[out == label] = 0
    if settings.dust_3d > 0:
        out = cc3d.dust(out, threshold=int(settings.dust_3d), connectivity=settings.dust_3d_connectivity,
                        in_place=True)
    if settings.dust_2d > 0:
        for z in range(out.shape[0]):
            if out[z].any():
                out[z] = cc3d.dust(np.ascontiguousarray(out[z]), threshold=int(settings.dust_2d),
                                   connectivity=settings.dust_2d_connectivity, in_place=False)
    return out


def window_volume(array: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Window a raw ``(z, y, x)`` volume to ``uint8`` with the settings' window (see module doc)."""
    from ..segmentation.preprocessing import apply_window

    return apply_window(array, settings.window(), stretch=bool(settings.stretch))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, _write)


def process_case(case: CaseFiles, settings: PreprocessSettings, out_dir: Union[str, Path]) -> Dict[str, Any]:
    """Preprocess one case and write ``out_dir/<case>.npz`` atomically.

    Returns:
        The case's manifest entry (``n_slices`` 0 and ``file`` None when cleaning left no label).

    The files go through :func:`~MedSAMSlicerLib.fileio.volumes.read_volume`'s checks (truncated or
    damaged files, NaN or infinite voxels, a blank image), so a bad case fails here and is never
    turned into training data. An image the window shows next to nothing of (e.g. CT without its
    rescale to Hounsfield units) is prepared, with a warning in its entry (``"warnings"``).

    Raises:
        MedSAMError: unreadable, truncated or damaged image or label, NaN/infinite voxels, a blank
            image, different grids, non-integer or all-zero labels.
    """
    fingerprint = _fingerprint(case)
    label_vol = _read(case.label, "label", case.name)
    raw = _labels_uint8(label_vol.array, case)
    present_raw = sorted(int(v) for v in np.unique(raw) if v != 0)
    if not present_raw:
        raise MedSAMError(
            f"case '{case.name}': the label file '{case.label}' is empty (all voxels are 0). "
            "Give a label map with at least one structure, or remove the case."
        )
    image_vol = _read(case.image, "image", case.name)
    _check_same_grid(image_vol, label_vol, case)
    cleaned = clean_labels(raw, settings)
    z_index = np.flatnonzero(cleaned.reshape(cleaned.shape[0], -1).any(axis=1))
    sx, sy, sz = (float(v) for v in label_vol.spacing)
    present = sorted(int(v) for v in np.unique(cleaned) if v != 0)
    excluded = [v for v in present_raw if v in settings.exclude_labels]
    entry: Dict[str, Any] = {
        "case": case.name,
        "file": None,
        "n_slices": int(z_index.size),
        "shape_zyx": [int(v) for v in cleaned.shape],
        "spacing_zyx": [sz, sy, sx],
        "labels": present,
        "label_slices": {},
        "removed": {
            "excluded": excluded,
            "small": [v for v in present_raw if v not in present and v not in excluded],
            "voxels": int(np.count_nonzero(raw) - np.count_nonzero(cleaned)),
        },
        "source": fingerprint,
        "settings_key": settings.key(),
    }
    if z_index.size == 0:
        return entry
    from ..segmentation.preprocessing import window_note

    note = window_note(image_vol.array, settings.window(), stretch=bool(settings.stretch))
    if note:
        entry["warnings"] = [f"case '{case.name}': {note}"]
    windowed = window_volume(image_vol.array, settings)
    labels = cleaned[z_index]
    for value in present:
        entry["label_slices"][str(value)] = int(np.count_nonzero((labels == value).reshape(len(labels), -1).any(1)))
    out_path = Path(out_dir) / f"{case.name}.npz"
    _save_npz(
        out_path,
        images=np.ascontiguousarray(windowed[z_index]),
        labels=np.ascontiguousarray(labels),
        z=z_index.astype(np.int32),
        spacing_zyx=np.array([sz, sy, sx], dtype=np.float64),
    )
    entry["file"] = out_path.name
    entry["bytes"] = out_path.stat().st_size
    return entry


def _process_job(args: Tuple[CaseFiles, Dict[str, Any], str]) -> Dict[str, Any]:
    case, settings, out_dir = args
    return process_case(case, PreprocessSettings.from_dict(settings), out_dir)


def load_case(path: Union[str, Path]) -> CaseArrays:
    """Read a preprocessed ``<case>.npz`` (no pickles allowed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return CaseArrays(
                images=data["images"],
                labels=data["labels"],
                z=data["z"],
                spacing_zyx=tuple(float(v) for v in data["spacing_zyx"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise MedSAMError(f"'{path}' is not a preprocessed case ({exc}); run 'medsam-train preprocess' again") from exc


def load_manifest(prep_dir: Union[str, Path]) -> Dict[str, Any]:
    """Read ``prep_dir/manifest.json``; :class:`MedSAMError` when it is missing or not ours."""
    path = Path(prep_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MedSAMError(
            f"'{prep_dir}' has no {MANIFEST_NAME}: it is not a preprocessed dataset. Run "
            "'medsam-train preprocess DATA_DIR OUT_DIR' first and give OUT_DIR."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedSAMError(f"'{path}' cannot be read ({exc}); run the preprocessing again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MedSAMError(f"'{path}' is not a manifest written by 'medsam-train preprocess' ({FORMAT})")
    return manifest


def _entry_still_valid(entry: Optional[Dict[str, Any]], case: CaseFiles, key: str, out_dir: Path) -> bool:
    if not entry or entry.get("settings_key") != key:
        return False
    try:
        if entry.get("source") != _fingerprint(case):
            return False
    except OSError:
        return False
    if entry.get("file") is None:
        return entry.get("n_slices") == 0
    path = out_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry.get("bytes")


def _build_manifest(root: Path, settings: PreprocessSettings, cases: List[CaseFiles], entries: Dict[str, Any],
                    train: List[str], val: List[str], failed: Dict[str, str], complete: bool) -> Dict[str, Any]:
    val_set = set(val)
    ordered = {}
    for case in cases:
        if case.name in entries:
            entry = dict(entries[case.name])
            entry["split"] = "val" if case.name in val_set else "train"
            ordered[case.name] = entry
    labels = sorted({int(v) for e in ordered.values() for v in e["labels"]})
    return {
        "format": FORMAT,
        "source": str(root.resolve()),
        "complete": complete,
        "settings": settings.to_dict(),
        "settings_key": settings.key(),
        "split": {"train": train, "val": val},
        "labels": labels,
        "n_slices": {
            "train": sum(e["n_slices"] for e in ordered.values() if e["split"] == "train"),
            "val": sum(e["n_slices"] for e in ordered.values() if e["split"] == "val"),
        },
        "cases": ordered,
        "failed": failed,
    }


def preprocess_dataset(
    data_dir: Union[str, Path],
    out_dir: Union[str, Path],
    settings: Optional[PreprocessSettings] = None,
    holdout: HoldOut = None,
    workers: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PreprocessResult:
    """Preprocess every case of a FLARE22-layout folder into ``out_dir`` (see the module doc).

    Args:
        data_dir: folder with ``images/`` and ``labels/``.
        out_dir: output folder (created); holds ``<case>.npz`` and ``manifest.json``.
        settings: :class:`PreprocessSettings` (default: ``pre_CT_MR.py``'s CT rules).
        holdout: held-out cases, see :func:`split_cases`.
        workers: processes working on cases in parallel (1: in this process).
        progress: ``progress(done, total, case_name)`` after each case.
        cancel: checked between cases; a cancelled run keeps the finished cases (and records them)
            and raises :class:`~MedSAMSlicerLib.progress.Cancelled`.

    Returns:
        :class:`PreprocessResult` with the manifest and which cases were processed or skipped.

    Raises:
        MedSAMError: a missing label file (before anything is written), or, after the other cases
            are done, one error naming every case that could not be used.
    """
    from ..fileio.atomic import check_folder

    settings = settings or PreprocessSettings()
    root = Path(data_dir)
    out = check_folder(out_dir, "output folder")
    cases = find_cases(root, settings.image_suffix)
    train, val = split_cases([c.name for c in cases], holdout)
    out.mkdir(parents=True, exist_ok=True)
    key = settings.key()
    old_entries: Dict[str, Any] = {}
    if (out / MANIFEST_NAME).is_file():
        try:
            old_entries = dict(load_manifest(out).get("cases", {}))
        except MedSAMError:
            old_entries = {}
    entries: Dict[str, Any] = {}
    todo: List[CaseFiles] = []
    result = PreprocessResult(manifest={})
    for case in cases:
        if _entry_still_valid(old_entries.get(case.name), case, key, out):
            entries[case.name] = old_entries[case.name]
            result.skipped.append(case.name)
        else:
            todo.append(case)
    # Entries of cases that are still in the data but need redoing stay out of the manifest until
    # redone; their old npz (if any) is only replaced when the new one is complete.
    failed: Dict[str, str] = {}
    total = len(cases)
    done = len(entries)

    def _record(entry: Dict[str, Any]) -> None:
        nonlocal done
        entries[entry["case"]] = entry
        result.processed.append(entry["case"])
        done += 1
        write_json(out / MANIFEST_NAME, _build_manifest(root, settings, cases, entries, train, val, failed, False))
        report(progress, done, total, entry["case"])

    def _fail(case: CaseFiles, exc: Exception) -> None:
        nonlocal done
        failed[case.name] = str(exc)
        done += 1
        report(progress, done, total, f"{case.name} failed")

    report(progress, done, total, f"{len(result.skipped)} cases already done" if result.skipped else "")
    cancelled = False
    try:
        if workers <= 1 or len(todo) <= 1:
            for case in todo:
                check_cancel(cancel)
                try:
                    _record(process_case(case, settings, out))
                except MedSAMError as exc:
                    _fail(case, exc)
        else:
            _run_pool(todo, settings, out, workers, _record, _fail, cancel)
    except Cancelled:
        cancelled = True
    manifest = _build_manifest(root, settings, cases, entries, train, val, failed,
                               complete=not failed and not cancelled and len(entries) == len(cases))
    write_json(out / MANIFEST_NAME, manifest)
    result.manifest = manifest
    if cancelled:
        raise Cancelled(f"preprocessing cancelled after {len(entries)} of {len(cases)} cases")
    if failed:
        lines = "\n".join(f"  - {msg}" for msg in failed.values())
        raise MedSAMError(
            f"{len(failed)} of {len(cases)} cases could not be preprocessed (the other "
            f"{len(entries)} are done and kept; fix these and run again to finish):\n{lines}"
        )
    return result


def _run_pool(todo: List[CaseFiles], settings: PreprocessSettings, out: Path, workers: int, record, fail,
              cancel: Optional[CancelToken]) -> None:
    # "spawn": the parent may hold torch/ITK thread pools, which are not fork-safe.
    ctx = get_context("spawn")
    pending = list(todo)
    running: Dict[Future, CaseFiles] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(todo), os.cpu_count() or 1), mp_context=ctx) as pool:
        try:
            while pending or running:
                while pending and len(running) < workers and not (cancel is not None and cancel.cancelled):
                    case = pending.pop(0)
                    running[pool.submit(_process_job, (case, settings.to_dict(), str(out)))] = case
                if not running:
                    break
                finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    case = running.pop(fut)
                    try:
                        record(fut.result())
                    except MedSAMError as exc:
                        fail(case, exc)
            check_cancel(cancel)
        finally:
            for fut in running:
                fut.cancel()
