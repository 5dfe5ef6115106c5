"""Encoder adapters: every backend with a tiny random config (width 32, 2 layers, patch 8, 32 px), offline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from uniflow.checkpoint import load_state_strict
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.encoders.base import IMAGENET_MEAN
from uniflow.encoders.hf import OPENAI_CLIP_MEAN
from uniflow.encoders.internvit import (
    convert_hf_internvl_vision_state,
    convert_release_encoder_state,
    internvit_300m_config,
    release_key_map,
)
from uniflow.errors import CheckpointError, ConfigError, ImageInputError

D, L, P, S = 32, 2, 8, 32
HF_SIZES = {"hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 2, "intermediate_size": 64}

CONFIGS = {
    "timm": EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                          kwargs={"embed_dim": D, "depth": L, "num_heads": 2}, image_size=S, patch_size=P),
    "siglip": EncoderConfig(backend="hf", arch="siglip_vision_model", kwargs=HF_SIZES, image_size=S, patch_size=P),
    "siglip2": EncoderConfig(backend="hf", arch="siglip2_vision_model", kwargs=HF_SIZES, image_size=S, patch_size=P),
    "clip": EncoderConfig(backend="hf", arch="clip_vision_model", kwargs=HF_SIZES, image_size=S, patch_size=P),
    "dinov2": EncoderConfig(backend="hf", arch="dinov2", kwargs=HF_SIZES, image_size=S, patch_size=P),
    "dinov2_reg": EncoderConfig(backend="hf", arch="dinov2_with_registers",
                                kwargs={**HF_SIZES, "num_register_tokens": 2}, image_size=S, patch_size=P),
    "internvit": EncoderConfig(backend="internvit", kwargs=HF_SIZES, image_size=S, patch_size=P),
}
PREFIX_TOKENS = {"siglip": 0, "siglip2": 0, "clip": 1, "dinov2": 1, "dinov2_reg": 3}
DEFAULT_MEAN = {"timm": (0.5, 0.5, 0.5), "siglip": (0.5, 0.5, 0.5), "siglip2": (0.5, 0.5, 0.5),
                "clip": OPENAI_CLIP_MEAN, "dinov2": IMAGENET_MEAN, "dinov2_reg": IMAGENET_MEAN,
                "internvit": IMAGENET_MEAN}


def _outputs_equal(a, b, atol: float = 1e-5) -> None:
    assert a.grid == b.grid and len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


# --- every backend --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_tokens_of_every_layer_at_native_and_other_sizes(name: str) -> None:
    enc = build_encoder(CONFIGS[name]).eval()
    assert (enc.patch_size, enc.width, enc.num_layers, enc.image_size) == (P, D, L, S)
    for (h, w), grid in (((32, 32), (4, 4)), ((48, 32), (6, 4))):
        with torch.no_grad():
            out = enc(torch.randn(2, 3, h, w))
        assert out.grid == grid
        assert len(out.hidden_states) == L  # embedding output excluded
        for tokens in out.hidden_states:  # CLS and registers dropped: exactly one token per patch
            assert tokens.shape == (2, grid[0] * grid[1], D)
        assert out.last is out.hidden_states[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_normalize_round_trip_and_default_mean(name: str) -> None:
    enc = build_encoder(CONFIGS[name])
    assert enc.mean == pytest.approx(DEFAULT_MEAN[name])
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(enc.denormalize(enc.normalize(images)), images)
    grey = torch.tensor(enc.mean).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert enc.normalize(grey).abs().max() < 1e-6
    custom = build_encoder(dataclasses.replace(CONFIGS[name], mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    assert custom.mean == (0.1, 0.2, 0.3) and custom.std == (0.4, 0.5, 0.6)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_trainable_parameter(name: str) -> None:
    enc = build_encoder(CONFIGS[name]).train()
    out = enc(torch.randn(2, 3, 32, 24))
    sum(h.square().mean() for h in out.hidden_states).backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without gradient (unused modules should be pruned): {no_grad}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", CONFIGS)
def test_size_not_divisible_by_patch_raises(name: str) -> None:
    enc = build_encoder(CONFIGS[name])
    with pytest.raises(ImageInputError, match="not divisible by the patch size 8"):
        enc(torch.randn(1, 3, 30, 32))
    with pytest.raises(ImageInputError):
        enc(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_checkpointing_keeps_outputs(name: str) -> None:
    enc = build_encoder(CONFIGS[name]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = enc(x)
    enc.set_grad_checkpointing(True)
    enc.train()
    for module in enc.modules():  # no dropout / drop-path, so train and eval compute the same function
        if isinstance(module, (torch.nn.Dropout, timm.layers.DropPath)):
            module.eval()
    out = enc(x)
    out.last.sum().backward()
    _outputs_equal(out, reference)


def test_unknown_backend_and_arch_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\['hf', 'internvit', 'timm'\]"):
        build_encoder(EncoderConfig(backend="keras"))
    with pytest.raises(ConfigError, match="siglip_vision_model"):
        build_encoder(EncoderConfig(backend="hf", arch="bert"))
    with pytest.raises(ConfigError, match="hidden_sise"):
        build_encoder(EncoderConfig(backend="internvit", kwargs={"hidden_sise": 8}, image_size=S, patch_size=P))
    with pytest.raises(ConfigError, match="not_a_model"):
        build_encoder(EncoderConfig(backend="timm", arch="not_a_model"))


# --- timm -----------------------------------------------------------------------------------------------------------


def test_timm_shapeworld_tiny_preset_builds() -> None:
    enc = build_encoder(EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                                      kwargs={"embed_dim": 192, "depth": 6, "num_heads": 3},
                                      image_size=64, patch_size=8))
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 64, 64))
    assert out.grid == (8, 8) and len(out.hidden_states) == 6
    assert all(h.shape == (1, 64, 192) for h in out.hidden_states)


def test_timm_pretrained_safetensors_loads_full_and_pruned_checkpoints(tmp_path) -> None:
    cfg = CONFIGS["timm"]
    reference = timm.create_model(cfg.arch, img_size=S, patch_size=P, num_classes=10, dynamic_img_size=True,
                                  **cfg.kwargs).eval()
    full = tmp_path / "full.safetensors"  # a plain timm checkpoint: final norm and a 10-class head included
    save_file(reference.state_dict(), str(full))
    enc = build_encoder(dataclasses.replace(cfg, pretrained=str(full))).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True)
        out = enc(x)
    for got, want in zip(out.hidden_states, expected):
        torch.testing.assert_close(got, want)

    pruned = tmp_path / "pruned.safetensors"  # the adapter's own (pruned) model round-trips too
    save_file(enc.model.state_dict(), str(pruned))
    again = build_encoder(dataclasses.replace(cfg, pretrained=str(pruned))).eval()
    with torch.no_grad():
        _outputs_equal(again(x), out, atol=0)

    deeper = timm.create_model(cfg.arch, img_size=S, patch_size=P, num_classes=0,
                               **{**cfg.kwargs, "depth": 3})
    wrong = tmp_path / "deeper.safetensors"
    save_file(deeper.state_dict(), str(wrong))
    with pytest.raises(CheckpointError, match=r"deeper\.safetensors.*unexpected keys: blocks\.2\."):
        build_encoder(dataclasses.replace(cfg, pretrained=str(wrong)))
    with pytest.raises(CheckpointError, match="not found"):
        build_encoder(dataclasses.replace(cfg, pretrained=str(tmp_path / "absent.safetensors")))


# --- transformers ---------------------------------------------------------------------------------------------------


def _patch_sequence(images: torch.Tensor, patch: int) -> torch.Tensor:
    """SigLIP2's input, made by its own image processor's patching function."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    return torch.stack([convert_image_to_patches(image, patch) for image in images])


