"""SAM's prompt encoder: boxes, points and mask prompts -> sparse and dense embeddings.

MedSAM and LiteMedSAM only use box prompts; points and masks are kept so that every parameter of
the official checkpoints has a home (strict loading) and so that callers can experiment.
Coordinates are pixels of the model input (``input_image_size``), ``(x, y)`` order.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2D positions (a fixed Gaussian projection, saved in checkpoints)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords``: ...x2 in [0, 1] -> ...x(2*num_pos_feats) (sin features, then cos)."""
        coords = 2 * coords - 1
        coords = coords.to(self.positional_encoding_gaussian_matrix.dtype) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an ``h x w`` grid: Cxhxw."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        return self._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """``coords_input``: BxNx2 pixel ``(x, y)`` in an image of ``image_size`` (h, w) -> BxNxC."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Returns sparse embeddings ``BxNx(embed_dim)`` (two tokens per box, one per point) and dense
    embeddings ``Bx(embed_dim)xhxw`` (the learned "no mask" embedding, or an encoded mask).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            embed_dim: prompt embedding width (256).
            image_embedding_size: ``(h, w)`` of the image embedding (64, 64).
            input_image_size: ``(H, W)`` of the model input (1024 for MedSAM, 256 for LiteMedSAM).
            mask_in_chans: hidden channels of the mask-prompt encoder.
            activation: activation of the mask-prompt encoder.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: 1x(embed_dim)xhxw."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``points``: BxNx2 pixels, ``labels``: BxN (1 positive, 0 negative, -1 padding) -> BxNxC."""
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
            labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        emb[labels == -1] = 0.0
        emb[labels == -1] += self.not_a_point_embed.weight
        emb[labels == 0] += self.point_embeddings[0].weight
        emb[labels == 1] += self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes``: Bx4 or Bx1x4 ``(x0, y0, x1, y1)`` pixels -> Bx2xC (one token per corner)."""
        boxes = boxes + 0.5  # pixel centres
        corners = boxes.reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        emb[:, 0, :] += self.point_embeddings[2].weight
        emb[:, 1, :] += self.point_embeddings[3].weight
        return emb

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed the given prompts (any of them may be ``None``).

        Args:
            points: ``(coords BxNx2, labels BxN)`` in input pixels, or ``None``.
            boxes: ``Bx4`` (or ``Bx1x4``) boxes ``(x0, y0, x1, y1)`` in input pixels, or ``None``.
            masks: ``Bx1x(4h)x(4w)`` mask logits (256x256), or ``None``.

        Returns:
            sparse ``BxNx(embed_dim)`` and dense ``Bx(embed_dim)xhxw`` embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.point_embeddings[0].weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense
