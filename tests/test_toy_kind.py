"""A third model kind written here only (a task, a padding collate function, a tiny model), registered at test time:
it trains under ZeRO-0 and ZeRO-2 with no change to the engine, which proves the hooks suffice. The same toy checks the
engine's guards: a non-finite loss stops the run, an existing run folder needs --resume, the export folder is checked
before training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from train.config import build_config
from train.engine import TrainingDiverged, train
from train.optim import ParamGroup
from train.registry import KINDS, register_task
from train.tasks import EvalContext, Task, heldout_batches
from uniflow.configs import check_number
from uniflow.errors import OutputError
from uniflow.fileio import atomic_write_dir

PAD = 0


@dataclass
class ToyData:
    sequences: int = 48
    max_len: int = 9
    vocab: int = 11
    group_by_length: int = 0

    def __post_init__(self) -> None:
        check_number("max_len", self.max_len, 2, None)


@dataclass
class ToyModel:
    width: int = 16
    nan_at_call: int = 0  # > 0: the loss becomes NaN from that forward call on


class Sequences(Dataset):
    """Counting sequences of varying length: 1 2 3 ..., starting anywhere (next token = this one + 1)."""

    def __init__(self, config: ToyData, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(config.sequences):
            length = int(torch.randint(2, config.max_len + 1, (), generator=g))
            start = int(torch.randint(1, config.vocab - length + 1, (), generator=g))
            self.items.append(list(range(start, start + length)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> list[int]:
        return self.items[index]


class TinyLM(nn.Module):
    def __init__(self, vocab: int, config: ToyModel) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.width)
        self.head = nn.Linear(config.width, vocab)
        self.nan_at_call = config.nan_at_call
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "loss") -> Any:
        tokens, mask = batch["tokens"], batch["mask"]
        logits = self.head(self.embed(tokens[:, :-1]))
        keep = mask[:, 1:].bool()
        loss = F.cross_entropy(logits[keep], tokens[:, 1:][keep])
        self.calls += 1
        if self.nan_at_call and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "metrics": {"loss": loss.detach()}}

    @torch.no_grad()
    def generate(self, first: torch.Tensor, steps: int) -> torch.Tensor:
        out = [first]
        for _ in range(steps):
            out.append(self.head(self.embed(out[-1])).argmax(-1))
        return torch.stack(out, dim=1)


class ToyTask(Task):
    kind = "toy"
    data_config = ToyData
    count_unit = "tokens"
    export_kind = "toy-lm"

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        self.model_config = self.section("model", ToyModel)
        self.padded_tokens = 0  # what the collated batches hold, padding included

    def build_model(self) -> nn.Module:
        return TinyLM(self.data.vocab, self.model_config)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        return Sequences(self.data, 0), Sequences(self.data, 1)

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence of the batch, with a mask of the real tokens."""
        longest = max(len(x) for x in items)
        tokens = torch.full((len(items), longest), PAD)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for i, seq in enumerate(items):
            tokens[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        self.padded_tokens += tokens.numel()
        return {"tokens": tokens, "mask": mask}

    def batch_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def item_length(self, item: list[int]) -> int:
        return len(item)

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("embed", list(model.embed.named_parameters(prefix="embed")), lr_scale=0.5),
                ParamGroup("head", list(model.head.named_parameters(prefix="head")))]

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        losses = [float(ctx.forward(batch)["loss"]) for batch, _ in
                  heldout_batches(ctx.heldout, 16, ctx.batch_size, ctx.dist, ctx.collate)]
        with ctx.gathered():  # the unwrapped module's own method
            counted = ctx.module.generate(torch.tensor([3]), 3)[0].tolist()
        return {"heldout_loss": sum(losses) / len(losses), "counts_on": float(counted == [3, 4, 5, 6])}

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({"model_kind": self.export_kind, **metrics}))

        return atomic_write_dir(out_dir, write)


@pytest.fixture(autouse=True)
def _toy_kind() -> Any:
    register_task("toy", ToyTask, "train a toy counting language model")
    yield
    KINDS.pop("toy", None)


def toy(run_dir: Path, **sections: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "toy", "run_dir": str(run_dir), "steps": 30, "batch_size": 8, "seed": 1,
        "optim": {"lr": 0.05, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.01},
        "log": {"every": 5, "progress": False},
        "checkpoint": {"every": 10},
    }
    data.update(sections)
    return build_config(data, f"{run_dir.name}.yaml")


def train_losses(result: Any) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}


