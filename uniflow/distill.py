"""Layer-wise adaptive self-distillation (UniFlow §3.1).

For layers l = 1..L with student/teacher patch tokens H_U^l, H_T^l:
    alpha_l = 1 - mean_tokens cos(H_U^l, H_T^l)
    w_l     = (l/L) exp(beta alpha_l) / sum_k (k/L) exp(beta alpha_k)      (a constant: no gradient through w)
    L_dist  = sum_l w_l alpha_l
Deep layers carry the semantics and get the larger prior weight; a layer that drifts is temporarily up-weighted.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uniflow.errors import ConfigError

WEIGHTINGS = ("adaptive", "uniform", "last")


@dataclass
class DistillConfig:
    """weighting: "adaptive" (the paper), "uniform" (1/L each) or "last" (last layer only), for ablations."""

    weighting: str = "adaptive"
    beta: float = 2.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"distill.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


@dataclass
class DistillResult:
    loss: torch.Tensor
    alpha: torch.Tensor  # (L,) detached per-layer cosine distance
    weights: torch.Tensor  # (L,) detached layer weights, summing to 1


def layer_alignment(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """alpha_l = 1 - mean token cosine similarity, for every layer: (L,) with gradient to the student."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers but teacher has {len(teacher)}")
    return torch.stack([
        1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-6).mean() for s, t in zip(student, teacher)
    ])


def layer_weights(alpha: torch.Tensor, weighting: str = "adaptive", beta: float = 2.0) -> torch.Tensor:
    """The layer weights w (L,), computed from detached alpha so they act as constants."""
    alpha = alpha.detach().float()
    num_layers = alpha.numel()
    if weighting == "uniform":
        return torch.full_like(alpha, 1.0 / num_layers)
    if weighting == "last":
        w = torch.zeros_like(alpha)
        w[-1] = 1.0
        return w
    if weighting != "adaptive":
        raise ConfigError(f"unknown distillation weighting {weighting!r}; expected one of {WEIGHTINGS}")
    prior = torch.arange(1, num_layers + 1, dtype=alpha.dtype, device=alpha.device) / num_layers
    raw = prior * torch.exp(beta * alpha)
    return raw / raw.sum()


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      config: DistillConfig | None = None) -> DistillResult:
    config = config or DistillConfig()
    alpha = layer_alignment(student, [t.detach() for t in teacher])
    weights = layer_weights(alpha, config.weighting, config.beta)
    return DistillResult(loss=(weights * alpha).sum(), alpha=alpha.detach(), weights=weights)


class FrozenTeacher(nn.Module):
    """The distillation teacher: a frozen copy of the initial encoder, always in eval mode and without gradients.

    It belongs to the training module (never to the inference tokenizer), so no checkpoint carries it twice.
    """

    def __init__(self, encoder: nn.Module, copy_encoder: bool = True) -> None:
        """copy_encoder=False adopts `encoder` itself (one built for the teacher, e.g. under ZeRO-3, where the
        partitioned parameters of the student cannot be deep-copied)."""
        super().__init__()
        self.encoder = copy.deepcopy(encoder) if copy_encoder else encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states of every layer for normalised pixels."""
        return self.encoder(pixels).hidden_states
