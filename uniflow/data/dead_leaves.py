"""Dead-leaves images: a stand-in for photographs, drawn from nothing but random numbers.

A tokenizer trained on ShapeWorld and flat procedural primitives returns each 8x8 patch of a photograph as a smooth
blob: its latent never had to carry texture, so a photo decodes as a visible mosaic. No photograph may be downloaded
here, and the evaluation's photographs must stay unseen, so the training mix gets images with the statistics that
make photographs hard instead: the dead-leaves model (occluding objects whose sizes follow a power law, so there is
structure at every scale, as in natural scenes) with textured leaves (1/f "pink" noise, gratings, shading), colours
drawn like natural ones (mostly muted, some saturated), optical blur and sensor grain. Dead leaves are the classic
model of natural-image statistics, and synthetic pretraining on them is known to transfer to real images (Baradad et
al., "Learning to See by Looking at Noise", 2021).

Drawn at 2x and box-filtered down (antialiased occlusion edges). Image `i` is a pure function of `(seed, i)`, like
every other training source here, so data loading stays resumable and order-free.
"""

from __future__ import annotations

import numpy as np
import torch

from uniflow.configs import check_int
from uniflow.data.procedural import RenderedDataset

_STREAM = 0xDEAD1EAF  # this generator's random streams, apart from every other user of (seed, index)
_SUPERSAMPLE = 2
_MIN_RADIUS = 2.0  # pixels at the output size
_MAX_LEAVES = 160


def _pink_noise(rng: np.random.Generator, size: int, alpha: float) -> np.ndarray:
    """(size, size) noise with a 1/f**alpha amplitude spectrum (alpha ~1-2 in natural images), scaled to [-1, 1]."""
    freq = np.fft.fftfreq(size)
    radius = np.hypot(freq[:, None], freq[None, :])
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / radius**alpha
    spectrum[0, 0] = 0.0
    field = np.fft.ifft2(spectrum).real
    return (field / (np.abs(field).max() + 1e-8)).astype(np.float32)


def _natural_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) RGB in [0, 1]: a hue, mostly low saturation (earth, sky, skin, foliage tones), any brightness,
    sometimes vivid (HSV to RGB)."""
    hue = rng.random(count)
    saturation = np.where(rng.random(count) < 0.8, rng.random(count) ** 2, rng.uniform(0.6, 1.0, count))
    value = rng.uniform(0.05, 1.0, count)
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6.0) % 6.0
    rgb = value[:, None] * (1 - saturation[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return rgb.astype(np.float32)


def _leaf_masks(leaves: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(leaves, points) booleans: whether each leaf covers each of its points (x, y: (leaves, points), pixel centres).
    Kinds: 0 disc, 1 ellipse, 2 rotated rectangle, 3 convex polygon (vertices at sorted random angles on an
    ellipse)."""
    dx, dy = x - leaves["cx"][:, None], y - leaves["cy"][:, None]
    cos, sin = np.cos(leaves["angle"])[:, None], np.sin(leaves["angle"])[:, None]
    radius, aspect = leaves["radius"][:, None], leaves["aspect"][:, None]
    u = (dx * cos + dy * sin) / radius
    v = (dy * cos - dx * sin) / (radius * aspect)
    inside = u * u + v * v <= 1
    rect = leaves["kind"] == 2
    if rect.any():
        inside[rect] = (np.abs(u[rect]) <= 1) & (np.abs(v[rect]) <= 1)
    poly = leaves["kind"] == 3
    if poly.any():  # inside = left of every edge; repeated last vertices make zero-length edges (always true)
        pu, pv = u[poly], v[poly]
        px, py = np.cos(leaves["vertices"][poly]), np.sin(leaves["vertices"][poly])
        qx, qy = np.roll(px, -1, axis=1), np.roll(py, -1, axis=1)
        left = np.ones(pu.shape, dtype=bool)
        for k in range(px.shape[1]):
            left &= (qx[:, k:k + 1] - px[:, k:k + 1]) * (pv - py[:, k:k + 1]) \
                - (qy[:, k:k + 1] - py[:, k:k + 1]) * (pu - px[:, k:k + 1]) >= -1e-6
        inside[poly] = left
    return inside


def _draw_leaves(rng: np.random.Generator, s: int, count: int) -> dict[str, np.ndarray]:
    """Parameters of `count` leaves at an s x s canvas, front first."""
    r_min, r_max = _MIN_RADIUS * _SUPERSAMPLE, s * 0.6
    radius = (r_min**-2 + rng.random(count) * (r_max**-2 - r_min**-2)) ** -0.5  # density ~ r^-3
    sides = rng.integers(3, 8, count)
    vertices = np.sort(rng.uniform(0, 2 * np.pi, (count, 7)), axis=1)
    vertices = np.where(np.arange(7)[None, :] < sides[:, None], vertices,
                        np.take_along_axis(vertices, sides[:, None] - 1, axis=1))
    kind = rng.integers(4, size=count)
    leaves = {
        "radius": radius,
        "cx": rng.uniform(-radius / 2, s + radius / 2),
        "cy": rng.uniform(-radius / 2, s + radius / 2),
        "angle": rng.uniform(0, np.pi, count),
        "aspect": np.where(kind == 0, 1.0, rng.uniform(0.3, 1.0, count)),
        "kind": kind,
        "vertices": vertices,
        "fill": rng.integers(4, size=count),  # 0 flat, 1 pink noise, 2 grating, 3 shading
        "amount": rng.uniform(0.05, 0.45, count),
        "texture": rng.integers(2, size=count),
        "tint": 1.0 + rng.uniform(-0.3, 0.3, (count, 3)),
        "period": rng.uniform(2.0, 14.0, count) * _SUPERSAMPLE,
        "phase": rng.uniform(0, 2 * np.pi, count),
        "direction": rng.uniform(0, 2 * np.pi, count),
    }
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in leaves.items()}


