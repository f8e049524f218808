"""Inference-time rewrites of a loaded model that keep its numbers.

:func:`optimize_for_inference` is called once by :class:`~MedSAMSlicerLib.segmenter.Segmenter`
after the weights are loaded. It replaces modules of the image encoder by inference-only
equivalents: the same parameters and the same formula, computed with fewer passes over memory.
Apart from the bfloat16 matrix products below (an explicit switch), nothing here changes the
maths: the embeddings equal the plain model's to float32 rounding (~1e-5) and the masks are the
same (the tests check both on real CT with the real LiteMedSAM weights). Reduced precision of the
whole encoder is a separate choice, the ``precision`` setting
(:func:`~MedSAMSlicerLib.models.devices.select_precision`).

What is done, and why (measured with ``medsam-slicer bench``; see docs/performance.md):

TinyViT (LiteMedSAM). Stage 0 runs MBConv blocks at full 256x256 resolution with 256 channels, so
every elementwise pass costs a 64 MB tensor per slice:

- **Conv2d + BatchNorm fusion** (the 27 ``Conv2d_BN``): in eval mode batch norm is a per-channel
  affine map and folds into the convolution's weight and bias (computed in float64, rounded once).
- **Convolution + GELU, or convolution + residual add, in one oneDNN call** (the GELU after the
  add then runs in place) (``mkldnn._convolution_pointwise``,
  the kernels ``torch.compile`` uses on CPUs, here called directly so no compiler is needed at
  run time), in **channels-last** layout, oneDNN's native one; TinyViT's token <-> map reshapes
  are then free views instead of copies.
- **Linear + GELU in one call** in the MLPs (``mkldnn._linear_pointwise``).
- **Window attention through the fused SDPA kernel**: the learned relative-position bias is
  gathered once into a contiguous ``1 x heads x N x N`` tensor. PyTorch's CPU flash-attention
  kernel takes a 4D additive mask but falls back to the unfused "math" path (materialised logits
  and a safe softmax with extra ``isneginf``/``all``/``where`` passes) for the 3D mask the plain
  module passes.

SAM ViT-B (MedSAM):

- **Attention with relative positions through the fused SDPA kernel** (on CPUs): the plain module widens
  queries and keys by the one-hot relative-position features, which makes their head size differ
  from the values' and sends SDPA down the math path (and triples the ``q.k`` work in the global
  blocks). Here the decomposed bias ``rel_h + rel_w`` is materialised per chunk of heads (at most
  ~64 MB at a time, so the global blocks never hold a ``heads x 4096 x 4096`` tensor, unlike SAM)
  and passed to the flash kernel as its mask.
- **Linear + GELU in one call** in the MLPs.

Opt-in, LiteMedSAM on CPUs with native bfloat16 (AVX512-BF16, AMX; probed once per process by a real
call, :mod:`.cpu_features`; elsewhere the float32 layers stay, with a warning): the linear layers of the
transformer stages (``qkv``, ``proj``, MLP; about half the encoder's time) as bfloat16 products
with float32 accumulation while convolutions, norms, softmax and the residual stream stay float32
(:func:`use_bfloat16_matmuls`, ``Segmenter(bfloat16_matmuls=True)``): encoding ~1.25x faster. It
is not exact, hence not the default: on 30 independent CT slices of five organs the masks agree
with float32 at Dice >= 0.997, but along a 3D propagation the small differences feed the next
slice's box and add up (20-slice liver box: 3D Dice 0.9915, one slice 0.969). bfloat16 autocast
of the whole encoder (``precision="bfloat16"``) agrees less (single slices down to 0.977).

Both: the necks' ``LayerNorm2d`` runs as one ``layer_norm`` over channels-last pixels instead of
eight elementwise passes. The fused oneDNN calls are used only on a CPU whose torch build has them
and only after a self-check against the plain ops at start-up (:func:`fused_cpu_ops_available`);
anywhere else (CUDA, MPS, other builds) the same modules run plain torch ops, still with the
fused batch norm, the flash-attention masks and the channels-last layout.

The rewritten model is for inference only: its state dict no longer has the checkpoint's keys,
so load weights before optimising, and never train or save an optimised model.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_features
from .modeling import image_encoder as vit
from .modeling import tiny_vit
from .modeling.common import LayerNorm2d

#: Most bytes of attention bias materialised at once in a ViT-B global block.
ATTENTION_BIAS_CHUNK_BYTES = 64 << 20


# -- capability checks (probed once per process in cpu_features.py) ------------------------------
def fused_cpu_ops_available() -> bool:
    """Whether oneDNN's fused convolution/linear + activation ops run here and give the plain result
    (:func:`~MedSAMSlicerLib.models.cpu_features.fused_float32_missing`, probed once per process)."""
    return cpu_features.fused_float32_missing() is None


def bfloat16_matmuls_available() -> bool:
    """Whether bfloat16 matrix products run here on native bfloat16
    (:func:`~MedSAMSlicerLib.models.cpu_features.bfloat16_matmuls_missing`, probed once per process)."""
    return cpu_features.bfloat16_matmuls_missing() is None


def _conv_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    gelu: bool,
    residual: Optional[torch.Tensor],
) -> torch.Tensor:
    """oneDNN: ``gelu?(conv(x) + residual?)``."""
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(padding), list(stride), list(dilation), groups,
            "gelu" if gelu else "none", [], "none" if gelu else "",
        )
    # oneDNN fuses a binary add but not add + GELU: the GELU runs in place on the fresh output.
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, list(padding), list(stride), list(dilation), groups, "add", None, None, [], None
    )
    return torch.ops.aten.gelu_(out) if gelu else out


# -- building blocks ------------------------------------------------------------------------------
@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``, computed in
    float64 and rounded once, so the folded layer differs from the pair by float rounding only.
    Without ``bn`` the convolution's own weight and bias are returned.
    """
    if bn is None:
        return conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    assert bn.running_mean is not None and bn.running_var is not None
    w = conv.weight.double()
    n = conv.out_channels
    b = conv.bias.double() if conv.bias is not None else torch.zeros(n, dtype=torch.float64, device=w.device)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = (w * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
    bias = ((b - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
    return weight, bias


class ConvAct(nn.Module):
    """``gelu?(conv(x) + residual?)`` with batch norm folded in; channels-last; one oneDNN call on CPUs.

    Args:
        conv: the convolution (its weights are copied).
        bn: a batch norm that follows it (folded), or ``None``.
        gelu: apply GELU (exact, erf form) after the convolution (and the residual add).
        fused: use oneDNN's fused op when the input is on a CPU (see :func:`fused_cpu_ops_available`).
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, gelu: bool = False,
                 fused: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ConvAct handles zero padding given as numbers only")
        weight, bias = fold_batch_norm(conv, bn)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.gelu = gelu
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: BxCxHxW (any layout) -> BxC'xH'xW' channels-last; ``residual`` like the output."""
        x = x.contiguous(memory_format=torch.channels_last)
        if self.fused and x.device.type == "cpu" and x.dtype == self.weight.dtype and not torch.is_grad_enabled():
            if residual is not None:
                residual = residual.contiguous(memory_format=torch.channels_last)
            return _conv_fused(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                               self.gelu, residual)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return F.gelu(y) if self.gelu else y


def _linear_gelu(x: torch.Tensor, fc: nn.Linear, fused: bool) -> torch.Tensor:
    """``gelu(fc(x))`` for ``...xC`` input; one oneDNN call on CPUs."""
    if (
        fused
        and x.device.type == "cpu"
        and x.dtype == fc.weight.dtype
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        lead = x.shape[:-1]
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), fc.weight, fc.bias, "gelu", [], "none")
        return out.reshape(*lead, out.shape[-1])
    return F.gelu(fc(x))


class BFloat16Linear(nn.Module):
    """``nn.Linear`` (optionally + GELU) as a bfloat16 matrix product with float32 accumulation.

    The input is rounded to bfloat16, the weights are kept in bfloat16, oneDNN accumulates in
    float32 and rounds the output once; the caller's residual stream, norms and softmax stay in
    float32. Used only where the masks were measured to stay the same (see
    :func:`use_bfloat16_matmuls`).
    """

    def __init__(self, fc: nn.Linear, gelu: bool = False, fused: bool = False, float_output: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(fc.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if fc.bias is None else nn.Parameter(fc.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.gelu = gelu
        self.fused = fused
        self.float_output = float_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ...xC (any float dtype) -> ...xC' (float32, or bfloat16 when ``float_output`` is off)."""
        lead = x.shape[:-1]
        x = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
        if self.fused and x.device.type == "cpu" and not torch.is_grad_enabled():
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu" if self.gelu else "none", [],
                                                     "none" if self.gelu else "")
        else:
            out = F.linear(x, self.weight, self.bias)
            out = F.gelu(out) if self.gelu else out
        out = out.reshape(*lead, out.shape[-1])
        return out.float() if self.float_output else out


class ChannelsLastLayerNorm2d(nn.Module):
    """:class:`~MedSAMSlicerLib.models.modeling.common.LayerNorm2d` as one ``layer_norm`` over each pixel's channels.

    Same formula (biased variance, ``eps`` inside the square root); a channels-last input needs no
    copy. Returns channels-last BxCxHxW.
    """

    def __init__(self, norm: LayerNorm2d) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxCxHxW -> BxCxHxW (channels-last)."""
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


# -- TinyViT --------------------------------------------------------------------------------------
class FastMBConv(nn.Module):
    """TinyViT's ``MBConv``: three fused convolutions, the last with the residual add and GELU."""

    def __init__(self, block: tiny_vit.MBConv, fused: bool) -> None:
        super().__init__()
        self.conv1 = ConvAct(block.conv1.c, block.conv1.bn, gelu=True, fused=fused)
        self.conv2 = ConvAct(block.conv2.c, block.conv2.bn, gelu=True, fused=fused)
        self.conv3 = ConvAct(block.conv3.c, block.conv3.bn, gelu=True, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxCxHxW -> BxCxHxW."""
        return self.conv3(self.conv2(self.conv1(x)), residual=x)


class FastPatchMerging(nn.Module):
    """TinyViT's ``PatchMerging`` on channels-last maps: tokens or maps -> Bx(H'*W')x(out_dim) tokens."""

    def __init__(self, merge: tiny_vit.PatchMerging, fused: bool) -> None:
        super().__init__()
        self.input_resolution = merge.input_resolution
        self.conv1 = ConvAct(merge.conv1.c, merge.conv1.bn, gelu=True, fused=fused)
        self.conv2 = ConvAct(merge.conv2.c, merge.conv2.bn, gelu=True, fused=fused)
        self.conv3 = ConvAct(merge.conv3.c, merge.conv3.bn, gelu=False, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # a channels-last view, no copy
        x = self.conv3(self.conv2(self.conv1(x)))
        return x.flatten(2).transpose(1, 2)


class FastTinyViTAttention(nn.Module):
    """TinyViT's window attention with its relative-position bias gathered once.

    Same parameters and formula as :class:`~MedSAMSlicerLib.models.modeling.tiny_vit.Attention`; the
    bias is a contiguous ``1 x heads x N x N`` buffer, which lets SDPA use its fused kernel.
    """

    def __init__(self, attn: tiny_vit.Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.key_dim = attn.key_dim
        self.d = attn.d
        self.dh = attn.dh
        self.scale = attn.scale
        self.norm = attn.norm
        self.qkv = attn.qkv
        self.proj = attn.proj
        with torch.no_grad():
            bias = attn.attention_biases[:, attn.attention_bias_idxs]
        self.register_buffer("bias", bias[None].contiguous(), persistent=False)
        self._cast: Optional[torch.Tensor] = None

    def _bias(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bias.dtype == dtype:
            return self.bias
        cast = self._cast
        if cast is None or cast.dtype != dtype or cast.device != self.bias.device:
            cast = self.bias.to(dtype)
            self._cast = cast
        return cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxNxC -> BxNxC."""
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(q.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class FastTinyViTBlock(nn.Module):
    """TinyViT's block: window attention, depthwise ``local_conv`` (channels-last), MLP with fused GELU."""

    def __init__(self, block: tiny_vit.TinyViTBlock, fused: bool) -> None:
        super().__init__()
        self.input_resolution = block.input_resolution
        self.window_size = block.window_size
        self.attn = FastTinyViTAttention(block.attn)
        self.local_conv = ConvAct(block.local_conv.c, block.local_conv.bn, gelu=False, fused=fused)
        self.norm = block.mlp.norm
        self.fc1 = block.mlp.fc1
        self.fc2 = block.mlp.fc2
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxLxC with ``L == H*W`` -> BxLxC."""
        h, w = self.input_resolution
        b, n, c = x.shape
        x = x + tiny_vit.window_attention(self.attn, x, h, w, self.window_size)
        # BxLxC contiguous is a channels-last BxCxHxW map: no copies on the way in or out.
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        if isinstance(self.fc1, BFloat16Linear):
            return x + self.fc2(self.fc1(self.norm(x)))
        return x + self.fc2(_linear_gelu(self.norm(x), self.fc1, self.fused))


class FastTinyViT(nn.Module):
    """TinyViT's encoder rebuilt from :class:`FastMBConv`, :class:`FastTinyViTBlock` and friends."""

    def __init__(self, encoder: tiny_vit.TinyViT, fused: bool) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.out_resolution = encoder.out_resolution
        self.stage0_one_by_one = True
        seq = encoder.patch_embed.seq
        self.patch_embed = nn.Sequential(
            ConvAct(seq[0].c, seq[0].bn, gelu=True, fused=fused),
            ConvAct(seq[2].c, seq[2].bn, gelu=False, fused=fused),
        )
        if not isinstance(seq[1], nn.GELU) or seq[1].approximate != "none":
            raise ValueError("TinyViT patch embedding without the exact GELU is not supported")
        stages: List[nn.Module] = []
        for layer in encoder.layers:
            if isinstance(layer, tiny_vit.ConvLayer):
                blocks: List[nn.Module] = [FastMBConv(b, fused) for b in layer.blocks]
            else:
                blocks = [FastTinyViTBlock(b, fused) for b in layer.blocks]
            if layer.downsample is not None:
                blocks.append(FastPatchMerging(layer.downsample, fused))
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(stages)
        neck = encoder.neck
        self.neck = nn.Sequential(
            ConvAct(neck[0], None, fused=fused),
            ChannelsLastLayerNorm2d(neck[1]),
            ConvAct(neck[2], None, fused=fused),
            ChannelsLastLayerNorm2d(neck[3]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: Bx3xSxS -> Bx256x(S/4)x(S/4) (contiguous)."""
        if x.shape[0] > 1 and self.stage0_one_by_one:
            # Stage 0 holds 256 channels at full resolution (64 MB per slice in float32): one slice
            # at a time keeps the peak memory of a batch at that of a single slice.
            x = torch.cat([self.layers[0](self.patch_embed(x[i : i + 1])) for i in range(x.shape[0])])
        else:
            x = self.layers[0](self.patch_embed(x))
        for layer in self.layers[1:]:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_resolution, self.out_resolution, c).permute(0, 3, 1, 2)
        return self.neck(x).contiguous()


def use_bfloat16_matmuls(encoder: FastTinyViT, fused: bool) -> int:
    """Run the linear layers of TinyViT's transformer stages as bfloat16 matrix products (opt-in).

    Only the ``qkv``/``proj`` and MLP layers (about half of the encoder's time); convolutions,
    norms, softmax and the residual stream stay float32. Single slices keep Dice >= 0.997 against
    float32; 3D propagation drifts a little more (see the module docstring). Returns how many
    layers were switched.
    """
    count = 0
    for block in encoder.modules():
        if isinstance(block, FastTinyViTBlock) and not isinstance(block.fc1, BFloat16Linear):
            attn = block.attn
            attn.qkv = BFloat16Linear(attn.qkv, fused=fused)
            attn.proj = BFloat16Linear(attn.proj, fused=fused)
            block.fc1 = BFloat16Linear(block.fc1, gelu=True, fused=fused, float_output=False)
            block.fc2 = BFloat16Linear(block.fc2, fused=fused)
            count += 4
    return count


# -- SAM ViT-B ------------------------------------------------------------------------------------
class FastViTAttention(nn.Module):
    """SAM's attention with decomposed relative positions, through SDPA's fused kernel.

    Same parameters and formula as :class:`~MedSAMSlicerLib.models.modeling.image_encoder.Attention`:
    ``softmax(scale * q.k + rel_h[row(k)] + rel_w[col(k)]) v``, with the bias materialised for at
    most :data:`ATTENTION_BIAS_CHUNK_BYTES` at a time (a few heads of a global block).
    """

    def __init__(self, attn: vit.Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxHxWxC -> BxHxWxC."""
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B x heads x N x d
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            per_head = b * n * n * q.element_size()
            chunk = max(1, min(self.num_heads, ATTENTION_BIAS_CHUNK_BYTES // max(per_head, 1)))
            parts = []
            for s in range(0, self.num_heads, chunk):
                qc = q[:, s : s + chunk]
                rel_h, rel_w = vit.decomposed_rel_pos(qc, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
                bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(b, qc.shape[1], n, n)
                parts.append(F.scaled_dot_product_attention(
                    qc, k[:, s : s + chunk], v[:, s : s + chunk], attn_mask=bias.to(q.dtype), scale=self.scale
                ))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class FastViTBlock(nn.Module):
    """SAM's transformer block with :class:`FastViTAttention` and a fused Linear + GELU."""

    def __init__(self, block: vit.Block, fused: bool, fast_attention: bool = True) -> None:
        super().__init__()
        if not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none":
            raise ValueError("only the exact GELU is supported")
        self.norm1 = block.norm1
        self.attn = FastViTAttention(block.attn) if fast_attention else block.attn
        self.norm2 = block.norm2
        self.fc1 = block.mlp.lin1
        self.fc2 = block.mlp.lin2
        self.window_size = block.window_size
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: BxHxWxC -> BxHxWxC."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            windows, padded_hw = vit.window_partition(x, self.window_size)
            x = vit.window_unpartition(self.attn(windows), self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.fc2(_linear_gelu(self.norm2(x), self.fc1, self.fused))


def _rebuild_vit(encoder: vit.ImageEncoderViT, fused: bool, fast_attention: bool) -> vit.ImageEncoderViT:
    encoder.blocks = nn.ModuleList(FastViTBlock(b, fused, fast_attention) for b in encoder.blocks)
    for i, m in enumerate(encoder.neck):
        if isinstance(m, LayerNorm2d):
            encoder.neck[i] = ChannelsLastLayerNorm2d(m)
    encoder.neck.append(_Contiguous())
    return encoder


class _Contiguous(nn.Module):
    """Embeddings leave the encoder in the default (contiguous) layout, as the plain model's do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


# -- the whole model ------------------------------------------------------------------------------
def optimize_for_inference(
    model: nn.Module,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    fused_ops: Optional[bool] = None,
    bfloat16_matmuls: bool = False,
) -> nn.Module:
    """Rewrite a loaded model's image encoder for inference, in place, keeping its numbers.

    Args:
        model: a :class:`~MedSAMSlicerLib.models.modeling.sam.SamModel` with its weights loaded.
        device: where it will run (default: where its parameters are).
        dtype: the encoder's compute dtype (the :class:`~MedSAMSlicerLib.segmentation.predictor.Predictor`
            runs it under autocast when not float32). Fused oneDNN calls are used for float32
            only; under autocast the same modules run plain (autocast-aware) ops.
        fused_ops: force the oneDNN fused ops on or off (default: on when
            :func:`fused_cpu_ops_available` and ``device`` is a CPU).
        bfloat16_matmuls: LiteMedSAM on a CPU in float32: run the transformer stages' linear
            layers as bfloat16 products (:func:`use_bfloat16_matmuls`; opt-in, the one switch here
            that is not exact). Used only where :func:`bfloat16_matmuls_available` (native
            bfloat16, and oneDNN runs the products); elsewhere the float32 layers stay and a
            ``UserWarning`` says why. Ignored for other models and dtypes.

    Returns:
        ``model``, in eval mode, without gradients, with ``model.optimized_for_inference = True``.
        Its state dict is no longer checkpoint-shaped.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    model.requires_grad_(False)
    if fused_ops is None:
        fused_ops = device.type == "cpu" and dtype == torch.float32 and fused_cpu_ops_available()
    encoder = model.image_encoder
    if isinstance(encoder, tiny_vit.TinyViT):
        fast = FastTinyViT(encoder, fused=bool(fused_ops))
        if bfloat16_matmuls and device.type == "cpu" and dtype == torch.float32:
            missing = cpu_features.bfloat16_matmuls_missing()
            if missing is None:
                use_bfloat16_matmuls(fast, fused=bool(fused_ops))
            else:
                warnings.warn(cpu_features.fallback_note("bfloat16_matmuls", missing), UserWarning, stacklevel=2)
        model.image_encoder = fast
    elif isinstance(encoder, vit.ImageEncoderViT):
        # The materialised-bias attention is measured on CPUs only; elsewhere the plain module's
        # widened queries/keys let GPU kernels avoid any N x N tensor.
        model.image_encoder = _rebuild_vit(encoder, fused=bool(fused_ops), fast_attention=device.type == "cpu")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.optimized_for_inference = True  # type: ignore[attr-defined]
    return model
