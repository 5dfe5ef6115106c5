"""The one training loop, for every model kind, on DeepSpeed.

    config -> task (its sections, data, collate) -> checks: a new run folder (or --resume), the export folder
           -> model built in the run's ZeRO context (ZeRO-3: deepspeed.zero.Init + HfDeepSpeedConfig, partitioned as
              it is built) -> initial weights (task.initial_state; ZeRO-3: scattered from rank 0, see train/tasks.py)
           -> deepspeed.initialize (ZeRO stage from JSON, batch/precision from the run config; the task's param groups)
           -> [resume: model, optimizer, scheduler, EMA, RNG, data position]
           -> micro-batches: forward, backward, step (DeepSpeed accumulates and clips) -> stop on a non-finite loss
           -> EMA -> log (throughput in the task's unit) / eval / checkpoint
           -> final evaluation, checkpoint and export of the inference folder

Determinism: the model is built from `seed` on every rank (identical weights), then each rank reseeds with
(seed, rank) for its training noise; the sampler and the DataLoader use their own generators, so a resumed run draws
exactly the noise and batches that the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from train import checkpointing
from train.config import TrainConfig, dump_yaml
from train.data import CachedDataset, ResumableShardSampler, length_grouped
from train.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, broadcast_object, setup_distributed
from train.ds_config import batch_layout, build_ds_config, resolve_precision, zero_stage
from train.ema import EMA
from train.export import export_model
from train.metrics_log import METRICS_NAME, MetricsLog, truncate_metrics
from train.optim import WarmupSchedule, build_optimizer, lr_factor
from train.registry import get_task
from train.tasks import EvalContext, Task
from uniflow.errors import CheckpointError, ConfigError, OutputError, UniFlowError


class TrainingDiverged(UniFlowError):
    """The loss became NaN or infinite: training stops at once, and nothing is exported."""


@dataclass
class RunResult:
    """What a run leaves behind; `history` holds the logged rows (identical on every rank)."""

    run_dir: Path
    state: checkpointing.TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    export_dir: Path | None = None
    last_checkpoint: Path | None = None
    engine: Any = None
    ema: EMA | None = None
    task: Task | None = None
    dist: DistInfo | None = None
    built_numel: tuple[int, int] = (0, 0)  # (elements this rank held, elements of the model) right after the build
    train_data: Any = None  # the training set as the loader read it (a CachedDataset with data.cache_mb)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Window:
    """Sums of metrics, images and times since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.units = 0  # this process's images / tokens / ... (the task's count_unit)
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], units: int) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.units += units


def _log_info(dist_info: DistInfo, message: str) -> None:
    if dist_info.is_main:
        print(f"[train] {message}", file=sys.stderr, flush=True)


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _gather_nested_params_with_root(root: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward() and, in backward, only when it can see that
    forward's output tensors. Parameters owned by a module that has sub-modules are often read outside its forward
    (timm's forward_intermediates reads pos_embed and cls_token; the encoder adapter returns a dataclass DeepSpeed
    cannot look into), so they are registered with the root module and stay gathered for its whole forward and
    backward. They are embeddings and tokens: small."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in root.modules():
        if module is not root and next(module.children(), None) is not None:
            for p in module.parameters(recurse=False):
                register_external_parameter(root, p)


def _local_numel(p: torch.Tensor) -> int:
    """Elements this process holds: under ZeRO-3 its partition plus the whole tensor where one is kept (parameters
    below the persistence threshold); otherwise the whole tensor."""
    return p.ds_tensor.numel() + p.data.numel() if hasattr(p, "ds_tensor") else p.numel()


def _full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def check_new_run(run_dir: Path) -> None:
    """A run folder that already holds checkpoints or metrics is continued with --resume, never silently mixed."""
    ckpts = checkpointing.checkpoints_dir(run_dir)
    found = []
    if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        found.append("checkpoints")
    metrics = run_dir / METRICS_NAME
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_NAME)
    if found:
        raise OutputError(f"run_dir: {run_dir} already holds a run ({' and '.join(found)}); continue it with "
                          f"--resume, or choose a new run_dir (run_dir=... on the command line)")


