"""Frozen parameters (here the tokenizer's distillation teacher) stay out of training checkpoints, and a resumed run
takes them from the freshly built model and reaches the same losses as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_train_engine import losses, tiny
from train import checkpointing
from train.engine import seed_all, train
from train.metrics_log import read_metrics
from uniflow.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:.*pretrained is not set", "ignore:model.num_classes is not set")

MODEL_FILE = "ds/state/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An uninterrupted 4-step tokenizer run (teacher attached, checkpoints at steps 2 and 4)."""
    return train(tiny(tmp_path_factory.mktemp("frozen") / "full"))


def frozen_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def test_checkpoints_leave_frozen_parameters_out(full: Any, tmp_path: Path) -> None:
    module = full.engine.module
    frozen = frozen_names(module)
    frozen_numel = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    assert frozen and frozen_numel > 0  # the teacher
    folder = full.run_dir / "checkpoints" / "step_0000004"
    saved = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    assert not frozen & set(saved)
    assert {n for n, p in module.named_parameters() if p.requires_grad} <= set(saved)
    meta = json.loads((folder / "trainer_state.json").read_text())
    assert meta["frozen"]["count"] == frozen_numel

    # The same engine saved the DeepSpeed way (frozen included) is larger by about the frozen fp32 bytes.
    full.engine.save_checkpoint(str(tmp_path), tag="with_frozen", save_latest=False)
    with_frozen = (tmp_path / "with_frozen" / "mp_rank_00_model_states.pt").stat().st_size
    without = (folder / MODEL_FILE).stat().st_size
    assert with_frozen - without >= 0.9 * 4 * frozen_numel


def test_a_resumed_run_matches_the_uninterrupted_one(full: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "part"
    train(tiny(run_dir, steps=2))
    resumed = train(tiny(run_dir), resume=True)
    assert resumed.state.step == 4
    reference = losses(full.history)
    got = losses(read_metrics(run_dir))
    assert got.keys() == reference.keys()
    for step in reference:
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step
    seed_all(resumed.task.config.seed)
    fresh = resumed.task.build_model()
    built = dict(fresh.named_parameters())
    for name, p in resumed.engine.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach().cpu(), built[name].detach().cpu()), name


def test_a_differently_built_frozen_part_is_refused(full: Any, tmp_path: Path) -> None:
    folder = tmp_path / "step_0000002"
    shutil.copytree(full.run_dir / "checkpoints" / "step_0000002", folder)
    state_file = folder / "trainer_state.json"
    meta = json.loads(state_file.read_text())
    meta["frozen"]["sumsq"] *= 1.5  # as if the teacher had been built from other weights
    state_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: the frozen parameters of the model built now"):
        checkpointing.load_checkpoint(full.engine, folder, "tokenizer", full.dist, 0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_frozen_parameters_out_and_exact_resume_under_zero(full: Any, tmp_path: Path, stage: str) -> None:
    ds = {"config": stage}
    reference = train(tiny(tmp_path / "full", deepspeed=ds, checkpoint={"every": 0}))
    run_dir = tmp_path / "part"
    train(tiny(run_dir, steps=2, deepspeed=ds))
    resumed = train(tiny(run_dir, deepspeed=ds), resume=True)
    assert losses(read_metrics(run_dir)) == pytest.approx(losses(reference.history), abs=1e-6)
    frozen = frozen_names(resumed.engine.module)
    for path in (run_dir / "checkpoints" / "step_0000004" / "ds" / "state").glob("*model_states.pt"):
        with torch.serialization.safe_globals(checkpointing._safe_global_objects()):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        assert not frozen & set(saved["module"]) and saved.get("frozen_param_fragments") is None
