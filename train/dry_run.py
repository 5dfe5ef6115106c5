"""Check a run config without training: resolve it, fill the DeepSpeed JSON for a given number of processes and build
the model on the meta device (no memory, no weight files, no data). This is how the full-scale recipes are tested on
a CPU: a config that passes here fails on a cluster only for cluster reasons."""

from __future__ import annotations

from typing import Any

import torch

from train.config import TrainConfig
from train.ds_config import batch_layout, build_ds_config, resolve_precision, zero_stage
from train.tasks import get_task


def dry_run(config: TrainConfig, world_size: int = 1, device: str = "cuda") -> dict[str, Any]:
    """Summary of what `train` would run with `world_size` processes on `device` ("cuda" or "cpu")."""
    task = get_task(config.kind)(config, dry_run=True)
    dev = torch.device(device)
    ds = build_ds_config(config, world_size, dev)
    micro, accum = batch_layout(config, world_size)
    with torch.device("meta"):
        model = task.build_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "kind": config.kind,
        "world_size": world_size,
        "device": device,
        "precision": resolve_precision(config.deepspeed.precision, dev),
        "zero_stage": zero_stage(ds),
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "global_batch_size": config.batch_size,
        "steps": config.steps,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "deepspeed_config": ds,
    }
