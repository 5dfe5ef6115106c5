"""Inference checkpoint folders: `config.json` + `model.safetensors`, written atomically, read with clear errors.

A folder is written beside its destination and renamed into place, so a crash mid-write leaves either the old
folder or the new one, never a half-written mix. Weights are safetensors only: loading never executes code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uniflow.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write_dir(dest: str | Path, write: Any) -> Path:
    """Call write(tmp_dir) on a sibling temporary folder, then swap it into `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)}: missing {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights file is truncated or corrupt ({exc})") from None


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                      ignore_prefixes: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict) with an error naming missing, unexpected and mis-shaped keys."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_short(shapes)}")
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=False)


def _short(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more
