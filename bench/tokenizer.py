"""Tokenizer benchmark: encode/decode throughput, the full decoder against the SD-VAE decoder, FLOP efficiency, memory.

Why each part (targets: docs/results.md, "Targets"):
- throughput: images/s of `encode` and 1-step `decode` for `tiny` (64 px) and `internvit-300m` (448 px and 252 px,
  the multiple of patch 14 nearest 256), batch 1 and 8, random weights;
- vae: the 1-step pixel flow decoder of `internvit-300m` against `diffusers`' SD-VAE decoder (random weights) at the
  same 448x448 output and precision, timed alternately in one run; goal ours/SD-VAE >= 5x images/s;
- flops: the decoder's achieved GFLOP/s against a 2048^3 GEMM timed alternately with it, fp32 and bf16 autocast;
  goal >= 70%. FLOPs are counted analytically from the config and cross-checked with `FlopCounterMode`. Below the
  goal, a `torch.profiler` breakdown by operator class says where the time goes;
- memory: the peak extra resident memory (CPU: VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS
  before; CUDA: max_memory_allocated) of every timed measurement.
A shared CPU makes absolute timings drift, so every figure is the median of its repeats and every ratio comes from
measurements interleaved in the same run. Prints Markdown tables and writes `bench/results/tokenizer.json`.

    python bench/tokenizer.py --threads 1              # everything (about 8 minutes here, another job on a core)
    python bench/tokenizer.py --quick                  # batch 1, 252 px, 1 repeat
    python bench/tokenizer.py --parts vae,flops        # only the decoder comparisons (fp32 and bf16)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from bench.machine import autocast, describe, matmul_times, synchronize, write_report
except ImportError:  # run as a script: bench/ itself is on sys.path
    from machine import autocast, describe, matmul_times, synchronize, write_report

from uniflow.decoder import DecoderConfig, PixelFlowDecoder
from uniflow.encoders import build_encoder
from uniflow.presets import get_preset
from uniflow.tokenizer import UniFlowTokenizer

PARTS = ("throughput", "vae", "flops")
RESULTS = Path(__file__).resolve().parent / "results" / "tokenizer.json"
DECODER_GOAL_PARAMS = 148.6e6
VAE_RATIO_GOAL = 5.0
MATMUL_FRACTION_GOAL = 0.70
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}


# --------------------------------------------------------------------------------------------------- memory
_LIBC: ctypes.CDLL | None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class PeakMemory:
    """Peak memory (MiB) above the level before the block: weights already loaded are not counted, activations are."""

    device: str
    extra_mib: float | None = None
    resident_mib: float | None = None  # CPU: the process's whole peak RSS during the block

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        gc.collect()
        if torch.device(self.device).type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            synchronize(self.device)
            self.extra_mib = max(self.extra_mib or 0.0, (torch.cuda.max_memory_allocated(self.device) - base) / 2**20)
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # hand freed heap pages back, so earlier runs' garbage does not hide this run's peak
        base = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset VmHWM (the peak RSS) to the current RSS
        except OSError:
            base = None
        yield self
        peak = _proc_status_kib("VmHWM")
        if base is not None and peak is not None:
            self.extra_mib = max(self.extra_mib or 0.0, (peak - base) / 1024)
            self.resident_mib = max(self.resident_mib or 0.0, peak / 1024)


# --------------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call.

    CPU time leaves out the time the process waited for a core, so with one thread on a shared machine it is the
    steadier measure; with several threads it also counts threads spinning at barriers, so wall time is the figure.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Timing:
    """Repeated wall-clock times of one measurement; the median is what tables report."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    memory: PeakMemory | None = None

    def add(self, wall_cpu: tuple[float, float]) -> None:
        self.seconds.append(wall_cpu[0])
        self.cpu_seconds.append(wall_cpu[1])

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_seconds)

    def to_dict(self, batch: int = 1) -> dict[str, Any]:
        return {
            "seconds": [round(s, 4) for s in self.seconds],
            "median_s": round(self.median, 4),
            "cpu_seconds": [round(s, 4) for s in self.cpu_seconds],
            "median_cpu_s": round(self.median_cpu, 4),
            "images_per_s": round(batch / self.median, 4),
            "repeats": len(self.seconds),
            "peak_extra_mib": None if self.memory is None else _round(self.memory.extra_mib, 1),
            "peak_rss_mib": None if self.memory is None else _round(self.memory.resident_mib, 1),
        }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def measure(fn: Callable[[], object], device: str, repeats: int, budget_s: float,
            warmup: Callable[[], object] | None = None) -> Timing:
    """Median-ready times of `fn` after one untimed warm-up; stops early once `budget_s` is spent (>= 1 repeat).

    The warm-up may be a cheaper call (batch 1 for a batch-8 case): it only has to create kernels and caches.
    """
    (warmup or fn)()
    timing = Timing(memory=PeakMemory(device))
    start = time.perf_counter()
    for _ in range(repeats):
        with timing.memory.measure():
            timing.add(timed(fn, device))
        if time.perf_counter() - start > budget_s:
            break
    return timing


