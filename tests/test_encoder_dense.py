"""The encoder task's dense heads: per-patch shape and colour targets next to the main-object class, their config,
evaluation and export (the teacher that sees shape, issue 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import default_collate

from train.config import build_config
from train.encoder_task import EncoderClassifier, EncoderLossConfig
from train.engine import train
from train.metrics_log import read_metrics
from train.tasks import get_task
from uniflow.configs import from_dict
from uniflow.data.shapeworld import COLOURS, SHAPES, ShapeWorldDataset
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:model.num_classes is not set")

TINY_ENCODER = {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "image_size": 32}


def tiny(run_dir: Path, **model: Any) -> Any:
    return build_config({
        "kind": "encoder", "run_dir": str(run_dir), "steps": 4, "batch_size": 8,
        "model": {"preset": "tiny", "encoder": dict(TINY_ENCODER), **model},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "constant"},
        "data": {"source": "shapeworld", "image_size": 32, "num_samples": 48, "heldout_samples": 8},
        "deepspeed": {"config": "zero0"},
        "log": {"every": 1, "progress": False, "eval_every": 2},
        "checkpoint": {"every": 4},
        "export": {"enabled": True},
    }, f"{run_dir}.yaml")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return train(tiny(tmp_path_factory.mktemp("dense") / "run"))


def test_dense_run_logs_evaluates_and_exports_every_head(dense_run: Any) -> None:
    rows = read_metrics(dense_run.run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"class_loss", "shape_loss", "colour_loss", "shape_accuracy", "colour_accuracy"} <= set(train_rows[0])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("heldout_accuracy", "heldout_shape_accuracy", "heldout_colour_accuracy"):
        assert all(0.0 <= r[key] <= 1.0 for r in evals)
    export = dense_run.export_dir
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["loss_weights"] == [1.0, 1.0, 1.0] and "heldout_shape_accuracy" in metrics
    heads = load_file(export / "classifier.safetensors")
    assert heads["shape_head.weight"].shape == (len(SHAPES) + 1, 32)
    assert heads["colour_head.weight"].shape == (len(COLOURS) + 1, 32)
    assert {"norm.weight", "head.weight", "dense_norm.weight"} <= set(heads)
    # the encoder file is exactly the plain ViT the tokenizer adapts: same keys, loadable as `pretrained`
    config = EncoderConfig(**{**json.loads((export / "encoder_config.json").read_text()),
                              "pretrained": str(export / "encoder.safetensors")})
    encoder = build_encoder(config)
    assert set(load_file(export / "encoder.safetensors")) == set(encoder.model.state_dict())
    trained = dense_run.engine.module.encoder.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_cached_run_trains_exactly_as_an_uncached_one(tmp_path: Path) -> None:
    """data.cache_mb: the later epochs read kept items, and the weights come out bit-identical."""
    from train.data import CachedDataset

    def run(name: str, **data: Any) -> Any:
        config = tiny(tmp_path / name)
        config.data.update(num_samples=16, **data)  # 4 steps of 8: two epochs, the second one all cache hits
        return train(config)

    plain, cached = run("plain"), run("cached", cache_mb=16)
    assert isinstance(cached.train_data, CachedDataset) and sorted(cached.train_data.items) == list(range(16))
    assert not isinstance(plain.train_data, CachedDataset)
    losses = [[r["loss"] for r in read_metrics(r.run_dir) if r["kind"] == "train"] for r in (plain, cached)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    weights = [r.engine.module.state_dict() for r in (plain, cached)]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_loss_weights_are_typed_and_range_checked(tmp_path: Path) -> None:
    def task(model: dict[str, Any], **data: Any) -> Any:
        cfg = tiny(tmp_path / "r", **model)
        cfg.data.update(data)
        return get_task("encoder")(cfg)

    assert task({}).loss_weights == (1.0, 1.0, 1.0)  # ShapeWorld: dense targets on by default
    assert task({"loss": {"shape": 2, "colour": "0.5"}}).loss_weights == (1.0, 2.0, 0.5)
    plain = task({"loss": {"shape": 0, "colour": 0}})
    assert not plain.dense and not hasattr(plain.build_model(), "shape_head")
    with pytest.raises(ConfigError, match=r"r\.yaml: model\.loss\.shape: expected a value in \[0, inf\), got -1"):
        task({"loss": {"shape": -1}})
    with pytest.raises(ConfigError, match=r"r\.yaml: model\.loss: unknown field\(s\) \['depth'\]"):
        task({"loss": {"depth": 1}})
    with pytest.raises(ConfigError, match=r"model\.loss\.colour: expected a number, got 'lots'"):
        task({"loss": {"colour": "lots"}})
    with pytest.raises(ConfigError, match=r"model\.loss: every loss weight is 0"):
        task({"loss": {"classify": 0, "shape": 0, "colour": 0}})
    with pytest.raises(ConfigError, match=r"model\.loss: shape/colour weights need per-patch targets"):
        task({"loss": {"shape": 1}}, source="folder", path=str(tmp_path))
    folder = task({}, source="folder", path=str(tmp_path))  # null weights: off where there are no targets
    assert folder.loss_weights == (1.0, 0.0, 0.0) and not folder.dense
    assert from_dict(EncoderLossConfig, {}).resolved(True, "x") == (1.0, 1.0, 1.0)


def test_dense_loss_is_soft_cross_entropy_and_reaches_the_encoder() -> None:
    torch.manual_seed(0)
    config = EncoderConfig(backend="timm", arch="vit_tiny_patch16_224", kwargs=TINY_ENCODER["kwargs"],
                           image_size=32, patch_size=8)
    model = EncoderClassifier(config, 36, dense=True, loss_weights=(0.0, 1.0, 0.0))
    batch = default_collate([ShapeWorldDataset("train", 4, image_size=32, patch_size=8)[i] for i in range(4)])
    out = model(batch)
    logits = model(batch, mode="outputs")["shape_logits"]
    assert logits.shape == (4, 16, len(SHAPES) + 1)
    expected = -(batch["patch_shape_area"] * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.shape_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0  # classify weight 0
