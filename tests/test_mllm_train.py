"""The `mllm` model kind through the engine: stage 1 trains the projector only, stage 2 the LLM (full, or LoRA) with
per-group learning rates on LLaVA JSON, a two-process ZeRO-2 stage-2 step, and the full-scale recipe checked by a
dry run on the meta device."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mllm.model import UniFlowChat
from mllm.tiny import build_llm_folder
from tests.helpers import ROOT, launch_env, torchrun
from train.config import build_config, load_config
from train.dry_run import dry_run
from train.engine import train
from uniflow.errors import ConfigError


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llm_folder(tmp_path_factory.mktemp("llm") / "qwen2", "qwen2", "smollm2", seed=2)


def run_config(run_dir: Path, vision_dir: Path, llm_dir: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": "mllm", "run_dir": str(run_dir), "steps": 3, "batch_size": 4, "seed": 0,
        "model": {"vision": {"tokenizer": str(vision_dir)}, "projector": {"type": "pixel_shuffle"},
                  "llm": {"path": str(llm_dir)}, "llm_tuning": "none", "max_length": 160,
                  "system_prompt": "Answer briefly."},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "constant"},
        "data": {"source": "shapeworld", "task": "caption", "num_samples": 16, "heldout_samples": 4},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 0},
        "deepspeed": {"config": "zero0"},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


def test_stage1_trains_only_the_projector_and_exports_it(tmp_path: Path, shared_tokenizer: Any,
                                                         llm_dir: Path) -> None:
    vision_dir = shared_tokenizer[1]
    config = build_config(run_config(tmp_path / "s1", vision_dir, llm_dir, eval={"questions": 1}), "stage1.yaml")
    result = train(config)
    module = result.engine.module
    rows = [r for r in result.history if r["kind"] == "train"]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["samples_per_s"] > 0 and rows[0]["label_tokens"] > 0
    final = [r for r in result.history if r["kind"] == "eval"][-1]
    assert {"heldout_loss", "heldout_exact", "heldout_exact_shape", "heldout_exact_yes_no"} <= set(final)
    # The LLM and the encoder are exactly what their folders hold; the projector moved.
    llm_file = load_file(str(llm_dir / "model.safetensors"))
    for name, value in module.causal_lm.state_dict().items():
        if name in llm_file:
            assert torch.equal(value, llm_file[name]), name
    enc_file = load_file(str(vision_dir / "model.safetensors"))
    for name, value in module.encoder.state_dict().items():
        assert torch.equal(value, enc_file[f"encoder.{name}"]), name
    loaded = UniFlowChat.from_pretrained(result.export_dir)
    for name, value in module.projector.state_dict().items():
        assert torch.equal(value, loaded.projector.state_dict()[name]), name
    # Only the projector is optimised, and it was (Adam's moments are non-zero).
    optimised = {id(p) for g in result.engine.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.projector.parameters()}
    assert all(result.engine.optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in module.projector.parameters())
    # Every checkpoint holds the trainable part (the projector), never the frozen LLM or encoder.
    from train import checkpointing

    ckpt = result.last_checkpoint
    with torch.serialization.safe_globals(checkpointing._safe_global_objects()):
        saved = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)
    assert set(saved["module"]) == {f"projector.{k}" for k in module.projector.state_dict()}
    saved = json.loads((result.export_dir / "config.json").read_text())
    assert saved["model_kind"] == "uniflow-mllm" and saved["base"]["model_type"] == "qwen2"


def test_stage2_full_llm_on_llava_json_with_group_lrs(tmp_path: Path, shared_tokenizer: Any, llm_dir: Path) -> None:
    from uniflow.data.shapeworld import write_shapeworld

    vision_dir = shared_tokenizer[1]
    data_dir = write_shapeworld(tmp_path / "sw", 6, split="train", progress=False)
    records = json.loads((data_dir / "train_llava.json").read_text())
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "What is two plus two?"},
                                                          {"from": "gpt", "value": "4"}]})
    records.append({"id": "two-images", "image": [records[0]["image"], records[1]["image"]],
                    "conversations": [{"from": "human", "value": "<image>\n<image>\nWhich one is larger?"},
                                      {"from": "gpt", "value": "The first."}]})
    (data_dir / "mixed.json").write_text(json.dumps(records))
    stage1 = train(build_config(run_config(tmp_path / "s1", vision_dir, llm_dir, steps=1), "stage1.yaml"))
    config = run_config(
        tmp_path / "s2", vision_dir, llm_dir, steps=2,
        model={"llm_tuning": "full", "init_from": str(stage1.export_dir)},
        optim={"lr": 1e-3, "warmup_steps": 1, "schedule": "constant",
               "groups": {"projector": {"lr": 1e-30}, "llm": {"lr": 1e-4}}},
        data={"source": "llava", "path": str(data_dir / "mixed.json"), "heldout_samples": 0})
    config["batch_size"] = 8  # all 8 records (text-only and two-image ones included) in each step
    result = train(build_config(config, "stage2.yaml"))
    lrs = {g["name"]: g["base_lr"] for g in result.engine.optimizer.param_groups}
    assert lrs["projector"] == pytest.approx(1e-30, rel=1e-6, abs=0) and lrs["llm"] == pytest.approx(1e-4)
    assert not any(name.startswith("encoder") for name in lrs)  # the frozen encoder never reaches the optimizer
    row = [r for r in result.history if r["kind"] == "train"][-1]
    assert row["lr_projector"] == pytest.approx(1e-30, rel=1e-6, abs=0) and row["lr_llm"] == pytest.approx(1e-4)
    # Stage 2 started from stage 1's projector (kept in place by its negligible lr), and the LLM moved.
    module = result.engine.module
    first = UniFlowChat.from_pretrained(stage1.export_dir)
    for name, value in first.projector.state_dict().items():
        assert torch.equal(value, module.projector.state_dict()[name]), name
    assert not torch.equal(first.causal_lm.model.layers[0].mlp.up_proj.weight,
                           module.causal_lm.model.layers[0].mlp.up_proj.weight)
    assert (result.export_dir / "llm" / "model.safetensors").is_file()
    loaded = UniFlowChat.from_pretrained(result.export_dir)
    for name, value in module.causal_lm.state_dict().items():
        assert torch.equal(value, loaded.causal_lm.state_dict()[name]), name
    assert loaded.generate([(None, "hi")], max_new_tokens=3)[0] == module.generate([(None, "hi")],
                                                                                   max_new_tokens=3)[0]


def test_bad_mllm_run_configs_fail_before_training(tmp_path: Path, shared_tokenizer: Any, llm_dir: Path) -> None:
    vision_dir = shared_tokenizer[1]
    with_image = tmp_path / "with_image.json"
    with_image.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                         {"from": "gpt", "value": "Hello"}]}]))
    cases = [
        ({"model": {"vision": {"tokenizer": str(tmp_path / "nope")}}}, r"model.vision.tokenizer: .*nope not found"),
        ({"model": {"init_from": str(tmp_path)}}, r"model.init_from: .* is not an MLLM folder"),
        ({"model": {"projector": {"type": "perceiver"}}}, r"model.projector.type: expected one of"),
        ({"data": {"source": "llava", "path": None}}, r"data.path: the llava source needs"),
        ({"model": {"llm": {"path": "package:llm_nothing"}}}, r"unknown model package"),
        ({"data": {"source": "llava", "path": "x.json"}, "eval": {"questions": 2}}, r"eval.questions: .* shapeworld"),
        ({"data": {"text_ratio": 0.2}}, r"data.text_path: text_ratio 0.2 needs the text-only LLaVA JSON"),
        ({"data": {"text_ratio": 0.2, "text_path": str(with_image)}}, r"data.text_path: .* has records with an image"),
    ]
    for sections, pattern in cases:
        config = run_config(tmp_path / "bad", vision_dir, llm_dir)
        for key, value in sections.items():
            base = config.get(key, {})
            config[key] = {**base, **{k: ({**base.get(k, {}), **v} if isinstance(v, dict) and
                                          isinstance(base.get(k), dict) else v) for k, v in value.items()}}
        with pytest.raises(ConfigError, match=pattern):
            train(build_config(config, "bad.yaml"))
        assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["mllm_internvit300m_qwen25_7b_stage1", "mllm_internvit300m_qwen25_7b_stage2"])
def test_full_scale_recipe_dry_run_on_the_meta_device(name: str) -> None:
    config = load_config(ROOT / "train" / "configs" / f"{name}.yaml")
    summary = dry_run(config, world_size=8, device="cuda")
    assert summary["zero_stage"] == 3 and summary["precision"] == "bf16"
    assert summary["micro_batch_size"] * 8 * summary["gradient_accumulation_steps"] == config.batch_size
    projector = 1024 * 3584 + 3584 + 3584 * 3584 + 3584  # LLaVA-1.5 MLP: InternViT width 1024 -> Qwen2.5-7B 3584
    qwen25_7b = 7_615_616_512
    internvit = summary["frozen_parameters"] - (qwen25_7b if name.endswith("stage1") else 0)
    assert 280e6 < internvit < 320e6  # InternViT-300M
    if name.endswith("stage1"):
        assert summary["trainable_parameters"] == projector
    else:
        assert summary["trainable_parameters"] == projector + qwen25_7b


# ------------------------------------------------------------------------------------------- two processes
DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from train.config import build_config
    from train.distributed import shutdown_distributed
    from train.engine import train

    config = build_config(json.loads(sys.argv[1]), "driver")
    result = train(config)
    losses = {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}
    trainable = sorted(n for n, p in result.engine.module.named_parameters() if p.requires_grad)
    out = {"rank": result.dist.rank, "world": result.dist.world_size, "losses": losses,
           "trainable": trainable, "export": str(result.export_dir)}
    Path(config.run_dir, f"rank{result.dist.rank}.json").write_text(json.dumps(out))
    shutdown_distributed()
''')


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_two_process_stage2_step(tmp_path: Path, shared_tokenizer: Any, llm_dir: Path, tuning: str) -> None:
    """Acceptance: a two-process ZeRO-2 stage-2 step with LoRA. With the full LLM also at ZeRO-3 (the full-scale
    recipe's stage, where the LLM is built partitioned and its weights are scattered from rank 0): the first step's
    loss, computed before any update, is the ZeRO-2 run's, so both started from the same weights (the projector's
    place words included)."""
    if tuning == "lora":
        pytest.importorskip("peft")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    stages = ["zero2"] if tuning == "lora" else ["zero2", "zero3"]
    first_losses = []
    for stage in stages:
        run = tmp_path / stage
        # place words come from the real embedding also at ZeRO-3, where the LLM is built on random weights
        model = {"llm_tuning": tuning, "projector": {"type": "pixel_shuffle", "place_words": True}}
        config = run_config(run, shared_tokenizer[1], llm_dir, steps=2, model=model,
                            data={"task": "qa", "heldout_samples": 4}, deepspeed={"config": stage})
        torchrun(script, config, timeout=240, env=launch_env(OMP_NUM_THREADS="1"))
        ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2]
        assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 2
        assert all(v == v and v < 1e3 for v in ranks[0]["losses"].values())
        first_losses.append(ranks[0]["losses"]["1"])
        trainable = ranks[0]["trainable"]
        assert any(n.startswith("projector.") for n in trainable)
        assert not any(n.startswith("encoder.") for n in trainable)
        export = Path(ranks[0]["export"])
        if tuning == "lora":
            assert all(n.startswith("projector.") or "lora_" in n for n in trainable)
            assert (export / "lora" / "adapter_model.safetensors").is_file()
        else:
            assert (export / "llm" / "model.safetensors").is_file()
        model = UniFlowChat.from_pretrained(export)
        assert isinstance(model.generate([(None, "hi")], max_new_tokens=2)[0], str)
    assert first_losses == pytest.approx([first_losses[0]] * len(first_losses), rel=1e-5)
