"""Load on the demo (issue 13, acceptance 3): 8 simultaneous clients on mixed tabs, against the real bundle.

Starts `uniflow demo` as its own process (as a user would), measures the time until it prints its URL, then sends
8 clients at once (chat, generate, reconstruct, round robin) twice: cold (the models load lazily inside the first
requests) and warm. Every response is checked (a non-empty answer, the requested number of images, a
reconstruction with its PSNR); the demo's peak resident memory is read from /proc. Prints a table and writes
`bench/results/demo.json` with the machine.

    python bench/demo.py [--bundle checkpoints/shapeworld] [--clients 8]
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)

from bench.machine import describe, write_report  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "demo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a live process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def start_demo(bundle: Path, port: int) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "demo", "--bundle", str(bundle), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Running on http://127.0.0.1" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, time.perf_counter() - start
    raise SystemExit(f"the demo exited (code {proc.wait()}) before serving")


def one_request(url: str, i: int, image: str) -> str:
    """One client's request; returns what it checked, raises on a wrong response."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    kind = ("chat", "generate", "reconstruct")[i % 3]
    if kind == "chat":
        history, _ = client.predict(handle_file(image), "What shape is the largest object?", 16, 0.0,
                                    api_name="/chat")
        content = history[-1]["content"]
        text = "".join(p.get("text", "") for p in content) if isinstance(content, list) else str(content)
        if not text.strip():
            raise AssertionError("empty chat answer")
    elif kind == "generate":
        gallery = client.predict("red circle", 4, 2.0, 1.0, 8, i, api_name="/generate")[0]
        if len(gallery) != 4:
            raise AssertionError(f"generate returned {len(gallery)} images, expected 4")
    else:
        metrics = client.predict(handle_file(image), 1, api_name="/reconstruct")[-1]
        if not metrics.get("psnr_db", 0) > 20:
            raise AssertionError(f"reconstruction PSNR {metrics.get('psnr_db')}")
    return kind


def burst(url: str, clients: int, image: str) -> dict[str, Any]:
    errors: list[str] = []
    kinds: list[str] = []

    def run(i: int) -> None:
        try:
            kinds.append(one_request(url, i, image))
        except Exception as exc:  # counted and reported
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return {"seconds": time.perf_counter() - start, "ok": len(kinds), "errors": errors}


def markdown(report: dict[str, Any]) -> str:
    rows = ["| measure | value |", "| --- | --- |",
            f"| start-up (command to 'Running on') | {report['startup_s']:.1f} s |"]
    for name in ("cold", "warm"):
        run = report[name]
        rows.append(f"| {report['clients']} clients at once, {name} | {run['seconds']:.1f} s, {run['ok']} correct, "
                    f"{len(run['errors'])} errors |")
    rows.append(f"| peak resident memory of the demo | {report['peak_rss_mb']} MB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "checkpoints" / "shapeworld")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from uniflow.data import render_sample

    began = time.perf_counter()
    machine = describe()
    image = Path(tempfile.mkdtemp(prefix="uniflow-bench-demo-")) / "heldout.png"
    render_sample(0, "heldout", 0).image.save(image)
    port = free_port()
    proc, startup = start_demo(args.bundle, port)
    try:
        url = f"http://127.0.0.1:{port}"
        cold = burst(url, args.clients, str(image))
        warm = burst(url, args.clients, str(image))
        peak = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report = {"machine": machine, "bundle": str(args.bundle), "clients": args.clients, "startup_s": round(startup, 1),
              "cold": cold, "warm": warm, "peak_rss_mb": round(peak)}
    write_report(report, args.out, began, markdown)
    for line in cold["errors"] + warm["errors"]:
        print(line, file=sys.stderr)
    return 0 if not (cold["errors"] or warm["errors"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