@pytest.mark.parametrize("name", ["siglip", "siglip2", "clip", "dinov2", "dinov2_reg"])
def test_hf_pretrained_folder_matches_the_transformers_model(name: str, tmp_path) -> None:
    cfg = CONFIGS[name]
    sizes = {"num_patches": (S // P) ** 2} if name == "siglip2" else {"image_size": S}
    reference = transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model(cfg.arch, patch_size=P, **sizes, **cfg.kwargs)).eval()
    reference.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.25] * 3, "image_std": [0.75] * 3}))
    enc = build_encoder(dataclasses.replace(cfg, pretrained=str(tmp_path))).eval()
    assert enc.mean == (0.25,) * 3 and enc.std == (0.75,) * 3
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        if name == "siglip2":
            grid = torch.tensor([[S // P, S // P]] * 2)
            ref = reference(pixel_values=_patch_sequence(x, P), pixel_attention_mask=torch.ones(2, (S // P) ** 2),
                            spatial_shapes=grid, output_hidden_states=True)
        else:
            ref = reference(pixel_values=x, output_hidden_states=True)
        out = enc(x)
    skip = PREFIX_TOKENS[name]
    for got, want in zip(out.hidden_states, ref.hidden_states[1:], strict=True):
        torch.testing.assert_close(got, want[:, skip:])


def test_hf_loads_the_vision_tower_of_a_dual_model_folder(tmp_path) -> None:
    small = {**HF_SIZES, "num_hidden_layers": 1}
    full = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config={**HF_SIZES, "image_size": S, "patch_size": P},
        text_config={**small, "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    )).eval()
    full.save_pretrained(tmp_path)
    enc = build_encoder(dataclasses.replace(CONFIGS["siglip"], pretrained=str(tmp_path))).eval()
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():
        want = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(enc(x).last, want)
    with pytest.raises(ConfigError, match="not a 'clip_vision_model'"):
        build_encoder(dataclasses.replace(CONFIGS["clip"], pretrained=str(tmp_path)))


# --- InternViT ------------------------------------------------------------------------------------------------------


def test_internvit_300m_has_304m_parameters() -> None:
    with torch.device("meta"):
        enc = build_encoder(internvit_300m_config())
    assert (enc.width, enc.num_layers, enc.patch_size, enc.image_size) == (1024, 24, 14, 448)
    count = sum(p.numel() for p in enc.parameters())
    assert abs(count - 304e6) / 304e6 < 0.01, count
    assert enc.embeddings.position_embedding.shape == (1, 1 + 32 * 32, 1024)


def _release_state(hidden: int = D, layers: int = L, mlp: int = 64, patch: int = P, grid: int = S // P) -> dict:
    """Random tensors under the names of the official release (`uniflow/modeling_uniflow.py`), written out by hand."""
    g = torch.Generator().manual_seed(1)
    shapes = {
        "embeddings.class_embedding": (1, 1, hidden),
        "embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "embeddings.patch_embedding.bias": (hidden,),
        "embeddings.position_embedding": (1, 1 + grid * grid, hidden),
    }
    for i in range(layers):
        block = f"encoder.layers.{i}."
        shapes |= {
            block + "attn.qkv.weight": (3 * hidden, hidden), block + "attn.qkv.bias": (3 * hidden,),
            block + "attn.proj.weight": (hidden, hidden), block + "attn.proj.bias": (hidden,),
            block + "mlp.fc1.weight": (mlp, hidden), block + "mlp.fc1.bias": (mlp,),
            block + "mlp.fc2.weight": (hidden, mlp), block + "mlp.fc2.bias": (hidden,),
            block + "norm1.weight": (hidden,), block + "norm1.bias": (hidden,),
            block + "norm2.weight": (hidden,), block + "norm2.bias": (hidden,),
            block + "ls1": (hidden,), block + "ls2": (hidden,),
        }
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def test_internvit_release_state_converts_and_loads_strictly(tmp_path) -> None:
    release = _release_state()
    assert set(release_key_map(L)) == set(release)
    enc = build_encoder(CONFIGS["internvit"]).eval()
    load_state_strict(enc, convert_release_encoder_state(release), "release")
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(value, release[key])

    with pytest.raises(CheckpointError, match=r"unmatched keys \['encoder.layers.0.attn.q_norm.weight'\]"):
        convert_release_encoder_state({**release, "encoder.layers.0.attn.q_norm.weight": torch.ones(D)})
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.layers.1.ls2'\]"):
        convert_release_encoder_state({k: v for k, v in release.items() if k != "encoder.layers.1.ls2"})
    mismatch = r"shape mismatches: .*encoder\.layers\.0\.mlp\.fc1\.weight \(file \(48, 32\), model \(64, 32\)\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_state_strict(enc, convert_release_encoder_state(_release_state(mlp=48)), "release")

    # A whole release checkpoint (encoder next to the decoder) given as `pretrained`: only the encoder is taken.
    whole = tmp_path / "uniflow.safetensors"
    save_file({**release, "chal_proj.c_fc.weight": torch.zeros(D, D), "decoder_pos_embed": torch.zeros(1, 16, D)},
              str(whole))
    loaded = build_encoder(dataclasses.replace(CONFIGS["internvit"], pretrained=str(whole))).eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        _outputs_equal(loaded(x), enc(x), atol=0)
    prefixed = tmp_path / "internvl_chat.safetensors"  # InternVL-Chat keeps it under `vision_model.`
    save_file({f"vision_model.{k}": v for k, v in release.items()} | {"mlp1.0.weight": torch.zeros(2)}, str(prefixed))
    loaded = build_encoder(dataclasses.replace(CONFIGS["internvit"], pretrained=str(prefixed))).eval()
    with torch.no_grad():
        _outputs_equal(loaded(x), enc(x), atol=0)


@pytest.mark.skipif(not hasattr(transformers, "InternVLVisionModel"), reason="transformers without InternVL")
def test_internvit_computes_what_transformers_internvl_vision_computes(tmp_path) -> None:
    hf_config = transformers.InternVLVisionConfig(**HF_SIZES, image_size=S, patch_size=P, attention_bias=True,
                                                  use_mean_pooling=True, layer_scale_init_value=0.5)
    reference = transformers.InternVLVisionModel(hf_config).eval()
    with torch.no_grad():  # HF zero-initialises CLS and positions: randomise everything for a real comparison
        for param in reference.parameters():
            param.normal_(0, 0.2)
    enc = build_encoder(CONFIGS["internvit"]).eval()
    load_state_strict(enc, convert_hf_internvl_vision_state(reference.state_dict()), "hf")
    for h, w in ((S, S), (48, 32)):  # native grid, then a resampled position embedding
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = reference(pixel_values=x, output_hidden_states=True).hidden_states[1:]
            got = enc(x).hidden_states
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b[:, 1:], atol=1e-5, rtol=1e-4)

    # The same weights inside a `transformers` InternVL checkpoint (LLM next to it) load as `pretrained`.
    path = tmp_path / "internvl_hf.safetensors"
    tensors = {f"model.vision_tower.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    save_file(tensors | {"model.language_model.embed_tokens.weight": torch.zeros(4, 2)}, str(path))
    loaded = build_encoder(dataclasses.replace(CONFIGS["internvit"], pretrained=str(path))).eval()
    with torch.no_grad():
        _outputs_equal(loaded(x), enc(x), atol=0)


# --- chosen layers ------------------------------------------------------------------------------------------------


def _blocks(enc) -> list[torch.nn.Module]:
    """The encoder's transformer blocks, per backend."""
    if type(enc).__name__ == "TimmEncoder":
        return list(enc.model.blocks)
    if type(enc).__name__ == "InternViTEncoder":
        return list(enc.encoder.layers)
    return list(enc.model.get_submodule(".".join(enc._blocks_at)))


@torch.no_grad()
def _blocks_run(enc, x: torch.Tensor, layers: list[int]):
    """The output for `layers` and the indices of the blocks that ran, in order."""
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(_blocks(enc))]
    try:
        return enc(x, layers=layers), calls
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", CONFIGS)
def test_chosen_layers_match_and_stop_early(name: str) -> None:
    """encoder(x, layers=...) returns exactly those layers' tokens and runs no block past the deepest one."""
    enc, x = build_encoder(CONFIGS[name]).eval(), torch.randn(2, 3, 32, 48)
    full, all_calls = _blocks_run(enc, x, list(range(L)))
    first, calls = _blocks_run(enc, x, [0])
    assert all_calls == list(range(L)) and calls == [0]  # block 1 never ran
    assert first.layers == (0,) and len(first.hidden_states) == 1
    torch.testing.assert_close(first.last, full.hidden_states[0], atol=1e-5, rtol=1e-4)
    picked, _ = _blocks_run(enc, x, [-1, 0])
    assert picked.layers == (L - 1, 0)
    torch.testing.assert_close(picked.hidden_states[0], full.hidden_states[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(picked.hidden_states[1], full.hidden_states[0], atol=1e-5, rtol=1e-4)
    assert len(_blocks(enc)) == L  # the hf backend restores its full block list
    with pytest.raises(ConfigError, match="out of range"):
        enc(x, layers=[L])
