"""Simulate a user on labelled volumes and measure what the engine gives.

For each structure the box is the label's bounding box on the middle slice of its extent
(LiteMedSAM's ``z_mid = int((z1 - z0) / 2 + z0)``; the nearest labelled slice when that one is
empty), grown by ``box_margin`` pixels. Each structure is then segmented in two modes:

- ``3d``: with the true z-range (a 3D box: the propagation stays within the label's extent);
- ``2d``: the 2D box alone, the extent found automatically (the stop rule);
- ``per-slice`` (on request): no propagation; every labelled slice gets the label's own box
  there, as MedSAM's papers and the CVPR 2024 challenge evaluate, and as a user who corrected
  every slice would get. It measures what box prompts can give at best with this model and
  window, the ceiling of propagation and of the annotator's corrections;
- ``per-part`` (on request): the same with one box around each piece (8-connected) of the label
  on each slice, the masks joined: a structure in several pieces (the iliac arteries below the
  bifurcation, bowel loops) boxed as a user would box each piece.

and for each *variant*: a named :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationSettings` (plus
an optional intensity window), so alternatives are compared in one run on one embedding cache:
each slice is encoded once per window and preprocessing, whatever the number of variants.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MedSAMError
from ..metrics import dice, surface_dice, z_extent
from ..segmentation.propagation import PropagationSettings, StopRule
from .cases import Case, Structure, labelled_slices

#: ``3d``: the true z-range; ``2d``: automatic extent; ``per-slice``: the label's box on every
#: labelled slice, no propagation (MedSAM's own 2D evaluation; the most box prompts give);
#: ``per-part``: the same with one box per piece of the label on each slice.
PER_SLICE = "per-slice"
PER_PART = "per-part"
#: The annotator's loop (:mod:`.loop`): its rows are ``loop-0`` (the first box, automatic extent)
#: to ``loop-N`` (after N corrections of the worst slice).
LOOP = "loop"
MODES = ("3d", "2d", PER_SLICE, PER_PART, LOOP)
#: Corrections the loop makes at most, unless told (``--corrections``).
DEFAULT_CORRECTIONS = 3


@dataclass(frozen=True)
class Variant:
    """A named way of running the engine.

    Attributes:
        name: its name in reports.
        settings: the propagation settings.
        window: intensity window name (``None``/``"auto"``: automatic), a preset name,
            ``"LEVEL,WIDTH"``, or ``"box"`` / ``"box:GROW"``: per structure, from the intensities
            around its box grown by GROW (0.5) times its size
            (:meth:`~MedSAMSlicerLib.segmentation.preprocessing.Window.around_box`).
        enlarge: how LiteMedSAM enlarges slices smaller than its input: ``None``/``"area"``
            (OpenCV's area interpolation, as LiteMedSAM) or ``"cubic"`` (cubic spline, as MedSAM's
            preprocessing); see :func:`~MedSAMSlicerLib.segmentation.preprocessing.prepare_litemedsam`.
    """

    name: str
    settings: PropagationSettings = dataclasses.field(default_factory=PropagationSettings)
    window: Optional[str] = None
    enlarge: Optional[str] = None

    def preprocessing(self, model_method: str) -> str:
        """The slice preprocessing this variant runs for a model whose own is ``model_method``
        (MedSAM's already enlarges with cubic splines)."""
        if self.enlarge is not None and model_method not in ("litemedsam", "medsam"):
            raise MedSAMError(f"enlarge={self.enlarge} applies to LiteMedSAM and MedSAM; this model's preprocessing is "
                              f"{model_method} (its own resizing)")
        if self.enlarge == "cubic" and model_method == "litemedsam":
            return "litemedsam-cubic"
        if self.enlarge == "area" and model_method != "litemedsam":
            raise MedSAMError(f"enlarge=area applies to LiteMedSAM; this model's preprocessing is {model_method}")
        return model_method


#: The values of :attr:`Variant.enlarge`.
ENLARGE = ("area", "cubic")


def builtin_variants() -> Dict[str, Variant]:
    """``default``: the engine's defaults. ``original``: LiteMedSAM's own 3D algorithm on the same
    boxes (no wider box; no stop rule, so without a z-range it runs to the volume's ends)."""
    return {
        "default": Variant("default"),
        "original": Variant("original", PropagationSettings.original()),
    }


def setting_names() -> List[str]:
    """Every name ``--set`` accepts: the fields of :class:`PropagationSettings`, ``stop.<field>``
    for :class:`StopRule`, ``window`` and ``enlarge``."""
    names = [f.name for f in dataclasses.fields(PropagationSettings) if f.name != "stop"]
    names += [f"stop.{f.name}" for f in dataclasses.fields(StopRule)]
    return names + ["window", "enlarge"]


def _parse_value(text: str, current: object, key: str) -> object:
    raw = text.strip()
    if isinstance(current, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise MedSAMError(f"{key} takes true or false; got '{text}'")
    if raw.lower() == "none":
        return None
    try:
        if isinstance(current, int):
            return int(raw)
        return float(raw)
    except ValueError:
        raise MedSAMError(f"{key} takes a number; got '{text}'") from None


def apply_assignments(variant: Variant, assignments: Sequence[str]) -> Variant:
    """``variant`` with ``key=value`` assignments applied (names from :func:`setting_names`)."""
    settings, window, enlarge = variant.settings, variant.window, variant.enlarge
    stop_fields = {f.name for f in dataclasses.fields(StopRule)}
    top_fields = {f.name for f in dataclasses.fields(PropagationSettings)} - {"stop"}
    for item in assignments:
        if "=" not in item:
            raise MedSAMError(f"a setting is key=value; got '{item}' (settings: {', '.join(setting_names())})")
        key, value = (part.strip() for part in item.split("=", 1))
        if key == "window":
            window = value
        elif key == "enlarge":
            if value not in ENLARGE:
                raise MedSAMError(f"enlarge is {' or '.join(ENLARGE)}; got '{value}'")
            enlarge = value
        elif key.startswith("stop.") and key[5:] in stop_fields:
            field = key[5:]
            stop = settings.stop
            stop = dataclasses.replace(stop, **{field: _parse_value(value, getattr(stop, field), key)})
            settings = dataclasses.replace(settings, stop=stop)
        elif key in top_fields:
            current = getattr(settings, key)
            if current is None:  # optional numbers (margin)
                current = 0.0
            settings = dataclasses.replace(settings, **{key: _parse_value(value, current, key)})
        else:
            raise MedSAMError(f"unknown setting '{key}'; settings: {', '.join(setting_names())}")
    return Variant(variant.name, settings, window, enlarge)


def parse_variant(tokens: Sequence[str]) -> Variant:
    """A variant from ``NAME [key=value ...]``: a built-in name alone, or any new name with
    assignments on top of the defaults (``BUILTIN key=value`` starts from that built-in)."""
    if not tokens:
        raise MedSAMError("a variant needs a name")
    name, *assignments = tokens
    if "=" in name:
        raise MedSAMError(f"a variant starts with its name, then key=value settings; got '{name}' first")
    builtins = builtin_variants()
    base = builtins.get(name, Variant(name))
    if name not in builtins and not assignments:
        raise MedSAMError(f"unknown variant '{name}': built-in variants are {', '.join(builtins)}; "
                          "a new one needs key=value settings")
    return apply_assignments(Variant(name, base.settings, base.window, base.enlarge), assignments)


@dataclass
class EvaluationRow:
    """One structure, one variant, one mode.

    ``slices_true``/``slices_found`` count the labelled / segmented slices; ``z_true``/``z_found``
    are their ``first-last`` slice indices; ``seconds`` is the wall time of the segmentation
    (the first variant to reach a slice also pays for encoding it: ``encoded`` slices). When both
    modes run, they share one walk; its time is shared out by the slices each mode predicted.
    """

    case: str
    structure: str
    variant: str
    mode: str
    dice: float
    nsd: float
    tolerance_mm: float
    slices_true: int
    slices_found: int
    z_true: str
    z_found: str
    box_slice: int
    box: str
    seconds: float
    encoded: int
    stopped: str
    mean_score: float = float("nan")
    #: ``loop-K`` rows: the slices fixed so far, ``"Z box"`` / ``"Z erase"``, in order (``;``-separated).
    corrected: str = ""

    @property
    def key(self) -> Tuple[str, str]:
        """``(case, structure)``."""
        return (self.case, self.structure)


def label_box(slice_mask: np.ndarray, margin: int = 0) -> Tuple[int, int, int, int]:
    """The box a user draws around a structure on one slice: the bounding box ``(x0, y0, x1, y1)``
    of the ``(H, W)`` label, grown by ``margin`` pixels, clipped to the slice, and at least two
    pixels wide and high (a label one pixel across still gets a box the model accepts)."""
    ys, xs = np.nonzero(slice_mask)
    if not len(xs):
        raise MedSAMError("the structure is empty on this slice")
    h, w = slice_mask.shape

    def side(lo: int, hi: int, size: int) -> Tuple[int, int]:
        lo, hi = max(0, lo - margin), min(size - 1, hi + margin)
        if hi > lo:
            return lo, hi
        return (lo, lo + 1) if lo + 1 < size else (lo - 1, lo)

    x0, x1 = side(int(xs.min()), int(xs.max()), w)
    y0, y1 = side(int(ys.min()), int(ys.max()), h)
    return x0, y0, x1, y1


def label_pieces(slice_mask: np.ndarray) -> List[np.ndarray]:
    """The pieces of a ``(H, W)`` label on one slice, as a user boxes them one by one: its
    8-connected components, largest first (the ``per-part`` mode and the simulated user's
    corrections)."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(slice_mask, structure=np.ones((3, 3), bool))
    return sorted((labels == i for i in range(1, n + 1)), key=lambda p: -int(p.sum()))


def simulated_box(mask_zyx: np.ndarray, margin: int = 0) -> Tuple[int, Tuple[int, int, int, int], Tuple[int, int]]:
    """The user's box for a structure: ``(z, (x0, y0, x1, y1), (z_first, z_last))``.

    ``z`` is the middle slice of the label's extent as LiteMedSAM computes it (or the nearest
    labelled slice if that one is empty); the box is :func:`label_box` there.
    """
    extent = z_extent(mask_zyx)
    if extent is None:
        raise MedSAMError("the structure is empty: none of its label values is in the labelmap")
    z0, z1 = extent
    z = int((z1 - z0) / 2 + z0)
    labelled = np.nonzero(mask_zyx.any(axis=(1, 2)))[0]
    if not mask_zyx[z].any():
        z = int(labelled[np.argmin(np.abs(labelled - z))])
    return z, label_box(mask_zyx[z], margin), (z0, z1)


def _fmt_extent(extent: Optional[Tuple[int, int]]) -> str:
    return "-" if extent is None else f"{extent[0]}-{extent[1]}"


def evaluate(
    cases: Sequence[Case],
    variants: Sequence[Variant],
    segmenter=None,
    modes: Sequence[str] = MODES,
    box_margin: int = 0,
    include: Optional[Callable[[Case, Structure], bool]] = None,
    embedding_store=None,
    log: Optional[Callable[[str], None]] = None,
    on_row: Optional[Callable[[EvaluationRow], None]] = None,
    corrections: int = DEFAULT_CORRECTIONS,
) -> List[EvaluationRow]:
    """Segment every structure of ``cases`` with every variant in every mode; measure each.

    Args:
        cases: the labelled volumes (:mod:`.cases`).
        variants: what to compare (:func:`builtin_variants`, :func:`parse_variant`).
        segmenter: a loaded :class:`~MedSAMSlicerLib.segmenter.Segmenter` (LiteMedSAM on the
            CPU when ``None``); its embedding cache is shared by all variants and modes.
        modes: some of :data:`MODES`: ``"3d"`` (true z-range), ``"2d"`` (automatic extent),
            ``"per-slice"`` / ``"per-part"`` (the label's box on every labelled slice, or around
            each piece of it; of a variant's settings only its window and enlargement apply),
            ``"loop"`` (the simulated annotator: the first box, then up to ``corrections`` fixes of
            the worst slice; rows ``loop-0`` .. ``loop-N``, a structure with nothing left to fix keeps
            its last result in the later rows).
        box_margin: pixels added around the label's box on its middle slice.
        include: ``include(case, structure)`` picks structures (all when ``None``).
        embedding_store: an :class:`~.store.EmbeddingStore` to reuse embeddings across runs.
        log: called with one line per structure.
        on_row: called with each row as soon as it is measured (e.g. to write it at once).
        corrections: the loop's corrections at most (``"loop"`` mode).

    Returns:
        One :class:`EvaluationRow` per structure, variant and mode, in that nesting order
        within each case.
    """
    from ..models.registry import get_spec
    from ..segmentation.preprocessing import Window, resolve_window
    from ..segmenter import Segmenter

    check_modes(modes, corrections)
    if not variants:
        raise MedSAMError("nothing to evaluate: give at least one variant")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise MedSAMError(f"variant names must differ; got {', '.join(names)}")
    for case in cases:  # before any model loads: every structure to measure has voxels
        for structure in case.structures:
            if (include is None or include(case, structure)) and not case.mask(structure).any():
                raise MedSAMError(f"{case.name}/{structure.name} is empty: none of its label value(s) "
                                  f"{', '.join(map(str, structure.labels))} is in its labels ({case.source})")
    check_model_fits(segmenter.spec if segmenter is not None else get_spec("litemedsam"), variants,
                     embedding_store is not None)
    seg = segmenter if segmenter is not None else Segmenter("litemedsam", device="cpu")
    rows: List[EvaluationRow] = []
    for case in cases:
        structures = [s for s in case.structures if include is None or include(case, s)]
        if not structures:
            continue
        windows = {v.name: None if _box_grow(v.window) is not None else resolve_window(window_arg(v.window), case.image)
                   for v in variants}
        loaded: Optional[Tuple] = None
        for structure in structures:
            ref = case.mask(structure)
            try:
                z, box, z_range = simulated_box(ref, box_margin)
            except MedSAMError as exc:
                raise MedSAMError(f"{case.name}/{structure.name} (label(s) {', '.join(map(str, structure.labels))} of "
                                  f"{case.source}): {exc}") from None
            for variant in variants:
                # window=box: from the intensities around this structure's box (Window.around_box).
                window = windows[variant.name] or Window.around_box(case.image, z, box, _box_grow(variant.window))
                seg.predictor.method = variant.preprocessing(seg.spec.preprocessing)  # part of every cache key
                if loaded != (case.name, window):
                    if embedding_store is not None and loaded is not None:
                        embedding_store.save(seg.predictor)
                    seg.set_volume(case.image, window)  # keyed by content: shared with other users
                    if embedding_store is not None:
                        embedding_store.load(seg.predictor)
                    loaded = (case.name, window)
                for mode, result, seconds, encoded, corrected in _run_modes(
                        seg, z, box, z_range, modes, variant.settings, ref, box_margin, corrections):
                    row = EvaluationRow(
                        case=case.name, structure=structure.name, variant=variant.name, mode=mode,
                        dice=dice(result.mask, ref),
                        nsd=surface_dice(result.mask, ref, case.spacing, structure.tolerance_mm),
                        tolerance_mm=structure.tolerance_mm,
                        slices_true=labelled_slices(ref), slices_found=labelled_slices(result.mask),
                        z_true=_fmt_extent(z_range), z_found=_fmt_extent(result.z_extent),
                        box_slice=z, box=" ".join(str(v) for v in box), seconds=seconds,
                        encoded=encoded,
                        stopped="; ".join(f"{k}: {v}" for k, v in result.stop_reasons.items()),
                        mean_score=mean([s.score for s in result.slices if np.isfinite(s.score)]),
                        corrected=corrected,
                    )
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    if log is not None:
                        log(f"{case.name}/{structure.name} [{variant.name}, {mode}] Dice {row.dice:.3f} NSD {row.nsd:.3f} "
                            f"slices {row.z_found} (true {row.z_true}) {seconds:.1f} s")
            if embedding_store is not None:
                embedding_store.save(seg.predictor)  # after each structure: an interrupted run keeps its work
        if embedding_store is not None:
            embedding_store.save(seg.predictor)
    return rows


def check_model_fits(spec, variants: Sequence[Variant], embedding_store: bool = False) -> None:
    """Before a model loads: every variant applies to the model ``spec``
    (:class:`~MedSAMSlicerLib.models.registry.ModelSpec`): its slice enlargement
    (:meth:`Variant.preprocessing`) and its propagation settings (a memory model, MedSAM2, takes
    only the defaults and the window: :func:`~MedSAMSlicerLib.segmenter.check_box_settings`); and an
    on-disk embedding store (:mod:`.store`) is asked for only where the model keeps one embedding per
    slice (box propagation). Raises :class:`MedSAMError` naming the variant or option."""
    from ..segmenter import check_box_settings

    for variant in variants:
        try:
            variant.preprocessing(spec.preprocessing)
        except MedSAMError as exc:
            raise MedSAMError(f"variant '{variant.name}': {exc}") from None
        check_box_settings(spec, variant.settings, what=f"variant '{variant.name}'")
    if embedding_store and spec.propagation != "box":
        raise MedSAMError(f"--embedding-cache keeps LiteMedSAM and MedSAM slice embeddings; {spec.title}'s SAM 2 "
                          "features are kept in memory for the run only: leave --embedding-cache out")


def check_modes(modes: Sequence[str], corrections: int = DEFAULT_CORRECTIONS) -> None:
    """Raise :class:`MedSAMError` unless ``modes`` are some of :data:`MODES` and ``corrections``
    (the loop's) a whole number from 0 to 50."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise MedSAMError(f"modes are some of {', '.join(MODES)}; got {', '.join(modes) or 'none'}")
    if isinstance(corrections, bool) or not isinstance(corrections, int) or not 0 <= corrections <= 50:
        raise MedSAMError(f"--corrections must be a whole number from 0 to 50; got {corrections!r}")


def _run_modes(seg, z: int, box, z_range: Tuple[int, int], modes: Sequence[str], settings: PropagationSettings,
               ref: np.ndarray, box_margin: int, corrections: int = DEFAULT_CORRECTIONS):
    """``(mode, result, seconds, slices encoded, slices corrected)`` per mode (``loop``: one per
    step, ``loop-0`` .. ``loop-N``). Every mode goes through the :class:`~MedSAMSlicerLib.segmenter.Segmenter`'s
    own methods (``segment_3d``, ``segment_slice``, ``correct``), so each model runs its own way
    (MedSAM2: SAM 2's memory). With box propagation ``3d`` and ``2d`` come from one walk
    (:func:`~MedSAMSlicerLib.segmentation.propagation.propagate_both`, the same masks as two runs); its time
    and encoding are shared out in proportion to the slices each mode predicted. A memory model
    runs the two modes one after the other (the second reuses the slices' features)."""
    from ..segmentation.propagation import propagate_both
    from .loop import loop_steps  # the loop builds on this module

    out = []
    walk = [m for m in modes if m in ("3d", "2d")]
    if len(walk) == 1 or seg.spec.propagation != "box":
        for mode in walk:
            before, t0 = seg.predictor.encoded_slices, time.perf_counter()
            result = seg.segment_3d(z, box, z_range=z_range if mode == "3d" else None, settings=settings)
            out.append((mode, result, time.perf_counter() - t0, seg.predictor.encoded_slices - before, ""))
    elif walk:
        before, t0 = seg.predictor.encoded_slices, time.perf_counter()
        ranged, auto = propagate_both(seg.predictor, z, box, z_range, settings=settings)
        seconds, encoded = time.perf_counter() - t0, seg.predictor.encoded_slices - before
        walked = len({r.z for r in ranged.slices} | {r.z for r in auto.slices})
        for mode in walk:
            result = ranged if mode == "3d" else auto
            share = len(result.slices) / max(1, walked)
            out.append((mode, result, seconds * share, int(round(encoded * share)), ""))
    for mode in (PER_SLICE, PER_PART):
        if mode in modes:
            before = seg.predictor.encoded_slices
            t0 = time.perf_counter()
            result = per_slice(seg, ref, box_margin, parts=mode == PER_PART)
            out.append((mode, result, time.perf_counter() - t0, seg.predictor.encoded_slices - before, ""))
    if LOOP in modes:
        fixed: List[str] = []
        step = None
        for step in loop_steps(seg, ref, corrections, settings, start=(z, box)):
            fixed += [step.corrected] if step.corrected else []
            out.append((f"{LOOP}-{step.corrections}", step.result, step.seconds, step.encoded, "; ".join(fixed)))
        for k in range(step.corrections + 1, corrections + 1):  # nothing left to fix: the result stays
            out.append((f"{LOOP}-{k}", step.result, 0.0, 0, "; ".join(fixed + ["nothing to fix"])))
    return out


def per_slice(seg, ref: np.ndarray, box_margin: int = 0, parts: bool = False):
    """Each labelled slice of ``ref`` ``(z, y, x)`` predicted alone from the label's box there
    (:func:`label_box`) by the :class:`~MedSAMSlicerLib.segmenter.Segmenter` ``seg``'s
    ``segment_slice`` (its 2D, as the first slice of a propagation or a box correction is): the
    ``per-slice`` mode; with ``parts``, one box per 8-connected piece of the label on the slice and
    the masks joined (``per-part``). Returns a
    :class:`~MedSAMSlicerLib.segmentation.propagation.PropagationResult` with one record per slice (the
    score of its largest piece's box with ``parts``: the predicted IoU, MedSAM2's object presence)."""
    from ..segmentation.predictor import SliceResult
    from ..segmentation.propagation import PropagationResult, slice_record

    zs = [int(z) for z in np.flatnonzero(ref.any(axis=(1, 2)))]
    seg.predictor.encode(zs)
    mask = np.zeros(ref.shape, dtype=bool)
    records = []
    for z in zs:
        pieces = label_pieces(ref[z]) if parts else [ref[z]]
        results = [seg.segment_slice(z, label_box(p, box_margin)) for p in pieces]
        mask[z] = np.logical_or.reduce([r.mask for r in results])
        result = SliceResult(mask=mask[z], score=results[0].score, box_model=results[0].box_model)
        records.append(slice_record(z, result, seg.predictor.volume[z], reason="label box"))
    return PropagationResult(mask=mask, z_extent=z_extent(mask), slices=records)


def _box_grow(window: Optional[str]) -> Optional[float]:
    """``"box"`` -> 0.5, ``"box:G"`` -> G (how far the box is grown), anything else -> ``None``."""
    if window is None or not window.lower().startswith("box"):
        return None
    _, _, grow = window.partition(":")
    try:
        return float(grow) if grow else 0.5
    except ValueError:
        raise MedSAMError(f"window=box takes box or box:GROW (e.g. box:0.5); got '{window}'") from None


def window_arg(window: Optional[str]) -> Union[None, str, Tuple[float, float]]:
    """A :class:`Variant`'s ``window`` text as :func:`~MedSAMSlicerLib.segmentation.preprocessing.resolve_window`
    takes it: ``None`` (automatic), a preset name or ``(level, width)`` from ``"LEVEL,WIDTH"``."""
    if window is None or window.lower() == "auto":
        return None
    if "," in window:
        parts = window.split(",")
        try:
            return (float(parts[0]), float(parts[1]))
        except (ValueError, IndexError):
            raise MedSAMError(f"a window is a preset name or LEVEL,WIDTH; got '{window}'") from None
    return window


def rows_by(rows: Sequence[EvaluationRow], variant: str, mode: str) -> Dict[Tuple[str, str], EvaluationRow]:
    """The rows of one variant and mode, keyed by ``(case, structure)``."""
    return {r.key: r for r in rows if r.variant == variant and r.mode == mode}


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for none)."""
    return float(np.mean(values)) if len(values) else float("nan")


def compare(rows: Sequence[EvaluationRow], a: str, b: str, mode: str) -> Mapping[Tuple[str, str], float]:
    """Dice of variant ``a`` minus variant ``b`` per structure, in ``mode``."""
    ra, rb = rows_by(rows, a, mode), rows_by(rows, b, mode)
    return {k: ra[k].dice - rb[k].dice for k in ra if k in rb}
