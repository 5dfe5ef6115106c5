"""What machine a benchmark ran on, and how fast its matrix multiply is.

Every result file embeds `describe()`, so figures from different machines are never mixed, and model speeds are
reported against `matmul_gflops()` measured in the same run: on a shared 2-core CPU the absolute numbers drift by 2x
from minute to minute, while the ratio to a GEMM timed alongside stays meaningful.

Run it alone for a quick look: `python bench/machine.py`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from contextlib import AbstractContextManager, nullcontext, suppress

import torch

PRECISIONS = ("fp32", "bf16")
"""fp32: plain float32. bf16: float32 weights and inputs under `torch.autocast(dtype=torch.bfloat16)`."""


def _cpu_name() -> str:
    """The CPU model string (/proc/cpuinfo on Linux, else whatever `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The ISA extensions that decide GEMM speed (AVX-512, its bf16 instructions, AMX), if the kernel lists them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def describe(device: str = "cpu") -> dict[str, object]:
    """A JSON-able description of this machine and software, recorded with every benchmark result."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable_cores = os.cpu_count()
    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "gpu": None,
    }
    with suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        index = torch.device(device).index if device.startswith("cuda") else None
        info["gpu"] = torch.cuda.get_device_name(index or 0)
        info["cuda"] = torch.version.cuda
    return info


def autocast(precision: str, device: str = "cpu") -> AbstractContextManager:
    """The context that gives `precision`: nothing for fp32, bf16 autocast for bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover the computation and not just its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_samples(precision: str = "fp32", size: int = 2048, repeats: int = 5, device: str = "cpu") -> list[float]:
    """GFLOP/s of `repeats` timed (size x size) @ (size x size) products, after one untimed warm-up.

    Inputs are float32 in both precisions, as a model's activations are: under bf16 autocast the casts are part of
    the cost, just as they are inside the model.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    flops = 2.0 * size**3
    rates = []
    with torch.no_grad(), autocast(precision, device):
        a @ b
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            rates.append(flops / (time.perf_counter() - start) / 1e9)
    return rates


def matmul_gflops(precision: str = "fp32", size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The median achieved GEMM rate in GFLOP/s: this machine's practical peak for dense layers."""
    return statistics.median(matmul_samples(precision, size, repeats, device))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = describe(device)
    info["matmul_gflops"] = {p: round(matmul_gflops(p, device=device), 1) for p in PRECISIONS}
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
