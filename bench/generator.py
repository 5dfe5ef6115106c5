"""Generator benchmark: KV-cache sampling against recomputing the prefix and against `transformers`' LLaMA generate.

What it measures (targets: docs/results.md, "Targets"; issue 10, acceptance 3), side by side in one run, with random
weights at the `B` preset (LlamaGen's GPT-B transformer; 16 x 16 = 256 tokens), CFG on (one batched conditional +
unconditional pass), the preset's default head steps:
- tokens/s at batch 1 and 16 with the static KV cache (`generator.sample.sample_latents`) and with the prefix
  recomputed for every token (`use_cache=False`); goal: cache >= 5x recompute;
- tokens/s of `transformers`' `LlamaForCausalLM.generate` with a static cache (`cache_implementation="static"`) at
  the same width, depth, heads and MLP, LlamaGen's 16384-entry codebook as its vocabulary, greedy, the same number of
  rows (2 x batch with CFG) and 256 new tokens; goal: ours (flow head included) >= 1.0x per token. The two are timed
  in alternating rounds (`bench.tokenizer.measure_interleaved`), so a slow spell of the machine falls on both;
- the share of the cached sampling time spent in the flow head (timed around every head call, device synchronised);
- peak extra memory of every measurement (CPU: peak RSS above the start; CUDA: max_memory_allocated above the start).
Tokens/s count the requested samples' tokens (batch x 256), not the unconditional twins. Every figure is the median
of `--repeats` runs after one warm-up. Prints a Markdown table and writes `bench/results/generator.json` with the
machine description (`bench/machine.py`).

    python bench/generator.py                        # everything at B (a GPU: minutes; see below for a CPU)
    python bench/generator.py --device cuda --compile
    python bench/generator.py --quick                # the tiny preset, 1 repeat, batch 1: a smoke test (seconds)
    python bench/generator.py --parts cache,llama    # leave out the slow recompute baseline

On a CPU the recompute baseline dominates: recomputing the prefix costs about N/2 = 128 times the cached work, i.e.
roughly 2 x rows x 128 x 256 x 86M FLOP (about 11 TFLOP at batch 1 and 180 TFLOP at batch 16 under CFG), so at
~150 GFLOP/s expect about a minute per repeat at batch 1 and about 20 minutes at batch 16; the cached run and the
LLaMA run take seconds to tens of seconds. `--budget` stops the repeats of one measurement after that many seconds
(at least one repeat always runs), and `--batches 1` skips batch 16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # run as a script: this file's name would otherwise shadow the `generator` package

from bench.machine import describe, synchronize, write_report  # noqa: E402
from bench.tokenizer import measure, measure_interleaved  # noqa: E402
from generator.model import ARGenerator, count_parameters  # noqa: E402
from generator.presets import LLAMAGEN_CODEBOOK, get_preset  # noqa: E402
from generator.sample import sample_latents  # noqa: E402

PARTS = ("cache", "recompute", "llama")
RESULTS = Path(__file__).resolve().parent / "results" / "generator.json"
CACHE_RATIO_GOAL = 5.0
LLAMA_RATIO_GOAL = 1.0


def build(preset: str, device: str, dtype: torch.dtype) -> ARGenerator:
    torch.manual_seed(0)
    model = ARGenerator(get_preset(preset))
    with torch.no_grad():  # random head output layers too (zero-init would make every token pure noise)
        for p in model.head.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


class HeadTimer:
    """Wall time spent inside the flow head (device synchronised around each call): its condition terms for the
    time grid (once per token) and its token path (once per ODE evaluation), the two parts sampling calls."""

    PARTS = ("grid_modulations", "token_path")

    def __init__(self, model: ARGenerator, device: str) -> None:
        self.model, self.device, self.seconds = model, device, 0.0

    def _timed(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return out

        return timed

    def __enter__(self) -> HeadTimer:
        for name in self.PARTS:  # instance attributes shadow the methods until __exit__ deletes them
            setattr(self.model.head, name, self._timed(getattr(self.model.head, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.PARTS:
            delattr(self.model.head, name)


def build_llama(model: ARGenerator, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(vocab_size=LLAMAGEN_CODEBOOK, hidden_size=c.width, intermediate_size=c.ffn_dim,
                         num_hidden_layers=c.depth, num_attention_heads=c.heads, num_key_value_heads=c.heads,
                         max_position_embeddings=c.num_tokens + 8, rms_norm_eps=c.norm_eps, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def run_batch(model: ARGenerator, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    c = model.config
    tokens = batch * c.num_tokens
    labels = [i % c.num_classes for i in range(batch)]
    row: dict[str, Any] = {"batch": batch, "tokens_per_sample": c.num_tokens, "cfg": args.cfg,
                           "head_steps": c.flow.sample_steps, "sampler": c.flow.sampler}

    def ours(use_cache: bool) -> Any:
        return lambda: sample_latents(model, labels, seeds=0, cfg=args.cfg, use_cache=use_cache,
                                      compile=args.compile and use_cache)

    contenders: dict[str, Any] = {}
    if "cache" in args.parts:
        contenders["cache"] = ours(True)
    llama = None
    if "llama" in args.parts:
        llama = build_llama(model, args.device, model.dtype)
        rows = 2 * batch if args.cfg != 1.0 else batch
        ids = torch.zeros(rows, 1, dtype=torch.long, device=args.device)

        def generate() -> Any:
            with torch.no_grad():
                return llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=c.num_tokens,
                                      min_new_tokens=c.num_tokens, do_sample=False, cache_implementation="static",
                                      pad_token_id=0)

        contenders["llama_static"] = generate
    for name, timing in measure_interleaved(contenders, args.device, args.repeats, args.budget).items():
        row[name] = {**timing.to_dict(), "tokens_per_s": round(tokens / timing.median, 2)}
    if llama is not None:
        row["llama_static"]["rows"] = rows
        del llama
    if "cache" in args.parts:
        with HeadTimer(model, args.device) as head:
            start = time.perf_counter()
            ours(True)()
            total = time.perf_counter() - start
        row["head_share"] = round(head.seconds / total, 4)
    if "recompute" in args.parts:  # warmed up by a cached run: the same kernels, without the quadratic cost
        timing = measure(ours(False), args.device, args.repeats, args.budget, warmup=ours(True))
        row["recompute"] = {**timing.to_dict(), "tokens_per_s": round(tokens / timing.median, 2)}
    if "cache" in row and "recompute" in row:
        row["cache_vs_recompute"] = round(row["cache"]["tokens_per_s"] / row["recompute"]["tokens_per_s"], 2)
    if "cache" in row and "llama_static" in row:
        row["cache_vs_llama"] = round(row["cache"]["tokens_per_s"] / row["llama_static"]["tokens_per_s"], 3)
    return row


def markdown(report: dict[str, Any]) -> str:
    lines = ["| batch | ours, KV cache (tok/s) | recompute (tok/s) | LLaMA static generate (tok/s) | cache / recompute "
             "| cache / LLaMA | head share | peak extra MiB (cache) |", "|---|---|---|---|---|---|---|---|"]

    def tps(row: dict[str, Any], key: str) -> str:
        return f"{row[key]['tokens_per_s']:.1f}" if key in row else "-"

    for row in report["rows"]:
        peak = row.get("cache", {}).get("peak_extra_mib")
        lines.append(f"| {row['batch']} | {tps(row, 'cache')} | {tps(row, 'recompute')} | {tps(row, 'llama_static')} "
                     f"| {row.get('cache_vs_recompute', '-')} | {row.get('cache_vs_llama', '-')} "
                     f"| {row.get('head_share', '-')} | {peak if peak is not None else '-'} |")
    goals = report["goals"]
    lines.append("")
    lines.append(f"goals: cache >= {CACHE_RATIO_GOAL}x recompute: {goals['cache_vs_recompute']}; "
                 f"ours >= {LLAMA_RATIO_GOAL}x LLaMA per token: {goals['cache_vs_llama']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="B", help="generator preset (default B)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale (default 2.0: CFG on)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=120.0, help="seconds per measurement before repeats stop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="weights of both models (bf16: cast, not autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decoding step and head")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 1, 1 repeat: a smoke test")
    p.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS.name}; --quick: "
                   f"generator_quick.json, beside it)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; expected some of {list(PARTS)}")
    args.batches = [int(x) for x in args.batches.split(",") if x]
    if args.quick:
        args.preset, args.batches, args.repeats = "tiny", [1], 1
    if args.out is None:
        args.out = RESULTS.with_name("generator_quick.json") if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build(args.preset, args.device, dtype)
    report: dict[str, Any] = {"machine": describe(args.device),
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "parameters": count_parameters(model), "rows": []}
    for batch in args.batches:
        report["rows"].append(run_batch(model, batch, args))
        print(json.dumps(report["rows"][-1]), flush=True)

    def met(key: str, goal: float) -> bool | None:
        values = [r[key] for r in report["rows"] if key in r]
        return None if not values else all(v >= goal for v in values)

    report["goals"] = {"cache_vs_recompute": met("cache_vs_recompute", CACHE_RATIO_GOAL),
                       "cache_vs_llama": met("cache_vs_llama", LLAMA_RATIO_GOAL)}
    return write_report(report, args.out, start, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
