"""Procedural images of no particular world: the part of a tokenizer's training mix that is not ShapeWorld.

A decoder trained on one renderer's look learns that look: ShapeWorld has near-grey backgrounds, six saturated
colours and antialiased edges, and a tokenizer trained on it alone decodes a pure red or a one-pixel aliased edge
badly (24 dB on such images for the first bundle). These images teach what any picture is built from: flat fields of
any colour (black and white included), smooth gradients, low- and high-frequency texture, hard (aliased) and soft
(antialiased) edges of rectangles, ellipses, convex polygons and strokes, in colours drawn uniformly from the RGB
cube. They carry no label. `data.procedural_share` mixes them into the tokenizer's training set
(`train.data.MixedImageDataset`); held-out evaluation stays on the dataset's own images.

Drawn with numpy on pixel-centre coordinates (no PIL drawing, no ShapeWorld code), so the evaluation's generalisation
set (`eval/generalisation.py`, PIL primitives) is not a copy of what is trained on. Image `i` is a pure function of
`(seed, i)`, like ShapeWorld's samples, so data loading is resumable and order-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from uniflow.configs import check_int

_STREAM = 0x5EED  # separates this generator's random streams from every other user of (seed, index)
_SUPERSAMPLE = 4
_MAX_OBJECTS = 6


def _colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in [0, 1]: uniform over the cube, or (one time in four) a grey from black to white, extremes
    included, since flat black, white and grey are where a patch decoder's bias shows first."""
    if rng.random() < 0.25:
        level = rng.choice([0.0, 1.0]) if rng.random() < 0.4 else rng.random()
        return np.full(3, level, dtype=np.float32)
    return rng.random(3).astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) values in [0, 1]: a random `cells` x `cells` grid, bilinearly upsampled."""
    grid = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    up = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) in [0, 1]: flat, a linear gradient, smooth noise or fine texture between two colours."""
    kind = rng.choice(["flat", "flat", "gradient", "smooth", "texture"])
    a = _colour(rng)
    if kind == "flat":
        return np.broadcast_to(a, (size, size, 3)).copy()
    b = _colour(rng)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        y, x = np.meshgrid(coords, coords, indexing="ij")
        mix = np.clip((x * np.cos(angle) + y * np.sin(angle)) / 0.71 + 0.5, 0, 1)
    elif kind == "smooth":
        mix = _smooth_field(rng, size, int(rng.integers(2, 7)))
    else:
        cells = int(rng.integers(size // 8, size // 4 + 1))
        mix = _smooth_field(rng, size, cells)
        if rng.random() < 0.5:  # blocky texture: nearest-neighbour cells, hard steps between them
            idx = (np.arange(size) * cells) // size
            mix = rng.random((cells, cells)).astype(np.float32)[idx][:, idx]
    return a * (1 - mix[..., None]) + b * mix[..., None]


def _shape_mask(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of one random primitive evaluated at the points (x, y) (pixel units)."""
    kind = rng.choice(["rectangle", "ellipse", "polygon", "stroke"])
    cx, cy = rng.uniform(-0.1, 1.1, 2) * size
    angle = rng.uniform(0, np.pi) if rng.random() < 0.6 else 0.0  # axis-aligned edges are the hardest seams
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    half_w, half_h = rng.uniform(size / 32, size / 3, 2)
    if kind == "rectangle":
        return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    if kind == "ellipse":
        return (u / half_w) ** 2 + (v / half_h) ** 2 <= 1.0
    if kind == "polygon":  # convex: vertices on a circle at sorted angles; inside = left of every edge
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
        radius = rng.uniform(size / 16, size / 2.5)
        px, py = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
        inside = np.ones_like(x, dtype=bool)
        for i in range(len(angles)):
            j = (i + 1) % len(angles)
            inside &= (px[j] - px[i]) * (y - py[i]) - (py[j] - py[i]) * (x - px[i]) >= 0
        return inside
    # a straight stroke of width 1-5 px: distance to a segment
    length, width = rng.uniform(size / 8, size), rng.uniform(1.0, 5.0)
    along = np.clip(u, -length / 2, length / 2)
    return (u - along) ** 2 + v ** 2 <= (width / 2) ** 2


def render_procedural(seed: int, index: int, size: int = 64) -> torch.Tensor:
    """Image `index` of the procedural stream `seed`: (3, size, size) float32 in [0, 1].

    A background, then 0-6 primitives composited in order, each in a flat colour (or a two-colour gradient), with hard
    edges (the pixel centre decides) or antialiased ones (4x4 supersampled coverage), at random."""
    check_int("size", size, 8)
    rng = np.random.default_rng([_STREAM, int(seed), int(index)])
    image = _background(rng, size)
    count = 0 if rng.random() < 0.2 else int(rng.integers(1, _MAX_OBJECTS + 1))
    for _ in range(count):
        hard = rng.random() < 0.5
        factor = 1 if hard else _SUPERSAMPLE
        coords = (np.arange(size * factor, dtype=np.float32) + 0.5) / factor
        y, x = np.meshgrid(coords, coords, indexing="ij")
        mask = _shape_mask(rng, x, y, size).astype(np.float32)
        alpha = mask.reshape(size, factor, size, factor).mean(axis=(1, 3)) if factor > 1 else mask
        fill = _colour(rng)
        if rng.random() < 0.2:
            mix = _smooth_field(rng, size, 2)[..., None]
            fill = fill * (1 - mix) + _colour(rng) * mix
        image = image * (1 - alpha[..., None]) + fill * alpha[..., None]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)).clamp_(0, 1)


class RenderedDataset(Dataset):
    """`num_samples` label-free images of a render function (`render(seed, index, size)`, a pure function of its
    arguments); items look like the image datasets' (`image`, `label` = -1, `index`)."""

    name = "rendered"

    def __init__(self, num_samples: int, seed: int = 0, image_size: int = 64) -> None:
        check_int("num_samples", num_samples, 0)
        check_int("image_size", image_size, 8)
        self.num_samples, self.seed, self.image_size = num_samples, seed, image_size

    @staticmethod
    def render(seed: int, index: int, size: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name} index {index} out of range for {self.num_samples} samples")
        return {"image": self.render(self.seed, index, self.image_size), "label": -1, "index": index}


class ProceduralDataset(RenderedDataset):
    """`num_samples` procedural images (`render_procedural`)."""

    name = "procedural"
    render = staticmethod(render_procedural)
