"""The one training loop, for every model kind, on DeepSpeed.

    config -> task (model, data) -> deepspeed.initialize (ZeRO stage from JSON, batch/precision from the run config)
           -> [resume: model, optimizer, scheduler, EMA, RNG, data position]
           -> micro-batches: forward, backward, step (DeepSpeed accumulates and clips) -> EMA -> log / eval / checkpoint
           -> final evaluation, checkpoint and export of the inference folder

Determinism: the model is built from `seed` on every rank (identical weights), then each rank reseeds with
(seed, rank) for its training noise; the sampler and the DataLoader use their own generators, so a resumed run draws
exactly the noise and batches that the uninterrupted run drew.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from train import checkpointing
from train.config import TrainConfig, dump_yaml
from train.data import ResumableShardSampler
from train.distributed import DistInfo, all_reduce_mean, barrier, setup_distributed
from train.ds_config import batch_layout, build_ds_config, resolve_precision, zero_stage
from train.ema import EMA
from train.export import export_model
from train.metrics_log import MetricsLog, truncate_metrics
from train.optim import WarmupSchedule, build_optimizer, lr_factor
from train.tasks import EvalContext, Task, get_task
from uniflow.errors import ConfigError


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
        self.images = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], images: int) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.images += images


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


def train(config: TrainConfig, resume: str | Path | bool | None = None, export_only: bool = False) -> RunResult:
    """Run (or resume, or only export) one training run. resume: True = latest checkpoint of the run folder, or a
    run folder / checkpoint folder path."""
    task = get_task(config.kind)(config)
    run_dir = Path(config.run_dir)
    ckpt_path = None
    if resume:
        ckpt_path = checkpointing.find_checkpoint(run_dir if resume is True else resume)
    elif export_only:
        raise ConfigError("--export-only needs a checkpoint: pass --resume [DIR]")
    train_ds, heldout_ds = task.build_datasets()

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
    model = task.build_model()
    if stage < 3:
        model.to(dist_info.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(model, config.optim)

    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
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
        state, _ = checkpointing.load_checkpoint(engine, ckpt_path, config.kind, dist_info, stage, ema)
        _log_info(dist_info, f"resumed from {ckpt_path} at step {state.step} (epoch {state.epoch}, "
                             f"sample {state.position} of this process's shard)")
        if dist_info.is_main and not export_only:
            truncate_metrics(run_dir, state.step)
        barrier()
    else:
        seed_all(config.seed * 1_000_003 + 7919 * (dist_info.rank + 1))

    result = RunResult(run_dir=run_dir, state=state, engine=engine, ema=ema, task=task, dist=dist_info)
    log = MetricsLog(run_dir, dist_info.is_main and not export_only, config.log.tensorboard)

    def evaluate(final: bool) -> dict[str, float]:
        if heldout_ds is None:
            return {}
        engine.eval()
        try:
            ctx = EvalContext(forward=engine, heldout=heldout_ds, dist=dist_info, step=state.step, run_dir=run_dir,
                              batch_size=micro, final=final,
                              ema_scope=ema.swapped_in if ema is not None and stage < 3 else None)
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
            _train_loop(config, engine, scheduler, ema, train_ds, sampler, state, micro, accum, dist_info, log,
                        result, evaluate, checkpoint)
            if result.last_checkpoint is None or result.last_checkpoint.name != checkpointing.step_name(state.step):
                checkpoint()
        final_metrics = evaluate(final=True)
        if config.export.enabled:
            use_ema = config.export.use_ema
            if use_ema is None:
                use_ema = task.default_export_ema and ema is not None
            out_dir = Path(config.export.dir) if config.export.dir else run_dir / "export"
            result.export_dir = export_model(task, engine.module, dist_info, stage == 3, out_dir, ema, use_ema,
                                             config.export.dtype, {"step": state.step, **final_metrics})
            if result.export_dir is not None:
                _log_info(dist_info, f"exported {'EMA ' if use_ema else ''}weights to {result.export_dir}")
    finally:
        log.close()
    return result


def _train_loop(config: TrainConfig, engine: Any, scheduler: Any, ema: EMA | None, train_ds: Any,
                sampler: ResumableShardSampler, state: checkpointing.TrainState, micro: int, accum: int,
                dist_info: DistInfo, log: MetricsLog, result: RunResult, evaluate: Any, checkpoint: Any) -> None:
    progress = None
    if dist_info.is_main and config.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.steps, initial=state.step, desc=f"train {config.kind}", unit="step",
                        file=sys.stderr, dynamic_ncols=True)
    window = _Window()
    images_per_micro = micro * dist_info.world_size
    micro_in_step = 0
    done = state.step >= config.steps
    try:
        while not done:
            sampler.set_epoch(state.epoch, state.position)
            loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, drop_last=True,
                                num_workers=config.data.num_workers, pin_memory=dist_info.device.type == "cuda",
                                generator=torch.Generator().manual_seed(config.seed + state.epoch))
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                window.data_time += time.perf_counter() - t0
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                state.position += micro
                window.add(out["metrics"], images_per_micro)
                micro_in_step += 1
                if micro_in_step < accum:
                    continue
                micro_in_step = 0
                state.step += 1
                if ema is not None:
                    ema.update()
                if state.step % config.log.every == 0 or state.step == config.steps:
                    row = _log_row(config, state, window, dist_info)
                    log.write(row)
                    result.history.append(row)
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
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


def _log_row(config: TrainConfig, state: checkpointing.TrainState, window: _Window, dist_info: DistInfo
             ) -> dict[str, Any]:
    keys = sorted(window.sums)
    values = torch.stack([window.sums[k] for k in keys]).to(dist_info.device) / max(window.count, 1)
    values = all_reduce_mean(values).cpu().tolist()
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    times = all_reduce_mean(torch.tensor([window.data_time, elapsed], device=dist_info.device)).cpu().tolist()
    row: dict[str, Any] = {"step": state.step, "kind": "train", "epoch": state.epoch,
                           "lr": config.optim.lr * lr_factor(state.step - 1, config.steps, config.optim)}
    row.update(dict(zip(keys, values)))
    row["images_per_s"] = window.images / times[1]
    row["data_share"] = times[0] / times[1]
    row["time"] = time.time()
    return row
