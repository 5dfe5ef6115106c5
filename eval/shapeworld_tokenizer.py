"""Measure a ShapeWorld tokenizer against its bars (DESIGN.md §10, issue 9): held-out PSNR/SSIM (1 Euler step by
default), mean cosine to the teacher over the deepest third of the encoder layers, and linear probes on student vs
teacher tokens; also the patch seam ratio (error at patch borders over error inside patches: grid artifacts show as a
ratio above 1).

    python -m eval.shapeworld_tokenizer --bundle checkpoints/shapeworld [--steps 1] [--out FILE.json]
    python -m eval.shapeworld_tokenizer --tokenizer runs/abl_uniform/export   # another tokenizer, bundle's teacher
    python -m eval.shapeworld_tokenizer --grid docs/figures/recon_grid.png     # also a 2xN picture

Besides held-out ShapeWorld, it measures the generalisation set (`eval.generalisation`, drawn by code separate from
the renderer): the synthetic part (flat single-colour images and hard-edged PIL shapes, the >= 29 dB bar; flat and
hard-edged PSNR also apart) and real photographs (scikit-image's samples), reported separately.
`--grid FILE` writes originals above reconstructions: ShapeWorld, synthetic, photographs, left to right.

The teacher is the pretrained encoder the tokenizer was adapted from (`<bundle>/encoder/encoder.safetensors`, or
`--teacher FILE`).
The probes are `eval.shapeworld_probe`'s (logistic regression on frozen final-layer tokens: the main-object class from
mean-pooled tokens, the shape and colour under each covered patch), fitted on training images and scored on held-out
ones, identically for both encoders, so the gap measures what adaptation cost the semantics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval import generalisation
from eval.shapeworld_probe import probe_report, shared_features
from uniflow import UniFlowTokenizer
from uniflow.checkpoint import check_output_dir
from uniflow.configs import check_int, check_number
from uniflow.data.shapeworld import ShapeWorldDataset
from uniflow.encoders import VisionEncoder, build_encoder
from uniflow.errors import ConfigError, OutputError, UniFlowError
from uniflow.fileio import atomic_write_text
from uniflow.flow import MAX_STEPS
from uniflow.metrics import patch_edge_ratio, patch_seam_ratio, psnr, ssim

MAX_PSNR_DB = 100.0  # per-image PSNR is capped before averaging (an exact flat image would otherwise be infinite)
PROBE_KEYS = ("class_accuracy", "shape_accuracy", "colour_accuracy")  # eval.shapeworld_probe's three probes
GRID_COLUMNS = (8, 8, 8)  # ShapeWorld, synthetic (flat then hard-edged), photographs in the --grid picture


def load_teacher(weights: Path, tokenizer: UniFlowTokenizer) -> VisionEncoder:
    return build_encoder(dataclasses.replace(tokenizer.config.encoder, pretrained=str(weights))).eval()


def batches(dataset: ShapeWorldDataset, count: int, batch_size: int, desc: str):
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch", file=sys.stderr):
        items = [dataset[i] for i in range(start, min(count, start + batch_size))]
        yield torch.stack([d["image"] for d in items]), torch.tensor([d["label"] for d in items])


@torch.no_grad()
def features(encoder: VisionEncoder, images: torch.Tensor) -> list[torch.Tensor]:
    return encoder(encoder.normalize(images)).hidden_states


def reconstruction_scores(tokenizer: UniFlowTokenizer, images: torch.Tensor, steps: int, sampler: str, seed: int,
                          batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR (mean over images, capped at MAX_PSNR_DB), SSIM, pooled seam ratio and (unless every image is flat) patch
    edge ratio of a small image set, and the reconstructions."""
    recon = torch.cat([tokenizer.reconstruct(images[i:i + batch_size], steps=steps, sampler=sampler, seed=seed + i)
                       for i in range(0, images.shape[0], batch_size)])
    patch = tokenizer.encoder.patch_size
    scores = {"psnr_db": psnr(recon, images).clamp(max=MAX_PSNR_DB).mean().item(),
              "ssim": ssim(recon, images).mean().item(),
              "patch_seam_ratio": patch_seam_ratio(recon, images, patch)}
    if images.diff(dim=-1).abs().amax() > 0:  # the edge ratio is undefined on flat images
        scores["patch_edge_ratio"] = patch_edge_ratio(recon, images, patch)
    return scores, recon