def measure_interleaved(fns: dict[str, Callable[[], object]], device: str, repeats: int, budget_s: float
                        ) -> dict[str, Timing]:
    """`measure` for contenders compared by a ratio: one warm-up each, then rounds that time each once, the order
    reversed every other round, so a slow spell of a shared machine falls on both rather than on whichever ran
    then. Stops after a round once `budget_s` is spent (>= 1 round)."""
    for fn in fns.values():
        fn()
    timings = {name: Timing(memory=PeakMemory(device)) for name in fns}
    names = list(fns)
    start = time.perf_counter()
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            with timings[name].memory.measure():
                timings[name].add(timed(fns[name], device))
        if time.perf_counter() - start > budget_s:
            break
    return timings


# --------------------------------------------------------------------------------------------------- models
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_shape(preset: str) -> tuple[int, int, int]:
    """(width, patch size, native image size) of a preset's encoder, read from a meta-device build (no weights)."""
    config = get_preset(preset).encoder
    with torch.device("meta"):
        encoder = build_encoder(config)
    return encoder.width, encoder.patch_size, config.image_size


def build_decoder(preset: str, device: str, meta: bool = False) -> PixelFlowDecoder:
    """The preset's pixel flow decoder alone, random weights (the encoder is not needed to decode)."""
    width, patch, image = encoder_shape(preset)
    native = image // patch
    with torch.device("meta" if meta else device):
        decoder = PixelFlowDecoder(get_preset(preset).decoder, width, patch, (native, native))
    return decoder.eval()


def latent_mlp_params(width: int, latent_channels: int) -> int:
    """Parameters of the tokenizer's z = MLP(h) (width->width->latent), which the design counts with the decoder."""
    return width * width + width + width * latent_channels + latent_channels


def build_sd_vae(device: str, meta: bool = False) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta" if meta else device):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return vae.eval()


def snap_to_patch(size: int, patch: int) -> int:
    """The multiple of the patch size nearest to `size` (256 -> 252 for patch 14), never below one patch."""
    return max(patch, round(size / patch) * patch)


