"""Training checkpoints: written atomically by all ranks, found again by `--resume`, checked before loading.

Layout of `<run_dir>/checkpoints/step_0000100/`:
    trainer_state.json   model kind, step, data position (epoch, samples consumed in it), world size, ZeRO stage
    ds/state/            DeepSpeed's own files: module, optimizer and scheduler state (per rank under ZeRO)
    rng/rank_00000.pt    python, numpy, torch (and CUDA) RNG states of each rank
    ema/rank_00000.safetensors   EMA weights (one per rank under ZeRO-3, else rank 0's)
Every rank writes into `.step_0000100.tmp`; once all are done rank 0 renames it into place and then updates the
`latest` file, so a crash at any point leaves the previous checkpoint and `latest` intact. Temporary folders are
ignored when resuming and removed by the next save. The checkpoint folder must be on a filesystem all ranks share.

Frozen parameters (`requires_grad=False`: a frozen LLM, a distillation teacher) are left out of `ds/`: the task builds
them identically on every run, so rewriting them at every save would only cost disk and time. A fingerprint of them
(count, sum, sum of squares) in `trainer_state.json` makes a resume refuse a model whose frozen part was built
differently (other weight files, other seed) instead of silently continuing with other weights.

No code from files: DeepSpeed unpickles its `*.pt` files with `weights_only=False`, so before it reads anything every
pickle in the checkpoint must load under `weights_only=True` with only the types DeepSpeed itself writes allowed
(`DEEPSPEED_SAFE_GLOBALS`); `trust_checkpoint=True` (`--trust-checkpoint`) skips that check.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from train.ema import EMA
from uniflow.errors import CheckpointError
from uniflow.fileio import atomic_write_text

STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
DS_DIR = "ds"
DS_TAG = "state"
FORMAT_VERSION = 1
# Files DeepSpeed (or torch) would unpickle; each is checked under weights_only=True before anything loads it.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# The non-tensor types DeepSpeed 0.19 pickles into its checkpoints, found by writing real checkpoints at ZeRO-0/2/3 in
# fp32 and bf16 (ZeRO-0 files need none; ZeRO-2/3 optimizer files hold these). Nothing else may be unpickled.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
STATE_FIELDS = {"kind": str, "step": int, "epoch": int, "position": int}


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


# ------------------------------------------------------------------------------------------------ frozen parameters
def _frozen_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if not p.requires_grad]


def frozen_fingerprint(module: nn.Module, partitioned: bool = False,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Count, sum and sum of squares (float64) of the frozen parameters: enough to tell that a rebuilt model's frozen
    part is not the one a checkpoint was saved with. A collective under ZeRO-3 (each rank sums its partitions, and
    `device` is where the sums are reduced: the process group's device)."""
    params = _frozen_params(module)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    for p in params:
        local = p.ds_tensor if partitioned and hasattr(p, "ds_tensor") else p.data
        count += int(getattr(p, "ds_numel", p.numel()))
        for chunk in local.detach().reshape(-1).split(1 << 24):  # bounded float64 temporaries for huge tensors
            c = chunk.double()
            sums[0] += c.sum().to(sums.device)
            sums[1] += c.square().sum().to(sums.device)
    if partitioned:
        sums = all_reduce_sum(sums)
    total, squares = sums.tolist()
    return {"count": count, "sum": total, "sumsq": squares}


def _check_frozen(path: Path, saved: Any, now: dict[str, float]) -> None:
    if not isinstance(saved, dict):
        return  # written before fingerprints existed: the frozen weights, if any, came from the checkpoint itself
    same = saved.get("count") == now["count"] and all(
        isinstance(saved.get(k), (int, float)) and math.isclose(saved[k], now[k], rel_tol=1e-6, abs_tol=1e-3)
        for k in ("sum", "sumsq"))
    if not same:
        raise CheckpointError(
            f"{path}: the frozen parameters of the model built now ({now['count']} values, sum of squares "
            f"{now['sumsq']:.6g}) are not those the checkpoint was saved with ({saved.get('count')} values, "
            f"{saved.get('sumsq')}); checkpoints leave frozen weights out, so build the model from the same weight "
            "files and seed")


