"""The generalisation set: deterministic, drawn by code separate from ShapeWorld's renderer, and what it says it is."""

import ast
from pathlib import Path

import pytest
import torch

from eval import generalisation as gen
from uniflow.errors import ConfigError


def test_flat_images_are_flat_and_include_black_white_grey():
    flat = gen.flat_images(16)
    assert flat.shape == (len(gen.FLAT_COLOURS), 3, 16, 16)
    assert (flat.amax((2, 3)) == flat.amin((2, 3))).all()  # one colour per image
    colours = {tuple(round(v * 255) for v in img[:, 0, 0].tolist()) for img in flat}
    assert {(0, 0, 0), (255, 255, 255), (128, 128, 128)} <= colours


def test_hard_edge_images_are_deterministic_hard_edged_and_on_flat_backgrounds():
    a, b = gen.hard_edge_images(6, 32, seed=1), gen.hard_edge_images(6, 32, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, gen.hard_edge_images(6, 32, seed=2))
    assert a.shape == (6, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    for image in a:
        pixels = (image * 255).round().to(torch.int64).flatten(1).T
        colours, counts = pixels.unique(dim=0, return_counts=True)
        assert len(colours) <= 5  # background + at most 4 shapes: aliased edges, no blended pixels
        background = tuple(colours[counts.argmax()].tolist())
        corner = tuple(pixels[0].tolist())
        assert background in gen.BACKGROUNDS or corner in gen.BACKGROUNDS
    with pytest.raises(ConfigError, match="count"):
        gen.hard_edge_images(0)


def test_synthetic_set_is_flat_then_hard_edges():
    synthetic = gen.synthetic_images(32, seed=0, hard_edges=3)
    assert torch.equal(synthetic[:len(gen.FLAT_COLOURS)], gen.flat_images(32))
    assert torch.equal(synthetic[len(gen.FLAT_COLOURS):], gen.hard_edge_images(3, 32, seed=0))


def test_photos_go_through_the_projects_preprocessing():
    pytest.importorskip("skimage")
    from PIL import Image
    from skimage import data

    from uniflow.images import preprocess

    photos = gen.photo_images(32, names=("astronaut", "camera"))
    assert photos.shape == (2, 3, 32, 32)
    assert torch.equal(photos[0], preprocess(Image.fromarray(data.astronaut()), 32))
    assert torch.equal(photos[1][0], photos[1][1])  # the grey photograph becomes grey RGB
    assert photos.std((2, 3)).min() > 0.05  # real content, not a flat image
    with pytest.raises(ConfigError, match="not in skimage.data"):
        gen.photo_images(32, names=("no_such_photo",))


def test_drawn_by_code_separate_from_the_renderer():
    tree = ast.parse(Path(gen.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("shapeworld" in (name or "") for name in imported)