def test_toy_kind_trains_under_zero0_and_zero2_through_the_hooks(tmp_path: Path) -> None:
    runs = {stage: train(toy(tmp_path / stage, deepspeed={"config": stage})) for stage in ("zero0", "zero2")}
    z0, z2 = runs["zero0"], runs["zero2"]
    losses = train_losses(z0)
    assert losses[30] < 0.5 * losses[5]  # it learns to count
    assert train_losses(z2) == pytest.approx(losses, rel=1e-4)
    row = next(r for r in z0.history if r["kind"] == "train")
    assert row["tokens_per_s"] > 0 and "images_per_s" not in row  # the task's own unit
    assert row["lr_embed"] == pytest.approx(0.5 * row["lr_head"])  # its own groups and their lrs
    final = [r for r in z0.history if r["kind"] == "eval"][-1]
    assert final["counts_on"] == 1.0  # evaluated through ctx.module.generate
    groups = {g["name"]: g["base_lr"] for g in z0.engine.optimizer.param_groups}
    assert groups == pytest.approx({"embed": 0.025, "head": 0.05, "head/no_decay": 0.05})
    assert json.loads((z0.export_dir / "config.json").read_text())["model_kind"] == "toy-lm"
    assert (z2.run_dir / "checkpoints" / "step_0000030").is_dir()


def test_non_finite_loss_stops_at_once_naming_the_step_and_the_last_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"step 13: the training loss is not finite.*nothing was exported; "
                                               r"last good checkpoint: .*nan/checkpoints/step_0000010"):
        train(toy(run_dir, model={"nan_at_call": 13}))
    assert not (run_dir / "export").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_0000010"]
    with pytest.raises(TrainingDiverged, match=r"step [0-9]+: the training loss is not finite.*checkpoint: none"):
        train(toy(tmp_path / "huge_lr", optim={"lr": 1e30, "warmup_steps": 0}))  # finite, and diverges


def test_existing_run_and_bad_export_folders_are_refused_before_training(tmp_path: Path) -> None:
    first = train(toy(tmp_path / "run", steps=2))
    with pytest.raises(OutputError, match=r"run_dir: .*run already holds a run \(checkpoints and metrics\.jsonl\); "
                                          r"continue it with --resume, or choose a new run_dir"):
        train(toy(tmp_path / "run", steps=4))
    assert train(toy(tmp_path / "run", steps=4), resume=True).state.step == 4
    for dest in (tmp_path / "new", tmp_path, tmp_path / "new" / "checkpoints" / "x"):
        with pytest.raises(OutputError, match=r"export\.dir: .* would overwrite the run folder"):
            train(toy(tmp_path / "new", steps=2, export={"dir": str(dest)}))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"export\.dir: .*notes is not empty and holds files that are not a "
                                          r"checkpoint"):
        train(toy(tmp_path / "new", steps=2, export={"dir": str(other)}))
    assert not (tmp_path / "new" / "checkpoints").exists()  # refused before any training
    # An export of the same kind is replaced.
    again = train(toy(tmp_path / "new", steps=2, export={"dir": str(first.export_dir)}))
    assert again.export_dir == first.export_dir and (first.export_dir / "model.safetensors").is_file()


def test_length_grouped_batches_pad_less_and_resume_exactly_from_inside_a_group(tmp_path: Path) -> None:
    """48 sequences, micro-batches of 4, groups of 3 micro-batches: the step-7 checkpoint lies inside a group (
    28 samples into the first epoch), and the resumed run must log the uninterrupted run's losses."""
    def config(name: str, group: int) -> Any:
        return toy(tmp_path / name, steps=20, batch_size=4, log={"every": 1, "progress": False},
                   checkpoint={"every": 7, "keep_last": 4}, data={"group_by_length": group})

    grouped = train(config("grouped", 3))
    plain = train(config("plain", 0))
    assert grouped.state.epoch == plain.state.epoch == 1
    assert grouped.task.padded_tokens < 0.9 * plain.task.padded_tokens  # the same samples, less padding
    again = train(config("grouped", 3), resume=tmp_path / "grouped" / "checkpoints" / "step_0000007")
    first, resumed = train_losses(grouped), train_losses(again)
    assert sorted(resumed) == list(range(8, 21))
    assert resumed == pytest.approx({k: first[k] for k in resumed}, rel=1e-6)
    assert train_losses(plain) != pytest.approx(first, rel=1e-6)  # the grouping did change the batches
