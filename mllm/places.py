"""Place words: each visual position described by the LLM's own embeddings of the words for where it lies.

A visual token reaches the LLM as content only: rotary positions are relative, so a token's row and column must be in
its vector to be read back ("where is the red star?"). A learned position embedding starts at zero and, on the
ShapeWorld MLLM, never grew past 1% of the tokens' norm; a fixed sin-cos code is a signal, but one the LLM has no
word for. Here each position instead carries the LLM's input embeddings of its place words ("top", "middle",
"bottom" for the row; "left", "center", "right" for the column) mixed by how much of the position lies in each third
of the image. An LLM with tied input and output embeddings can then answer by copying what it attends to, the way it
copies any word of its context.
"""

from __future__ import annotations

from typing import Any

import torch

ROW_WORDS: tuple[str, ...] = (" top", " middle", " bottom")
COLUMN_WORDS: tuple[str, ...] = (" left", " center", " right")


def third_weights(cells: int) -> torch.Tensor:
    """(cells, 3): the share of each of `cells` equal spans of [0, 1) lying in each third of it (rows sum to 1)."""
    edges = torch.linspace(0, 1, cells + 1, dtype=torch.float64)
    thirds = torch.linspace(0, 1, 4, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], thirds[None, :-1])
    hi = torch.minimum(edges[1:, None], thirds[None, 1:])
    return ((hi - lo).clamp(min=0) * cells).float()


def word_vector(tokenizer: Any, embedding: torch.Tensor, word: str) -> torch.Tensor:
    """The mean input embedding of the tokens `word` is split into (no special tokens)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"place words: the tokenizer splits {word!r} into no tokens")
    return embedding[torch.tensor(ids, device=embedding.device)].float().mean(0)


def place_vectors(tokenizer: Any, embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(rows*cols, H) in raster order: row words mixed by the position's share of each horizontal third, plus column
    words by its share of each vertical third, each position scaled to unit RMS (the projector sets the scale)."""
    rows, cols = grid
    with torch.no_grad():
        row_words = torch.stack([word_vector(tokenizer, embedding, w) for w in ROW_WORDS])
        col_words = torch.stack([word_vector(tokenizer, embedding, w) for w in COLUMN_WORDS])
        by_row = third_weights(rows).to(row_words) @ row_words  # (rows, H)
        by_col = third_weights(cols).to(col_words) @ col_words  # (cols, H)
        place = (by_row[:, None, :] + by_col[None, :, :]).reshape(rows * cols, -1)
        return place / place.pow(2).mean(-1, keepdim=True).sqrt()
