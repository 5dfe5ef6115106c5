"""The one interface every ViT backend implements.

The tokenizer never looks inside a backend: it asks for the patch tokens of every layer (CLS and register tokens
already dropped) and uses the backend's own normalisation and its inverse, so swapping InternViT for SigLIP or a
timm ViT changes only the encoder config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from uniflow.errors import ImageInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    """Which backend to build and how.

    backend: "timm" | "hf" | "internvit".
    arch: timm model name (timm), or `transformers` model_type (hf: "siglip_vision_model", "siglip2_vision_model",
        "clip_vision_model", "dinov2"). Unused for internvit.
    kwargs: architecture overrides passed to the backend's config / constructor (e.g. depth, width).
    image_size / patch_size: native input size and patch size; other sizes divisible by the patch size also work.
    mean / std: normalisation applied by the backend's `normalize` (None: the backend's default).
    pretrained: optional local path with weights (a safetensors file, or an HF model folder for "hf"/"internvit").
    """

    backend: str = "timm"
    arch: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    patch_size: int = 16
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pretrained: str | None = None


@dataclass
class EncoderOutput:
    """Patch tokens of every transformer layer, input embedding excluded: hidden_states[l] is (B, N, D)."""

    hidden_states: list[torch.Tensor]
    grid: tuple[int, int]

    @property
    def last(self) -> torch.Tensor:
        return self.hidden_states[-1]


class VisionEncoder(nn.Module):
    """Base class of the encoder adapters.

    Subclasses set `patch_size`, `width`, `num_layers`, `image_size`, `mean`, `std` and implement `encode_normalized`.
    """

    patch_size: int
    width: int
    num_layers: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _register_norm(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] RGB images to the backend's input space."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: the backend's input space back to [0, 1] RGB (not clamped)."""
        return x * self._std.to(x.dtype) + self._mean.to(x.dtype)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ImageInputError(
                f"image size {height}x{width} is not divisible by the patch size {p}; "
                f"resize it (e.g. to {self.image_size}x{self.image_size}) or pass resize=True"
            )
        return height // p, width // p

    def encode_normalized(self, pixel_values: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (activation memory for compute) while training."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values: (B, 3, H, W) already normalised; H and W divisible by the patch size."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ImageInputError(f"encoder expects (B, 3, H, W) images, got shape {tuple(pixel_values.shape)}")
        self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        return self.encode_normalized(pixel_values)


# --- weight loading shared by the adapters -----------------------------------------------------------------------
