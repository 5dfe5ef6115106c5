"""InternViT-300M, the encoder of the released UniFlow checkpoint, as a compact module of its own.

Why not `transformers.InternVLVisionModel`: it is the same network, but its layers have no drop-path (the recipe trains
with 0.1), it splits the fused qkv projection into q/k/v, renames every parameter, and only exists in recent
`transformers` releases (the project supports >= 4.50). Writing the ~100 lines keeps the release's own parameter names,
so its weights load with no renaming at all; `convert_hf_internvl_vision_state` still loads the `transformers` layout,
and the tests check that both networks compute the same hidden states.

Architecture (defaults = InternViT-300M-448px): width 1024, 24 pre-norm layers, 16 heads, MLP 4096 with exact GELU,
LayerNorm eps 1e-6, qkv bias, LayerScale (init 0.1) on both branches, drop-path rising linearly from 0 to 0.1, patch 14,
448 px, a CLS token and a learnable absolute position embedding whose patch part is resampled bicubically
(align_corners=False, in float32) for any other grid, CLS position kept. No final norm. About 304.0M parameters.
`EncoderConfig.kwargs` overrides any field of `InternViTConfig` (hidden_size, num_hidden_layers, num_attention_heads,
intermediate_size, image_size, patch_size, layer_norm_eps, qkv_bias, drop_path_rate, initializer_factor).

Parameter names of the adapter (its `state_dict()`, no prefix) are exactly those of the release's
`UniFlowVisionModel` encoder part (and of InternVL's InternViT):

    embeddings.class_embedding                      (1, 1, D)
    embeddings.patch_embedding.weight / .bias       (D, 3, p, p) / (D,)
    embeddings.position_embedding                   (1, 1 + (S/p)^2, D)    CLS position first
    encoder.layers.{i}.norm1.weight / .bias         (D,)                   before attention
    encoder.layers.{i}.attn.qkv.weight / .bias      (3D, D) / (3D,)        fused, rows ordered q | k | v, heads inside
    encoder.layers.{i}.attn.proj.weight / .bias     (D, D) / (D,)
    encoder.layers.{i}.ls1                          (D,)                   LayerScale of the attention branch
    encoder.layers.{i}.norm2.weight / .bias         (D,)                   before the MLP
    encoder.layers.{i}.mlp.fc1.weight / .bias       (F, D) / (F,)
    encoder.layers.{i}.mlp.fc2.weight / .bias       (D, F) / (D,)
    encoder.layers.{i}.ls2                          (D,)                   LayerScale of the MLP branch

Layer i computes x += drop_path(ls1 * attn(norm1(x))); x += drop_path(ls2 * mlp(norm2(x))), as the release does.
Last layer: the raw output of the last block (the release has no final norm either), as in every backend.
Normalisation: ImageNet mean/std unless the config sets them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from uniflow.blocks import TransformerBlock
from uniflow.checkpoint import load_state_strict, read_safetensors
from uniflow.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, VisionEncoder, rename_keys
from uniflow.errors import CheckpointError, ConfigError
from uniflow.pos_embed import resize_grid_embedding


@dataclass
class InternViTConfig:
    """Architecture of the InternViT encoder; field names follow the release's config.json."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    initializer_factor: float = 0.1  # LayerScale init value


def internvit_300m_config(**overrides: Any) -> EncoderConfig:
    """The paper's main encoder: InternViT-300M at 448 px, patch 14 (EncoderConfig's own defaults are timm's)."""
    fields = {"backend": "internvit", "arch": "internvit-300m", "image_size": 448, "patch_size": 14, **overrides}
    return EncoderConfig(**fields)


class InternViTEmbeddings(nn.Module):
    """Patch conv + CLS token + absolute position embedding, resampled for grids other than the native one."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.native_grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.native_grid**2, d))

    def position_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, D) position embedding: the CLS position kept, the patch part resampled."""
        pos = self.position_embedding
        g = self.native_grid
        return torch.cat([pos[:, :1], resize_grid_embedding(pos[:, 1:], (g, g), (grid_h, grid_w))], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_for(gh, gw).to(x.dtype)


class InternViTStack(nn.Module):
    """Holds `layers` so that parameter names read `encoder.layers.{i}...` like the release.

    Each layer is the shared pre-norm block with the release's LayerScale (inside drop-path) and linearly rising
    drop-path.
    """

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.hidden_size, cfg.num_attention_heads, qkv_bias=cfg.qkv_bias, eps=cfg.layer_norm_eps,
                             mlp_hidden=cfg.intermediate_size, layer_scale=cfg.initializer_factor, drop_path=rate)
            for rate in rates
        )


def resolve_internvit_config(config: EncoderConfig) -> InternViTConfig:
    """InternViTConfig from EncoderConfig: image/patch size from the config, any field overridden by `kwargs`."""
    allowed = {f.name for f in dataclasses.fields(InternViTConfig)}
    unknown = sorted(set(config.kwargs) - allowed)
    if unknown:
        raise ConfigError(f"encoder.kwargs: unknown InternViT field(s) {unknown}; expected some of {sorted(allowed)}")
    cfg = InternViTConfig(**{"image_size": config.image_size, "patch_size": config.patch_size, **config.kwargs})
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"encoder: image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"encoder.kwargs: hidden_size {cfg.hidden_size} is not divisible by "
                          f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


