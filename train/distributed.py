"""Process-group setup, so the same command line runs alone on a laptop or under torchrun/deepspeed on many nodes.

A launcher (torchrun, `deepspeed`, slurm wrappers) exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. With no
launcher we export them ourselves for a world of one (DeepSpeed otherwise falls back to MPI discovery and fails
without mpi4py), picking a free port so two single-process runs on one machine never collide.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool  # True when a launcher provided the environment

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Initialise (once) the default process group through DeepSpeed and describe this process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    self_set = not launched and not dist.is_initialized()
    added: list[str] = []
    if self_set:
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        added = [k for k in defaults if k not in os.environ]
        os.environ.update({k: defaults[k] for k in added})
        os.environ["LOCAL_RANK"] = "0"
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _device(local_rank)
    if not dist.is_initialized():
        import deepspeed

        if backend is None and device.type == "cpu":
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend or "nccl", auto_mpi_discovery=False)
    if self_set:
        # Only needed to create the group. Left behind, a child process (a test, a data tool) would take them for
        # a launcher's and try to join this process's group.
        for key in added:
            os.environ.pop(key, None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                    launched=launched)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a float tensor (returned on the input's device)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s value on every rank (e.g. a decision that only rank 0 can make, like a path)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown_distributed(wait_for_others: bool = True) -> None:
    """Leave the process group cleanly at the end of a program. Exiting with gloo's threads still live can abort a
    process ("terminate called without an active exception") after all its work is done. After an error, do not
    wait: the other processes may never arrive."""
    if dist.is_initialized():
        if wait_for_others:
            barrier()
        dist.destroy_process_group()
