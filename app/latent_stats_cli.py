"""`uniflow latent-stats`: measure a tokenizer's per-channel latent mean/std over a dataset and store them in its
folder (the library part is `uniflow.latent_stats`; command-line code lives in `app/`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.options import int_range


def _dataset(data: str, image_size: int, num: int, split: str, seed: int) -> tuple[Any, str]:
    """The images to measure: ShapeWorld rendered on demand, or an ImageNet-layout folder (as training reads them)."""
    import torch

    if data == "shapeworld":
        from uniflow.data.shapeworld import ShapeWorldDataset

        return ShapeWorldDataset(split=split, num_samples=num, seed=seed, image_size=image_size), \
            f"shapeworld:{split}:seed={seed}:n={num}"
    from train.data import ImageFolderDataset

    folder = ImageFolderDataset(data, image_size, field="--data")
    count = min(num, len(folder))
    return torch.utils.data.Subset(folder, range(count)), f"{Path(data).resolve()}:n={count}"


def _cmd_latent_stats(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from uniflow import UniFlowTokenizer
    from uniflow.errors import ConfigError, OutputError
    from uniflow.latent_stats import STATS_NAME, compute_latent_stats, save_latent_stats, stats_summary

    folder = Path(args.tokenizer)
    if not folder.is_dir():
        raise ConfigError(f"--tokenizer: {folder} is not a local tokenizer folder (the statistics are written into it)")
    if (folder / STATS_NAME).exists() and not args.overwrite:
        raise OutputError(f"--tokenizer: {folder / STATS_NAME} already exists; pass --overwrite to replace it")
    tokenizer = UniFlowTokenizer.from_pretrained(folder, device=args.device)
    dataset, source = _dataset(args.data, tokenizer.config.encoder.image_size, args.num, args.split, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    with tqdm(total=len(dataset), desc="latent-stats", unit="img", file=sys.stderr, disable=args.no_progress) as bar:
        stats = compute_latent_stats(tokenizer, (batch["image"] for batch in loader), source=source,
                                     progress=bar.update)
    path = save_latent_stats(folder, stats, overwrite=args.overwrite)
    print(f"latent statistics: {stats_summary(stats)}")
    print(f"written to {path}")
    return 0


HELP = "measure a tokenizer's per-channel latent mean/std and store them in its folder"
DESCRIPTION = (
    "Encode a dataset with the tokenizer and write the per-channel mean and std of its latents to "
    "DIR/latent_stats.safetensors (no other file of DIR changes). A generator trains on latents normalised by them "
    "(tokenizer.normalize_latents / denormalize_latents). Existing statistics are replaced only with --overwrite."
)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `latent-stats` on the `uniflow` subparsers object."""
    p = subparsers.add_parser("latent-stats", help=HELP, description=DESCRIPTION)
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="local tokenizer folder (written into)")
    p.add_argument("--data", required=True, metavar="shapeworld|FOLDER",
                   help="'shapeworld' (rendered on demand) or an image folder in ImageNet layout (FOLDER/<class>/*)")
    p.add_argument("--num", type=int_range(2), default=10_000, metavar="N",
                   help="images to encode (default 10000; a folder uses at most all of its images)")
    p.add_argument("--batch-size", type=int_range(1, 65_537), default=64, metavar="B", help="default 64")
    p.add_argument("--split", choices=["train", "heldout"], default="train", help="ShapeWorld split (default train)")
    p.add_argument("--seed", type=int_range(0, 2**63), default=0, metavar="S", help="ShapeWorld seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for encoding (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace existing statistics")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_latent_stats)
    return p
