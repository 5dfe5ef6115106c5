"""UniFlowTokenizer: a pretrained ViT adapted into a continuous 64-d-per-patch tokenizer with a pixel flow decoder.

encode: image -> encoder tokens h (semantic, for the MLLM) -> z = MLP(h) (B, N, 64 latent, for generation)
decode: z -> PixelFlowDecoder -> pixels, by 1 (or more) Euler/Heun steps from noise
loss:   lambda_d * layer-wise adaptive self-distillation + lambda_f * per-patch flow matching
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniflow import checkpoint
from uniflow.configs import from_dict, to_dict
from uniflow.decoder import DecoderConfig, PixelFlowDecoder, mlp
from uniflow.distill import DistillConfig, distillation_loss
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.errors import ConfigError, ImageInputError
from uniflow.flow import FlowConfig, check_sampler
from uniflow.images import ImageLike, resize_center_crop, to_batch, to_pil

MODEL_KIND = "uniflow-tokenizer"


@dataclass
class TokenizerConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    distill_weight: float = 1.0
    flow_weight: float = 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "tokenizer config") -> TokenizerConfig:
        data = dict(data)
        kind = data.pop("model_kind", MODEL_KIND)
        if kind != MODEL_KIND:
            raise ConfigError(f"{source}: model_kind is {kind!r}, expected {MODEL_KIND!r}")
        return from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return {"model_kind": MODEL_KIND, **to_dict(self)}


@dataclass
class Encoded:
    """latents: (B, N, C) continuous tokens for generation; semantic_tokens: (B, N, D) last-layer encoder tokens."""

    latents: torch.Tensor
    semantic_tokens: torch.Tensor
    grid: tuple[int, int]


@dataclass
class TokenizerLoss:
    loss: torch.Tensor
    flow: torch.Tensor
    distill: torch.Tensor
    alpha: torch.Tensor  # (L,) per-layer cosine distance to the teacher
    weights: torch.Tensor  # (L,) per-layer distillation weights

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss.item(), "flow": self.flow.item(), "distill": self.distill.item()}
        for i, (a, w) in enumerate(zip(self.alpha.tolist(), self.weights.tolist()), start=1):
            out[f"alpha_{i}"] = a
            out[f"w_{i}"] = w
        return out


class UniFlowTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        native = config.encoder.image_size // self.encoder.patch_size
        width = self.encoder.width
        self.to_latent = mlp(width, width, config.decoder.latent_channels)
        self.decoder = PixelFlowDecoder(config.decoder, width, self.encoder.patch_size, (native, native))
        for sub in self.to_latent.modules():
            if isinstance(sub, nn.Linear):
                nn.init.xavier_uniform_(sub.weight)
                nn.init.zeros_(sub.bias)

    # ----------------------------------------------------------------- inputs
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, images: ImageLike | list[ImageLike], resize: bool = False) -> torch.Tensor:
        """User images -> normalised (B, 3, H, W) on the model's device.

        resize=False requires sides divisible by the patch size; resize=True resizes and centre-crops to the
        encoder's native size.
        """
        batch = to_batch(images)
        if resize:
            batch = resize_center_crop(batch, self.config.encoder.image_size)
        h, w = batch.shape[-2:]
        self.encoder.grid_for(h, w)
        return self.encoder.normalize(batch.to(self.device))

    # ----------------------------------------------------------------- model
    def _encode_normalized(self, pixels: torch.Tensor) -> tuple[Encoded, list[torch.Tensor]]:
        out = self.encoder(pixels)
        tokens = out.last
        return Encoded(self.to_latent(tokens), tokens, out.grid), out.hidden_states

    def loss(self, pixels: torch.Tensor, teacher_states: Sequence[torch.Tensor] | None = None) -> TokenizerLoss:
        """Training objective on prepared pixels: (B, 3, H, W) already normalised (`prepare`, or
        `encoder.normalize` of [0, 1] images), sides divisible by the patch size. No input checks here: a training
        step must not sync the device to validate its batch.

        teacher_states: the frozen teacher's hidden states on the same pixels (`uniflow.distill.FrozenTeacher`, a
        copy of the initial encoder); required when `distill_weight > 0`. The teacher lives with the training module,
        never in the inference model.
        """
        encoded, student_states = self._encode_normalized(pixels)
        flow_loss = self.decoder.loss(encoded.latents, pixels, encoded.grid, self.config.flow)
        num_layers = len(student_states)
        if self.config.distill_weight > 0:
            if teacher_states is None:
                raise ConfigError("distill_weight > 0 needs the teacher's hidden states: pass teacher_states (the "
                                  "training module's frozen copy of the initial encoder), or set distill_weight: 0")
            dist = distillation_loss(student_states, teacher_states, self.config.distill)
            dist_loss, alpha, weights = dist.loss, dist.alpha, dist.weights
        else:
            dist_loss = flow_loss.new_zeros(())
            alpha = weights = flow_loss.new_zeros(num_layers)
        total = self.config.flow_weight * flow_loss + self.config.distill_weight * dist_loss
        return TokenizerLoss(total, flow_loss.detach(), dist_loss.detach(), alpha, weights)

    @torch.no_grad()
    def encode(self, images: ImageLike | list[ImageLike], resize: bool = False) -> Encoded:
        """Images -> 64-d latents (B, N, C) and semantic tokens (B, N, D)."""
        return self._encode_normalized(self.prepare(images, resize))[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, grid: tuple[int, int] | None = None, steps: int | None = None,
               sampler: str | None = None, seed: int | None = None, output: str = "tensor",
               generator: torch.Generator | None = None) -> torch.Tensor | list:
        """Latents (B, N, C) -> images in [0, 1]: a (B, 3, H, W) tensor, or PIL images with output="pil"."""
        channels = self.config.decoder.latent_channels
        if latents.ndim != 3 or latents.shape[-1] != channels:
            raise ImageInputError(f"latents must have shape (B, N, {channels}), got {tuple(latents.shape)}")
        n = latents.shape[1]
        if grid is None:
            side = round(n ** 0.5)
            if side * side != n:
                raise ImageInputError(f"{n} latent tokens do not form a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise ImageInputError(f"grid {grid} has {grid[0] * grid[1]} cells but latents have {n} tokens")
        steps = self.config.flow.sample_steps if steps is None else steps  # 0 is an error, never "the default"
        sampler = self.config.flow.sampler if sampler is None else sampler
        check_sampler(sampler, steps)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        latents = latents.to(self.device, next(self.decoder.parameters()).dtype)
        pixels = self.decoder.sample(latents, tuple(grid), steps, sampler, generator)
        images = self.encoder.denormalize(pixels.float()).clamp(0, 1)
        if output == "pil":
            return to_pil(images)
        if output != "tensor":
            raise ValueError(f"output must be 'tensor' or 'pil', got {output!r}")
        return images

    @torch.no_grad()
    def reconstruct(self, images: ImageLike | list[ImageLike], steps: int | None = None, sampler: str | None = None,
                    seed: int | None = None, resize: bool = False) -> torch.Tensor | list:
        """Encode then decode. PIL in -> PIL out; tensors in -> (B, 3, H, W) tensor in [0, 1] out."""
        encoded = self.encode(images, resize)
        as_pil = not isinstance(images, torch.Tensor)
        return self.decode(encoded.latents, encoded.grid, steps, sampler, seed, output="pil" if as_pil else "tensor")

    # ----------------------------------------------------------------- io
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save_folder(folder, self.config.to_dict(), self.state_dict(), dtype)

    @classmethod
    def from_config(cls, config: TokenizerConfig, load_pretrained_encoder: bool = True) -> UniFlowTokenizer:
        if not load_pretrained_encoder:
            config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, pretrained=None))
        return cls(config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> UniFlowTokenizer:
        folder = Path(folder)
        config = TokenizerConfig.from_dict(checkpoint.read_config(folder), f"{folder / checkpoint.CONFIG_NAME}")
        weights = checkpoint.read_weights(folder)
        model = cls.from_config(config, load_pretrained_encoder=False)
        model.config = config
        checkpoint.load_state_strict(model, weights, str(folder / checkpoint.WEIGHTS_NAME))
        return model.to(device=device, dtype=dtype).eval()
