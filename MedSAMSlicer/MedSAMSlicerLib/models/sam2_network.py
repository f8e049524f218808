"""MedSAM2's network, built by Meta's ``sam2`` package (PyPI ``sam2==1.1.0``), not a copy: SAM 2.1
tiny at 512 px with MedSAM2's changes, its video predictor with a per-slice feature cache, and SAM
2's hole filling on the CPU where the package's CUDA extension is absent.

The propagation, windowing and frames that use it are :mod:`MedSAMSlicerLib.segmentation.medsam2`,
whose docstring says what follows MedSAM2's repository and where. This module is the models
layer's part (what :mod:`.modeling.build` and the checkpoint loader need), so that nothing below
the segmentation layer imports it.
"""

from __future__ import annotations

import sys
import types
from collections import OrderedDict
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..errors import MedSAMError

#: The official package, as installed by ``pip install "medsam-slicer[medsam2]"`` (see the Makefile).
SAM2_REQUIREMENT = "sam2==1.1.0"
INSTALL_HINT = (f"MedSAM2 needs Meta's `sam2` package: `SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
                f"{SAM2_REQUIREMENT}` (--no-build-isolation keeps your torch; without it pip downloads another "
                "torch to build it)")
#: The package's SAM 2.1 tiny config, which MedSAM2's ``sam2.1_hiera_t512.yaml`` copies.
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
#: MedSAM2's differences from it (``sam2/configs/sam2.1_hiera_t512.yaml``).
MEDSAM2_CONFIG_OVERRIDES = (
    "++model.image_size=512",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)
#: MedSAM2's builder's post-processing (``build_sam.build_sam2_video_predictor_npz``).
MEDSAM2_POSTPROCESSING = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)
INPUT_SIZE = 512
#: ``medsam2_infer_3D_CT.py``: ImageNet mean and std, as float32 tensors.
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
#: What the record's score means for MedSAM2 (:class:`~MedSAMSlicerLib.segmentation.propagation.SliceRecord`).
SCORE_MEANING = "the model's probability that the structure is on the slice (sigmoid of SAM 2's object score)"


def _import_sam2():
    try:
        import sam2  # noqa: F401  (initialises hydra with the package's configs)
        from sam2 import sam2_video_predictor_legacy
    except ImportError:
        raise MedSAMError(INSTALL_HINT) from None
    return sam2_video_predictor_legacy


