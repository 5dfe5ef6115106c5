"""Convert the official UniFlow release (`yuezhengrong/UniFlow`) into this implementation's checkpoint folder.

The release keeps InternVL's encoder names at the top level next to its decoder: `chal_proj`/`chal_unproj` (latent
down/up projections), `global_block_pos_embed`, `global_blocks` (timm blocks), `decoder_pos_embed` and
`flow_head.net` (MAR's SimpleMLPAdaLN). Every key must map and every shape must match; otherwise the error lists the
offending keys. The release uses our time convention (noise at t = 0) and 1 Euler step, so no tensor is changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from uniflow.checkpoint import load_state_strict, read_safetensors, save_folder
from uniflow.encoders.base import rename_keys
from uniflow.encoders.internvit import extract_encoder_state
from uniflow.errors import CheckpointError
from uniflow.presets import get_preset
from uniflow.tokenizer import TokenizerConfig, UniFlowTokenizer

# The release's decoder-side names -> ours ({pattern: replacement}, first match wins). Its encoder keeps InternViT's
# own names, which `uniflow.encoders.internvit.extract_encoder_state` checks and maps (one set of encoder rules).
_DECODER_RULES = {
    r"^chal_proj\.c_fc\.": "to_latent.0.",
    r"^chal_proj\.c_proj\.": "to_latent.2.",
    r"^chal_unproj\.c_fc\.": "decoder.from_latent.0.",
    r"^chal_unproj\.c_proj\.": "decoder.from_latent.2.",
    r"^global_block_pos_embed$": "decoder.global_pos_embed",
    r"^global_blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.": r"decoder.global_blocks.\1.\2.",
    r"^decoder_pos_embed$": "decoder.decoder_pos_embed",
    r"^flow_head\.net\.(input_proj|cond_embed)\.": r"decoder.flow_head.\1.",
    r"^flow_head\.net\.time_embed\.mlp\.([02])\.": r"decoder.flow_head.time_embed.mlp.\1.",
    r"^flow_head\.net\.res_blocks\.(\d+)\.in_ln\.": r"decoder.flow_head.blocks.\1.norm.",
    r"^flow_head\.net\.res_blocks\.(\d+)\.mlp\.([02])\.": r"decoder.flow_head.blocks.\1.mlp.\2.",
    r"^flow_head\.net\.res_blocks\.(\d+)\.adaLN_modulation\.1\.": r"decoder.flow_head.blocks.\1.ada.",
    r"^flow_head\.net\.final_layer\.linear\.": "decoder.flow_head.final.linear.",
    r"^flow_head\.net\.final_layer\.adaLN_modulation\.1\.": "decoder.flow_head.final.ada.",
}
_ENCODER_ROOTS = ("embeddings.", "encoder.")
_STRIP_PREFIXES = ("vision_model.", "model.")


def rename_release_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for a (prefix-free) release state dict; CheckpointError listing the keys that map to nothing."""
    encoder_part = {k: v for k, v in state.items() if k.startswith(_ENCODER_ROOTS)}
    ours = {f"encoder.{k}": v for k, v in extract_encoder_state(encoder_part, "release checkpoint").items()}
    names, unmatched = rename_keys([k for k in state if k not in encoder_part], _DECODER_RULES)
    if unmatched:
        raise CheckpointError(f"release checkpoint: {len(unmatched)} key(s) map to nothing: {sorted(unmatched)[:20]}")
    ours.update({new: state[old] for old, new in names.items()})
    return ours


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_release(state: Mapping[str, torch.Tensor], release_config: dict | None = None) -> TokenizerConfig:
    """Our TokenizerConfig for a release state dict: sizes read from the tensors, head counts from its config.json."""
    release_config = release_config or {}
    need = ["embeddings.patch_embedding.weight", "embeddings.position_embedding", "chal_proj.c_proj.weight",
            "flow_head.net.input_proj.weight"]
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"not a UniFlow release state dict: missing keys {absent}")
    width, _, patch, _ = state["embeddings.patch_embedding.weight"].shape
    side = round((state["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    config = get_preset("internvit-300m")
    enc_kwargs = {
        "hidden_size": width,
        "num_hidden_layers": _count(state, r"^encoder\.layers\.(\d+)\."),
        "num_attention_heads": release_config.get("num_attention_heads", 16),
        "intermediate_size": state["encoder.layers.0.mlp.fc1.weight"].shape[0]
        if "encoder.layers.0.mlp.fc1.weight" in state else 4 * width,
        "image_size": side * patch,
        "patch_size": patch,
    }
    for key in ("layer_norm_eps", "qkv_bias", "drop_path_rate"):
        if key in release_config:
            enc_kwargs[key] = release_config[key]
    config.encoder.kwargs = enc_kwargs
    config.encoder.image_size = side * patch
    config.encoder.patch_size = patch
    config.decoder.latent_channels = state["chal_proj.c_proj.weight"].shape[0]
    config.decoder.global_depth = _count(state, r"^global_blocks\.(\d+)\.")
    config.decoder.global_heads = 16  # hard-coded in the release's global blocks
    config.decoder.head_width = state["flow_head.net.input_proj.weight"].shape[0]
    config.decoder.head_depth = _count(state, r"^flow_head\.net\.res_blocks\.(\d+)\.")
    steps = release_config.get("num_sampling_steps")
    if steps is not None:
        config.flow.sample_steps = int(steps)
    return config


def convert_release_state(state: Mapping[str, torch.Tensor],
                          release_config: dict | None = None) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    """Rename a release state dict and check it against a model built from it; returns (config, our state dict)."""
    state = _strip_prefix(state)
    config = config_from_release(state, release_config)
    ours = rename_release_state(state)
    with torch.device("meta"):
        model = UniFlowTokenizer.from_config(config, load_pretrained_encoder=False)
    load_state_strict(model, ours, "release checkpoint (after renaming)", check_only=True)
    return config, ours


def load_release(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config.json (if any) of a release folder or a single .safetensors file."""
    src = Path(src)
    release_config: dict = {}
    if src.is_dir() and (src / "config.json").is_file():
        release_config = json.loads((src / "config.json").read_text())
        release_config = release_config.get("vision_config", release_config)
    standard = ("model.safetensors", "model.safetensors.index.json")
    if src.is_dir() and not any((src / name).is_file() for name in standard):
        files = sorted(src.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{src}: expected one .safetensors file or model.safetensors(.index.json), "
                                  f"found {[f.name for f in files]}")
        src = files[0]
    return read_safetensors(src), release_config


def convert_official_checkpoint(src: str | Path, dst: str | Path, dtype: str | None = None,
                                overwrite: bool = False) -> Path:
    """Read the release, convert and verify it, and write our `config.json` + `model.safetensors` to `dst`.

    `dst` is checked before anything is read (see `uniflow.checkpoint.check_destination`); a release config that is
    not valid JSON, and NaN/inf weights, are refused naming the file or the first bad tensor."""
    from uniflow.checkpoint import check_destination, check_finite
    from uniflow.configs import read_json
    from uniflow.errors import ConfigError
    from uniflow.tokenizer import MODEL_KIND

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise ConfigError(f"dtype: expected one of {sorted(dtypes)} or None, got {dtype!r}")
    check_destination(dst, MODEL_KIND, overwrite)
    if Path(src).is_dir() and (Path(src) / "config.json").exists():
        release_json = read_json(Path(src) / "config.json", CheckpointError)
        if not isinstance(release_json, dict):
            raise CheckpointError(f"{Path(src) / 'config.json'}: expected a JSON object, got "
                                  f"{type(release_json).__name__}")
    state, release_config = load_release(src)
    check_finite(state, f"{src}: release weights")
    config, ours = convert_release_state(state, release_config)
    return save_folder(dst, config.to_dict(), ours, dtype=dtypes[dtype] if dtype else None, overwrite=overwrite)
