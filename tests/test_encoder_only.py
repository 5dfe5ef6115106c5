"""The MLLM's path: the encoder alone from a tokenizer folder, reading none of the decoder's tensors."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer, load_encoder
from uniflow.encoders.timm_vit import TimmEncoder
from uniflow.errors import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = UniFlowTokenizer(tiny_tokenizer_config()).eval()
    folder = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tok")
    return model, folder


def _spoil_decoder_bytes(path) -> int:
    """Overwrite the data of every non-encoder tensor in a safetensors file with 0xFF bytes (NaN as float32)."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len
    spoiled = 0
    for key, info in header.items():
        if key != "__metadata__" and not key.startswith("encoder."):
            a, b = info["data_offsets"]
            raw[start + a : start + b] = b"\xff" * (b - a)
            spoiled += 1
    path.write_bytes(bytes(raw))
    return spoiled


def test_encoder_alone_gives_the_tokenizers_semantic_tokens(saved):
    model, folder = saved
    encoder = load_encoder(folder)
    assert isinstance(encoder, TimmEncoder) and not encoder.training
    images = torch.rand(2, 3, 32, 32)
    expected = model.encode(images).semantic_tokens
    tokens = encoder(encoder.preprocess(images), layers=[-1]).last
    torch.testing.assert_close(tokens, expected)
    # its own preprocessing, resize included, equals the tokenizer's
    torch.testing.assert_close(encoder.preprocess(torch.rand(1, 3, 40, 56), resize=True).shape,
                               model.prepare(torch.rand(1, 3, 40, 56), resize=True).shape)


def test_decoder_bytes_are_never_read(saved, tmp_path):
    """With every decoder tensor in the file turned into NaN garbage the encoder still loads, finite and equal."""
    model, folder = saved
    spoiled = tmp_path / "spoiled"
    model.save_pretrained(spoiled)
    assert _spoil_decoder_bytes(spoiled / "model.safetensors") > 0
    full = UniFlowTokenizer.from_pretrained(spoiled)  # the full tokenizer does read them
    assert torch.isnan(full.decoder.global_pos_embed).all() and torch.isnan(full.to_latent[0].weight).all()
    encoder = load_encoder(spoiled)
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(encoder(encoder.preprocess(images)).last, model.encode(images).semantic_tokens)


def test_sharded_folder_without_the_decoder_shard(saved, tmp_path):
    """A sharded checkpoint whose decoder shard is deleted: the encoder loads from the encoder shard alone."""
    model, folder = saved
    state = load_file(folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    parts = {"enc.safetensors": {k: v for k, v in state.items() if k.startswith("encoder.")},
             "rest.safetensors": {k: v for k, v in state.items() if not k.startswith("encoder.")}}
    weight_map = {}
    for name, tensors in parts.items():
        save_file(tensors, sharded / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "rest.safetensors").unlink()
    encoder = load_encoder(sharded)
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(encoder(encoder.preprocess(images)).last, model.encode(images).semantic_tokens)


def test_fine_tuning_gradients_flow(saved):
    model, folder = saved
    encoder = load_encoder(folder).train()
    out = encoder(encoder.preprocess(torch.rand(2, 3, 32, 32)), layers=[-1]).last
    out.square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    # the tokenizer's encode path with gradients
    encoded = model.encode(torch.rand(1, 3, 32, 32), grad=True)
    assert encoded.semantic_tokens.requires_grad and encoded.latents.requires_grad
    assert not model.encode(torch.rand(1, 3, 32, 32)).latents.requires_grad


def test_missing_or_foreign_folder_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "nothing")