# -- the package's hole filling, on the CPU --------------------------------------------------------
def connected_components_8(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``sam2._C.get_connected_componnets`` computes, on the CPU: for ``(N, 1, H, W)`` binary
    masks, ``(labels, counts)`` of the same shape: a component label (> 0) per foreground pixel
    (8-connectivity) and the area of its component; 0 on the background."""
    from scipy import ndimage as ndi

    m = mask.detach().to("cpu", torch.uint8).numpy().astype(bool)
    labels = np.zeros(m.shape, dtype=np.int32)
    counts = np.zeros(m.shape, dtype=np.int32)
    for i in range(m.shape[0]):
        lab, n = ndi.label(m[i, 0], structure=np.ones((3, 3), bool))
        if n:
            areas = np.bincount(lab.ravel()).astype(np.int32)
            areas[0] = 0
            labels[i, 0] = lab
            counts[i, 0] = areas[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def install_cpu_holes() -> bool:
    """Give the ``sam2`` package :func:`connected_components_8` as ``sam2._C`` when its compiled
    CUDA extension is absent (the PyPI build without CUDA), so that ``fill_hole_area`` (MedSAM2's
    8 px) fills holes as on MedSAM2's GPUs instead of being skipped. Returns whether it did."""
    try:
        from sam2 import _C  # noqa: F401
        return False
    except ImportError:
        pass
    module = types.ModuleType("sam2._C")
    module.get_connected_componnets = connected_components_8  # the package's spelling
    module.__doc__ = "MedSAMSlicerLib.segmentation.medsam2: the CPU stand-in for sam2's CUDA connected components"
    sys.modules["sam2._C"] = module
    import sam2

    sam2._C = module
    return True


def _quiet_tqdm(iterable=None, *args, **kwargs):
    return iterable


# -- the predictor ------------------------------------------------------------------------------
_CLASS = None


def predictor_class():
    """The package's legacy video predictor with MedSAM2's ``init_state(images, video_height,
    video_width)`` and a per-slice feature cache (:class:`FeatureCache`, optional per state)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    legacy = _import_sam2()
    install_cpu_holes()
    legacy.tqdm = _quiet_tqdm  # our progress callbacks report propagation; no bar on stderr

    class MedSAM2VideoPredictor(legacy.SAM2VideoPredictor):
        """``sam2.sam2_video_predictor_legacy.SAM2VideoPredictor`` as MedSAM2 uses it."""

        @torch.inference_mode()
        def init_state(self, images, video_height, video_width, features=None):
            """MedSAM2's ``SAM2VideoPredictorNPZ.init_state``: the state of the package's
            ``init_state`` for frames already prepared (``images[i]``: ``(3, 512, 512)``), the
            original slice size, and optionally a :class:`FeatureCache` keyed by frame index.
            The package's warm-up encoding of frame 0 is left out (it only fills the cache)."""
            device = self.device
            state: Dict[str, Any] = {
                "images": images, "num_frames": len(images), "offload_video_to_cpu": False,
                "offload_state_to_cpu": False, "video_height": int(video_height), "video_width": int(video_width),
                "device": device, "storage_device": device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
                "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(),
                "obj_idx_to_id": OrderedDict(), "obj_ids": [],
                "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                "output_dict_per_obj": {}, "temp_output_dict_per_obj": {},
                "consolidated_frame_inds": {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()},
                "tracking_has_started": False, "frames_already_tracked": {},
            }
            if features is not None:
                state["feature_cache"] = features
            return state

        def _get_image_feature(self, inference_state, frame_idx, batch_size):
            cache = inference_state.get("feature_cache")
            if cache is not None and frame_idx not in inference_state["cached_features"]:
                backbone_out = cache.get(frame_idx)
                if backbone_out is None:
                    image = inference_state["images"][frame_idx].to(inference_state["device"]).float().unsqueeze(0)
                    backbone_out = cache.put(frame_idx, self.forward_image(image))
                # The package caches the last frame as (image, features); the image is only expanded
                # and returned, never read, by the callers of this method.
                inference_state["cached_features"] = {frame_idx: (_NO_IMAGE, backbone_out)}
            return super()._get_image_feature(inference_state, frame_idx, batch_size)

    _CLASS = MedSAM2VideoPredictor
    return _CLASS


_NO_IMAGE = torch.zeros(1, 0, 0, 0)


def build_medsam2(postprocessing: bool = True, image_size: int = INPUT_SIZE) -> torch.nn.Module:
    """A randomly initialised MedSAM2 network (the package's SAM 2.1 tiny at 512 px, MedSAM2's
    post-processing), as MedSAM2's video predictor, in eval mode on the CPU. Its ``state_dict``
    has the keys of MedSAM2's checkpoints (``MedSAM2_latest.pt`` holds ``{"model": state_dict}``).

    ``image_size`` (a multiple of 32) builds the same network for smaller frames (the memory
    attention's RoPE grid follows: ``image_size / 16``); the weights do not depend on it. MedSAM2
    is 512; the tests use 128 to run the same code 16 times faster.

    Raises:
        MedSAMError: the ``sam2`` package is not installed (the message says how to install it).
    """
    cls = predictor_class()
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides = [f"++model._target_={cls.__module__}.predictor_class_target"]
    side = int(image_size)
    if side % 32:
        raise MedSAMError(f"MedSAM2's image size must be a multiple of 32; got {image_size}")
    grid = f"[{side // 16},{side // 16}]"
    overrides += [o.replace("=512", f"={side}").replace("=[32,32]", f"={grid}") for o in MEDSAM2_CONFIG_OVERRIDES]
    overrides += list(MEDSAM2_POSTPROCESSING) if postprocessing else []
    cfg = compose(config_name=SAM2_CONFIG, overrides=overrides)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    model.architecture = "hiera_t512"
    model.input_size = side
    return model.eval()


def predictor_class_target(**kwargs):
    """Hydra's ``_target_`` for :func:`build_medsam2` (the class is made when ``sam2`` imports)."""
    return predictor_class()(**kwargs)
