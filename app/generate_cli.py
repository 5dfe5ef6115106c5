"""`uniflow generate`: class-conditional samples from a generator folder, as a PNG grid or the ADM evaluator's npz.

    uniflow generate --generator DIR --class-id 3 [--num 8 --cfg 2 --temperature 1 --steps 8 --seed 0] --out grid.png
    uniflow generate --generator DIR --class "red circle" --class "blue star" --out grid.png
    uniflow generate --generator DIR --all-classes --per-class 50 --npz samples.npz

The library parts are `generator.sample` (sampling, grids, the resumable npz writer); this module parses and checks
the options (all of them before anything loads), picks the tokenizer (`--tokenizer`, else `tokenizer/` beside the
generator folder: the bundle layout) and shows progress.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from app.options import float_range, int_range

SEED_BOUND = 2**63
MAX_BATCH = 65_536


def _classes(args: argparse.Namespace, config: Any) -> tuple[list[int], str]:
    """The requested class ids and the flag they came from, checked against the generator's config."""
    from generator.model import resolve_classes
    from uniflow.errors import ConfigError

    if args.all_classes:
        return list(range(config.num_classes)), "--all-classes"
    flag, values = ("--class-id", args.class_id) if args.class_id is not None else ("--class", args.class_names)
    try:
        return resolve_classes(config, [str(v) if flag == "--class" else int(v) for v in values]), flag
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _check_output(path_text: str, flag: str, overwrite: bool) -> Path:
    """A file we may write: its folder exists or can be created and is writable, it is not a folder, and it exists
    only with --overwrite."""
    from uniflow.checkpoint import check_output_dir
    from uniflow.errors import OutputError

    if not path_text or not path_text.strip():
        raise OutputError(f"{flag}: empty path; give a file to write")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag}: {path} is a folder, expected a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not overwrite:
        raise OutputError(f"{flag}: {path} already exists; pass --overwrite to replace it")
    return path


def _tokenizer_folder(args: argparse.Namespace, generator_folder: Path) -> Path:
    from uniflow.errors import ConfigError

    if args.tokenizer is not None:
        return Path(args.tokenizer)
    beside = generator_folder.parent / "tokenizer"
    if (beside / "config.json").is_file():
        return beside
    raise ConfigError(f"--tokenizer: required (no tokenizer/ folder beside {generator_folder}); give the tokenizer "
                      f"the generator was trained with")


def _cmd_generate(args: argparse.Namespace) -> int:
    from generator.model import GeneratorConfig
    from generator.sample import resolve_options
    from uniflow import checkpoint, hub
    from uniflow.configs import check_int
    from uniflow.errors import CheckpointError, ConfigError
    from uniflow.flow import MAX_STEPS

    if args.class_names is not None and args.class_id is not None:
        raise ConfigError("--class and --class-id: give one of them")
    try:
        folder = hub.resolve_folder(args.generator, what="generator")
        config = GeneratorConfig.from_dict(checkpoint.read_config(folder), str(folder / checkpoint.CONFIG_NAME))
    except CheckpointError as exc:
        raise CheckpointError(f"--generator: {exc}") from None
    classes, flag = _classes(args, config)
    for option, value in (("--steps", args.steps), ("--decode-steps", args.decode_steps)):
        if value is not None:
            check_int(option, value, 1, MAX_STEPS + 1)  # the sampler's limit, checked before anything loads
    opts = resolve_options(config, args.cfg, args.cfg_schedule, args.temperature, args.steps, args.sampler)
    total = len(classes) * args.num
    out = _check_output(args.out, "--out", args.overwrite) if args.out else None
    npz = _check_output(args.npz, "--npz", args.overwrite) if args.npz else None
    tokenizer_folder = _tokenizer_folder(args, folder)

    import torch
    from tqdm import tqdm

    from generator.model import ARGenerator
    from generator.sample import image_grid, parts_dir, sample_images, write_npz
    from uniflow import UniFlowTokenizer
    from uniflow.fileio import atomic_write_file

    model = ARGenerator.from_pretrained(folder, device=args.device)
    tokenizer = UniFlowTokenizer.from_pretrained(tokenizer_folder, device=args.device)
    model.check_tokenizer(tokenizer, f"--tokenizer {tokenizer_folder}")
    common: dict[str, Any] = {"decode_steps": args.decode_steps, "compile": args.compile, **opts}
    with tqdm(total=total, desc="generate", unit="img", file=sys.stderr, disable=args.no_progress) as bar:
        if npz is not None:
            try:
                write_npz(model, tokenizer, npz, classes, args.num, batch_size=args.batch_size, seed=args.seed,
                          overwrite=args.overwrite, progress=bar.update, **common)
            except KeyboardInterrupt:
                print(f"interrupted: the finished batches are kept in {parts_dir(npz)}; run the same command again "
                      f"to resume", file=sys.stderr)
                raise
            print(f"wrote {total} samples of {len(classes)} class(es) to {npz} (arr_0: uint8 images, arr_1: labels)")
            return 0
        labels = [c for c in classes for _ in range(args.num)]
        chunks = []
        for lo in range(0, total, args.batch_size):
            hi = min(lo + args.batch_size, total)
            chunks.append(sample_images(model, tokenizer, labels[lo:hi], [args.seed + j for j in range(lo, hi)],
                                        check_tokenizer=False, **common))
            bar.update(hi - lo)
    grid = image_grid(torch.cat(chunks), columns=args.num)
    assert out is not None
    atomic_write_file(out, lambda tmp: grid.save(tmp, format="PNG"))
    rows = math.ceil(total / args.num)
    print(f"wrote a grid of {rows} class row(s) x {args.num} sample(s) ({flag}) to {out}")
    return 0


