"""Reconstruction quality of a tokenizer (`uniflow eval recon`): rFID, PSNR, SSIM (and LPIPS when its weights are
on disk) between images and their reconstructions, per decoder step count, with seconds per image.

The originals are the images as the tokenizer sees them: ShapeWorld rendered at the evaluation size, or a folder's
images resized (shorter side, bicubic, antialiased) and centre-cropped by `uniflow.images.preprocess` (the one crop
of training and inference), then rounded to 8 bits. Reconstructions are rounded to 8 bits too, as saved PNGs would
be; PSNR (capped at 100 dB per image), SSIM (`uniflow.metrics`) and the Inception features are all measured on
these 8-bit images, so every number describes the same pair of image sets.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.inception import FeatureExtractor, InceptionNetwork
from eval.metrics_gen import feature_stats, frechet_distance, small_set_note
from eval.npz import file_sha256
from uniflow.errors import ConfigError
from uniflow.metrics import psnr, ssim

PSNR_CAP_DB = 100.0  # an exact reconstruction would be +inf; capped per image before averaging
SHAPEWORLD_DEFAULT_NUM = 1000


@dataclass
class Originals:
    """The evaluation images as uint8 (B, S, S, 3) batches, with how they were made and their cache key."""

    description: dict[str, Any]
    count: int
    size: int
    key: str
    make: Any  # () -> Iterator[np.ndarray]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        yield from self.make(batch_size)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> uint8 (B, H, W, 3), rounded as PNG writers do."""
    return np.ascontiguousarray(
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def pair_metrics(recon: np.ndarray, original: np.ndarray, device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB, capped at PSNR_CAP_DB) and SSIM of uint8 (B, H, W, 3) pairs, on [0, 1] values."""
    y, x = (torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).double().div(255).to(device)
            for a in (recon, original))
    return psnr(y, x).clamp(max=PSNR_CAP_DB), ssim(y, x)


def shapeworld_originals(num: int, size: int, split: str = "heldout", seed: int = 0) -> Originals:
    """ShapeWorld rendered at `size` (no resize); keyed by the rendered pixels."""
    from uniflow.data.shapeworld import ShapeWorldDataset

    dataset = ShapeWorldDataset(split, num, seed=seed, image_size=size)

    def make(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, num, batch_size):
            items = [dataset[i]["image"] for i in range(start, min(num, start + batch_size))]
            yield _to_uint8(torch.stack(items))

    digest = hashlib.sha256(f"shapeworld:{split}:{seed}:{num}:{size}".encode())
    for batch in make(256):
        digest.update(batch.data)
    return Originals({"source": "shapeworld", "split": split, "seed": seed, "crop": f"rendered at {size}x{size}"},
                     num, size, "pixels-" + digest.hexdigest(), make)


def _folder_files(root: Path) -> list[Path]:
    from train.data import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def folder_originals(root: str | Path, size: int, num: int | None = None, flag: str = "--data") -> Originals:
    """Every image under `root` (any depth, sorted by path; the first `num`), resized and centre-cropped to `size`;
    keyed by the files' SHA-256 and the size."""
    from uniflow.images import open_image, preprocess

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{flag}: {root} is not a folder (expected 'shapeworld' or a folder of images)")
    files = _folder_files(root)
    if not files:
        raise ConfigError(f"{flag}: no images found under {root} (png, jpg, ... at any depth)")
    files = files[:num] if num is not None else files
    digest = hashlib.sha256(f"folder:{size}:resize-centre-crop-bicubic-aa".encode())
    for path in files:
        digest.update(f"{path.relative_to(root)}:{file_sha256(path)}".encode())

    def make(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            yield _to_uint8(torch.stack([preprocess(open_image(p, size=size), size, str(p)) for p in chunk]))

    return Originals({"source": "folder", "path": str(root.resolve()),
                      "crop": f"shorter side to {size} (bicubic, antialiased), centre crop {size}x{size}"},
                     len(files), size, "files-" + digest.hexdigest(), make)


def tokenizer_identity(folder: str | Path) -> dict[str, Any]:
    """The tokenizer's path and a SHA-256 over its config and weights (latent statistics excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {"path": str(folder), "sha256": None}
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or (path.name.startswith("model") and path.suffix in (".safetensors", ".json")):
            digest.update(f"{path.name}:{file_sha256(path)}".encode())
    return {"path": str(folder.resolve()), "sha256": digest.hexdigest()}


def lpips_metric(device: torch.device) -> tuple[Any, str | None]:
    """(callable (a, b) -> (B,) LPIPS on [0, 1] images, None) when the `lpips` package and the AlexNet weights are
    on disk; else (None, the reason). Nothing is downloaded."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "unavailable: the lpips package is not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not list(hub.glob("alexnet-owt-*.pth")):
        return None, f"unavailable: torchvision's AlexNet weights are not in {hub} (LPIPS would download them)"
    try:
        import warnings

        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # a partial install: report it instead of failing the whole evaluation
        return None, f"unavailable: lpips failed to load ({type(exc).__name__}: {exc})"

    @torch.no_grad()
    def score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return model(a * 2 - 1, b * 2 - 1).flatten()

    return score, None


def evaluate_recon(tokenizer_dir: str | Path, originals: Originals, steps: list[int], sampler: str = "euler",
                   seed: int = 0, batch_size: int = 32, device: str | torch.device = "cpu",
                   network: InceptionNetwork | None = None, cache: Path | None = None,
                   progress: bool = True, tokenizer: Any = None) -> dict[str, Any]:
    """Reconstruct `originals` at every step count; returns the report (settings, one result row per step count).
    `tokenizer`: the tokenizer already loaded from `tokenizer_dir` on `device` (else it is loaded here)."""
    device = torch.device(device)
    if tokenizer is None:
        from uniflow import UniFlowTokenizer

        tokenizer = UniFlowTokenizer.from_pretrained(tokenizer_dir, device=device)
    patch = tokenizer.encoder.patch_size
    if originals.size % patch:
        raise ConfigError(f"--size: {originals.size} is not divisible by the tokenizer's patch size {patch}")
    extractor = FeatureExtractor(network, batch_size, cache, progress) if network is not None else None
    notes: list[str] = []
    ref_stats = None
    if extractor is not None:
        ref = extractor.extract(originals.batches(batch_size), originals.count, key=originals.key, desc="originals")
        ref_stats = feature_stats(ref.pool, "originals")
        note = small_set_note(originals.count, ref.pool.shape[1])
        if note:
            notes.append(note)
    lpips_fn, lpips_reason = lpips_metric(device)
    warm = next(originals.batches(2))
    tokenizer.reconstruct(torch.from_numpy(warm).permute(0, 3, 1, 2).float().div(255).to(device), steps=1,
                          sampler=sampler, seed=seed)  # one-time costs stay out of the timing

    rows = []
    for step_count in steps:
        sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "seconds": 0.0}

        def reconstructions(step_count: int = step_count, sums: dict = sums) -> Iterator[np.ndarray]:
            start = 0
            for batch in originals.batches(batch_size):
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    recon = tokenizer.reconstruct(x, steps=step_count, sampler=sampler, seed=seed + start)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sums["seconds"] += time.perf_counter() - t0
                recon8 = _to_uint8(recon)
                p, s = pair_metrics(recon8, batch, device)
                sums["psnr"] += p.sum().item()
                sums["ssim"] += s.sum().item()
                if lpips_fn is not None:
                    y = torch.from_numpy(recon8).permute(0, 3, 1, 2).float().div(255).to(device)
                    sums["lpips"] += lpips_fn(y, x).sum().item()
                start += batch.shape[0]
                yield recon8

        if extractor is not None:
            feats = extractor.extract(reconstructions(), originals.count, desc=f"reconstruct + inception, "
                                      f"{step_count} step(s)")
            rfid = frechet_distance(feature_stats(feats.pool, "reconstructions"), ref_stats)
        else:
            from tqdm import tqdm

            for _ in tqdm(reconstructions(), total=-(-originals.count // batch_size), unit="batch",
                          desc=f"reconstruct, {step_count} step(s)", file=sys.stderr, disable=not progress):
                pass
            rfid = None
        n = originals.count
        rows.append({"steps": step_count, "rfid": rfid, "psnr_db": sums["psnr"] / n, "ssim": sums["ssim"] / n,
                     "lpips": sums["lpips"] / n if lpips_fn is not None else None,
                     "seconds_per_image": sums["seconds"] / n})

    settings = {
        "tokenizer": tokenizer_identity(tokenizer_dir),
        "data": originals.description,
        "images": originals.count,
        "size": originals.size,
        "quantization": "originals and reconstructions rounded to uint8 before every metric",
        "steps": steps,
        "sampler": sampler,
        "seed": seed,
        "seed_rule": "decoder noise seed = seed + index of the batch's first image",
        "batch_size": batch_size,
        "device": str(device),
        "psnr_cap_db": PSNR_CAP_DB,
        "ssim": "Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per channel (uniflow.metrics.ssim)",
        "inception": network.info() if network is not None else None,
        "rfid": "Fréchet distance of pool features, reconstructions vs originals" if network is not None
        else "not computed (--no-fid)",
        "lpips": "AlexNet (lpips 0.1)" if lpips_fn is not None else lpips_reason,
        "feature_cache_hits": extractor.hits if extractor is not None else [],
    }
    return {"kind": "recon", "settings": settings, "results": rows, "notes": notes}


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each in [1, MAX_STEPS], no repeats."""
    from uniflow.flow import MAX_STEPS

    try:
        values = [int(part, 10) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers such as 1,2,4, got {text!r}") from None
    bad = [v for v in values if not 1 <= v <= MAX_STEPS]
    if bad:
        raise ConfigError(f"{flag}: step counts must lie in [1, {MAX_STEPS}], got {bad[0]}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: repeated step count in {text!r}")
    return values


def summary_table(report: dict[str, Any]) -> str:
    """The per-step table printed by the command."""
    lines = [f"{'steps':>5}  {'rFID':>9}  {'PSNR (dB)':>9}  {'SSIM':>6}  {'LPIPS':>6}  {'s/img':>8}"]
    for row in report["results"]:
        rfid = f"{row['rfid']:9.3f}" if row["rfid"] is not None else f"{'-':>9}"
        lp = f"{row['lpips']:6.4f}" if row["lpips"] is not None else f"{'-':>6}"
        lines.append(f"{row['steps']:>5}  {rfid}  {row['psnr_db']:9.2f}  {row['ssim']:6.4f}  {lp}  "
                     f"{row['seconds_per_image']:8.4f}")
    return "\n".join(lines)

