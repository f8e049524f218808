"""SAM's mask decoder: image embedding + prompt embeddings -> low-resolution mask logits."""

from __future__ import annotations

from typing import List, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts ``4h x 4w`` mask logits (256x256 for a 64x64 embedding) and IoU estimates.

    Batching: the image embeddings are either one per prompt (same batch size as the prompts,
    as MedSAM trains) or a single embedding shared by all prompts.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        """
        Args:
            transformer_dim: token width (256).
            transformer: the :class:`~.transformer.TwoWayTransformer`.
            num_multimask_outputs: masks predicted in multimask mode (3); one more token
                predicts the single-mask output.
            activation: activation of the upscaling path.
            iou_head_depth: layers of the IoU head MLP.
            iou_head_hidden_dim: hidden width of the IoU head MLP.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: Bx256xhxw, or 1x256xhxw shared by all prompts.
            image_pe: 1x256xhxw positional encoding of the embedding grid.
            sparse_prompt_embeddings: BxNx256 prompt tokens.
            dense_prompt_embeddings: Bx256xhxw.
            multimask_output: three masks (tokens 1..3) instead of the single mask (token 0).

        Returns:
            mask logits BxMx(4h)x(4w) and IoU predictions BxM, with M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        picked = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, picked, :, :], iou_pred[:, picked]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks Bx4x(4h)x(4w) and IoU predictions Bx4."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] == n:
            src = image_embeddings
        elif image_embeddings.shape[0] == 1:
            src = image_embeddings.expand(n, -1, -1, -1)
        else:
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {n} prompts: give one embedding per "
                "prompt or one shared embedding"
            )
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in_list: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)
        ]
        hyper_in = torch.stack(hyper_in_list, dim=1)  # B x tokens x C/8
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([input_dim] + hidden, hidden + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
