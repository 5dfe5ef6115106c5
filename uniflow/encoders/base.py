"""The one interface every ViT backend implements.

The tokenizer never looks inside a backend: it asks for the patch tokens of every layer, or of chosen layers (CLS
and register tokens already dropped), and uses the backend's own preprocessing, normalisation and its inverse, so
swapping InternViT for SigLIP or a timm ViT changes only the encoder config. docs/architecture.md says how to add a
backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from uniflow.errors import ConfigError, ImageInputError
from uniflow.images import ImageLike, to_batch

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
    """Patch tokens after the requested transformer layers (input embedding excluded): hidden_states[i] is the
    (B, N, D) output of layer `layers[i]` (0-based). With no layers requested, every layer, in order."""

    hidden_states: list[torch.Tensor]
    grid: tuple[int, int]
    layers: tuple[int, ...] = ()

    @property
    def last(self) -> torch.Tensor:
        """The last requested layer's tokens (the encoder's last layer when all were requested)."""
        return self.hidden_states[-1]


class VisionEncoder(nn.Module):
    """Base class of the encoder adapters.

    Subclasses set `patch_size`, `width`, `num_layers`, `image_size`, `mean`, `std` and implement `encode_normalized`
    (computing no block past the deepest requested layer, so a caller that needs layer -2 never pays for layer -1).
    Preprocessing (image -> resized, normalised tensor) lives here, with the backend's own mean/std, so the tokenizer
    and an encoder loaded alone (`uniflow.load_encoder`, the MLLM's path) prepare images identically.
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
                f"image size {width}x{height} (width x height) is not divisible by the patch size {p}; pass --resize "
                f"on the command line (resize=True in Python) to resize and centre-crop to "
                f"{self.image_size}x{self.image_size}, or resize it yourself"
            )
        return height // p, width // p

    def preprocess(self, images: ImageLike | list[ImageLike], resize: bool = False) -> torch.Tensor:
        """User images (PIL, uint8/float tensors or arrays) -> normalised (B, 3, H, W) on this encoder's device.

        resize=False requires sides divisible by the patch size; resize=True resizes and centre-crops each image to
        `image_size` first with `uniflow.images.preprocess`, the function training data goes through.
        """
        batch = to_batch(images, size=self.image_size if resize else None)
        self.grid_for(*batch.shape[-2:])
        weight = next(self.parameters())
        return self.normalize(batch.to(weight.device)).to(weight.dtype)

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """0-based layer indices for `layers` (negative ones count from the last layer; None: all layers)."""
        if layers is None:
            return list(range(self.num_layers))
        resolved = []
        for index in layers:
            if not -self.num_layers <= int(index) < self.num_layers:
                raise ConfigError(f"encoder layers: index {index} is out of range for {self.num_layers} layers "
                                  f"(expected {-self.num_layers} .. {self.num_layers - 1})")
            resolved.append(int(index) % self.num_layers)
        if not resolved:
            raise ConfigError("encoder layers: expected at least one layer index, got none")
        return resolved

    def encode_normalized(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens after each of `layers` (0-based, in that order), stopping after the deepest one."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (activation memory for compute) while training."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def forward(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> EncoderOutput:
        """pixel_values: (B, 3, H, W) already normalised (`preprocess`); H and W divisible by the patch size.

        layers: which layers' tokens to return (e.g. [-1], or [-2] for LLaVA's penultimate layer); None returns all.
        Blocks past the deepest requested layer are not computed.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ImageInputError(f"encoder expects (B, 3, H, W) images, got shape {tuple(pixel_values.shape)}")
        grid = self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        indices = self.resolve_layers(layers)
        return EncoderOutput(self.encode_normalized(pixel_values, indices), grid, tuple(indices))


# --- checkpoint key renaming shared by the converters -----------------------------------------------------------


def rename_keys(names: Iterable[str], rules: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Rename checkpoint keys by regex rules ({pattern: replacement}, first match wins): the one rule engine of the
    checkpoint converters. Returns ({old name: new name}, [names no rule matched])."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules.items()]
    renamed: dict[str, str] = {}
    unmatched: list[str] = []
    for name in names:
        for pattern, repl in compiled:
            new, hits = pattern.subn(repl, name)
            if hits:
                renamed[name] = new
                break
        else:
            unmatched.append(name)
    return renamed, unmatched
