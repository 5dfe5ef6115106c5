"""Run configs, DeepSpeed JSON filling, schedules and the CLI: the parts of training that need no process group."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch

from train.cli import _split_resume, add_cli
from train.config import GroupConfig, OptimConfig, build_config, load_config
from train.dry_run import dry_run
from train.ds_config import SHIPPED, batch_layout, build_ds_config
from train.optim import ParamGroup, WarmupSchedule, build_optimizer, lr_factor
from train.tasks import get_task
from uniflow.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
pytestmark = pytest.mark.filterwarnings("ignore:.*pretrained is not set")


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


def test_per_group_learning_rates_survive_the_schedule_and_a_resume() -> None:
    """Each group keeps its own base lr through warm-up, cosine decay and a resume; optim.groups overrides one."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    named = dict(model.named_parameters())
    config = OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01,
                         groups={"head": GroupConfig(lr_scale=0.5)})
    groups = [ParamGroup("encoder", [(n, p) for n, p in named.items() if n.startswith("0.")], lr_scale=0.1),
              ParamGroup("projector", [(n, p) for n, p in named.items() if n.startswith("1.")], lr=0.3),
              ParamGroup("head", [(n, p) for n, p in named.items() if n.startswith("2.")], weight_decay=0.0)]
    opt = build_optimizer(model, config, groups)
    base = {g["name"]: g["base_lr"] for g in opt.param_groups}
    assert base == pytest.approx({"encoder": 0.01, "encoder/no_decay": 0.01, "projector": 0.3,
                                  "projector/no_decay": 0.3, "head": 0.05, "head/no_decay": 0.05})
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"encoder": 0.01, "encoder/no_decay": 0.0, "projector": 0.01, "projector/no_decay": 0.0,
                     "head": 0.0, "head/no_decay": 0.0}
    sched = WarmupSchedule(opt, 10, config)
    for step in range(7):
        factor = lr_factor(step, 10, config)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([base[g["name"]] * factor
                                                                     for g in opt.param_groups]), step
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    # Resume: a fresh optimizer and schedule, then the saved states (the optimizer's holds the decayed lrs).
    again_opt = build_optimizer(model, config, groups)
    again = WarmupSchedule(again_opt, 10, config)
    again_opt.load_state_dict(opt_state)
    again.load_state_dict(state)
    assert again.get_last_lr() == pytest.approx([base[g["name"]] * lr_factor(7, 10, config)
                                                 for g in again_opt.param_groups])
    again.step()
    assert again.get_last_lr() == pytest.approx([base[g["name"]] * lr_factor(8, 10, config)
                                                 for g in again_opt.param_groups])
    with pytest.raises(ConfigError, match=r"optim\.groups: unknown group\(s\) \['decoder'\]"):
        build_optimizer(model, OptimConfig(groups={"decoder": GroupConfig(lr=1.0)}), groups)


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
        assert (cfg.batch_size, cfg.steps, cfg.data["image_size"], cfg.ema.decay) == (512, 70000, 448, 0.9999)
        assert cfg.model["distill"]["beta"] == 2.0 and cfg.model["flow"]["sample_steps"] == 1
        assert summary["precision"] == "bf16" and summary["gradient_accumulation_steps"] == 1
        # 304M InternViT student + 148.6M decoder trainable; the frozen teacher is a second InternViT.
        assert 440e6 < summary["trainable_parameters"] < 470e6
        assert 295e6 < summary["frozen_parameters"] < 310e6


def test_tokenizer_task_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.decoder: unknown field.*'head_depthh'"):
        get_task("tokenizer")(build_config({"model": {"preset": "tiny", "decoder": {"head_depthh": 2}}}, "t.yaml"))
    missing = {"model": {"preset": "tiny", "encoder": {"pretrained": str(tmp_path / "missing.safetensors")}}}
    with pytest.raises(ConfigError, match=r"model\.encoder\.pretrained: .*missing\.safetensors not found"):
        get_task("tokenizer")(build_config(missing, "t.yaml"))
    with pytest.raises(ConfigError, match=r"data\.image_size 60 is not divisible"):
        get_task("encoder")(build_config({"model": {"preset": "tiny"}, "data": {"image_size": 60}}, "e.yaml"))
    with pytest.raises(ConfigError, match=r"model: unknown field.*'width'"):
        get_task("encoder")(build_config({"model": {"preset": "tiny", "width": 3}}, "e.yaml"))
    # No silent default preset, and the task's own sections are typed with file and dotted path.
    for kind in ("encoder", "tokenizer"):
        with pytest.raises(ConfigError, match=r"k\.yaml: model\.preset: required \(one of \[.*'tiny'"):
            get_task(kind)(build_config({"model": {}}, "k.yaml"))
    with pytest.raises(ConfigError, match=r"k\.yaml: model\.preset: unknown preset 'huge'"):
        get_task("tokenizer")(build_config({"model": {"preset": "huge"}}, "k.yaml"))
    with pytest.raises(ConfigError, match=r"k\.yaml: model\.decoder\.head_depth: expected an integer, got 'deep'"):
        get_task("tokenizer")(build_config({"model": {"preset": "tiny", "decoder": {"head_depth": "deep"}}}, "k.yaml"))
    with pytest.raises(ConfigError, match=r"k\.yaml: data: unknown field.*'img_size'"):
        get_task("tokenizer")(build_config({"model": {"preset": "tiny"}, "data": {"img_size": 3}}, "k.yaml"))
    with pytest.raises(ConfigError, match=r"k\.yaml: eval: the 'encoder' task has no eval options"):
        get_task("encoder")(build_config({"model": {"preset": "tiny"}, "eval": {"grid_images": 3}}, "k.yaml"))
    with pytest.raises(ConfigError, match=r"k\.yaml: log\.grid_images moved to eval\.grid_images"):
        build_config({"log": {"grid_images": 3}}, "k.yaml")


