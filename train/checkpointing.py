"""Training checkpoints: written atomically by all ranks, found again by `--resume`, checked before loading.

Layout of `<run_dir>/checkpoints/step_0000100/`:
    trainer_state.json   model kind, step, data position (epoch, samples consumed in it), world size, ZeRO stage
    ds/state/            DeepSpeed's own files: module, optimizer and scheduler state (per rank under ZeRO)
    rng/rank_00000.pt    python, numpy, torch (and CUDA) RNG states of each rank
    ema/rank_00000.safetensors   EMA weights (one per rank under ZeRO-3, else rank 0's)
Every rank writes into `.step_0000100.tmp`; once all are done rank 0 renames it into place and then updates the
`latest` file, so a crash at any point leaves the previous checkpoint and `latest` intact. Temporary folders are
ignored when resuming and removed by the next save. The checkpoint folder must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from train.ema import EMA
from uniflow.errors import CheckpointError

STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
DS_DIR = "ds"
DS_TAG = "state"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where training is: optimizer steps done, and the data position (epoch, samples this rank consumed in it)."""

    step: int = 0
    epoch: int = 0
    position: int = 0


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


# ------------------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_rng(folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rank_{rank:05d}.pt")


# ---------------------------------------------------------------------------------------------------------- saving
def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine: Any, run_dir: str | Path, state: TrainState, kind: str, dist_info: DistInfo,
                    zero_stage: int, ema: EMA | None = None, extra: dict[str, Any] | None = None,
                    keep_last: int = 2) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder."""
    root = checkpoints_dir(run_dir)
    final = root / step_name(state.step)
    tmp = root / f".{final.name}.tmp"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    error: BaseException | None = None
    try:
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state={}, save_latest=False)
        _write_rng(tmp / "rng", dist_info.rank)
        if ema is not None:
            ema.save(tmp / "ema", dist_info.rank)
    except Exception as exc:  # agreed on below, so no rank commits a checkpoint another rank failed to write
        error = exc
    failures = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=dist_info.device))
    if error is not None:
        raise error
    if failures.item() > 0:
        raise CheckpointError(f"{final}: another process failed to write its part; the previous checkpoint is kept")
    if dist_info.is_main:
        meta = {
            "format": FORMAT_VERSION,
            "kind": kind,
            **asdict(state),
            "world_size": dist_info.world_size,
            "zero_stage": zero_stage,
            "ema": ema is not None,
            "ema_updates": ema.num_updates if ema is not None else 0,
            "time": time.time(),
            **(extra or {}),
        }
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = root / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _atomic_text(root / LATEST_NAME, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, keep=final.name)
    barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and
                   (p / STATE_NAME).is_file())
    for path in steps[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def clean_temporaries(run_dir: str | Path) -> None:
    """Remove folders left by interrupted saves (rank 0, at start)."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if not (p.name.startswith(".") and p.name.endswith((".tmp", ".old"))):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------- finding
def _complete(folder: Path) -> bool:
    return (folder / STATE_NAME).is_file() and (folder / DS_DIR).is_dir()


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete one of a run folder; CheckpointError naming the path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such folder")
    if _complete(path):
        return path
    if (path / STATE_NAME).is_file():
        raise CheckpointError(f"{path}: checkpoint is incomplete (no {DS_DIR}/ folder)")
    root = path if path.name == "checkpoints" else checkpoints_dir(path)
    latest = root / LATEST_NAME
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if _complete(candidate):
            return candidate
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _complete(p)) \
        if root.is_dir() else []
    if not found:
        raise CheckpointError(f"--resume {path}: no checkpoint found (expected {STATE_NAME} in it, or complete "
                              f"step_* folders in {root})")
    return found[-1]


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc})") from None


def check_compatible(folder: Path, meta: dict[str, Any], kind: str, dist_info: DistInfo, zero_stage: int,
                     ema_enabled: bool) -> None:
    path = folder / STATE_NAME
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: checkpoint of a {meta.get('kind')!r} model, but this run trains {kind!r}")
    if meta.get("zero_stage", 0) != zero_stage:
        raise CheckpointError(f"{path}: written with ZeRO stage {meta.get('zero_stage')}, this run uses stage "
                              f"{zero_stage}; resume with the same deepspeed.config")
    if meta.get("world_size") != dist_info.world_size and zero_stage > 0:
        raise CheckpointError(f"{path}: written by {meta.get('world_size')} processes; ZeRO partitions are per "
                              f"process, so resume with {meta.get('world_size')} processes")
    if ema_enabled and not meta.get("ema"):
        raise CheckpointError(f"{path}: has no EMA weights but ema.enabled is true")


def load_checkpoint(engine: Any, folder: Path, kind: str, dist_info: DistInfo, zero_stage: int,
                    ema: EMA | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer, scheduler, EMA and this rank's RNG; returns the data position and the metadata."""
    folder = Path(broadcast_object(str(folder)))
    meta = read_state(folder)
    check_compatible(folder, meta, kind, dist_info, zero_stage, ema is not None)
    load_path, _ = engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{folder / DS_DIR}: DeepSpeed found no checkpoint to load")
    if ema is not None:
        ema.load(folder / "ema", dist_info.rank)
    rng_file = folder / "rng" / f"rank_{dist_info.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        import warnings

        warnings.warn(f"{rng_file}: missing; this rank continues with fresh random state", stacklevel=2)
    state = TrainState(step=int(meta["step"]), epoch=int(meta["epoch"]), position=int(meta["position"]))
    if meta.get("world_size") != dist_info.world_size:
        import warnings

        warnings.warn(f"{folder}: written by {meta.get('world_size')} processes, resumed by {dist_info.world_size}: "
                      "the data order differs from an uninterrupted run", stacklevel=2)
    return state, meta