# --------------------------------------------------------------------------------------------------- FLOPs
def decoder_flops(config: DecoderConfig, encoder_width: int, patch_dim: int, tokens: int, steps: int = 1,
                  frequency_dim: int = 256) -> dict[str, float]:
    """FLOPs of decoding one image with `steps` Euler steps: 2 x MACs of every Linear, plus attention's QK^T and AV.

    Elementwise work (norms, activations, adaLN modulation) is left out: it is a few per cent of the FLOPs but,
    being memory-bound, can be much more of the time, which is what the profile is for.
    """
    width = config.width or encoder_width
    hidden = int(width * config.mlp_ratio)
    head = config.head_width
    n = tokens
    from_latent = n * (config.latent_channels * width + width * width)
    block_linear = n * (3 * width * width + width * width + 2 * width * hidden)
    block_attention = 2 * n * n * width  # QK^T and AV, summed over heads
    per_eval = n * (
        patch_dim * head  # input projection
        + frequency_dim * head + head * head  # time MLP, evaluated per token
        + width * head  # condition projection
        + config.head_depth * (2 * head * head + 3 * head * head)  # MLP + adaLN (shift, scale, gate)
        + 2 * head * head + head * patch_dim  # final adaLN + output layer
    )
    parts = {
        "latent_up_projection": 2.0 * from_latent,
        "global_blocks_linear": 2.0 * config.global_depth * block_linear,
        "global_blocks_attention": 2.0 * config.global_depth * block_attention,
        "flow_head": 2.0 * steps * per_eval,
    }
    parts["total"] = sum(parts.values())
    return parts


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs by `torch.utils.flop_counter.FlopCounterMode`. Run it on meta tensors: on the CPU the fused SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula and would be missed; on meta it decomposes
    into bmm, which is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def profile_breakdown(fn: Callable[[], object], device: str, top: int = 12) -> dict[str, Any]:
    """Self time per operator class and the top operators of one call, to say where time goes besides GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    synchronize(device)
    use_cuda = torch.device(device).type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if use_cuda else event.self_cpu_time_total
        if self_us > 0:
            rows.append((event.key, self_us / 1e6, event.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    classes: dict[str, float] = {}
    for name, seconds, _ in rows:
        cls = _op_class(name)
        classes[cls] = classes.get(cls, 0.0) + seconds
    return {
        "total_s": round(total, 4),
        "by_class": {k: {"s": round(v, 4), "share": round(v / total, 4)}
                     for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": n, "s": round(s, 4), "share": round(s / total, 4), "calls": c} for n, s, c in rows[:top]],
    }


def _op_class(name: str) -> str:
    name = name.removeprefix("aten::")
    if name in ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm") or "gemm" in name.lower():
        return "GEMM (Linear)"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention (SDPA)"
    if name in ("copy_", "_to_copy", "to", "clone", "contiguous", "cat"):
        return "copies / dtype casts"
    if name in ("add", "add_", "mul", "mul_", "sub", "div", "rsub"):
        return "elementwise add/mul (residuals, adaLN modulate, gates)"
    if "layer_norm" in name:
        return "LayerNorm"
    if "gelu" in name:
        return "GELU"
    if "silu" in name:
        return "SiLU"
    return "other"


# --------------------------------------------------------------------------------------------------- parts
def run_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 1: encode and 1-step decode images/s per preset, image size, batch and precision."""
    results = []
    for preset in args.presets:
        results += _throughput_preset(preset, args)
        gc.collect()
    return results


