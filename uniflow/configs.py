"""The one config system of the project: typed dataclass <-> dict conversion, range checks, YAML values, preset merging.

`from_dict(cls, data, source)` builds every config (run configs, the model section, inference folders' config.json):
values are coerced to the field's annotation (text numbers parse, ints widen to floats, lists become tuples, "true"
becomes True, `X | None` accepts null, nested dataclasses recurse), unknown keys are errors, and every message names
the file and the dotted field (`run.yaml: optim.betas[1]: expected a number, got 'x'`). The dataclass constructor is
always called, so each config validates itself in `__post_init__` with `check_number`/`check_choice`; `FieldError`s
raised there are re-raised with the file and the dotted path in front.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import operator
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from uniflow.errors import ConfigError

T = TypeVar("T")


class FieldError(ConfigError):
    """A bad value of one field, raised by a dataclass's own checks; `from_dict` prefixes the file and dotted path."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


# ------------------------------------------------------------------------------------------------------- range checks
def check_number(field: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` is a finite number in the interval [lo, hi] (open ends with lo_open/hi_open; None: unbounded).

    NaN and infinities are always refused: no option of this project means anything when non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(field, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise FieldError(field, f"expected a finite number, got {value!r}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
        raise FieldError(field, f"expected a value in {left}, {right}, got {value!r}")


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi) (either bound optional): the one range check for command-line options and
    function arguments, so an out-of-range number is an error, never silently replaced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"expected an integer, got {value!r}")
    check_number(field, value, lo, hi, hi_open=True)
    return value


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise FieldError(field, f"expected one of {list(choices)}, got {value!r}")


# -------------------------------------------------------------------------------------------------------- YAML values
class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a string; learning rates are written that way, so floats accept it here."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, true/false, null, [lists], {maps}); plain text stays text."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------------------------------------- coercion
def join(where: str, key: str | int) -> str:
    """Dotted path: "run.yaml:" + "optim" -> "run.yaml: optim"; "run.yaml: optim" + "lr" -> "run.yaml: optim.lr"."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if not where:
        return key
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None` / `Optional[X]`; (annotation, False) otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            if len(args) == 1:
                return args[0], True
            return functools.reduce(operator.or_, args), True
    return annotation, False


def _type_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _coerce_number(value: Any, target: type, where: str) -> int | float:
    """An int or float from a number or its text; bools are not numbers, and a float is an int only when whole."""
    if isinstance(value, str):
        try:
            return target(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
            target is float or isinstance(value, int) or (math.isfinite(value) and value.is_integer())):
        return target(value)
    raise ConfigError(f"{where}: expected {'an integer' if target is int else 'a number'}, got {value!r}")


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked and converted to `annotation`; ConfigError naming `where` otherwise."""
    if annotation is Any or annotation is typing.Any:
        return value
    target, optional = strip_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {_type_name(target)})")
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        if dataclasses.is_dataclass(value) and isinstance(value, target):
            return value
        return from_dict(target, value, where)
    origin = typing.get_origin(target)
    if origin is typing.Literal:
        choices = typing.get_args(target)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value  # a union of several types: left to the dataclass's own check
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if target in (int, float):
        return _coerce_number(value, target, where)
    if target is str:
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if origin is tuple or target is tuple:
        if isinstance(value, str):
            value = [parse_value(v.strip()) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(target)
        if not args:
            return tuple(value)
        if args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], join(where, i)) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, join(where, i)) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list or target is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(target)
        return [coerce(v, args[0], join(where, i)) if args else v for i, v in enumerate(value)]
    if origin is dict or target is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(target)
        if len(args) == 2:
            return {k: coerce(v, args[1], join(where, str(k))) for k, v in value.items()}
        return dict(value)
    return value


def config_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, without fields marked `metadata={"internal": True}`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def from_dict(cls: type[T], data: Any, source: str = "config") -> T:
    """Build dataclass `cls` from a mapping: unknown keys, wrong types and the dataclass's own checks are ConfigErrors
    naming `source` (a file, optionally followed by the dotted path of this section) and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = config_fields(cls)
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; expected some of "
                          f"{sorted(fields)}")
    kwargs = {key: coerce(value, fields[key], join(source, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"{join(source, exc.field)}: {exc.detail}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-serialisable dict of a (nested) dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


class KindConfig:
    """Mixin for the config of a checkpoint folder (`config.json`): written with the folder's `model_kind` and read
    back only when the kind matches, so a generator folder passed where a tokenizer is expected (or the reverse) is
    refused with one line naming both kinds. Subclasses set `MODEL_KIND` and `kind_error` (the error raised)."""

    MODEL_KIND: typing.ClassVar[str] = ""
    kind_error: typing.ClassVar[type[Exception]] = ConfigError

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Any:
        source = source or f"{cls.MODEL_KIND} config"
        if isinstance(data, dict):
            data = dict(data)
            kind = data.pop("model_kind", cls.MODEL_KIND)
            if kind != cls.MODEL_KIND:
                raise cls.kind_error(f"{source}: model_kind is {kind!r}, expected {cls.MODEL_KIND!r}")
        return from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return {"model_kind": self.MODEL_KIND, **to_dict(self)}


# ----------------------------------------------------------------------------------------------- merging and reading
def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursing into mappings present in both; inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_preset(preset: dict[str, Any], override: dict[str, Any],
                 identity: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """`override` merged over a preset, except that a sub-section whose identity changes starts from scratch.

    identity: section -> the keys that say what it is (for an encoder, `backend` and `arch`). When the override sets
    one of them to a value other than the preset's, none of the preset's section is inherited: its `kwargs` (depth,
    width, ...) belong to the preset's model and would leak into, or break, another backend's."""
    preset = copy.deepcopy(preset)
    for section, keys in (identity or {}).items():
        ours, theirs = override.get(section), preset.get(section)
        if isinstance(ours, dict) and isinstance(theirs, dict) and any(
                k in ours and ours[k] != theirs.get(k) for k in keys):
            preset.pop(section)
    return deep_merge(preset, override)


def read_json(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON file's content; a missing file or invalid JSON raises `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping; a missing file, a parse error or a non-mapping (a JSON list, a bare
    number) is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=YamlLoader)  # noqa: S506
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse config ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
