"""The run configuration: one dataclass tree, read from YAML or JSON, overridable by `key=value` on the command line.

The run config is the single source of truth for batch size, accumulation, clipping and precision: the DeepSpeed JSON
files in `train/configs/` only choose the ZeRO stage and its knobs (see `train/ds_config.py`). Unknown keys are errors
that name the file and the dotted field, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uniflow.configs import from_dict, to_dict
from uniflow.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW and its schedule. schedule: "cosine" (decays to min_lr_ratio * lr) or "constant", both after a linear
    warm-up of `warmup_steps` optimizer steps. grad_clip <= 0 disables clipping."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """Where images come from.

    source: "shapeworld" (rendered on demand), "folder" (ImageNet layout: path/<class>/<image>) or "hf" (`datasets`:
        a `save_to_disk` folder, data files such as `*.parquet`, or a hub name).
    path / heldout_path: folder, files or hub name for the train and held-out sets ("folder"/"hf").
    split / heldout_split: `datasets` split names ("hf"), or ShapeWorld splits.
    num_samples: ShapeWorld training set size (null: the split's default); heldout_samples: images used for
        periodic evaluation (all sources).
    verify: open every image header of a folder once at start, skipping and counting unreadable files.
    """

    source: str = "shapeworld"
    path: str | None = None
    heldout_path: str | None = None
    split: str = "train"
    heldout_split: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    image_size: int = 64
    num_samples: int | None = None
    heldout_samples: int = 256
    seed: int = 0
    num_workers: int = 0
    verify: bool = True


@dataclass
class DeepSpeedConfig:
    """config: a shipped name (zero0, zero2, zero3, zero3_offload) or a path to a DeepSpeed JSON file.
    precision: "auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16". overrides: merged into the JSON last."""

    config: str = "zero2"
    precision: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights, kept outside DeepSpeed (one fp32 copy per rank's share).
    warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so a short run is not dominated by the init."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False


@dataclass
class LogConfig:
    """every: log interval in optimizer steps; eval_every: held-out evaluation (and the tokenizer's reconstruction
    grid) interval, 0 = only at the end; grid_images: images in the reconstruction grid."""

    every: int = 10
    eval_every: int = 0
    grid_images: int = 8
    progress: bool = True
    tensorboard: bool = False


@dataclass
class CheckpointConfig:
    """every: checkpoint interval in optimizer steps (0: only at the end); keep_last: older ones are deleted."""

    every: int = 1000
    keep_last: int = 2


@dataclass
class ExportConfig:
    """The inference folder written at the end of training. use_ema: null = the task's default (the tokenizer uses the
    EMA weights when EMA is enabled); dtype: null (keep fp32), "float16" or "bfloat16"; dir: null = <run_dir>/export."""

    enabled: bool = True
    use_ema: bool | None = None
    dtype: str | None = None
    dir: str | None = None


@dataclass
class TrainConfig:
    """One training run. batch_size is global (all processes, one optimizer step); micro_batch_size is per process
    and per forward pass (null: batch_size / processes); the difference is made up by gradient accumulation.
    model: the task's model section (for the tokenizer: `preset` plus TokenizerConfig overrides)."""

    kind: str = "tokenizer"
    run_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = field(default="<defaults>", repr=False, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out.pop("source", None)
        return out


# ------------------------------------------------------------------------------------------------------------ loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a string; learning rates are written that way, so floats accept it here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, true/false, null, [lists], {maps}); plain text stays text."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)  # noqa: S506
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse config ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _coerce_number(value: Any, target: type, where: str) -> int | float:
    """An int or float from a number or its text; bools are not numbers, and a float is an int only when whole."""
    if isinstance(value, str):
        try:
            return target(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
            target is float or isinstance(value, int) or value.is_integer()):
        return target(value)
    raise ConfigError(f"{where}: expected {'an integer' if target is int else 'a number'}, got {value!r}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert a value to the field's type: ints widen to floats, text numbers parse, lists become tuples."""
    target, optional = _strip_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(target, '__name__', target)})")
    if dataclasses.is_dataclass(target):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    origin = typing.get_origin(target)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if target in (int, float):
        return _coerce_number(value, target, where)
    if target is str:
        return value if isinstance(value, str) else str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [parse_value(v.strip()) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(target)
        if args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict or target is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _typed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate names and coerce values of a (nested) section before the strict dataclass builder sees it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(types_)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        sub_where = f"{where}.{key}" if where and not where.endswith(":") else f"{where} {key}"
        coerced = _coerce(value, types_[key], sub_where)
        target, _ = _strip_optional(types_[key])
        if dataclasses.is_dataclass(target) and coerced is not None:
            coerced = _typed(target, coerced, sub_where)
        out[key] = coerced
    return out


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
        types_ = _field_types(cls)
        if key not in types_:
            where = ".".join(keys[:i]) or "the run config"
            raise ConfigError(f"override {dotted}: unknown field {key!r} in {where}; expected some of {sorted(types_)}")
        target, _ = _strip_optional(types_[key])
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
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    if kind is not None:
        file_kind = data.get("kind")
        if file_kind is not None and file_kind != kind:
            raise ConfigError(f"{source}: kind is {file_kind!r} but the command trains {kind!r}")
        data["kind"] = kind
    config = from_dict(TrainConfig, _typed(TrainConfig, data, f"{source}:"), source)
    config.source = source
    validate(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> TrainConfig:
    """Read a YAML/JSON run config, apply overrides, validate. Errors name the file and the field."""
    return build_config(read_file(path), str(path), overrides, kind)


def validate(config: TrainConfig) -> None:
    src = config.source
    checks = [
        (config.steps >= 1, "steps must be >= 1"),
        (config.batch_size >= 1, "batch_size must be >= 1"),
        (config.micro_batch_size is None or config.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
        (config.optim.schedule in ("cosine", "constant"), "optim.schedule must be 'cosine' or 'constant'"),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (0.0 <= config.ema.decay <= 1.0, "ema.decay must be in [0, 1]"),
        (config.deepspeed.precision in ("auto", "fp32", "bf16"), "deepspeed.precision must be auto, fp32 or bf16"),
        (config.data.source in ("shapeworld", "folder", "hf"), "data.source must be shapeworld, folder or hf"),
        (config.log.every >= 1, "log.every must be >= 1"),
        (config.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
        (config.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (config.export.dtype in (None, "float16", "bfloat16", "float32"),
         "export.dtype must be null, float16, bfloat16 or float32"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{src}: {message}")


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
