"""Strict dataclass <-> dict conversion shared by every config in the project.

Unknown fields are errors (a typo in a YAML file must not silently train the wrong model), and the message names the
field, the config class and, when known, the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from uniflow.errors import ConfigError

T = TypeVar("T")


def _dataclass_type(annotation: Any) -> type | None:
    """Return the dataclass inside an annotation such as `Foo`, `Foo | None` or `Optional[Foo]`."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    Raises ConfigError naming `source` and the dotted field path for unknown fields or non-dict sections.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {unknown} for {cls.__name__}; expected some of {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = _dataclass_type(hints.get(key))
        if sub is not None and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{source}.{key}")
        elif sub is not None and value is not None and not dataclasses.is_dataclass(value):
            raise ConfigError(f"{source}.{key}: expected a mapping for {sub.__name__}, got {value!r}")
        else:
            if isinstance(value, list) and typing.get_origin(hints.get(key)) is tuple:
                value = tuple(value)
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-serialisable dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_json(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON file's content; a missing file or invalid JSON raises `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
