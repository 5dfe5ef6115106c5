"""Turning user images (PIL, uint8 or float tensors, files) into (B, 3, H, W) float batches in [0, 1], and back.

Every failure here is an ImageInputError that names the input, so no torch shape error escapes to the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from uniflow.errors import ImageInputError

ImageLike = Image.Image | torch.Tensor | np.ndarray
MIN_SIDE = 2


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{path}: cannot read image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Grey, palette, CMYK and RGBA images become RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _tensor_to_chw(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (3, H, W), (H, W, 3), (1, H, W) or (H, W); uint8 in [0, 255] or float in [0, 1]."""
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
    elif x.is_floating_point():
        x = x.float()
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ImageInputError(f"{name}: float images must lie in [0, 1], got range "
                                  f"[{x.min().item():.3g}, {x.max().item():.3g}]")
    else:
        raise ImageInputError(f"{name}: unsupported dtype {x.dtype}; use uint8 or float")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3] * x[3:] + (1 - x[3:])
    return x


def to_batch(images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
    """Stack PIL images, arrays or tensors into a (B, 3, H, W) float batch in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point():
        return _checked_float_batch(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = [torch.from_numpy(a) for a in images]
    elif isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise ImageInputError("no images given")
    tensors = []
    for i, item in enumerate(items):
        name = f"image {i}"
        if isinstance(item, Image.Image):
            t = _pil_to_tensor(item)
        elif isinstance(item, np.ndarray):
            t = _tensor_to_chw(torch.from_numpy(np.ascontiguousarray(item)), name)
        elif isinstance(item, torch.Tensor):
            t = _tensor_to_chw(item, name)
        else:
            raise ImageInputError(f"{name}: unsupported type {type(item).__name__}; use PIL, numpy or torch")
        if min(t.shape[-2:]) < MIN_SIDE:
            raise ImageInputError(f"{name}: image of size {t.shape[-1]}x{t.shape[-2]} is too small")
        tensors.append(t)
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ImageInputError(f"images in one batch must share a size, got {sorted(sizes)}; resize them first")
    return torch.stack(tensors)


def _checked_float_batch(images: torch.Tensor) -> torch.Tensor:
    """The fast path for training batches: one range check for the whole batch (one device sync, not B)."""
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ImageInputError(f"images of size {images.shape[-1]}x{images.shape[-2]} are too small")
    lo, hi = torch.aminmax(images.detach())
    if lo.item() < -1e-3 or hi.item() > 1 + 1e-3:
        raise ImageInputError(f"float images must lie in [0, 1], got range [{lo.item():.3g}, {hi.item():.3g}]")
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


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> list of RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
