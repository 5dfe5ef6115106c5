"""ShapeWorld: the procedural dataset every part of the tiny UniFlow stack is trained and checked on.

No model hub or dataset download is reachable, so the project carries its own world: 64x64 images of 1-3 coloured
geometric shapes on plain or smooth textured backgrounds, with a class label (shape x colour of the main object), a
caption and question-answer pairs. Sample `i` of a split is a pure function of `(seed, split, i)`, so any index can be
generated on its own, in any order, by any data-loader worker, and no images need to live on disk.

Design choices that keep the labels honest:
- the *main* object is the largest one by area (its size class is strictly larger than every other object's), is
  drawn last and never overlaps another object, so it is always fully visible;
- an object's `size_px` is the side of the square with the same area, so "largest" means the same thing for a thin
  star as for a circle;
- object centres keep clear of the 3x3 grid lines, so position words ("top left") are not borderline;
- backgrounds are near-neutral greys with smooth, low-frequency textures, so saturated shape colours always stand out
  and a reconstruction tokenizer can learn them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from uniflow.checkpoint import check_output_dir
from uniflow.configs import check_int
from uniflow.errors import OutputError, UniFlowError
from uniflow.fileio import atomic_write_file, atomic_write_text, is_temporary
from uniflow.images import pil_to_tensor

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 168, 64),
    "blue": (37, 89, 222),
    "yellow": (246, 212, 28),
    "purple": (148, 56, 200),
    "orange": (247, 128, 18),
}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
DEFAULT_NUM_SAMPLES: dict[str, int] = {"train": 50_000, "heldout": 2_000}
BACKGROUNDS: tuple[str, ...] = ("light", "dark", "striped", "checkered", "gradient", "mottled")
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")
# Equal-area square side in pixels at 64x64, per size class; the gaps between classes make "largest" unambiguous.
_SIZE_RANGES: tuple[tuple[float, float], ...] = ((8.0, 11.0), (14.0, 18.0), (21.0, 25.0))
_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "center", "right")
_SUPERSAMPLE = 4
_MAX_ROTATION_DEG = 15.0
_PLACEMENT_TRIES = 60
# Per-patch targets: one class more than the shapes (colours) for "no object here"; a patch is "covered" by an object
# when at least this fraction of its area shows that object.
SHAPE_BACKGROUND = len(SHAPES)
COLOUR_BACKGROUND = len(COLOURS)
PATCH_COVERED = 0.5


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )


def _regular(n: int) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


# Unit polygons in image coordinates (y points down); the circle is drawn as an ellipse.
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": _regular(3),
    "diamond": np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], dtype=np.float64),
    "star": _star(),
    "cross": _cross(),
}


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


_UNIT_AREA: dict[str, float] = {"circle": math.pi, **{k: _polygon_area(v) for k, v in _POLYGONS.items()}}
_UNIT_RADIUS: dict[str, float] = {"circle": 1.0, **{k: float(np.hypot(*v.T).max()) for k, v in _POLYGONS.items()}}


def class_name(label: int) -> str:
    """Human-readable class of a label, e.g. 0 -> "red circle" (label = shape_index * len(COLOURS) + colour_index)."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise UniFlowError(f"ShapeWorld label {label} is out of range [0, {NUM_CLASSES})")
    return CLASS_NAMES[int(label)]


