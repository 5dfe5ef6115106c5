"""What differs between model kinds, behind one interface the engine drives: a name -> Task registry.

A task builds the training module, its datasets, evaluates on held-out data and writes the inference folder. The
engine owns everything else (DeepSpeed, the loop, checkpoints, logs), so the generator and the MLLM only add a task.

The training module's forward takes a collated batch and returns {"loss": scalar, "metrics": {name: 0-d tensor}};
evaluation calls it through the DeepSpeed engine too (other `mode`s), because under ZeRO-3 only the engine's forward
gathers the partitioned weights.
"""

from __future__ import annotations

import copy
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from train.config import TrainConfig
from train.data import build_dataset
from train.distributed import DistInfo
from train.ds_config import deep_merge
from uniflow.errors import ConfigError


@dataclass
class EvalContext:
    """What an evaluation needs. `forward` is the DeepSpeed engine (call it on every rank: it is a collective under
    ZeRO-3). `ema_forward` runs a function with the EMA weights swapped in, or is None when that is not possible."""

    forward: Callable[..., Any]
    heldout: Dataset
    dist: DistInfo
    step: int
    run_dir: Path
    batch_size: int
    final: bool = False
    ema_scope: Callable[[], Any] | None = None


class Task(ABC):
    kind: ClassVar[str]
    default_export_ema: ClassVar[bool] = False

    def __init__(self, config: TrainConfig, dry_run: bool = False) -> None:
        """dry_run: build on the meta device for checks; never read weight files (they may not exist here)."""
        self.config = config
        self.dry_run = dry_run

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The training module (built identically on every rank: same seed, same weights)."""

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        train = build_dataset(self.config.data)
        if len(train) == 0:
            raise ConfigError(f"{self.config.source}: data: the training dataset is empty")
        heldout = build_dataset(self.config.data, heldout=True)
        return train, heldout

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Held-out metrics, identical on every rank."""

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        """Write the inference folder from the full state dict of the training module (rank 0 only)."""

    def export_key(self, name: str) -> bool:
        """Whether a state-dict entry of the training module is needed by `export` (others are not gathered)."""
        return True


def model_section(config: TrainConfig, preset_dict: Callable[[str], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The run config's `model` mapping merged over its named preset; returns (merged dict, source for errors)."""
    section = copy.deepcopy(config.model)
    source = f"{config.source}: model"
    preset = section.pop("preset", None)
    base = preset_dict(preset) if preset is not None else {}
    return deep_merge(base, section), source


def heldout_batches(dataset: Dataset, limit: int, batch_size: int, dist_info: DistInfo
                    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """This rank's share of the first `limit` held-out samples, in equal numbers of batches on every rank (padding
    samples carry weight 0), so collective forwards under ZeRO-3 stay in step."""
    n = min(limit, len(dataset))
    mine = list(range(dist_info.rank, n, dist_info.world_size))
    per_rank = math.ceil(n / dist_info.world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    for start in range(0, per_rank, batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        yield default_collate(items), torch.tensor(weights[start:start + batch_size])


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def autocast_for(dtype: torch.dtype, device: torch.device) -> Any:
    """bf16 weights take fp32 images and norms through autocast (DeepSpeed's bf16 mode casts weights, not inputs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------- registry

TASKS: dict[str, str | type[Task]] = {
    "encoder": "train.encoder_task:EncoderTask",
    "tokenizer": "train.tokenizer_task:TokenizerTask",
    # "generator" and "mllm" register here when their tasks exist.
}


def register_task(name: str, task: str | type[Task]) -> None:
    """Add a model kind: a Task subclass or its "module:Class" path (imported on first use)."""
    TASKS[name] = task


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"kind: unknown model kind {name!r}; available: {sorted(TASKS)}")
    entry = TASKS[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
        TASKS[name] = entry
    return entry
