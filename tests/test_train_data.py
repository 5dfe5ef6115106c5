"""Training data (folders, `datasets` rows, the resumable sampler), EMA and checkpoint discovery, without DeepSpeed."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpointing
from train.data import (
    CachedDataset,
    HFImageDataset,
    ImageDataConfig,
    ImageFolderDataset,
    ResumableShardSampler,
    build_dataset,
    length_grouped,
    load_hf_rows,
)
from train.ema import EMA
from uniflow.errors import CheckpointError, ConfigError, ImageInputError


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ---------------------------------------------------------------------------------------------------------- sampler
def test_sampler_shards_cover_the_epoch_with_equal_lengths() -> None:
    shards = [ResumableShardSampler(10, rank=r, world_size=3, seed=1) for r in range(3)]
    for s in shards:
        s.set_epoch(0)
    lists = [list(s) for s in shards]
    assert [len(x) for x in lists] == [4, 4, 4]  # 10 samples padded to 12 by wrap-around
    assert set(sum(lists, [])) == set(range(10))
    shards[0].set_epoch(1)
    assert list(shards[0]) != lists[0]  # a new permutation each epoch
    shards[0].set_epoch(0)
    assert list(shards[0]) == lists[0]  # and the same one again for the same epoch


def test_sampler_resumes_mid_epoch_without_touching_global_rng() -> None:
    sampler = ResumableShardSampler(20, rank=1, world_size=2, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    state = torch.get_rng_state()
    sampler.set_epoch(3, start=6)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    assert torch.equal(state, torch.get_rng_state())


def test_length_grouped_batches_are_sorted_within_groups_and_resume_mid_group() -> None:
    lengths = [int(v) for v in torch.randint(1, 100, (40,), generator=torch.Generator().manual_seed(0))]
    groups = [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]  # the sampler's loads of micro * k

    def run(**kw: int) -> list[list[int]]:
        return list(length_grouped(iter(groups[kw.get("first_group", 0):]), 3, lengths.__getitem__, seed=1,
                                   epoch=2, **kw))

    batches = run()
    assert [len(b) for b in batches] == [3] * 12  # 5 + 5 + 2 batches; remainders under a micro-batch dropped
    for group, got in zip(groups, (batches[:5], batches[5:10], batches[10:])):
        by_length = sorted(group, key=lambda i: -lengths[i])
        kept = by_length[:len(got) * 3]
        assert sorted(i for b in got for i in b) == sorted(kept)  # the longest 3*n of the group, each once
        for b in got:  # a batch is a run of the sorted order: little padding
            assert sorted(b, key=lambda i: -lengths[i]) == kept[kept.index(max(b, key=lambda i: lengths[i])):][:3]
    assert [max(lengths[i] for i in b) for b in batches[:5]] != \
        sorted((max(lengths[i] for i in b) for b in batches[:5]), reverse=True)  # batch order shuffled
    assert run() == batches  # deterministic
    assert run(skip=2) == batches[2:]
    assert run(first_group=1, skip=4) == batches[9:]  # a resume from inside the second group
    other = list(length_grouped(iter(groups), 3, lengths.__getitem__, seed=1, epoch=3))
    assert other != batches and sorted(map(sorted, other)) == sorted(map(sorted, batches))


# ---------------------------------------------------------------------------------------------------- image folders
class _Items(torch.utils.data.Dataset):
    """Items of every kind a task returns, counting how often each index is loaded."""

    def __init__(self) -> None:
        self.loads: list[int] = []

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        self.loads.append(index)
        g = torch.Generator().manual_seed(index)
        return {"image": torch.randint(0, 256, (3, 8, 8), generator=g).float() / 255,  # exactly uint8 / 255
                "soft": torch.rand(4, 3, generator=g),  # not representable as uint8
                "ids": torch.randint(-5, 9, (5,), generator=g), "big": torch.tensor([index * 1000]),
                "label": index, "name": f"item {index}"}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_cached_dataset_returns_identical_items_compactly_within_its_budget() -> None:
    base = _Items()
    cached = CachedDataset(base, max_mb=1.0)
    first = [cached[i] for i in range(6)]
    again = [cached[i] for i in range(6)]
    assert base.loads == list(range(6))  # the second pass loaded nothing
    for a, b, fresh in zip(first, again, (base[i] for i in range(6))):
        _same(a, b)
        _same(fresh, b)
    raw = sum(v.numel() * v.element_size() for v in first[0].values() if isinstance(v, torch.Tensor))
    assert cached.bytes < 0.5 * 6 * raw  # the image as uint8, the small integers as int8
    again[0]["image"].zero_()  # what a caller does to an item never reaches the cache
    again[0]["soft"].zero_()
    _same(cached[0], first[0])
    # a budget smaller than one item: the first item is kept, the rest pass through
    small = CachedDataset(_Items(), max_mb=1e-6)
    [small[i] for i in range(6)] + [small[i] for i in range(6)]
    assert sorted(small.items) == [0] and small.base.loads == list(range(6)) + list(range(1, 6))
    assert len(small) == 6 and small.loads is small.base.loads  # the base's attributes show through


def test_cache_config_is_checked() -> None:
    assert ImageDataConfig(cache_mb=512).cache_mb == 512
    with pytest.raises(ConfigError, match="cache_mb"):
        ImageDataConfig(cache_mb=-1)
    with pytest.raises(ConfigError, match="cache_mb.*num_workers 0"):
        ImageDataConfig(cache_mb=512, num_workers=2)


def test_image_folder_skips_and_counts_unreadable_images(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _png(root / "cat" / "a.png", (255, 0, 0))
    _png(root / "cat" / "b.jpg", (0, 255, 0), (30, 40))
    _png(root / "dog" / "c.png", (0, 0, 255))
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 5.*broken\.png"):
        ds = ImageFolderDataset(root, image_size=16)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and len(ds.skipped) == 2
    item = ds[2]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 1
    assert item["image"][2].min() > 0.99 and item["image"][0].max() < 0.01  # blue, resized and cropped
    assert float(ds[1]["image"].min()) >= 0.0 and float(ds[1]["image"].max()) <= 1.0


def test_image_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path: data folder .*missing not found"):
        ImageFolderDataset(tmp_path / "missing", 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no images found in .*empty.*<class>/<image>"):
        ImageFolderDataset(tmp_path / "empty", 16)
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"garbage")
    (bad / "y.jpg").write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"all 2 images in .*bad are unreadable"):
        ImageFolderDataset(tmp_path / "bad", 16)


def test_build_dataset_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path: required"):
        build_dataset(ImageDataConfig(source="folder"))
    _png(tmp_path / "imgs" / "a" / "0.png", (10, 20, 30))
    ds = build_dataset(ImageDataConfig(source="folder", path=str(tmp_path / "imgs"), image_size=8))
    assert len(ds) == 1 and build_dataset(ImageDataConfig(source="folder", path=str(tmp_path / "imgs")), True) is None
    sw = build_dataset(ImageDataConfig(source="shapeworld", num_samples=5, image_size=32, heldout_samples=3))
    held = build_dataset(ImageDataConfig(source="shapeworld", heldout_samples=3, image_size=32), heldout=True)
    assert len(sw) == 5 and len(held) == 3 and sw[0]["image"].shape == (3, 32, 32)
    assert not torch.equal(sw[0]["image"], held[0]["image"])


def test_hf_rows_adapter(tmp_path: Path) -> None:
    rows = [{"img": Image.new("RGB", (20, 20), (255, 255, 255)), "y": 3},
            {"img": np.zeros((20, 20, 3), dtype=np.uint8), "y": 1}]
    ds = HFImageDataset(rows, image_size=8, image_key="img", label_key="y")
    assert ds[0]["label"] == 3 and ds[0]["image"].shape == (3, 8, 8) and float(ds[1]["image"].max()) == 0.0
    assert HFImageDataset(rows, 8, image_key="img", label_key="none")[0]["label"] == -1
    with pytest.raises(ConfigError, match=r"no column 'image' \(data\.image_key\)"):
        HFImageDataset(rows, 8)
    with pytest.raises(ConfigError, match="the dataset is empty"):
        HFImageDataset([], 8)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hf_source_without_datasets_package_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.path: .*needs the `datasets` package"):
        load_hf_rows("some/hub-name", "train")


# --------------------------------------------------------------------------------------------------------------- EMA
def test_ema_tracks_trainable_weights_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["0.weight"], start + 0.1)
    with ema.swapped_in():
        assert torch.allclose(model[0].weight, start + 0.1)
    assert torch.allclose(model[0].weight, start + 1.0)
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    full = ema.full_state()
    assert torch.equal(full["0.weight"], ema.shadow["0.weight"])


def test_ema_save_load_roundtrip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    ema.update()
    ema.save(tmp_path / "ema", rank=0)
    other = EMA(torch.nn.Linear(3, 3), decay=0.5)
    other.load(tmp_path / "ema", rank=0)
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(CheckpointError, match="EMA does not match"):
        EMA(torch.nn.Linear(3, 4), decay=0.5).load(tmp_path / "ema", rank=0)
    with pytest.raises(CheckpointError, match="EMA weights missing"):
        other.load(tmp_path / "nothing", rank=0)


# ------------------------------------------------------------------------------------------------- checkpoint finding
def test_find_checkpoint_errors_and_latest(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"--resume .*nowhere: no such folder"):
        checkpointing.find_checkpoint(tmp_path / "nowhere")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint found"):
        checkpointing.find_checkpoint(run)
    root = run / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:07d}" / "ds").mkdir(parents=True)
        (root / f"step_{step:07d}" / "trainer_state.json").write_text("{}")
    (root / ".step_0000006.tmp" / "ds").mkdir(parents=True)  # an interrupted save: ignored
    assert checkpointing.find_checkpoint(run).name == "step_0000004"
    (root / "latest").write_text("step_0000002\n")
    assert checkpointing.find_checkpoint(run).name == "step_0000002"
    assert checkpointing.find_checkpoint(root / "step_0000004").name == "step_0000004"
    checkpointing.clean_temporaries(run)
    assert not (root / ".step_0000006.tmp").exists()


def test_rng_state_roundtrip() -> None:
    state = checkpointing.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpointing.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
