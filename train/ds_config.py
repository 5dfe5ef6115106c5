"""DeepSpeed JSON: read a shipped (or user) ZeRO config and fill it from the run config.

Batch sizes, accumulation, clipping and precision live in the run config only; the JSON keeps "auto" for them and
chooses the ZeRO stage, offload and bucket sizes. A concrete JSON value that disagrees with the run config is
overridden with a warning (two sources of truth silently disagreeing is how runs train with the wrong batch).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig
from uniflow.configs import deep_merge, read_json
from uniflow.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED = ("zero0", "zero2", "zero3", "zero3_offload")


def resolve_path(name: str) -> Path:
    """A shipped name ("zero2") or a path to a JSON file."""
    if name in SHIPPED:
        return CONFIG_DIR / f"{name}.json"
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {name!r} is neither a shipped config {list(SHIPPED)} nor a JSON file")
    return path


def read_ds_json(name: str) -> dict[str, Any]:
    path = resolve_path(name)
    data = read_json(path)
    for section in ("optimizer", "scheduler"):
        if section in data:
            raise ConfigError(f"{path}: remove the {section!r} section; the run config's `optim` sets it")
    return data


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def batch_layout(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per process, gradient accumulation steps) for the global batch; errors name the fields."""
    micro = config.micro_batch_size
    if micro is None:
        if config.batch_size % world_size:
            raise ConfigError(f"{config.source}: batch_size {config.batch_size} is not divisible by the "
                              f"{world_size} processes; set micro_batch_size")
        micro = config.batch_size // world_size
    per_step = micro * world_size
    if config.batch_size % per_step:
        raise ConfigError(f"{config.source}: batch_size {config.batch_size} is not a multiple of micro_batch_size "
                          f"{micro} x {world_size} processes")
    return micro, config.batch_size // per_step


def build_ds_config(config: TrainConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The dict passed to `deepspeed.initialize`."""
    data = deep_merge(read_ds_json(config.deepspeed.config), config.deepspeed.overrides)
    micro, accum = batch_layout(config, world_size)
    precision = resolve_precision(config.deepspeed.precision, device)
    filled = {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": max(config.optim.grad_clip, 0.0),
    }
    for key, value in filled.items():
        current = data.get(key, "auto")
        if current != "auto" and current != value:
            warnings.warn(f"deepspeed.config {config.deepspeed.config}: {key}={current} is replaced by {value} from "
                          f"the run config (the one source of truth)", stacklevel=2)
        data[key] = value
    fp16 = data.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise ConfigError(f"deepspeed.config {config.deepspeed.config}: fp16 is not supported; use "
                          "deepspeed.precision=bf16")
    data["bf16"] = {**(data.get("bf16") if isinstance(data.get("bf16"), dict) else {}),
                    "enabled": precision == "bf16"}
    data.pop("fp16", None)
    data.setdefault("zero_optimization", {"stage": 0})
    data.setdefault("zero_allow_untested_optimizer", True)
    data.setdefault("steps_per_print", 10**9)
    return data


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
