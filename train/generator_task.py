"""Task "generator": train the class-conditional AR generator (`generator.ARGenerator`) on a frozen tokenizer's latents.

The model section is a generator preset (tiny, B, L, XL; required) plus `GeneratorConfig` overrides, and
`model.tokenizer`, the tokenizer folder whose latents it models (it must hold latent statistics: `uniflow
latent-stats`). The grid and the token width follow from the tokenizer and `data.image_size`; the classes from the
data (ShapeWorld's 36 named classes, or the sub-folders of an ImageNet-layout folder) unless `model.num_classes` is
set. The generator records the tokenizer's fingerprint and statistics, so its exports refuse another tokenizer.

Latents come from one of two places (`data.latents`):
- `extract` (default): encoded once, before training, into `data.latent_dir` (default `<run_dir>/latents`): shards of
  `data.shard_size` images holding each image's latents and, with `data.hflip`, those of its mirror image (two
  training samples per image). The folder's manifest names the tokenizer fingerprint and the data, so another run
  with the same tokenizer and data reuses it, and a folder of other latents is refused. Under a launcher, rank r
  encodes shards r, r + world, ... and waits for the others' (no collective: this runs before the engine sets up
  the process group).
- `online`: the frozen tokenizer is part of the training module and encodes every batch (random horizontal flips
  with `data.hflip`); no disk, but every step pays for the encoder.

Evaluation: the held-out flow-matching loss with fixed noise (live weights and EMA) and a grid of samples
(`eval.grid_classes` classes spread over all of them, `eval.grid_per_class` samples each, one row per class) in
`<run_dir>/samples/gen_stepN.png`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from generator.fingerprint import short, tokenizer_fingerprint
from generator.model import MODEL_KIND, ARGenerator, GeneratorConfig
from generator.sample import image_grid, sample_latents
from train.data import ImageDataConfig, build_dataset
from train.distributed import all_reduce_sum
from train.tasks import EvalContext, ImageTask, heldout_batches, model_section, module_device_dtype
from uniflow import checkpoint
from uniflow.configs import check_choice, check_number
from uniflow.errors import CheckpointError, ConfigError, OutputError
from uniflow.fileio import atomic_write_file, atomic_write_text, is_temporary
from uniflow.latent_stats import STATS_NAME, LatentStats, read_latent_stats
from uniflow.tokenizer import UniFlowTokenizer, read_tokenizer_config

EVAL_SEED = 4321
LATENT_SOURCES = ("extract", "online")
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
WAIT_SECONDS = 24 * 3600  # how long a rank waits for the other ranks' latent shards


@dataclass
class GeneratorDataConfig(ImageDataConfig):
    """The generator's `data` section: the image source (as the other image tasks) plus where latents come from.

    latents: "extract" (encode once into latent_dir, then train from disk) or "online" (encode every batch).
    latent_dir: the extracted latents (null: <run_dir>/latents); hflip: also train on mirrored images (extract: a
    second latent per image; online: a random flip per sample). shard_size: images per shard file;
    extract_batch_size / extract_device (null: this process's GPU, else the CPU) / latent_dtype: how they are
    encoded and stored.
    """

    latents: str = "extract"
    latent_dir: str | None = None
    hflip: bool = True
    shard_size: int = 8192
    extract_batch_size: int = 64
    extract_device: str | None = None
    latent_dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("latents", self.latents, LATENT_SOURCES)
        check_number("shard_size", self.shard_size, 1, None)
        check_number("extract_batch_size", self.extract_batch_size, 1, None)
        check_choice("latent_dtype", self.latent_dtype, tuple(LATENT_DTYPES))


@dataclass
class GeneratorEvalConfig:
    """The generator's `eval` section. grid_classes: classes in the sample grid, spread evenly over all classes (0:
    no grid); grid_per_class: samples per class (one row each); cfg / steps: sampling options of the grid (null: the
    model's defaults)."""

    grid_classes: int = 12
    grid_per_class: int = 6
    cfg: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        check_number("grid_classes", self.grid_classes, 0, None)
        check_number("grid_per_class", self.grid_per_class, 1, None)
        if self.cfg is not None:
            check_number("cfg", self.cfg, 0.0, None)
        if self.steps is not None:
            check_number("steps", self.steps, 1, 1000)


# ----------------------------------------------------------------------------------------------------- latent shards
def _rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (the engine has not set up the group yet)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


class LatentShards(Dataset):
    """Extracted latents: item i is image i % M, mirrored when i >= M (with flips). Shards are opened lazily, per
    process, and read one item at a time (memory-mapped), so an ImageNet-sized folder never loads whole."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.count = int(manifest["count"])
        self.shard_size = int(manifest["shard_size"])
        self.flips = bool(manifest["hflip"])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count * (2 if self.flips else 1)

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.folder / _shard_name(shard)), "pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = index % self.count
        shard, row = divmod(image, self.shard_size)
        handle = self._handle(shard)
        key = "latents_flip" if index >= self.count else "latents"
        return {"latents": handle.get_slice(key)[row:row + 1][0].float(),
                "label": int(handle.get_slice("labels")[row:row + 1][0]), "index": index}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


def extract_latents(tokenizer: UniFlowTokenizer, dataset: Dataset, folder: Path, key: dict[str, Any], hflip: bool,
                    shard_size: int, batch_size: int, num_workers: int, device: torch.device,
                    dtype: torch.dtype, show_progress: bool = True) -> dict[str, Any]:
    """Encode `dataset` into shards under `folder` (this rank's share; missing shards only) and return the
    manifest once every shard exists. A folder of other latents (another key) or of other files is refused."""
    manifest_path = folder / MANIFEST
    count = len(dataset)
    manifest = {"key": key, "count": count, "shard_size": shard_size, "hflip": hflip,
                "dtype": str(dtype).removeprefix("torch.")}
    rank, world, _ = _rank_world()
    deadline = time.monotonic() + WAIT_SECONDS
    while rank > 0 and not manifest_path.is_file():  # rank 0 checks the folder and writes the manifest
        if time.monotonic() > deadline:
            raise OutputError(f"data.latent_dir: {folder}: rank 0 wrote no latent manifest")
        time.sleep(1.0)
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing != manifest:
            raise OutputError(f"data.latent_dir: {folder} holds latents of another tokenizer, dataset or setting "
                              f"({manifest_path}); choose another data.latent_dir or remove that folder")
    elif folder.is_dir() and any(not is_temporary(p.name) for p in folder.iterdir()):
        raise OutputError(f"data.latent_dir: {folder} is not empty and holds no latent manifest; choose a new or "
                          f"empty folder")
    shards = math.ceil(count / shard_size)
    if rank == 0 and not manifest_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    mine = [s for s in range(shards) if s % world == rank and not (folder / _shard_name(s)).is_file()]
    bar = None
    if mine and show_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(min(shard_size, count - s * shard_size) for s in mine), desc=f"latents {folder.name}",
                   unit="img", file=sys.stderr, dynamic_ncols=True)
    tokenizer = tokenizer.to(device).eval()
    for s in mine:
        indices = range(s * shard_size, min((s + 1) * shard_size, count))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": [], "labels": []}
        for batch in loader:
            images = batch["image"].to(device)
            parts["latents"].append(tokenizer.encode(images).latents.to("cpu", dtype))
            if hflip:
                parts["latents_flip"].append(tokenizer.encode(images.flip(-1)).latents.to("cpu", dtype))
            parts["labels"].append(torch.as_tensor(batch["label"], dtype=torch.long))
            if bar is not None:
                bar.update(len(images))
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        if not bool(torch.isfinite(tensors["latents"].float()).all()):
            raise CheckpointError(f"{folder / _shard_name(s)}: the tokenizer produced non-finite latents")
        from safetensors.torch import save_file

        atomic_write_file(folder / _shard_name(s), lambda tmp, t=tensors: save_file(t, str(tmp)))
    if bar is not None:
        bar.close()
    while not all((folder / _shard_name(s)).is_file() for s in range(shards)):  # other ranks' shards
        if time.monotonic() > deadline:
            raise OutputError(f"data.latent_dir: {folder}: other processes' latent shards did not appear")
        time.sleep(2.0)
    return json.loads(manifest_path.read_text())


# ----------------------------------------------------------------------------------------------------- the module
class GeneratorTrainModule(nn.Module):
    """The generator, plus (online latents) the frozen tokenizer that encodes each batch. Batches carry either
    `latents` (extracted, raw) or `image`; both are normalised with the tokenizer's statistics here."""

    def __init__(self, generator: ARGenerator, tokenizer: UniFlowTokenizer | None, stats: LatentStats | None,
                 hflip: bool) -> None:
        super().__init__()
        self.generator = generator
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.requires_grad_(False)
        self.stats = stats
        self.hflip = hflip

    def train(self, mode: bool = True) -> GeneratorTrainModule:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # frozen: no drop-path or dropout while it encodes
        return self

    def tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        device, dtype = module_device_dtype(self.generator)
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            if self.tokenizer is None:
                raise ConfigError("batches of images need the online tokenizer (data.latents: online)")
            images = batch["image"].to(device)
            if self.training and self.hflip:
                flip = torch.rand(images.shape[0], device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            with torch.no_grad():
                latents = self.tokenizer.encode(images).latents.float()
        if self.stats is None:
            raise ConfigError("the training module has no latent statistics")
        return self.stats.normalize(latents).to(dtype)

    def forward(self, batch: dict[str, Any], mode: str = "loss") -> Any:
        tokens = self.tokens(batch)
        labels = batch["label"].to(tokens.device)
        generator = None
        if mode == "eval":
            generator = torch.Generator(device=tokens.device).manual_seed(EVAL_SEED)
        out = self.generator.loss(tokens, labels, generator)
        return {"loss": out.loss, "metrics": {"loss": out.loss.detach().float(),
                                              "null_fraction": out.null_fraction.detach()}}


def _preset(name: str) -> dict[str, Any]:
    from generator.presets import get_preset

    data = get_preset(name).to_dict()
    data.pop("model_kind", None)
    return data


def _as_ints(value: Any) -> Any:
    """A grid or a width as plain ints for comparing a config value with the derived one ("[4, 4]", (4, 4), 64)."""
    from uniflow.configs import parse_value

    value = parse_value(value) if isinstance(value, str) else value
    try:
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)
    except (TypeError, ValueError):
        return value


def data_classes(data: ImageDataConfig) -> tuple[int | None, list[str] | None]:
    """(number of classes, names) the data defines without reading images: ShapeWorld's named classes, an image
    folder's sub-folders; (None, None) when unknown here (a `datasets` source, a folder not present in a dry run)."""
    if data.source == "shapeworld":
        from uniflow.data.shapeworld import CLASS_NAMES

        return len(CLASS_NAMES), list(CLASS_NAMES)
    if data.source == "folder" and data.path and Path(data.path).is_dir():
        names = sorted(d.name for d in Path(data.path).iterdir() if d.is_dir() and not d.name.startswith("."))
        return len(names), names
    return None, None


class GeneratorTask(ImageTask):
    kind = "generator"
    default_export_ema = True
    data_config: ClassVar[type | None] = GeneratorDataConfig
    eval_config: ClassVar[type | None] = GeneratorEvalConfig
    export_kind = MODEL_KIND
    data: GeneratorDataConfig
    eval_options: GeneratorEvalConfig

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        from generator.presets import PRESETS

        merged, source = model_section(config, _preset, sorted(PRESETS))
        tokenizer_path = merged.pop("tokenizer", None)
        tokenizer_preset = merged.pop("tokenizer_preset", None)
        if tokenizer_path is None:
            raise ConfigError(f"{source}.tokenizer: required (the tokenizer folder whose latents the generator "
                              f"models, e.g. checkpoints/shapeworld/tokenizer)")
        self.tokenizer_path = Path(str(tokenizer_path))
        self.tokenizer: UniFlowTokenizer | None = None
        self.stats: LatentStats | None = None
        if self.tokenizer_path.is_dir():
            self.tokenizer_config = read_tokenizer_config(self.tokenizer_path)
        elif dry_run and tokenizer_preset is not None:
            from uniflow.presets import get_preset as tokenizer_preset_config

            self.tokenizer_config = tokenizer_preset_config(str(tokenizer_preset))
        else:
            hint = " (or, for a dry run, model.tokenizer_preset)" if dry_run else ""
            raise ConfigError(f"{source}.tokenizer: {self.tokenizer_path} is not a tokenizer folder{hint}")
        patch = self.tokenizer_config.encoder.patch_size
        self.check_patch_size(patch)
        self.check_labelled_data()
        side = self.data.image_size // patch
        explicit = dict(config.model)
        for name, value in (("grid", [side, side]), ("token_channels", self.tokenizer_config.decoder.latent_channels)):
            given = explicit.get(name)
            if given is not None and _as_ints(given) != _as_ints(value):
                raise ConfigError(f"{source}.{name}: {given}, but the tokenizer and data.image_size give {value} "
                                  f"(leave it out: it is derived)")
            merged[name] = value
        count, names = data_classes(self.data)
        if count is not None:
            if "num_classes" in explicit and int(explicit["num_classes"]) != count:
                raise ConfigError(f"{source}.num_classes: {explicit['num_classes']}, but the data has {count} "
                                  f"classes")
            merged["num_classes"] = count
            if "class_names" not in explicit:
                merged["class_names"] = names
        self.generator_config = GeneratorConfig.from_dict(merged, source)
        if not dry_run:
            self._attach_tokenizer(source)
            if self.online:
                self.tokenizer = None  # the training module builds its own copy; evaluation decodes with that one

    def _attach_tokenizer(self, source: str) -> None:
        """Load the tokenizer once: its statistics (required), its fingerprint into the generator's config."""
        stats = read_latent_stats(self.tokenizer_path, self.tokenizer_config.decoder.latent_channels)
        if stats is None:
            raise ConfigError(f"{source}.tokenizer: {self.tokenizer_path} has no latent statistics ({STATS_NAME}); "
                              f"compute them first: uniflow latent-stats --tokenizer {self.tokenizer_path} --data "
                              f"{'shapeworld' if self.data.source == 'shapeworld' else self.data.path}")
        self.stats = stats
        self.tokenizer = UniFlowTokenizer.from_pretrained(self.tokenizer_path)
        self.generator_config.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.generator_config.latent_mean = [float(v) for v in stats.mean.tolist()]
        self.generator_config.latent_std = [float(v) for v in stats.std.tolist()]

    @property
    def online(self) -> bool:
        return self.data.latents == "online"

    # ------------------------------------------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        tokenizer = None
        if self.online:
            tokenizer = UniFlowTokenizer.from_config(self.tokenizer_config, load_pretrained_encoder=False)
        return GeneratorTrainModule(ARGenerator(self.generator_config), tokenizer, self.stats, self.data.hflip)

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """Online latents: the frozen tokenizer's weights (it is part of the training module)."""
        if not self.online:
            return None
        return {f"tokenizer.{k}": v for k, v in checkpoint.read_weights(self.tokenizer_path).items()}

    def export_key(self, name: str) -> bool:
        return name.startswith("generator.")

    # ------------------------------------------------------------------------------------------------------- data
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        if self.online:
            return super().build_datasets()
        images = build_dataset(self.data)
        if images is None or len(images) == 0:
            raise ConfigError(f"{self.config.source}: data: the training dataset is empty")
        heldout_images = build_dataset(self.data, heldout=True)
        root = Path(self.data.latent_dir) if self.data.latent_dir else Path(self.config.run_dir) / "latents"
        assert self.tokenizer is not None
        _, _, local_rank = _rank_world()
        device = torch.device(self.data.extract_device or (f"cuda:{local_rank}" if torch.cuda.is_available()
                                                          else "cpu"))
        dtype = LATENT_DTYPES[self.data.latent_dtype]
        key = {"tokenizer": self.generator_config.tokenizer_fingerprint, "source": self.data.source,
               "path": str(Path(self.data.path).resolve()) if self.data.path else None, "split": self.data.split,
               "num_samples": len(images), "seed": self.data.seed, "image_size": self.data.image_size}
        common = {"shard_size": self.data.shard_size, "batch_size": self.data.extract_batch_size,
                  "num_workers": self.data.num_workers, "device": device, "dtype": dtype}
        train = LatentShards(root / "train", extract_latents(self.tokenizer, images, root / "train", key,
                                                             self.data.hflip, **common))
        heldout = None
        if heldout_images is not None and len(heldout_images) > 0:
            held_key = {**key, "split": "heldout", "num_samples": len(heldout_images),
                        "path": str(Path(self.data.heldout_path).resolve()) if self.data.heldout_path else None}
            heldout = LatentShards(root / "heldout", extract_latents(self.tokenizer, heldout_images, root / "heldout",
                                                                     held_key, False, **common))
        self.tokenizer.to("cpu")
        return train, heldout

    # ------------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        out: dict[str, float] = {}
        scopes = ctx.weight_scopes()
        for suffix, scope in scopes:
            with scope():
                out[f"heldout_loss{suffix}"] = self._heldout_loss(ctx)
        if self.eval_options.grid_classes > 0:  # one grid, from the EMA weights when there are any
            suffix, scope = scopes[-1]
            with scope():
                self._grid(ctx, suffix)
        return out

    def _heldout_loss(self, ctx: EvalContext) -> float:
        total = torch.zeros(2, dtype=torch.float64)
        for batch, weight in heldout_batches(ctx.heldout, self.data.heldout_samples, ctx.batch_size, ctx.dist,
                                             ctx.collate):
            loss = float(ctx.forward(batch, mode="eval")["loss"])
            n = float(weight.sum())
            total += torch.tensor([loss * n, n], dtype=torch.float64)
        total = all_reduce_sum(total.to(ctx.dist.device)).cpu()
        return float(total[0] / total[1].clamp_min(1))

    def _grid(self, ctx: EvalContext, suffix: str) -> None:
        """Every rank samples (the same latents: a collective under ZeRO-3); rank 0 decodes and saves."""
        assert ctx.module is not None
        c = self.generator_config
        k = min(self.eval_options.grid_classes, c.num_classes)
        classes = sorted({round(i * (c.num_classes - 1) / max(k - 1, 1)) for i in range(k)})
        labels = [cls for cls in classes for _ in range(self.eval_options.grid_per_class)]
        with ctx.gathered():
            latents = sample_latents(ctx.module.generator, labels, seeds=EVAL_SEED, cfg=self.eval_options.cfg,
                                     steps=self.eval_options.steps)
        if not ctx.dist.is_main:
            return
        tokenizer = ctx.module.tokenizer
        if tokenizer is None:
            if self.tokenizer is None:
                self.tokenizer = UniFlowTokenizer.from_pretrained(self.tokenizer_path)
            tokenizer = self.tokenizer.to(ctx.dist.device)
        stats = ctx.module.generator.latent_stats()
        images = tokenizer.decode(stats.denormalize(latents).to(tokenizer.device), grid=tuple(c.grid),
                                  seed=EVAL_SEED).float().cpu()
        grid = image_grid(images, self.eval_options.grid_per_class)
        path = ctx.run_dir / "samples" / f"gen_step{ctx.step:07d}{suffix}.png"
        atomic_write_file(path, lambda tmp: grid.save(tmp, format="PNG"))

    # ----------------------------------------------------------------------------------------------------- export
    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        prefix = "generator."
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        model = ARGenerator(self.generator_config)
        checkpoint.load_state_strict(model, weights, f"training state of {self.config.run_dir}")
        dest = model.save_pretrained(out_dir, dtype=dtype, overwrite=True)
        print(f"[train] generator for tokenizer {short(self.generator_config.tokenizer_fingerprint)} "
              f"({self.tokenizer_path})", file=sys.stderr)
        return dest
