"""Full-size presets are checked by parameter counts and shapes on the meta device, never trained here."""

import pytest
import torch

from uniflow import UniFlowTokenizer
from uniflow.errors import ConfigError
from uniflow.presets import PRESETS, get_preset


def build_meta(name: str) -> UniFlowTokenizer:
    with torch.device("meta"):
        return UniFlowTokenizer.from_config(get_preset(name), load_pretrained_encoder=False)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_internvit_300m_parameter_counts():
    model = build_meta("internvit-300m")
    encoder = count(model.encoder)
    decoder = count(model.decoder) + count(model.to_latent)  # the paper's decoder includes both projections
    print(f"encoder {encoder / 1e6:.2f}M, decoder {decoder / 1e6:.2f}M")
    assert abs(encoder - 304e6) / 304e6 < 0.01
    assert abs(decoder - 148.6e6) / 148.6e6 < 0.01
    assert model.decoder.flow_head.input_proj.in_features == 588  # 14 x 14 x 3 pixels per patch
    assert model.decoder.global_pos_embed.shape == (1, 1024, 1024)  # 32 x 32 grid at 448 px


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_trace_shapes(name):
    model = build_meta(name)
    cfg = model.config
    size = cfg.encoder.image_size
    with torch.device("meta"):
        pixels = torch.empty(2, 3, size, size)
        enc, states = model._encode_normalized(pixels)
        assert len(states) == model.encoder.num_layers
        n = (size // model.encoder.patch_size) ** 2
        assert enc.latents.shape == (2, n, cfg.decoder.latent_channels)
        cond = model.decoder.condition(enc.latents, enc.grid)
        assert cond.shape == (2, n, model.encoder.width)


def test_tiny_preset_is_small():
    model = UniFlowTokenizer.from_config(get_preset("tiny"))
    assert count(model) < 8e6
    assert model.encoder.patch_size == 8 and model.config.encoder.image_size == 64


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown tokenizer preset 'huge'.*tiny"):
        get_preset("huge")