def class_label(shape: str, colour: str) -> int:
    """Inverse of `class_name` from its parts, so callers never hard-code the label formula."""
    if shape not in SHAPES or colour not in COLOURS:
        raise UniFlowError(f"unknown ShapeWorld class {colour!r} {shape!r}; shapes {SHAPES}, colours {COLOURS}")
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape. `size_px` is the side of the equal-area square, `x`/`y` its centre in pixels."""

    shape: str
    colour: str
    size: str
    size_px: float
    x: float
    y: float
    position: str
    rotation: float

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "size_px": round(self.size_px, 2),
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "position": self.position,
            "rotation": round(self.rotation, 2),
        }


@dataclass
class ShapeWorldSample:
    """One image with its metadata. `objects[0]` is the main (largest, topmost) object the label refers to.

    `masks` (only with `render_sample(..., with_masks=True)`): float32 (len(objects), H, W), the visible coverage of
    each object at each pixel (its antialiased area, minus what objects drawn above it hide), the exact per-pixel
    truth behind `object_map` and `patch_labels`."""

    image: Image.Image
    label: int
    shape: str
    colour: str
    caption: str
    qa: list[dict[str, str]]
    objects: list[ShapeObject]
    background: str
    seed: int
    split: str
    index: int
    masks: np.ndarray | None = None
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.objects)

    @property
    def object_map(self) -> np.ndarray:
        """int64 (H, W): index into `objects` of what each pixel mostly shows, -1 for the background."""
        masks = self._masks()
        weights = np.concatenate([1.0 - masks.sum(0, keepdims=True), masks])
        return weights.argmax(0).astype(np.int64) - 1

    def _masks(self) -> np.ndarray:
        if self.masks is None:
            raise UniFlowError("this ShapeWorld sample has no masks; render it with render_sample(..., "
                               "with_masks=True)")
        return self.masks

    @property
    def class_name(self) -> str:
        return class_name(self.label)

    def to_json(self) -> dict[str, Any]:
        """Metadata without the image, JSON-serialisable (what the writer stores per line)."""
        return {
            "seed": self.seed,
            "split": self.split,
            "index": self.index,
            "label": self.label,
            "class_name": self.class_name,
            "shape": self.shape,
            "colour": self.colour,
            "count": self.count,
            "background": self.background,
            "caption": self.caption,
            "qa": [dict(q) for q in self.qa],
            "objects": [o.to_json() for o in self.objects],
        }


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise UniFlowError(f"unknown ShapeWorld split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def _main_label(seed: int, split_id: int, index: int) -> int:
    """Labels cycle through a fresh random permutation every NUM_CLASSES indices, so any prefix is class-balanced."""
    block, offset = divmod(index, NUM_CLASSES)
    perm = np.random.default_rng([seed, split_id, 1, block]).permutation(NUM_CLASSES)
    return int(perm[offset])


def _position_word(x: float, y: float, size: int) -> str:
    col = min(int(x * 3 / size), 2)
    row = min(int(y * 3 / size), 2)
    r, c = _ROW_WORDS[row], _COL_WORDS[col]
    if r == "middle":
        return "center" if c == "center" else c
    return r if c == "center" else f"{r} {c}"


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


# ---------------------------------------------------------------------------------------------------------- backgrounds


def _neutral(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A grey of level in [lo, hi] with a faint tint, so backgrounds vary without competing with shape colours."""
    return rng.uniform(lo, hi) + rng.uniform(-8.0, 8.0, size=3)


