"""The `uniflow` command line. Sub-commands import their heavy dependencies lazily so `--help` stays instant.

Every command checks its options and destinations before loading a model or computing anything; every user error
is one `error: ...` line on stderr with exit code 2 (`uniflow.errors.run_command`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.options import OneLineParser, float_range, int_range

SEED_BOUND = 2**63
RECON_SUFFIX = "_recon.png"


def output_names(images: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """One distinct output file per input: `<stem>_recon.png`, then `<stem>-2_recon.png`, ... when stems repeat
    (`a/x.png` and `b/x.jpg`), so no reconstruction overwrites another."""
    taken: set[str] = set()
    names = []
    for path in images:
        stem = Path(path).stem or "image"
        candidate, k = f"{stem}{RECON_SUFFIX}", 1
        while candidate.lower() in taken:
            k += 1
            candidate = f"{stem}-{k}{RECON_SUFFIX}"
        taken.add(candidate.lower())
        names.append(out_dir / candidate)
    return names


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from uniflow.checkpoint import check_output_dir
    from uniflow.configs import check_int
    from uniflow.errors import ImageInputError, OutputError
    from uniflow.flow import MAX_STEPS

    if args.steps is not None:
        check_int("--steps", args.steps, 1, MAX_STEPS + 1)
    out_dir = check_output_dir(args.out, "--out")
    dests = output_names(args.images, out_dir)
    existing = [d for d in dests if d.exists()]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise OutputError(f"--out: {existing[0]}{more} already exist(s); pass --overwrite to replace them")
    if any(d.is_dir() for d in existing):
        raise OutputError(f"--out: {next(d for d in existing if d.is_dir())} is a folder, expected a file name")

    import torch
    from tqdm import tqdm

    from uniflow import UniFlowTokenizer
    from uniflow.fileio import atomic_write_file
    from uniflow.images import open_image, to_batch, to_pil
    from uniflow.metrics import psnr, ssim

    tokenizer = UniFlowTokenizer.from_pretrained(args.tokenizer)
    steps = args.steps if args.steps is not None else tokenizer.config.flow.sample_steps
    sampler = args.sampler if args.sampler is not None else tokenizer.config.flow.sampler
    if sampler == "heun" and steps == 1:
        print("warning: --sampler heun at 1 step is about 10 dB worse than euler here; use --sampler euler or "
              "--steps 2 or more", file=sys.stderr)
    size = tokenizer.config.encoder.image_size if args.resize else None
    rows: list[tuple[str, float, float, str]] = []
    failed: list[tuple[str, str]] = []
    for path, dest in zip(tqdm(args.images, desc="reconstruct", unit="img", file=sys.stderr), dests):
        try:
            batch = to_batch(open_image(path, size=size), size=size)
            recon = tokenizer.reconstruct(batch, steps=steps, sampler=sampler, seed=args.seed, deblock=args.deblock)
        except ImageInputError as exc:
            reason = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            failed.append((str(path), reason))
            continue
        target = batch.to(recon.device)
        p = psnr(recon, target).item()
        s = ssim(recon, target).item() if min(batch.shape[-2:]) >= 11 else float("nan")
        image = to_pil(recon)[0]
        atomic_write_file(dest, lambda tmp, image=image: image.save(tmp, format="PNG"))
        rows.append((str(path), p, s, str(dest)))

    width = max([len("image")] + [len(r[0]) for r in rows] + [len(f[0]) for f in failed])
    print(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}  output")
    for name, p, s, dest in rows:
        print(f"{name:<{width}}  {p:9.2f}  {s:6.4f}  {dest}")
    for name, reason in failed:
        print(f"{name:<{width}}  {'failed':>9}  {'':>6}  {reason}")
    if len(rows) > 1:
        mean_p = torch.tensor([r[1] for r in rows]).mean().item()
        mean_s = torch.tensor([r[2] for r in rows]).nanmean().item()
        print(f"{'mean':<{width}}  {mean_p:9.2f}  {mean_s:6.4f}")
    if rows:
        print(f"reconstructions written to {out_dir}")
    if failed:
        raise ImageInputError(f"{len(failed)} of {len(args.images)} image(s) failed (the others were written); "
                              f"first: {failed[0][1]}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from uniflow.convert import convert_official_checkpoint

    dest = convert_official_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.src} -> {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="uniflow", description="UniFlow: unified pixel flow tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("reconstruct", help="encode and decode images; print PSNR and SSIM per image",
                         description="Encode and decode images and print PSNR/SSIM per image. Outputs are "
                         "<stem>_recon.png in --out (<stem>-2_recon.png, ... when input stems repeat); existing "
                         "outputs are replaced only with --overwrite. An image that fails is reported in the table "
                         "and the command exits with code 2 after writing the others. Images over 64 megapixels "
                         "(header) are refused; raise the limit with $UNIFLOW_MAX_PIXELS.")
    rec.add_argument("images", nargs="+", help="image files")
    rec.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (config.json + model.safetensors)")
    rec.add_argument("--out", required=True, help="folder for the reconstructed PNGs")
    rec.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    rec.add_argument("--steps", type=int_range(1, None), default=None,
                     help="ODE steps, 1 to 1000 (default: the checkpoint's, 1)")
    rec.add_argument("--sampler", choices=["euler", "heun"], default=None,
                     help="default: the checkpoint's (euler); heun needs 2 or more steps to pay off (warned)")
    rec.add_argument("--seed", type=int_range(0, SEED_BOUND), default=0,
                     help="seed of the decoder noise, 0 <= seed < 2**63")
    rec.add_argument("--resize", action="store_true",
                     help="resize and centre-crop to the encoder's native size (else sides must divide by the patch)")
    rec.add_argument("--deblock", type=float_range(0.0, 1.0), default=None,
                     help="threshold of the patch-border deblocking filter, 0 to 1 (default: the checkpoint's; 0: off)")
    rec.set_defaults(func=_cmd_reconstruct)

    conv = sub.add_parser("convert", help="convert the official UniFlow release checkpoint to this format")
    conv.add_argument("src", help="folder of the release (config.json + *.safetensors) or a .safetensors file")
    conv.add_argument("dst", help="output folder (new or empty; an existing tokenizer checkpoint needs --overwrite)")
    conv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                      help="cast weights (default: keep the source dtype)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace config.json and model.safetensors of an existing tokenizer checkpoint in dst")
    conv.set_defaults(func=_cmd_convert)

    from train.cli import add_cli as add_train_cli

    add_train_cli(sub)
    from app.latent_stats_cli import add_cli as add_latent_stats_cli

    add_latent_stats_cli(sub)
    from app.chat_cli import add_cli as add_chat_cli

    add_chat_cli(sub)
    from app.generate_cli import add_cli as add_generate_cli

    add_generate_cli(sub)
    from app.demo import add_cli as add_demo_cli

    add_demo_cli(sub)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from app.data_cli import add_cli as add_shapes_cli

    add_shapes_cli(data_sub)
    from app.eval_cli import add_cli as add_eval_cli

    add_eval_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from uniflow.errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
