"""Turning user images (files, PIL, uint8/uint16/float tensors and arrays) into (B, 3, H, W) float batches in [0, 1],
and back. The one loader and the one resize + centre-crop used by training data and inference alike.

Every failure here is an ImageInputError that names the input, so no PIL or torch error escapes to the user. Sizes in
messages are width x height, as every image tool writes them.

Modes: 16-bit grey (`I;16*`, and `I` holding 16-bit values) is scaled by 65535; float `F` images must lie in [0, 1]
(taken as is; anything else is refused rather than guessed); EXIF orientation is applied; an animated file gives its
first frame, with a warning; palette, grey+alpha, RGBA, CMYK, YCbCr and the rest become RGB (alpha over white).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from uniflow.errors import ImageInputError

ImageLike = Image.Image | torch.Tensor | np.ndarray
MIN_SIDE = 2
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "UNIFLOW_MAX_PIXELS"
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def pixel_limit(override: int | None = None) -> int:
    """The pixel limit in force: the argument, else $UNIFLOW_MAX_PIXELS, else DEFAULT_MAX_PIXELS (64 megapixels)."""
    if override is not None:
        return int(override)
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise ImageInputError(f"${MAX_PIXELS_ENV}: expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ImageInputError(f"${MAX_PIXELS_ENV}: expected a positive integer, got {raw!r}")
    return value


def _check_pixels(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ImageInputError(
            f"{name}: image of {width}x{height} pixels ({width * height / 1e6:.1f} MP) exceeds the limit of "
            f"{limit / 1e6:g} MP; raise it with ${MAX_PIXELS_ENV}=<pixels> (or max_pixels=...) if you trust the file")


def open_image(path: str | Path | BinaryIO, max_pixels: int | None = None, size: int | None = None,
               name: str | None = None) -> Image.Image:
    """Open an image file (a path, or a binary file object such as BytesIO) as RGB, checking its pixel count from the
    header before decoding (limit: `pixel_limit(max_pixels)`).

    `size`: the side the image will be resized to (see `preprocess`); JPEGs are then decoded at a reduced scale
    (PIL's `draft`, still at least twice `size`), which bounds memory for huge photos.
    """
    if isinstance(path, (str, Path)):
        path = Path(path)
        name = name or str(path)
        if not path.is_file():
            raise ImageInputError(f"{name}: image file not found" + (" (it is a folder)" if path.is_dir() else ""))
    name = name or "image"
    limit = pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is the check
            with Image.open(path) as img:
                if size is not None and img.format == "JPEG":
                    w, h = img.size
                    scale = 2 * size / min(w, h)
                    if scale < 1:
                        img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
                _check_pixels(name, *img.size, limit)
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    warnings.warn(f"{name}: animated image with {frames} frames; using the first", stacklevel=2)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return to_rgb(img, name)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except MemoryError:
        raise ImageInputError(f"{name}: out of memory decoding the image; lower ${MAX_PIXELS_ENV}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for foreign files
        raise ImageInputError(f"{name}: cannot read image ({type(exc).__name__}: {exc})") from None


def probe_image(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the header only, with the same checks as `open_image` (cheap: nothing is decoded)."""
    name = str(path)
    limit = pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(name, *img.size, limit)
                return img.size
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except Exception as exc:
        raise ImageInputError(f"{name}: cannot read image ({type(exc).__name__}: {exc})") from None


def load_image(path: str | Path, max_pixels: int | None = None, size: int | None = None) -> Image.Image:
    """Alias of `open_image` (the name the first releases used)."""
    return open_image(path, max_pixels, size)


def _high_bit_to_rgb(img: Image.Image, name: str) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        if arr.size and not np.isfinite(arr).all():
            raise ImageInputError(f"{name}: float (mode F) image holds NaN or inf values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ImageInputError(f"{name}: float (mode F) image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                                  f"rescale it before use")
        scaled = arr.astype(np.float64)
    else:
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageInputError(f"{name}: 32-bit integer (mode I) image values must lie in [0, 65535] (16-bit), "
                                  f"got [{arr.min()}, {arr.max()}]")
        scaled = arr / 65535.0
    grey = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit grey by its real range, F in [0, 1], alpha composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES or img.mode == "F":
        return _high_bit_to_rgb(img, name)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"{name}: cannot convert mode {img.mode} to RGB ({exc})") from None


