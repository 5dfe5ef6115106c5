"""Inference checkpoint folders: `config.json` + `model.safetensors`, written atomically, read with clear errors.

A folder is written beside its destination and renamed into place, so a crash mid-write leaves either the old
folder or the new one, never a half-written mix. Weights are safetensors only: loading never executes code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uniflow.configs import read_json
from uniflow.errors import CheckpointError
from uniflow.fileio import atomic_write_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_folder(dest: str | Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write config + weights (optionally cast floating tensors to `dtype`, e.g. fp16 for shipping)."""
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()

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
    return read_json(folder / CONFIG_NAME, CheckpointError)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder, with distinct errors for a missing and a truncated file."""
    if not (Path(folder) / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{Path(folder)}: missing {WEIGHTS_NAME}")
    return read_safetensors(folder)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a folder's `model.safetensors` (or its sharded index).

    Raises CheckpointError naming the path when nothing loadable is there, instead of a bare FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_safetensors(path / shard))
            return state
        path = path / "model.safetensors"
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
