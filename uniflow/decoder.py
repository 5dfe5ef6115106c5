"""The patch-wise pixel flow decoder: latent tokens -> global context -> one small flow per image patch.

up-proj(z) + learnable sin-cos PE -> `global_depth` bidirectional ViT blocks -> + second learnable PE
-> per-patch condition c -> FlowHead v(x_t, t, c) over that patch's p*p*3 pixels.
Position embeddings are stored for the native grid and resampled for any other grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from uniflow import flow
from uniflow.blocks import TransformerBlock
from uniflow.configs import check_int, check_number
from uniflow.flow_head import FlowHead
from uniflow.pos_embed import resize_grid_embedding, sincos_2d


@dataclass
class DecoderConfig:
    """Sizes of the decoder. width None means the encoder's width (as in the release: 1024 for InternViT-300M).

    prediction: what the flow head outputs, "velocity" (the release) or "data" (x1; `uniflow.flow.as_velocity`
        turns it into a velocity for the samplers, and one Euler step returns it unchanged: no input noise left to
        cancel). A property of the weights, so it is stored with them (config.json) and read when decoding.
    border_loss_weight: weight of the patch-border pixels (first/last row and column of each patch) in the flow
        loss, relative to the interior pixels; > 1 spends the decoder's capacity where the patch seams show (the
        seam ratio measures border over interior error). 1 (default) is the plain MSE.
    deblock: threshold of the deblocking filter applied to decoded images (`uniflow.deblock`): steps at patch
        borders beyond the local gradient and below this (in [0, 1] pixel units) are spread over `deblock_reach`
        pixels on each side (None: half a patch). 0 (default) turns it off. Not part of training: a decode setting
        stored with the weights, chosen for them (docs/tokenizer_search.md).
    """

    latent_channels: int = 64
    width: int | None = None
    global_depth: int = 6
    global_heads: int = 16
    mlp_ratio: float = 4.0
    head_width: int = 1024
    head_depth: int = 12
    gradient_checkpointing: bool = False
    prediction: str = "velocity"
    border_loss_weight: float = 1.0
    deblock: float = 0.0
    deblock_reach: int | None = None

    POST_FILTER: ClassVar[tuple[str, ...]] = ("deblock", "deblock_reach")  # decode settings, not the latent space

    def __post_init__(self) -> None:
        flow.check_prediction(self.prediction)
        check_number("border_loss_weight", self.border_loss_weight, 0.0, 100.0, lo_open=True)
        check_number("deblock", self.deblock, 0.0, 1.0)
        if self.deblock_reach is not None:
            check_int("deblock_reach", self.deblock_reach, 1)


def mlp(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.GELU(), nn.Linear(dim_hidden, dim_out))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), channel-major inside each patch, patches in raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def border_weights(patch: int, channels: int, border_weight: float) -> torch.Tensor:
    """(C*p*p,) loss weights in `patchify`'s layout: `border_weight` on the outer rows and columns, 1 inside."""
    idx = torch.arange(patch)
    edge = (idx == 0) | (idx == patch - 1)
    border = edge[:, None] | edge[None, :]
    weights = torch.where(border, torch.tensor(float(border_weight)), torch.tensor(1.0))
    return weights.expand(channels, patch, patch).reshape(-1)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, C*p*p) -> (B, C, gh*p, gw*p)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, gh * patch, gw * patch)


class PixelFlowDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, encoder_width: int, patch_size: int, native_grid: tuple[int, int],
                 channels: int = 3) -> None:
        super().__init__()
        width = config.width or encoder_width
        self.config = config
        self.patch_size = patch_size
        self.channels = channels
        self.native_grid = tuple(native_grid)
        self.patch_dim = channels * patch_size * patch_size
        self.from_latent = mlp(config.latent_channels, width, width)
        num_tokens = native_grid[0] * native_grid[1]
        self.global_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.global_blocks = nn.ModuleList(
            TransformerBlock(width, config.global_heads, config.mlp_ratio) for _ in range(config.global_depth)
        )
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.flow_head = FlowHead(self.patch_dim, width, config.head_width, config.head_depth)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.global_pos_embed.device.type != "meta":
                pe = sincos_2d(self.global_pos_embed.shape[-1], self.native_grid)[None]
                self.global_pos_embed.copy_(pe)
                self.decoder_pos_embed.copy_(pe)
        for module in [self.from_latent, *self.global_blocks]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    nn.init.zeros_(sub.bias)

    def condition(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, latent_channels) -> per-patch conditions (B, N, width)."""
        x = self.from_latent(latents) + resize_grid_embedding(self.global_pos_embed, self.native_grid, grid)
        for block in self.global_blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x + resize_grid_embedding(self.decoder_pos_embed, self.native_grid, grid)

    def loss(self, latents: torch.Tensor, target: torch.Tensor, grid: tuple[int, int],
             config: flow.FlowConfig) -> torch.Tensor:
        """Flow-matching loss of every patch. target: normalised images (B, 3, H, W)."""
        cond = self.condition(latents, grid).flatten(0, 1)
        x1 = patchify(target, self.patch_size).flatten(0, 1)
        weight = None
        if self.config.border_loss_weight != 1.0:
            weight = border_weights(self.patch_size, self.channels, self.config.border_loss_weight)
        return flow.flow_matching_loss(lambda x, t: self.flow_head(x, t, cond), x1, config, weight=weight,
                                       prediction=self.config.prediction)

    def sample(self, latents: torch.Tensor, grid: tuple[int, int], steps: int = 1, sampler: str = "euler",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode latents to normalised images (B, 3, H, W) by integrating each patch's flow from noise."""
        b, n, _ = latents.shape
        cond = self.condition(latents, grid).flatten(0, 1)
        noise = torch.randn(b * n, self.patch_dim, generator=generator, device="cpu" if generator is None
                            else generator.device, dtype=torch.float32).to(latents.device, cond.dtype)
        velocity = flow.as_velocity(lambda x, t: self.flow_head(x, t, cond), self.config.prediction)
        patches = flow.sample(velocity, noise, steps, sampler)
        return unpatchify(patches.view(b, n, self.patch_dim), self.patch_size, grid, self.channels)
