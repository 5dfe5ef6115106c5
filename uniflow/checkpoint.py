"""Inference checkpoint folders: `config.json` + `model.safetensors`, written atomically, read with clear errors.

Writing never destroys what the writer did not write: a destination must be missing, empty, or a checkpoint of the
same kind (its `config.json` has the same `model_kind`), and replacing one needs `overwrite=True`; then only the
files this writer produces are replaced, each by one atomic rename, and other files in the folder stay untouched.
Weights are safetensors only, so loading never executes code; non-finite weights are refused when saving.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uniflow.configs import read_json
from uniflow.errors import CheckpointError, ConfigError, OutputError
from uniflow.fileio import atomic_write_dir, is_temporary

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "atomic_write_dir", "check_destination", "check_dtype",
           "check_finite", "check_output_dir", "save_folder", "read_config", "read_weights", "read_safetensors",
           "load_state_strict"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def check_output_dir(dest: str | Path, name: str = "output folder") -> Path:
    """`dest` can hold a folder we create or fill: not empty, not `/`, not a file, and its nearest existing ancestor
    is a writable folder. Call before any compute; `name` is the flag or argument shown in the error."""
    if dest is None or str(dest).strip() == "":
        raise OutputError(f"{name}: empty path; give a folder to write to")
    path = Path(dest).expanduser()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise OutputError(f"{name}: refusing to write into the filesystem root {resolved}; give a sub-folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{name}: {path} exists and is a file, expected a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{name}: cannot create {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: {probe} is not writable (needed to write {path})")
    return path


def check_destination(dest: str | Path, kind: str, overwrite: bool = False, name: str = "destination") -> Path:
    """Refuse, before any compute, a checkpoint destination whose writing would lose data.

    Accepted: a missing or empty folder; a folder holding a `kind` checkpoint when `overwrite` is true. Refused with
    one line: an empty path, `/`, a file, an unwritable place, a non-empty folder that is not a `kind` checkpoint,
    and a `kind` checkpoint without `overwrite`.
    """
    path = check_output_dir(dest, name)
    if not path.is_dir():
        return path
    entries = [p for p in path.iterdir() if not is_temporary(p.name)]
    if not entries:
        return path
    config = path / CONFIG_NAME
    existing = None
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            existing = data.get("model_kind") if isinstance(data, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            existing = None
    if existing != kind:
        what = f"a {existing!r} checkpoint" if existing else "files that are not a checkpoint"
        raise OutputError(f"{name}: {path} is not empty and holds {what}; refusing to write a {kind!r} checkpoint "
                          f"there (choose a new or empty folder)")
    if not overwrite:
        raise OutputError(f"{name}: {path} already holds a {kind!r} checkpoint; pass --overwrite (overwrite=True in "
                          f"Python) to replace its files")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: {path} is not writable")
    return path


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | None:
    """None or a floating torch dtype; anything else (torch.int8, a string) is a ConfigError."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{name}: expected a floating torch dtype (torch.float32, torch.float16, torch.bfloat16) "
                          f"or None, got {dtype!r}")
    return dtype


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the first bad tensor (sorted by name)."""
    for key in sorted(state_dict):
        v = state_dict[key]
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of "
                                  f"{v.numel()}; refusing to write or use these weights")


def save_folder(dest: str | Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None,
                overwrite: bool = False) -> Path:
    """Write config + weights (optionally cast floating tensors to `dtype`, e.g. fp16 for shipping).

    `config["model_kind"]` names the kind of checkpoint; see `check_destination` for what may be replaced."""
    dtype = check_dtype(dtype)
    kind = str(config.get("model_kind", "checkpoint"))
    dest = check_destination(dest, kind, overwrite)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    check_finite(tensors, f"{dest}: weights" + (f" cast to {dtype}" if dtype is not None else ""))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_write_dir(dest, write)


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
    data = read_json(folder / CONFIG_NAME, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / CONFIG_NAME}: expected a JSON object, got {type(data).__name__}")
    return data


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder, with distinct errors for a missing and a truncated file."""
    if not (Path(folder) / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{Path(folder)}: missing {WEIGHTS_NAME}")
    return read_safetensors(folder)


def _index_shards(index: Path) -> list[str]:
    """Shard file names of a sharded index; each must be a plain relative name inside the index's folder."""
    data = read_json(index, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object mapping tensor names to files")
    folder = index.parent.resolve()
    shards = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts \
                or folder not in (folder / shard).resolve().parents:
            raise CheckpointError(f"{index}: tensor {key!r} points to {shard!r}, outside the index's folder; "
                                  f"shards must be relative file names inside {folder}")
        shards.add(shard)
    return sorted(shards)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a folder's `model.safetensors` (or its sharded index).

    Raises CheckpointError naming the path when nothing loadable is there, instead of a bare FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in _index_shards(index):
                state.update(read_safetensors(path / shard))
            return state
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found (expected a .safetensors file or a folder holding one)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"{path}: weights file is truncated or corrupt ({exc})") from None


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      ignore_prefixes: tuple[str, ...] = (), check_only: bool = False) -> None:
    """Load `state` into `module`, requiring the same keys and shapes.

    torch's strict load raises a RuntimeError that names neither the file nor what to fix; this names `source` and
    lists every missing, unexpected and mis-shaped key (with both shapes) in one CheckpointError.
    """
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)} if ignore_prefixes \
        else module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        problems_text = "; ".join(problems)
        raise CheckpointError(f"{source}: weights do not match the {type(module).__name__} model; {problems_text}")
    if not check_only:
        module.load_state_dict(dict(state), strict=not ignore_prefixes)
