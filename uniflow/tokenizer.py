"""UniFlowTokenizer: a pretrained ViT adapted into a continuous 64-d-per-patch tokenizer with a pixel flow decoder.

encode: image -> encoder tokens h (semantic, for the MLLM) -> z = MLP(h) (B, N, 64 latent, for generation)
decode: z -> PixelFlowDecoder -> pixels, by 1 (or more) Euler/Heun steps from noise
loss:   lambda_d * layer-wise adaptive self-distillation + lambda_f * per-patch flow matching

Its two consumers (docs/architecture.md): the MLLM reads semantic tokens from the encoder alone (`load_encoder`, which
reads only the `encoder.*` tensors of a folder); the generator models latents normalised by the per-channel
statistics stored beside the weights (`normalize_latents` / `denormalize_latents`, `uniflow.latent_stats`).
Folders are local paths or hub repository ids (`uniflow.hub`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from uniflow import checkpoint, hub
from uniflow.configs import KindConfig
from uniflow.deblock import deblock as deblock_patches
from uniflow.decoder import DecoderConfig, PixelFlowDecoder, mlp
from uniflow.distill import DistillConfig, distillation_loss
from uniflow.encoders import EncoderConfig, VisionEncoder, build_encoder
from uniflow.errors import CheckpointError, ConfigError, ImageInputError
from uniflow.flow import FlowConfig, check_sampler
from uniflow.images import ImageLike, check_latents, to_pil
from uniflow.latent_stats import STATS_NAME, LatentStats, read_latent_stats, save_latent_stats

MODEL_KIND = "uniflow-tokenizer"


@dataclass
class TokenizerConfig(KindConfig):
    """The tokenizer's parts and loss weights; `config.json` of a tokenizer folder."""

    MODEL_KIND = MODEL_KIND

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    distill_weight: float = 1.0
    flow_weight: float = 1.0


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
        self.latent_stats: LatentStats | None = None  # set by from_pretrained / set_latent_stats; not a weight
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

        resize=False requires sides divisible by the patch size; resize=True resizes and centre-crops each image to
        the encoder's native size with `uniflow.images.preprocess`, the same function training data goes through.
        """
        return self.encoder.preprocess(images, resize)

    # ----------------------------------------------------------------- model
    def _encode_normalized(self, pixels: torch.Tensor,
                           layers: Sequence[int] | None = None) -> tuple[Encoded, list[torch.Tensor]]:
        out = self.encoder(pixels, layers)
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

    def encode(self, images: ImageLike | list[ImageLike], resize: bool = False, grad: bool = False) -> Encoded:
        """Images -> 64-d latents (B, N, C) and semantic tokens (B, N, D) (the last layer's).

        grad=True keeps the autograd graph (fine-tuning the encoder through this path); by default no graph is built.
        """
        with torch.set_grad_enabled(grad):
            return self._encode_normalized(self.prepare(images, resize), layers=[-1])[0]

    # ----------------------------------------------------------------- latent statistics
    @property
    def has_latent_stats(self) -> bool:
        return self.latent_stats is not None

    def _require_stats(self) -> LatentStats:
        if self.latent_stats is None:
            raise CheckpointError(f"this tokenizer has no latent statistics ({STATS_NAME}); compute them with "
                                  f"`uniflow latent-stats --tokenizer DIR --data shapeworld|FOLDER`")
        return self.latent_stats

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C) latents -> per-channel standardised latents, what a generator models. Raises CheckpointError
        when the tokenizer has no statistics: a generator must never train silently on unnormalised latents."""
        return self._require_stats().normalize(latents)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`: a generator's output -> latents for `decode`."""
        return self._require_stats().denormalize(latents)

    def set_latent_stats(self, stats: LatentStats | None) -> None:
        """Attach statistics (e.g. fresh from `compute_latent_stats`); None removes them."""
        channels = self.config.decoder.latent_channels
        if stats is not None and stats.channels != channels:
            raise ConfigError(f"latent statistics have {stats.channels} channels, the tokenizer's latents {channels}")
        self.latent_stats = stats

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, grid: tuple[int, int] | None = None, steps: int | None = None,
               sampler: str | None = None, seed: int | None = None, output: str = "tensor",
               generator: torch.Generator | None = None, deblock: float | None = None) -> torch.Tensor | list:
        """Latents (B, N, C) -> images in [0, 1]: a (B, 3, H, W) tensor, or PIL images with output="pil".
        deblock: threshold of the patch-border deblocking filter (None: the config's `decoder.deblock`; 0: off)."""
        latents = check_latents(latents, self.config.decoder.latent_channels)
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
        images = self.encoder.denormalize(pixels.float())
        decoder = self.config.decoder
        threshold = decoder.deblock if deblock is None else deblock
        if threshold:
            images = deblock_patches(images, self.encoder.patch_size, threshold, decoder.deblock_reach)
        images = images.clamp(0, 1)
        if output == "pil":
            return to_pil(images)
        if output != "tensor":
            raise ValueError(f"output must be 'tensor' or 'pil', got {output!r}")
        return images

    @torch.no_grad()
    def reconstruct(self, images: ImageLike | list[ImageLike], steps: int | None = None, sampler: str | None = None,
                    seed: int | None = None, resize: bool = False, deblock: float | None = None
                    ) -> torch.Tensor | list:
        """Encode then decode. PIL in -> PIL out; tensors in -> (B, 3, H, W) tensor in [0, 1] out."""
        encoded = self.encode(images, resize)
        as_pil = not isinstance(images, torch.Tensor)
        return self.decode(encoded.latents, encoded.grid, steps, sampler, seed, output="pil" if as_pil else "tensor",
                           deblock=deblock)

    # ----------------------------------------------------------------- io
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write `config.json` + `model.safetensors`; an existing tokenizer checkpoint is replaced only with
        overwrite=True, and a non-empty folder of anything else is refused (see `uniflow.checkpoint.save_folder`)."""
        dest = checkpoint.save_folder(folder, self.config.to_dict(), self.state_dict(), dtype, overwrite=overwrite)
        if self.latent_stats is not None:
            save_latent_stats(dest, self.latent_stats, overwrite=True)
        else:  # an overwritten tokenizer's statistics describe other weights: they go with them
            (dest / STATS_NAME).unlink(missing_ok=True)
        return dest

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str | None = None,
                    dtype: torch.dtype | None = None) -> str:
        """Save this tokenizer (with its latent statistics) to a temporary folder and upload it to the hub
        repository `repo_id` (created if missing); returns the commit URL."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="uniflow-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "tokenizer", dtype=dtype)
            return hub.push_folder(folder, repo_id, private=private, token=token, revision=revision,
                                   commit_message=commit_message)

    @classmethod
    def from_config(cls, config: TokenizerConfig, load_pretrained_encoder: bool = True) -> UniFlowTokenizer:
        if not load_pretrained_encoder:
            config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, pretrained=None))
        return cls(config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None) -> UniFlowTokenizer:
        """Load a tokenizer folder (config.json, model.safetensors, latent_stats.safetensors if present): a local
        path, or a hub repository id `org/name` (at `revision`) when no such local path exists."""
        folder = hub.resolve_folder(folder, revision, what="tokenizer")
        config = read_tokenizer_config(folder)
        weights = checkpoint.read_weights(folder)
        model = cls.from_config(config, load_pretrained_encoder=False)
        model.config = config
        checkpoint.load_state_strict(model, weights, str(folder / checkpoint.WEIGHTS_NAME))
        model.latent_stats = read_latent_stats(folder, config.decoder.latent_channels)
        return model.to(device=device, dtype=dtype).eval()


def read_tokenizer_config(folder: Path) -> TokenizerConfig:
    return TokenizerConfig.from_dict(checkpoint.read_config(folder), f"{folder / checkpoint.CONFIG_NAME}")


ENCODER_PREFIX = "encoder."


def _encoder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The `encoder.*` tensors of a folder's weights, prefix removed, reading nothing else: `safe_open` reads only
    the header and the tensors asked for, and with a sharded index only the shards that hold encoder tensors."""
    from safetensors import SafetensorError, safe_open

    index = folder / checkpoint.INDEX_NAME
    if index.is_file():
        checkpoint._index_shards(index)  # validates the shard names (the one place that knows the index format)
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / shard for key, shard in weight_map.items() if key.startswith(ENCODER_PREFIX)})
    else:
        files = [folder / checkpoint.WEIGHTS_NAME]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: weights file not found")
        try:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    if key.startswith(ENCODER_PREFIX):
                        state[key[len(ENCODER_PREFIX):]] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: weights file is truncated or corrupt ({exc})") from None
    return state


def load_encoder(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 revision: str | None = None) -> VisionEncoder:
    """The encoder alone from a tokenizer folder (a trained one or the converted official checkpoint): what the MLLM
    needs. Only the encoder's tensors are read, never the decoder's. It keeps its preprocessing
    (`encoder.preprocess(images, resize=True)`) and can return chosen layers (`encoder(pixels, layers=[-2])`); in
    train mode, with requires_grad, it fine-tunes like any module. Returned in eval mode."""
    folder = hub.resolve_folder(folder, revision, what="tokenizer")
    config = read_tokenizer_config(folder)
    encoder = build_encoder(dataclasses.replace(config.encoder, pretrained=None))
    checkpoint.load_state_strict(encoder, _encoder_tensors(folder),
                                 f"{folder / checkpoint.WEIGHTS_NAME} (encoder.* tensors)")
    return encoder.to(device=device, dtype=dtype).eval()
