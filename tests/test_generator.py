"""The AR generator (generator/): the model, KV-cache sampling, CFG, class dropout, the shared flow head, tokenizer
fingerprints, checkpoints, presets (issue 10, acceptance 1), and a tiny generator that learns."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import uniflow.flow_head
from generator.fingerprint import tokenizer_fingerprint
from generator.model import ARGenerator, GeneratorConfig, count_parameters
from generator.presets import LLAMAGEN_CODEBOOK, PUBLISHED_TOTALS, get_preset
from generator.sample import _sample_token, sample_images, sample_latents
from tests.helpers import tiny_tokenizer_config
from uniflow import flow
from uniflow.errors import CheckpointError, ConfigError, OutputError
from uniflow.latent_stats import LatentStats
from uniflow.tokenizer import UniFlowTokenizer


def tiny_config(**overrides: object) -> GeneratorConfig:
    base = dict(num_classes=5, grid=(3, 4), token_channels=16, width=32, depth=2, heads=2, ffn_multiple_of=16,
                head_width=32, head_depth=2, class_names=["a", "b", "c", "d", "e"])
    base.update(overrides)
    return GeneratorConfig(**base)


def randomized(config: GeneratorConfig, seed: int = 0) -> ARGenerator:
    """A generator whose every weight is random (the head's zero-initialised output layers too), so that sampled
    tokens depend on the class and on every earlier token: a test of sampling that cannot pass by accident."""
    torch.manual_seed(seed)
    model = ARGenerator(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def tokenizer_with_stats(seed: int, channels: int = 16) -> UniFlowTokenizer:
    torch.manual_seed(seed)
    tok = UniFlowTokenizer(dataclasses.replace(tiny_tokenizer_config()))
    tok.set_latent_stats(LatentStats(torch.randn(channels) * 0.1, torch.rand(channels) + 0.5))
    return tok.eval()


# --------------------------------------------------------------------------------------------------- acceptance 1
def test_the_head_is_the_decoders_flow_head_class(shared_tokenizer) -> None:
    model = ARGenerator(tiny_config())
    assert type(model.head) is uniflow.flow_head.FlowHead
    assert type(model.head) is type(shared_tokenizer[0].decoder.flow_head)
    import generator.model

    assert generator.model.FlowHead is uniflow.flow_head.FlowHead  # imported, never copied


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_kv_cache_sampling_equals_recomputing_the_prefix(cfg: float) -> None:
    model = randomized(tiny_config())
    cached = sample_latents(model, [0, 3, 4], seeds=[5, 6, 7], cfg=cfg, steps=3, use_cache=True)
    full = sample_latents(model, [0, 3, 4], seeds=[5, 6, 7], cfg=cfg, steps=3, use_cache=False)
    assert cached.shape == (3, 12, 16)
    torch.testing.assert_close(cached, full, atol=1e-3, rtol=1e-3)  # float noise, amplified token by token
    # Not vacuous: the same seeds under other classes give other tokens, and later tokens depend on earlier ones.
    other = sample_latents(model, [1, 1, 1], seeds=[5, 6, 7], cfg=cfg, steps=3)
    assert (other - cached).abs().max() > 1e-2
    noise = torch.stack([torch.randn(12, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    assert (cached - noise).abs().max() > 1e-2


def test_a_decoding_step_over_the_filled_cache_equals_the_masked_full_cache() -> None:
    """The eager step reads a view of the filled positions; the compile-friendly one all of them under a mask."""
    model = randomized(tiny_config(), seed=4)
    labels = torch.tensor([0, 3])
    caches = [model.new_cache(2), model.new_cache(2)]
    with torch.no_grad():
        for cache in caches:
            model.hidden_states(model.inputs(labels, None), cache)
        for pos in range(1, 6):
            x = model.input_proj(torch.randn(2, 16, generator=torch.Generator().manual_seed(pos)))[:, None]
            viewed = model.step(x, torch.tensor(pos), caches[0], pos + 1)
            masked = model.step(x, torch.tensor(pos), caches[1])
            torch.testing.assert_close(viewed, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=1e-5)
    assert caches[0].k[:, :, :, 6:].abs().max() == 0 and caches[0].k[:, :, :, 5].abs().max() > 0


def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional() -> None:
    model = randomized(tiny_config(), seed=1)
    times, path = flow.time_grid(4), model.head.token_path
    hidden = torch.randn(6, 32)  # rows 0-2 conditional, rows 3-5 their unconditional twins
    x0 = torch.randn(3, 16)
    batched = _sample_token(model, path, hidden, times, x0, 1.0, True, "euler")  # the one-pass guided path, scale 1
    conditional = _sample_token(model, path, hidden[:3], times, x0, 1.0, False, "euler")
    unconditional = _sample_token(model, path, hidden[3:], times, x0, 1.0, False, "euler")
    torch.testing.assert_close(batched, conditional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_sample_token(model, path, hidden, times, x0, 0.0, True, "euler"), unconditional,
                               atol=1e-5, rtol=1e-5)
    assert (conditional - unconditional).abs().max() > 1e-2
    # Whole samples: scale 1 (either schedule) is the conditional model; scale 0 is the null class's samples.
    cond = sample_latents(model, [2, 4], seeds=0, cfg=1.0, steps=2)
    torch.testing.assert_close(sample_latents(model, [2, 4], seeds=0, cfg=1.0, cfg_schedule="linear", steps=2), cond)
    null = model.null_class
    torch.testing.assert_close(sample_latents(model, [2, 4], seeds=0, cfg=0.0, steps=2),
                               sample_latents(model, [null, null], seeds=0, cfg=1.0, steps=2), atol=2e-3, rtol=2e-3)


def test_class_dropout_reaches_the_null_class_in_training_only() -> None:
    model = randomized(tiny_config(class_dropout=0.1)).train()  # a zero-initialised head passes no gradient back
    labels = torch.randint(0, 5, (4000,))
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    share = (dropped == model.null_class).float().mean().item()
    assert 0.08 < share < 0.12
    assert torch.equal(dropped[dropped != model.null_class], labels[dropped != model.null_class])
    tokens = torch.randn(64, 12, 16)
    out = model.loss(tokens, torch.randint(0, 5, (64,)), torch.Generator().manual_seed(1))
    assert out.null_fraction > 0
    out.loss.backward()
    grad = model.class_embed.weight.grad
    assert grad[model.null_class].abs().sum() > 0  # the unconditional branch is trained
    model.eval()
    assert model.loss(tokens, torch.randint(0, 5, (64,))).null_fraction == 0  # no dropout at evaluation
    assert torch.equal(ARGenerator(tiny_config(class_dropout=0.0)).train().drop_labels(labels), labels)


def test_a_mismatched_tokenizer_is_refused(tmp_path: Path) -> None:
    tok_a, tok_b = tokenizer_with_stats(0), tokenizer_with_stats(1)
    model = randomized(tiny_config())
    model.attach_tokenizer(tok_a)
    assert model.config.tokenizer_fingerprint == tokenizer_fingerprint(tok_a)
    model.check_tokenizer(tok_a)
    with pytest.raises(CheckpointError, match=r"tokenizer: tokenizer [0-9a-f]{16} is not the one this generator "
                                              r"was trained on \([0-9a-f]{16}\)"):
        model.check_tokenizer(tok_b)
    with pytest.raises(CheckpointError, match="not the one"):
        sample_images(model, tok_b, [0], seeds=0, steps=1)
    # The record survives save/load, and the tokenizer stored in fp16 (as shipped) is still the same tokenizer.
    loaded = ARGenerator.from_pretrained(model.save_pretrained(tmp_path / "gen"))
    tok_a.save_pretrained(tmp_path / "tok16", dtype=torch.float16)
    tok16 = UniFlowTokenizer.from_pretrained(tmp_path / "tok16")
    fp16_generator = randomized(tiny_config())
    fp16_generator.attach_tokenizer(tok16)
    loaded_fp16 = UniFlowTokenizer.from_pretrained(tmp_path / "tok16", dtype=torch.float16)
    fp16_generator.check_tokenizer(loaded_fp16)
    assert tokenizer_fingerprint(tok16) == tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(loaded_fp16)
    with pytest.raises(CheckpointError, match="not the one"):
        loaded.check_tokenizer(tok_b)
    wide = tokenizer_with_stats(2)
    wide.config.decoder.latent_channels = 8
    with pytest.raises(CheckpointError, match="8 channels, the generator models 16"):
        loaded.check_tokenizer(wide)


def test_save_load_round_trip_and_other_kinds_refused(tmp_path: Path, shared_tokenizer) -> None:
    model = randomized(tiny_config(), seed=2)
    model.attach_tokenizer(tokenizer_with_stats(0))
    folder = model.save_pretrained(tmp_path / "gen")
    loaded = ARGenerator.from_pretrained(folder)
    assert loaded.config == model.config
    torch.testing.assert_close(sample_latents(loaded, [1, 2], seeds=3, cfg=2.0, steps=2),
                               sample_latents(model, [1, 2], seeds=3, cfg=2.0, steps=2))
    with pytest.raises(CheckpointError, match=r"model_kind is 'uniflow-tokenizer', expected 'uniflow-generator'"):
        ARGenerator.from_pretrained(shared_tokenizer[1])
    with pytest.raises(OutputError, match="already holds a 'uniflow-generator' checkpoint"):
        model.save_pretrained(folder)
    assert model.save_pretrained(folder, dtype=torch.float16, overwrite=True) == folder
    assert ARGenerator.from_pretrained(folder, dtype=torch.float16).dtype == torch.float16


def test_per_sample_seeds_do_not_depend_on_the_batch() -> None:
    model = randomized(tiny_config(), seed=3)
    batch = sample_latents(model, [0, 1, 2], seeds=[10, 11, 12], cfg=1.5, steps=2)
    alone = sample_latents(model, [1], seeds=[11], cfg=1.5, steps=2)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch[0], batch[2])
    heun = sample_latents(model, [1], seeds=[11], cfg=1.5, steps=2, sampler="heun")
    assert not torch.allclose(heun, alone)
    cold = sample_latents(model, [1], seeds=[11], cfg=1.5, steps=2, temperature=0.01)
    assert cold.std() < alone.std()


def test_bad_sampling_options_are_one_line_errors() -> None:
    model = randomized(tiny_config())
    cases = [({"cfg": -1.0}, r"cfg: expected a value in \[0, inf\)"), ({"cfg": math.nan}, "cfg: expected a finite"),
             ({"steps": 0}, r"sampling steps must be an integer in \[1, 1000\], got 0"),
             ({"temperature": 0.0}, r"temperature: expected a value in \(0, inf\)"),
             ({"temperature": -2.0}, "temperature"), ({"cfg_schedule": "cosine"}, "cfg_schedule: expected one of"),
             ({"sampler": "rk4"}, "unknown sampler")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            sample_latents(model, [0], seeds=0, **options)
    with pytest.raises(ConfigError, match=r"class id 6: out of range; expected \[0, 5\)"):
        sample_latents(model, [6], seeds=0)
    with pytest.raises(ConfigError, match=r"class id 5: out of range"):
        model.class_ids([5])
    with pytest.raises(ConfigError, match=r"class 'pink': unknown class name"):
        model.class_ids(["pink"])
    assert model.class_ids(["c", 4, "0"]) == [2, 4, 0]
    with pytest.raises(ConfigError, match="seeds: 2 seeds for 1 samples"):
        sample_latents(model, [0], seeds=[1, 2])
    with pytest.raises(ConfigError, match=r"heads: width 32 / heads 3"):
        tiny_config(heads=3)
    with pytest.raises(ConfigError, match="class_names: 2 names for 5 classes"):
        tiny_config(class_names=["a", "b"])


def test_presets_match_the_usual_ar_generator_sizes_on_the_meta_device() -> None:
    """B/L/XL are LlamaGen's GPT-B/L/XL transformers: their published totals count a 16384-entry codebook embedding
    and output layer, which continuous tokens do not have; the rest must match within 1%."""
    for name, published in PUBLISHED_TOTALS.items():
        config = get_preset(name)
        with torch.device("meta"):
            model = ARGenerator(config)
        counts = count_parameters(model)
        with_codebook = counts["transformer"] + 2 * LLAMAGEN_CODEBOOK * config.width
        assert abs(with_codebook - published) / published < 0.01, (name, counts)
        assert counts["head"] < 0.15 * counts["transformer"]
        assert config.num_tokens == 256 and config.token_channels == 64
    tiny = get_preset("tiny")
    assert tiny.num_classes == 36 and tiny.grid == (8, 8)
    with torch.device("meta"):
        assert count_parameters(ARGenerator(tiny))["total"] * 2 < 10e6  # ships in fp16 within 10 MB
    with pytest.raises(ConfigError, match="unknown generator preset 'M'"):
        get_preset("M")


def test_a_tiny_generator_learns_class_conditional_tokens() -> None:
    """Class k's tokens are a fixed pattern mu_k plus small noise: after a few hundred steps the loss has fallen and
    sampled tokens are nearest their own class's pattern (the class, not the noise, decides what is sampled)."""
    torch.manual_seed(0)
    classes, n, c = 4, 6, 8
    config = GeneratorConfig(num_classes=classes, grid=(2, 3), token_channels=c, width=64, depth=2, heads=2,
                             ffn_multiple_of=32, head_width=64, head_depth=2, noise_draws=4, class_dropout=0.1)
    model = ARGenerator(config)
    patterns = torch.randn(classes, n, c)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        labels = torch.randint(0, classes, (32,))
        tokens = patterns[labels] + 0.05 * torch.randn(32, n, c)
        loss = model.loss(tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    model.eval()
    labels = torch.arange(classes).repeat_interleave(8)
    samples = sample_latents(model, labels, seeds=0, cfg=1.5, steps=8)
    distance = ((samples[:, None] - patterns[None]) ** 2).mean(dim=(2, 3))
    accuracy = (distance.argmin(1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy
