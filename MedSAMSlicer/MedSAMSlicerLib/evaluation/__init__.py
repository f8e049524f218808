"""``medsam-slicer evaluate``: measure the engine on labelled volumes, as a user would use it.

- :mod:`.cases`: labelled volumes (image + labelmap or ``.seg.nrrd``, FLARE22 folders,
  evaluation set files) and the shipped set (``Testing/Data/evaluation_set.toml``);
- :mod:`.runner`: the simulated user (a box on each structure's middle slice), variants of the
  engine's settings, :func:`~.runner.evaluate` -> rows;
- :mod:`.report`: CSV, summary tables (mean and worst structure), a figure;
- :mod:`.store`: embeddings kept on disk between runs.

>>> from MedSAMSlicerLib.evaluation import load_inputs, builtin_variants, evaluate
>>> rows = evaluate(load_inputs(), list(builtin_variants().values()))
"""

from .cases import Case, Structure, load_case, load_folder, load_inputs, load_set, resample_slices
from .report import format_structures, format_summary, plot, summarize, write_csv
from .run import run_evaluation
from .runner import EvaluationRow, Variant, builtin_variants, evaluate, parse_variant, setting_names

__all__ = [
    "Case", "Structure", "load_case", "load_folder", "load_inputs", "load_set", "resample_slices",
    "EvaluationRow", "Variant", "builtin_variants", "evaluate", "parse_variant", "setting_names",
    "format_structures", "format_summary", "plot", "summarize", "write_csv", "run_evaluation",
]
