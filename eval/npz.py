"""The ADM evaluator's file formats (guided-diffusion `evaluations/`), read without loading a whole batch at once.

- A **sample batch** is an `.npz` whose `arr_0` holds uint8 images (N, H, W, 3); `arr_1`, when present, the class
  labels. Generators write it (`write_samples`); `uniflow eval gen --samples` reads it.
- A **reference batch** (`VIRTUAL_imagenet256_labeled.npz` and its kin) has the same `arr_0` and, usually, the
  statistics the ADM evaluator precomputed with the TensorFlow Inception graph: `mu`, `sigma` (pool features,
  2048-d) and `mu_s`, `sigma_s` (spatial features, 2023-d). Where they are present they are used for FID and sFID,
  as ADM does; the images are still read for precision and recall.

Arrays are streamed from the zip member in batches (`iter_images`), so a 10000-image 256-px reference (about 2 GB)
never sits in memory whole. Nothing here unpickles: object arrays are refused.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniflow.errors import ConfigError, ImageInputError
from uniflow.fileio import atomic_write_file

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
LAYOUT = "an .npz whose arr_0 holds uint8 images (N, H, W, 3), as the ADM evaluator reads"


@dataclass(frozen=True)
class ImagesInfo:
    """What `arr_0` of a batch holds, read from its header only."""

    path: Path
    count: int
    height: int
    width: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _open_zip(path: Path, flag: str) -> zipfile.ZipFile:
    if not path.is_file():
        what = " (it is a folder)" if path.is_dir() else ""
        raise ConfigError(f"{flag}: {path} not found{what}; expected {LAYOUT}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageInputError(f"{flag}: {path} is not an .npz file ({exc}); expected {LAYOUT}") from None


def npz_keys(path: str | Path, flag: str = "npz") -> list[str]:
    """The array names in an .npz, in file order."""
    with _open_zip(Path(path), flag) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")]


def _read_header(fh: io.BufferedIOBase, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise ImageInputError(f"{where}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise ImageInputError(f"{where}: holds Python objects (dtype {dtype}); refusing to unpickle it")
    return tuple(int(s) for s in shape), dtype, bool(fortran)


def array_header(path: str | Path, key: str, flag: str = "npz") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, from its header."""
    path = Path(path)
    with _open_zip(path, flag) as zf:
        member = _member(zf, path, key, flag)
        with zf.open(member) as fh:
            shape, dtype, _ = _read_header(fh, f"{flag}: {path}[{key}]")
    return shape, dtype


def _member(zf: zipfile.ZipFile, path: Path, key: str, flag: str) -> str:
    name = f"{key}.npy"
    if name not in zf.namelist():
        found = [n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")]
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "no arrays"
        raise ImageInputError(f"{flag}: {path} has no {key!r} array (found: {shown}); expected {LAYOUT}")
    return name


def check_images(path: str | Path, flag: str = "--samples") -> ImagesInfo:
    """Validate `arr_0` from its header: uint8, (N, H, W, 3), N >= 1. Every failure names the file and the layout."""
    path = Path(path)
    shape, dtype = array_header(path, IMAGES_KEY, flag)
    where = f"{flag}: {path}[{IMAGES_KEY}]"
    if len(shape) != 4 or shape[-1] != 3:
        raise ImageInputError(f"{where}: expected shape (N, H, W, 3), got {shape}")
    if dtype != np.uint8:
        raise ImageInputError(f"{where}: expected uint8 pixels (0-255), got {dtype}; convert with "
                              f"(x * 255).round().clip(0, 255).astype(np.uint8) if they are floats in [0, 1]")
    if shape[0] == 0 or shape[1] < 2 or shape[2] < 2:
        raise ImageInputError(f"{where}: holds no usable images, shape {shape}")
    return ImagesInfo(path, shape[0], shape[1], shape[2])


def iter_images(path: str | Path, batch_size: int, flag: str = "--samples", limit: int | None = None
                ) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of `arr_0`, streamed from the file (`limit`: at most that many images)."""
    info = check_images(path, flag)
    total = info.count if limit is None else min(limit, info.count)
    per_image = info.height * info.width * 3
    with zipfile.ZipFile(info.path) as zf, zf.open(f"{IMAGES_KEY}.npy") as fh:
        _, _, fortran = _read_header(fh, f"{flag}: {info.path}[{IMAGES_KEY}]")
        if fortran:  # rare (np.asfortranarray before saving); read it whole and convert
            whole = np.load(info.path, allow_pickle=False)[IMAGES_KEY]
            for start in range(0, total, batch_size):
                yield np.ascontiguousarray(whole[start:start + batch_size])
            return
        for start in range(0, total, batch_size):
            n = min(batch_size, total - start)
            data = fh.read(n * per_image)
            if len(data) != n * per_image:
                last = start + len(data) // per_image
                raise ImageInputError(f"{flag}: {info.path}[{IMAGES_KEY}] is truncated: its header promises "
                                      f"{info.count} images, the data ends before image {last}")
            yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, info.height, info.width, 3)  # writable


def read_stats(path: str | Path, flag: str = "--ref") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The precomputed statistics of a reference batch: {"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}, each
    only when both arrays are present and their shapes agree (d,) / (d, d)."""
    path = Path(path)
    keys = set(npz_keys(path, flag))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    wanted = [(kind, m, s) for kind, (m, s) in STATS_KEYS.items() if m in keys and s in keys]
    if not wanted:
        return out
    with np.load(path, allow_pickle=False) as data:
        for kind, mu_key, sigma_key in wanted:
            mu, sigma = np.asarray(data[mu_key], np.float64), np.asarray(data[sigma_key], np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ImageInputError(f"{flag}: {path}: statistics {mu_key} {mu.shape} and {sigma_key} {sigma.shape} "
                                      f"do not fit (expected (d,) and (d, d))")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ImageInputError(f"{flag}: {path}: statistics {mu_key}/{sigma_key} hold NaN or inf")
            out[kind] = (mu, sigma)
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes: the key of cached features and the identity of a file in reports."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_samples(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write a sample batch in the ADM format (`arr_0` uint8 (N, H, W, 3), `arr_1` labels), atomically."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ImageInputError(f"samples: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays = {IMAGES_KEY: images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise ImageInputError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
        arrays[LABELS_KEY] = labels.astype(np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write_file(Path(path), write)
