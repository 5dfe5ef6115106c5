"""The run configuration: one dataclass tree, read from YAML or JSON, overridable by `key=value` on the command line.

The generic sections (optim, deepspeed, ema, log, checkpoint, export) are typed here; the task's own sections
(`model`, `data`, `eval`) stay mappings that the task parses with its own dataclasses (`train/tasks.py`), through the
same `uniflow.configs.from_dict`, so every error names the file and the dotted field either way. Each dataclass checks
its own ranges in `__post_init__`.

The run config is the single source of truth for batch size, accumulation, clipping and precision: the DeepSpeed JSON
files in `train/configs/` only choose the ZeRO stage and its knobs (see `train/ds_config.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uniflow.configs import (
    check_choice,
    check_number,
    config_fields,
    from_dict,
    parse_value,
    read_config_file,
    strip_optional,
    to_dict,
)
from uniflow.errors import ConfigError

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
EXPORT_DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass
class GroupConfig:
    """Overrides of one named parameter group of the task (e.g. `optim.groups.encoder.lr_scale: 0.1`).
    lr: absolute base rate (null: optim.lr * lr_scale); weight_decay: null keeps the task's rule."""

    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None:
            check_number("lr", self.lr, 0.0, None, lo_open=True)
        if self.lr_scale is not None:
            check_number("lr_scale", self.lr_scale, 0.0, None)
        if self.weight_decay is not None:
            check_number("weight_decay", self.weight_decay, 0.0, None)


@dataclass
class OptimConfig:
    """AdamW and its schedule. schedule: "cosine" (decays to min_lr_ratio * lr) or "constant", both after a linear
    warm-up of `warmup_steps` optimizer steps. grad_clip <= 0 disables clipping. groups: per-group overrides of the
    parameter groups the task defines (each keeps its own base lr through warm-up and decay)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    groups: dict[str, GroupConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number("lr", self.lr, 0.0, None, lo_open=True)
        for i, beta in enumerate(self.betas):
            check_number(f"betas[{i}]", beta, 0.0, 1.0, hi_open=True)
        check_number("eps", self.eps, 0.0, None, lo_open=True)
        check_number("weight_decay", self.weight_decay, 0.0, None)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_number("warmup_steps", self.warmup_steps, 0, None)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number("grad_clip", self.grad_clip)


@dataclass
class DeepSpeedConfig:
    """config: a shipped name (zero0, zero2, zero3, zero3_offload) or a path to a DeepSpeed JSON file.
    precision: "auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16". overrides: merged into the JSON last."""

    config: str = "zero2"
    precision: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights, kept outside DeepSpeed (one fp32 copy per rank's share).
    warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so a short run is not dominated by the init."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False

    def __post_init__(self) -> None:
        check_number("decay", self.decay, 0.0, 1.0)


@dataclass
class LogConfig:
    """every: log interval in optimizer steps; eval_every: held-out evaluation interval (the task's metrics and
    samples), 0 = only at the end; progress: a progress bar on stderr."""

    every: int = 10
    eval_every: int = 0
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_number("every", self.every, 1, None)
        check_number("eval_every", self.eval_every, 0, None)


@dataclass
class CheckpointConfig:
    """every: checkpoint interval in optimizer steps (0: only at the end); keep_last: older ones are deleted."""

    every: int = 1000
    keep_last: int = 2

    def __post_init__(self) -> None:
        check_number("every", self.every, 0, None)
        check_number("keep_last", self.keep_last, 1, None)


@dataclass
class ExportConfig:
    """The inference folder written at the end of training. use_ema: null = the task's default (the tokenizer uses the
    EMA weights when EMA is enabled); dtype: null (keep fp32), "float16" or "bfloat16"; dir: null = <run_dir>/export
    (an existing folder must hold an export of the same kind, and may not contain the run's checkpoints)."""

    enabled: bool = True
    use_ema: bool | None = None
    dtype: str | None = None
    dir: str | None = None

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, EXPORT_DTYPES)


@dataclass
class TrainConfig:
    """One training run. batch_size is global (all processes, one optimizer step); micro_batch_size is per process
    and per forward pass (null: batch_size / processes); the difference is made up by gradient accumulation.
    model / data / eval: the task's own sections, parsed by the task (see `uniflow train KIND --help` and
    docs/training.md): for the image tasks `data` is `train.data.ImageDataConfig`."""

    kind: str = "tokenizer"
    run_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = field(default="<defaults>", repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        check_number("seed", self.seed, 0, None)
        check_number("steps", self.steps, 1, None)
        check_number("batch_size", self.batch_size, 1, None)
        if self.micro_batch_size is not None:
            check_number("micro_batch_size", self.micro_batch_size, 1, None)

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out.pop("source", None)
        return out


# ------------------------------------------------------------------------------------------------------------ loading
# Fields that left a generic section for a task's own one: a one-line hint instead of a bare "unknown field".
MOVED = {("log", "grid_images"): "eval.grid_images"}


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for "a.b.c", creating intermediate mappings."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


def _check_override_path(dotted: str) -> None:
    """Reject an override whose dotted path names no field, naming the offending part (free-form sections aside)."""
    cls: Any = TrainConfig
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        fields = config_fields(cls)
        if key not in fields:
            moved = MOVED.get(tuple(keys[i - 1:i + 1])) if i else None
            if moved:
                raise ConfigError(f"override {dotted}: moved to {moved}")
            where = ".".join(keys[:i]) or "the run config"
            raise ConfigError(f"override {dotted}: unknown field {key!r} in {where}; expected some of {sorted(fields)}")
        target, _ = strip_optional(fields[key])
        if not dataclasses.is_dataclass(target):
            if i < len(keys) - 1 and not (typing.get_origin(target) is dict or target is dict):
                raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
            return
        cls = target


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-3)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        _check_override_path(key)
        pairs.append((key, parse_value(text)))
    return pairs


def build_config(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None,
                 kind: str | None = None) -> TrainConfig:
    """A TrainConfig from a mapping plus `key=value` overrides; `kind` (from the CLI) must agree with the file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    for (section, name), new in MOVED.items():
        if isinstance(data.get(section), dict) and name in data[section]:
            raise ConfigError(f"{source}: {section}.{name} moved to {new}")
    if kind is not None:
        file_kind = data.get("kind")
        if file_kind is not None and file_kind != kind:
            raise ConfigError(f"{source}: kind is {file_kind!r} but the command trains {kind!r}")
        data["kind"] = kind
    config = from_dict(TrainConfig, data, f"{source}:")
    config.source = source
    return config


def load_config(path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> TrainConfig:
    """Read a YAML/JSON run config, apply overrides, validate. Errors name the file and the field."""
    return build_config(read_config_file(path), str(path), overrides, kind)


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
