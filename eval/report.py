"""Evaluation reports: every `uniflow eval` run writes one JSON file holding its exact settings (files and their
hashes, the Inception file's hash, sizes, crops, counts, steps, CFG, seeds, library versions, machine) and appends
its rows to a Markdown table in the same folder (`recon.md`, `gen.md`, `vqa.md`). `uniflow eval report` re-renders
the tables from the JSON files and draws PNG plots: reconstruction quality against decoder steps, generation quality
against the CFG scale. The plots are drawn with Pillow, so no plotting library is needed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from uniflow.errors import ConfigError
from uniflow.fileio import atomic_write_file, atomic_write_text

KINDS = ("recon", "gen", "vqa")
COLUMNS = {
    "recon": ["date", "tokenizer", "data", "images", "size", "steps", "sampler", "seed", "rFID", "PSNR (dB)",
              "SSIM", "LPIPS", "s/img", "inception", "report"],
    "gen": ["date", "samples", "ref", "samples n", "ref n", "CFG", "seed", "FID", "sFID", "IS", "precision",
            "recall", "ref stats", "inception", "report"],
    "vqa": ["date", "mllm", "bench", "task", "data", "questions", "score", "per type", "batch", "s/question",
            "lmms-eval", "report"],
}


def environment() -> dict[str, Any]:
    """Versions and machine, so numbers from different setups are never mixed up."""
    import numpy
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": numpy.__version__, "platform": platform.platform(),
                           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        from importlib.metadata import version

        env["uniflow"] = version("uniflow")
    except Exception:  # not installed as a distribution (running from a checkout)
        env["uniflow"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    env["git_commit"] = _git_commit()
    return env


def _git_commit() -> str | None:
    """The checkout's commit, when the code runs from one (None otherwise)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _short(path: Any) -> str:
    return Path(str(path)).name if path else "-"


def _data_name(settings: dict[str, Any]) -> str:
    data = settings["data"]
    return "shapeworld" if data.get("source") == "shapeworld" else _short(data.get("path"))


def rows_of(report: dict[str, Any], json_name: str) -> list[list[str]]:
    """The Markdown rows of one report (recon: one per step count)."""
    s, kind = report["settings"], report["kind"]
    date = report.get("date", "")[:16].replace("T", " ")
    net = s.get("inception") or {}
    net_id = (net.get("sha256") or "")[:10] or "-"
    if kind == "recon":
        data = _data_name(s)
        return [[date, _short(s["tokenizer"]["path"]), data, str(s["images"]), str(s["size"]), str(r["steps"]),
                 s["sampler"], str(s["seed"]), _fmt(r["rfid"], 3), _fmt(r["psnr_db"], 2), _fmt(r["ssim"], 4),
                 _fmt(r["lpips"], 4), _fmt(r["seconds_per_image"], 4), net_id, json_name]
                for r in report["results"]]
    if kind == "vqa":
        return [_vqa_row(report, date, json_name)]
    r = report["results"]
    return [[date, _short(s["samples"]["path"]), _short(s["ref"]["path"]), str(s["samples"]["images"]),
             str(s["ref"]["images"]), _fmt(s.get("cfg"), 2), _fmt(s.get("seed"), 0), _fmt(r["fid"], 3),
             _fmt(r["sfid"], 3), _fmt(r["inception_score"], 2), _fmt(r["precision"], 4), _fmt(r["recall"], 4),
             s["ref_stats"], net_id, json_name]]


