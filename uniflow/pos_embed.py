"""2-D sin-cos position embeddings and their resizing to another token grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, dim) embedding in raster order: the first half of the channels encodes the column, the second the row
    (the MAE layout the release initialises from)."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return emb.float()


def resize_grid_embedding(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a (1, gh*gw, D) learnable embedding to another grid; identity when the grids match."""
    if tuple(src) == tuple(dst):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, src[0], src[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=dst, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], dim)
