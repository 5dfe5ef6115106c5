"""One reading of a `--device` flag for every command: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N"."""

from __future__ import annotations

import torch

from uniflow.errors import ConfigError


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; otherwise a torch device that must exist here (a one-line
    ConfigError naming the flag otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag}: {name!r} is not a torch device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag}: {name} asked for, but no CUDA GPU is available here; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag}: {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"{flag}: {name}: expected auto, cpu, cuda or cuda:N")
    return device