def export_destination(config: TrainConfig, task: Task, run_dir: Path) -> Path:
    """The export folder, checked before any training: not the run folder, not above it, not inside its checkpoints,
    and either new, empty or an inference folder of this task's kind (replaced at the end)."""
    dest = Path(config.export.dir) if config.export.dir else run_dir / "export"
    d, r = dest.resolve(), run_dir.resolve()
    if d == r or r.is_relative_to(d) or d.is_relative_to(r / "checkpoints"):
        raise OutputError(f"export.dir: {dest} would overwrite the run folder {run_dir} (its checkpoints and "
                          f"metrics); choose a folder outside it or a sub-folder such as {run_dir / 'export'}")
    task.check_export_dir(dest)
    return dest


@contextlib.contextmanager
def _init_skips_partitioned() -> Iterator[None]:
    """While building under zero.Init, `torch.nn.init` functions leave partitioned parameters (empty local data)
    alone: a parent module initialising its children's weights would otherwise fail (xavier needs a shape) or do
    nothing. Their values come from the reference build instead (`_initialise`); a gathered parameter (whole data,
    e.g. inside `transformers`' own ZeRO-3 init) is initialised normally."""

    def guard(fn: Any) -> Any:
        @functools.wraps(fn)
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if hasattr(tensor, "ds_id") and tensor.numel() == 0:
                return tensor
            return fn(tensor, *args, **kwargs)

        return init

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, guard(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _build_model(task: Task, ds_config: dict[str, Any], stage: int) -> torch.nn.Module:
    """The task's module, built in the run's ZeRO context: under ZeRO-3 every parameter is partitioned as soon as its
    module is constructed (`deepspeed.zero.Init`, the run's dtype and offload), and `transformers`' HfDeepSpeedConfig
    is alive so `from_pretrained` partitions while it loads. It is dropped right after: left alive it would make every
    later `transformers` model in this process believe ZeRO-3 is on."""
    if stage < 3:
        return task.build_model()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    try:
        hf_zero3 = HfDeepSpeedConfig(ds_config)
    except ImportError as err:  # never silently: without it `from_pretrained` would load whole copies on every rank
        raise ConfigError(f"ZeRO-3 needs transformers' DeepSpeed integration, which needs `accelerate` "
                          f"(pip install accelerate): {err}") from None
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config), _init_skips_partitioned():
            return task.build_model()
    finally:
        del hf_zero3


def _check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> str | None:
    """A one-line problem (unknown names, wrong shapes) of loading `state` into `module`, or None."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters(remove_duplicate=False)}
    shapes.update({n: tuple(b.shape) for n, b in module.named_buffers(remove_duplicate=False)})
    unknown = sorted(set(state) - set(shapes))
    wrong = sorted(n for n in set(state) & set(shapes) if tuple(state[n].shape) != shapes[n])
    if unknown or wrong:
        return (f"{source}: the initial weights do not match the model (unknown {unknown[:5]}, mis-shaped "
                f"{[(n, tuple(state[n].shape), shapes[n]) for n in wrong[:3]]})")
    return None


@torch.no_grad()
def _load_whole(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    problem = _check_state(module, state, source)
    if problem:
        raise CheckpointError(problem)
    own = module.state_dict(keep_vars=True)
    for name, value in state.items():
        own[name].copy_(value)


@torch.no_grad()
def _scatter(module: torch.nn.Module, state: dict[str, torch.Tensor] | None, dist_info: DistInfo, source: str
             ) -> None:
    """Collective: rank 0's `state` into a ZeRO-3 partitioned module, one gathered parameter at a time (rank 0
    writes, DeepSpeed re-partitions); buffers are broadcast from rank 0."""
    import deepspeed
    import torch.distributed as dist

    problem = _check_state(module, state, source) if dist_info.is_main else None
    names = broadcast_object((problem, sorted(state)) if dist_info.is_main else None)
    problem, names = names
    if problem:
        raise CheckpointError(problem)
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    for name in names:
        if name in params:
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if dist_info.is_main:
                    params[name].data.copy_(state[name])
        else:
            buffer = buffers[name]
            if dist_info.is_main:
                buffer.copy_(state[name])
            if dist_info.world_size > 1:
                dist.broadcast(buffer, src=0)


def _initialise(task: Task, model: torch.nn.Module, stage: int, dist_info: DistInfo, seed: int) -> None:
    """Set the model's initial weights (see train/tasks.py): the task's `initial_state` under ZeRO 0/2; under ZeRO-3
    rank 0's plain reference build (same seed, initial state loaded) or the initial state alone, scattered."""
    source = f"{task.kind} task"
    if stage < 3:
        state = task.initial_state()
        if state:
            _load_whole(model, state, source)
        return
    state = None
    if dist_info.is_main:
        state = task.initial_state()
        if task.zero3_reference_init:
            seed_all(seed)
            reference = task.build_model()
            if state:
                _load_whole(reference, state, source)
            state = reference.state_dict()
            del reference
    _scatter(model, state or {}, dist_info, source)


