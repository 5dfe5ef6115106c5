"""ARGenerator: a class-conditional causal transformer over UniFlow's continuous latent tokens, with a flow head.

UniFlow tokens are continuous 64-d vectors, so there is no codebook to take a softmax over: as in MAR ("Autoregressive
Image Generation without Vector Quantization", Li et al. 2024), the transformer's hidden state at each position
conditions a small per-token flow (here the project's rectified flow, `uniflow.flow`, and its velocity MLP,
`uniflow.flow_head.FlowHead`, the very class the pixel decoder uses) that samples the next token.

Sequence layout (length N = the number of latent tokens, raster order):
    position 0:      class embedding (the null class, id `num_classes`, for the unconditional branch)
    position p >= 1: input projection of token p - 1 (normalised latents: `uniflow.latent_stats`)
    hidden state at position p -> flow head -> token p
The 2-D rotary embedding gives position p the grid coordinates of token p, the token it predicts: relative offsets
between queries and keys are then offsets between target cells, and the class position sits at the first cell.

Blocks are LLaMA's (pre-RMSNorm, rotary attention without biases, SwiGLU MLP). Training: flow matching per token
with `noise_draws` noise/time draws per token per step (MAR uses 4: the head is cheap, the transformer pass is not),
and class dropout (10%) that trains the null class for classifier-free guidance. Sampling lives apart from the
model, in `generator/sample.py`; this module gives it `prefill` / `step` over a static KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generator.fingerprint import short, tokenizer_fingerprint
from uniflow import checkpoint, flow, hub
from uniflow.configs import KindConfig, check_choice, check_number
from uniflow.errors import CheckpointError, ConfigError
from uniflow.flow import FlowConfig
from uniflow.flow_head import FlowHead
from uniflow.latent_stats import LatentStats

MODEL_KIND = "uniflow-generator"
CFG_SCHEDULES = ("constant", "linear")


def _default_flow() -> FlowConfig:
    return FlowConfig(sample_steps=8, sampler="euler")


@dataclass
class GeneratorConfig(KindConfig):
    """The generator's sizes, training choices, sampling defaults and the tokenizer it belongs to.

    grid: (rows, cols) of latent tokens (image side / patch side); token_channels: the tokenizer's latent width.
    ffn_hidden: SwiGLU hidden width; None is LLaMA's rule, 2/3 * 4 * width rounded up to `ffn_multiple_of`.
    head_width / head_depth: the flow head (`uniflow.flow_head.FlowHead`). flow: its time sampling at training and
        its default ODE steps / sampler at sampling. prediction: "velocity" or "data" (`uniflow.flow.as_velocity`).
    noise_draws: flow-matching draws (noise, time) per token per training step. class_dropout: probability that a
        training label becomes the null class.
    cfg_scale / cfg_schedule / temperature: sampling defaults (the documented CFG of a trained checkpoint).
    class_names: optional human names of the classes (`--class "red circle"`).
    tokenizer_fingerprint / latent_mean / latent_std: the tokenizer whose normalised latents this generator models
        (`generator.fingerprint`), and the statistics it was trained with; set by training, checked at sampling.
    """

    MODEL_KIND = MODEL_KIND
    kind_error = CheckpointError

    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    token_channels: int = 64
    width: int = 768
    depth: int = 12
    heads: int = 12
    ffn_hidden: int | None = None
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    head_width: int = 1024
    head_depth: int = 6
    flow: FlowConfig = field(default_factory=_default_flow)
    prediction: str = "velocity"
    noise_draws: int = 4
    class_dropout: float = 0.1
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    class_names: list[str] | None = None
    tokenizer_fingerprint: str | None = None
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None

    def __post_init__(self) -> None:
        check_number("num_classes", self.num_classes, 1, None)
        for i, side in enumerate(self.grid):
            check_number(f"grid[{i}]", side, 1, None)
        check_number("token_channels", self.token_channels, 1, None)
        check_number("width", self.width, 1, None)
        check_number("depth", self.depth, 1, None)
        check_number("heads", self.heads, 1, None)
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ConfigError(f"heads: width {self.width} / heads {self.heads} must be an integer head width "
                              f"divisible by 4 (2-D rotary embedding: half the rotated pairs per axis)")
        if self.ffn_hidden is not None:
            check_number("ffn_hidden", self.ffn_hidden, 1, None)
        check_number("ffn_multiple_of", self.ffn_multiple_of, 1, None)
        check_number("norm_eps", self.norm_eps, 0.0, None, lo_open=True)
        check_number("rope_theta", self.rope_theta, 1.0, None, lo_open=True)
        check_number("init_std", self.init_std, 0.0, None, lo_open=True)
        check_number("head_width", self.head_width, 1, None)
        check_number("head_depth", self.head_depth, 0, None)
        flow.check_prediction(self.prediction)
        check_number("noise_draws", self.noise_draws, 1, None)
        check_number("class_dropout", self.class_dropout, 0.0, 1.0, hi_open=True)
        check_number("cfg_scale", self.cfg_scale, 0.0, None)
        check_choice("cfg_schedule", self.cfg_schedule, CFG_SCHEDULES)
        check_number("temperature", self.temperature, 0.0, None, lo_open=True)
        if self.class_names is not None:
            if len(self.class_names) != self.num_classes:
                raise ConfigError(f"class_names: {len(self.class_names)} names for {self.num_classes} classes")
            if len(set(self.class_names)) != len(self.class_names):
                raise ConfigError("class_names: names must be distinct")
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.token_channels:
                raise ConfigError(f"{name}: {len(value)} values for {self.token_channels} token channels")
            if value is not None and not all(math.isfinite(v) for v in value):
                raise ConfigError(f"{name}: non-finite values")
        if self.latent_std is not None and min(self.latent_std) <= 0:
            raise ConfigError("latent_std: values must be positive")
        if (self.latent_mean is None) != (self.latent_std is None):
            raise ConfigError("latent_mean and latent_std: set both or neither")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.width / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)


# ------------------------------------------------------------------------------------------------------ building blocks
def rope_2d(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (rows * cols, head_dim / 2) for raster-ordered cells: the first half of the rotated pairs
    turns with the row, the second half with the column (LlamaGen's 2-D RoPE, without its class-token padding)."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., L, D) by (L, D/2) angles, pairing dimension i with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every layer, allocated once for the whole sequence: (layers, B, H, N, D) each. Decoding
    writes one position in place and attends over all N under a mask, so every step has the same shapes (no
    reallocation, and `torch.compile` traces one graph)."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.k = torch.zeros(layers, batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                at: tuple[torch.Tensor, torch.Tensor | int] | None = None) -> torch.Tensor:
        """Causal self-attention over x (B, L, W) at positions [0, L); with `cache` and `at` = (index (1,), either a
        mask over the cache's positions or the number of filled positions; `ARGenerator.step`), x is the one
        position `index` and the keys/values of [0, index) come from the cache. Prefill (cache, at None) writes
        positions [0, L) into the cache."""
        b, length, width = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)  # queries and keys rotated in one pass
        v = qkv[2]
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif at is None:
            cache[0][:, :, :length] = k
            cache[1][:, :, :length] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            index, visible = at
            cache[0].index_copy_(2, index, k)
            cache[1].index_copy_(2, index, v)
            if isinstance(visible, int):
                out = F.scaled_dot_product_attention(q, cache[0][:, :, :visible], cache[1][:, :, :visible])
            else:
                out = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=visible)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class SwiGLU(nn.Module):
    """LLaMA's MLP: w2(SiLU(w1 x) * w3 x)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config.width, config.heads)
        self.ffn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.ffn = SwiGLU(config.width, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                at: tuple[torch.Tensor, torch.Tensor | int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, at)
        return x + self.ffn(self.ffn_norm(x))


# ---------------------------------------------------------------------------------------------------------- the model
@dataclass
class GeneratorLoss:
    loss: torch.Tensor
    null_fraction: torch.Tensor  # share of the batch's labels that were the null class (class dropout at work)


class ARGenerator(nn.Module):
    """The class-conditional AR generator over normalised latent tokens. See the module docstring."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.class_embed = nn.Embedding(config.num_classes + 1, width)  # the last id is the null class
        self.input_proj = nn.Linear(config.token_channels, width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.RMSNorm(width, eps=config.norm_eps)
        self.head = FlowHead(config.token_channels, width, config.head_width, config.head_depth)
        for name, value in self.position_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for the transformer's linears and embeddings (GPT/LLaMA practice); the head keeps its own
        init (zero adaLN and output: it starts as velocity 0)."""
        for module in [self.class_embed, self.input_proj, *self.blocks]:
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=self.config.init_std)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)
        self.head.reset_parameters()

    def position_buffers(self) -> dict[str, torch.Tensor]:
        """The tables computed from the config, not saved: the rotary cos/sin of every grid cell and the positions
        of the KV cache (decoding masks them against the current one)."""
        cos, sin = rope_2d(self.config.grid, self.config.head_dim, self.config.rope_theta)
        return {"rope_cos": cos, "rope_sin": sin, "cache_positions": torch.arange(self.config.num_tokens)}

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------------------------------------ transformer
    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class dropout: each label becomes the null class with probability `class_dropout`."""
        p = self.config.class_dropout
        if p <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def inputs(self, labels: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """(B, 1 + T, W): the class embedding, then the projections of the T given tokens (B, T, C)."""
        seq = self.class_embed(labels)[:, None]
        if tokens is not None and tokens.shape[1] > 0:
            seq = torch.cat([seq, self.input_proj(tokens.to(seq.dtype))], dim=1)
        return seq

    def hidden_states(self, seq: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Causal pass over positions [0, L) of seq (B, L, W) -> normalised hidden states (B, L, W). With `cache`,
        the keys and values are written into it (prefill)."""
        length = seq.shape[1]
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = seq
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else (cache.k[i], cache.v[i]))
        return self.norm(x)

    def step(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, filled: int | None = None) -> torch.Tensor:
        """One position: x (B, 1, W) (the input projection of token pos - 1) at `pos` (0-d long tensor) -> the
        normalised hidden state (B, W) that conditions token `pos`. Keys/values of [0, pos) come from `cache`.

        filled: pos + 1 as a Python int, when the caller has it (eager decoding): attention then reads only the
        cache's filled positions, a view of it (no copy), about half the cache's memory traffic over a sequence,
        which is most of a step's time at large batches. None attends over the whole cache under a mask: the same
        shapes at every step, one graph for `torch.compile`."""
        index = pos.view(1)
        # what every layer shares, made once per step: the rotation at `pos` and the mask over the cache
        cos = self.rope_cos.index_select(0, index).to(x.dtype)
        sin = self.rope_sin.index_select(0, index).to(x.dtype)
        at = (index, (self.cache_positions <= pos).view(1, 1, 1, -1) if filled is None else filled)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, (cache.k[i], cache.v[i]), at)
        return self.norm(x)[:, 0]

    def new_cache(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache(c.depth, batch, c.heads, c.num_tokens, c.head_dim, device or self.device, dtype or self.dtype)

    # ------------------------------------------------------------------------------------------------------- head
    def velocity(self, cond: torch.Tensor) -> flow.VelocityFn:
        """The head's velocity field for conditions (M, W), as the samplers take it (`uniflow.flow.as_velocity`)."""
        return flow.as_velocity(lambda x, t: self.head(x, t, cond), self.config.prediction)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
             ) -> GeneratorLoss:
        """Flow-matching loss of every token given the previous ones. tokens: normalised latents (B, N, C);
        labels (B,) in [0, num_classes] (the null class allowed). In train mode labels are dropped to the null class
        with probability `class_dropout`. Each token's hidden state is reused for `noise_draws` (noise, time) draws."""
        c = self.config
        if self.training:
            labels = self.drop_labels(labels, generator)
        hidden = self.hidden_states(self.inputs(labels, tokens[:, :-1]))
        cond = hidden.reshape(-1, c.width).repeat(c.noise_draws, 1)
        x1 = tokens.reshape(-1, c.token_channels).to(hidden.dtype).repeat(c.noise_draws, 1)
        loss = flow.flow_matching_loss(lambda x, t: self.head(x, t, cond), x1, c.flow, generator,
                                       prediction=c.prediction)
        return GeneratorLoss(loss, (labels == self.null_class).float().mean())

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(tokens, labels).loss

    # ------------------------------------------------------------------------------------------ classes, latents
    def class_ids(self, classes: Sequence[int | str]) -> list[int]:
        """Class ids from ids or names (`resolve_classes`)."""
        return resolve_classes(self.config, classes)

    def latent_stats(self) -> LatentStats:
        """The statistics the generator's latents are normalised by (set by training from the tokenizer's)."""
        c = self.config
        if c.latent_mean is None or c.latent_std is None:
            raise CheckpointError("this generator records no latent statistics (it was never trained on a "
                                  "tokenizer); set them with attach_tokenizer(tokenizer)")
        return LatentStats(torch.tensor(c.latent_mean), torch.tensor(c.latent_std))

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Record the tokenizer this generator models: its fingerprint and its latent statistics (which
        `UniFlowTokenizer.normalize_latents` uses). Raises CheckpointError when the tokenizer has no statistics."""
        self._check_shapes(tokenizer)
        stats = tokenizer._require_stats()
        self.config.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.config.latent_mean = [float(v) for v in stats.mean.tolist()]
        self.config.latent_std = [float(v) for v in stats.std.tolist()]

    def _check_shapes(self, tokenizer: Any) -> None:
        channels = tokenizer.config.decoder.latent_channels
        if channels != self.config.token_channels:
            raise CheckpointError(f"tokenizer latents have {channels} channels, the generator models "
                                  f"{self.config.token_channels}")

    def check_tokenizer(self, tokenizer: Any, name: str = "tokenizer") -> None:
        """Refuse a tokenizer whose latents are not the ones this generator was trained on (another fingerprint)
        or have another width. `name` is how the message calls the tokenizer (a flag or a folder)."""
        self._check_shapes(tokenizer)
        expected = self.config.tokenizer_fingerprint
        if expected is None:
            return
        got = tokenizer_fingerprint(tokenizer)
        if got != expected:
            raise CheckpointError(f"{name}: tokenizer {short(got)} is not the one this generator was trained on "
                                  f"({short(expected)}): its latents mean something else; use the tokenizer the "
                                  f"generator was trained with (the bundle's tokenizer/ beside generator/)")

    # --------------------------------------------------------------------------------------------------- sampling
    def sample(self, classes: Sequence[int | str], **options: Any) -> torch.Tensor:
        """Normalised latents (B, N, C) for the classes; options as `generator.sample.sample_latents`."""
        from generator.sample import sample_latents

        return sample_latents(self, self.class_ids(classes), **options)

    # --------------------------------------------------------------------------------------------------------- io
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write `config.json` + `model.safetensors` (see `uniflow.checkpoint.save_folder` for what may be
        replaced: an existing generator folder only with overwrite=True)."""
        return checkpoint.save_folder(folder, self.config.to_dict(), self.state_dict(), dtype, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None) -> ARGenerator:
        """Load a generator folder: a local path, or a hub repository id `org/name` when no such path exists. A
        folder of another kind (a tokenizer's) is a CheckpointError naming it."""
        folder = hub.resolve_folder(folder, revision, what="generator")
        config = GeneratorConfig.from_dict(checkpoint.read_config(folder), str(folder / checkpoint.CONFIG_NAME))
        weights = checkpoint.read_weights(folder)
        checkpoint.check_finite(weights, str(folder / checkpoint.WEIGHTS_NAME))
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")
        checkpoint.load_state_strict(model, weights, str(folder / checkpoint.WEIGHTS_NAME))
        with torch.device("cpu"):
            for name, value in model.position_buffers().items():  # to_empty left them uninitialised
                setattr(model, name, value)
        return model.to(device=device, dtype=dtype).eval()


def resolve_classes(config: GeneratorConfig, classes: Sequence[int | str]) -> list[int]:
    """Class ids from ids or names; ConfigError naming the bad one and the valid range (or some names)."""
    names = config.class_names
    out = []
    for value in classes:
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            if names is None:
                raise ConfigError(f"class {value!r}: this generator has no class names; give a class id in "
                                  f"[0, {config.num_classes})")
            if value not in names:
                close = [n for n in names if value.lower() in n.lower() or n.lower() in value.lower()][:5]
                raise ConfigError(f"class {value!r}: unknown class name; e.g. {close or list(names[:5])} "
                                  f"({len(names)} classes)")
            out.append(names.index(value))
            continue
        index = int(value)
        if not 0 <= index < config.num_classes:
            raise ConfigError(f"class id {index}: out of range; expected [0, {config.num_classes})")
        out.append(index)
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part: the transformer (everything but the head) and the flow head."""
    head = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"transformer": total - head, "head": head, "total": total}
