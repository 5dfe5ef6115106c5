"""The evaluation commands end to end on the shipped bundle, CI-sized (issue 12, acceptance 3): `eval gen` samples
with the ShapeWorld generator and scores with the packaged Inception, `eval vqa` runs the ShapeWorld VQA task through
lmms-eval on the shipped MLLM. (`eval recon` on the bundle: tests/test_eval_cli.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.cli import main
from eval.npz import write_samples
from eval.shapeworld_generator import real_images

BUNDLE = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld"
pytestmark = pytest.mark.slow


def _report(out: Path, pattern: str) -> dict:
    return json.loads(next(out.glob(pattern)).read_text())


def test_eval_gen_samples_the_shipped_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = real_images(36, 64)
    ref = write_samples(tmp_path / "ref.npz", images, labels)
    out = tmp_path / "reports"
    code = main(["eval", "gen", "--generator", str(BUNDLE / "generator"), "--per-class", "1", "--ref", str(ref),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = _report(out, "gen-*.json")
    assert report["settings"]["samples"]["images"] == 36
    assert math.isfinite(report["results"]["fid"]) and report["results"]["fid"] > 0


def test_eval_vqa_runs_the_shipped_mllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    code = main(["eval", "vqa", "--mllm", str(BUNDLE / "mllm"), "--bench", "shapeworld", "--limit", "10",
                 "--batch-size", "5", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = _report(out, "vqa-*.json")["results"]
    assert results["questions"] == 10
    # the shipped model answers most held-out questions (its full figure: docs/results.md)
    assert results["metrics"]["exact"] >= 0.5