@pytest.mark.parametrize("data,message", [
    ({"data": {"num_workers": -1}}, r"data\.num_workers: expected a value in \[0, inf\), got -1"),
    ({"data": {"source": "ftp"}}, r"data\.source: expected one of \['shapeworld', 'folder', 'hf'\], got 'ftp'"),
    ({"optim": {"betas": [0.9, 1.0]}}, r"optim\.betas\[1\]: expected a value in \[0, 1\), got 1\.0"),
    ({"optim": {"betas": [-0.1, 0.9]}}, r"optim\.betas\[0\]: expected a value in \[0, 1\)"),
    ({"optim": {"lr": float("inf")}}, r"optim\.lr: expected a finite number, got inf"),
    ({"optim": {"lr": float("nan")}}, r"optim\.lr: expected a finite number, got nan"),
    ({"optim": {"lr": 0}}, r"optim\.lr: expected a value in \(0, inf\), got 0"),
    ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got 'fast'"),
    ({"steps": 0}, r"steps: expected a value in \[1, inf\), got 0"),
    ({"batch_size": "64x"}, r"batch_size: expected an integer, got '64x'"),
    ({"ema": {"decay": 1.5}}, r"ema\.decay: expected a value in \[0, 1\]"),
    ({"log": {"every": 0}}, r"log\.every: expected a value in \[1, inf\)"),
    ({"checkpoint": {"keep_last": 0}}, r"checkpoint\.keep_last: expected a value in \[1, inf\)"),
    ({"optim": {"groups": {"enc": {"lr_scale": -1}}}}, r"optim\.groups\.enc\.lr_scale: expected a value in \[0"),
    ({"eval": {"grid_images": -2}}, r"eval\.grid_images: expected a value in \[0, inf\)"),
])
def test_every_numeric_option_is_range_checked_naming_file_and_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^r\.yaml: " + message):
        get_task("tokenizer")(build_config({"model": {"preset": "tiny"}, **data}, "r.yaml"))


def test_config_file_must_be_a_mapping_and_cli_values_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"list\.json: expected a mapping at the top level, got list"):
        load_config(_write(tmp_path / "list.json", "[1, 2]"))
    cfg_file = _write(tmp_path / "ok.yaml", "steps: 3\n")
    with pytest.raises(ConfigError, match=r"ok\.yaml: optim\.lr: expected a finite number, got inf"):
        load_config(cfg_file, ["optim.lr=inf"])
    with pytest.raises(ConfigError, match=r"ok\.yaml: steps: expected a value in \[1, inf\), got 0"):
        load_config(cfg_file, ["steps=0"])


def test_model_section_goes_through_the_typed_from_dict() -> None:
    """The model section gets the same coercion as the run config: text numbers, lists to tuples, bools."""
    task = get_task("tokenizer")(build_config({"model": {
        "preset": "tiny", "decoder": {"head_depth": "3", "gradient_checkpointing": "true"},
        "encoder": {"mean": [0.5, 0.5, 0.5]}, "flow_weight": 2}}, "m.yaml"))
    cfg = task.tokenizer_config
    assert cfg.decoder.head_depth == 3 and cfg.decoder.gradient_checkpointing is True
    assert cfg.encoder.mean == (0.5, 0.5, 0.5) and isinstance(cfg.flow_weight, float)


def test_preset_encoder_kwargs_do_not_leak_into_another_backend() -> None:
    """The tiny preset's timm kwargs (embed_dim, depth, num_heads) belong to its ViT: naming another backend or arch
    starts the encoder section from scratch, while a plain override keeps the preset's other fields."""
    other = {"backend": "hf", "arch": "dinov2", "kwargs": {"hidden_size": 32}, "image_size": 64, "patch_size": 8}
    for kind in ("tokenizer", "encoder"):
        task = get_task(kind)(build_config({"model": {"preset": "tiny", "encoder": other}}, "p.yaml"))
        enc = task.tokenizer_config.encoder if kind == "tokenizer" else task.encoder_config
        assert enc.kwargs == {"hidden_size": 32} and enc.mean is None, kind
    arch = get_task("tokenizer")(build_config({"model": {"preset": "tiny", "encoder": {
        "arch": "vit_small_patch16_224"}}}, "p.yaml")).tokenizer_config.encoder
    assert arch.kwargs == {} and arch.arch == "vit_small_patch16_224"
    same = get_task("tokenizer")(build_config({"model": {"preset": "tiny", "encoder": {
        "backend": "timm", "kwargs": {"depth": 2}}}}, "p.yaml")).tokenizer_config.encoder
    assert same.kwargs == {"embed_dim": 192, "depth": 2, "num_heads": 3} and same.image_size == 64


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
        parser.parse_args(["train", "painter", "--config", "c.yaml"])


def test_cli_kinds_come_from_the_one_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from train import registry

    monkeypatch.setitem(registry.KINDS, "toy", registry.Kind("tests.test_toy_kind:ToyTask", "train a toy model"))
    parser = argparse.ArgumentParser(prog="uniflow")
    train_parser = add_cli(parser.add_subparsers(dest="command", required=True))
    assert "train a toy model" in train_parser.format_help()
    assert parser.parse_args(["train", "toy", "--config", "c.yaml"]).kind == "toy"
