"""Linear probes on FROZEN final-layer encoder tokens: what a teacher (or a tokenizer's encoder) puts in its tokens.

    python -m eval.shapeworld_probe --encoder runs/encoder_v2/export/encoder.safetensors [--train 5000 --heldout 1000]
    python -m eval.shapeworld_probe --tokenizer checkpoints/shapeworld/tokenizer --out probe.json

Three multinomial logistic regressions on standardised features, fitted on ShapeWorld training images and scored on
held-out ones (issue 9's bars in brackets):
- class: the main object's shape x colour (36-way) from the mean-pooled tokens [>= 95%];
- shape / colour: per patch, the shape (colour) of the object under it, the background as one more class, fitted on
  every patch and scored on the patches an object covers (at least half the patch's area shows it:
  `uniflow.data.shapeworld.patch_labels`, exact from the renderer's masks) [>= 90% / >= 95%].
The encoder runs once per image (features cached), then each probe is full-batch L-BFGS from a fixed seed: the same
features give the same figures, and the whole report takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from uniflow.configs import check_int, from_dict, read_json
from uniflow.data.shapeworld import COLOURS, NUM_CLASSES, SHAPES, ShapeWorldDataset
from uniflow.encoders import EncoderConfig, VisionEncoder, build_encoder
from uniflow.errors import ConfigError, OutputError, run_command
from uniflow.fileio import atomic_write_text

BARS: dict[str, float] = {"class_accuracy": 0.95, "shape_accuracy": 0.90, "colour_accuracy": 0.95}
ENCODER_CONFIG = "encoder_config.json"  # what `uniflow train encoder` exports next to encoder.safetensors


@dataclass
class ProbeFeatures:
    """Final-layer tokens of N images with their targets: tokens (N, T, D) float32, labels (N,), and per token
    patch_shape / patch_colour (N, T) with the background as the last class."""

    tokens: torch.Tensor
    labels: torch.Tensor
    patch_shape: torch.Tensor
    patch_colour: torch.Tensor


def shapeworld_features(encoder: VisionEncoder, split: str, count: int, seed: int = 0,
                        batch_size: int = 100) -> ProbeFeatures:
    """Final-layer tokens of ShapeWorld images 0..count-1 of `split`, rendered at the encoder's size with its patch
    targets. The encoder is used as it is (eval mode, no gradients)."""
    return shared_features({"encoder": encoder}, split, count, seed, batch_size)["encoder"]


@torch.no_grad()
def shared_features(encoders: dict[str, VisionEncoder], split: str, count: int, seed: int = 0,
                    batch_size: int = 100) -> dict[str, ProbeFeatures]:
    """`shapeworld_features` of several encoders of the same geometry (a tokenizer's and its teacher), each image
    rendered once."""
    check_int("count", count, 1)
    first = next(iter(encoders.values()))
    if any((e.image_size, e.patch_size) != (first.image_size, first.patch_size) for e in encoders.values()):
        raise ConfigError(f"encoders {sorted(encoders)}: image and patch sizes differ")
    dataset = ShapeWorldDataset(split, count, seed=seed, image_size=first.image_size, patch_size=first.patch_size)
    tokens: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    targets: dict[str, list[torch.Tensor]] = {"labels": [], "patch_shape": [], "patch_colour": []}
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(count, start + batch_size))]
        images = torch.stack([d["image"] for d in items])
        for name, encoder in encoders.items():
            encoder.eval()
            param = next(encoder.parameters())
            pixels = encoder.normalize(images.to(device=param.device, dtype=param.dtype))
            tokens[name].append(encoder(pixels, layers=[-1]).last.float().cpu())
        targets["labels"].append(torch.tensor([d["label"] for d in items]))
        targets["patch_shape"].append(torch.stack([d["patch_shape"] for d in items]))
        targets["patch_colour"].append(torch.stack([d["patch_colour"] for d in items]))
    joined = {k: torch.cat(v) for k, v in targets.items()}
    return {name: ProbeFeatures(tokens=torch.cat(parts), **joined) for name, parts in tokens.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, weight_decay: float = 1e-4,
              seed: int = 0) -> torch.nn.Module:
    """Multinomial logistic regression on standardised features (the standardisation is part of the returned
    module), full-batch L-BFGS from a fixed seed: deterministic, and no learning rate to tune per encoder."""
    check_int("steps", steps, 1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=generator)
        linear.bias.zero_()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return _Standardised(mean, std, linear).eval()


class _Standardised(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def _accuracy(probe: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((probe(x).argmax(-1) == y).float().mean()) if len(y) else float("nan")


def probe_report(encoder_or_features: VisionEncoder | tuple[ProbeFeatures, ProbeFeatures], train: int = 5000,
                 heldout: int = 1000, steps: int = 300, seed: int = 0, batch_size: int = 100) -> dict[str, Any]:
    """Held-out accuracies of the three probes (class, per-patch shape and colour on covered patches; also the
    per-patch figures over all patches, background included). Pass an encoder (features of `train` training and
    `heldout` held-out images are computed here) or (train, held-out) `ProbeFeatures` already computed."""
    if isinstance(encoder_or_features, tuple):
        fit, test = encoder_or_features
    else:
        fit = shapeworld_features(encoder_or_features, "train", train, batch_size=batch_size)
        test = shapeworld_features(encoder_or_features, "heldout", heldout, batch_size=batch_size)
    dim = fit.tokens.shape[-1]
    result: dict[str, Any] = {"train_images": len(fit.labels), "heldout_images": len(test.labels)}
    probe = fit_probe(fit.tokens.mean(1), fit.labels, NUM_CLASSES, steps, seed=seed)
    result["class_accuracy"] = _accuracy(probe, test.tokens.mean(1), test.labels)
    covered = test.patch_shape.reshape(-1) != len(SHAPES)
    result["covered_patches"] = int(covered.sum())
    result["heldout_patches"] = int(covered.numel())
    for name, classes in (("shape", len(SHAPES) + 1), ("colour", len(COLOURS) + 1)):
        target = getattr(fit, f"patch_{name}").reshape(-1)
        probe = fit_probe(fit.tokens.reshape(-1, dim), target, classes, steps, seed=seed)
        x, y = test.tokens.reshape(-1, dim), getattr(test, f"patch_{name}").reshape(-1)
        result[f"{name}_accuracy"] = _accuracy(probe, x[covered], y[covered])
        result[f"{name}_accuracy_all_patches"] = _accuracy(probe, x, y)
    result["passes"] = {key: result[key] >= bar for key, bar in BARS.items()}
    return result


def load_encoder_file(path: Path) -> VisionEncoder:
    """An exported encoder (`encoder.safetensors`, or its folder) with the `encoder_config.json` written beside it."""
    path = Path(path)
    weights = path / "encoder.safetensors" if path.is_dir() else path
    config_path = weights.parent / ENCODER_CONFIG
    if not weights.is_file():
        raise ConfigError(f"--encoder: {weights} not found")
    if not config_path.is_file():
        raise ConfigError(f"--encoder: no {ENCODER_CONFIG} next to {weights} (expected an export of `uniflow train "
                          f"encoder`)")
    config = from_dict(EncoderConfig, {**read_json(config_path), "pretrained": str(weights)}, str(config_path))
    return build_encoder(config).eval()


def format_table(result: dict[str, Any]) -> str:
    lines = ["| probe (held-out) | accuracy | bar |", "| --- | --- | --- |"]
    names = {"class_accuracy": "main-object class (36-way, mean-pooled)",
             "shape_accuracy": "per-patch shape (covered patches)",
             "colour_accuracy": "per-patch colour (covered patches)",
             "shape_accuracy_all_patches": "per-patch shape (all patches, background included)",
             "colour_accuracy_all_patches": "per-patch colour (all patches, background included)"}
    for key, name in names.items():
        bar = f">= {100 * BARS[key]:.0f}%" if key in BARS else ""
        lines.append(f"| {name} | {100 * result[key]:.1f}% | {bar} |")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    check_int("--train", args.train, 1)
    check_int("--heldout", args.heldout, 1)
    check_int("--steps", args.steps, 1)
    check_int("--batch-size", args.batch_size, 1)
    if args.out is not None and args.out.is_dir():
        raise OutputError(f"--out: {args.out} is a folder, expected a JSON file path")
    torch.manual_seed(0)
    if args.encoder is not None:
        encoder, source = load_encoder_file(args.encoder), str(args.encoder)
    else:
        from uniflow.tokenizer import load_encoder

        encoder, source = load_encoder(args.tokenizer), str(args.tokenizer)
    result = {"encoder": source, **probe_report(encoder, args.train, args.heldout, args.steps,
                                                batch_size=args.batch_size)}
    print(format_table(result))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", type=Path, help="an exported encoder.safetensors (or its folder)")
    source.add_argument("--tokenizer", help="a tokenizer folder or hub id: probe its encoder")
    parser.add_argument("--train", type=int, default=5000, help="training images for the probes")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out images scored")
    parser.add_argument("--steps", type=int, default=300, help="L-BFGS iterations per probe")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return run_command(_run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
