"""Named tokenizer configurations: a name -> TokenizerConfig registry.

`tiny` is the ShapeWorld model that trains on a laptop CPU; the others are the paper's full-size encoders, which are
checked by parameter counts and shapes (on the meta device), not trained in CI.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from uniflow.decoder import DecoderConfig
from uniflow.encoders import EncoderConfig
from uniflow.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from uniflow.errors import ConfigError
from uniflow.tokenizer import TokenizerConfig


def tiny() -> TokenizerConfig:
    """ShapeWorld, 64 px, patch 8: a 4x192 timm ViT encoder, 2 global blocks, a 4x256 flow head.

    Sized so the pretrained encoder plus the tokenizer ship in fp16 within 15 MB and train on a 2-core CPU.
    """
    return TokenizerConfig(
        encoder=EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                              kwargs={"embed_dim": 192, "depth": 4, "num_heads": 3},
                              image_size=64, patch_size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        decoder=DecoderConfig(latent_channels=64, global_depth=2, global_heads=3, head_width=256, head_depth=4),
    )


def internvit_300m() -> TokenizerConfig:
    """The paper's main model and the released checkpoint: InternViT-300M at 448 px, 6 global blocks, 12x1024 head."""
    return TokenizerConfig(
        encoder=EncoderConfig(backend="internvit", arch="internvit-300m", image_size=448, patch_size=14,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD),
        decoder=DecoderConfig(latent_channels=64, global_depth=6, global_heads=16, head_width=1024, head_depth=12),
    )


def siglip2_so400m() -> TokenizerConfig:
    """SigLIP2-SO400M/14-384 (UniFlow-LV's encoder) through `transformers`' SigLIP vision model.

    Its 384-px checkpoints see a 27 x 27 grid (the conv drops the last 6 pixels), so the tokenizer works at
    27 * 14 = 378 px, where every pixel is encoded and decoded.
    """
    return TokenizerConfig(
        encoder=EncoderConfig(backend="hf", arch="siglip_vision_model",
                              kwargs={"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                                      "intermediate_size": 4304, "patch_size": 14, "image_size": 384},
                              image_size=378, patch_size=14),
        decoder=DecoderConfig(latent_channels=64, global_depth=6, global_heads=16, head_width=1024, head_depth=12),
    )


def dinov2_l() -> TokenizerConfig:
    """DINOv2-L/14 at 448 px through `transformers`."""
    return TokenizerConfig(
        encoder=EncoderConfig(backend="hf", arch="dinov2",
                              kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                      "patch_size": 14, "image_size": 518},
                              image_size=448, patch_size=14),
        decoder=DecoderConfig(latent_channels=64, global_depth=6, global_heads=16, head_width=1024, head_depth=12),
    )


PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "tiny": tiny,
    "internvit-300m": internvit_300m,
    "siglip2-so400m": siglip2_so400m,
    "dinov2-l": dinov2_l,
}


def get_preset(name: str) -> TokenizerConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown tokenizer preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