def generalisation_scores(tokenizer: UniFlowTokenizer, steps: int, sampler: str, seed: int, batch_size: int
                          ) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The generalisation set's figures (synthetic = flat + hard edges; flat, hard edges and photographs apart) and
    the (originals, reconstructions) of each part. Photographs need scikit-image: without it they are reported as
    unavailable, never silently dropped."""
    size = tokenizer.config.encoder.image_size
    flat, hard = generalisation.flat_images(size), generalisation.hard_edge_images(size=size, seed=seed)
    parts: dict[str, torch.Tensor] = {"synthetic": torch.cat([flat, hard]), "flat": flat, "hard_edges": hard}
    out: dict = {}
    try:
        parts["photos"] = generalisation.photo_images(size)
    except ConfigError as err:
        out["photos_unavailable"] = str(err)
    images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, batch in parts.items():
        scores, recon = reconstruction_scores(tokenizer, batch, steps, sampler, seed, batch_size)
        out[f"{name}_images"] = batch.shape[0]
        out.update({f"{name}_{key}": value for key, value in scores.items()})
        images[name] = (batch, recon)
    return out, images


def write_grid(path: Path, parts: list[tuple[torch.Tensor, torch.Tensor]], columns: tuple[int, ...],
               zoom: int = 1) -> None:
    """Originals above reconstructions, the first `columns[i]` images of each part side by side; `zoom` enlarges
    every pixel to zoom x zoom (nearest neighbour), so a patch grid would show as it does under a viewer's zoom."""
    from train.tokenizer_task import save_grid  # the one grid writer (the training's reconstruction grids)

    originals = torch.cat([o[:k] for (o, _), k in zip(parts, columns)])
    recons = torch.cat([r[:k] for (_, r), k in zip(parts, columns)]).float()
    if zoom > 1:
        originals, recons = (F.interpolate(x, scale_factor=zoom, mode="nearest") for x in (originals, recons))
    save_grid(originals, recons, path)


def _spread(images: torch.Tensor, k: int) -> torch.Tensor:
    """k images evenly spread over the set (the synthetic set starts with its flat images)."""
    idx = torch.linspace(0, images.shape[0] - 1, min(k, images.shape[0])).round().long()
    return images[idx]


