"""Architecture registry: a name -> a freshly initialised :class:`SamModel`.

The weights come separately (see ``checkpoints.load_model``); the model registry in
``registry.py`` / ``models.json`` says which architecture and which weights a named model uses.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from ...errors import MedSAMError
from ..architectures import ARCHITECTURE_TITLES
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import SamModel
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

PROMPT_EMBED_DIM = 256
EMBEDDING_SIZE = 64


def _prompt_encoder(input_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )


def _mask_decoder() -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_vit_b() -> SamModel:
    """MedSAM: SAM ViT-B (1024 input, patch 16, depth 12, width 768, 12 heads, global attention
    in blocks 2, 5, 8, 11, window 14, relative positions) with SAM's prompt encoder and decoder."""
    input_size = 1024
    encoder = ImageEncoderViT(
        img_size=input_size,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        norm_eps=1e-6,
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    )
    return SamModel(encoder, _prompt_encoder(input_size), _mask_decoder(), input_size, architecture="vit_b")


def build_tiny_vit() -> SamModel:
    """LiteMedSAM: TinyViT (256 input, widths 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10,
    windows 7/7/14/7) with SAM's prompt encoder and decoder."""
    input_size = 256
    encoder = TinyViT(
        img_size=input_size,
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        out_chans=PROMPT_EMBED_DIM,
    )
    return SamModel(encoder, _prompt_encoder(input_size), _mask_decoder(), input_size, architecture="tiny_vit")


def build_hiera_t512():
    """MedSAM2: SAM 2.1 tiny (Hiera) at 512 px, built by Meta's ``sam2`` package from its own config
    with MedSAM2's changes (:func:`MedSAMSlicerLib.models.sam2_network.build_medsam2`); not a :class:`SamModel`
    but SAM 2's video predictor. Needs the ``sam2`` package (a clear error says how to install it)."""
    from ..sam2_network import build_medsam2

    return build_medsam2()


#: architecture name -> factory returning a randomly initialised model.
ARCHITECTURES: Dict[str, Callable[[], SamModel]] = {
    "vit_b": build_vit_b,
    "tiny_vit": build_tiny_vit,
    "hiera_t512": build_hiera_t512,
}

#: Architectures whose modules cannot be built on the meta device (they compute on tensors while
#: being built); :func:`~MedSAMSlicerLib.models.checkpoints.expected_shapes` builds them on the CPU once.
NOT_ON_META = ("hiera_t512",)



def available_architectures() -> List[str]:
    """Names accepted by :func:`build_model`."""
    return list(ARCHITECTURES)


def describe_architecture(architecture: str) -> str:
    """``"LiteMedSAM (tiny_vit)"`` style name for messages."""
    title = ARCHITECTURE_TITLES.get(architecture)
    return f"{title} ({architecture})" if title else architecture


def build_model(architecture: str) -> SamModel:
    """A new, randomly initialised model of the named architecture ("vit_b", "tiny_vit", "hiera_t512").

    Raises:
        MedSAMError: for an unknown name (the message lists the known ones).
    """
    factory = ARCHITECTURES.get(architecture)
    if factory is None:
        known = ", ".join(f'"{name}" ({ARCHITECTURE_TITLES.get(name, name)})' for name in ARCHITECTURES)
        raise MedSAMError(f'unknown model architecture "{architecture}": known architectures are {known}')
    return factory()