def _throughput_preset(preset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = get_preset(preset)
    start = time.perf_counter()
    model = UniFlowTokenizer.from_config(config, load_pretrained_encoder=False).to(args.device).eval()
    build_s = time.perf_counter() - start
    patch = model.encoder.patch_size
    sizes = [config.encoder.image_size] if preset == "tiny" else list(dict.fromkeys(args.sizes))
    encoder_params, decoder_params = count_params(model.encoder), count_params(model.decoder)
    print(f"[throughput] {preset}: encoder {encoder_params / 1e6:.1f}M, decoder {decoder_params / 1e6:.1f}M "
          f"parameters, built in {build_s:.1f} s", flush=True)
    results = []
    for requested in sizes:
        size = snap_to_patch(requested, patch)
        for precision in args.precisions:
            for batch in args.batches:
                enc, dec = _throughput_case(model, size, batch, precision, args)
                row = {"preset": preset, "requested_px": requested, "image_px": size, "patch": patch,
                       "tokens": (size // patch) ** 2, "batch": batch, "precision": precision,
                       "encoder_params": encoder_params, "decoder_params": decoder_params,
                       "encode": enc.to_dict(batch), "decode": dec.to_dict(batch)}
                results.append(row)
                print(f"  {size}px b{batch} {precision}: encode {row['encode']['images_per_s']:.3g} img/s, "
                      f"decode {row['decode']['images_per_s']:.3g} img/s", flush=True)
    return results


def _throughput_case(model: UniFlowTokenizer, size: int, batch: int, precision: str,
                     args: argparse.Namespace) -> tuple[Timing, Timing]:
    """Encode timing (normalisation included) and 1-step decode timing (denormalisation included)."""
    grid = (size // model.encoder.patch_size, size // model.encoder.patch_size)
    images = torch.rand(batch, 3, size, size, device=args.device)
    # Random latents: decoding time does not depend on the values, and a batch-8 encode at 448 px costs a minute.
    latents = torch.randn(batch, grid[0] * grid[1], model.config.decoder.latent_channels, device=args.device)
    with torch.no_grad(), autocast(precision, args.device):
        enc = measure(lambda: model.encode(images), args.device, args.repeats, args.case_budget,
                      warmup=lambda: model.encode(images[:1]))
        dec = measure(lambda: model.decode(latents, grid, steps=1, sampler="euler", seed=0),
                      args.device, args.repeats, args.case_budget,
                      warmup=lambda: model.decode(latents[:1], grid, steps=1, sampler="euler", seed=0))
    return enc, dec


def run_vae(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: the full decoder and the SD-VAE decoder at the same 448x448 output, timed alternately, batch 1."""
    width, patch, _ = encoder_shape("internvit-300m")
    size = snap_to_patch(args.vae_size, patch)
    grid = (size // patch, size // patch)
    if size % 8:
        raise SystemExit(f"--vae-size {size} must be divisible by both 14 and 8 (SD-VAE downsamples by 8)")
    decoder = build_decoder("internvit-300m", args.device)
    vae = build_sd_vae(args.device)
    ours_params = count_params(decoder)
    latent_mlp = latent_mlp_params(width, decoder.config.latent_channels)
    vae_params = count_params(vae.decoder) + count_params(vae.post_quant_conv)
    print(f"[vae] our decoder {ours_params / 1e6:.2f}M parameters (+{latent_mlp / 1e6:.2f}M latent MLP = "
          f"{(ours_params + latent_mlp) / 1e6:.2f}M; design: {DECODER_GOAL_PARAMS / 1e6:.1f}M), "
          f"SD-VAE decoder {vae_params / 1e6:.2f}M, output {size}x{size}", flush=True)
    gen = torch.Generator().manual_seed(0)
    z_ours = torch.randn(1, grid[0] * grid[1], decoder.config.latent_channels, generator=gen).to(args.device)
    z_vae = torch.randn(1, SD_VAE_CONFIG["latent_channels"], size // 8, size // 8, generator=gen).to(args.device)

    def ours() -> torch.Tensor:
        return decoder.sample(z_ours, grid, steps=1, sampler="euler", generator=torch.Generator().manual_seed(0))

    def sd_vae() -> torch.Tensor:
        return vae.decode(z_vae).sample

    ours_gflop = counted_flops_meta_decoder(size) / 1e9
    meta_vae, meta_z = build_sd_vae("cpu", meta=True), z_vae.to("meta")
    vae_gflop = counted_flops(lambda: meta_vae.decode(meta_z)) / 1e9
    out: dict[str, Any] = {"image_px": size, "batch": 1, "ours_params": ours_params, "latent_mlp_params": latent_mlp,
                           "sd_vae_decoder_params": vae_params, "ours_gflop": round(ours_gflop, 2),
                           "sd_vae_gflop": round(vae_gflop, 2), "by_precision": {}}
    for precision in args.vae_precisions:
        t_ours, t_vae = Timing(memory=PeakMemory(args.device)), Timing(memory=PeakMemory(args.device))
        with torch.no_grad(), autocast(precision, args.device):
            ours()
            sd_vae()
            for _ in range(args.repeats):
                for fn, timing in ((ours, t_ours), (sd_vae, t_vae)):
                    with timing.memory.measure():
                        timing.add(timed(fn, args.device))
        pair_ratios = [v / o for o, v in zip(t_ours.seconds, t_vae.seconds)]
        ratio = t_vae.median / t_ours.median
        ratio_cpu = t_vae.median_cpu / t_ours.median_cpu
        out["by_precision"][precision] = {
            "ours": t_ours.to_dict() | {"gflop_per_s": round(ours_gflop / t_ours.median, 1)},
            "sd_vae": t_vae.to_dict() | {"gflop_per_s": round(vae_gflop / t_vae.median, 1)},
            "ratio_images_per_s": round(ratio, 3),
            "ratio_per_pair": [round(r, 3) for r in pair_ratios],
            "ratio_cpu_time": round(ratio_cpu, 3),
            "goal": VAE_RATIO_GOAL,
            "meets_goal": ratio >= VAE_RATIO_GOAL,
        }
        print(f"  {precision}: ours {t_ours.median:.2f} s/img, SD-VAE {t_vae.median:.2f} s/img -> {ratio:.2f}x "
              f"(pairs: {', '.join(f'{r:.2f}' for r in pair_ratios)}; by CPU time {ratio_cpu:.2f}x)", flush=True)
    return out


def counted_flops_meta_decoder(size: int, preset: str = "internvit-300m") -> float:
    """FlopCounterMode FLOPs of one 1-step decode at `size` px, on meta tensors (no compute)."""
    decoder = build_decoder(preset, "cpu", meta=True)
    grid = (size // decoder.patch_size, size // decoder.patch_size)
    z = torch.zeros(1, grid[0] * grid[1], decoder.config.latent_channels, device="meta")
    return counted_flops(lambda: decoder.sample(z, grid, steps=1, sampler="euler"))


def run_flops(args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: the decoder's achieved GFLOP/s against a GEMM timed alternately with it, per precision."""
    width, patch, _ = encoder_shape("internvit-300m")
    size = snap_to_patch(args.vae_size, patch)
    grid = (size // patch, size // patch)
    decoder = build_decoder("internvit-300m", args.device)
    analytic = decoder_flops(decoder.config, width, decoder.patch_dim, grid[0] * grid[1])
    counted = counted_flops_meta_decoder(size)
    gflop = analytic["total"] / 1e9
    print(f"[flops] decoder at {size}px: {gflop:.1f} GFLOP analytic, {counted / 1e9:.1f} GFLOP by FlopCounterMode "
          f"(difference {abs(gflop - counted / 1e9) / gflop:.2%})", flush=True)
    z = torch.randn(1, grid[0] * grid[1], decoder.config.latent_channels, generator=torch.Generator().manual_seed(0))
    z = z.to(args.device)

    def decode() -> torch.Tensor:
        return decoder.sample(z, grid, steps=1, sampler="euler", generator=torch.Generator().manual_seed(0))

    out: dict[str, Any] = {"image_px": size, "batch": 1,
                           "analytic_gflop": {k: round(v / 1e9, 3) for k, v in analytic.items()},
                           "flop_counter_gflop": round(counted / 1e9, 3), "matmul_size": args.matmul_size,
                           "by_precision": {}}
    for precision in args.flops_precisions:
        entry = _flops_precision(decode, gflop, precision, args)
        out["by_precision"][precision] = entry
        print(f"  {precision}: {entry['decode']['median_s']:.2f} s/img = {entry['achieved_gflop_per_s']:.1f} GFLOP/s; "
              f"matmul {entry['matmul_gflop_per_s']:.1f} GFLOP/s -> {entry['fraction_of_matmul']:.0%} "
              f"(by CPU time {entry['fraction_of_matmul_cpu_time']:.0%})", flush=True)
    return out


def _flops_precision(decode: Callable[[], object], gflop: float, precision: str,
                     args: argparse.Namespace) -> dict[str, Any]:
    """Decode timings alternated with GEMM rate samples (one before each decode and one after the last)."""
    timing = Timing(memory=PeakMemory(args.device))
    gemm: list[float] = []
    gemm_cpu: list[float] = []
    matmul_gflop = 2.0 * args.matmul_size**3 / 1e9

    def sample_gemm() -> None:
        wall, cpu = matmul_times(precision, args.matmul_size, 3, args.device, (time.perf_counter, time.process_time))
        gemm.append(matmul_gflop / statistics.median(wall))
        gemm_cpu.append(matmul_gflop / statistics.median(cpu))

    with torch.no_grad(), autocast(precision, args.device):
        decode()
        for _ in range(args.repeats):
            sample_gemm()
            with timing.memory.measure():
                timing.add(timed(decode, args.device))
        sample_gemm()
        achieved = gflop / timing.median
        rate = statistics.median(gemm)
        fraction = achieved / rate
        fraction_cpu = (gflop / timing.median_cpu) / statistics.median(gemm_cpu)
        entry = {"decode": timing.to_dict(), "achieved_gflop_per_s": round(achieved, 1),
                 "matmul_gflop_per_s": round(rate, 1), "matmul_samples": [round(g, 1) for g in gemm],
                 "matmul_samples_cpu_time": [round(g, 1) for g in gemm_cpu],
                 "fraction_of_matmul": round(fraction, 3), "fraction_of_matmul_cpu_time": round(fraction_cpu, 3),
                 "goal": MATMUL_FRACTION_GOAL, "meets_goal": fraction >= MATMUL_FRACTION_GOAL}
        if args.profile or fraction < MATMUL_FRACTION_GOAL:
            entry["profile"] = profile_breakdown(decode, args.device)
    return entry


# --------------------------------------------------------------------------------------------------- report
def _fmt(x: float | None) -> str:
    """About three significant digits without scientific notation."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The tables that the closing notes quote."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['usable_cores']} cores ({m.get('busy_cores_before', '?')} busy with other "
             f"work at the start), {m['torch_threads']} torch threads, "
             f"torch {m['torch']}, device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "")
             + f", {m['date']}. Wall-clock medians; 'by CPU time' uses process CPU time instead (leaves out waiting "
             "for a core; meaningful with 1 thread).", ""]
    rows = report.get("throughput")
    if rows:
        lines += ["### Encode / decode throughput (random weights, 1 Euler step, median of repeats)", "",
                  "| preset | image | batch | precision | encode img/s | decode img/s | encode peak +MiB "
                  "| decode peak +MiB | repeats (enc/dec) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            image = f"{r['image_px']} px"
            if r["image_px"] != r["requested_px"]:
                image += f" (for {r['requested_px']}: patch {r['patch']} does not divide it)"
            e, d = r["encode"], r["decode"]
            lines.append(f"| {r['preset']} | {image} | {r['batch']} | {r['precision']} | {_fmt(e['images_per_s'])} "
                         f"| {_fmt(d['images_per_s'])} | {_fmt(e['peak_extra_mib'])} "
                         f"| {_fmt(d['peak_extra_mib'])} | {e['repeats']}/{d['repeats']} |")
        lines.append("")
    vae = report.get("vae")
    if vae:
        total = vae["ours_params"] + vae["latent_mlp_params"]
        lines += [f"### Full decoder vs SD-VAE decoder ({vae['image_px']}x{vae['image_px']}, batch 1, alternated)", "",
                  f"Our decoder: {vae['ours_params'] / 1e6:.2f}M parameters (+ latent MLP "
                  f"{vae['latent_mlp_params'] / 1e6:.2f}M = {total / 1e6:.2f}M), {vae['ours_gflop']:.1f} GFLOP/image; "
                  f"SD-VAE decoder: {vae['sd_vae_decoder_params'] / 1e6:.2f}M parameters, "
                  f"{vae['sd_vae_gflop']:.0f} GFLOP/image.", "",
                  "| precision | ours s/img | SD-VAE s/img | ours img/s | SD-VAE img/s | ours GFLOP/s | SD-VAE GFLOP/s "
                  "| ours peak +MiB | SD-VAE peak +MiB | ratio (goal ≥ 5×) | ratio by CPU time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for precision, r in vae["by_precision"].items():
            o, v = r["ours"], r["sd_vae"]
            lines.append(f"| {precision} | {o['median_s']:.2f} | {v['median_s']:.2f} | {_fmt(o['images_per_s'])} "
                         f"| {_fmt(v['images_per_s'])} | {o['gflop_per_s']:.1f} | {v['gflop_per_s']:.1f} "
                         f"| {_fmt(o['peak_extra_mib'])} | {_fmt(v['peak_extra_mib'])} "
                         f"| **{r['ratio_images_per_s']:.2f}×** {'✓' if r['meets_goal'] else '✗'} "
                         f"| {r['ratio_cpu_time']:.2f}× |")
        lines.append("")
    fl = report.get("flops")
    if fl:
        a = fl["analytic_gflop"]
        lines += [f"### Decoder FLOP efficiency ({fl['image_px']} px, batch 1, 1 Euler step)", "",
                  f"FLOPs per image: {a['total']:.1f} GFLOP analytic (global blocks {a['global_blocks_linear']:.1f} "
                  f"linear + {a['global_blocks_attention']:.1f} attention, flow head {a['flow_head']:.1f}, "
                  f"up-projection {a['latent_up_projection']:.1f}); FlopCounterMode {fl['flop_counter_gflop']:.1f}.",
                  "",
                  f"| precision | s/img | achieved GFLOP/s | matmul {fl['matmul_size']}³ GFLOP/s | fraction "
                  "(goal ≥ 70%) | fraction by CPU time | peak +MiB |",
                  "|---|---|---|---|---|---|---|"]
        for precision, r in fl["by_precision"].items():
            lines.append(f"| {precision} | {r['decode']['median_s']:.2f} | {r['achieved_gflop_per_s']:.1f} "
                         f"| {r['matmul_gflop_per_s']:.1f} | **{r['fraction_of_matmul']:.0%}** "
                         f"{'✓' if r['meets_goal'] else '✗'} | {r['fraction_of_matmul_cpu_time']:.0%} "
                         f"| {_fmt(r['decode']['peak_extra_mib'])} |")
        lines.append("")
        for precision, r in fl["by_precision"].items():
            if "profile" in r:
                shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in r["profile"]["by_class"].items())
                lines += [f"Profile ({precision}, self time): {shares}", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--presets", default="tiny,internvit-300m")
    parser.add_argument("--sizes", default="448,256", help="internvit-300m image sizes; snapped to a patch multiple")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--precisions", default="fp32", help="throughput part: fp32 and/or bf16 (autocast)")
    parser.add_argument("--vae-precisions", default="fp32,bf16", help="SD-VAE comparison part")
    parser.add_argument("--flops-precisions", default="fp32,bf16", help="FLOP-efficiency part")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--case-budget", type=float, default=30.0,
                        help="stop repeating a throughput case after this many seconds (at least one repeat)")
    parser.add_argument("--vae-size", type=int, default=448, help="output size of the decoder comparison")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="profile the decoder even when it meets the goal")
    parser.add_argument("--quick", action="store_true", help="batch 1, 252 px, 1 repeat: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [s.strip() for s in text.split(",") if s.strip()]

    args.parts = split(args.parts)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.presets = split(args.presets)
    args.sizes = [int(s) for s in split(args.sizes)]
    args.batches = [int(b) for b in split(args.batches)]
    args.precisions = split(args.precisions)
    args.flops_precisions = split(args.flops_precisions)
    args.vae_precisions = split(args.vae_precisions)
    for p in args.precisions + args.vae_precisions + args.flops_precisions:
        if p not in ("fp32", "bf16"):
            parser.error(f"precision must be fp32 or bf16, got {p!r}")
    if args.quick:
        args.sizes, args.batches, args.repeats = [256], [1], 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": describe(args.device),
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    busy = report["machine"].get("busy_cores_before")
    cores, threads = report["machine"]["usable_cores"], torch.get_num_threads()
    if args.device == "cpu" and busy is not None and threads > 1 and threads + busy > (cores or 1) + 0.3:
        print(f"warning: other processes keep {busy:.1f} of {cores} cores busy and torch uses {threads} threads; "
              f"timings will suffer from oversubscription (try --threads {max(1, round((cores or 1) - busy))})",
              flush=True)
    if "throughput" in args.parts:
        report["throughput"] = run_throughput(args)
    if "vae" in args.parts:
        report["vae"] = run_vae(args)
        gc.collect()
    if "flops" in args.parts:
        report["flops"] = run_flops(args)
    return write_report(report, args.out, start, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
