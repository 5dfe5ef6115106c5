"""The decoder's recipe options (data prediction, border-weighted loss, time point mass at 0): each range-checked,
and the default path bit-for-bit the release's, so the converted official checkpoint and older folders decode as
before."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_tokenizer_config
from uniflow import flow
from uniflow.decoder import DecoderConfig, PixelFlowDecoder, border_weights, patchify, unpatchify
from uniflow.errors import ConfigError
from uniflow.metrics import patch_seam_ratio
from uniflow.tokenizer import TokenizerConfig, UniFlowTokenizer

BUNDLE = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld" / "tokenizer"


def _decoder(**options) -> PixelFlowDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(latent_channels=8, width=16, global_depth=1, global_heads=2, head_width=24, head_depth=2,
                           **options)
    decoder = PixelFlowDecoder(config, encoder_width=16, patch_size=4, native_grid=(2, 2))
    for p in decoder.flow_head.parameters():  # leave the zero init so the head's output is not trivially zero
        torch.nn.init.normal_(p, std=0.1)
    return decoder


def test_default_decoder_loss_and_sampling_are_the_releases():
    decoder = _decoder()
    assert decoder.config.prediction == "velocity" and decoder.config.border_loss_weight == 1.0
    latents, target = torch.randn(2, 4, 8), torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    loss = decoder.loss(latents, target, (2, 2), flow.FlowConfig())
    # the release's objective written out: MSE(v(x_t, t, c), x1 - x0) with the same random stream
    torch.manual_seed(5)
    cond = decoder.condition(latents, (2, 2)).flatten(0, 1)
    x1 = patchify(target, 4).flatten(0, 1)
    x0 = torch.randn(x1.shape)
    t = flow.sample_time(x1.shape[0], flow.FlowConfig())
    ref = torch.nn.functional.mse_loss(decoder.flow_head(flow.interpolate(x0, x1, t), t, cond), x1 - x0)
    assert torch.equal(loss, ref)
    # one Euler step: x0 + v(x0, 0, c), with the noise drawn from the given generator
    out = decoder.sample(latents, (2, 2), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(8, 48, generator=torch.Generator().manual_seed(1))
    before = flow.sample(lambda x, t: decoder.flow_head(x, t, cond), noise, 1, "euler")  # the code before options
    assert torch.equal(out, unpatchify(before.view(2, 4, 48), 4, (2, 2)))
    expected = noise + decoder.flow_head(noise, torch.zeros(8), cond)
    assert torch.allclose(out, unpatchify(expected.view(2, 4, 48), 4, (2, 2)), atol=1e-6)


def test_a_folder_written_before_the_options_reads_the_defaults_and_decodes_as_before(tmp_path):
    """A tokenizer folder from before the options (the first bundle, the converted release) has none of the new
    fields in its config.json: they read as the defaults, and decoding is the release's velocity Euler step."""
    torch.manual_seed(0)
    saved = UniFlowTokenizer.from_config(tiny_tokenizer_config(image_size=32, patch=8))
    for p in saved.decoder.flow_head.parameters():  # leave the zero init so the head's output is not trivially zero
        torch.nn.init.normal_(p, std=0.05)
    saved.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for section, key in (("decoder", "prediction"), ("decoder", "border_loss_weight"), ("flow", "t0_prob")):
        del config[section][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    tokenizer = UniFlowTokenizer.from_pretrained(tmp_path / "old")
    assert tokenizer.config.decoder.prediction == "velocity" and tokenizer.config.flow.t0_prob == 0.0
    assert tokenizer.config.decoder.border_loss_weight == 1.0
    latents = torch.randn(1, 16, tokenizer.config.decoder.latent_channels)
    out = tokenizer.decode(latents, seed=3)
    decoder = tokenizer.decoder
    cond = decoder.condition(latents, (4, 4)).flatten(0, 1)
    noise = torch.randn(16, decoder.patch_dim, generator=torch.Generator().manual_seed(3))
    before = flow.sample(lambda x, t: decoder.flow_head(x, t, cond), noise, 1, "euler")  # the code before options
    ref = unpatchify(before.view(1, 16, decoder.patch_dim), decoder.patch_size, (4, 4))
    assert torch.equal(out, tokenizer.encoder.denormalize(ref).clamp(0, 1))


@pytest.mark.skipif(not BUNDLE.exists(), reason="the bundled ShapeWorld tokenizer is not in this checkout")
def test_the_bundle_records_its_recipe():
    config = json.loads((BUNDLE / "config.json").read_text())
    assert config["decoder"]["prediction"] == "data" and config["decoder"]["border_loss_weight"] == 5.0
    assert UniFlowTokenizer.from_pretrained(BUNDLE).config.flow.t0_prob == 0.25


def test_data_prediction_decodes_the_heads_output():
    decoder = _decoder(prediction="data")
    latents = torch.randn(2, 4, 8)
    out = decoder.sample(latents, (2, 2), generator=torch.Generator().manual_seed(1))
    cond = decoder.condition(latents, (2, 2)).flatten(0, 1)
    noise = torch.randn(8, 48, generator=torch.Generator().manual_seed(1))
    head = decoder.flow_head(noise, torch.zeros(8), cond)
    assert torch.allclose(out, unpatchify(head.view(2, 4, 48), 4, (2, 2)), atol=1e-5)
    loss = decoder.loss(latents, torch.randn(2, 3, 8, 8), (2, 2), flow.FlowConfig(t0_prob=0.5))
    loss.backward()
    assert torch.isfinite(loss) and decoder.flow_head.input_proj.weight.grad is not None


def test_border_weights_follow_the_seam_ratios_borders():
    patch = 8
    weights = border_weights(patch, 3, 4.0)
    assert weights.shape == (3 * patch * patch,) and set(weights.tolist()) == {1.0, 4.0}
    # an error only on the pixels the weights call "border" is, for the seam ratio, an error only on the border
    border = (weights.view(3, patch, patch)[0] == 4.0).float()
    image = border.repeat(2, 2)[None, None].expand(1, 3, 16, 16)
    assert patch_seam_ratio(torch.ones(1, 3, 16, 16) + image, torch.ones(1, 3, 16, 16) + 0 * image, patch) > 1e6
    assert torch.equal(patchify(image, patch)[0, 0], (weights == 4.0).float())


def test_border_weighted_loss_weights_the_border_pixels():
    decoder, plain = _decoder(border_loss_weight=5.0), _decoder()
    latents = torch.randn(2, 4, 8)
    target = torch.zeros(2, 3, 8, 8)
    torch.manual_seed(2)
    weighted = decoder.loss(latents, target, (2, 2), flow.FlowConfig())
    torch.manual_seed(2)
    unweighted = plain.loss(latents, target, (2, 2), flow.FlowConfig())
    assert not torch.equal(weighted, unweighted) and torch.isfinite(weighted)


@pytest.mark.parametrize("field, value, match", [
    ("prediction", "epsilon", r"decoder\.prediction: expected one of \['velocity', 'data'\]"),
    ("border_loss_weight", 0, r"decoder\.border_loss_weight: expected a value in \(0, 100\]"),
    ("border_loss_weight", 101, r"decoder\.border_loss_weight"),
])
def test_options_are_range_checked_with_the_field_named(field, value, match):
    data = tiny_tokenizer_config().to_dict()
    data["decoder"][field] = value
    with pytest.raises(ConfigError, match=match):
        TokenizerConfig.from_dict(data, "run.yaml: model")
    data = tiny_tokenizer_config().to_dict()
    data["flow"]["t0_prob"] = 1.5
    with pytest.raises(ConfigError, match=r"flow\.t0_prob"):
        TokenizerConfig.from_dict(data, "run.yaml: model")


def test_training_evaluation_borders_are_the_metrics_borders():
    from uniflow.metrics import patch_border_mask  # what the training evaluation and the seam ratio both use

    mask = patch_border_mask(16, 24, 8)
    assert torch.equal(mask[:8, :8].flatten(), border_weights(8, 1, 2.0) == 2.0)
    assert torch.equal(mask[8:, 16:], mask[:8, :8])
