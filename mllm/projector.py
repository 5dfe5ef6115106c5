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

With `place_words`, each output gets the LLM's own input embeddings of its place words (`mllm.places`: "top",
"middle", "bottom" and "left", "center", "right", mixed by the position's share of each third of the image), scaled
to a learned fraction of that token's norm (0.5 at the start): the place in a form the LLM can copy into an answer.
The vectors come from the base LLM when the model is built (`set_places`) and are saved with the projector. On the
ShapeWorld MLLM (with LoRA on the MLPs too) position answers rose from 53.0% to 67.5% (docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.config import ProjectorConfig
from uniflow.errors import CheckpointError, ImageInputError
from uniflow.pos_embed import sincos_2d

PLACE_SCALE_INIT = 0.5  # the place words' share of a visual token's norm at the start (`place_words`)


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
        self.place_scale: nn.Parameter | None = None
        self._places_checked = False
        if config.place_words and grid is None:
            raise ValueError("Projector: place_words needs the encoder's grid")
        places = torch.zeros(num_visual_tokens(config.type, grid), llm_width) if config.place_words else None
        self.register_buffer("place", places)
        if config.place_words:
            # 1-d: DeepSpeed cannot broadcast a 0-d parameter
            self.place_scale = nn.Parameter(torch.full((1,), PLACE_SCALE_INIT))
        if self.sincos_position and width_in % 4:
            raise ValueError(f"Projector: sincos_position needs an input width divisible by 4, got {width_in}")

    def place_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid of the projector's output positions (half each side after the pixel shuffle)."""
        rows, cols = grid
        return (rows // 2, cols // 2) if self.type == "pixel_shuffle" else (rows, cols)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """LLM positions one image of this encoder grid takes."""
        return num_visual_tokens(self.type, grid)

    def set_places(self, vectors: torch.Tensor) -> None:
        """The place-word vectors of every output position (`mllm.places.place_vectors` of the base LLM)."""
        if self.place is None:
            raise ValueError("Projector: set_places needs place_words in the config")
        if tuple(vectors.shape) != tuple(self.place.shape):
            raise ValueError(f"Projector: place vectors of shape {tuple(vectors.shape)}, expected "
                             f"{tuple(self.place.shape)}")
        with torch.no_grad():
            self.place.copy_(vectors.to(self.place.device, self.place.dtype))

    def add_places(self, out: torch.Tensor) -> torch.Tensor:
        """out + place words at `place_scale` times each token's RMS (the RMS is a scale, not a path for gradients)."""
        if not self._places_checked:
            if not bool(self.place.any()):
                raise CheckpointError("projector: place_words is on but its place vectors were never set (build the "
                                      "model with its base LLM's embeddings, or load a projector saved with them)")
            self._places_checked = True
        rms = out.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
        return out + (self.place_scale * rms).to(out.dtype) * self.place.to(out.dtype)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if (self.position is not None or self.place is not None) and tuple(grid) != tuple(self.grid):
            raise ImageInputError(f"projector: its position embedding is for a {self.grid[0]}x{self.grid[1]} token "
                                  f"grid, got {grid[0]}x{grid[1]} (images must be the encoder's native size)")
        if self.type == "pixel_shuffle":
            tokens = pixel_shuffle(tokens, grid)
        tokens = self.norm(tokens)
        if self.sincos_position:
            tokens = tokens + sincos_2d(tokens.shape[-1], self.place_grid(grid)).to(tokens.device, tokens.dtype)
        out = self.fc2(self.act(self.fc1(tokens)))
        if self.position is not None:
            out = out + self.position.to(out.dtype)
        return out if self.place is None else self.add_places(out)
