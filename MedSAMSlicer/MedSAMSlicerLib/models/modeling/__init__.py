"""The networks: SAM ViT-B (MedSAM) and TinyViT (LiteMedSAM) encoders, SAM's prompt encoder and
mask decoder, and :class:`SamModel`, which ties them together.  Plain torch; no Slicer imports.

Build a model with :func:`build_model` ("vit_b" or "tiny_vit") and load weights with
``MedSAMSlicerLib.models.checkpoints.load_model``.
"""

from .build import (
    ARCHITECTURE_TITLES,
    ARCHITECTURES,
    NOT_ON_META,
    available_architectures,
    build_model,
    build_tiny_vit,
    build_vit_b,
    describe_architecture,
)
from .common import LayerNorm2d, MLPBlock
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import SamModel
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TITLES",
    "NOT_ON_META",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PromptEncoder",
    "SamModel",
    "TinyViT",
    "TwoWayTransformer",
    "available_architectures",
    "build_model",
    "build_tiny_vit",
    "build_vit_b",
    "describe_architecture",
]
