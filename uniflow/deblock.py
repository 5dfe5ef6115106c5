"""A deblocking filter for patch-wise decoders, as video codecs have one after their block transforms.

The pixel flow decoder draws every patch on its own (its global blocks share context, but each patch's pixels come
from its own flow), so two neighbours can disagree by a level or two where they meet: on flat areas and smooth
gradients the eye finds that grid at once, although it costs almost nothing in PSNR. The filter looks at every patch
border, estimates the step there beyond the local gradient (the *excess*), and where that excess is small (an
artefact, not an edge of the picture) spreads it as a ramp over `reach` pixels on each side. A real edge, whose
excess is large, is left alone; the gate falls linearly from 1 at no excess to 0 at `threshold`.

It reads only the decoded image (no side information), so it serves any decode: reconstructions and generated
images alike.
"""

from __future__ import annotations

import torch

from uniflow.configs import check_int, check_number


def _deblock_last_axis(images: torch.Tensor, patch: int, threshold: float, reach: int) -> torch.Tensor:
    """Deblock the borders between patches along the last axis (vertical borders of a (..., C, H, W) tensor)."""
    *lead, channels, height, width = images.shape
    n = width // patch
    if n < 2:
        return images
    x = images.reshape(*lead, channels, height, n, patch)
    p0, p1 = x[..., :-1, -1], x[..., :-1, -2]  # left of each border: the last two pixels of the patch before it
    q0, q1 = x[..., 1:, 0], x[..., 1:, 1]      # right: the first two of the patch after it
    step = q0 - p0
    gradient = 0.5 * ((p0 - p1) + (q1 - q0))   # the step a smooth continuation would take
    excess = step - gradient                   # (..., C, H, n-1)
    gate = (1.0 - excess.abs().amax(dim=-3, keepdim=True) / threshold).clamp(min=0.0)  # one gate for all channels
    shift = gate * excess
    # the ramp: the pixel d places from the border moves by (reach - d - 1/2) / (2 reach) of the excess, towards the
    # other side, so the step left at the border is the gradient plus excess / (2 reach)
    d = torch.arange(reach, dtype=images.dtype, device=images.device)
    ramp = (reach - d - 0.5) / (2 * reach)
    correction = torch.zeros_like(x)
    correction[..., :-1, patch - reach:] += shift[..., None] * ramp.flip(0)
    correction[..., 1:, :reach] -= shift[..., None] * ramp
    return (x + correction).reshape(images.shape)


def deblock(images: torch.Tensor, patch: int, threshold: float, reach: int | None = None) -> torch.Tensor:
    """Smooth the small steps at the borders of a `patch` grid in (B, C, H, W) images in [0, 1].

    threshold: the excess step (beyond the local gradient, in [0, 1] units, largest over the channels) at which the
    filter stops acting; 0 turns it off. reach: pixels moved on each side of a border (default: half a patch)."""
    check_number("deblock threshold", threshold, 0.0, 1.0)
    if threshold == 0.0:
        return images
    check_int("patch", patch, 2)
    reach = patch // 2 if reach is None else reach
    check_int("deblock reach", reach, 1, patch // 2 + 1)
    if images.ndim != 4 or images.shape[-1] % patch or images.shape[-2] % patch:
        raise ValueError(f"deblock needs (B, C, H, W) images whose sides are multiples of the patch {patch}, "
                         f"got shape {tuple(images.shape)}")
    out = _deblock_last_axis(images, patch, threshold, reach)
    return _deblock_last_axis(out.transpose(-1, -2), patch, threshold, reach).transpose(-1, -2).contiguous()