def _vqa_row(report: dict[str, Any], date: str, json_name: str) -> list[str]:
    """One `uniflow eval vqa` run (eval/vqa.py): the task's first metric as the score, ShapeWorld's per-type exact
    match."""
    s, r = report["settings"], report["results"]
    metrics = r.get("metrics") or {}
    first = next(iter(metrics.items()), None)
    score = f"{first[0]} {_fmt(first[1], 4)}" if first else "-"
    per_type = ", ".join(f"{t} {_fmt(row.get('exact'), 3)}" for t, row in (r.get("per_type") or {}).items()) or "-"
    data = s.get("data") or {}
    return [date, _short(s["mllm"]["path"]), s["bench"], s["task"], _short(data.get("path")) if data.get("path")
            else str(data.get("source", "-")), str(r.get("questions")), score, per_type, str(s.get("batch_size")),
            _fmt(r.get("seconds_per_question"), 4), str(s.get("lmms_eval")), json_name]


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def table_header(kind: str) -> str:
    cols = COLUMNS[kind]
    return _table_line(cols) + "\n" + _table_line(["---"] * len(cols)) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<kind>-<UTC time>.json` (never replacing one) and append its rows to `<kind>.md`."""
    out = Path(out_dir)
    kind = report["kind"]
    if kind not in KINDS:
        raise ConfigError(f"report kind must be one of {', '.join(KINDS)}, got {kind!r}")
    now = dt.datetime.now(dt.timezone.utc)
    report = {"kind": kind, "date": now.isoformat(timespec="seconds"), **{k: v for k, v in report.items()
                                                                          if k != "kind"}}
    report["settings"] = {**report["settings"], "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{now.strftime('%Y%m%d-%H%M%S')}"
    path, k = out / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = out / f"{stem}-{k}.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    table = out / f"{kind}.md"
    lines = "".join(_table_line(row) + "\n" for row in rows_of(report, path.name))
    old = table.read_text(encoding="utf-8") if table.is_file() else f"# uniflow eval {kind}\n\n" + table_header(kind)
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(table, old + lines)  # earlier rows stay as they were; a crash leaves the old table whole
    return path, table


def load_reports(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every report JSON in the folder, oldest first; files that are not reports are skipped."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ConfigError(f"--out: {out} is not a folder of evaluation reports")
    reports = []
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("kind") in KINDS and "settings" in data and "results" in data:
            data["_file"] = path.name
            reports.append(data)
    def order(r: dict[str, Any]) -> tuple[str, str, int]:  # recon-<time>.json, then recon-<time>-2.json, ...
        stem, _, counter = Path(r["_file"]).stem.rpartition("-")
        if counter.isdigit() and len(counter) < 6:
            return r.get("date", ""), stem, int(counter)
        return r.get("date", ""), Path(r["_file"]).stem, 1

    return sorted(reports, key=order)


def render_tables(reports: list[dict[str, Any]]) -> str:
    parts = []
    for kind in KINDS:
        mine = [r for r in reports if r["kind"] == kind]
        if mine:
            rows = [row for r in mine for row in rows_of(r, r["_file"])]
            parts.append(f"## {kind}\n\n" + table_header(kind) + "".join(_table_line(x) + "\n" for x in rows))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------- plots
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
Series = dict[str, list[tuple[float, float]]]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:  # a constant series: a small band around it
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _text(draw: Any, xy: tuple[float, float], text: str, fill: Any, font: Any, anchor: str | None = None) -> None:
    """Text with an anchor where the font supports it (FreeType); Pillow's bitmap fallback font does not."""
    try:
        draw.text(xy, text, fill=fill, font=font, anchor=anchor)
    except ValueError:
        draw.text(xy, text, fill=fill, font=font)


def _panel(draw: Any, box: tuple[int, int, int, int], title: str, xlabel: str, series: Series, log_x: bool) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 28, y1 - 44
    _text(draw, (x0 + (x1 - x0) // 2, y0 + 8), title, fill="black", font=font, anchor="mt")
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        _text(draw, ((left + right) // 2, (top + bottom) // 2), "no data", fill="gray", font=font, anchor="mm")
        return
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    pad = 0.06 * (xhi - xlo)  # points off the frame
    xlo, xhi = xlo - pad, xhi + pad
    ypad = 0.04 * (max(ys) - min(ys))
    yt = _ticks(min(ys) - ypad, max(ys) + ypad)
    ylo, yhi = yt[0], yt[-1]
    px = lambda v: left + (fx(v) - xlo) / (xhi - xlo) * (right - left)
    py = lambda v: bottom - (v - ylo) / (yhi - ylo) * (bottom - top)
    for v in yt:
        y = py(v)
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left + 1, y, right - 1, y), fill=(230, 230, 230))
        _text(draw, (left - 6, y), f"{v:g}", fill="black", font=font, anchor="rm")
    xticks = sorted({p[0] for p in points})
    for v in xticks:
        x = px(v)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        _text(draw, (x, bottom + 6), f"{v:g}", fill="black", font=font, anchor="mt")
    _text(draw, ((left + right) // 2, bottom + 22), xlabel, fill="black", font=font, anchor="mt")
    draw.rectangle((left, top, right, bottom), outline="black", width=1)
    for i, (_, pts) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(p for p in pts if math.isfinite(p[1]))
        coords = [(px(x), py(y)) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for x, y in coords:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for i, (label, _) in enumerate(sorted(series.items())):  # the legend last, on white, over the lines
        y = top + 6 + 12 * i
        draw.rectangle((left + 4, y - 1, left + 8 + 6 * len(label[:40]), y + 11), fill="white")
        _text(draw, (left + 6, y), label[:40], fill=PALETTE[i % len(PALETTE)], font=font)


def line_plots(panels: list[tuple[str, str, Series]], path: Path, log_x: bool = False) -> Path:
    """Panels side by side, each (title, x label, {series label: [(x, y), ...]}), written as a PNG."""
    from PIL import Image, ImageDraw

    width, height = 360 * len(panels), 300
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, xlabel, series) in enumerate(panels):
        _panel(draw, (360 * i, 0, 360 * (i + 1), height), title, xlabel, series, log_x)
    return atomic_write_file(path, lambda tmp: image.save(tmp, format="PNG"))


def plot_reports(reports: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """recon_vs_steps.png (PSNR, SSIM, rFID against steps, one line per tokenizer and data) and gen_vs_cfg.png (FID,
    IS, precision, recall against the CFG scale, one line per reference), for whichever reports exist."""
    written = []
    recon = [r for r in reports if r["kind"] == "recon"]
    if recon:
        metrics = {"PSNR (dB)": "psnr_db", "SSIM": "ssim", "rFID": "rfid"}
        panels = []
        for title, key in metrics.items():
            series: Series = {}
            for r in recon:
                s = r["settings"]
                data = _data_name(s)
                label = f"{_short(s['tokenizer']['path'])} / {data} / {s['size']}px"
                for row in r["results"]:
                    if row.get(key) is not None:
                        series.setdefault(label, []).append((float(row["steps"]), float(row[key])))
            panels.append((title, "decoder steps", series))
        written.append(line_plots(panels, out_dir / "recon_vs_steps.png", log_x=True))
    gen = [r for r in reports if r["kind"] == "gen" and r["settings"].get("cfg") is not None]
    if gen:
        panels = []
        for title, key in {"FID": "fid", "IS": "inception_score", "precision": "precision", "recall": "recall"}.items():
            series = {}
            for r in gen:
                value = r["results"].get(key)
                if value is not None:
                    label = f"ref {_short(r['settings']['ref']['path'])}"
                    series.setdefault(label, []).append((float(r["settings"]["cfg"]), float(value)))
            panels.append((title, "CFG scale", series))
        written.append(line_plots(panels, out_dir / "gen_vs_cfg.png"))
    return written


def render(out_dir: str | Path, plots: bool = True) -> tuple[str, list[Path]]:
    """The tables of every report in the folder (Markdown) and the plots written."""
    out = Path(out_dir)
    reports = load_reports(out)
    if not reports:
        raise ConfigError(f"--out: no evaluation reports (recon-*.json, gen-*.json, vqa-*.json) in {out}; run "
                          f"`uniflow eval recon`, `eval gen` or `eval vqa` with --out {out} first")
    table = render_tables(reports)
    atomic_write_text(out / "report.md", "# uniflow eval report\n\n" + table)
    written = plot_reports(reports, out) if plots else []
    return table, [out / "report.md", *written]


def default_out() -> Path:
    """Where reports go by default: $UNIFLOW_EVAL_DIR, else outputs/eval."""
    return Path(os.environ.get("UNIFLOW_EVAL_DIR", "").strip() or "outputs/eval")
