"""The per-token velocity network: an MLP whose only access to the condition is adaLN modulation.

It serves both the tokenizer (one flow per image patch, conditioned on the global blocks' output) and the generator
(one flow per 64-d latent token, conditioned on the causal transformer's hidden state).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) times t of shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal(1000 t) -> MLP, as in DiT/MAR."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(1000.0 * t, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNResBlock(nn.Module):
    """LayerNorm -> adaLN shift/scale -> Linear-SiLU-Linear -> gated residual.

    `ada` takes SiLU(y), computed once by the head for all blocks (DiT's adaLN is SiLU then Linear).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Linear(width, 3 * width)

    def modulation(self, y_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, 1 + scale, gate) for SiLU(y): everything the block takes from the condition."""
        shift, scale, gate = self.ada(y_act).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor, gate: torch.Tensor
                  ) -> torch.Tensor:
        """x + gate * MLP(LayerNorm(x) * (1 + scale) + shift), each modulation one fused element-wise pass."""
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, self.norm(x), scale1)))

    def forward(self, x: torch.Tensor, y_act: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.modulation(y_act))


class FinalLayer(nn.Module):
    """LayerNorm without affine -> adaLN shift/scale (from SiLU(y)) -> Linear to the output channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_channels)

    def modulation(self, y_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, 1 + scale) for SiLU(y)."""
        shift, scale = self.ada(y_act).chunk(2, dim=-1)
        return shift, 1 + scale

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.addcmul(shift, self.norm(x), scale1))

    def forward(self, x: torch.Tensor, y_act: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.modulation(y_act))


class FlowHead(nn.Module):
    """v_theta(x_t, t, c) for a batch of independent tokens.

    x_t: (M, channels) noisy token, t: (M,) in [0, 1], c: (M, cond_dim) condition. Returns (M, channels).
    """

    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.input_proj = nn.Linear(channels, width)
        self.time_embed = TimestepEmbedder(width, frequency_dim)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = FinalLayer(width, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for linears, N(0, 0.02) for the time MLP, and zero for every adaLN modulation and the output.

        Zero-init makes each residual block start as the identity and the initial velocity zero (DiT/MAR practice).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.time_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for ada in [block.ada for block in self.blocks] + [self.final.ada]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1 and t.numel() > 1 and t.stride(0) == 0:
            # one time shared by every token (the samplers pass t.expand(M)): embed it once
            t_emb = self.time_embed(t[:1]).expand(t.shape[0], -1)
        else:
            t_emb = self.time_embed(t)
        return self.token_path(x, self.modulations(F.silu(t_emb + self.cond_embed(cond))))

    def modulations(self, y_act: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's and the final layer's adaLN terms for SiLU(y) (the part of the head that sees no token)."""
        return [block.modulation(y_act) for block in self.blocks] + [self.final.modulation(y_act)]

    def token_path(self, x: torch.Tensor, modulations: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The head's output for tokens x under precomputed `modulations`."""
        h = self.input_proj(x)
        for block, terms in zip(self.blocks, modulations[:-1], strict=True):
            h = block.modulated(h, *terms)
        return self.final.modulated(h, *modulations[-1])

    def grid_modulations(self, cond: torch.Tensor, times: torch.Tensor) -> list[list[tuple[torch.Tensor, ...]]]:
        """`modulations` for conditions cond (M, cond_dim) at each time of a sampler's grid (S,), computed in one
        batched pass: element i serves `token_path` at times[i]. They depend on no token, so a sampler that
        evaluates the head only on its grid (`uniflow.flow.integrate`) computes them once per condition, and each
        ODE evaluation runs only the token path: that skips the time MLP and the adaLN projections, most of a narrow
        head's weights (generating one token evaluates the head `steps` times)."""
        y_act = F.silu(self.time_embed(times)[:, None] + self.cond_embed(cond)[None])  # (S, M, width)
        unbound = [[term.unbind(0) for term in terms] for terms in self.modulations(y_act)]
        return [[tuple(term[i] for term in terms) for terms in unbound] for i in range(len(times))]

    def on_grid(self, cond: torch.Tensor, times: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The head as f(i, x) = forward(x, times[i], cond), with `grid_modulations` computed once."""
        by_time = self.grid_modulations(cond, times)
        return lambda i, x: self.token_path(x, by_time[i])
