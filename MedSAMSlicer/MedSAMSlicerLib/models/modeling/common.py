"""Small building blocks shared by the encoders and the mask decoder."""

from __future__ import annotations

from typing import Type

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channel axis of a ``BxCxHxW`` tensor.

    Every pixel is normalised across its ``C`` channels (not across space), then scaled and
    shifted per channel.  The parameter names (``weight``, ``bias``) match SAM's checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxCxHxW -> BxCxHxW."""
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(dim=1, keepdim=True)
        x = centred / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them: ``lin2(act(lin1(x)))``.

    Works on any ``...xC`` tensor (the last axis is the feature axis).
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ...xC -> ...xC."""
        return self.lin2(self.act(self.lin1(x)))
