"""Projectors: encoder tokens (B, N, D) on a (rows, cols) grid -> LLM input embeddings (B, T, H).

- "mlp": LLaVA-1.5's two-layer MLP (Linear, GELU, Linear), one LLM position per encoder token (T = N).
- "pixel_shuffle": InternVL's pixel shuffle with scale 0.5: every 2x2 block of neighbouring tokens is concatenated
  into one 4D-wide token (T = N / 4), then LayerNorm and the same MLP. Fewer visual positions is what makes the LLM
  cheaper per image (64 -> 16 positions for a 64-px ShapeWorld image with patch 8).

With `position_embedding`, a learned vector per visual position (zero at the start) is added to the projector's
output, so each visual token states its 2-D place rather than leaving the LLM to infer it from the run's order. On
the ShapeWorld MLLM it did not change position answers (51.5% -> 53.0%): zero at the start, its vectors grew to
only ~1% of the projected tokens' norm (docs/results.md), so they never carried a usable signal; it stays an option.

With `sincos_position`, a fixed 2-D sin-cos embedding (`uniflow.pos_embed.sincos_2d`, values in [-1, 1]) is added to
the MLP's input, after the pixel shuffle's LayerNorm: each merged token enters the MLP with its place at the same
per-channel scale as its content, so the place is a signal from the first step. Being fixed, it holds for any grid.
On the ShapeWorld MLLM it helped stage 1 (caption held-out loss 0.62 against 0.74) but not the answers: 74.0% of the
200 held-out questions of the training's own evaluation against 81.5%, position 42.5% against 55.0% (docs/results.md),
so the shipped recipe keeps the learned embedding; it stays an option.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.config import ProjectorConfig
from uniflow.errors import ImageInputError
from uniflow.pos_embed import sincos_2d


def pixel_shuffle(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, rows*cols, D) row-major tokens -> (B, rows/2 * cols/2, 4D): each 2x2 block concatenated (top-left,
    top-right, bottom-left, bottom-right), blocks in row-major order."""
    b, n, d = tokens.shape
    rows, cols = grid
    if rows * cols != n:
        raise ImageInputError(f"pixel shuffle: a {rows}x{cols} grid has {rows * cols} cells, got {n} tokens")
    if rows % 2 or cols % 2:
        raise ImageInputError(f"pixel shuffle merges 2x2 blocks: the encoder's grid {rows}x{cols} must have even "
                              f"sides (choose an image size that is a multiple of twice the patch size)")
    x = tokens.reshape(b, rows // 2, 2, cols // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (rows // 2) * (cols // 2), 4 * d)


def num_visual_tokens(projector_type: str, grid: tuple[int, int]) -> int:
    """LLM positions one image of this encoder grid takes with this projector type."""
    rows, cols = grid
    return rows * cols // 4 if projector_type == "pixel_shuffle" else rows * cols


class Projector(nn.Module):
    """Encoder tokens -> LLM embeddings, by config type (see the module docstring). `grid`: the encoder's token grid,
    needed for the position embedding (one vector per visual position)."""

    def __init__(self, config: ProjectorConfig, vision_width: int, llm_width: int,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.type = config.type
        self.vision_width = vision_width
        self.llm_width = llm_width
        width_in = vision_width * (4 if config.type == "pixel_shuffle" else 1)
        hidden = config.hidden or llm_width
        self.norm = nn.LayerNorm(width_in) if config.type == "pixel_shuffle" else nn.Identity()
        self.fc1 = nn.Linear(width_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_width)
        self.grid = grid
        self.position: nn.Parameter | None = None
        if config.position_embedding:
            if grid is None:
                raise ValueError("Projector: position_embedding needs the encoder's grid")
            self.position = nn.Parameter(torch.zeros(num_visual_tokens(config.type, grid), llm_width))
        self.sincos_position = config.sincos_position
        if self.sincos_position and width_in % 4:
            raise ValueError(f"Projector: sincos_position needs an input width divisible by 4, got {width_in}")

    def place_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid of the projector's output positions (half each side after the pixel shuffle)."""
        rows, cols = grid
        return (rows // 2, cols // 2) if self.type == "pixel_shuffle" else (rows, cols)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """LLM positions one image of this encoder grid takes."""
        return num_visual_tokens(self.type, grid)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.position is not None and tuple(grid) != tuple(self.grid):
            raise ImageInputError(f"projector: its position embedding is for a {self.grid[0]}x{self.grid[1]} token "
                                  f"grid, got {grid[0]}x{grid[1]} (images must be the encoder's native size)")
        if self.type == "pixel_shuffle":
            tokens = pixel_shuffle(tokens, grid)
        tokens = self.norm(tokens)
        if self.sincos_position:
            tokens = tokens + sincos_2d(tokens.shape[-1], self.place_grid(grid)).to(tokens.device, tokens.dtype)
        out = self.fc2(self.act(self.fc1(tokens)))
        return out if self.position is None else out + self.position.to(out.dtype)