class InternViTEncoder(VisionEncoder):
    """InternViT adapter; `embeddings` and `encoder` sit at the top so state-dict keys are the release's names."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        cfg = resolve_internvit_config(config)
        self.vit_config = cfg
        self.embeddings = InternViTEmbeddings(cfg)
        self.encoder = InternViTStack(cfg)
        self.patch_size = cfg.patch_size
        self.width = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.image_size = config.image_size  # the size callers resize to; kwargs may set another native size
        self.grad_checkpointing = False
        self._register_norm(tuple(config.mean or IMAGENET_MEAN), tuple(config.std or IMAGENET_STD))
        self._init_weights()
        if config.pretrained:
            state = extract_encoder_state(read_safetensors(config.pretrained), config.pretrained)
            load_state_strict(self, state, config.pretrained)

    def _init_weights(self) -> None:
        """From-scratch init (truncated normal 0.02, zero biases); pretrained weights overwrite it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=0.02)

    def encode_normalized(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens (CLS dropped) after the requested layers; stops after the deepest one."""
        x = self.embeddings(pixel_values)
        wanted, hidden = set(layers), {}
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.encoder.layers[: max(layers) + 1]):
            x = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
            if index in wanted:
                hidden[index] = x[:, 1:]
        return [hidden[i] for i in layers]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


# --- checkpoint conversion ------------------------------------------------------------------------------------------

_LAYER_PARAMS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "ls1",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2",
)
_EMBED_PARAMS = (
    "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
    "embeddings.position_embedding",
)
_LAYER_RE = re.compile(r"^encoder\.layers?\.(\d+)\.")


def release_key_map(num_layers: int) -> dict[str, str]:
    """Release encoder name -> adapter name (both prefix-free). The identity: the adapter keeps the release's names."""
    names = list(_EMBED_PARAMS) + [f"encoder.layers.{i}.{p}" for i in range(num_layers) for p in _LAYER_PARAMS]
    return {n: n for n in names}


def _num_layers(state: Mapping[str, torch.Tensor]) -> int:
    indices = [int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))]
    return max(indices) + 1 if indices else 0


def _check_names(expected: set[str], got: set[str], what: str) -> None:
    missing, unmatched = sorted(expected - got), sorted(got - expected)
    if missing or unmatched:
        raise CheckpointError(f"{what}: unmatched keys {unmatched}; missing keys {missing}")


def convert_release_encoder_state(release_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the release's encoder tensors (names without prefix) onto this adapter's names; no tensor changes.

    Raises CheckpointError listing the keys that map to nothing and the ones that are absent. Shapes are checked when
    loading (`load_state_strict`).
    """
    key_map = release_key_map(_num_layers(release_sd))
    _check_names(set(key_map), set(release_sd), "release encoder state")
    return {key_map[k]: v for k, v in release_sd.items()}


# `transformers` name (prefix-free) -> this adapter's name; first match wins. q/k/v are fused separately.
_HF_RENAMES = {
    r"^embeddings\.cls_token$": "embeddings.class_embedding",
    r"^embeddings\.patch_embeddings\.projection\.": "embeddings.patch_embedding.",
    r"^embeddings\.position_embeddings$": "embeddings.position_embedding",
    r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.": r"encoder.layers.\1.attn.proj.",
    r"^encoder\.layer\.(\d+)\.layernorm_before\.": r"encoder.layers.\1.norm1.",
    r"^encoder\.layer\.(\d+)\.layernorm_after\.": r"encoder.layers.\1.norm2.",
    r"^encoder\.layer\.(\d+)\.lambda_([12])$": r"encoder.layers.\1.ls\2",
    r"^encoder\.layer\.(\d+)\.mlp\.": r"encoder.layers.\1.mlp.",
}
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def convert_hf_internvl_vision_state(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformers` InternVLVisionModel tensors (names without prefix) -> this adapter's names.

    q/k/v projections are concatenated into the fused `attn.qkv` (rows q | k | v). The final `layernorm` (present only
    with use_mean_pooling=False) is dropped: the adapter returns raw block outputs. Raises CheckpointError listing
    unmatched or missing keys.
    """
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = []
    for key, value in hf_sd.items():
        if m := _HF_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif not key.startswith("layernorm."):
            rest.append(key)
    names, unmatched = rename_keys(rest, _HF_RENAMES)
    out = {new: hf_sd[old] for old, new in names.items()}
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmatched += [f"encoder.layer.{layer}.attention.{p}_proj.{kind}" for p in sorted(parts)]
            continue
        out[f"encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmatched:
        raise CheckpointError(f"InternVL vision state: unmatched keys {sorted(unmatched)}")
    _check_names(set(release_key_map(_num_layers(out))), set(out), "InternVL vision state")
    return out


# Where the encoder sits inside the checkpoints this adapter accepts: the release (top level, next to its decoder),
# InternVL-Chat (`vision_model.`), `transformers` InternVL (`model.vision_tower.` or, before v5, `vision_tower.`).
_PREFIXES = ("", "vision_model.", "model.vision_tower.", "vision_tower.", "model.vision_model.")


def extract_encoder_state(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the InternViT encoder inside a checkpoint and return it under this adapter's names.

    Accepts the release layout (alone or with the rest of the UniFlow model), InternVL-Chat's and `transformers`'
    InternVL layouts. Keys outside the encoder (decoder, projector, LLM) are ignored; inside it, every key must map.
    """
    for prefix in _PREFIXES:
        release = f"{prefix}embeddings.patch_embedding.weight" in state
        hf = f"{prefix}embeddings.patch_embeddings.projection.weight" in state
        if release or hf:
            break
    else:
        raise CheckpointError(
            f"{source}: no InternViT encoder weights found (looked for embeddings.patch_embedding.weight or the "
            f"transformers name embeddings.patch_embeddings.projection.weight under prefixes {list(_PREFIXES)})"
        )
    roots = ("embeddings.", "encoder.", "layernorm.") if hf else ("embeddings.", "encoder.")
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :].startswith(roots)}
    try:
        return convert_hf_internvl_vision_state(sub) if hf else convert_release_encoder_state(sub)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
