"""Choose a tokenizer's deblocking filter (`uniflow.deblock`): reconstruct the selection images once, apply every
(threshold, reach) to the same reconstructions, and pick the strongest setting that costs neither PSNR nor SSIM: the
lowest mean patch edge ratio among the settings whose PSNR and SSIM on each selection set are at least the unfiltered
ones.

    python -m eval.deblock_sweep --tokenizer runs/tokenizer_tiny/export [--images 256] [--out FILE.json] [--apply]

The selection sets are held-out ShapeWorld images of another stream than the evaluation's (seed 1; the evaluation's
are seed 0) and dead-leaves images of a stream the tokenizer never trained on (seed 1; training draws seed 0). The
photographs of the generalisation set are never used to choose: they stay a test (`eval.shapeworld_tokenizer`).
`--apply` writes the chosen setting into the folder's config.json (`decoder.deblock`, `decoder.deblock_reach`) and
changes nothing else; a generator trained on the tokenizer still accepts it (its fingerprint leaves these out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from uniflow import UniFlowTokenizer
from uniflow.checkpoint import CONFIG_NAME, check_output_dir, read_config
from uniflow.configs import check_int, check_number
from uniflow.data.dead_leaves import render_dead_leaves
from uniflow.data.shapeworld import ShapeWorldDataset
from uniflow.deblock import deblock
from uniflow.errors import OutputError, UniFlowError
from uniflow.fileio import atomic_write_text
from uniflow.metrics import patch_edge_ratio, psnr, ssim

SELECTION_SEED = 1
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
REACHES = (2, 3, 4)


def selection_sets(count: int, size: int) -> dict[str, torch.Tensor]:
    shapeworld = ShapeWorldDataset("heldout", count, seed=SELECTION_SEED, image_size=size)
    return {"shapeworld": torch.stack([shapeworld[i]["image"] for i in range(count)]),
            "dead_leaves": torch.stack([render_dead_leaves(SELECTION_SEED, i, size) for i in range(count)])}


def sweep(tokenizer: UniFlowTokenizer, count: int, thresholds: tuple[float, ...], reaches: tuple[int, ...],
          batch_size: int = 64, seed: int = 0) -> dict:
    """Every setting's PSNR, SSIM and edge ratio on each selection set (reconstructions decoded once, unfiltered),
    and the chosen one (`chosen`: {"deblock", "deblock_reach"}; threshold 0 when no setting keeps PSNR and SSIM)."""
    patch = tokenizer.encoder.patch_size
    sets = selection_sets(count, tokenizer.config.encoder.image_size)
    recons = {}
    for name, images in sets.items():
        recons[name] = torch.cat([tokenizer.reconstruct(images[i:i + batch_size], seed=seed + i, deblock=0.0)
                                  for i in tqdm(range(0, count, batch_size), desc=f"reconstructing {name}",
                                                file=sys.stderr)])

    def score(threshold: float, reach: int) -> dict[str, float]:
        row: dict[str, float] = {"deblock": threshold, "deblock_reach": reach}
        for name, images in sets.items():
            out = deblock(recons[name], patch, threshold, reach).clamp(0, 1)
            row[f"{name}_psnr_db"] = psnr(out, images).mean().item()
            row[f"{name}_ssim"] = ssim(out, images).mean().item()
            row[f"{name}_patch_edge_ratio"] = patch_edge_ratio(out, images, patch)
        return row

    rows = [score(0.0, patch // 2)] + [score(t, r) for t in thresholds for r in reaches]
    base = rows[0]

    def costs_nothing(row: dict[str, float]) -> bool:
        return all(row[f"{name}_{metric}"] >= base[f"{name}_{metric}"]
                   for name in sets for metric in ("psnr_db", "ssim"))

    def mean_edge(row: dict[str, float]) -> float:
        return sum(row[f"{name}_patch_edge_ratio"] for name in sets) / len(sets)

    best = min((row for row in rows if costs_nothing(row)), key=mean_edge)
    return {"images_per_set": count, "rows": rows,
            "chosen": {"deblock": best["deblock"], "deblock_reach": best["deblock_reach"] if best["deblock"] else None}}


def apply_setting(folder: Path, chosen: dict) -> None:
    """Write the chosen setting into the tokenizer folder's config.json (atomically), checked by loading it back."""
    config = read_config(folder)
    config.setdefault("decoder", {}).update(chosen)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    UniFlowTokenizer.from_pretrained(folder)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UniFlowError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    for v in values:
        check_number(flag, v, 0.0, 1.0, lo_open=True)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    parser.add_argument("--images", type=int, default=256, help="images in each selection set")
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    parser.add_argument("--reach", default=",".join(map(str, REACHES)), help="pixels moved on each side of a border")
    parser.add_argument("--out", type=Path, default=None, help="write every row and the choice as JSON here")
    parser.add_argument("--apply", action="store_true", help="write the chosen setting into the folder's config.json")
    args = parser.parse_args(argv)
    try:
        check_int("--images", args.images, 1)
        thresholds = _floats(args.thresholds, "--thresholds")
        try:
            reaches = tuple(int(v) for v in args.reach.split(","))
        except ValueError:
            raise UniFlowError(f"--reach: expected comma-separated integers, got {args.reach!r}") from None
        if args.out is not None:
            if args.out.is_dir():
                raise OutputError(f"--out: {args.out} is a folder, expected a JSON file path")
            check_output_dir(args.out.parent, "--out")
        tokenizer = UniFlowTokenizer.from_pretrained(args.tokenizer)
        for reach in reaches:
            check_int("--reach", reach, 1, tokenizer.encoder.patch_size // 2 + 1)
        result = sweep(tokenizer, args.images, thresholds, reaches)
        if args.apply:
            apply_setting(args.tokenizer, result["chosen"])
    except UniFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = ("shapeworld", "dead_leaves")
    print("| threshold | reach | " + " | ".join(f"{n} PSNR | {n} SSIM | {n} edge" for n in names) + " |")
    print("| --- " * (2 + 3 * len(names)) + "|")
    for row in result["rows"]:
        cells = [f"{row['deblock']:g}", str(row["deblock_reach"])]
        for n in names:
            cells += [f"{row[f'{n}_psnr_db']:.2f}", f"{row[f'{n}_ssim']:.4f}", f"{row[f'{n}_patch_edge_ratio']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    chosen = result["chosen"]
    print(f"chosen: deblock {chosen['deblock']:g}, reach {chosen['deblock_reach']}"
          + (f" (written to {args.tokenizer / CONFIG_NAME})" if args.apply else ""))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
