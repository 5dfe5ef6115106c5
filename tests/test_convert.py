"""The release converter, on a state dict built here with the release's parameter names and tiny shapes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from uniflow import UniFlowTokenizer
from uniflow.convert import convert_official_checkpoint, convert_release_state
from uniflow.errors import CheckpointError

D, LAYERS, FFN, PATCH, SIDE, LATENT, GLOBAL, HEAD_W, HEAD_D = 32, 2, 64, 4, 4, 8, 2, 48, 3


def release_state_dict() -> dict[str, torch.Tensor]:
    """The release's names (modeling_uniflow.py) with tiny shapes; each tensor filled with a distinct value."""
    shapes = {
        "embeddings.class_embedding": (1, 1, D),
        "embeddings.patch_embedding.weight": (D, 3, PATCH, PATCH),
        "embeddings.patch_embedding.bias": (D,),
        "embeddings.position_embedding": (1, SIDE * SIDE + 1, D),
        "chal_proj.c_fc.weight": (D, D), "chal_proj.c_fc.bias": (D,),
        "chal_proj.c_proj.weight": (LATENT, D), "chal_proj.c_proj.bias": (LATENT,),
        "chal_unproj.c_fc.weight": (D, LATENT), "chal_unproj.c_fc.bias": (D,),
        "chal_unproj.c_proj.weight": (D, D), "chal_unproj.c_proj.bias": (D,),
        "global_block_pos_embed": (1, SIDE * SIDE, D),
        "decoder_pos_embed": (1, SIDE * SIDE, D),
        "flow_head.net.time_embed.mlp.0.weight": (HEAD_W, 256), "flow_head.net.time_embed.mlp.0.bias": (HEAD_W,),
        "flow_head.net.time_embed.mlp.2.weight": (HEAD_W, HEAD_W), "flow_head.net.time_embed.mlp.2.bias": (HEAD_W,),
        "flow_head.net.cond_embed.weight": (HEAD_W, D), "flow_head.net.cond_embed.bias": (HEAD_W,),
        "flow_head.net.input_proj.weight": (HEAD_W, 3 * PATCH * PATCH),
        "flow_head.net.input_proj.bias": (HEAD_W,),
        "flow_head.net.final_layer.linear.weight": (3 * PATCH * PATCH, HEAD_W),
        "flow_head.net.final_layer.linear.bias": (3 * PATCH * PATCH,),
        "flow_head.net.final_layer.adaLN_modulation.1.weight": (2 * HEAD_W, HEAD_W),
        "flow_head.net.final_layer.adaLN_modulation.1.bias": (2 * HEAD_W,),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        shapes |= {p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,),
                   p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
                   p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                   p + "mlp.fc1.weight": (FFN, D), p + "mlp.fc1.bias": (FFN,),
                   p + "mlp.fc2.weight": (D, FFN), p + "mlp.fc2.bias": (D,), p + "ls1": (D,), p + "ls2": (D,)}
    for i in range(GLOBAL):
        p = f"global_blocks.{i}."
        shapes |= {p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,),
                   p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
                   p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                   p + "mlp.fc1.weight": (4 * D, D), p + "mlp.fc1.bias": (4 * D,),
                   p + "mlp.fc2.weight": (D, 4 * D), p + "mlp.fc2.bias": (D,)}
    for i in range(HEAD_D):
        p = f"flow_head.net.res_blocks.{i}."
        shapes |= {p + "in_ln.weight": (HEAD_W,), p + "in_ln.bias": (HEAD_W,),
                   p + "mlp.0.weight": (HEAD_W, HEAD_W), p + "mlp.0.bias": (HEAD_W,),
                   p + "mlp.2.weight": (HEAD_W, HEAD_W), p + "mlp.2.bias": (HEAD_W,),
                   p + "adaLN_modulation.1.weight": (3 * HEAD_W, HEAD_W),
                   p + "adaLN_modulation.1.bias": (3 * HEAD_W,)}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def release_config() -> dict:
    return {"num_attention_heads": 2, "num_sampling_steps": "1", "layer_norm_eps": 1e-6, "drop_path_rate": 0.1}


def test_converts_every_key_and_lands_distinctive_tensors(tmp_path):
    state = release_state_dict()
    config, ours = convert_release_state(state, release_config())
    assert len(ours) == len(state)
    assert config.decoder.latent_channels == LATENT and config.decoder.head_depth == HEAD_D
    assert config.encoder.image_size == SIDE * PATCH

    src = tmp_path / "release"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(release_config()))
    model = UniFlowTokenizer.from_pretrained(convert_official_checkpoint(src, tmp_path / "ours"))
    own = model.state_dict()
    # no key left over on either side
    assert set(own) == set(ours)
    assert torch.equal(model.to_latent[2].weight, state["chal_proj.c_proj.weight"])
    assert torch.equal(model.decoder.from_latent[0].weight, state["chal_unproj.c_fc.weight"])
    assert torch.equal(model.decoder.global_pos_embed, state["global_block_pos_embed"])
    assert torch.equal(model.decoder.decoder_pos_embed, state["decoder_pos_embed"])
    assert torch.equal(model.decoder.global_blocks[1].attn.qkv.weight, state["global_blocks.1.attn.qkv.weight"])
    assert torch.equal(model.decoder.flow_head.blocks[2].ada.weight,
                       state["flow_head.net.res_blocks.2.adaLN_modulation.1.weight"])
    assert torch.equal(model.decoder.flow_head.final.linear.bias, state["flow_head.net.final_layer.linear.bias"])
    assert torch.equal(model.encoder.encoder.layers[1].ls2, state["encoder.layers.1.ls2"])
    assert torch.equal(model.encoder.embeddings.position_embedding, state["embeddings.position_embedding"])
    # and it decodes at its native size
    out = model.reconstruct(torch.rand(1, 3, SIDE * PATCH, SIDE * PATCH), seed=0)
    assert out.shape == (1, 3, SIDE * PATCH, SIDE * PATCH)


def test_prefixed_checkpoint_is_accepted():
    state = {f"vision_model.{k}": v for k, v in release_state_dict().items()}
    _, ours = convert_release_state(state, release_config())
    assert "decoder.flow_head.input_proj.weight" in ours


def test_missing_key_is_named():
    state = release_state_dict()
    del state["global_blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.global_blocks\.1\.mlp\.fc2\.bias"):
        convert_release_state(state, release_config())


def test_changed_shape_is_named():
    state = release_state_dict()
    state["chal_unproj.c_proj.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(CheckpointError, match=r"shape mismatches: decoder\.from_latent\.2\.weight"):
        convert_release_state(state, release_config())


def test_unknown_key_is_named():
    state = release_state_dict()
    state["mlp1.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"map to nothing: \['mlp1\.0\.weight'\]"):
        convert_release_state(state, release_config())


def test_cli_convert_reports_missing_keys(tmp_path):
    state = release_state_dict()
    del state["flow_head.net.res_blocks.0.in_ln.weight"]
    save_file(state, str(tmp_path / "release.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "convert", str(tmp_path / "release.safetensors"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "decoder.flow_head.blocks.0.norm.weight" in proc.stderr and "Traceback" not in proc.stderr
