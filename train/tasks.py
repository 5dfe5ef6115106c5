"""What differs between model kinds, behind one interface the engine drives (the `Task` hooks below).

A task owns its sections of the run config (`model`, `data`, `eval`, each parsed with its own dataclass through
`uniflow.configs.from_dict`), builds the training module and its datasets, collates batches, names its parameter
groups, counts its throughput unit, evaluates, and writes the inference folder. The engine owns everything else
(DeepSpeed, the loop, checkpoints, logs), so the generator and the MLLM only add a task (and register it in
`train/registry.py`); the test suite's toy kind (tests/test_toy_kind.py) is the proof.

Building under ZeRO-3: the engine calls `build_model()` inside `deepspeed.zero.Init` (with `transformers`'
`HfDeepSpeedConfig` alive), so each parameter is partitioned as soon as its module is constructed. Two things do not
work on partitioned parameters: initialising them in a parent module's constructor (timm's and our own modules do
that: `nn.init` on a partitioned parameter is a silent no-op) and copying them (`deepcopy`, `load_state_dict`).
Therefore `build_model()` only builds (random init, no weight files, no copies that matter), and the engine sets the
initial weights itself: by default (`zero3_reference_init`) rank 0 builds a plain copy on its CPU, `initial_state()`
(pretrained weights read from files) is loaded into it, and each parameter is scattered to the partitions with
`GatheredParameters(modifier_rank=0)`, one at a time: no GPU and no other rank ever holds the whole model, and ZeRO-3
starts from exactly the weights ZeRO-0/2 start from. A task whose modules initialise correctly under zero.Init
(`transformers` models; `from_pretrained` partitions by itself while `HfDeepSpeedConfig` is alive) sets
`zero3_reference_init = False`; then only `initial_state()` is scattered.

The training module's forward takes a collated batch and returns {"loss": scalar, "metrics": {name: 0-d tensor}};
evaluation calls it through the DeepSpeed engine too (other `mode`s), because under ZeRO-3 only the engine's forward
gathers the partitioned weights; `EvalContext.module` with `EvalContext.gathered()` is the way to call other methods
(`generate`, `sample`).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from train.config import TrainConfig
from train.data import ImageDataConfig, build_dataset
from train.distributed import DistInfo
from train.optim import ParamGroup, default_groups
from train.registry import get_task, register_task
from uniflow.configs import from_dict, merge_preset
from uniflow.errors import ConfigError

__all__ = ["EvalContext", "ImageTask", "ParamGroup", "Task", "autocast_for", "get_task", "heldout_batches",
           "model_section", "module_device_dtype", "register_task"]


@dataclass
class EvalContext:
    """What an evaluation needs. `forward` is the DeepSpeed engine (call it on every rank: it is a collective under
    ZeRO-3). `module` is the unwrapped training module: call its own methods (`generate`, `sample`) inside
    `with ctx.gathered():` (a collective under ZeRO-3: every rank enters it). `ema_scope` runs a block with the EMA
    weights swapped in, or is None when that is not possible. `collate` is the task's collate function."""

    forward: Callable[..., Any]
    heldout: Dataset
    dist: DistInfo
    step: int
    run_dir: Path
    batch_size: int
    final: bool = False
    ema_scope: Callable[[], Any] | None = None
    module: nn.Module | None = None
    partitioned: bool = False
    collate: Callable[[list[Any]], Any] = field(default=default_collate)

    def weight_scopes(self) -> list[tuple[str, Callable[[], contextlib.AbstractContextManager[Any]]]]:
        """("", the live weights) and, when the run keeps an EMA, ("_ema", the EMA weights swapped in): one loop
        evaluates both, the suffix naming the metric (`heldout_psnr`, `heldout_psnr_ema`)."""
        scopes: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Any]]]] = [("", contextlib.nullcontext)]
        if self.ema_scope is not None:
            scopes.append(("_ema", self.ema_scope))
        return scopes

    def gathered(self) -> contextlib.AbstractContextManager[Any]:
        """All of `module`'s parameters whole on every rank for the block (ZeRO-3), or nothing to do."""
        if not self.partitioned or self.module is None:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)


