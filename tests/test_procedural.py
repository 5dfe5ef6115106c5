"""The procedural training mix: deterministic, varied (flat, hard edges, any colour), mixed into training only."""

from __future__ import annotations

import pytest
import torch

from train.data import ImageDataConfig, MixedImageDataset, build_dataset
from uniflow.data.procedural import ProceduralDataset, render_procedural
from uniflow.errors import ConfigError


def test_images_are_pure_functions_of_seed_and_index() -> None:
    a, b = render_procedural(0, 5), render_procedural(0, 5)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, render_procedural(1, 5))
    assert not torch.equal(a, render_procedural(0, 6))
    assert render_procedural(0, 3, size=32).shape == (3, 32, 32)


def test_the_stream_covers_flat_fields_hard_edges_and_the_whole_colour_cube() -> None:
    images = torch.stack([render_procedural(0, i) for i in range(200)])
    assert images.min() >= 0 and images.max() <= 1
    per_image_std = images.flatten(2).std(dim=2).amax(dim=1)  # spatial spread, worst channel
    assert (per_image_std == 0).sum() >= 5, "some images are a single flat colour"
    # hard edges: an object boundary jumps between two colours with no blended pixel in between
    steps = (images[..., 1:] - images[..., :-1]).abs().amax(dim=1)
    assert (steps > 0.5).flatten(1).any(dim=1).sum() >= 20
    channel_means = images.mean(dim=(0, 2, 3))
    assert ((channel_means > 0.35) & (channel_means < 0.65)).all(), "colours are not biased to one channel"
    # black or white images appear (the extremes a patch decoder's bias shows on)
    means = images.mean(dim=(1, 2, 3))
    assert ((means < 0.02) | (means > 0.98)).any()


def test_mixed_dataset_replaces_about_the_share_and_only_in_training() -> None:
    config = ImageDataConfig(source="shapeworld", num_samples=400, heldout_samples=50, procedural_share=0.25)
    train = build_dataset(config)
    assert isinstance(train, MixedImageDataset) and len(train) == 400
    flags = [train.is_procedural(i) for i in range(400)]
    assert 60 <= sum(flags) <= 140
    first = flags.index(True)
    item = train[first]
    assert item["label"] == -1 and torch.equal(item["image"], ProceduralDataset(400)[first]["image"])
    other = flags.index(False)
    assert train[other]["label"] >= 0
    heldout = build_dataset(config, heldout=True)
    assert not isinstance(heldout, MixedImageDataset)
    plain = build_dataset(ImageDataConfig(source="shapeworld", num_samples=10))
    assert not isinstance(plain, MixedImageDataset)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_share_out_of_range_is_refused(share: float) -> None:
    with pytest.raises(ConfigError, match="procedural_share"):
        ImageDataConfig(procedural_share=share)


def test_the_encoder_task_refuses_label_free_images(tmp_path) -> None:
    from train.config import load_config
    from train.registry import get_task

    config = load_config("train/configs/encoder_tiny.yaml", [f"run_dir={tmp_path / 'run'}",
                                                              "data.procedural_share=0.2"])
    with pytest.raises(ConfigError, match="procedural_share.*expected 0"):
        get_task("encoder")(config)
