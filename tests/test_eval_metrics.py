"""The distribution and pair metrics of eval/ against references: torchmetrics' FID on the same features,
scikit-image's PSNR/SSIM on the same images, and feature sets whose precision, recall and IS are known by
construction. No Inception network runs here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.metrics_gen import (
    Stats,
    feature_stats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    small_set_note,
)
from eval.recon import PSNR_CAP_DB, pair_metrics
from uniflow.errors import ImageInputError


def _correlated(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


class _Identity(torch.nn.Module):
    """A feature module that returns its input: torchmetrics then sees exactly our features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchmetrics_fid(a: np.ndarray, b: np.ndarray) -> float:
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    metric = fid_module.FrechetInceptionDistance(feature=_Identity(a.shape[1]), normalize=False)
    metric.update(torch.from_numpy(a).double(), real=True)
    metric.update(torch.from_numpy(b).double(), real=False)
    return float(metric.compute())


def test_fid_of_a_set_against_itself_is_zero() -> None:
    for n in (40, 300):  # fewer and more images than dimensions (the two ways tr sqrt is computed)
        x = _correlated(n, 64, seed=n)
        assert frechet_distance(feature_stats(x), feature_stats(x)) == pytest.approx(0.0, abs=1e-8)


def test_fid_grows_monotonically_over_a_noise_sweep() -> None:
    x = _correlated(400, 32, seed=1)
    noise = np.random.default_rng(2).normal(size=x.shape)
    ref = feature_stats(x)
    fids = [frechet_distance(ref, feature_stats(x + level * noise)) for level in (0.1, 0.3, 0.6, 1.0)]
    assert fids[0] > 1e-3
    assert all(later > earlier for earlier, later in zip(fids, fids[1:])), fids


@pytest.mark.parametrize("n_a,n_b", [(300, 250), (40, 30), (300, 30)], ids=["full-rank", "both-small", "one-small"])
def test_fid_equals_torchmetrics_on_the_same_features(n_a: int, n_b: int) -> None:
    a = _correlated(n_a, 64, seed=3)
    b = _correlated(n_b, 64, seed=4, shift=0.3) * 1.2
    ours = frechet_distance(feature_stats(a), feature_stats(b))
    assert ours == pytest.approx(_torchmetrics_fid(a, b), rel=1e-3)


def test_the_three_ways_of_computing_tr_sqrt_agree() -> None:
    """Small sets use their N x d factors; precomputed statistics (ADM's mu/sigma) only the d x d covariance."""
    a, b = feature_stats(_correlated(30, 64, seed=5)), feature_stats(_correlated(40, 64, seed=6, shift=0.2))
    assert a.factor is not None and b.factor is not None
    both = frechet_distance(a, b)
    one = frechet_distance(a, Stats(b.mu, b.sigma))
    none = frechet_distance(Stats(a.mu, a.sigma), Stats(b.mu, b.sigma))
    assert one == pytest.approx(both, rel=1e-7) and none == pytest.approx(both, rel=1e-5)


def test_trace_sqrt_matches_scipy_sqrtm_on_full_rank_covariances() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    a, b = feature_stats(_correlated(500, 16, seed=7)), feature_stats(_correlated(500, 16, seed=8, shift=1.0))
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_needs_two_images_and_says_so() -> None:
    with pytest.raises(ImageInputError, match="1 image.*at least 2"):
        feature_stats(np.zeros((1, 8)))
    assert small_set_note(100, 2048) and "rank-deficient" in small_set_note(100, 2048)
    assert small_set_note(5000, 2048) is None


def _line(values: list[float]) -> np.ndarray:
    return np.array([[v, 0.0] for v in values])


def test_precision_recall_known_answers() -> None:
    grid = list(range(10))
    far = [1000.0 + v for v in grid]
    # identical sets: everything covers everything
    assert precision_recall(_line(grid), _line(grid)) == (1.0, 1.0)
    # half of the samples far from the reference: precision 1/2; the near half still covers the reference
    assert precision_recall(_line(grid), _line(grid + far)) == (0.5, 1.0)
    # the samples miss half of the reference: recall 1/2
    assert precision_recall(_line(grid + far), _line(grid)) == (1.0, 0.5)
    # radii are the squared distance to the 3rd nearest other point (k = 3)
    np.testing.assert_array_equal(manifold_radii(_line(grid)), [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])


def test_precision_recall_equals_a_brute_force_count_across_batches() -> None:
    rng = np.random.default_rng(9)
    ref, gen = rng.normal(size=(37, 5)), rng.normal(size=(23, 5)) + 0.7

    def brute(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        d = lambda u, v: ((u[:, None] - v[None]) ** 2).sum(-1)
        ra, rb = np.sort(d(a, a), 1)[:, 3], np.sort(d(b, b), 1)[:, 3]
        return float((d(b, a) <= ra[None]).any(1).mean()), float((d(a, b) <= rb[None]).any(1).mean())

    expected = brute(ref, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    assert precision_recall(ref, gen, batch=7) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_needs_k_plus_one_points() -> None:
    with pytest.raises(ImageInputError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)))


def test_inception_score_known_answers() -> None:
    classes = 10
    confident = np.full((classes * 20, 1008), -50.0)
    confident[np.arange(classes * 20), np.arange(classes * 20) % classes] = 50.0
    assert inception_score(confident) == pytest.approx(classes, rel=1e-6)  # sure and spread: IS = classes
    one_class = np.zeros((40, 1008))
    one_class[:, 3] = 50.0
    assert inception_score(one_class) == pytest.approx(1.0, abs=1e-9)  # sure but all alike
    assert inception_score(np.zeros((40, 1008))) == pytest.approx(1.0, abs=1e-9)  # unsure
    # splits: each split of 10 holds one class only, so each scores 1
    assert inception_score(confident[np.argsort(np.arange(200) % classes, kind="stable")], split_size=20) == \
        pytest.approx(1.0, abs=1e-9)


def test_psnr_ssim_equal_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(10)
    original = rng.integers(0, 256, size=(3, 32, 40, 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, size=original.shape)
    recon = np.clip(original.astype(int) + noise, 0, 255).astype(np.uint8)
    p, s = pair_metrics(recon, original)
    for i in range(3):
        assert p[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(original[i], recon[i], data_range=255),
                                            rel=1e-6)
        expected = metrics.structural_similarity(original[i], recon[i], data_range=255, channel_axis=-1,
                                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert s[i].item() == pytest.approx(expected, abs=1e-6)
    same, _ = pair_metrics(original, original)
    assert same.tolist() == [PSNR_CAP_DB] * 3
