"""Run configs, DeepSpeed JSON filling, schedules and the CLI: the parts of training that need no process group."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch

from train.cli import _split_resume, add_cli
from train.config import OptimConfig, build_config, load_config
from train.dry_run import dry_run
from train.ds_config import SHIPPED, batch_layout, build_ds_config
from train.optim import WarmupSchedule, build_optimizer, lr_factor
from train.tasks import get_task
from uniflow.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_overrides_are_typed(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "run.yaml", "kind: tokenizer\nsteps: 10\noptim:\n  lr: 2e-4\n")
    cfg = load_config(cfg_file, ["optim.lr=1e-3", "steps=5", "optim.betas=[0.8, 0.9]", "ema.enabled=true",
                                 "model.decoder.head_depth=2", "micro_batch_size=null", "export.dtype=float16",
                                 "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.steps == 5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.ema.enabled is True and cfg.micro_batch_size is None
    assert cfg.model == {"decoder": {"head_depth": 2}}
    assert cfg.deepspeed.overrides["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert load_config(cfg_file).optim.lr == 2e-4  # YAML 1.1 would read "2e-4" as text


def test_unknown_key_in_file_names_file_and_field(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim.*lrr"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match=r"bad2\.yaml.*unknown field.*'stepz'"):
        load_config(_write(tmp_path / "bad2.yaml", "stepz: 3\n"))


def test_bad_overrides_name_the_field(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "ok.yaml", "steps: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*'lrr'"):
        load_config(cfg_file, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"steps.*integer"):
        load_config(cfg_file, ["steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(cfg_file, ["steps"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(cfg_file, ["steps.x=1"])


def test_kind_mismatch_and_unknown_kind(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "enc.yaml", "kind: encoder\n")
    with pytest.raises(ConfigError, match=r"enc\.yaml.*'encoder'.*'tokenizer'"):
        load_config(cfg_file, kind="tokenizer")
    with pytest.raises(ConfigError, match="unknown model kind 'gan'"):
        get_task(build_config({"kind": "gan"}).kind)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_deepspeed_configs_are_filled_from_the_run_config(name: str) -> None:
    cfg = build_config({"batch_size": 32, "micro_batch_size": 4, "optim": {"grad_clip": 0.5},
                        "deepspeed": {"config": name, "precision": "auto"}})
    ds = build_ds_config(cfg, world_size=2, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False}
    assert "auto" not in json.dumps(ds)
    expected = {"zero0": 0, "zero2": 2, "zero3": 3, "zero3_offload": 3}[name]
    assert ds["zero_optimization"]["stage"] == expected
    assert build_ds_config(cfg, 2, torch.device("cuda"))["bf16"]["enabled"] is True


def test_conflicting_deepspeed_json_warns_and_optimizer_section_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 1}}))
    cfg = build_config({"batch_size": 8, "deepspeed": {"config": str(path)}})
    with pytest.warns(UserWarning, match="train_micro_batch_size_per_gpu=99 is replaced by 8"):
        ds = build_ds_config(cfg, 1, torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 8
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        build_ds_config(cfg, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="neither a shipped config"):
        build_ds_config(build_config({"deepspeed": {"config": "zero9"}}), 1, torch.device("cpu"))


def test_batch_layout() -> None:
    assert batch_layout(build_config({"batch_size": 64, "micro_batch_size": 8}), 2) == (8, 4)
    assert batch_layout(build_config({"batch_size": 64}), 4) == (16, 1)
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_layout(build_config({"batch_size": 10, "micro_batch_size": 4}), 1)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        batch_layout(build_config({"batch_size": 8}), 3)


def test_lr_schedule_warmup_cosine_constant() -> None:
    cosine = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 20, cosine) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cosine) == pytest.approx(1.0)
    assert lr_factor(12, 20, cosine) == pytest.approx(0.55)
    assert lr_factor(20, 20, cosine) == pytest.approx(0.1)
    constant = OptimConfig(lr=1.0, warmup_steps=2, schedule="constant")
    assert [lr_factor(s, 5, constant) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2))
    sched = WarmupSchedule(opt, 10, OptimConfig(lr=0.1, warmup_steps=2))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    sched.step()
    state = sched.state_dict()
    again = WarmupSchedule(opt, 10, OptimConfig(lr=0.1, warmup_steps=2))
    again.load_state_dict(state)
    assert again.get_last_lr()[0] == pytest.approx(0.1)


def test_optimizer_skips_frozen_parameters_and_decays_only_matrices() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in list(model[0].parameters()) + list(model[1].parameters())}
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [model[0].weight]


@pytest.mark.parametrize("name,world,kind", [("encoder_tiny.yaml", 1, "encoder"),
                                             ("tokenizer_tiny.yaml", 1, "tokenizer"),
                                             ("tokenizer_internvit300m_imagenet.yaml", 32, "tokenizer")])
def test_shipped_run_configs_dry_run(name: str, world: int, kind: str) -> None:
    """Full-scale recipes are checked on the meta device: config, DeepSpeed JSON and model all resolve."""
    summary = dry_run(load_config(CONFIGS / name, kind=kind), world_size=world)
    assert summary["kind"] == kind and summary["trainable_parameters"] > 0
    if "internvit" in name:
        cfg = load_config(CONFIGS / name)
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (2e-4, (0.9, 0.95),
                                                                                               1000, 1.0)
        assert (cfg.batch_size, cfg.steps, cfg.data.image_size, cfg.ema.decay) == (512, 70000, 448, 0.9999)
        assert cfg.model["distill"]["beta"] == 2.0 and cfg.model["flow"]["sample_steps"] == 1
        assert summary["precision"] == "bf16" and summary["gradient_accumulation_steps"] == 1
        # 304M InternViT student + 148.6M decoder trainable; the frozen teacher is a second InternViT.
        assert 440e6 < summary["trainable_parameters"] < 470e6
        assert 295e6 < summary["frozen_parameters"] < 310e6


def test_tokenizer_task_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.*unknown field.*'head_depthh'"):
        get_task("tokenizer")(build_config({"model": {"decoder": {"head_depthh": 2}}}, "t.yaml"))
    missing = {"model": {"encoder": {"pretrained": str(tmp_path / "missing.safetensors")}}}
    with pytest.raises(ConfigError, match=r"model\.encoder\.pretrained: .*missing\.safetensors not found"):
        get_task("tokenizer")(build_config(missing, "t.yaml"))
    with pytest.raises(ConfigError, match=r"data\.image_size 60 is not divisible"):
        get_task("encoder")(build_config({"data": {"image_size": 60}}, "e.yaml"))
    with pytest.raises(ConfigError, match=r"model: unknown field.*'width'"):
        get_task("encoder")(build_config({"model": {"width": 3}}, "e.yaml"))


def test_cli_registers_train_kinds() -> None:
    parser = argparse.ArgumentParser(prog="uniflow")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "tokenizer", "--config", "c.yaml", "steps=3", "optim.lr=1e-3", "--resume"])
    assert (args.kind, args.config, args.overrides, args.resume) == ("tokenizer", "c.yaml", ["steps=3",
                                                                                           "optim.lr=1e-3"], "")
    args = parser.parse_args(["train", "encoder", "--config", "c.yaml", "--resume", "runs/x", "--local_rank=1"])
    assert (args.kind, args.resume, args.local_rank) == ("encoder", "runs/x", 1)
    args = parser.parse_args(["train", "tokenizer", "--config", "c.yaml", "optim.lr=1e-3", "--resume", "steps=9"])
    assert _split_resume(args) == (True, ["optim.lr=1e-3", "steps=9"])  # an override, not a folder
    with pytest.raises(SystemExit), warnings.catch_warnings():
        parser.parse_args(["train", "generator", "--config", "c.yaml"])
