"""Training throughput of the tiny ShapeWorld tokenizer on this machine at ZeRO-0/2/3 (docs/results.md).

Each ZeRO stage runs in its own process (single process, no launcher, the engine of `uniflow train tokenizer`) for a
short run: the `tiny` preset (6x192 encoder, 2 global blocks, 4x256 flow head, 64 px), batch 64, ShapeWorld rendered on
the fly in the training process (num_workers 0 unless --num-workers), distillation on. Per optimizer step the engine
logs images/s and the share of the step spent waiting for data; the first --warmup steps are dropped. The stages run
one after another, so on a shared machine compare them within one run only. With one process ZeRO-2/3 have nothing to
partition across: the numbers show the bookkeeping cost of each stage, not its memory savings.

    python bench/train.py                       # stages 0,2,3; 20 steps each (about 2 minutes on 2 cores)
    python bench/train.py --steps 40 --stages 0,2,3,3o --threads 1
Prints a Markdown table and writes bench/results/train.json (with the machine description).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train.json"
STAGES = {"0": "zero0", "2": "zero2", "3": "zero3", "3o": "zero3_offload"}


def run_config(stage: str, steps: int, batch: int, run_dir: str, num_workers: int) -> dict[str, Any]:
    return {
        "kind": "tokenizer", "run_dir": run_dir, "steps": steps, "batch_size": batch, "seed": 0,
        "model": {"preset": "tiny"},
        "optim": {"lr": 1e-3, "warmup_steps": 5, "schedule": "constant"},
        "data": {"source": "shapeworld", "image_size": 64, "num_samples": 50_000, "heldout_samples": 0,
                 "num_workers": num_workers},
        "deepspeed": {"config": STAGES[stage], "precision": "fp32"},
        "ema": {"enabled": True, "decay": 0.999},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 0},
        "export": {"enabled": False},
    }


def child(args: argparse.Namespace) -> None:
    """One stage, in this process; prints one JSON line with the per-step rows."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    from train.config import build_config
    from train.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        config = build_config(run_config(args.child, args.steps, args.batch, tmp, args.num_workers), "bench")
        result = train(config)
        rows = [r for r in result.history if r["kind"] == "train"]
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads()}))


def summarise(stage: str, rows: list[dict[str, Any]], warmup: int, batch: int) -> dict[str, Any]:
    kept = rows[warmup:]
    step_times = [batch / r["images_per_s"] for r in kept]
    total = sum(step_times)
    data = sum(t * r["data_share"] for t, r in zip(step_times, kept))
    return {
        "stage": STAGES[stage],
        "steps_timed": len(kept),
        "images_per_s": round(batch * len(kept) / total, 2),
        "images_per_s_median": round(statistics.median(r["images_per_s"] for r in kept), 2),
        "step_s_median": round(statistics.median(step_times), 4),
        "data_share": round(data / total, 4),
        "final_loss": round(rows[-1]["loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="0,2,3", help="comma list of 0, 2, 3, 3o (ZeRO-3 with CPU offload)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="steps dropped from the timing")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    sys.path.insert(0, str(ROOT))
    try:
        from bench.machine import describe
    except ImportError:  # run as a script
        from machine import describe
    machine = describe("cpu")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    results = []
    threads = None
    for stage in args.stages.split(","):
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; use {sorted(STAGES)}")
        cmd = [sys.executable, __file__, "--child", stage, "--steps", str(args.steps), "--batch", str(args.batch),
               "--num-workers", str(args.num_workers), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
        payload = json.loads(proc.stdout.strip().splitlines()[-1])
        threads = payload["threads"]
        results.append(summarise(stage, payload["rows"], args.warmup, args.batch))
        print(f"ZeRO-{stage}: {results[-1]['images_per_s']} images/s", file=sys.stderr)
    machine["torch_threads"] = threads
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # other work on a shared machine

    print(f"\nTraining throughput, tiny tokenizer (64 px, batch {args.batch}), single process, fp32, "
          f"{machine['cpu']}, {threads} threads, torch {machine['torch']}\n")
    print("| ZeRO | images/s | median images/s | step (s, median) | data-loading share | loss after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['stage']} | {r['images_per_s']:.1f} | {r['images_per_s_median']:.1f} | {r['step_s_median']:.3f} "
              f"| {100 * r['data_share']:.1f}% | {r['final_loss']:.4f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "train", "machine": machine,
               "settings": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                            "num_workers": args.num_workers, "model": "tiny", "image_size": 64,
                            "precision": "fp32", "processes": 1},
               "results": results}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
