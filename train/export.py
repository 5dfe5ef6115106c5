"""Full weights of the training module from a live DeepSpeed engine, for the inference folder.

Under ZeRO 0/2 every rank holds the whole model; under ZeRO-3 each parameter is gathered in turn
(`deepspeed.zero.GatheredParameters`, one at a time, so peak memory is the model on rank 0's CPU plus one parameter),
and the EMA partitions are gathered the same way. Entries the task does not export (the distillation teacher) are
never gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from train.distributed import DistInfo, barrier
from train.ema import EMA
from train.tasks import Task
from uniflow.errors import ConfigError

DTYPES = {None: None, "float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def consolidated_state_dict(module: nn.Module, partitioned: bool, is_main: bool,
                            keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """CPU fp32-or-native copies of every kept state-dict entry (on rank 0; other ranks get {}). Collective under
    ZeRO-3."""
    params = dict(module.named_parameters(remove_duplicate=False))
    names = [n for n in module.state_dict(keep_vars=True) if keep(n)]
    buffers = dict(module.named_buffers(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name in params:
            p = params[name]
            if partitioned:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if is_main:
                        out[name] = p.data.detach().cpu().clone()
            elif is_main:
                out[name] = p.detach().cpu().clone()
        elif is_main and name in buffers:
            out[name] = buffers[name].detach().cpu().clone()
    return out


def export_model(task: Task, module: nn.Module, dist_info: DistInfo, partitioned: bool, out_dir: Path,
                 ema: EMA | None, use_ema: bool, dtype_name: str | None, metrics: dict[str, float]) -> Path | None:
    """Collective: write the task's inference folder (rank 0) from the live weights or their EMA."""
    if use_ema and ema is None:
        raise ConfigError("export.use_ema is true but ema.enabled is false")
    if dtype_name not in DTYPES:
        raise ConfigError(f"export.dtype: {dtype_name!r} is not one of {sorted(k for k in DTYPES if k)}")
    state = consolidated_state_dict(module, partitioned, dist_info.is_main, task.export_key)
    if use_ema:
        averaged = ema.full_state()
        if dist_info.is_main:
            for name, value in averaged.items():
                if name in state:
                    state[name] = value.to(state[name].dtype) if not state[name].is_floating_point() else value
    result = None
    if dist_info.is_main:
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        result = task.export(state, out_dir, DTYPES[dtype_name], metrics)
    barrier()
    return result
