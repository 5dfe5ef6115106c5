"""Where metrics go: a JSON-lines file in the run folder (always) and TensorBoard (optional, imported lazily).

Only rank 0 writes. On resume the file is cut back to the checkpoint's step, so every step appears once, with the
values of the run that the checkpoint continues.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from uniflow.fileio import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return rows


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only rows up to `step` (the resumed checkpoint); rows after it belong to the interrupted attempt."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    kept = [row for row in read_metrics(run_dir) if int(row.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("log.tensorboard is true but the `tensorboard` package is not installed; "
                              "logging to metrics.jsonl only (pip install tensorboard)", stacklevel=2)
        self._fh = open(self.path, "a") if enabled else None  # noqa: SIM115 - kept open for the run

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._fh.flush()
        if self.writer is not None:
            step = int(row.get("step", 0))
            prefix = "eval" if row.get("kind") == "eval" else "train"
            for key, value in row.items():
                if key not in ("step", "kind", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
