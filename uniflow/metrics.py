"""Per-image reconstruction metrics on [0, 1] RGB batches: PSNR and SSIM.

SSIM follows Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per
channel and averaged, i.e. `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`; the tests check that equivalence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) -> (B,) PSNR in dB; identical images give +inf."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """(B, C, H, W) -> (B,) mean SSIM over valid window positions and channels."""
    if min(pred.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), target.double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c).to(x.device)
    filt = lambda z: F.conv2d(z, w, groups=c)
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def patch_border_mask(height: int, width: int, patch: int) -> torch.Tensor:
    """(H, W) True on the first and last row and column of every `patch` x `patch` cell."""
    rows, cols = torch.arange(height) % patch, torch.arange(width) % patch
    return ((rows == 0) | (rows == patch - 1))[:, None] | ((cols == 0) | (cols == patch - 1))[None, :]


def patch_seam_ratio(pred: torch.Tensor, target: torch.Tensor, patch: int) -> float:
    """Mean squared error on the pixels at patch borders over that on the patch interiors.

    A patch-wise decoder without global context leaves visible seams at patch borders (the "grid artifacts" of the
    paper's 0-global-block ablation): they show up as a ratio above 1. Borders are the first and last row and column
    of every `patch` x `patch` cell.
    """
    if patch < 3:
        raise ValueError(f"patch_seam_ratio needs patches of at least 3 pixels (a border and an interior), got {patch}")
    err = (pred.double() - target.double()).pow(2).mean(1)  # (B, H, W)
    border = patch_border_mask(err.shape[-2], err.shape[-1], patch)
    return (err[:, border].mean() / err[:, ~border].mean()).item()


def _border_step_ratio(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean absolute step between neighbouring pixels across patch borders over that inside patches (both axes)."""
    x = images.double()
    steps_w = (x[..., :, 1:] - x[..., :, :-1]).abs()  # step between column j and j + 1
    steps_h = (x[..., 1:, :] - x[..., :-1, :]).abs()
    across_w = (torch.arange(steps_w.shape[-1]) % patch) == patch - 1
    across_h = (torch.arange(steps_h.shape[-2]) % patch) == patch - 1
    border = torch.cat([steps_w[..., across_w].flatten(), steps_h[..., across_h, :].flatten()]).mean()
    inside = torch.cat([steps_w[..., ~across_w].flatten(), steps_h[..., ~across_h, :].flatten()]).mean()
    return border / inside.clamp_min(1e-12)


def patch_edge_ratio(pred: torch.Tensor, target: torch.Tensor, patch: int) -> float:
    """How much more a reconstruction jumps across patch borders than inside patches, relative to the original:
    (mean |step| across borders / mean |step| inside patches) of `pred` over the same of `target`, pooled over the
    images. 1: no grid; a mosaic (smooth patches with jumps between them) scores well above 1.

    Why beside the seam ratio: that one compares errors, and a decoder that returns each patch as a smooth blob of
    about the right colour errs inside the patch as much as at its border (seam ratio ~1, or below with a border
    loss weight) while the grid is plain to see; the grid is the jumps, and this measures them."""
    if patch < 2:
        raise ValueError(f"patch_edge_ratio needs patches of at least 2 pixels, got {patch}")
    reference = _border_step_ratio(target, patch)
    if not reference > 0:
        raise ValueError("patch_edge_ratio: the originals have no steps between pixels (flat images); the ratio is "
                         "undefined")
    return (_border_step_ratio(pred, patch) / reference).item()
