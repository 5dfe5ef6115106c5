"""`uniflow data shapes`: write the procedural ShapeWorld dataset to disk (the library part is
`uniflow.data.shapeworld.write_shapeworld`; command-line code lives in `app/`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from app.options import int_range


def _cli_shapes(args: argparse.Namespace) -> int:
    from uniflow.checkpoint import check_output_dir
    from uniflow.data.shapeworld import SPLITS, write_shapeworld

    check_output_dir(args.out, "--out")
    splits = list(SPLITS) if args.split == "both" else [args.split]
    for split in splits:
        out = write_shapeworld(args.out, args.num, seed=args.seed, split=split, progress=not args.no_progress,
                               overwrite=args.overwrite)
        print(
            f"wrote {args.num} ShapeWorld {split} images to {out / split}/, "
            f"metadata {out / (split + '.jsonl')}, conversations {out / (split + '_llava.json')}"
        )
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `shapes` on an argparse subparsers object (wired as `uniflow data shapes`)."""
    p = subparsers.add_parser(
        "shapes",
        help="write the procedural ShapeWorld dataset to disk",
        description="Render ShapeWorld images (ImageNet folder layout) with JSON-lines metadata and LLaVA-format "
        "question-answer conversations. Training reads the data on demand; this is for inspection and other tools. "
        "A folder not written by this command is refused unless empty; --overwrite regenerates a split written "
        "earlier, removing its old files first.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--num", type=int_range(0), default=1000, metavar="N", help="images per split (default 1000)")
    p.add_argument("--seed", type=int_range(0, 2**63), default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--split", choices=["train", "heldout", "both"], default="both", help="which split(s) to write")
    p.add_argument("--overwrite", action="store_true", help="regenerate split(s) this command wrote earlier")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cli_shapes)
    return p
