"""The training engine in this process: a single process with no launcher (it sets up its own process group),
ZeRO-0, tiny models, a handful of steps each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from train import checkpointing
from train.config import build_config
from train.ds_config import build_ds_config
from train.engine import seed_all, train
from train.metrics_log import read_metrics
from uniflow import UniFlowTokenizer
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*pretrained is not set", "ignore:model.num_classes is not set")

TINY_ENCODER = {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "image_size": 32}


def tiny(run_dir: Path, kind: str = "tokenizer", **sections: Any) -> Any:
    data: dict[str, Any] = {
        "kind": kind, "run_dir": str(run_dir), "steps": 4, "batch_size": 8,
        "model": {"preset": "tiny", "encoder": dict(TINY_ENCODER)},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "constant"},
        "data": {"source": "shapeworld", "image_size": 32, "num_samples": 48, "heldout_samples": 4},
        "deepspeed": {"config": "zero0"},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 2},
        "export": {"enabled": False},
    }
    if kind == "tokenizer":
        data["model"]["decoder"] = {"global_depth": 1, "global_heads": 2, "head_width": 32, "head_depth": 1}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_config(data, f"{run_dir}.yaml")


def losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in history if row["kind"] == "train"}


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted encoder run (4 steps, batch 8, checkpoints at 2 and 4) the other tests compare with."""
    run_dir = tmp_path_factory.mktemp("enc") / "run"
    return train(tiny(run_dir, "encoder", export={"enabled": True}))