def _module_loader(module_file: str) -> Callable[..., None]:
    """DeepSpeed's `custom_load_fn`: load the module state, tolerating exactly the missing frozen parameters."""

    def load(src: dict[str, Any], dst: nn.Module) -> None:
        frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        unexpected = sorted(result.unexpected_keys)
        if missing or unexpected:
            raise CheckpointError(f"{module_file}: the saved module does not match the model (missing "
                                  f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                                  f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")

    return load


# ---------------------------------------------------------------------------------------------------------- saving
def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


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
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)
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
    frozen = frozen_fingerprint(engine.module, partitioned=zero_stage == 3, device=dist_info.device)
    if dist_info.is_main:
        meta = {
            "format": FORMAT_VERSION,
            "kind": kind,
            **asdict(state),
            "world_size": dist_info.world_size,
            "zero_stage": zero_stage,
            "ema": ema is not None,
            "ema_updates": ema.num_updates if ema is not None else 0,
            "frozen": frozen,
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
        atomic_write_text(root / LATEST_NAME, final.name + "\n")
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


def _is_temporary(folder: Path) -> bool:
    """A folder an unfinished (or replaced) save left behind: never resumed from."""
    return folder.name.startswith(".") and folder.name.endswith((".tmp", ".old"))


def _latest_target(root: Path) -> Path | None:
    """The folder the `latest` file names, if there is one; a name that is not a step folder of `root` is an error
    (it would otherwise load whatever the file points at)."""
    latest = root / LATEST_NAME
    if not latest.is_file():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{latest}: unreadable ({exc})") from None
    if not re.fullmatch(r"step_\d+", name):
        raise CheckpointError(f"{latest}: names {name[:80]!r}, expected a step_NNNNNNN folder inside {root}")
    return root / name


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete one of a run folder; CheckpointError naming the path.
    Temporaries of unfinished saves (`.step_*.tmp`, `.step_*.old`) are never chosen."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such folder")
    if _is_temporary(path):
        raise CheckpointError(f"--resume {path}: a temporary folder of an unfinished save, not a checkpoint; resume "
                              f"from the run folder {path.parent.parent}")
    if _complete(path):
        return path
    if (path / STATE_NAME).is_file():
        raise CheckpointError(f"{path}: checkpoint is incomplete (no {DS_DIR}/ folder)")
    root = path if path.name == "checkpoints" else checkpoints_dir(path)
    candidate = _latest_target(root)
    if candidate is not None and _complete(candidate):
        return candidate
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _complete(p)) \
        if root.is_dir() else []
    if not found:
        raise CheckpointError(f"--resume {path}: no checkpoint found (expected {STATE_NAME} in it, or complete "
                              f"step_* folders in {root})")
    return found[-1]


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, with its required fields checked."""
    path = folder / STATE_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({_one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in STATE_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            expected = "a non-negative integer" if kind is int else "a string"
            raise CheckpointError(f"{path}: field {key!r} must be {expected}, got {value!r}")
    return meta


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


# ---------------------------------------------------------------------------------------------------------- safety
def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_global_objects() -> list[Any]:
    import importlib

    objects = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: the type cannot be in its files either
            continue
    return objects


def _globals_in_plain_pickle(path: Path) -> list[str]:
    """The globals a non-zip pickle names, read statically (pickletools never executes anything)."""
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as fh:
            for opcode, arg, _ in pickletools.genops(fh):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # damaged past the globals: report what was found
        pass
    return names


def _unsafe_global(path: Path, message: str) -> str:
    """The first global the file needs that is not allowed (for the error message)."""
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = []
    else:
        names = _globals_in_plain_pickle(path)
    safe = set(DEEPSPEED_SAFE_GLOBALS)
    try:  # torch's default allow-list (private; only used to word the message)
        from torch._weights_only_unpickler import _get_allowed_globals

        safe |= set(_get_allowed_globals())
    except (ImportError, AttributeError):
        pass
    names = [n for n in names if n not in safe]
    if names:
        return names[0]
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "a non-tensor object"


def check_pickle(path: Path) -> None:
    """Unpickle `path` under weights_only=True with only DeepSpeed's own types allowed (tensors memory-mapped, not
    read); CheckpointError naming the file and the offending global, or saying it is damaged."""
    import warnings

    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_global_objects()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols: the verdict says enough
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" not in message:
            raise CheckpointError(f"{path}: damaged or not a checkpoint file ({_one_line(exc)})") from None
        raise CheckpointError(
            f"{path}: refusing to unpickle {_unsafe_global(path, message)} (a checkpoint may hold only tensors and "
            "DeepSpeed's own types; if you wrote this checkpoint yourself and trust it, pass --trust-checkpoint)"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: damaged or not a checkpoint file ({_one_line(exc)})") from None


def verify_checkpoint_files(folder: Path) -> None:
    """Every pickle in the checkpoint loads without running code (see the module docstring)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    for path in files:
        check_pickle(path)


