"""The pre-LN ViT block (timm `Block` layout, SDPA attention), shared by the decoder's global blocks and InternViT.

The decoder's global blocks use it plain; InternViT adds LayerScale (`ls1`/`ls2`, inside drop-path, as its release
does) and drop-path. Parameter names follow timm / the release: norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1,
mlp.fc2, ls2, so checkpoints of both load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from uniflow.errors import ConfigError


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q | k | v, heads inside)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """x + drop_path(ls1 * Attn(LN(x))), then x + drop_path(ls2 * MLP(LN(x))).

    mlp_hidden: the MLP's hidden width (default `dim * mlp_ratio`). layer_scale: the initial LayerScale value, or
    None for no LayerScale (no `ls1`/`ls2` parameters). drop_path: the stochastic-depth rate of both branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6,
                 mlp_hidden: int | None = None, layer_scale: float | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden or int(dim * mlp_ratio))
        for name in ("ls1", "ls2"):
            scale = None if layer_scale is None else nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.register_parameter(name, scale)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm1(x))
        mlp_in = x + self.drop_path1(attn if self.ls1 is None else attn * self.ls1)
        out = self.mlp(self.norm2(mlp_in))
        return mlp_in + self.drop_path2(out if self.ls2 is None else out * self.ls2)
