"""Speed of the ShapeWorld MLLM against its bare base LLM, side by side in one run (docs/mllm.md).

Inference, at batch 1 and 8 (greedy): time to first token (the whole prompt: for the MLLM the encoder, projector and
prefill; for the base LLM the prefill of a text prompt of exactly the same length, its image positions replaced by a
text token) and decode speed (tokens/s over all sequences, from the time of N new tokens minus the first, EOS
ignored). The ratios MLLM / base are the image path's overhead. Training: samples/s of stage 2 (the engine of
`uniflow train mllm` on train/configs/mllm_tiny_stage2.yaml, a few steps, the first dropped).

    python bench/mllm.py                      # the bundled model; writes bench/results/mllm.json
    python bench/mllm.py --smoke              # tiny random models, seconds: checks the script runs
Run it alone on the machine (ENV.md: a second job on the cores skews every ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "mllm.json"
QUESTION = "What shape is the largest object?"


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inference(model: Any, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """TTFT and decode tokens/s of the MLLM and of its base LLM on prompts of the same length."""
    from uniflow.data import render_sample

    pics = [render_sample(0, "heldout", i).image for i in range(batch)]
    prompts = [model.encode_prompt([p], "<image>\n" + QUESTION) for p in pics]
    ids = torch.tensor([p[0].ids for p in prompts])
    pixels = torch.cat([p[1] for p in prompts])
    filler = model.tokenizer.encode(" the", add_special_tokens=False)[0]
    text_ids = ids.masked_fill(ids < 0, filler)
    mask = torch.ones_like(ids)
    stop = {"eos_token_id": None, "pad_token_id": model.format.pad_id, "do_sample": False}
    lora = model.config.llm_tuning == "lora"

    def mllm(n: int) -> None:
        with torch.no_grad(), model._autocast():
            embeds = model.embed(ids, pixels)
            model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               **stop)

    def base(n: int) -> None:
        with torch.no_grad(), model._autocast(), (model.llm.disable_adapter() if lora else nullcontext()):
            model.causal_lm.generate(input_ids=text_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     **stop)

    out: dict[str, Any] = {"batch": batch, "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens}
    for name, fn in (("mllm", mllm), ("base", base)):
        fn(2)  # warm-up
        first = timed(lambda fn=fn: fn(1), repeats)
        full = timed(lambda fn=fn: fn(new_tokens), repeats)
        out[f"{name}_ttft_s"] = round(first, 4)
        # None when the timing noise exceeds the decode time (only with very few tokens, e.g. --smoke)
        out[f"{name}_decode_tokens_per_s"] = round(batch * (new_tokens - 1) / (full - first), 2) \
            if full > first else None
    out["ttft_ratio"] = round(out["mllm_ttft_s"] / out["base_ttft_s"], 3)
    rates = out["mllm_decode_tokens_per_s"], out["base_decode_tokens_per_s"]
    out["decode_ratio"] = round(rates[0] / rates[1], 3) if None not in rates else None
    return out


def training(config_path: Path | None, data: dict[str, Any] | None, steps: int) -> dict[str, Any]:
    """Stage-2 training samples/s through the engine (the first step dropped)."""
    from train.config import build_config, load_config
    from train.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}/run", f"steps={steps}", "log.every=1", "log.progress=false",
                     "checkpoint.every=0", "export.enabled=false", "eval.questions=0", "data.heldout_samples=0",
                     "model.init_from=null"]
        config = load_config(config_path, overrides) if data is None else build_config(data, "smoke", overrides)
        result = train(config)
        rows = [r for r in result.history if r["kind"] == "train"][1:]
    return {"steps_timed": len(rows), "batch_size": config.batch_size,
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in rows), 3) if rows else None,
            "llm_tuning": config.model.get("llm_tuning"), "autocast": config.model.get("autocast")}


def smoke_setup(tmp: Path) -> tuple[Path, dict[str, Any]]:
    """A tiny random MLLM folder and a tiny stage-2 run config (no package, no download)."""
    from mllm.config import LLMConfig, MLLMConfig, ProjectorConfig, VisionConfig
    from mllm.model import UniFlowChat
    from mllm.tiny import build_llm_folder
    from uniflow import UniFlowTokenizer
    from uniflow.decoder import DecoderConfig
    from uniflow.encoders import EncoderConfig
    from uniflow.tokenizer import TokenizerConfig

    tok = TokenizerConfig(
        encoder=EncoderConfig(backend="timm", arch="vit_tiny_patch16_224", image_size=32, patch_size=8,
                              kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2}),
        decoder=DecoderConfig(latent_channels=16, global_depth=1, global_heads=2, head_width=32, head_depth=1))
    vision = UniFlowTokenizer(tok).save_pretrained(tmp / "tokenizer")
    llm = build_llm_folder(tmp / "llm", "llama", "smollm2")
    config = MLLMConfig(vision=VisionConfig(tokenizer=str(vision)), projector=ProjectorConfig(type="pixel_shuffle"),
                        llm=LLMConfig(path=str(llm)))
    folder = UniFlowChat.from_config(config).save_pretrained(tmp / "mllm")
    run = {"kind": "mllm", "batch_size": 4, "seed": 0,
           "model": {"vision": {"tokenizer": str(vision)}, "projector": {"type": "pixel_shuffle"},
                     "llm": {"path": str(llm)}, "llm_tuning": "full", "max_length": 160},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "data": {"source": "shapeworld", "task": "qa", "num_samples": 64}, "deepspeed": {"config": "zero0"}}
    return folder, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mllm", type=Path, default=ROOT / "checkpoints" / "shapeworld" / "mllm")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-config", type=Path, default=ROOT / "train" / "configs" / "mllm_tiny_stage2.yaml")
    parser.add_argument("--train-steps", type=int, default=6, help="stage-2 steps timed (0: skip training)")
    parser.add_argument("--out", type=Path, default=None, help=f"result JSON (default {RESULTS}; smoke: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny random models: check that the script runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from bench.machine import describe
    from mllm.model import UniFlowChat

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        run_data = None
        folder = args.mllm
        if args.smoke:
            folder, run_data = smoke_setup(Path(tmp))
            args.new_tokens, args.repeats, args.train_steps = min(args.new_tokens, 4), 1, min(args.train_steps, 2)
        t0 = time.perf_counter()
        model = UniFlowChat.from_pretrained(folder)
        load_s = time.perf_counter() - t0
        rows = [inference(model, b, args.new_tokens, args.repeats) for b in batches]
        train_row = training(args.train_config, run_data, args.train_steps) if args.train_steps else None
    result = {"machine": describe(), "mllm": str(folder) if not args.smoke else "smoke (tiny random)",
              "load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(), "inference": rows,
              "training_stage2": train_row}
    print(f"{'batch':>5} {'prompt':>6} {'TTFT mllm':>10} {'TTFT base':>10} {'ratio':>6} {'tok/s mllm':>11} "
          f"{'tok/s base':>11} {'ratio':>6}")
    def num(value: float | None, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for r in rows:
        print(f"{r['batch']:>5} {r['prompt_tokens']:>6} {num(r['mllm_ttft_s'], 10, 3)} {num(r['base_ttft_s'], 10, 3)} "
              f"{num(r['ttft_ratio'], 6, 2)} {num(r['mllm_decode_tokens_per_s'], 11, 1)} "
              f"{num(r['base_decode_tokens_per_s'], 11, 1)} {num(r['decode_ratio'], 6, 2)}")
    if train_row:
        print(f"stage-2 training: {train_row['samples_per_s']} samples/s (batch {train_row['batch_size']}, "
              f"{train_row['steps_timed']} steps timed)")
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
