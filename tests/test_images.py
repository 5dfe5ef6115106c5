"""The one image loader and the one preprocessing: training data and inference see identical tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer
from uniflow.images import open_image, preprocess, to_batch


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_training_and_inference_preprocess_identically(tmp_path: Path) -> None:
    from train.data import ImageFolderDataset

    (tmp_path / "data" / "cls").mkdir(parents=True)
    path = _photo(tmp_path / "data" / "cls" / "a.png", 100, 80)
    training = ImageFolderDataset(tmp_path / "data", image_size=64)[0]["image"]
    assert training.shape == (3, 64, 64)

    config = tiny_tokenizer_config(image_size=64)
    tokenizer = UniFlowTokenizer(config).eval()
    inference = tokenizer.prepare(open_image(path), resize=True)[0]
    assert torch.equal(tokenizer.encoder.normalize(training[None])[0], inference)
    assert torch.equal(to_batch(open_image(path), size=64)[0], training)


def test_large_images_are_box_reduced_before_the_float_resize(tmp_path: Path) -> None:
    image = Image.open(_photo(tmp_path / "big.png", 1000, 600))
    out = preprocess(image, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # the reduction only drops detail the 64 px output cannot hold: close to a direct float resize
    direct = to_batch(image)[0]
    from uniflow.images import resize_center_crop

    assert (resize_center_crop(direct[None], 64)[0] - out).abs().mean() < 0.02


def test_mixed_sizes_share_a_batch_with_resize() -> None:
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (32, 64), 128)]
    batch = to_batch(images, size=32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0, 0], torch.ones(32, 32)) and torch.allclose(batch[1], torch.full((3, 32, 32),
                                                                                                   128 / 255))
