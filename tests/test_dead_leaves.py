"""Dead-leaves images, the tokenizer's stand-in for photographs: deterministic, photograph-like statistics, mixed into
training only and beside the procedural share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import ImageDataConfig, MixedImageDataset, build_dataset
from uniflow.data.dead_leaves import DeadLeavesDataset, render_dead_leaves
from uniflow.data.procedural import ProceduralDataset
from uniflow.errors import ConfigError


def test_images_are_a_pure_function_of_seed_and_index() -> None:
    a = render_dead_leaves(0, 5)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, render_dead_leaves(0, 5))
    assert not torch.equal(a, render_dead_leaves(1, 5)) and not torch.equal(a, render_dead_leaves(0, 6))
    assert render_dead_leaves(0, 3, size=32).shape == (3, 32, 32)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    item = DeadLeavesDataset(10)[4]
    assert item["label"] == -1 and item["index"] == 4 and torch.equal(item["image"], render_dead_leaves(0, 4))
    with pytest.raises(IndexError):
        DeadLeavesDataset(10)[10]


def _spectrum_slope(images: torch.Tensor) -> float:
    """Slope of log power against log spatial frequency of the mean luminance spectrum (photographs: about -2)."""
    luma = images.mean(dim=1).numpy()
    luma = luma - luma.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(luma)) ** 2).mean(axis=0)
    freq = np.fft.fftfreq(luma.shape[-1])
    radius = np.hypot(freq[:, None], freq[None, :])
    keep = (radius > 2 / luma.shape[-1]) & (radius < 0.4)
    return float(np.polyfit(np.log(radius[keep]), np.log(power[keep]), 1)[0])


def _varying_patches(images: torch.Tensor) -> float:
    """Share of 8x8 patches whose pixels vary (std > 0.02): texture inside regions, not flat fields."""
    return float((images.unfold(2, 8, 8).unfold(3, 8, 8).std(dim=(-1, -2)).mean(dim=1) > 0.02).float().mean())


def test_statistics_are_those_of_photographs_not_of_flat_primitives() -> None:
    from eval.generalisation import photo_images

    leaves = torch.stack([render_dead_leaves(0, i) for i in range(48)])
    photos = photo_images(64)
    procedural = torch.stack([ProceduralDataset(48)[i]["image"] for i in range(48)])
    # scale invariance: power falls off with frequency as in the photographs (white noise: 0; measured here -2.96
    # against the photographs' -2.83)
    assert abs(_spectrum_slope(leaves) - _spectrum_slope(photos)) < 0.4
    # texture inside regions: patches vary about as often as the photographs' (0.98 vs 0.87), far more than in the
    # procedural primitives (0.42)
    assert _varying_patches(leaves) > _varying_patches(photos) - 0.1
    assert _varying_patches(leaves) > _varying_patches(procedural) + 0.3
    # colours span dark to bright
    means = leaves.mean(dim=(2, 3))
    assert float(means.min()) < 0.25 and float(means.max()) > 0.6


def test_the_mix_replaces_both_shares_in_training_only() -> None:
    config = ImageDataConfig(source="shapeworld", num_samples=400, heldout_samples=20, procedural_share=0.25,
                             dead_leaves_share=0.25)
    train = build_dataset(config)
    assert isinstance(train, MixedImageDataset)
    sources = [train.source(i) for i in range(400)]
    assert 60 <= sources.count("procedural") <= 140 and 60 <= sources.count("dead_leaves") <= 140
    leaf = sources.index("dead_leaves")
    item = train[leaf]
    assert item["label"] == -1 and torch.equal(item["image"], render_dead_leaves(0, leaf))
    assert train[sources.index("base")]["label"] >= 0
    # the procedural items are the ones a procedural-only mix picks: adding dead leaves keeps that recipe's images
    alone = build_dataset(ImageDataConfig(source="shapeworld", num_samples=400, procedural_share=0.25))
    assert [alone.is_procedural(i) for i in range(400)] == [s == "procedural" for s in sources]
    assert not isinstance(build_dataset(config, heldout=True), MixedImageDataset)
    only_leaves = build_dataset(ImageDataConfig(source="shapeworld", num_samples=40, dead_leaves_share=0.5))
    assert isinstance(only_leaves, MixedImageDataset) and "procedural" not in {only_leaves.source(i) for i in range(40)}


def test_shares_are_checked_and_refused_where_labels_are_needed(tmp_path) -> None:
    with pytest.raises(ConfigError, match="dead_leaves_share"):
        ImageDataConfig(dead_leaves_share=1.5)
    with pytest.raises(ConfigError, match="procedural_share \\+ data.dead_leaves_share must be at most 1"):
        ImageDataConfig(procedural_share=0.6, dead_leaves_share=0.6)
    from train.config import load_config
    from train.registry import get_task

    config = load_config("train/configs/encoder_tiny.yaml", [f"run_dir={tmp_path / 'run'}",
                                                              "data.dead_leaves_share=0.2"])
    with pytest.raises(ConfigError, match="dead_leaves_share: the encoder task trains on labels.*expected 0"):
        get_task("encoder")(config)
    config = load_config("train/configs/generator_tiny.yaml", [f"run_dir={tmp_path / 'gen'}",
                                                                "data.procedural_share=0.1"])
    with pytest.raises(ConfigError, match="procedural_share: the generator task trains on labels"):
        get_task("generator")(config)