def _leaf_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3): most leaves from a small scene palette (scenes repeat a few colours), the rest anything."""
    palette = _natural_colours(rng, int(rng.integers(2, 7)))
    own = _natural_colours(rng, count)
    pick = palette[rng.integers(len(palette), size=count)]
    colours = np.where(rng.random((count, 1)) < 0.6, pick, own) + rng.normal(0, 0.05, (count, 3))
    return np.clip(colours, 0, 1).astype(np.float32)


def _nearest_leaf(leaves: dict[str, np.ndarray], s: int) -> np.ndarray:
    """(s * s,) int: the index of the nearest (first) leaf covering each pixel, the leaf count where none does.

    Each leaf is evaluated only on a square window around it (leaves bucketed by window side, a power of two), not on
    the whole canvas: with sizes ~ r^-3 most leaves are tiny, and this keeps an image at a few milliseconds."""
    count = len(leaves["radius"])
    first = np.full(s * s, count, dtype=np.int64)
    reach = leaves["radius"] * np.sqrt(2.0) + 1.0  # a rectangle's corner is the farthest point of any leaf
    side = np.maximum(8, 2 ** np.ceil(np.log2(2 * reach + 2))).astype(np.int64)
    for window in np.unique(side):
        ids = np.flatnonzero(side == window)
        sub = {k: v[ids] for k, v in leaves.items()}
        if window >= s:
            ox, oy, window = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64), s
        else:
            ox = np.floor(sub["cx"]).astype(np.int64) - window // 2
            oy = np.floor(sub["cy"]).astype(np.int64) - window // 2
        grid = np.arange(window)
        gx, gy = np.tile(grid, window), np.repeat(grid, window)
        x, y = ox[:, None] + gx[None, :], oy[:, None] + gy[None, :]
        inside = _leaf_masks(sub, (x + 0.5).astype(np.float32), (y + 0.5).astype(np.float32))
        inside &= (x >= 0) & (x < s) & (y >= 0) & (y < s)
        np.minimum.at(first, (y * s + x)[inside], np.broadcast_to(ids[:, None], inside.shape)[inside])
    return first


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (S, S, 3) image, edges replicated."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        image = sum(w * np.take(padded, np.arange(k, k + image.shape[axis]), axis=axis) for k, w in enumerate(taps))
    return image


def render_dead_leaves(seed: int, index: int, size: int = 64) -> torch.Tensor:
    """Image `index` of the dead-leaves stream `seed`: (3, size, size) float32 in [0, 1].

    Leaves fall front to back (each shows only where no nearer leaf is) with radii drawn from a density proportional
    to r^-3 (scale-invariant: every octave of sizes covers about the same area), from 2 px to 0.6 of the image,
    until 50-100% of it is covered (a pink-noise background, itself a natural texture, shows through the rest); then,
    at random, optical blur and sensor grain. Leaves are evaluated in vectorised window buckets: ~11 ms an image on
    the 2-core development machine."""
    check_int("size", size, 8)
    rng = np.random.default_rng([_STREAM, int(seed), int(index)])
    s = size * _SUPERSAMPLE
    textures = np.stack([_pink_noise(rng, s, rng.uniform(1.0, 2.2)) for _ in range(2)]).reshape(2, -1)
    background = _natural_colours(rng, 1)[0] + rng.uniform(0.05, 0.35) * textures[0][:, None] \
        * (1 + rng.uniform(-0.3, 0.3, 3))
    leaves = _draw_leaves(rng, s, _MAX_LEAVES)
    colours = _leaf_colours(rng, _MAX_LEAVES)
    first = _nearest_leaf(leaves, s)
    coverage = np.cumsum(np.bincount(first, minlength=_MAX_LEAVES + 1)[:_MAX_LEAVES]) / first.size
    fallen = min(int(np.searchsorted(coverage, rng.uniform(0.5, 1.0))) + 1, _MAX_LEAVES)
    owner = np.where(first < fallen, first, -1)
    shown = owner >= 0
    leaf = owner[shown]
    pixel = np.flatnonzero(shown)
    px, py = pixel % s + 0.5, pixel // s + 0.5
    colour = colours[leaf]
    fill = leaves["fill"][leaf]
    amount = leaves["amount"][leaf][:, None]
    direction = leaves["direction"][leaf]
    along = (px - leaves["cx"][leaf]) * np.cos(direction) + (py - leaves["cy"][leaf]) * np.sin(direction)
    noise = textures[leaves["texture"][leaf], pixel][:, None] * leaves["tint"][leaf]
    wave = np.sin(2 * np.pi * along / leaves["period"][leaf] + leaves["phase"][leaf])[:, None]
    ramp = (along / (2 * leaves["radius"][leaf]))[:, None]
    pixels = np.select([fill[:, None] == 1, fill[:, None] == 2, fill[:, None] == 3],
                       [colour + amount * noise, colour + 0.66 * amount * wave, colour * (1 + 1.8 * amount * ramp)],
                       colour)
    image = background.astype(np.float32).copy()
    image[shown] = pixels
    image = image.reshape(s, s, 3)
    if rng.random() < 0.5:
        image = _blur(image, rng.uniform(0.4, 2.0) * _SUPERSAMPLE / 2)
    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.005, 0.03), image.shape)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)).clamp_(0, 1)


class DeadLeavesDataset(RenderedDataset):
    """`num_samples` dead-leaves images (`render_dead_leaves`)."""

    name = "dead-leaves"
    render = staticmethod(render_dead_leaves)
