"""`uniflow train KIND --config FILE [key=value ...] [--resume [DIR]] [--export-only]`, one sub-command per model kind
of the registry (`train/registry.py`).

The same command line runs alone (the process group is set up in-process) or under a launcher:
    torchrun --nproc_per_node 8 -m train tokenizer --config ...
    deepspeed --hostfile hostfile --module train tokenizer --config ...
"""

from __future__ import annotations

import argparse
from typing import Any

from train.registry import kind_help


def _split_resume(args: argparse.Namespace) -> tuple[object, list[str]]:
    """`--resume [DIR]` takes an optional value, so in `--resume steps=6000` argparse hands it the override: a value
    with "=" that is not an existing path is taken back as an override (and --resume means the latest checkpoint)."""
    from pathlib import Path

    overrides = list(args.overrides)
    resume: object = args.resume
    if resume == "":
        resume = True
    elif isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        overrides.append(resume)
        resume = True
    return resume, overrides


def _run(args: argparse.Namespace) -> int:
    from train.config import load_config

    resume, overrides = _split_resume(args)
    config = load_config(args.config, overrides, kind=args.kind)
    if args.dry_run is not None:
        import json

        from train.dry_run import dry_run

        summary = dry_run(config, world_size=args.dry_run, device=args.dry_run_device)
        print(json.dumps(summary, indent=2))
        return 0
    from train.distributed import shutdown_distributed
    from train.engine import train

    try:
        result = train(config, resume=resume, export_only=args.export_only,
                       trust_checkpoint=args.trust_checkpoint)
    except BaseException:
        shutdown_distributed(wait_for_others=False)
        raise
    if result.dist is not None and result.dist.is_main:
        print(f"done: step {result.state.step}, run folder {result.run_dir}"
              + (f", inference folder {result.export_dir}" if result.export_dir else ""))
    shutdown_distributed()
    return 0


def add_kind_parsers(parser: argparse.ArgumentParser) -> None:
    """Add the model-kind sub-commands of the registry to `parser` (the `train` command, or `python -m train`)."""
    kinds = kind_help()
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(kinds) + "}")
    for kind, help_text in kinds.items():
        p = sub.add_parser(kind, help=help_text, description=f"{help_text}. Runs alone or under torchrun/deepspeed.")
        p.add_argument("--config", required=True, metavar="FILE",
                       help=f"run config (YAML or JSON), e.g. train/configs/{kind}_tiny.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config fields, e.g. steps=500 optim.lr=1e-3 deepspeed.config=zero3 (write them "
                            "right after --config FILE, before the other options)")
        p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                       help="continue from the latest checkpoint of the run folder, or from DIR (a run folder or "
                            "a checkpoint folder)")
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="skip the check that the --resume checkpoint's pickle files hold only tensors and "
                            "DeepSpeed's own types. RISK: DeepSpeed unpickles them with weights_only=False, so a "
                            "tampered checkpoint runs arbitrary code; use only for checkpoints you wrote yourself")
        p.add_argument("--export-only", action="store_true",
                       help="load the checkpoint given by --resume and only write the inference folder")
        p.add_argument("--dry-run", nargs="?", type=int, const=1, default=None, metavar="PROCESSES",
                       help="check the config: fill the DeepSpeed JSON for PROCESSES processes (default 1) and build "
                            "the model on the meta device; print a summary and exit")
        p.add_argument("--dry-run-device", choices=["cuda", "cpu"], default="cuda",
                       help="device the dry run assumes (decides precision=auto); default cuda")
        # The `deepspeed` launcher appends --local_rank; the rank also arrives through LOCAL_RANK.
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=_run)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object (wired as `uniflow train ...`)."""
    parser = subparsers.add_parser("train", help=f"train a model on DeepSpeed ({', '.join(kind_help())})",
                                   description=__doc__.split("\n\n")[0])
    add_kind_parsers(parser)
    return parser
