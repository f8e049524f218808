"""The box-prompted segmentation model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class SamModel(nn.Module):
    """A SAM-family model used the MedSAM way: box prompt in, one mask out.

    Attributes:
        image_encoder: ``Bx3xSxS`` -> ``Bx256x64x64`` (ViT-B for MedSAM, TinyViT for LiteMedSAM).
        prompt_encoder: boxes -> prompt embeddings.
        mask_decoder: embeddings -> ``256x256`` mask logits and an IoU estimate.
        input_size: ``S``, the side of the square model input (1024 or 256).
        architecture: the registry name this model was built as ("vit_b", "tiny_vit").

    Unlike SAM's ``Sam`` there is no pixel mean/std normalisation: MedSAM and LiteMedSAM feed the
    encoder images min-max scaled to [0, 1].  State-dict keys are SAM's (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``), so official checkpoints load with ``strict=True``.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        input_size: int,
        architecture: str = "",
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = int(input_size)
        self.architecture = architecture

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.mask_decoder.iou_token.weight.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: Bx3xSxS float in [0, 1], ``S == input_size``.

        Returns:
            Bx256x64x64 embeddings.
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"expected images of shape Bx3x{self.input_size}x{self.input_size}, got {tuple(images.shape)}"
            )
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for box prompts (``multimask_output=False``, as MedSAM).

        Args:
            embeddings: Bx256x64x64 from :meth:`encode` (one per box), or 1x256x64x64 shared by
                all boxes.
            boxes: Bx4 (or Bx1x4) float boxes ``(x0, y0, x1, y1)`` in model-input pixels
                (``0 .. input_size``).

        Returns:
            ``(low_res_logits Bx1x256x256, iou Bx1)``; ``sigmoid(logits) > 0.5`` is the mask on
            the ``256x256`` grid that covers the model input.
        """
        # Embeddings from an autocast encoder may be bfloat16/float16: match the decoder's weights.
        embeddings = embeddings.to(self.mask_decoder.iou_token.weight.dtype)
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=embeddings.device)
        if boxes.ndim == 3 and boxes.shape[1] == 1:
            boxes = boxes[:, 0, :]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"expected boxes of shape Bx4, got {tuple(boxes.shape)}")
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``images`` Bx3xSxS in [0, 1], ``boxes`` Bx4 -> low-resolution logits Bx1x256x256."""
        logits, _ = self.decode(self.encode(images), boxes)
        return logits