def _soft_square(u: np.ndarray, period: float) -> np.ndarray:
    """Square wave in [-1, 1] with ~2 px smooth edges: real stripes, no aliasing, nothing a tokenizer can't learn."""
    return np.clip(np.sin(2 * math.pi * u / period) * period / (2 * math.pi), -1.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    scale = size / IMAGE_SIZE
    dark = bool(rng.integers(2)) if kind not in ("light", "dark") else kind == "dark"
    base = _neutral(rng, 45, 80) if dark else _neutral(rng, 175, 230)
    if kind in ("light", "dark"):
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32), kind
    coords = (np.arange(size, dtype=np.float32) + 0.5) / scale
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    contrast = rng.uniform(16, 30)
    if kind == "striped":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(9, 16)
        t = _soft_square(xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period), period)
    elif kind == "checkered":
        period = 2 * rng.uniform(8, 14)
        t = _soft_square(xx + rng.uniform(0, period), period) * _soft_square(yy + rng.uniform(0, period), period)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        proj = (xx - IMAGE_SIZE / 2) * math.cos(theta) + (yy - IMAGE_SIZE / 2) * math.sin(theta)
        t = proj / (IMAGE_SIZE * 0.71)
        contrast = rng.uniform(25, 45)
    else:  # mottled: a coarse random grid upsampled with a smooth filter, i.e. low-frequency "light noise"
        grid = rng.uniform(-1.0, 1.0, size=(5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    img = base[None, None, :] + (contrast * t)[:, :, None]
    return np.clip(img, 0, 255).astype(np.float32), kind


# ------------------------------------------------------------------------------------------------------------- objects


def _radius(shape: str, size_px: float) -> float:
    """Bounding radius of a shape whose area equals size_px**2."""
    return size_px / math.sqrt(_UNIT_AREA[shape]) * _UNIT_RADIUS[shape]


def _object_alpha(obj: ShapeObject, scale: float, size: int) -> tuple[int, int, np.ndarray]:
    """(y0, x0, coverage) of one antialiased shape: its mask drawn at 4x over its bounding box, then box-filtered down
    (exact area coverage, no ringing); coverage is (h, w, 1) in [0, 1], placed at row y0, column x0."""
    cx, cy = obj.x, obj.y
    r = _radius(obj.shape, obj.size_px * scale)
    x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 1, size), min(int(math.ceil(cy + r)) + 1, size)
    s = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy = (cx - x0) * s, (cy - y0) * s
    extent = obj.size_px * scale / math.sqrt(_UNIT_AREA[obj.shape]) * s
    if obj.shape == "circle":
        draw.ellipse((ox - extent, oy - extent, ox + extent, oy + extent), fill=255)
    else:
        a = math.radians(obj.rotation)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = _POLYGONS[obj.shape] @ rot.T * extent + np.array([ox, oy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return y0, x0, np.asarray(mask.reduce(s), dtype=np.float32)[:, :, None] / 255.0


def _draw_object(img: np.ndarray, obj: ShapeObject, scale: float) -> np.ndarray:
    """Composite one shape into `img` in place; returns its full-image coverage (H, W) for the masks."""
    y0, x0, alpha = _object_alpha(obj, scale, img.shape[0])
    region = img[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
    region *= 1.0 - alpha
    region += alpha * np.asarray(COLOUR_RGB[obj.colour], dtype=np.float32)
    full = np.zeros(img.shape[:2], dtype=np.float32)
    full[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha[:, :, 0]
    return full


def _sample_centre(
    rng: np.random.Generator, r: float, size: int, placed: list[tuple[float, float, float]]
) -> tuple[float, float] | None:
    """Centre inside the frame, clear of the 3x3 grid lines and of every placed object; None if none found."""
    lo, hi = r + 1.0, size - r - 1.0
    if lo > hi:
        lo = hi = size / 2
    band = 1.5 * size / IMAGE_SIZE
    lines = (size / 3, 2 * size / 3)
    for _ in range(_PLACEMENT_TRIES):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if any(abs(v - g) < band for v in (x, y) for g in lines):
            continue
        if all(math.hypot(x - px, y - py) >= r + pr + 1.5 for px, py, pr in placed):
            return float(x), float(y)
    return None


def _sample_objects(rng: np.random.Generator, label: int, size: int) -> list[ShapeObject]:
    scale = size / IMAGE_SIZE
    main_shape, main_colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
    wanted = int(rng.integers(1, 4))
    main_cls = int(rng.integers(3)) if wanted == 1 else int(rng.integers(1, 3))
    specs = [(main_shape, main_colour, main_cls)]
    used = {(main_shape, main_colour)}
    for _ in range(wanted - 1):
        while True:  # distinct (shape, colour) pairs so "the red circle" always names one object
            pair = (SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))])
            if pair not in used:
                break
        used.add(pair)
        specs.append((*pair, int(rng.integers(main_cls))))
    objects: list[ShapeObject] = []
    placed: list[tuple[float, float, float]] = []
    for i, (shape, colour, cls) in enumerate(specs):
        lo, hi = _SIZE_RANGES[cls]
        size_px = rng.uniform(lo, hi)
        rotation = rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG) if shape != "circle" else 0.0
        r = _radius(shape, size_px * scale)
        centre = _sample_centre(rng, r, size, placed)
        if centre is None:
            if i == 0:  # the main object always fits on an empty canvas; keep it even if the grid bands say no
                lo, hi = min(r + 1, size / 2), max(size - r - 1, size / 2)
                centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            else:
                continue  # no room for this distractor: the image simply has fewer objects
        x, y = centre
        placed.append((x, y, r))
        pos = _position_word(x, y, size)
        objects.append(ShapeObject(shape, colour, SIZE_WORDS[cls], float(size_px), x, y, pos, float(rotation)))
    return objects


# ----------------------------------------------------------------------------------------------------------- language


def _caption(objects: list[ShapeObject], background: str) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} {_position_phrase(o.position)}" for o in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = {"light": "a plain light", "dark": "a plain dark"}.get(background, f"a {background}")
    text = f"{body} on {bg} background."
    return text[0].upper() + text[1:]


