"""TinyViT image encoder as used by LiteMedSAM (a MobileSAM-style variant of TinyViT).

Input ``Bx3x256x256`` in [0, 1], output ``Bx256x64x64``, the same embedding shape as MedSAM's
ViT-B so the same prompt encoder and mask decoder sit on top.  Differences from the TinyViT
paper that LiteMedSAM's weights depend on:

- the patch embedding is two 1x1 ``Conv2d_BN`` with stride 1 (no 4x downsampling): stage 0 runs
  at full 256x256 resolution;
- a patch merging whose output width is 320, 448 or 576 keeps stride 1, so stages 2 and 3 both
  run at 64x64;
- a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps to 256 channels.

Parameter names match ``lite_medsam.pth`` (``patch_embed.seq.0.c.weight``, ``layers.1.blocks.0
.attn.attention_biases``, ``layers.0.downsample.conv2.bn.running_var`` ...).

Window attention pads the token grid bottom/right with zeros to a multiple of the window and lets
the padded tokens take part as keys, as the original does (the weights were trained that way).
The attention itself runs through :func:`torch.nn.functional.scaled_dot_product_attention` with
the learned relative-position bias passed as an additive ``attn_mask``; the default SDPA scale
``1/sqrt(key_dim)`` is the original's scale, so the numbers are the original's (to float32
rounding).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

# MobileSAM's TinyViT keeps the last patch merging at stride 1 when it widens to one of these.
_STRIDE_ONE_MERGE_DIMS = (320, 448, 576)


class Conv2d_BN(nn.Sequential):
    """``Conv2d`` (no bias) followed by ``BatchNorm2d``, children named ``c`` and ``bn``."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two 1x1 ``Conv2d_BN`` with an activation between: BxCxHxW -> Bx(embed_dim)xHxW."""

    def __init__(self, in_chans: int, embed_dim: int, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 1, 1, 0),
            activation(),
            Conv2d_BN(embed_dim // 2, embed_dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project): BxCxHxW -> BxCxHxW."""

    def __init__(self, chans: int, expand_ratio: float, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2d_BN(chans, hidden, kernel_size=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, kernel_size=3, stride=1, padding=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2d_BN(hidden, chans, kernel_size=1, bn_weight_init=0.0)
        self.act3 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """Downsampling between stages: tokens or maps -> Bx(H'*W')x(out_dim) tokens.

    ``stride`` is 2, or 1 when ``out_dim`` is 320/448/576 (MobileSAM's variant).
    """

    def __init__(
        self, input_resolution: Tuple[int, int], dim: int, out_dim: int, activation: Type[nn.Module] = nn.GELU
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.stride = 1 if out_dim in _STRIDE_ONE_MERGE_DIMS else 2
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, self.stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxCxHxW, or BxLxC tokens on ``input_resolution`` -> Bx(L')x(out_dim)."""
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on a BxCxHxW map, then an optional patch merging (-> tokens)."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        out_dim: Optional[int] = None,
        downsample: bool = True,
        conv_expand_ratio: float = 4.0,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(MBConv(dim, conv_expand_ratio, activation) for _ in range(depth))
        self.downsample: Optional[PatchMerging] = (
            PatchMerging(input_resolution, dim, out_dim or dim, activation) if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class Mlp(nn.Module):
    """LayerNorm, Linear, activation, Linear on BxLxC tokens."""

    def __init__(self, in_features: int, hidden_features: int, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Multi-head attention with a learned bias per head and per relative offset (LeViT style).

    Input and output: ``BxNxC`` with ``N == resolution[0] * resolution[1]``.  The bias of query
    ``p`` on key ``p'`` is ``attention_biases[head, index(|dy|, |dx|)]``; it is gathered into a
    ``heads x N x N`` tensor and passed to SDPA as an additive mask.

    In eval mode, with autograd off, the gathered bias is cached.  The cache is keyed on the
    parameter's storage, version counter, device and dtype, so loading weights, editing
    ``attention_biases`` in place, moving the module, or switching ``train()``/``eval()`` all give
    a fresh bias; in training (or whenever autograd is on) it is gathered on every call so
    gradients reach ``attention_biases``.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: Tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.scale = key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)

        # Offsets (|dy|, |dx|) are numbered in order of first appearance when pairs (p1, p2) are
        # enumerated row-major, which is dy * w + dx: the column order of the checkpoints.
        h, w = resolution
        ys = torch.arange(h).repeat_interleave(w)
        xs = torch.arange(w).repeat(h)
        idxs = (ys[:, None] - ys[None, :]).abs() * w + (xs[:, None] - xs[None, :]).abs()
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, h * w))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)
        self._bias_cache: Optional[torch.Tensor] = None
        self._bias_cache_key: Optional[tuple] = None

    def train(self, mode: bool = True) -> Attention:
        self._bias_cache = None
        self._bias_cache_key = None
        return super().train(mode)

    def attention_bias(self) -> torch.Tensor:
        """The ``heads x N x N`` additive bias (cached in eval mode without autograd)."""
        if self.training or torch.is_grad_enabled():
            return self.attention_biases[:, self.attention_bias_idxs]
        p = self.attention_biases
        key = (p.data_ptr(), p._version, p.device, p.dtype, self.attention_bias_idxs.device)
        if self._bias_cache is None or self._bias_cache_key != key:
            self._bias_cache = p[:, self.attention_bias_idxs]
            self._bias_cache_key = key
        return self._bias_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxNxC -> BxNxC."""
        b, n, _ = x.shape
        x = self.norm(x)
        # Per head the qkv features are laid out [q (key_dim), k (key_dim), v (d)].
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B x heads x N x d
        bias = self.attention_bias().to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


def window_attention(attn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: int, w: int,
                     ws: int) -> torch.Tensor:
    """TinyViT's windowed attention: ``x`` ``(B, h*w, C)`` tokens of an ``h x w`` map, padded at
    the bottom/right to whole ``ws x ws`` windows, ``attn`` on each window's ``ws*ws`` tokens,
    unpadded -> ``(B, h*w, C)``. A map of exactly one window is attended as it is."""
    b, n, c = x.shape
    if h == ws and w == ws:
        return attn(x)
    y = x.view(b, h, w, c)
    pad_b = (ws - h % ws) % ws
    pad_r = (ws - w % ws) % ws
    if pad_b or pad_r:
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    nh, nw = hp // ws, wp // ws
    y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
    y = attn(y)
    y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
    if pad_b or pad_r:
        y = y[:, :h, :w]
    return y.reshape(b, n, c)


class TinyViTBlock(nn.Module):
    """Window attention, depthwise 3x3 ``local_conv``, then MLP, on BxLxC tokens of an HxW grid."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)
        self.local_conv = Conv2d_BN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxLxC with ``L == H*W`` -> BxLxC."""
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {n}")
        x = x + window_attention(self.attn, x, h, w, self.window_size)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """A transformer stage: TinyViT blocks, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        out_dim: Optional[int] = None,
        downsample: bool = True,
        local_conv_size: int = 3,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size, activation)
            for _ in range(depth)
        )
        self.downsample: Optional[PatchMerging] = (
            PatchMerging(input_resolution, dim, out_dim or dim, activation) if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: Bx3xSxS -> Bx(out_chans)x(S/4)x(S/4) (256 -> 64 by default)."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        activation = nn.GELU
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], activation)

        self.layers = nn.ModuleList()
        res = img_size
        for i, dim in enumerate(embed_dims):
            last = i == len(embed_dims) - 1
            out_dim = embed_dims[min(i + 1, len(embed_dims) - 1)]
            if i == 0:
                layer: nn.Module = ConvLayer(
                    dim, (res, res), depths[i], out_dim=out_dim, downsample=not last,
                    conv_expand_ratio=mbconv_expand_ratio, activation=activation,
                )
            else:
                layer = BasicLayer(
                    dim, (res, res), depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                    out_dim=out_dim, downsample=not last, local_conv_size=local_conv_size,
                    activation=activation,
                )
            self.layers.append(layer)
            if not last:
                res = res // (1 if out_dim in _STRIDE_ONE_MERGE_DIMS else 2)
        self.out_resolution = res

        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: Bx3xSxS -> Bx(out_chans)x(S/4)x(S/4)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_resolution, self.out_resolution, c).permute(0, 3, 1, 2)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0.0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.weight, 1.0)
        nn.init.constant_(m.bias, 0.0)
