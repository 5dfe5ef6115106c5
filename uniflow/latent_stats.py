"""Per-channel statistics of a tokenizer's latents, so a generator models unit-scale tokens.

A generator over UniFlow's continuous 64-d tokens (`generator/`) trains on normalised latents
z' = (z - mean) / std and hands `z = z' * std + mean` back to the decoder. The statistics are measured once over a
dataset (`uniflow latent-stats`, or `compute_latent_stats`) and stored beside the weights in the tokenizer folder as
`latent_stats.safetensors`: `mean` and `std`, (C,) float32, plus counts and the data source in the file's metadata.
Writing them touches no other file of the folder (so a hash of `config.json` + `model.safetensors` still names the
tokenizer), and an existing file is replaced only with `overwrite`.

Statistics are accumulated in float64 with Chan's parallel update (per-batch mean and sum of squared deviations),
so a long dataset does not lose precision. A channel's std is floored at `MIN_STD`, so normalising never divides
by zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from uniflow.errors import CheckpointError, OutputError
from uniflow.fileio import atomic_write_file

if TYPE_CHECKING:
    from uniflow.tokenizer import UniFlowTokenizer

STATS_NAME = "latent_stats.safetensors"
MIN_STD = 1e-6


@dataclass
class LatentStats:
    """mean, std: (C,) float32 per-channel statistics; num_images / num_tokens: what they were measured on."""

    mean: torch.Tensor
    std: torch.Tensor
    num_images: int = 0
    num_tokens: int = 0
    source: str = ""

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C) latents -> (latents - mean) / std, in the latents' dtype and device."""
        return (latents - self.mean.to(latents)) / self.std.to(latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: (..., C) normalised latents -> latents the decoder takes."""
        return latents * self.std.to(latents) + self.mean.to(latents)


class LatentStatsAccumulator:
    """Running per-channel mean and variance over batches of (B, N, C) latents (float64, Chan's update)."""

    def __init__(self) -> None:
        self.count = 0
        self.num_images = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, latents: torch.Tensor) -> None:
        flat = latents.detach().reshape(-1, latents.shape[-1]).to("cpu", torch.float64)
        n = flat.shape[0]
        if n == 0:
            return
        batch_mean = flat.mean(0)
        batch_m2 = ((flat - batch_mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - self.mean
            total = self.count + n
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count += n
        self.num_images += latents.shape[0] if latents.ndim == 3 else 1

    def result(self, source: str = "") -> LatentStats:
        if self.mean is None or self.m2 is None or self.count < 2:
            raise CheckpointError(f"latent statistics of {source or 'the data'}: need at least 2 latent tokens, "
                                  f"got {self.count}")
        std = (self.m2 / (self.count - 1)).sqrt().clamp_min(MIN_STD)
        if not bool(torch.isfinite(self.mean).all() and torch.isfinite(std).all()):
            raise CheckpointError(f"latent statistics of {source or 'the data'}: non-finite mean or std (NaN or inf "
                                  f"latents); check the tokenizer's weights and the images")
        return LatentStats(self.mean.float(), std.float(), self.num_images, self.count, source)


def compute_latent_stats(tokenizer: UniFlowTokenizer, batches: Iterable[Any], resize: bool = False,
                         source: str = "", progress: Callable[[int], Any] | None = None) -> LatentStats:
    """Encode every batch (anything `tokenizer.encode` takes: (B, 3, H, W) tensors, PIL lists...) and return the
    per-channel statistics of the latents. progress(n) is called with each batch's image count (e.g. tqdm.update)."""
    acc = LatentStatsAccumulator()
    for batch in batches:
        latents = tokenizer.encode(batch, resize=resize).latents
        acc.update(latents)
        if progress is not None:
            progress(latents.shape[0])
    return acc.result(source)


def save_latent_stats(folder: str | Path, stats: LatentStats, overwrite: bool = False) -> Path:
    """Write `folder/latent_stats.safetensors` atomically; no other file of the folder is touched.

    An existing statistics file is replaced only with overwrite=True (OutputError otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"{folder}: tokenizer folder not found; latent statistics are stored inside it")
    path = folder / STATS_NAME
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: latent statistics already exist; pass --overwrite (overwrite=True in Python) to "
                          f"replace them")
    tensors = {"mean": stats.mean.detach().float().cpu().contiguous(),
               "std": stats.std.detach().float().cpu().contiguous()}
    metadata = {"num_images": str(stats.num_images), "num_tokens": str(stats.num_tokens), "source": stats.source}
    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_latent_stats(folder: str | Path, channels: int | None = None) -> LatentStats | None:
    """The statistics stored in a tokenizer folder, or None when it has none.

    channels: the tokenizer's latent width; statistics of another width, or non-finite ones, are a CheckpointError.
    """
    path = Path(folder) / STATS_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: latent statistics file is truncated or corrupt ({exc})") from None
    mean, std = tensors.get("mean"), tensors.get("std")
    if mean is None or std is None or mean.ndim != 1 or mean.shape != std.shape:
        raise CheckpointError(f"{path}: expected 1-d 'mean' and 'std' tensors of the same length, got "
                              f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if channels is not None and mean.numel() != channels:
        raise CheckpointError(f"{path}: statistics for {mean.numel()} channels, but the tokenizer's latents have "
                              f"{channels}")
    if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError(f"{path}: mean/std hold non-finite or non-positive values")
    try:
        num_images, num_tokens = int(metadata.get("num_images", 0)), int(metadata.get("num_tokens", 0))
    except ValueError:
        num_images = num_tokens = 0
    return LatentStats(mean.float(), std.float(), num_images, num_tokens, metadata.get("source", ""))


def stats_summary(stats: LatentStats) -> str:
    """One line for logs and the CLI: counts and the spread of the per-channel mean and std."""
    return (f"{stats.channels} channels over {stats.num_tokens} tokens of {stats.num_images} images: mean in "
            f"[{stats.mean.min().item():.3f}, {stats.mean.max().item():.3f}], std in "
            f"[{stats.std.min().item():.3f}, {stats.std.max().item():.3f}]")
