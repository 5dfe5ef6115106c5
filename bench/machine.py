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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path

import torch

from uniflow.precision import cpu_flags

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
    present = cpu_flags()
    return [flag for flag in wanted if flag in present]


def busy_cores(interval: float = 1.0) -> float | None:
    """How many cores other work keeps busy right now (from /proc/stat over `interval` seconds; None off Linux).

    On a shared machine this decides how to read the results: with N threads on N cores and one core taken by
    another job, every parallel region waits for the descheduled thread, and small ops slow down many-fold.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def describe(device: str = "cpu", sample_load: bool = True) -> dict[str, object]:
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
    if sample_load:
        info["busy_cores_before"] = busy_cores()
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


def matmul_samples(precision: str = "fp32", size: int = 2048, repeats: int = 5, device: str = "cpu",
                   clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """GFLOP/s of `repeats` timed (size x size) @ (size x size) products, after one untimed warm-up.

    Inputs are float32 in both precisions, as a model's activations are: under bf16 autocast the casts are part of
    the cost, just as they are inside the model. `clock=time.process_time` measures CPU time instead of wall time:
    with one thread on a shared machine, that leaves out the time the process waited for a core.
    """
    return [2.0 * size**3 / s / 1e9 for s in matmul_times(precision, size, repeats, device, (clock,))[0]]


def matmul_times(precision: str, size: int, repeats: int, device: str,
                 clocks: tuple[Callable[[], float], ...]) -> list[list[float]]:
    """Seconds of each timed product, once per clock (e.g. wall and CPU time of the same calls)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    times: list[list[float]] = [[] for _ in clocks]
    with torch.no_grad(), autocast(precision, device):
        a @ b
        for _ in range(repeats):
            synchronize(device)
            starts = [clock() for clock in clocks]
            a @ b
            synchronize(device)
            for i, clock in enumerate(clocks):
                times[i].append(clock() - starts[i])
    return times


def matmul_gflops(precision: str = "fp32", size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The median achieved GEMM rate in GFLOP/s: this machine's practical peak for dense layers."""
    return statistics.median(matmul_samples(precision, size, repeats, device))


def write_report(report: dict, out: Path, start: float, markdown: Callable[[dict], str]) -> dict:
    """Finish a benchmark: its wall time and the load at the end into `report`, the Markdown table printed, the JSON
    written to `out` (folders created)."""
    report["wall_s"] = round(time.perf_counter() - start, 1)
    with suppress(OSError):
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(markdown(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return report


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = describe(device)
    info["matmul_gflops"] = {p: round(matmul_gflops(p, device=device), 1) for p in PRECISIONS}
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