def pil_to_tensor(img: Image.Image, name: str = "image") -> torch.Tensor:
    """PIL image (any mode) -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(to_rgb(img, name), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _range_error(name: str, lo: float, hi: float) -> ImageInputError:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ImageInputError(f"{name}: holds NaN or inf values (range [{lo:.3g}, {hi:.3g}]); images must be finite "
                               f"and lie in [0, 1]")
    return ImageInputError(f"{name}: float images must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}]")


def _tensor_to_chw(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (3, H, W), (H, W, 3), (1, H, W) or (H, W); uint8/uint16 or float in [0, 1] (fp16/bf16/fp64 too)."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ImageInputError(f"{name}: expected an image tensor with 2 or 3 dims, got shape {tuple(x.shape)}")
    if x.shape[0] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(2, 0, 1)
    if x.shape[0] not in (1, 3, 4):
        raise ImageInputError(f"{name}: expected 1, 3 or 4 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == torch.uint16:
        x = x.to(torch.int32).float() / 65535.0
    elif x.is_floating_point():
        x = x.float()
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.item(), hi.item()
            if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN, which fails every comparison
                raise _range_error(name, lo, hi)
    else:
        raise ImageInputError(f"{name}: unsupported dtype {x.dtype}; use uint8, uint16 or float in [0, 1]")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3] * x[3:] + (1 - x[3:])
    return x


def _as_tensor(item: np.ndarray, name: str) -> torch.Tensor:
    if item.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(item).astype(np.int32)).float() / 65535.0
    try:
        return torch.from_numpy(np.ascontiguousarray(item))
    except TypeError:
        raise ImageInputError(f"{name}: unsupported numpy dtype {item.dtype}; use uint8, uint16 or float") from None


def to_batch(images: ImageLike | Sequence[ImageLike], size: int | None = None) -> torch.Tensor:
    """Stack PIL images, arrays or tensors into a (B, 3, H, W) float32 batch in [0, 1].

    `size`: resize (shorter side) and centre-crop each image to size x size with `preprocess`, so images of
    different sizes can share a batch; None keeps their size (they must then share it).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point():
        batch = _checked_float_batch(images)
        return batch if size is None else resize_center_crop(batch, size)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        items = [images]
    elif isinstance(images, (str, Path)):
        raise ImageInputError(f"{images}: a path, not an image; open it with uniflow.images.open_image first")
    else:
        try:
            items = list(images)
        except TypeError:
            raise ImageInputError(f"unsupported input type {type(images).__name__}; use PIL images, numpy arrays "
                                  f"or torch tensors") from None
    if not items:
        raise ImageInputError("no images given (empty batch)")
    tensors = []
    for i, item in enumerate(items):
        name = f"image {i}"
        if isinstance(item, Image.Image):
            t = pil_to_tensor(item, name) if size is None else preprocess(item, size, name)
        elif isinstance(item, np.ndarray):
            t = _tensor_to_chw(_as_tensor(item, name), name)
        elif isinstance(item, torch.Tensor):
            t = _tensor_to_chw(item, name)
        else:
            raise ImageInputError(f"{name}: unsupported type {type(item).__name__}; use PIL, numpy or torch")
        if min(t.shape[-2:]) < MIN_SIDE:
            raise ImageInputError(f"{name}: image of size {t.shape[-1]}x{t.shape[-2]} is too small "
                                  f"(each side needs at least {MIN_SIDE} pixels)")
        if size is not None and not isinstance(item, Image.Image):
            t = resize_center_crop(t[None], size)[0]
        tensors.append(t)
    sizes = {(t.shape[-1], t.shape[-2]) for t in tensors}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise ImageInputError(f"images in one batch must share a size, got {shown}; pass resize=True (--resize) "
                              f"or resize them first")
    return torch.stack(tensors)


def _checked_float_batch(images: torch.Tensor) -> torch.Tensor:
    """The fast path for training batches: finiteness and range in one reduction, one device sync per batch."""
    if images.shape[0] == 0:
        raise ImageInputError(f"empty batch: tensor of shape {tuple(images.shape)} holds no images")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ImageInputError(f"images of size {images.shape[-1]}x{images.shape[-2]} are too small "
                              f"(each side needs at least {MIN_SIDE} pixels)")
    images = images.float()
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()  # NaN propagates into both; inf into one
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):
        flat = images.detach().flatten(1)
        bad = (~torch.isfinite(flat)) | (flat < -1e-3) | (flat > 1 + 1e-3)
        first = int(bad.any(1).nonzero()[0, 0])
        raise _range_error(f"images[{first}] of the batch", lo, hi)
    return images


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased) and centre-crop to size x size."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top:top + size, left:left + size].clamp(0, 1)


def preprocess(image: Image.Image, size: int, name: str = "image") -> torch.Tensor:
    """The one preprocessing of training data and of `prepare(resize=True)`: PIL image -> (3, size, size) in [0, 1].

    Images over four times `size` are first box-reduced by an integer factor (PIL `reduce`, still at least twice
    `size`) so the float tensor stays small; then `resize_center_crop`.
    """
    factor = min(image.size) // (2 * size)
    if factor >= 2:
        image = to_rgb(image, name).reduce(factor)
    return resize_center_crop(pil_to_tensor(image, name)[None], size)[0]


def check_latents(latents: torch.Tensor | np.ndarray, channels: int, name: str = "latents") -> torch.Tensor:
    """Latents (B, N, channels) as a float tensor: numpy arrays accepted, NaN/inf refused (one sync)."""
    if isinstance(latents, np.ndarray):
        latents = _as_tensor(latents, name)
    if not isinstance(latents, torch.Tensor):
        raise ImageInputError(f"{name}: expected a torch tensor or numpy array, got {type(latents).__name__}")
    if latents.ndim != 3 or latents.shape[-1] != channels:
        raise ImageInputError(f"{name}: expected shape (B, N, {channels}), got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ImageInputError(f"{name}: expected a float tensor, got {latents.dtype}")
    if latents.shape[0] == 0 or latents.shape[1] == 0:
        raise ImageInputError(f"{name}: empty, shape {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ImageInputError(f"{name}: hold NaN or inf values; refusing to decode them")
    return latents


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> list of RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
