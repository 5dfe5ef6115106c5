"""`uniflow train generator`: configs (the full-scale ones by dry run), the latent cache, and a short run through the
engine whose export samples through `uniflow generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from generator.fingerprint import tokenizer_fingerprint
from generator.model import ARGenerator
from generator.presets import LLAMAGEN_CODEBOOK, PUBLISHED_TOTALS
from tests.helpers import tiny_tokenizer_config
from train.config import build_config, load_config
from train.dry_run import dry_run
from train.engine import train
from train.registry import get_task
from uniflow import UniFlowTokenizer, compute_latent_stats
from uniflow.data.shapeworld import ShapeWorldDataset
from uniflow.errors import ConfigError, OutputError
from uniflow.latent_stats import save_latent_stats

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_full_scale_configs_dry_run(size: str) -> None:
    """The ImageNet recipes resolve for 32 processes without the tokenizer folder (its preset stands in)."""
    config = load_config(CONFIGS / f"generator_{size}_imagenet.yaml", kind="generator")
    assert not Path(config.model["tokenizer"]).exists()
    summary = dry_run(config, world_size=32)
    assert summary["frozen_parameters"] == 0  # extracted latents: no tokenizer in the training module
    assert summary["precision"] == "bf16" and summary["micro_batch_size"] * 32 * \
        summary["gradient_accumulation_steps"] == 256
    with torch.device("meta"):
        task = get_task("generator")(config, dry_run=True)
        head = sum(p.numel() for p in ARGenerator(task.generator_config).head.parameters())
    transformer = summary["trainable_parameters"] - head
    published = PUBLISHED_TOTALS[size]
    assert abs(transformer + 2 * LLAMAGEN_CODEBOOK * task.generator_config.width - published) / published < 0.01
    assert task.generator_config.grid == (16, 16) and task.generator_config.num_classes == 1000


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random tokenizer (32 px, patch 8: a 4 x 4 grid of 16-d latents) with statistics over ShapeWorld."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = UniFlowTokenizer(tiny_tokenizer_config())
    tok.save_pretrained(folder)
    images = ShapeWorldDataset("train", num_samples=32, image_size=32)
    stats = compute_latent_stats(tok, [torch.stack([images[i]["image"] for i in range(32)])], source="test")
    save_latent_stats(folder, stats)
    return folder


def run_config(tmp_path: Path, tokenizer: Path, name: str = "gen", **sections: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "generator", "run_dir": str(tmp_path / name), "steps": 24, "batch_size": 16, "seed": 0,
        "model": {"preset": "tiny", "tokenizer": str(tokenizer), "width": 32, "depth": 1, "heads": 2,
                  "ffn_multiple_of": 16, "head_width": 32, "head_depth": 1, "flow": {"sample_steps": 2}},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "data": {"source": "shapeworld", "image_size": 32, "num_samples": 40, "heldout_samples": 8,
                 "extract_batch_size": 16, "shard_size": 32},
        "deepspeed": {"config": "zero0"},
        "ema": {"enabled": True, "decay": 0.9, "warmup": True},
        "log": {"every": 4, "progress": False},
        "eval": {"grid_classes": 2, "grid_per_class": 2},
        "checkpoint": {"every": 0},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return build_config(data, f"{name}.yaml")


def test_config_errors_name_the_field(tmp_path: Path, tokenizer_dir: Path) -> None:
    task = get_task("generator")
    with pytest.raises(ConfigError, match=r"model\.tokenizer: required"):
        task(build_config({"kind": "generator", "model": {"preset": "tiny"}}, "g.yaml"))
    with pytest.raises(ConfigError, match=r"model\.tokenizer: .*nowhere is not a tokenizer folder"):
        task(build_config({"kind": "generator", "model": {"preset": "tiny", "tokenizer": str(tmp_path / "nowhere")}},
                          "g.yaml"))
    bare = tmp_path / "bare"
    UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(bare)
    with pytest.raises(ConfigError, match=r"has no latent statistics .*uniflow latent-stats --tokenizer .*bare "
                                          r"--data shapeworld"):
        task(run_config(tmp_path, bare))
    with pytest.raises(ConfigError, match=r"model\.num_classes: 10, but the data has 36 classes"):
        task(run_config(tmp_path, tokenizer_dir, model={"num_classes": 10}))
    with pytest.raises(ConfigError, match=r"model\.grid: \[2, 2\], but the tokenizer and data\.image_size give "
                                          r"\[4, 4\]"):
        task(run_config(tmp_path, tokenizer_dir, model={"grid": [2, 2]}))
    with pytest.raises(ConfigError, match=r"data\.latents: expected one of \['extract', 'online'\]"):
        task(run_config(tmp_path, tokenizer_dir, data={"latents": "disk"}))
    made = task(run_config(tmp_path, tokenizer_dir))
    assert made.generator_config.class_names[0] == "red circle" and made.generator_config.grid == (4, 4)
    assert made.generator_config.tokenizer_fingerprint == tokenizer_fingerprint(
        UniFlowTokenizer.from_pretrained(tokenizer_dir))


def test_training_extracts_latents_once_learns_and_exports_a_generator(tmp_path: Path, tokenizer_dir: Path,
                                                                       capsys) -> None:
    latent_dir = tmp_path / "latents"
    result = train(run_config(tmp_path, tokenizer_dir, data={"latent_dir": str(latent_dir)}))
    manifest = json.loads((latent_dir / "train" / "manifest.json").read_text())
    assert manifest["count"] == 40 and manifest["hflip"] and len(list((latent_dir / "train").glob("shard_*"))) == 2
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert "heldout_loss" in evals[-1] and "heldout_loss_ema" in evals[-1]
    assert (result.run_dir / "samples" / "gen_step0000024_ema.png").is_file()
    model = ARGenerator.from_pretrained(result.export_dir)
    tokenizer = UniFlowTokenizer.from_pretrained(tokenizer_dir)
    assert model.config.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert model.config.latent_mean == pytest.approx(tokenizer.latent_stats.mean.tolist())
    # A second run reuses the extracted latents; latents of another data set there are refused.
    shard = latent_dir / "train" / "shard_00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    train(run_config(tmp_path, tokenizer_dir, name="again", steps=2, data={"latent_dir": str(latent_dir)}))
    assert shard.stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match=r"data\.latent_dir: .*holds latents of another tokenizer, dataset"):
        train(run_config(tmp_path, tokenizer_dir, name="other", steps=2,
                         data={"latent_dir": str(latent_dir), "num_samples": 24}))
    # The export samples through the command line with its tokenizer.
    out = tmp_path / "grid.png"
    assert main(["generate", "--generator", str(result.export_dir), "--tokenizer", str(tokenizer_dir), "--class",
                 "blue star", "--num", "2", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()


def test_online_latents_keep_the_tokenizer_frozen(tmp_path: Path, tokenizer_dir: Path) -> None:
    result = train(run_config(tmp_path, tokenizer_dir, steps=3, data={"latents": "online"},
                              eval={"grid_classes": 1, "grid_per_class": 1}))
    module = result.engine.module
    assert module.tokenizer is not None and not any(p.requires_grad for p in module.tokenizer.parameters())
    reference = UniFlowTokenizer.from_pretrained(tokenizer_dir)
    for (name, p), q in zip(module.tokenizer.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p.cpu(), q), name
    assert not (tmp_path / "gen" / "latents").exists()
    assert ARGenerator.from_pretrained(result.export_dir).config.tokenizer_fingerprint == \
        tokenizer_fingerprint(reference)


def test_a_resumed_run_logs_the_same_losses(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Class dropout, noise draws and the extracted-latent batches all come back exactly after a resume."""
    config = run_config(tmp_path, tokenizer_dir, steps=8, log={"every": 2}, checkpoint={"every": 4},
                        eval={"grid_classes": 0})
    first = {r["step"]: r["loss"] for r in train(config).history if r["kind"] == "train"}
    again = train(config, resume=tmp_path / "gen" / "checkpoints" / "step_0000004")
    resumed = {r["step"]: r["loss"] for r in again.history if r["kind"] == "train"}
    assert sorted(resumed) == [6, 8]
    assert resumed == pytest.approx({k: first[k] for k in (6, 8)}, rel=1e-6)