def test_encoder_run_exports_a_pretrained_encoder_file(encoder_run: Any) -> None:
    export = encoder_run.export_dir
    assert sorted(p.name for p in export.iterdir()) == ["classifier.safetensors", "encoder.safetensors",
                                                         "encoder_config.json", "metrics.json"]
    metrics = json.loads((export / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and metrics["step"] == 4
    config = EncoderConfig(**{**json.loads((export / "encoder_config.json").read_text()),
                              "pretrained": str(export / "encoder.safetensors")})
    encoder = build_encoder(config)  # the file is exactly what EncoderConfig.pretrained loads
    trained = encoder_run.engine.module.encoder.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, trained[key]), key
    rows = read_metrics(encoder_run.run_dir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert {"lr", "loss", "accuracy", "images_per_s", "data_share"} <= set(rows[0])


def test_gradient_accumulation_matches_the_full_batch(encoder_run: Any, tmp_path: Path) -> None:
    accumulated = train(tiny(tmp_path / "accum", "encoder", micro_batch_size=4))
    assert accumulated.engine.gradient_accumulation_steps() == 2
    ref, acc = losses(encoder_run.history), losses(accumulated.history)
    assert ref.keys() == acc.keys()
    for step in ref:
        assert acc[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
    for (name, p), q in zip(encoder_run.engine.module.named_parameters(), accumulated.engine.module.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_interrupted_checkpoint_write_keeps_the_previous_one(encoder_run: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "crash"
    calls = {"n": 0}
    original = checkpointing._write_rng

    def failing(folder: Path, rank: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save dies after DeepSpeed wrote its files
            raise OSError("disk full (simulated)")
        original(folder, rank)

    monkeypatch.setattr(checkpointing, "_write_rng", failing)
    with pytest.raises(OSError, match="simulated"):
        train(tiny(run_dir, "encoder"))
    monkeypatch.setattr(checkpointing, "_write_rng", original)
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert not (root / "step_0000004").exists() and (root / ".step_0000004.tmp").exists()
    assert checkpointing.find_checkpoint(run_dir).name == "step_0000002"
    resumed = train(tiny(run_dir, "encoder"), resume=True)  # the previous checkpoint loads and training finishes
    assert resumed.state.step == 4 and not (root / ".step_0000004.tmp").exists()
    assert losses(read_metrics(run_dir)) == pytest.approx(losses(encoder_run.history), abs=1e-6)


def test_resume_errors_name_the_path(encoder_run: Any, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"--resume .*empty_run: no such folder"):
        train(tiny(tmp_path / "empty_run", "encoder"), resume=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match=r"--resume .*other: no checkpoint found"):
        train(tiny(tmp_path / "t", "encoder"), resume=tmp_path / "other")
    ckpt = encoder_run.run_dir / "checkpoints" / "step_0000002"
    with pytest.raises(CheckpointError, match=r"step_0000002/trainer_state\.json: checkpoint of a 'encoder' model, "
                                              r"but this run trains 'tokenizer'"):
        train(tiny(tmp_path / "tok", "tokenizer"), resume=ckpt)


def test_bad_data_is_reported_before_deepspeed_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path: data folder .*nowhere not found"):
        train(tiny(tmp_path / "r", "encoder", data={"source": "folder", "path": str(tmp_path / "nowhere")}))
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no images found in .*empty"):
        train(tiny(tmp_path / "r", "encoder", data={"source": "folder", "path": str(tmp_path / "empty")}))
    with pytest.raises(ConfigError, match="fewer than one micro-batch"):
        train(tiny(tmp_path / "r", "encoder", data={"num_samples": 3}))


def test_tokenizer_single_process_ema_teacher_and_export(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "tok", steps=3, ema={"enabled": True, "decay": 0.5},
               log={"every": 1, "progress": False, "eval_every": 2}, eval={"grid_images": 2},
               export={"enabled": True, "dtype": "float16"}, checkpoint={"every": 0})
    result = train(cfg)
    module = result.engine.module
    rows = read_metrics(result.run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"alpha_1", "alpha_2", "w_1", "w_2", "flow", "distill", "lr"} <= set(train_rows[-1])
    assert sum(train_rows[-1][f"w_{i}"] for i in (1, 2)) == pytest.approx(1.0, abs=1e-5)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all("heldout_psnr_ema" in r for r in evals)
    assert (result.run_dir / "samples" / "recon_step0000002.png").is_file()
    assert (result.run_dir / "checkpoints" / "step_0000003").is_dir()  # the final checkpoint

    # The teacher is frozen, outside the optimizer, and still the initial encoder.
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    in_optimizer = sum(p.numel() for g in result.engine.basic_optimizer.param_groups for p in g["params"])
    assert in_optimizer == trainable
    seed_all(cfg.seed)
    initial = result.task.build_model()
    teacher = module.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    for (name, p), q in zip(teacher.named_parameters(), initial.teacher.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(module.tokenizer.encoder.model.pos_embed, initial.tokenizer.encoder.model.pos_embed)

    # EMA: one update per optimizer step, exported (the tokenizer's default) in fp16, loadable.
    assert result.ema.num_updates == 3
    tensors = load_file(str(result.export_dir / "model.safetensors"))
    assert not any(k.startswith("teacher.") for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    ema = result.ema.full_state()
    key = "tokenizer.decoder.flow_head.input_proj.weight"
    if key not in ema:
        key = next(k for k in ema if k.startswith("tokenizer.decoder."))
    assert torch.equal(tensors[key.removeprefix("tokenizer.")], ema[key].half())
    loaded = UniFlowTokenizer.from_pretrained(result.export_dir)
    out = loaded.reconstruct(torch.rand(2, 3, 32, 32), seed=0)
    assert out.shape == (2, 3, 32, 32)


def test_gradient_checkpointing_and_bf16(tmp_path: Path) -> None:
    plain = train(tiny(tmp_path / "plain", steps=2, checkpoint={"every": 0}))
    ckpt = train(tiny(tmp_path / "gc", steps=2, checkpoint={"every": 0}, gradient_checkpointing=True))
    assert ckpt.task.tokenizer_config.decoder.gradient_checkpointing
    assert losses(ckpt.history) == pytest.approx(losses(plain.history), rel=1e-5)
    bf16 = train(tiny(tmp_path / "bf16", steps=2, checkpoint={"every": 0}, deepspeed={"precision": "bf16"}))
    assert next(bf16.engine.module.parameters()).dtype == torch.bfloat16
    assert losses(bf16.history) == pytest.approx(losses(plain.history), rel=0.1)


def test_zero3_offload_config_fills(tmp_path: Path) -> None:
    ds = build_ds_config(tiny(tmp_path, deepspeed={"config": "zero3_offload"}), 1, torch.device("cpu"))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # a torch AdamW may run on the offloaded partitions