HELP = "class-conditional samples from a generator: a PNG grid or the ADM evaluator's npz"
DESCRIPTION = (
    "Sample images of the requested classes with an AR generator and decode them with its tokenizer. --out writes a "
    "PNG grid (one row per class, --num samples each); --npz writes every sample in the ADM evaluator's format "
    "(arr_0: uint8 N x H x W x 3, arr_1: labels), batch by batch: an interrupted run resumes from its finished "
    "batches when the same command is run again. Sample j uses seed --seed + j (its head noise and its decoder "
    "noise), so results do not depend on --batch-size. Outputs are replaced only with --overwrite."
)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `generate` on the `uniflow` subparsers object."""
    p = subparsers.add_parser("generate", help=HELP, description=DESCRIPTION)
    p.add_argument("--generator", required=True, metavar="DIR", help="generator folder (config.json + weights)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the tokenizer the generator was trained with (default: tokenizer/ beside --generator)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--class-id", type=int_range(), nargs="+", default=None, metavar="K",
                       help="class ids, 0 <= K < the number of classes")
    which.add_argument("--class", dest="class_names", action="append", default=None, metavar="NAME",
                       help="a class name the checkpoint knows, e.g. \"red circle\" (repeatable)")
    which.add_argument("--all-classes", action="store_true", help="every class")
    p.add_argument("--num", "--per-class", dest="num", type=int_range(1, None), default=8, metavar="N",
                   help="samples per class (default 8)")
    p.add_argument("--cfg", type=float_range(0.0), default=None, metavar="S",
                   help="classifier-free guidance scale >= 0 (1: none; default: the checkpoint's)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None,
                   help="constant, or linear from 1 to S over the tokens (default: the checkpoint's)")
    p.add_argument("--temperature", type=float_range(0.0, lo_open=True), default=None, metavar="T",
                   help="scale of the flow head's noise, > 0 (default: the checkpoint's, 1)")
    p.add_argument("--steps", type=int_range(1, None), default=None, metavar="T",
                   help="flow-head ODE steps per token, 1 to 1000 (default: the checkpoint's)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="flow-head ODE solver")
    p.add_argument("--decode-steps", type=int_range(1, None), default=None, metavar="T",
                   help="the tokenizer decoder's steps (default: the tokenizer's, 1)")
    p.add_argument("--seed", type=int_range(0, SEED_BOUND), default=0, metavar="S",
                   help="sample j uses seed S + j (default 0)")
    p.add_argument("--batch-size", type=int_range(1, MAX_BATCH + 1), default=16, metavar="B",
                   help="samples per batch (default 16)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, metavar="FILE.png", help="write a PNG grid (its folder is created)")
    out.add_argument("--npz", default=None, metavar="FILE.npz", help="write every sample in the ADM npz format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --npz file")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--compile", action="store_true", help="run the decoding step and the head through torch.compile")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_generate)
    return p
