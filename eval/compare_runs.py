"""Compare training runs side by side from their `metrics.jsonl`: the held-out PSNR curve and the end-of-run losses.

    python -m eval.compare_runs baseline=runs/tokenizer_tiny uniform=runs/abl_uniform gtb0=runs/abl_gtb0

Prints two Markdown tables: held-out PSNR (EMA weights where the run has them) at every evaluation step, and per run
the last logged flow and distillation losses, the mean over layers of the per-layer distillation distance α_l and the
median seconds per optimizer step. That is how the ablations in docs/results.md were reported: runs of the same
budget (steps x batch), read from the files the engine writes, nothing re-measured by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from train.metrics_log import METRICS_NAME, read_metrics
from uniflow.errors import UniFlowError


def parse_run(spec: str) -> tuple[str, Path]:
    """`name=dir` or a bare `dir` (named after the folder)."""
    name, sep, folder = spec.partition("=")
    path = Path(folder if sep else name)
    return (name if sep else path.name), path


def load_run(path: Path) -> list[dict[str, Any]]:
    rows = read_metrics(path)
    if not rows:
        raise UniFlowError(f"{path / METRICS_NAME}: no metrics (is {path} a run folder of `uniflow train`?)")
    return rows


def psnr_curve(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Step -> held-out PSNR, preferring the EMA weights (what the run exports)."""
    curve = {}
    for row in rows:
        if row.get("kind") == "eval":
            value = row.get("heldout_psnr_ema", row.get("heldout_psnr"))
            if value is not None:
                curve[int(row["step"])] = float(value)
    return curve


def summary(rows: list[dict[str, Any]], batch_size: int | None) -> dict[str, float]:
    train = [row for row in rows if row.get("kind") == "train"]
    if not train:
        return {}
    last = train[-1]
    alphas = [v for k, v in last.items() if k.startswith("alpha_")]
    out = {"step": float(last["step"]), "flow": last.get("flow", float("nan")),
           "distill": last.get("distill", float("nan")),
           "mean_alpha": sum(alphas) / len(alphas) if alphas else float("nan")}
    rates = [row["images_per_s"] for row in train if row.get("images_per_s")]
    if rates and batch_size:
        out["s_per_step"] = batch_size / statistics.median(rates)
    return out


def run_batch_size(path: Path) -> int | None:
    """The batch size recorded in the run's resolved config (`config.yaml`), if present."""
    config = path / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    value = data.get("batch_size")
    return int(value) if value is not None else None


def markdown(runs: dict[str, list[dict[str, Any]]], batch_sizes: dict[str, int | None]) -> str:
    curves = {name: psnr_curve(rows) for name, rows in runs.items()}
    steps = sorted(set().union(*curves.values()))
    names = list(runs)
    lines = ["| step | " + " | ".join(f"{n} PSNR (dB)" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for step in steps:
        cells = [f"{curves[n][step]:.2f}" if step in curves[n] else "" for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | steps | flow loss | distill loss | mean α_l | s/step |", "|---|---|---|---|---|---|"]
    for name in names:
        s = summary(runs[name], batch_sizes[name])
        if s:
            rate = f"{s['s_per_step']:.2f}" if "s_per_step" in s else ""
            lines.append(f"| {name} | {int(s['step'])} | {s['flow']:.4f} | {s['distill']:.5f} | "
                         f"{s['mean_alpha']:.5f} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, optionally named: name=runs/folder")
    args = parser.parse_args(argv)
    try:
        specs = [parse_run(spec) for spec in args.runs]
        runs = {name: load_run(path) for name, path in specs}
    except UniFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(runs, {name: run_batch_size(path) for name, path in specs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