class Task(ABC):
    """The hooks a model kind implements. Class attributes:

    kind: the registry name. data_config / eval_config: the dataclasses of the task's `data` and `eval` sections
    (None: the task has no such section, and a non-empty one is an error). count_unit: what throughput counts
    ("images", "tokens"); logged as `<unit>_per_s`. export_kind: the inference folder's `model_kind`, checked before
    training when the export folder exists. default_export_ema: export the EMA weights when EMA is on.
    zero3_reference_init: see the module docstring.
    """

    kind: ClassVar[str]
    default_export_ema: ClassVar[bool] = False
    data_config: ClassVar[type | None] = None
    eval_config: ClassVar[type | None] = None
    count_unit: ClassVar[str] = "samples"
    export_kind: ClassVar[str | None] = None
    zero3_reference_init: ClassVar[bool] = True

    def __init__(self, config: TrainConfig, dry_run: bool = False) -> None:
        """dry_run: build on the meta device for checks; never read weight files (they may not exist here)."""
        self.config = config
        self.dry_run = dry_run
        self.data = self.section("data", self.data_config)
        self.eval_options = self.section("eval", self.eval_config)

    def section(self, name: str, cls: type | None) -> Any:
        """The run config's `name` mapping parsed as `cls` (errors name the file and the dotted field)."""
        value = getattr(self.config, name)
        if cls is None:
            if value:
                raise ConfigError(f"{self.config.source}: {name}: the {self.kind!r} task has no {name} options, got "
                                  f"{sorted(value)}")
            return None
        return from_dict(cls, value, f"{self.config.source}: {name}")

    # ------------------------------------------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The training module's structure, randomly initialised (identically on every rank: same seed). Read no
        weight files here: `initial_state` gives them, and the engine loads them (see the module docstring)."""

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """Weights to start from (e.g. a pretrained encoder), by state-dict name of the training module; None: keep
        the random init. Called on CPU, by every rank under ZeRO 0/2 and by rank 0 only under ZeRO-3."""
        return None

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """Named groups of trainable parameters with their own lr / lr scale / weight decay (`train.optim`); the run
        config may override each by name (`optim.groups.NAME`)."""
        return default_groups(model)

    # ------------------------------------------------------------------------------------------------------- data
    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """(training set, held-out set or None)."""

    def collate(self, items: list[Any]) -> Any:
        """Samples -> one batch (a text task pads here)."""
        return default_collate(items)

    def batch_count(self, batch: Any) -> int:
        """How many `count_unit`s a collated batch holds (this process's share); default: its batch size."""
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        return len(batch)

    @property
    def num_workers(self) -> int:
        return int(getattr(self.data, "num_workers", 0))

    @property
    def cache_mb(self) -> float:
        """Memory for keeping loaded items (`train.data.CachedDataset`); 0: none. Read from the data section's
        `cache_mb` where it has one."""
        return float(getattr(self.data, "cache_mb", 0.0))

    @property
    def length_group(self) -> int:
        """Micro-batches per group of samples sorted by `item_length` (`train.data.length_grouped`); 0: batches in
        the sampler's order. Read from the data section's `group_by_length` where it has one."""
        return int(getattr(self.data, "group_by_length", 0))

    def item_length(self, item: Any) -> int:
        """A loaded sample's padded size along the axis the collate function pads (length grouping sorts by it)."""
        raise NotImplementedError(f"the {self.kind!r} task cannot group batches by length")

    # ---------------------------------------------------------------------------------------- evaluation, export
    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Held-out metrics, identical on every rank."""

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        """Write the inference folder from the full state dict of the training module (rank 0 only). The folder was
        checked by `check_export_dir` before training: replace what is there."""

    def export_key(self, name: str) -> bool:
        """Whether a state-dict entry of the training module is needed by `export` (others are not gathered)."""
        return True

    def check_export_dir(self, dest: Path) -> None:
        """Refuse, before training, an export folder whose replacement would lose data: it must be missing, empty, or
        an inference folder of this task's kind (`uniflow.checkpoint.check_destination`)."""
        from uniflow.checkpoint import check_destination, check_output_dir

        if self.export_kind is None:
            check_output_dir(dest, "export.dir")
        else:
            check_destination(dest, self.export_kind, overwrite=True, name="export.dir")


class ImageTask(Task):
    """A task on images: its `data` section is `ImageDataConfig` (ShapeWorld, image folders, `datasets`)."""

    data_config: ClassVar[type | None] = ImageDataConfig
    count_unit: ClassVar[str] = "images"
    data: ImageDataConfig

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        train = build_dataset(self.data)
        if len(train) == 0:
            raise ConfigError(f"{self.config.source}: data: the training dataset is empty")
        return train, build_dataset(self.data, heldout=True)

    def check_labelled_data(self) -> None:
        """Refuse the label-free shares (procedural, dead leaves) in a task that trains on class labels."""
        for share in ("procedural_share", "dead_leaves_share"):
            if getattr(self.data, share):
                raise ConfigError(f"{self.config.source}: data.{share}: the {self.kind} task trains on labels and "
                                  f"label-free images have none; expected 0, got {getattr(self.data, share)}")

    def check_patch_size(self, patch: int) -> None:
        if self.data.image_size % patch:
            raise ConfigError(f"{self.config.source}: data.image_size {self.data.image_size} is not divisible by "
                              f"model.encoder.patch_size {patch}")


# The identity of an encoder: a preset's encoder section is not inherited once the run config names another one.
ENCODER_IDENTITY = {"encoder": ("backend", "arch")}


def model_section(config: TrainConfig, presets: Callable[[str], dict[str, Any]], choices: list[str]
                  ) -> tuple[dict[str, Any], str]:
    """The run config's `model` mapping over its named preset (required: no silent default); the preset's encoder
    section is dropped when the run config changes the encoder's backend or arch. Returns (merged, error source)."""
    section = dict(config.model)
    source = f"{config.source}: model"
    preset = section.pop("preset", None)
    if preset is None:
        raise ConfigError(f"{source}.preset: required (one of {choices})")
    if preset not in choices:
        raise ConfigError(f"{source}.preset: unknown preset {preset!r}; expected one of {choices}")
    return merge_preset(presets(preset), section, ENCODER_IDENTITY), source


def heldout_batches(dataset: Dataset, limit: int, batch_size: int, dist_info: DistInfo,
                    collate: Callable[[list[Any]], Any] = default_collate) -> Iterator[tuple[Any, torch.Tensor]]:
    """This rank's share of the first `limit` held-out samples, in equal numbers of batches on every rank (padding
    samples carry weight 0), so collective forwards under ZeRO-3 stay in step."""
    n = min(limit, len(dataset))
    mine = list(range(dist_info.rank, n, dist_info.world_size))
    per_rank = math.ceil(n / dist_info.world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    for start in range(0, per_rank, batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        yield collate(items), torch.tensor(weights[start:start + batch_size])


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def autocast_for(dtype: torch.dtype, device: torch.device) -> Any:
    """bf16 weights take fp32 images and norms through autocast (DeepSpeed's bf16 mode casts weights, not inputs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def encoder_state(encoder_config: Any, prefixes: list[str]) -> dict[str, torch.Tensor] | None:
    """A pretrained encoder's weights (built on CPU by its backend, which knows its file format) under each of
    `prefixes` (e.g. "tokenizer.encoder." and the teacher's); None when `encoder_config.pretrained` is not set."""
    if encoder_config.pretrained is None:
        return None
    from uniflow.encoders import build_encoder

    with torch.device("cpu"):
        state = build_encoder(encoder_config).state_dict()
    return {prefix + key: value for prefix in prefixes for key, value in state.items()}
