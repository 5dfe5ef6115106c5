"""`uniflow train {encoder,tokenizer} --config FILE [key=value ...] [--resume [DIR]] [--export-only]`.

The same command line runs alone (the process group is set up in-process) or under a launcher:
    torchrun --nproc_per_node 8 -m train tokenizer --config ...
    deepspeed --hostfile hostfile --module train tokenizer --config ...
"""

from __future__ import annotations

import argparse
from typing import Any

KINDS = {
    "encoder": "pretrain the tiny ViT encoder on ShapeWorld labels (the teacher the tokenizer adapts)",
    "tokenizer": "train the UniFlow tokenizer (self-distillation + pixel flow decoder)",
}


def _run(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.engine import train

    config = load_config(args.config, args.overrides, kind=args.kind)
    resume: Any = args.resume
    if resume == "":
        resume = True
    result = train(config, resume=resume, export_only=args.export_only)
    if result.dist is not None and result.dist.is_main:
        print(f"done: step {result.state.step}, run folder {result.run_dir}"
              + (f", inference folder {result.export_dir}" if result.export_dir else ""))
    return 0


def add_kind_parsers(parser: argparse.ArgumentParser) -> None:
    """Add the model-kind sub-commands to `parser` (the `train` command, or `python -m train`)."""
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(KINDS) + "}")
    for kind, help_text in KINDS.items():
        p = kinds.add_parser(kind, help=help_text, description=f"{help_text}. Runs alone or under torchrun/deepspeed.")
        p.add_argument("--config", required=True, metavar="FILE",
                       help=f"run config (YAML or JSON), e.g. train/configs/{kind}_tiny.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config fields, e.g. steps=500 optim.lr=1e-3 deepspeed.config=zero3")
        p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                       help="continue from the latest checkpoint of the run folder, or from DIR (a run folder or "
                            "a checkpoint folder)")
        p.add_argument("--export-only", action="store_true",
                       help="load the checkpoint given by --resume and only write the inference folder")
        # The `deepspeed` launcher appends --local_rank; the rank also arrives through LOCAL_RANK.
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=_run)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object (wired as `uniflow train ...`)."""
    parser = subparsers.add_parser("train", help="train the encoder or the tokenizer (DeepSpeed)",
                                   description=__doc__.split("\n\n")[0])
    add_kind_parsers(parser)
    return parser
