"""The `uniflow` command line. Sub-commands import their heavy dependencies lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from uniflow.metrics import psnr, ssim
    from uniflow import UniFlowTokenizer
    from uniflow.images import load_image, resize_center_crop, to_batch, to_pil

    tokenizer = UniFlowTokenizer.from_pretrained(args.tokenizer)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(args.images, desc="reconstruct", unit="img", file=sys.stderr):
        batch = to_batch(load_image(path))
        if args.resize:
            batch = resize_center_crop(batch, tokenizer.config.encoder.image_size)
        recon = tokenizer.reconstruct(batch, steps=args.steps, sampler=args.sampler, seed=args.seed)
        target = batch.to(recon.device)
        p = psnr(recon, target).item()
        s = ssim(recon, target).item() if min(batch.shape[-2:]) >= 11 else float("nan")
        dest = out_dir / f"{Path(path).stem}_recon.png"
        to_pil(recon)[0].save(dest)
        rows.append((str(path), p, s, str(dest)))
    width = max(len(r[0]) for r in rows)
    print(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}")
    for name, p, s, _ in rows:
        print(f"{name:<{width}}  {p:9.2f}  {s:6.4f}")
    if len(rows) > 1:
        mean_p = torch.tensor([r[1] for r in rows]).mean().item()
        mean_s = torch.tensor([r[2] for r in rows]).nanmean().item()
        print(f"{'mean':<{width}}  {mean_p:9.2f}  {mean_s:6.4f}")
    print(f"reconstructions written to {out_dir}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from uniflow.convert import convert_official_checkpoint

    dest = convert_official_checkpoint(args.src, args.dst, dtype=args.dtype)
    print(f"converted {args.src} -> {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniflow", description="UniFlow: unified pixel flow tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("reconstruct", help="encode and decode images; print PSNR and SSIM per image")
    rec.add_argument("images", nargs="+", help="image files")
    rec.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (config.json + model.safetensors)")
    rec.add_argument("--out", required=True, help="folder for the reconstructed PNGs")
    rec.add_argument("--steps", type=int, default=None, help="ODE steps (default: the checkpoint's, 1)")
    rec.add_argument("--sampler", choices=["euler", "heun"], default=None)
    rec.add_argument("--seed", type=int, default=0, help="seed of the decoder noise")
    rec.add_argument("--resize", action="store_true",
                     help="resize and centre-crop to the encoder's native size (else sides must divide by the patch)")
    rec.set_defaults(func=_cmd_reconstruct)

    conv = sub.add_parser("convert", help="convert the official UniFlow release checkpoint to this format")
    conv.add_argument("src", help="folder of the release (config.json + *.safetensors) or a .safetensors file")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                      help="cast weights (default: keep the source dtype)")
    conv.set_defaults(func=_cmd_convert)

    from train.cli import add_cli as add_train_cli

    add_train_cli(sub)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from uniflow.data.shapeworld import add_cli as add_shapes_cli

    add_shapes_cli(data_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from uniflow.errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
