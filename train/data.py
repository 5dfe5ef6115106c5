"""Training data: image folders (ImageNet layout), `datasets`, ShapeWorld, a resumable per-rank sampler and
length-grouped batches.

Every dataset yields {"image": float (3, S, S) in [0, 1], "label": int, "index": int}. Images are resized (shorter
side, bicubic) and centre-cropped to `image_size`; there is no random augmentation, so a sample is a pure function of
its index and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from uniflow.configs import check_choice, check_number
from uniflow.errors import ConfigError, ImageInputError
from uniflow.images import open_image, preprocess, probe_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".jfif")

SOURCES = ("shapeworld", "folder", "hf")


@dataclass
class ImageDataConfig:
    """The `data` section of the image tasks (encoder, tokenizer): where images come from.

    source: "shapeworld" (rendered on demand), "folder" (ImageNet layout: path/<class>/<image>) or "hf" (`datasets`:
        a `save_to_disk` folder, data files such as `*.parquet`, or a hub name).
    path / heldout_path: folder, files or hub name for the train and held-out sets ("folder"/"hf").
    split / heldout_split: `datasets` split names ("hf"), or ShapeWorld splits.
    num_samples: ShapeWorld training set size (null: the split's default); heldout_samples: images used for
        periodic evaluation (all sources).
    verify: open every image header of a folder once at start, skipping and counting unreadable files.
    num_workers: DataLoader worker processes (0: load in the training process).
    cache_mb: keep each loaded item in memory (up to this many MB; 0: off), so every epoch after the first skips
        rendering or decoding. Items are stored compactly (images as uint8 when that is exact) and returned
        bit-identical, so a run trains exactly as it would without the cache. Needs num_workers 0: a worker process
        would keep its own copy.
    procedural_share: share of training images replaced by label-free procedural images
        (`uniflow.data.procedural`: flat fields, gradients, texture, hard and soft edges in any colour), so a
        tokenizer learns more than one dataset's look; 0 (the default) trains on the dataset alone. Held-out
        evaluation never uses them. Tasks that need labels refuse a share above 0.
    dead_leaves_share: share of training images replaced by textured dead-leaves images
        (`uniflow.data.dead_leaves`: occlusion at every scale, pink-noise and grating textures, blur, grain), a
        stand-in for photographs; same rules as procedural_share, and the two shares add up to at most 1.
    """

    source: str = "shapeworld"
    path: str | None = None
    heldout_path: str | None = None
    split: str = "train"
    heldout_split: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    image_size: int = 64
    num_samples: int | None = None
    heldout_samples: int = 256
    seed: int = 0
    num_workers: int = 0
    cache_mb: float = 0.0
    verify: bool = True
    procedural_share: float = 0.0
    dead_leaves_share: float = 0.0

    def __post_init__(self) -> None:
        check_number("procedural_share", self.procedural_share, 0.0, 1.0)
        check_number("dead_leaves_share", self.dead_leaves_share, 0.0, 1.0)
        if self.procedural_share + self.dead_leaves_share > 1.0:
            raise ConfigError(f"data.procedural_share + data.dead_leaves_share must be at most 1, got "
                              f"{self.procedural_share} + {self.dead_leaves_share}")
        check_choice("source", self.source, SOURCES)
        check_number("image_size", self.image_size, 1, None)
        if self.num_samples is not None:
            check_number("num_samples", self.num_samples, 1, None)
        check_number("heldout_samples", self.heldout_samples, 0, None)
        check_number("seed", self.seed, 0, None)
        check_number("num_workers", self.num_workers, 0, None)
        check_number("cache_mb", self.cache_mb, 0.0, None)
        if self.cache_mb and self.num_workers:
            raise ConfigError(f"data.cache_mb: the in-memory cache needs data.num_workers 0 (each worker process would "
                              f"keep its own copy); got num_workers {self.num_workers}")


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float in [0, 1]: shorter side resized to `size`, then centre-cropped.

    The same function as inference's `prepare(resize=True)` (`uniflow.images.preprocess`), so a file gives identical
    tensors in training and at inference."""
    return preprocess(image, size)


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` (ImageNet layout); classes are the sorted sub-folder names.

    Unreadable files are skipped and counted (`self.skipped`) with one warning naming them; a folder where nothing
    is readable, or with no images at all, is an error naming the folder. A file that opens but fails to decode later
    (truncated data) is replaced by the next readable sample, with a warning.
    """

    def __init__(self, root: str | Path, image_size: int, verify: bool = True, field: str = "data.path") -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"{field}: data folder {root} not found")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                    files.append((path, label))
        if not files:
            raise ConfigError(
                f"{field}: no images found in {root} (expected the ImageNet layout {root}/<class>/<image>, "
                f"extensions {', '.join(IMAGE_EXTENSIONS[:5])}, ...)"
            )
        self.skipped: list[tuple[Path, str]] = []
        if verify:
            good = []
            for path, label in files:
                try:
                    probe_image(path)  # the header only: unreadable files and pixel-limit bombs are skipped
                    good.append((path, label))
                except ImageInputError as exc:
                    self.skipped.append((path, f"{type(exc).__name__}: {exc}"))
            if not good:
                raise ImageInputError(
                    f"{field}: all {len(files)} images in {root} are unreadable (first: {self.skipped[0][0]}: "
                    f"{self.skipped[0][1]})"
                )
            if self.skipped:
                shown = "; ".join(f"{p}: {why}" for p, why in self.skipped[:3])
                more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
                warnings.warn(
                    f"{root}: skipped {len(self.skipped)} unreadable image(s) of {len(files)}: {shown}{more}",
                    stacklevel=2,
                )
            files = good
        self.root = root
        self.classes = classes
        self.files = files
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.files)):
            path, label = self.files[(index + attempt) % len(self.files)]
            try:
                image = to_tensor(open_image(path, size=self.image_size), self.image_size)
            except ImageInputError as exc:
                warnings.warn(f"{path}: cannot decode ({exc}); using the next image instead", stacklevel=2)
                continue
            return {"image": image, "label": label, "index": index}
        raise ImageInputError(f"{self.root}: no image could be decoded")


class HFImageDataset(Dataset):
    """Rows of a `datasets.Dataset` (or any indexable of dicts) with an image column and an optional label column."""

    def __init__(self, rows: Sequence[dict[str, Any]], image_size: int, image_key: str = "image",
                 label_key: str = "label", source: str = "data.path") -> None:
        if len(rows) == 0:
            raise ConfigError(f"{source}: the dataset is empty")
        columns = getattr(rows, "column_names", None) or list(rows[0].keys())
        if image_key not in columns:
            raise ConfigError(f"{source}: no column {image_key!r} (data.image_key); columns are {columns}")
        self.rows = rows
        self.image_size = image_size
        self.image_key = image_key
        self.label_key = label_key if label_key in columns else None

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, value: Any) -> Image.Image:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                import io

                return open_image(io.BytesIO(value["bytes"]), size=self.image_size,
                                  name=f"column {self.image_key!r} (bytes)")
            if value.get("path"):
                return open_image(value["path"], size=self.image_size)
        if isinstance(value, (str, Path)):
            return open_image(value, size=self.image_size)
        if isinstance(value, np.ndarray):
            return Image.fromarray(value)
        raise ImageInputError(f"column {self.image_key!r}: cannot read an image from {type(value).__name__}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[int(index)]
        image = to_tensor(self._image(row[self.image_key]), self.image_size)
        label = int(row[self.label_key]) if self.label_key is not None else -1
        return {"image": image, "label": label, "index": int(index)}


def load_hf_rows(path: str, split: str | None, field: str = "data.path") -> Any:
    """A `datasets` split from a `save_to_disk` folder, local data files (parquet/json/csv/arrow/imagefolder), or a
    hub name (needs a network). `datasets` is imported here only: it is an optional dependency."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{field}: data.source 'hf' needs the `datasets` package (pip install datasets)") from None
    local = Path(path)
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                           or (local / "state.json").is_file()):
        ds = datasets.load_from_disk(str(local))
    elif local.suffix in builders or any(ch in path for ch in "*?"):
        suffix = local.suffix if local.suffix in builders else Path(path.replace("*", "x")).suffix
        if suffix not in builders:
            raise ConfigError(f"{field}: cannot tell the file format of {path} (use .parquet, .json(l), .csv, .arrow)")
        ds = datasets.load_dataset(builders[suffix], data_files=path)
    elif local.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(local))
    else:
        ds = datasets.load_dataset(path)
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise ConfigError(f"{field}: {path} has no split {name!r}; splits are {sorted(ds)}")
        ds = ds[name]
    return ds


class MixedImageDataset(Dataset):
    """`base` with shares of its items replaced by label-free images: item i is procedural when a draw from (seed, i)
    falls under `share`, dead leaves when it falls in the next `dead_leaves_share`, so the mix is a pure function of
    the index (resumable, the same on every rank). Replaced items carry label -1."""

    def __init__(self, base: Dataset, share: float, seed: int, image_size: int, dead_leaves_share: float = 0.0) -> None:
        from uniflow.data.dead_leaves import DeadLeavesDataset
        from uniflow.data.procedural import ProceduralDataset

        check_number("procedural_share", share, 0.0, 1.0)
        check_number("dead_leaves_share", dead_leaves_share, 0.0, 1.0 - share)
        self.base, self.share, self.seed = base, share, seed
        self.dead_leaves_share = dead_leaves_share
        self.procedural = ProceduralDataset(len(base), seed=seed, image_size=image_size)
        self.dead_leaves = DeadLeavesDataset(len(base), seed=seed, image_size=image_size)

    def __len__(self) -> int:
        return len(self.base)

    def source(self, index: int) -> str:
        """"procedural", "dead_leaves" or "base": where item `index` comes from."""
        draw = np.random.default_rng([0x313, self.seed, int(index)]).random()
        if draw < self.share:
            return "procedural"
        return "dead_leaves" if draw < self.share + self.dead_leaves_share else "base"

    def is_procedural(self, index: int) -> bool:
        return self.source(index) == "procedural"

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.source(index)
        if source == "procedural":
            return self.procedural[index]
        return self.dead_leaves[index] if source == "dead_leaves" else self.base[index]


class CachedDataset(Dataset):
    """`base` with each item kept in memory after its first load, up to `max_mb` (later items pass through uncached).

    Why: ShapeWorld renders every image on the CPU that trains (~1 ms an image with its per-patch targets, 15% of the
    teacher's step on 2 cores), and a DataLoader worker there only competes with the matrix multiplies; the teacher
    sees each of its 50k images ~5 times, so keeping them makes every epoch after the first almost free. Items must
    be a pure function of their index (every dataset here is: there is no random augmentation).

    Float tensors that are exactly uint8 / 255 (every image here) are stored as uint8 and integer tensors whose
    values fit as int8, both converted back on the way out, so an item is returned bit-identical at a quarter of the
    memory; anything else is stored as it is."""

    def __init__(self, base: Dataset, max_mb: float) -> None:
        check_number("cache_mb", max_mb, 0.0, None, lo_open=True)
        self.base = base
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.items: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the base dataset's own attributes (classes, skipped, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        packed = self.items.get(index)
        if packed is not None:
            return _unpack(packed)
        item = self.base[index]
        if self.bytes < self.max_bytes:
            packed, size = _pack(item)
            self.items[index] = packed
            self.bytes += size
        return item


def _pack(value: Any) -> tuple[Any, int]:
    """(compact copy of an item, its tensor bytes): see `CachedDataset`."""
    if isinstance(value, dict):
        parts = {k: _pack(v) for k, v in value.items()}
        return {k: p for k, (p, _) in parts.items()}, sum(n for _, n in parts.values())
    if not isinstance(value, torch.Tensor):
        return value, 0
    stored, kind = value, None
    if value.dtype == torch.float32 and value.numel():
        as_u8 = value.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        if torch.equal(as_u8.float().div_(255.0), value):
            stored, kind = as_u8, "u8"
    elif value.dtype in (torch.int64, torch.int32, torch.int16) and value.numel() \
            and int(value.min()) >= -128 and int(value.max()) <= 127:
        stored, kind = value.to(torch.int8), value.dtype
    if stored is value:
        stored = value.clone()
    return (_Packed(stored, kind), stored.numel() * stored.element_size())


class _Packed:
    __slots__ = ("tensor", "kind")

    def __init__(self, tensor: torch.Tensor, kind: Any) -> None:
        self.tensor, self.kind = tensor, kind


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    if not isinstance(value, _Packed):
        return value
    if value.kind == "u8":
        return value.tensor.float().div_(255.0)
    if value.kind is not None:
        return value.tensor.to(value.kind)
    return value.tensor.clone()


def build_dataset(data: ImageDataConfig, heldout: bool = False) -> Dataset | None:
    """The training (or held-out) dataset an ImageDataConfig describes; held-out is None when none is configured.
    A `procedural_share` or `dead_leaves_share` above 0 mixes those images into the training set only."""
    dataset = _build_source(data, heldout)
    if heldout or data.procedural_share + data.dead_leaves_share == 0 or dataset is None:
        return dataset
    return MixedImageDataset(dataset, data.procedural_share, data.seed, data.image_size, data.dead_leaves_share)


def _build_source(data: ImageDataConfig, heldout: bool) -> Dataset | None:
    if data.source == "shapeworld":
        from uniflow.data.shapeworld import ShapeWorldDataset

        if heldout:
            if data.heldout_samples <= 0:
                return None
            return ShapeWorldDataset("heldout", num_samples=data.heldout_samples, seed=data.seed,
                                     image_size=data.image_size)
        return ShapeWorldDataset(data.split if data.split in ("train", "heldout") else "train",
                                 num_samples=data.num_samples, seed=data.seed, image_size=data.image_size)
    path = data.heldout_path if heldout else data.path
    field = "data.heldout_path" if heldout else "data.path"
    if path is None:
        if heldout:
            if data.source == "hf" and data.heldout_split and data.path:
                return HFImageDataset(load_hf_rows(data.path, data.heldout_split, "data.heldout_split"),
                                      data.image_size, data.image_key, data.label_key, "data.heldout_split")
            return None
        raise ConfigError(f"{field}: required for data.source={data.source!r}")
    if data.source == "folder":
        return ImageFolderDataset(path, data.image_size, data.verify, field)
    split = data.heldout_split if heldout else data.split
    return HFImageDataset(load_hf_rows(path, split, field), data.image_size, data.image_key, data.label_key, field)


class ResumableShardSampler(Sampler[int]):
    """Indices of this rank's shard of one epoch, from any position within it.

    Each epoch is a permutation seeded by (seed, epoch), padded by wrap-around to a multiple of the world size and
    dealt round-robin to ranks, so every rank has the same number of samples (no rank waits forever in a collective).
    `set_epoch(epoch, start)` skips the `start` samples this rank already consumed: the data position of a checkpoint.
    Uses its own generator, never the global RNG (which would shift the training noise after a resume).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if size <= 0:
            raise ConfigError("the training dataset is empty")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = max(0, min(start, self.per_rank))

    def shard(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def length_grouped(groups: Iterable[list[Any]], micro: int, length: Callable[[Any], int], seed: int, epoch: int,
                   first_group: int = 0, skip: int = 0) -> Iterator[list[Any]]:
    """Micro-batches of similar length: each group of loaded samples (the sampler's next `micro * k` indices) is
    sorted by `length`, cut into `micro`-sized batches (a remainder under `micro` is dropped, as `drop_last` does) and
    those batches are shuffled by (seed, epoch, group number).

    Why: a batch is padded to its longest sample, so random batches of conversations 28-118 tokens long spend ~40% of
    the LLM's compute on padding; sorted groups spend almost none (LLaVA's `group_by_modality_length` idea). The order
    depends only on the sampler's order and the group number, so a resumed run, which starts at its group's first
    sample (`first_group`) and skips the `skip` batches already trained on, sees the same batches."""
    for number, items in enumerate(groups, start=first_group):
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        batches = [order[i:i + micro] for i in range(0, len(order) - micro + 1, micro)]
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + number)
        shuffled = torch.randperm(len(batches), generator=g).tolist()
        for k in shuffled[skip if number == first_group else 0:]:
            yield [items[i] for i in batches[k]]