def _agreed(action: Callable[[], Any], what: str, device: torch.device) -> Any:
    """Run `action` on every rank and raise on every rank if it failed on any, so no rank trains on alone."""
    error: CheckpointError | None = None
    result = None
    try:
        result = action()
    except CheckpointError as exc:
        error = exc
    failures = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=device))
    if error is not None:
        raise error
    if failures.item() > 0:
        raise CheckpointError(f"{what}: another process could not load its part (see its error)")
    return result


# --------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(engine: Any, folder: Path, kind: str, dist_info: DistInfo, zero_stage: int,
                    ema: EMA | None = None, trust_checkpoint: bool = False) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer, scheduler, EMA and this rank's RNG; returns the data position and the metadata.

    Frozen parameters keep the values of the freshly built model (checked against the saved fingerprint). Unless
    `trust_checkpoint`, every pickle is checked before DeepSpeed unpickles anything (see `check_pickle`)."""
    folder = Path(broadcast_object(str(folder)))
    meta = read_state(folder)
    check_compatible(folder, meta, kind, dist_info, zero_stage, ema is not None)
    if not trust_checkpoint:
        error = None
        if dist_info.is_main:  # the folder is shared by all ranks: one reader, one verdict
            try:
                verify_checkpoint_files(folder)
            except CheckpointError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
    ds_dir = folder / DS_DIR
    try:
        load_path, _ = engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              custom_load_fn=_module_loader(str(ds_dir / DS_TAG)))
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file DeepSpeed read (trusted, or damaged past the pickle)
        raise CheckpointError(f"{ds_dir}: DeepSpeed could not load it ({type(exc).__name__}: "
                              f"{_one_line(exc)})") from exc
    if load_path is None:
        raise CheckpointError(f"{ds_dir}: DeepSpeed found no checkpoint to load")
    _check_frozen(folder / STATE_NAME, meta.get("frozen"),
                  frozen_fingerprint(engine.module, partitioned=zero_stage == 3, device=dist_info.device))

    def load_own_part() -> None:
        if ema is not None:
            ema.load(folder / "ema", dist_info.rank)
        rng_file = folder / "rng" / f"rank_{dist_info.rank:05d}.pt"
        if rng_file.is_file():
            try:
                rng = torch.load(rng_file, map_location="cpu", weights_only=True)
                set_rng_state(rng)
            except Exception as exc:
                raise CheckpointError(f"{rng_file}: damaged random-state file ({_one_line(exc)})") from None
        else:
            import warnings

            warnings.warn(f"{rng_file}: missing; this rank continues with fresh random state", stacklevel=3)

    _agreed(load_own_part, str(folder), dist_info.device)
    state = TrainState(step=int(meta["step"]), epoch=int(meta["epoch"]), position=int(meta["position"]))
    if meta.get("world_size") != dist_info.world_size:
        import warnings

        warnings.warn(f"{folder}: written by {meta.get('world_size')} processes, resumed by {dist_info.world_size}: "
                      "the data order differs from an uninterrupted run", stacklevel=2)
    return state, meta