def where_question(obj: ShapeObject) -> str:
    """The position question about one object; its answer is `obj.position`."""
    return f"Where is the {obj.colour} {obj.shape}?"


def _qa(rng: np.random.Generator, objects: list[ShapeObject]) -> list[dict[str, str]]:
    """Questions with exactly one correct, short, lowercase answer each (exact-match evaluation relies on it)."""
    main = objects[0]
    qa = [{"type": "shape", "question": "What shape is the largest object?", "answer": main.shape}]
    shapes = [o.shape for o in objects]
    unique = [o for o in objects if shapes.count(o.shape) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        qa.append({"type": "colour", "question": f"What colour is the {o.shape}?", "answer": o.colour})
    else:
        qa.append({"type": "colour", "question": "What colour is the largest object?", "answer": main.colour})
    qa.append({"type": "count", "question": "How many shapes are there?", "answer": str(len(objects))})
    o = objects[int(rng.integers(len(objects)))]
    qa.append({"type": "position", "question": where_question(o), "answer": o.position})
    present = {(o.shape, o.colour) for o in objects}
    if rng.random() < 0.5:
        o = objects[int(rng.integers(len(objects)))]
        shape, colour, answer = o.shape, o.colour, "yes"
    else:
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        shape, colour = absent[int(rng.integers(len(absent)))]
        answer = "no"
    qa.append({"type": "yes/no", "question": f"Is there a {colour} {shape}?", "answer": answer})
    return qa


# ------------------------------------------------------------------------------------------------------------- public


def render_sample(seed: int, split: str, index: int, image_size: int = IMAGE_SIZE,
                  with_masks: bool = False) -> ShapeWorldSample:
    """Generate sample `index` of `split`: a pure function of its arguments, so workers can render any index alone.

    with_masks: also keep each object's visible coverage (`sample.masks`) for `object_map` / `patch_labels`; the
    pixels are the same either way."""
    split_id = _check_split(split)
    if seed < 0 or index < 0:
        raise UniFlowError(f"ShapeWorld seed and index must be >= 0, got seed={seed}, index={index}")
    if image_size < 16:
        raise UniFlowError(f"ShapeWorld image_size must be >= 16, got {image_size}")
    label = _main_label(seed, split_id, index)
    rng = np.random.default_rng([seed, split_id, 0, index])
    img, background = _background(rng, image_size)
    objects = _sample_objects(rng, label, image_size)
    scale = image_size / IMAGE_SIZE
    masks = np.zeros((len(objects), image_size, image_size), dtype=np.float32) if with_masks else None
    for k in reversed(range(len(objects))):  # main object last, so it is on top
        coverage = _draw_object(img, objects[k], scale)
        if masks is not None:
            masks *= 1.0 - coverage  # what this object hides of the ones below
            masks[k] = coverage
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    main = objects[0]
    return ShapeWorldSample(
        image=image,
        label=label,
        shape=main.shape,
        colour=main.colour,
        caption=_caption(objects, background),
        qa=_qa(rng, objects),
        objects=objects,
        background=background,
        seed=seed,
        split=split,
        index=index,
        masks=masks,
    )


def _object_areas(sample: ShapeWorldSample, patch: int) -> np.ndarray:
    """float (objects, H / patch, W / patch): the fraction of each patch's area that shows each object."""
    masks = sample._masks()
    size = masks.shape[-1]
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or size % patch:
        raise UniFlowError(f"patch size must be a positive divisor of the image size {size}, got {patch!r}")
    grid = size // patch
    return masks.reshape(len(masks), grid, patch, grid, patch).mean(axis=(2, 4))


def patch_labels(sample: ShapeWorldSample, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape_ids, colour_ids), int64 (H / patch, W / patch) in the encoder's token order (row-major): the shape and
    colour of the object that covers at least `PATCH_COVERED` of the patch's area (exact, from the masks), else
    `SHAPE_BACKGROUND` / `COLOUR_BACKGROUND`. A patch is "covered" exactly when its shape id is not the background."""
    area = _object_areas(sample, patch)
    owner = area.argmax(0)
    covered = np.take_along_axis(area, owner[None], 0)[0] >= PATCH_COVERED
    shape_of = np.array([SHAPES.index(o.shape) for o in sample.objects], dtype=np.int64)
    colour_of = np.array([COLOURS.index(o.colour) for o in sample.objects], dtype=np.int64)
    shapes = np.where(covered, shape_of[owner], SHAPE_BACKGROUND)
    colours = np.where(covered, colour_of[owner], COLOUR_BACKGROUND)
    return shapes.astype(np.int64), colours.astype(np.int64)


def patch_areas(sample: ShapeWorldSample, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape_area, colour_area), float32 (H / patch, W / patch, classes + 1): the fraction of each patch showing each
    shape (colour), the background last; each row sums to 1. Soft training targets: unlike `patch_labels` they also
    describe the patches an object only partly covers (its edges, small objects)."""
    area = _object_areas(sample, patch)
    grid = area.shape[1]
    shapes = np.zeros((grid, grid, len(SHAPES) + 1), dtype=np.float32)
    colours = np.zeros((grid, grid, len(COLOURS) + 1), dtype=np.float32)
    for obj, a in zip(sample.objects, area):
        shapes[:, :, SHAPES.index(obj.shape)] += a
        colours[:, :, COLOURS.index(obj.colour)] += a
    shapes[:, :, SHAPE_BACKGROUND] = np.clip(1.0 - shapes[:, :, :SHAPE_BACKGROUND].sum(-1), 0.0, 1.0)
    colours[:, :, COLOUR_BACKGROUND] = np.clip(1.0 - colours[:, :, :COLOUR_BACKGROUND].sum(-1), 0.0, 1.0)
    return shapes, colours


class ShapeWorldDataset(torch.utils.data.Dataset):
    """On-demand ShapeWorld split for training: nothing on disk, any index renders independently in any worker.

    patch_size: also return the per-patch targets, one row per encoder token (row-major): `patch_labels` as
    "patch_shape" / "patch_colour" (int64) and `patch_areas` as "patch_shape_area" / "patch_colour_area" (float32,
    tokens x classes + 1); None (the default) renders no masks, so plain images cost nothing extra. A transform
    could move pixels away from their labels, so the two are not combined."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        seed: int = 0,
        image_size: int = IMAGE_SIZE,
        transform: Any = None,
        patch_size: int | None = None,
    ) -> None:
        _check_split(split)
        self.split = split
        self.num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise UniFlowError(f"ShapeWorldDataset num_samples must be >= 0, got {num_samples}")
        self.seed = seed
        self.image_size = image_size
        self.transform = transform
        if patch_size is not None:
            if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 \
                    or image_size % patch_size:
                raise UniFlowError(f"ShapeWorldDataset patch_size must be a positive divisor of image_size "
                                   f"{image_size}, got {patch_size!r}")
            if transform is not None:
                raise UniFlowError("ShapeWorldDataset: patch_size (per-patch targets) cannot be combined with a "
                                   "transform, which would move pixels away from their labels")
        self.patch_size = patch_size

    def with_patch_labels(self, patch_size: int) -> ShapeWorldDataset:
        """The same split with per-patch targets in every item."""
        return ShapeWorldDataset(self.split, self.num_samples, self.seed, self.image_size, self.transform, patch_size)

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapeWorld index {index} out of range for {self.num_samples} samples")
        return index

    def sample(self, index: int) -> ShapeWorldSample:
        """Full sample (image and metadata) for `index`."""
        return render_sample(self.seed, self.split, self._check_index(index), self.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        s = render_sample(self.seed, self.split, index, self.image_size, with_masks=self.patch_size is not None)
        if self.patch_size is not None:
            shapes, colours = patch_labels(s, self.patch_size)
            shape_area, colour_area = patch_areas(s, self.patch_size)
            return {"image": _to_tensor(s.image), "label": s.label, "index": index,
                    "patch_shape": torch.from_numpy(shapes.reshape(-1)),
                    "patch_colour": torch.from_numpy(colours.reshape(-1)),
                    "patch_shape_area": torch.from_numpy(shape_area.reshape(-1, shape_area.shape[-1])),
                    "patch_colour_area": torch.from_numpy(colour_area.reshape(-1, colour_area.shape[-1]))}
        if self.transform is not None:
            image = self.transform(s.image)
            if not isinstance(image, torch.Tensor):
                image = _to_tensor(image)
        else:
            image = _to_tensor(s.image)
        return {"image": image, "label": s.label, "index": index}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image)


def _llava_record(sample: ShapeWorldSample, rel_path: str) -> dict[str, Any]:
    turns = [("Describe the image.", sample.caption)] + [(q["question"], q["answer"]) for q in sample.qa]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"{sample.split}-{sample.index:06d}", "image": rel_path, "conversations": conversations}


MANIFEST_NAME = ".uniflow-shapeworld.json"


def _check_dataset_dest(out: Path, split: str, overwrite: bool) -> dict[str, Any]:
    """The manifest of `out` after checking that writing `split` there loses nothing the writer did not produce."""
    check_output_dir(out, "--out")
    manifest_path = out / MANIFEST_NAME
    manifest: dict[str, Any] = {"kind": "shapeworld", "splits": {}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
                raise ValueError("not a manifest")
        except (ValueError, OSError):
            raise OutputError(f"{manifest_path}: damaged ShapeWorld manifest; remove it or choose another folder") \
                from None
    elif out.is_dir() and any(not is_temporary(p.name) for p in out.iterdir()):
        raise OutputError(f"--out: {out} is not empty and was not written by `uniflow data shapes`; choose a new or "
                          f"empty folder")
    if split in manifest["splits"] and not overwrite:
        raise OutputError(f"--out: {out} already holds a ShapeWorld {split} split; pass --overwrite (overwrite=True "
                          f"in Python) to regenerate it")
    return manifest


def write_shapeworld(
    out_dir: str | os.PathLike[str], num: int, seed: int = 0, split: str = "train", progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write samples 0..num-1 of a split to disk for tools that want files: an ImageNet-layout folder
    `<split>/<class_name>/<index>.png`, metadata `<split>.jsonl` and LLaVA conversations `<split>_llava.json`.
    Paths inside both files are relative to `out_dir`. Returns `out_dir`.

    A hidden manifest (`.uniflow-shapeworld.json`) marks the folder as ours: writing into a non-empty folder without
    it is refused, and regenerating a split (overwrite=True) first removes that split's earlier files, so no stale
    image survives; files of other splits and files the writer did not produce are left alone."""
    _check_split(split)
    check_int("num", num, 0)
    check_int("seed", seed, 0, 2**63)
    out = Path(out_dir)
    manifest = _check_dataset_dest(out, split, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if split in manifest["splits"]:
        shutil.rmtree(out / split, ignore_errors=True)
        for name in (f"{split}.jsonl", f"{split}_llava.json"):
            (out / name).unlink(missing_ok=True)
    # recorded before the first image, so a killed run still leaves a folder the next run recognises as its own
    manifest["splits"][split] = {"num": num, "seed": seed, "complete": False}
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    (out / split).mkdir(parents=True, exist_ok=True)
    indices: Any = range(num)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"ShapeWorld {split}", unit="img")
    lines: list[str] = []
    llava: list[dict[str, Any]] = []
    for i in indices:
        s = render_sample(seed, split, i)
        rel = f"{split}/{s.class_name.replace(' ', '_')}/{i:06d}.png"
        atomic_write_file(out / rel, lambda tmp, image=s.image: image.save(tmp, format="PNG"))
        lines.append(json.dumps({"image": rel, **s.to_json()}))
        llava.append(_llava_record(s, rel))
    atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(out / f"{split}_llava.json", json.dumps(llava, indent=1))
    manifest["splits"][split]["complete"] = True
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return out
