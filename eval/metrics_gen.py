"""Distribution metrics on Inception features, defined as the ADM evaluator (guided-diffusion `evaluations/`)
defines them, so the numbers compare with the papers that use it.

- FID / sFID: Fréchet distance between Gaussians fitted to two feature sets (mean, covariance with N - 1), on the
  pool (2048-d) or spatial (2023-d) features. tr sqrt(S1 S2) is computed from symmetric matrices only (where
  `scipy.linalg.sqrtm` of the non-symmetric product goes complex for the rank-deficient covariances of small sets):
  the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, or, when a set has no more images than dimensions and
  its covariance is F^T F with F its centred features / sqrt(N - 1), the nuclear norm of F1 F2^T (both sets) or the
  eigenvalues of F S F^T (one set): the same number from an N x N problem. `torchmetrics`' FID is the reference the
  tests compare against.
- IS: exp(E_x KL(p(y|x) || p(y))) over splits of 5000, from the softmax of the 1008-way logits (no bias, as ADM).
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): the manifold of a set is the union of balls around its
  points with the squared distance to the k-th nearest other point as radius; precision is the share of samples
  inside the reference manifold, recall the share of reference points inside the sample manifold. ADM computes the
  distances in float16 where they are finite; here they are float64 (identical up to points on a ball's edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uniflow.errors import ImageInputError

MIN_FID_SAMPLES = 2  # a covariance needs two points
PR_K = 3  # ADM's ManifoldEstimator nhood_sizes
IS_SPLIT = 5000


@dataclass
class Stats:
    """A Gaussian fitted to features: mean (d,), covariance (d, d), how many images (None: precomputed) and, for
    sets with no more images than dimensions, the factor F (N, d) with sigma = F^T F."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    factor: np.ndarray | None = None


def check_count(count: int, minimum: int, what: str) -> None:
    if count < minimum:
        raise ImageInputError(f"{what}: {count} image(s), but at least {minimum} are needed")


def feature_stats(features: np.ndarray, what: str = "features") -> Stats:
    """Mean and covariance (N - 1 normalisation, as np.cov and ADM) in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ImageInputError(f"{what}: expected (N, d) features, got shape {feats.shape}")
    check_count(feats.shape[0], MIN_FID_SAMPLES, f"{what} (a Fréchet distance needs a covariance)")
    n, d = feats.shape
    mu = feats.mean(0)
    factor = (feats - mu) / np.sqrt(n - 1)
    return Stats(mu, factor.T @ factor, n, factor if n <= d else None)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _sqrt_eig_sum(m: np.ndarray) -> float:
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def trace_sqrt_product(a: Stats, b: Stats) -> float:
    """tr sqrt(S_a S_b) for positive semi-definite covariances, through the smallest symmetric problem available."""
    if a.factor is not None and b.factor is not None:
        return float(np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum())
    if a.factor is not None or b.factor is not None:
        f, other = (a.factor, b.sigma) if a.factor is not None else (b.factor, a.sigma)
        return _sqrt_eig_sum(f @ other @ f.T)
    root = _psd_sqrt(a.sigma)
    return _sqrt_eig_sum(root @ b.sigma @ root)


def frechet_distance(a: Stats, b: Stats) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ImageInputError(f"statistics of different feature sizes: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a, b)
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical sets


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """ADM's IS: softmax, then per split exp(mean_x sum_y p log(p / mean_x p)), averaged over splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).numpy()
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(float(np.exp(kl.sum(1).mean())))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_(min=0)


def manifold_radii(features: np.ndarray, k: int = PR_K, batch: int = 2048, device: str = "cpu") -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (the point itself is the 0-th)."""
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    check_count(feats.shape[0], k + 1, f"precision/recall (k = {k})")
    radii = [torch.kthvalue(_sq_distances(feats[i:i + batch], feats), k + 1, dim=1).values
             for i in range(0, feats.shape[0], batch)]
    return torch.cat(radii).cpu().numpy()


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Share of `points` inside at least one ball (centre, squared radius)."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for i in range(0, points.shape[0], batch):
        for j in range(0, centres.shape[0], batch):
            d = _sq_distances(points[i:i + batch], centres[j:j + batch])
            inside[i:i + batch] |= (d <= radii[None, j:j + batch]).any(1)
    return float(inside.double().mean())


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_K, batch: int = 2048,
                     device: str = "cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` with k-NN manifolds."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)
    if ref.shape[1:] != gen.shape[1:]:
        raise ImageInputError(f"precision/recall: feature sizes differ ({ref.shape[1]} vs {gen.shape[1]})")
    r_ref = torch.as_tensor(manifold_radii(reference, k, batch, device), device=device)
    r_gen = torch.as_tensor(manifold_radii(samples, k, batch, device), device=device)
    return _coverage(gen, ref, r_ref, batch), _coverage(ref, gen, r_gen, batch)


def small_set_note(count: int, dim: int) -> str | None:
    """A warning for the report when a set is too small for a full-rank covariance."""
    if count > dim:
        return None
    return (f"{count} images <= {dim} feature dimensions: the covariance is rank-deficient and FID is biased "
            f"upward; compare only with FIDs over the same number of images (papers: 50000 samples against the "
            f"10000-image reference)")
