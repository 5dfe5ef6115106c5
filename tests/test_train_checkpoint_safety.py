"""Resuming is safe: no code runs from a checkpoint's pickles, damaged files give one-line errors naming them, and
the temporaries of an unfinished save are never resumed from. In-process, ZeRO-0, tiny encoder runs."""

from __future__ import annotations

import fractions
import json
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_train_engine import tiny
from train import checkpointing
from train.engine import train
from uniflow.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:.*pretrained is not set", "ignore:model.num_classes is not set")

EMA = {"enabled": True, "decay": 0.5}
MODEL_FILE = "ds/state/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 2-step encoder run with EMA and one checkpoint (step 2); tests damage copies of it."""
    return train(tiny(tmp_path_factory.mktemp("safety") / "run", "encoder", steps=2, ema=EMA))


def copy_run(run: Any, dest: Path) -> Path:
    shutil.copytree(run.run_dir, dest)
    return dest


def step2(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_0000002"


class Planted:
    """Unpickling this creates `marker`: stands for any code a tampered checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_planted_pickle_does_not_run_on_resume(run: Any, tmp_path: Path, writer: str) -> None:
    run_dir = copy_run(run, tmp_path / "run")
    marker = tmp_path / "marker"
    target = step2(run_dir) / MODEL_FILE
    payload = {"module": Planted(marker)}
    if writer == "torch.save":
        torch.save(payload, target)
    else:
        target.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as err:
        train(tiny(run_dir, "encoder", ema=EMA), resume=True)
    assert re.search(rf"^{re.escape(str(target))}: refusing to unpickle (io|builtins)\.open ", one_line(err))
    assert "--trust-checkpoint" in str(err.value)
    assert not marker.exists()


def test_the_cli_refuses_a_planted_pickle_in_one_line(run: Any, tmp_path: Path) -> None:
    run_dir = copy_run(run, tmp_path / "run")
    marker = tmp_path / "marker"
    torch.save({"module": Planted(marker)}, step2(run_dir) / MODEL_FILE)
    command = ["train", "encoder", "--config", str(run_dir / "config.yaml"), f"run_dir={run_dir}", "--resume"]
    proc = subprocess.run([sys.executable, "-m", "app.cli", *command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert re.match(r"error: .*mp_rank_00_model_states\.pt: refusing to unpickle (io|builtins)\.open", errors[0])
    assert not marker.exists()


def test_trust_checkpoint_skips_the_check(run: Any, tmp_path: Path) -> None:
    """A harmless non-tensor object (a Fraction) in DeepSpeed's file: refused by default, loaded when trusted."""
    run_dir = copy_run(run, tmp_path / "run")
    target = step2(run_dir) / MODEL_FILE
    state = torch.load(target, weights_only=False)
    state["note"] = fractions.Fraction(1, 3)
    torch.save(state, target)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle fractions\.Fraction"):
        train(tiny(run_dir, "encoder", ema=EMA), resume=True)
    resumed = train(tiny(run_dir, "encoder", ema=EMA), resume=True, trust_checkpoint=True)
    assert resumed.state.step == 4


def test_written_checkpoints_pass_the_check(run: Any) -> None:
    checkpointing.verify_checkpoint_files(step2(run.run_dir))  # DeepSpeed's files and our RNG file alike
    rng = next((step2(run.run_dir) / "rng").iterdir())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(rng)) == []


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a checkpoint\n" * 10)


def _edit_state(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str, bool]] = {
    # case: (file in the checkpoint, damage, expected message, trust_checkpoint)
    "model_truncated": (MODEL_FILE, _truncate, r"mp_rank_00_model_states\.pt: damaged or not a checkpoint", False),
    "model_garbage": (MODEL_FILE, _garbage, r"mp_rank_00_model_states\.pt: damaged or not a checkpoint", False),
    "model_truncated_trusted": (MODEL_FILE, _truncate, r"/ds: DeepSpeed could not load it", True),
    "ema_missing": ("ema/rank_00000.safetensors", Path.unlink, r"rank_00000\.safetensors: EMA weights missing",
                    False),
    "ema_truncated": ("ema/rank_00000.safetensors", _truncate, r"rank_00000\.safetensors: damaged EMA file", False),
    "ema_garbage": ("ema/rank_00000.safetensors", _garbage, r"rank_00000\.safetensors: damaged EMA file", False),
    "rng_garbage": ("rng/rank_00000.pt", _garbage, r"rng/rank_00000\.pt: damaged or not a checkpoint", False),
    "rng_garbage_trusted": ("rng/rank_00000.pt", _garbage, r"rng/rank_00000\.pt: damaged random-state file", True),
    "rng_wrong_content": ("rng/rank_00000.pt", lambda p: torch.save({"python": 1}, p),
                          r"rng/rank_00000\.pt: damaged random-state file", False),
    "state_not_json": ("trainer_state.json", _garbage, r"trainer_state\.json: unreadable trainer state", False),
    "state_list": ("trainer_state.json", _edit_state(lambda d: [d]), r"trainer_state\.json: expected a JSON object",
                   False),
    "state_no_step": ("trainer_state.json", _edit_state(lambda d: {k: v for k, v in d.items() if k != "step"}),
                      r"trainer_state\.json: field 'step' must be a non-negative integer, got None", False),
    "state_bad_position": ("trainer_state.json", _edit_state(lambda d: {**d, "position": "3"}),
                           r"trainer_state\.json: field 'position' must be a non-negative integer", False),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_gives_one_line_naming_the_file(run: Any, tmp_path: Path, case: str) -> None:
    name, damage, message, trust = DAMAGE[case]
    folder = tmp_path / "step_0000002"
    shutil.copytree(step2(run.run_dir), folder)
    damage(folder / name)
    with pytest.raises(CheckpointError, match=message) as err:
        checkpointing.load_checkpoint(run.engine, folder, "encoder", run.dist, 0, run.ema, trust_checkpoint=trust)
    assert str(folder) in one_line(err)


@pytest.mark.parametrize("target", ["../../elsewhere", "/tmp", "step_0000002/../../x", ".step_0000002.tmp"])
def test_latest_may_only_name_a_step_folder_inside(run: Any, tmp_path: Path, target: str) -> None:
    run_dir = copy_run(run, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text(target + "\n")
    with pytest.raises(CheckpointError, match=r"checkpoints/latest: names .* expected a step_NNNNNNN folder") as err:
        checkpointing.find_checkpoint(run_dir)
    one_line(err)


def test_temporaries_of_an_unfinished_save_are_never_resumed(run: Any, tmp_path: Path) -> None:
    run_dir = copy_run(run, tmp_path / "run")
    root = run_dir / "checkpoints"
    for stale in (".step_0000009.tmp", ".step_0000002.old"):  # complete-looking, as a killed save leaves them
        shutil.copytree(root / "step_0000002", root / stale)
    assert checkpointing.find_checkpoint(run_dir) == root / "step_0000002"
    (root / "latest").unlink()
    assert checkpointing.find_checkpoint(run_dir) == root / "step_0000002"
    with pytest.raises(CheckpointError, match=r"\.step_0000009\.tmp: a temporary folder of an unfinished save"):
        checkpointing.find_checkpoint(root / ".step_0000009.tmp")
    resumed = train(tiny(run_dir, "encoder", ema=EMA), resume=True)
    assert resumed.state.step == 4
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
