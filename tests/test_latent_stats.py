"""Latent statistics for the generator: compute -> save -> load -> normalise -> denormalise."""

import hashlib

import pytest
import torch

from app.cli import main
from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer, compute_latent_stats
from uniflow.errors import CheckpointError, OutputError
from uniflow.latent_stats import STATS_NAME, LatentStatsAccumulator, read_latent_stats, save_latent_stats


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    return UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path / "tok")


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_round_trip_and_unit_scale(folder):
    tokenizer = UniFlowTokenizer.from_pretrained(folder)
    assert not tokenizer.has_latent_stats
    with pytest.raises(CheckpointError, match="latent-stats"):
        tokenizer.normalize_latents(torch.zeros(1, 16, 16))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(8, 3, 32, 32, generator=gen) for _ in range(4)]
    before = _digests(folder)
    stats = compute_latent_stats(tokenizer, batches, source="random")
    assert stats.mean.shape == (16,) and stats.num_images == 32 and stats.num_tokens == 32 * 16
    save_latent_stats(folder, stats)
    after = _digests(folder)
    assert {k: v for k, v in after.items() if k != STATS_NAME} == before  # no other file changed

    loaded = UniFlowTokenizer.from_pretrained(folder)
    torch.testing.assert_close(loaded.latent_stats.mean, stats.mean)
    torch.testing.assert_close(loaded.latent_stats.std, stats.std)
    assert loaded.latent_stats.source == "random" and loaded.latent_stats.num_images == 32
    latents = torch.cat([loaded.encode(b).latents for b in batches])
    normed = loaded.normalize_latents(latents)
    torch.testing.assert_close(loaded.denormalize_latents(normed), latents, atol=1e-5, rtol=1e-5)
    flat = normed.reshape(-1, 16).double()
    assert flat.mean(0).abs().max() < 1e-4
    assert (flat.std(0) - 1).abs().max() < 1e-4

    # kept by save_pretrained, dropped when a tokenizer without statistics overwrites the folder
    copy = loaded.save_pretrained(folder.parent / "copy")
    assert read_latent_stats(copy) is not None
    UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(copy, overwrite=True)
    assert read_latent_stats(copy) is None


def test_replacing_needs_overwrite_and_wrong_width_is_refused(folder):
    acc = LatentStatsAccumulator()
    acc.update(torch.randn(4, 16, 16))
    stats = acc.result("x")
    save_latent_stats(folder, stats)
    with pytest.raises(OutputError, match="overwrite"):
        save_latent_stats(folder, stats)
    save_latent_stats(folder, stats, overwrite=True)
    acc8 = LatentStatsAccumulator()
    acc8.update(torch.randn(4, 16, 8))
    save_latent_stats(folder, acc8.result("y"), overwrite=True)
    with pytest.raises(CheckpointError, match="8 channels"):
        UniFlowTokenizer.from_pretrained(folder)


def test_streaming_accumulator_matches_one_pass():
    data = torch.randn(10, 7, 5, dtype=torch.float64) * 3 + 2
    acc = LatentStatsAccumulator()
    for chunk in data.split(3):
        acc.update(chunk)
    stats = acc.result()
    flat = data.reshape(-1, 5)
    torch.testing.assert_close(stats.mean, flat.mean(0).float())
    torch.testing.assert_close(stats.std, flat.std(0).float())


def test_command_writes_statistics(folder, capsys):
    assert main(["latent-stats", "--tokenizer", str(folder), "--data", "shapeworld", "--num", "12",
                 "--batch-size", "5", "--no-progress"]) == 0
    assert "written to" in capsys.readouterr().out
    stats = read_latent_stats(folder, 16)
    assert stats.num_images == 12 and stats.source.startswith("shapeworld")
    assert main(["latent-stats", "--tokenizer", str(folder), "--data", "shapeworld", "--num", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