def evaluate(bundle: Path, heldout: int = 1000, probe_train: int = 5000, steps: int = 1, sampler: str = "euler",
             batch_size: int = 100, seed: int = 0, tokenizer_dir: Path | None = None,
             teacher_weights: Path | None = None, generalise: bool = True, grid: Path | None = None,
             grid_parts: Path | None = None, zoom: int = 4, deblock: float | None = None) -> dict:
    """Every figure of the bar; `tokenizer_dir`/`teacher_weights` replace the bundle's parts (ablation runs).
    probe_train 0 skips the probe (its figures are None); generalise adds the generalisation set's figures; grid
    writes the 2xN picture there (it needs generalise); grid_parts writes one 2x8 picture per part into that folder
    (shapeworld.png, synthetic.png, photos.png), enlarged `zoom` times. deblock replaces the tokenizer's deblocking
    threshold (0: off), to measure it with and without."""
    tokenizer_dir = tokenizer_dir or bundle / "tokenizer"
    teacher_weights = teacher_weights or bundle / "encoder" / "encoder.safetensors"
    tokenizer = UniFlowTokenizer.from_pretrained(tokenizer_dir)
    if deblock is not None:
        tokenizer.config = dataclasses.replace(
            tokenizer.config, decoder=dataclasses.replace(tokenizer.config.decoder, deblock=deblock))
    teacher = load_teacher(teacher_weights, tokenizer)
    student = tokenizer.encoder
    num_layers = student.num_layers
    deep = list(range(num_layers - math.ceil(num_layers / 3), num_layers))
    size = tokenizer.config.encoder.image_size  # ShapeWorld renders at any size; 64 px for the tiny stack
    test_set = ShapeWorldDataset("heldout", heldout, seed=0, image_size=size)

    psnrs, ssims, cosines = [], [], torch.zeros(num_layers)
    pairs = []  # (reconstruction, original) batches: the seam ratio pools the error over all images
    start = time.time()
    for images, _ in batches(test_set, heldout, batch_size, "held-out"):
        recon = tokenizer.reconstruct(images, steps=steps, sampler=sampler, seed=seed + len(psnrs))
        psnrs.append(psnr(recon, images))
        ssims.append(ssim(recon, images))
        pairs.append((recon, images))
        s_states, t_states = features(student, images), features(teacher, images)
        for layer in range(num_layers):
            cosines[layer] += F.cosine_similarity(s_states[layer], t_states[layer], dim=-1).mean(1).sum()
    decode_time = time.time() - start
    cosines /= heldout

    probes: dict[str, dict] = {}
    if probe_train > 0:  # eval.shapeworld_probe's probes, on the same images for both encoders
        encoders = {"student": student, "teacher": teacher}
        fit = shared_features(encoders, "train", probe_train, batch_size=batch_size)
        test = shared_features(encoders, "heldout", heldout, batch_size=batch_size)
        for name in encoders:
            print(f"fitting the {name}'s probes ...", file=sys.stderr)
            probes[name] = probe_report((fit[name], test[name]))
    probe_figures: dict[str, float | None] = {}
    for name in ("student", "teacher"):
        for key in PROBE_KEYS:
            probe_figures[f"probe_{key}_{name}"] = probes[name][key] if probes else None
    extra: dict = {}
    if generalise:
        extra, parts = generalisation_scores(tokenizer, steps, sampler, seed, batch_size)
        if grid is not None:
            shapeworld = (pairs[0][1], pairs[0][0])
            synthetic = tuple(_spread(x, GRID_COLUMNS[1]) for x in parts["synthetic"])
            write_grid(grid, [shapeworld, synthetic] + ([parts["photos"]] if "photos" in parts else []),
                       GRID_COLUMNS)
            extra["grid"] = str(grid)
        if grid_parts is not None:
            named = {"shapeworld": (pairs[0][1], pairs[0][0]),
                     "synthetic": tuple(_spread(x, GRID_COLUMNS[1]) for x in parts["synthetic"]),
                     **({"photos": parts["photos"]} if "photos" in parts else {})}
            for name, pair in named.items():
                write_grid(grid_parts / f"{name}.png", [pair], (GRID_COLUMNS[0],), zoom)
            extra["grid_parts"] = [str(grid_parts / f"{name}.png") for name in named]
    recon_all, originals = (torch.cat(side) for side in zip(*pairs))  # both ratios pool over every held-out image
    return {
        "tokenizer": str(tokenizer_dir),
        "teacher": str(teacher_weights),
        "heldout_images": heldout,
        "sampler": sampler,
        "steps": steps,
        "deblock": tokenizer.config.decoder.deblock,
        "deblock_reach": tokenizer.config.decoder.deblock_reach,
        "psnr_db": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "patch_seam_ratio": patch_seam_ratio(recon_all, originals, tokenizer.encoder.patch_size),
        "patch_edge_ratio": patch_edge_ratio(recon_all, originals, tokenizer.encoder.patch_size),
        "cosine_to_teacher_per_layer": [round(c, 5) for c in cosines.tolist()],
        "deepest_third_layers": [layer + 1 for layer in deep],
        "cosine_to_teacher_deepest_third": cosines[deep].mean().item(),
        "probe_train_images": probe_train,
        "probe_accuracy_student": probe_figures["probe_class_accuracy_student"],
        "probe_accuracy_teacher": probe_figures["probe_class_accuracy_teacher"],
        "probe_gap_points": (100 * (probes["teacher"]["class_accuracy"] - probes["student"]["class_accuracy"])
                             if probes else None),
        **probe_figures,
        "reconstruct_seconds": decode_time,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="checkpoints/shapeworld", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: <bundle>/tokenizer)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher encoder weights (default: <bundle>/encoder/encoder.safetensors)")
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--probe-train", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoder noise")
    parser.add_argument("--no-generalisation", action="store_true",
                        help="skip the generalisation set (flat, hard-edged and photographic images)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="write a PNG here: originals above 1-step reconstructions (ShapeWorld, synthetic, photos)")
    parser.add_argument("--grid-parts", type=Path, default=None,
                        help="write shapeworld.png, synthetic.png and photos.png (2x8 each, originals above "
                             "reconstructions) into this folder, enlarged --zoom times")
    parser.add_argument("--zoom", type=int, default=4, help="pixel enlargement of the --grid-parts pictures")
    parser.add_argument("--deblock", type=float, default=None,
                        help="threshold of the patch-border deblocking filter instead of the tokenizer's (0: off)")
    args = parser.parse_args(argv)
    try:
        # every numeric option is range-checked here, before any compute: `--steps 0` is an error, never "1 step"
        check_int("--heldout", args.heldout, 1)
        check_int("--probe-train", args.probe_train, 0)  # 0: no probe
        check_int("--steps", args.steps, 1, MAX_STEPS + 1)
        check_int("--batch-size", args.batch_size, 1)
        check_int("--seed", args.seed, 0, 2**63)
        if args.out is not None:
            if args.out.is_dir():
                raise OutputError(f"--out: {args.out} is a folder, expected a JSON file path")
            check_output_dir(args.out.parent, "--out")
        if args.grid is not None:
            if args.no_generalisation:
                raise ConfigError("--grid shows the generalisation set: drop --no-generalisation")
            if args.grid.is_dir() or args.grid.suffix.lower() != ".png":
                raise OutputError(f"--grid: expected a .png file path, got {args.grid}")
            check_output_dir(args.grid.parent, "--grid")
        check_int("--zoom", args.zoom, 1, 17)
        if args.deblock is not None:
            check_number("--deblock", args.deblock, 0.0, 1.0)
        if args.grid_parts is not None:
            if args.no_generalisation:
                raise ConfigError("--grid-parts shows the generalisation set: drop --no-generalisation")
            check_output_dir(args.grid_parts, "--grid-parts")
        result = evaluate(args.bundle, args.heldout, args.probe_train, args.steps, args.sampler,
                          batch_size=args.batch_size, seed=args.seed, tokenizer_dir=args.tokenizer,
                          teacher_weights=args.teacher, generalise=not args.no_generalisation, grid=args.grid,
                          grid_parts=args.grid_parts, zoom=args.zoom, deblock=args.deblock)
    except UniFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"deblocking threshold {result['deblock']:g}" + (" (off)" if not result["deblock"] else ""))
    print("| metric | value |\n| --- | --- |")
    keys = ["psnr_db", "ssim", "patch_seam_ratio", "patch_edge_ratio", "cosine_to_teacher_deepest_third",
            "probe_accuracy_student", "probe_accuracy_teacher", "probe_gap_points"]
    keys += [f"probe_{key}_{name}" for name in ("teacher", "student") for key in PROBE_KEYS[1:]]
    keys += [f"{part}_{key}" for part in ("synthetic", "flat", "hard_edges", "photos")
             for key in ("psnr_db", "ssim", "patch_seam_ratio", "patch_edge_ratio")]
    for key in keys:
        if key in result:
            value = result[key]
            print(f"| {key} | {'n/a' if value is None else f'{value:.4f}'} |")
    if "photos_unavailable" in result:
        print(f"| photos | unavailable: {result['photos_unavailable']} |")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
