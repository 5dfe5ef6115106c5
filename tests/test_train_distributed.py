"""Real DeepSpeed jobs in subprocesses: 2 processes under torchrun (gloo) at ZeRO-2 and ZeRO-3, and a single process
with no launcher that is SIGKILLed after a checkpoint and resumed to the same losses."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, launch_env, torchrun
from uniflow import UniFlowTokenizer

TINY = {
    "kind": "tokenizer", "steps": 4, "batch_size": 8, "seed": 3,
    "model": {"preset": "tiny",
              "encoder": {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "image_size": 32},
              "decoder": {"global_depth": 1, "global_heads": 2, "head_width": 32, "head_depth": 1}},
    "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "constant"},
    "data": {"source": "shapeworld", "image_size": 32, "num_samples": 64, "heldout_samples": 4},
    "ema": {"enabled": True, "decay": 0.9},
    "log": {"every": 1, "progress": False},
    "checkpoint": {"every": 2},
    "export": {"enabled": True},
}

# Runs `train` under torchrun, then records what each rank sees: its losses, a checksum of the full (gathered)
# weights, how many parameter elements it stores locally (after training, and right after the model was built, before
# deepspeed.initialize), and whether the sharded EMA gathers to the live weights.
DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from train.config import build_config
    from train.distributed import shutdown_distributed
    from train.ema import EMA
    from train.engine import train
    from train.export import consolidated_state_dict

    config = build_config(json.loads(sys.argv[1]), "driver")
    result = train(config, resume=sys.argv[2] if len(sys.argv) > 2 else None)
    module = result.engine.module
    params = list(module.parameters())
    zero3 = hasattr(params[0], "ds_tensor")
    local = sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params)
    full = sum(p.ds_numel if zero3 else p.numel() for p in params)
    state = consolidated_state_dict(module, zero3, is_main=True)
    checksum = sum(float(v.double().sum()) for v in state.values())
    probe = EMA(module, decay=0.0, partitioned=zero3)
    probe.update()
    gathered = probe.full_state()
    ema_ok = all(torch.equal(gathered[n], state[n].float()) for n in gathered)
    losses = {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}
    out = {"rank": result.dist.rank, "world": result.dist.world_size, "losses": losses, "checksum": checksum,
           "local_numel": local, "full_numel": full, "ema_gathers": ema_ok, "built": list(result.built_numel)}
    Path(config.run_dir, f"rank{result.dist.rank}.json").write_text(json.dumps(out))
    shutdown_distributed()
''')


def _ranks(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_zero2_and_zero3_agree_and_zero3_partitions(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    runs = {}
    for name in ("zero2", "zero3"):
        config = {**TINY, "run_dir": str(tmp_path / name),
                  "deepspeed": {"config": name,
                                # Small persistence threshold: the tiny model's matrices are partitioned, its biases
                                # and norms stay whole (both code paths are exercised).
                                "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 100}}}}
        torchrun(script, config)
        runs[name] = _ranks(tmp_path / name)

    for name, (r0, r1) in runs.items():
        assert r0["world"] == 2 and r0["losses"] == r1["losses"], name  # all-reduced logs agree
        assert r0["checksum"] == r1["checksum"], name  # same weights on both ranks
        assert r0["ema_gathers"] and r1["ema_gathers"], name
        assert len(r0["losses"]) == TINY["steps"]
    z2, z3 = runs["zero2"][0], runs["zero3"][0]
    assert z2["local_numel"] == z2["full_numel"]
    for rank in runs["zero3"]:  # each rank stores about half of the parameters
        assert rank["local_numel"] < 0.75 * rank["full_numel"]
        # ... already when the model is built (inside deepspeed.zero.Init): it is never whole on one rank.
        built_local, built_full = rank["built"]
        assert built_full == rank["full_numel"] and built_local < 0.75 * built_full
    assert z2["built"] == [z2["full_numel"], z2["full_numel"]]  # ZeRO-2 builds whole models
    assert sum(r["local_numel"] for r in runs["zero3"]) >= z3["full_numel"]
    # ZeRO-3 computes the same training as ZeRO-2.
    for step, loss in z2["losses"].items():
        assert z3["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert z3["checksum"] == pytest.approx(z2["checksum"], rel=1e-5)

    # The ZeRO-3 export is consolidated from the shards (EMA weights, the tokenizer's default) and loads.
    a = load_file(str(tmp_path / "zero2" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "zero3" / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    UniFlowTokenizer.from_pretrained(tmp_path / "zero3" / "export")

    # Resuming the ZeRO-3 run from its step-2 checkpoint (sharded optimizer and EMA) gives the same steps 3-4.
    resumed_dir = tmp_path / "zero3_resumed"
    shutil.copytree(tmp_path / "zero3", resumed_dir)
    config = {**TINY, "run_dir": str(resumed_dir),
              "deepspeed": {"config": "zero3",
                            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 100}}}}
    torchrun(script, config, str(resumed_dir / "checkpoints" / "step_0000002"))
    resumed = _ranks(resumed_dir)[0]
    assert set(resumed["losses"]) == {"3", "4"}
    for step in ("3", "4"):
        assert resumed["losses"][step] == pytest.approx(z3["losses"][step], abs=1e-6)
    c = load_file(str(resumed_dir / "export" / "model.safetensors"))
    assert max((b[k] - c[k]).abs().max().item() for k in b) < 1e-6


def _train_cmd(config_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "train", "tokenizer", "--config", str(config_file), *args]


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """A single process with no launcher; the killed run is told to run 'forever' (constant lr, so the schedule does
    not depend on the step count) and is SIGKILLed once a checkpoint exists."""
    config = {**TINY, "steps": 12, "checkpoint": {"every": 4}, "export": {"enabled": False},
              "deepspeed": {"config": "zero0"}, "data": {**TINY["data"], "num_samples": 40}}  # 40: epochs wrap
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = launch_env()
    reference = subprocess.Popen(_train_cmd(config_file, f"run_dir={tmp_path / 'ref'}"), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "killed"
    victim = subprocess.Popen(_train_cmd(config_file, f"run_dir={run_dir}", "steps=1000000"), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "checkpoints" / "step_0000004"
    deadline = time.monotonic() + 120
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert first.exists(), "the run never wrote its first checkpoint"
    assert victim.returncode == -signal.SIGKILL

    resumed = subprocess.run(_train_cmd(config_file, f"run_dir={run_dir}", "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err[-4000:]

    expected, got = _train_losses(tmp_path / "ref"), _train_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    ref_ckpt = tmp_path / "ref" / "checkpoints" / "step_0000012" / "ds" / "state" / "mp_rank_00_model_states.pt"
    got_ckpt = run_dir / "checkpoints" / "step_0000012" / "ds" / "state" / "mp_rank_00_model_states.pt"
    ref_state = torch.load(ref_ckpt, weights_only=False)["module"]
    got_state = torch.load(got_ckpt, weights_only=False)["module"]
    for key, value in ref_state.items():
        assert torch.allclose(value, got_state[key], atol=1e-6), key


@pytest.mark.slow
def test_zero3_offload_single_process(tmp_path: Path) -> None:
    """The shipped offload config trains (torch AdamW on the CPU-offloaded partitions) and exports."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "steps": 2, "checkpoint": {"every": 0}}))
    run_dir = tmp_path / "offload"
    proc = subprocess.run(_train_cmd(config_file, f"run_dir={run_dir}", "deepspeed.config=zero3_offload"), cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZeRO-3" in proc.stderr and sorted(_train_losses(run_dir)) == [1, 2]
    UniFlowTokenizer.from_pretrained(run_dir / "export")


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("kind: tokenizer\noptim: {lr: 1e-3, warmup: 5}\n")
    proc = subprocess.run(_train_cmd(config_file), cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "'warmup'" in proc.stderr and "Traceback" not in proc.stderr
