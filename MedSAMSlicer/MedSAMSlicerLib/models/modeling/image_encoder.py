"""SAM's ViT image encoder (the MedSAM ViT-B backbone).

A plain ViT over 16x16 patches with windowed attention in most blocks and global attention in a
few, decomposed relative position embeddings (MViTv2) added to the attention logits, and a
convolutional neck that maps the 64x64 token grid to a ``Bx256x64x64`` embedding.  Parameter
names match SAM / MedSAM checkpoints (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.qkv``,
``blocks.N.attn.rel_pos_h`` ..., ``neck.0`` ... ``neck.3``).

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA).  The
relative position term is folded into the query/key dot product instead of being materialised as
an ``NxN`` additive mask:

    logits[i, j] = scale * q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]
                 = [scale * q_i, rel_h[i, :], rel_w[i, :]] . [k_j, onehot(row(j)), onehot(col(j))]

so SDPA gets queries and keys widened by ``kh + kw`` features (zero-padded to a multiple of 8)
and ``scale=1``.  The one-hot products are exact (x*1, x*0), so this is SAM's
``attn = (q * scale) @ k.T + rel_h + rel_w`` term for term; on the CPU the whole encoder matches
segment-anything to float32 rounding (the tests check <= 1e-4 and measure 0).  Unlike an additive
``attn_mask`` it does not need a ``B*heads x 4096 x 4096`` bias tensor in the global blocks, so SDPA
is free to pick a kernel that never materialises the logits.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    """ViT image encoder: ``BxCxSxS`` image -> ``Bx(out_chans)x(S/patch)x(S/patch)`` embedding.

    With the defaults (SAM ViT-B) a ``Bx3x1024x1024`` image gives a ``Bx256x64x64`` embedding.
    No pixel normalisation happens here: MedSAM feeds images scaled to [0, 1].
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        """
        Args:
            img_size: side of the square input image.
            patch_size: side of a patch (the stride of the patch embedding).
            in_chans: image channels.
            embed_dim: token width.
            depth: number of transformer blocks.
            num_heads: attention heads per block.
            mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
            out_chans: channels of the output embedding (the neck's width).
            qkv_bias: whether the qkv projection has a bias.
            norm_eps: epsilon of the blocks' LayerNorms.
            act_layer: MLP activation.
            use_abs_pos: add a learned absolute position embedding to the patch tokens.
            use_rel_pos: add decomposed relative position embeddings to the attention logits.
            window_size: window side for windowed blocks.
            global_attn_indexes: indexes of the blocks that attend globally.
        """
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxCxSxS image -> Bx(out_chans)x(S/patch)x(S/patch) embedding."""
        x = self.patch_embed(x)  # B x h x w x C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: BxCxHxW -> Bx(H/p)x(W/p)xD (channels last)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on a ``BxHxWxC`` token grid, windowed or global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: Tuple[int, int] = (64, 64),
    ) -> None:
        """``window_size == 0`` means global attention over the whole ``input_size`` grid."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxHxWxC -> BxHxWxC."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention on a ``BxHxWxC`` grid with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is needed for relative position embeddings")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxHxWxC -> BxHxWxC."""
        b, h, w, c = x.shape
        n = h * w
        # B x N x 3 x heads x d -> 3 x B x heads x N x d
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            keys_h, keys_w = _key_one_hots((h, w), dtype=q.dtype, device=q.device)
            # Zero features up to a multiple of 8 (what fused kernels like) add nothing to q.k.
            pad = (-(q.shape[-1] + h + w)) % 8
            q_parts = [q * self.scale, rel_h.reshape(b, self.num_heads, n, h).to(q.dtype),
                       rel_w.reshape(b, self.num_heads, n, w).to(q.dtype)]
            k_parts = [k, keys_h.expand(b, self.num_heads, n, h), keys_w.expand(b, self.num_heads, n, w)]
            if pad:
                zeros = q.new_zeros(b, self.num_heads, n, pad)
                q_parts.append(zeros)
                k_parts.append(zeros)
            out = F.scaled_dot_product_attention(torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1), v, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)

        # B x heads x N x d -> B x H x W x (heads * d)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def _key_one_hots(
    k_size: Tuple[int, int], dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-hot row and column of every key of a ``k_h x k_w`` grid: (N x k_h, N x k_w)."""
    k_h, k_w = k_size
    rows = torch.eye(k_h, dtype=dtype, device=device).repeat_interleave(k_w, dim=0)
    cols = torch.eye(k_w, dtype=dtype, device=device).repeat(k_h, 1)
    return rows, cols


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Cut a ``BxHxWxC`` grid into windows, zero-padding bottom/right to a multiple of the window.

    Returns ``(B*nWin) x ws x ws x C`` windows and the padded ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nWin) x ws x ws x C`` -> ``BxHxWxC``."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: ``L x C`` table, one row per relative offset; resized linearly when ``L`` is
            not ``2 * max(q_size, k_size) - 1``.

    Returns:
        ``q_size x k_size x C``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        table = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        table = table.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        table = rel_pos
    # Offsets scaled to the longer axis when query and key grids differ.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


def decomposed_rel_pos(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two terms of MViTv2's decomposed relative position bias.

    Args:
        q: queries, ``... x (q_h*q_w) x C`` (unscaled).
        rel_pos_h, rel_pos_w: ``L x C`` tables for the height and width axes.
        q_size, k_size: query and key grids ``(h, w)``.

    Returns:
        ``rel_h`` of shape ``... x q_h x q_w x k_h`` and ``rel_w`` of shape ``... x q_h x q_w x k_w``;
        the bias of query ``(y, x)`` on key ``(ky, kx)`` is ``rel_h[..., y, x, ky] + rel_w[..., y, x, kx]``.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    table_h = get_rel_pos(q_h, k_h, rel_pos_h)  # q_h x k_h x C
    table_w = get_rel_pos(q_w, k_w, rel_pos_w)  # q_w x k_w x C
    grid_q = q.reshape(*q.shape[:-2], q_h, q_w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid_q, table_h)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid_q, table_w)
    return rel_h, rel_w
