"""Exponential moving average of the trainable weights, kept outside DeepSpeed.

Each rank keeps fp32 EMA tensors for the weights it owns: the full tensors under ZeRO 0/2 (every rank holds the whole
model), and only its own flat partition (`param.ds_tensor`) under ZeRO-3. The ZeRO-3 update therefore needs no
communication and 1/world of the memory; the partitions are gathered only when exporting. DeepSpeed lays a ZeRO-3
partition out as rank r holding elements [r*s, (r+1)*s) of the flattened, zero-padded parameter, s = ceil(n/world).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from uniflow.errors import CheckpointError


class EMA:
    def __init__(self, module: nn.Module, decay: float, warmup: bool = False, partitioned: bool = False,
                 comm_device: torch.device | str = "cpu") -> None:
        self.decay = decay
        self.warmup = warmup
        self.partitioned = partitioned
        self.comm_device = torch.device(comm_device)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}
        self.num_updates = 0

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        if self.partitioned:
            return p.ds_tensor
        return p.data

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step: ema <- d * ema + (1 - d) * weights."""
        weight = 1.0 - self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(self._local(p).float(), weight)
        self.num_updates += 1

    # ------------------------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors (CPU) by parameter name. A collective under ZeRO-3: call it on every rank."""
        if not self.partitioned:
            return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}
        world = dist.get_world_size()
        out = {}
        for name, p in self.params.items():
            shard = self.shadow[name].to(self.comm_device)
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard)
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (ZeRO 0/2), e.g. to evaluate them."""
        if self.partitioned:
            raise NotImplementedError("swapping EMA weights in is not supported under ZeRO-3")
        backup = {n: p.data.clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.data.copy_(self.shadow[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.data.copy_(backup[n])

    # --------------------------------------------------------------------------------------------------- checkpoint
    def save(self, folder: Path, rank: int) -> None:
        """Under ZeRO-3 every rank writes its partition; otherwise rank 0 writes the (identical) full tensors."""
        if self.partitioned or rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
            save_file(tensors, str(folder / f"rank_{rank:05d}.safetensors"),
                      metadata={"num_updates": str(self.num_updates), "partitioned": str(self.partitioned)})

    def load(self, folder: Path, rank: int) -> None:
        path = folder / f"rank_{rank if self.partitioned else 0:05d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: EMA weights missing from the checkpoint (was it saved with ema.enabled?)")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            num_updates = int(meta.get("num_updates", 0))
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: damaged EMA file ({' '.join(str(exc).split())[:200]})") from None
        missing = sorted(set(self.shadow) - set(tensors))
        wrong = sorted(n for n in set(self.shadow) & set(tensors) if tensors[n].shape != self.shadow[n].shape)
        if missing or wrong:
            raise CheckpointError(f"{path}: EMA does not match the model (missing {missing[:5]}, "
                                  f"mis-shaped {wrong[:5]})")
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
        self.num_updates = num_updates
