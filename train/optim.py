"""AdamW over the trainable parameters only, and the warm-up + cosine/constant learning-rate schedule.

Frozen parameters (the distillation teacher) never reach the optimizer: they would cost two fp32 Adam moments each
and, under ZeRO, a gradient partition. Biases, norms and position/class embeddings get no weight decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config import OptimConfig

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, config: OptimConfig) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warm-up to 1, then constant or cosine
    down to min_lr_ratio at `total`."""
    warm = config.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    span = max(total - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupSchedule:
    """Sets each param group's lr from `lr_factor`; DeepSpeed calls `step()` after every optimizer step.

    A plain object rather than a torch LRScheduler: DeepSpeed hands schedulers its own optimizer wrappers, which
    torch's schedulers reject, and the state is just the step counter.
    """

    def __init__(self, optimizer: Any, total_steps: int, config: OptimConfig) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.config = config
        self.base_lrs = [config.lr for _ in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.last_step, self.total_steps, self.config)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self, *_: Any, **__: Any) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
