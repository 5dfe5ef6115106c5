"""The patch-border deblocking filter: small steps at patch borders are spread into ramps, smooth gradients and real
edges are left as they are, and the tokenizer applies it on decode as its config (or the caller) says."""

import dataclasses

import pytest
import torch

from tests.helpers import tiny_tokenizer_config
from uniflow.deblock import deblock
from uniflow.errors import ConfigError
from uniflow.metrics import patch_edge_ratio, psnr
from uniflow.tokenizer import UniFlowTokenizer


def _ramp(size: int = 32) -> torch.Tensor:
    """A smooth horizontal and vertical gradient, (1, 3, size, size)."""
    x = torch.linspace(0.2, 0.7, size)
    return (x[None, :] * 0.6 + x[:, None] * 0.4).expand(1, 3, size, size).clone()


def test_smooth_gradients_and_hard_edges_are_left_alone() -> None:
    ramp = _ramp()
    assert torch.allclose(deblock(ramp, 8, 0.5), ramp, atol=1e-6)
    edge = torch.zeros(1, 3, 32, 32)
    edge[..., 16:] = 1.0    # an edge of the picture exactly on a patch border: excess 1 > threshold
    edge[..., 19:, :] += 0.5  # and one inside patches
    assert torch.equal(deblock(edge, 8, 0.5), edge)
    assert deblock(ramp, 8, 0.0) is ramp  # 0: off


def test_a_small_step_becomes_a_ramp_as_the_gate_says() -> None:
    """Two flat patches a step of 0.05 apart: the filter keeps a step of excess * (1 - gate * (1 - 1/(2 reach))) at
    the border, gate = 1 - 0.05 / threshold, and spreads the rest over `reach` pixels each side."""
    image = torch.full((1, 1, 8, 16), 0.4)
    image[..., 8:] += 0.05
    for threshold, reach in [(0.1, 4), (0.2, 2), (0.5, 3)]:
        out = deblock(image, 8, threshold, reach)
        gate = 1 - 0.05 / threshold
        assert out[0, 0, 0, 8] - out[0, 0, 0, 7] == pytest.approx(0.05 * (1 - gate * (1 - 1 / (2 * reach))), abs=1e-6)
        assert torch.allclose(out[..., :8 - reach], image[..., :8 - reach])  # beyond its reach: untouched
        assert torch.allclose(out[..., 8 + reach:], image[..., 8 + reach:])
        assert out.mean() == pytest.approx(image.mean().item(), abs=1e-6)  # moved, not brightened
    assert torch.equal(deblock(image, 8, 0.04), image)  # the step is over the threshold: the gate is shut


def test_a_faint_grid_on_a_gradient_fades_and_the_error_falls() -> None:
    torch.manual_seed(0)
    clean = _ramp(64)
    offsets = (torch.rand(1, 3, 8, 8) * 0.04 - 0.02).repeat_interleave(8, -2).repeat_interleave(8, -1)
    blocky = clean + offsets
    out = deblock(blocky, 8, 0.3)
    assert patch_edge_ratio(blocky, clean, 8) > 2.5
    assert patch_edge_ratio(out, clean, 8) < 0.5 * patch_edge_ratio(blocky, clean, 8)
    assert psnr(out, clean).item() > psnr(blocky, clean).item() + 1.0


def test_bad_settings_are_refused() -> None:
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="deblock threshold"):
        deblock(image, 8, 1.5)
    with pytest.raises(ConfigError, match="deblock reach"):
        deblock(image, 8, 0.2, reach=5)
    with pytest.raises(ValueError, match="multiples of the patch"):
        deblock(torch.rand(1, 3, 12, 16), 8, 0.2)


def test_the_tokenizer_deblocks_on_decode_as_configured(tmp_path) -> None:
    torch.manual_seed(0)
    config = tiny_tokenizer_config()
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, deblock_reach=2))
    plain = UniFlowTokenizer(config).eval()  # reach 2 but the filter off
    latents = torch.randn(2, 16, 16)
    raw = plain.decode(latents, seed=0)
    filtered = UniFlowTokenizer(dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, deblock=0.5))).eval()
    filtered.load_state_dict(plain.state_dict())
    out = filtered.decode(latents, seed=0)
    assert not torch.equal(out, raw)
    inner = (torch.arange(32) % 8 >= 2) & (torch.arange(32) % 8 <= 5)  # beyond a reach of 2 from every border
    assert torch.equal(out[..., inner, :][..., inner], raw[..., inner, :][..., inner])
    assert torch.equal(filtered.decode(latents, seed=0, deblock=0.0), raw)  # the caller's setting wins
    assert torch.equal(plain.decode(latents, seed=0, deblock=0.5), out)
    loaded = UniFlowTokenizer.from_pretrained(filtered.save_pretrained(tmp_path / "tok"))
    assert (loaded.config.decoder.deblock, loaded.config.decoder.deblock_reach) == (0.5, 2)
    with pytest.raises(ConfigError, match="deblock"):
        dataclasses.replace(config.decoder, deblock=-0.1)


def test_the_deblocking_settings_keep_the_tokenizer_fingerprint() -> None:
    """A generator trained on a tokenizer still samples with it once its deblocking is set (the latent space is the
    same); any other config change still counts."""
    from generator.fingerprint import tokenizer_fingerprint

    torch.manual_seed(0)
    config = tiny_tokenizer_config()
    plain = UniFlowTokenizer(config)
    filtered = UniFlowTokenizer(dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, deblock=0.3, deblock_reach=2)))
    filtered.load_state_dict(plain.state_dict())
    assert tokenizer_fingerprint(filtered) == tokenizer_fingerprint(plain)
    other = UniFlowTokenizer(dataclasses.replace(config, decoder=dataclasses.replace(config.decoder,
                                                                                      prediction="data")))
    other.load_state_dict(plain.state_dict())
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(plain)


def test_the_sweep_picks_a_setting_that_costs_no_psnr_and_applies_it(tmp_path, capsys) -> None:
    import json

    from eval.deblock_sweep import main as sweep_main

    torch.manual_seed(0)
    folder = UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path / "tok")
    before = UniFlowTokenizer.from_pretrained(folder).state_dict()
    out = tmp_path / "sweep.json"
    assert sweep_main(["--tokenizer", str(folder), "--images", "4", "--thresholds", "0.1,0.5", "--reach", "2,4",
                       "--out", str(out), "--apply"]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["deblock"], r["deblock_reach"]) for r in rows] == [(0.0, 4), (0.1, 2), (0.1, 4), (0.5, 2), (0.5, 4)]
    chosen = next(r for r in rows if r["deblock"] == result["chosen"]["deblock"]
                  and (r["deblock_reach"] == result["chosen"]["deblock_reach"] or not r["deblock"]))
    for name in ("shapeworld", "dead_leaves"):
        for metric in ("psnr_db", "ssim"):
            assert chosen[f"{name}_{metric}"] >= rows[0][f"{name}_{metric}"]
    assert "chosen: deblock" in capsys.readouterr().out
    loaded = UniFlowTokenizer.from_pretrained(folder)
    assert (loaded.config.decoder.deblock, loaded.config.decoder.deblock_reach) == tuple(result["chosen"].values())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())  # only the setting changed
    for bad, flag in [(["--thresholds", "0.1,x"], "--thresholds"), (["--reach", "9"], "--reach"),
                      (["--images", "0"], "--images")]:
        assert sweep_main(["--tokenizer", str(folder), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and flag in err and err.count("\n") == 1
