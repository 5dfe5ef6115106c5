"""Images the ShapeWorld tokenizer was not trained on the look of: the generalisation set of the evaluation.

Drawn by code separate from ShapeWorld's renderer (`uniflow.data.shapeworld` is not imported here), so a tokenizer
that only memorised the renderer's style shows it:
- `flat_images`: single-colour images (black, white, greys, a few saturated and muted colours): a patch-wise decoder's
  seams and blotches have nowhere to hide on them;
- `hard_edge_images`: PIL primitives (rectangles, ellipses, polygons, lines; no text) with hard, aliased edges on
  flat backgrounds, in colours and sizes the renderer does not use;
- `photo_images`: real photographs from scikit-image's sample data, resized and centre-cropped through the project's
  one preprocessing (`uniflow.images.preprocess`).
"Synthetic" = flat + hard edges (the >= 29 dB bar); the photographs are reported apart, never averaged in.
Everything is deterministic from a seed.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from uniflow.configs import check_int
from uniflow.errors import ConfigError
from uniflow.images import pil_to_tensor, preprocess

FLAT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (255, 255, 255), (128, 128, 128), (64, 64, 64), (192, 192, 192),
    (220, 30, 30), (30, 160, 60), (30, 60, 200), (240, 200, 20), (20, 120, 130), (150, 90, 40), (250, 160, 190),
)
# backgrounds of the hard-edged images: mostly black / white / grey, as the issue asks, plus a few colours
BACKGROUNDS: tuple[tuple[int, int, int], ...] = FLAT_COLOURS[:5] + ((245, 235, 215), (25, 35, 60))
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry",
                           "coins", "hubble_deep_field")
SHAPES = ("rectangle", "ellipse", "polygon", "line")


def flat_images(size: int = 64) -> torch.Tensor:
    """One (3, size, size) image per colour of `FLAT_COLOURS`, in [0, 1]."""
    check_int("size", size, 2)
    colours = torch.tensor(FLAT_COLOURS, dtype=torch.float32) / 255.0
    return colours[:, :, None, None].expand(-1, 3, size, size).contiguous()


def _random_colour(rng: random.Random, avoid: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour far enough from the background to make a visible edge."""
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, avoid)) > 120:
            return colour  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, colour: tuple[int, int, int]) -> None:
    kind = rng.choice(SHAPES)
    lo, hi = size // 8, size // 2

    def box() -> list[int]:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        x, y = rng.randint(-w // 4, size - 3 * w // 4), rng.randint(-h // 4, size - 3 * h // 4)
        return [x, y, x + w, y + h]

    if kind == "rectangle":
        draw.rectangle(box(), fill=colour)
    elif kind == "ellipse":
        draw.ellipse(box(), fill=colour)
    elif kind == "polygon":
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(lo, hi)
        angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(rng.randint(3, 6)))
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
    else:
        points = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(points, fill=colour, width=rng.randint(1, 4))


def hard_edge_images(count: int = 24, size: int = 64, seed: int = 0) -> torch.Tensor:
    """`count` images of 1-4 PIL primitives on a flat background, (count, 3, size, size) in [0, 1]."""
    check_int("count", count, 1)
    check_int("size", size, 8)
    rng = random.Random(f"generalisation-hard-edges-{seed}")
    out = []
    for _ in range(count):
        background = rng.choice(BACKGROUNDS)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            _draw_shape(draw, rng, size, _random_colour(rng, background))
        out.append(pil_to_tensor(image, "hard-edge image"))
    return torch.stack(out)


def synthetic_images(size: int = 64, seed: int = 0, hard_edges: int = 24) -> torch.Tensor:
    """The synthetic part of the set: `flat_images` then `hard_edge_images`."""
    return torch.cat([flat_images(size), hard_edge_images(hard_edges, size, seed)])


def photo_images(size: int = 64, names: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """scikit-image's sample photographs, resized and centre-cropped to size x size by `uniflow.images.preprocess`.

    scikit-image is a development dependency: it is imported here only, with a one-line error when it is missing."""
    try:
        from skimage import data as skdata
    except ImportError as err:
        raise ConfigError(f"the photographs of the generalisation set need scikit-image (pip install scikit-image, "
                          f"or the project's [dev] extra); got: {err}") from None
    out = []
    for name in names:
        loader = getattr(skdata, name, None)
        if loader is None:
            raise ConfigError(f"photo {name!r}: not in skimage.data (expected one of {list(PHOTOS)})")
        array = np.asarray(loader())
        if array.dtype != np.uint8:  # a few samples are float or 16-bit: rescale to 8 bits before PIL
            array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-12)).astype(np.uint8)
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")
        out.append(preprocess(image, size, f"skimage.data.{name}"))
    return torch.stack(out)
