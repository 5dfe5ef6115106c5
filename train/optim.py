"""AdamW over the trainable parameters only, in named groups with their own learning rates, and the warm-up +
cosine/constant learning-rate schedule.

A task names its parameter groups (`Task.param_groups`: e.g. projector / LoRA / encoder), each with its own base lr
(absolute, or a scale of `optim.lr`) and weight decay; `optim.groups.NAME` overrides them from the run config. The
schedule multiplies every group's own base lr by the same factor, so the ratios between groups hold through warm-up,
decay and resume. Frozen parameters (the distillation teacher, a frozen LLM) never reach the optimizer: they would cost
two fp32 Adam moments each and, under ZeRO, a gradient partition. Biases, norms and position/class embeddings get no
weight decay in any group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from train.config import OptimConfig
from uniflow.errors import ConfigError

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token")


@dataclass
class ParamGroup:
    """Named trainable parameters with their own base lr: `lr` if set, else `optim.lr * lr_scale`; `weight_decay`
    None means `optim.weight_decay` (for matrices; vectors and embeddings never decay)."""

    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr: float | None = None
    lr_scale: float = 1.0
    weight_decay: float | None = None


def no_decay(name: str, p: torch.Tensor) -> bool:
    shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 parameter keeps its real shape there
    return len(shape) <= 1 or any(key in name for key in _NO_DECAY_NAMES)


def default_groups(model: nn.Module) -> list[ParamGroup]:
    return [ParamGroup("all", [(n, p) for n, p in model.named_parameters() if p.requires_grad])]


def torch_param_groups(groups: list[ParamGroup], config: OptimConfig) -> list[dict[str, Any]]:
    """The optimizer's groups: each named group split into decayed and non-decayed parameters, with its base lr
    stored as "base_lr" (the schedule scales it; it survives in the optimizer's state dict)."""
    known = {g.name for g in groups}
    unknown = sorted(set(config.groups) - known)
    if unknown:
        raise ConfigError(f"optim.groups: unknown group(s) {unknown}; this task's groups are {sorted(known)}")
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for group in groups:
        override = config.groups.get(group.name)
        lr, scale, decay = group.lr, group.lr_scale, group.weight_decay
        if override is not None:
            if override.lr is not None:
                lr = override.lr
            if override.lr_scale is not None:
                lr, scale = None, override.lr_scale
            if override.weight_decay is not None:
                decay = override.weight_decay
        base = lr if lr is not None else config.lr * scale
        decay = config.weight_decay if decay is None else decay
        parts: dict[bool, list[nn.Parameter]] = {False: [], True: []}
        for name, p in group.params:
            if not p.requires_grad:
                continue
            if id(p) in seen:
                raise ConfigError(f"optim: parameter {name} is in two parameter groups")
            seen.add(id(p))
            parts[no_decay(name, p)].append(p)
        for skip, params in parts.items():
            if params:
                out.append({"params": params, "name": group.name + ("/no_decay" if skip else ""), "lr": base,
                            "base_lr": base, "weight_decay": 0.0 if skip else decay})
    return out


def build_optimizer(model: nn.Module, config: OptimConfig, groups: list[ParamGroup] | None = None
                    ) -> torch.optim.Optimizer:
    """AdamW over the task's parameter groups (default: one group "all" of every trainable parameter)."""
    param_groups = torch_param_groups(groups if groups is not None else default_groups(model), config)
    if not param_groups:
        raise ConfigError("the model has no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
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


def group_base_lrs(optimizer: Any) -> list[float]:
    return [float(g.get("base_lr", g["lr"])) for g in optimizer.param_groups]


class WarmupSchedule:
    """Sets each param group's lr to its own base lr times `lr_factor`; DeepSpeed calls `step()` after every
    optimizer step.

    A plain object rather than a torch LRScheduler: DeepSpeed hands schedulers its own optimizer wrappers, which
    torch's schedulers reject, and the state is just the step counter. The base lrs come from the groups'
    "base_lr" (set by `build_optimizer`), never from `optim.lr` alone.
    """

    def __init__(self, optimizer: Any, total_steps: int, config: OptimConfig) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.config = config
        self.base_lrs = group_base_lrs(optimizer)
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
        """Restores the step; the base lrs stay those of this run's config (the optimizer's groups)."""
        self.last_step = int(state["last_step"])
        self._apply()