def train(config: TrainConfig, resume: str | Path | bool | None = None, export_only: bool = False,
          trust_checkpoint: bool = False) -> RunResult:
    """Run (or resume, or only export) one training run. resume: True = latest checkpoint of the run folder, or a
    run folder / checkpoint folder path."""
    task = get_task(config.kind)(config)
    run_dir = Path(config.run_dir)
    ckpt_path = None
    if resume:
        ckpt_path = checkpointing.find_checkpoint(run_dir if resume is True else resume)
    elif export_only:
        raise ConfigError("--export-only needs a checkpoint: pass --resume [DIR]")
    else:
        check_new_run(run_dir)
    export_dir = export_destination(config, task, run_dir) if config.export.enabled else None
    train_ds, heldout_ds = task.build_datasets()
    if task.cache_mb:
        train_ds = CachedDataset(train_ds, task.cache_mb)
        heldout_ds = CachedDataset(heldout_ds, task.cache_mb) if heldout_ds is not None else None

    dist_info = setup_distributed()
    _quiet_deepspeed()
    ds_config = build_ds_config(config, dist_info.world_size, dist_info.device)
    stage = zero_stage(ds_config)
    micro, accum = batch_layout(config, dist_info.world_size)
    precision = resolve_precision(config.deepspeed.precision, dist_info.device)
    sampler = ResumableShardSampler(len(train_ds), dist_info.rank, dist_info.world_size, seed=config.seed)
    if sampler.per_rank < micro:
        raise ConfigError(f"{config.source}: the training set has {len(train_ds)} samples, fewer than one "
                          f"micro-batch ({micro}) per process ({dist_info.world_size} processes)")

    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.clean_temporaries(run_dir)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
    barrier()

    seed_all(config.seed)
    model = _build_model(task, ds_config, stage)
    built_numel = (sum(_local_numel(p) for p in model.parameters()), sum(_full_numel(p) for p in model.parameters()))
    _initialise(task, model, stage, dist_info, config.seed)
    if stage < 3:
        model.to(dist_info.device)
    trainable = sum(_full_numel(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(_full_numel(p) for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(model, config.optim, task.param_groups(model))
    group_lrs = {g["name"]: g["base_lr"] for g in optimizer.param_groups if not g["name"].endswith("/no_decay")}

    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False,
        lr_scheduler=lambda opt: WarmupSchedule(opt, config.steps, config.optim),
    )
    if stage == 3:
        _gather_nested_params_with_root(engine.module)
    ema = None
    if config.ema.enabled:
        ema = EMA(engine.module, config.ema.decay, config.ema.warmup, partitioned=stage == 3,
                  comm_device=dist_info.device)
    _log_info(dist_info, f"{config.kind}: {trainable / 1e6:.2f}M trainable + {frozen / 1e6:.2f}M frozen parameters, "
                         f"{dist_info.world_size} process(es), ZeRO-{stage}, {precision}, batch {config.batch_size} = "
                         f"{micro} x {accum} accumulation x {dist_info.world_size}, run folder {run_dir}")

    state = checkpointing.TrainState()
    if ckpt_path is not None:
        state, _ = checkpointing.load_checkpoint(engine, ckpt_path, config.kind, dist_info, stage, ema,
                                                 trust_checkpoint=trust_checkpoint)
        _log_info(dist_info, f"resumed from {ckpt_path} at step {state.step} (epoch {state.epoch}, "
                             f"sample {state.position} of this process's shard)")
        if dist_info.is_main and not export_only:
            truncate_metrics(run_dir, state.step)
        barrier()
    else:
        seed_all(config.seed * 1_000_003 + 7919 * (dist_info.rank + 1))

    result = RunResult(run_dir=run_dir, state=state, engine=engine, ema=ema, task=task, dist=dist_info,
                       built_numel=built_numel, train_data=train_ds)
    log = MetricsLog(run_dir, dist_info.is_main and not export_only, config.log.tensorboard)

    def evaluate(final: bool) -> dict[str, float]:
        if heldout_ds is None:
            return {}
        engine.eval()
        try:
            ctx = EvalContext(forward=engine, heldout=heldout_ds, dist=dist_info, step=state.step, run_dir=run_dir,
                              batch_size=micro, final=final,
                              ema_scope=ema.swapped_in if ema is not None and stage < 3 else None,
                              module=engine.module, partitioned=stage == 3, collate=task.collate)
            metrics = task.evaluate(ctx)
        finally:
            engine.train()
        row = {"step": state.step, "kind": "eval", **metrics}
        log.write(row)
        result.history.append(row)
        return metrics

    def checkpoint() -> None:
        result.last_checkpoint = checkpointing.save_checkpoint(
            engine, run_dir, state, config.kind, dist_info, stage, ema, keep_last=config.checkpoint.keep_last,
            extra={"micro_batch_size": micro, "seed": config.seed})

    try:
        if not export_only:
            _train_loop(config, task, engine, ema, train_ds, sampler, state, micro, accum, dist_info, log,
                        result, evaluate, checkpoint, group_lrs, ckpt_path)
            if result.last_checkpoint is None or result.last_checkpoint.name != checkpointing.step_name(state.step):
                checkpoint()
        final_metrics = evaluate(final=True)
        if config.export.enabled:
            use_ema = config.export.use_ema
            if use_ema is None:
                use_ema = task.default_export_ema and ema is not None
            result.export_dir = export_model(task, engine.module, dist_info, stage == 3, export_dir, ema, use_ema,
                                             config.export.dtype, {"step": state.step, **final_metrics})
            if result.export_dir is not None:
                _log_info(dist_info, f"exported {'EMA ' if use_ema else ''}weights to {result.export_dir}")
    finally:
        log.close()
    return result


def _train_loop(config: TrainConfig, task: Task, engine: Any, ema: EMA | None, train_ds: Any,
                sampler: ResumableShardSampler, state: checkpointing.TrainState, micro: int, accum: int,
                dist_info: DistInfo, log: MetricsLog, result: RunResult, evaluate: Any, checkpoint: Any,
                group_lrs: dict[str, float], resumed_from: Path | None) -> None:
    progress = None
    if dist_info.is_main and config.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.steps, initial=state.step, desc=f"train {config.kind}", unit="step",
                        file=sys.stderr, dynamic_ncols=True)
    window = _Window()
    unit = task.count_unit
    nonfinite = torch.zeros((), device=dist_info.device)
    micro_in_step = 0
    done = state.step >= config.steps
    try:
        while not done:
            batches = _batches(config, task, train_ds, sampler, state, micro, dist_info)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                window.data_time += time.perf_counter() - t0
                units = task.batch_count(batch)
                out = engine(batch)
                nonfinite += (~torch.isfinite(out["loss"].detach())).sum()  # no device sync here
                engine.backward(out["loss"])
                engine.step()
                state.position += micro
                window.add(out["metrics"], units)
                micro_in_step += 1
                if micro_in_step < accum:
                    continue
                micro_in_step = 0
                state.step += 1
                if all_reduce_sum(nonfinite.reshape(1).float()).item() > 0:  # one sync per optimizer step
                    last = result.last_checkpoint or resumed_from
                    raise TrainingDiverged(
                        f"step {state.step}: the training loss is not finite (NaN or inf); training stopped and "
                        f"nothing was exported; last good checkpoint: {last or 'none'} (resume from it with a lower "
                        f"optim.lr, or check the data)")
                if ema is not None:
                    ema.update()
                if state.step % config.log.every == 0 or state.step == config.steps:
                    row = _log_row(config, state, window, dist_info, unit, group_lrs)
                    log.write(row)
                    result.history.append(row)
                    if progress is not None:
                        progress.set_postfix({"loss": f"{row['loss']:.4f}", f"{unit}/s": f"{row[unit + '_per_s']:.1f}"})
                    window.reset()
                if progress is not None:
                    progress.update(1)
                if config.log.eval_every and state.step % config.log.eval_every == 0 and state.step < config.steps:
                    evaluate(final=False)
                if config.checkpoint.every and state.step % config.checkpoint.every == 0:
                    checkpoint()
                if state.step >= config.steps:
                    done = True
                    break
            if not done:
                state.epoch += 1
                state.position = 0
    finally:
        if progress is not None:
            progress.close()


def _batches(config: TrainConfig, task: Task, train_ds: Any, sampler: ResumableShardSampler,
             state: checkpointing.TrainState, micro: int, dist_info: DistInfo) -> Iterator[Any]:
    """This epoch's collated micro-batches from the data position on: in the sampler's order, or, where the task
    groups by length (`task.length_group` micro-batches a group), sorted within each group
    (`train.data.length_grouped`); a resumed run starts at its group's first sample and skips the batches it already
    trained on."""
    group = task.length_group
    per_load = micro * group if group else micro
    offset = state.position % per_load
    sampler.set_epoch(state.epoch, state.position - offset)
    loader = DataLoader(train_ds, batch_size=per_load, sampler=sampler, drop_last=not group,
                        num_workers=task.num_workers, collate_fn=list if group else task.collate,
                        pin_memory=dist_info.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed + state.epoch))
    if not group:
        return iter(loader)
    grouped = length_grouped(loader, micro, task.item_length, config.seed, state.epoch,
                             first_group=(state.position - offset) // per_load, skip=offset // micro)
    return (task.collate(items) for items in grouped)


def _log_row(config: TrainConfig, state: checkpointing.TrainState, window: _Window, dist_info: DistInfo,
             unit: str, group_lrs: dict[str, float]) -> dict[str, Any]:
    keys = sorted(window.sums)
    values = torch.stack([window.sums[k] for k in keys]).to(dist_info.device) / max(window.count, 1)
    values = all_reduce_mean(values).cpu().tolist()
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    sums = all_reduce_sum(torch.tensor([window.data_time, elapsed, float(window.units)], dtype=torch.float64,
                                       device=dist_info.device)).cpu().tolist()
    data_time, elapsed = sums[0] / dist_info.world_size, sums[1] / dist_info.world_size
    factor = lr_factor(state.step - 1, config.steps, config.optim)
    row: dict[str, Any] = {"step": state.step, "kind": "train", "epoch": state.epoch, "lr": config.optim.lr * factor}
    if len(group_lrs) > 1:
        row.update({f"lr_{name}": base * factor for name, base in group_lrs.items()})
    row.update(dict(zip(keys, values)))
    row[f"{unit}_per_s"] = sums[2] / elapsed
    row["data_share"] = data_time / elapsed
    row["time"] = time.time()
    return row
