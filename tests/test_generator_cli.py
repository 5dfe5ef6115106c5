"""`uniflow generate` (issue 10, acceptance 4): grids, the ADM npz file and its resume, and every bad input as one
`error:` line with exit code 2 and nothing written."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from generator.model import ARGenerator
from generator.sample import parts_dir, write_npz
from tests.test_generator import randomized, tiny_config, tokenizer_with_stats
from uniflow.tokenizer import UniFlowTokenizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder: tokenizer/ (tiny, with latent statistics) and generator/ (random, trained on it)."""
    root = tmp_path_factory.mktemp("bundle")
    tok = tokenizer_with_stats(0)
    tok.save_pretrained(root / "tokenizer")
    model = randomized(tiny_config(grid=(4, 4)))
    model.attach_tokenizer(UniFlowTokenizer.from_pretrained(root / "tokenizer"))
    model.config.flow.sample_steps = 2
    model.save_pretrained(root / "generator")
    tokenizer_with_stats(1).save_pretrained(root / "other_tokenizer")
    return root


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(capsys: pytest.CaptureFixture[str], tmp: Path, needles: tuple[str, ...], *args: object) -> None:
    before = snapshot(tmp)
    code, _, err = run(capsys, "generate", *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(tmp) == before


def test_grid_by_id_and_by_name_in_a_new_folder(bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "deeper" / "grid.png"
    code, stdout, err = run(capsys, "generate", "--generator", bundle / "generator", "--class-id", 1, 3, "--num", 3,
                            "--cfg", 2, "--steps", 2, "--seed", 5, "--out", out, "--no-progress")
    assert code == 0, err
    image = Image.open(out)
    assert image.size == (3 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # 2 class rows x 3 samples, 32 px, 2-px gutters
    assert "2 class row(s) x 3 sample(s) (--class-id)" in stdout
    by_name = tmp_path / "named.png"
    assert run(capsys, "generate", "--generator", bundle / "generator", "--tokenizer", bundle / "tokenizer",
               "--class", "b", "--class", "d", "--num", 3, "--cfg", 2, "--steps", 2, "--seed", 5, "--out", by_name,
               "--no-progress")[0] == 0
    assert np.array_equal(np.asarray(Image.open(by_name)), np.asarray(image))  # names = ids, seeds per sample
    code, _, err = run(capsys, "generate", "--generator", bundle / "generator", "--class-id", 1, "--num", 1,
                       "--out", out, "--no-progress")
    assert code == 2 and "already exists; pass --overwrite" in err


BAD = [
    (("--class-id", "5"), ("--class-id", "class id 5: out of range", "[0, 5)")),
    (("--class-id", "-1"), ("--class-id", "class id -1: out of range")),
    (("--class", "pink hexagon"), ("--class", "'pink hexagon': unknown class name")),
    (("--class-id", "1", "--num", "0"), ("--num", "expected a value in [1, inf), got 0")),
    (("--class-id", "1", "--num", "-3"), ("--num",)),
    (("--class-id", "1", "--cfg", "-1"), ("--cfg", "expected a value in [0, inf)")),
    (("--class-id", "1", "--cfg", "nan"), ("--cfg", "finite")),
    (("--class-id", "1", "--steps", "0"), ("--steps", "[1, inf), got 0")),
    (("--class-id", "1", "--steps", "1001"), ("--steps", "[1, 1001)")),
    (("--class-id", "1", "--temperature", "0"), ("--temperature", "(0, inf)")),
    (("--class-id", "1", "--temperature", "-1"), ("--temperature",)),
    (("--class-id", "1", "--cfg-schedule", "cosine"), ("--cfg-schedule", "invalid choice")),
    (("--class-id", "1", "--seed", "-1"), ("--seed",)),
]


@pytest.mark.parametrize(("args", "needles"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_are_refused_before_anything_loads(bundle: Path, tmp_path: Path, capsys, args, needles) -> None:
    refused(capsys, tmp_path, needles, "--generator", bundle / "generator", *args, "--out", tmp_path / "g.png")


def test_bad_destinations_kinds_and_tokenizers(bundle: Path, tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gen = bundle / "generator"
    refused(capsys, tmp_path, ("--generator", "model_kind is 'uniflow-tokenizer', expected 'uniflow-generator'"),
            "--generator", bundle / "tokenizer", "--class-id", 1, "--out", tmp_path / "g.png")
    refused(capsys, tmp_path, ("nowhere", "generator folder not found"), "--generator", tmp_path / "nowhere",
            "--class-id", 1, "--out", tmp_path / "g.png")
    refused(capsys, tmp_path, ("--tokenizer", "is not the one this generator was trained on"), "--generator", gen,
            "--tokenizer", bundle / "other_tokenizer", "--class-id", 1, "--out", tmp_path / "g.png")
    (tmp_path / "afile").write_text("x")
    refused(capsys, tmp_path, ("--out", "is a file"), "--generator", gen, "--class-id", 1,
            "--out", tmp_path / "afile" / "g.png")
    refused(capsys, tmp_path, ("--out", "is a folder"), "--generator", gen, "--class-id", 1, "--out", tmp_path)
    lone = tmp_path / "lone"
    shutil.copytree(gen, lone / "gen")
    refused(capsys, tmp_path, ("--tokenizer: required",), "--generator", lone / "gen", "--class-id", 1,
            "--out", tmp_path / "g.png")
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
    refused(capsys, tmp_path, ("--out", "not writable"), "--generator", gen, "--class-id", 1,
            "--out", tmp_path / "ro" / "g.png")


def test_npz_in_the_adm_format_and_an_interrupted_run_resumes(bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["generate", "--generator", bundle / "generator", "--all-classes", "--per-class", 3, "--batch-size", 4,
            "--steps", 2, "--cfg", 1.5, "--no-progress"]
    reference = tmp_path / "ref.npz"
    code, _, err = run(capsys, *args, "--npz", reference)
    assert code == 0, err
    with np.load(reference) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (15, 32, 32, 3)
    assert labels.tolist() == [k for k in range(5) for _ in range(3)]
    assert not parts_dir(reference).exists()

    # Interrupt after two batches (of four), then run the same command: no sample missing, none twice.
    model = ARGenerator.from_pretrained(bundle / "generator")
    tokenizer = UniFlowTokenizer.from_pretrained(bundle / "tokenizer")
    out = tmp_path / "resumed.npz"
    seen = []

    def stop_after_two(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_npz(model, tokenizer, out, range(5), 3, batch_size=4, seed=0, progress=stop_after_two, steps=2,
                  cfg=1.5)
    assert not out.exists() and len(list(parts_dir(out).glob("chunk_*.npz"))) == 2
    refused(capsys, tmp_path, ("--npz", "holds an interrupted run with other settings"),
            *args[1:], "--seed", 1, "--npz", out)
    code, _, err = run(capsys, *args, "--npz", out)
    assert code == 0, err
    with np.load(out) as data:
        assert np.array_equal(data["arr_1"], labels)
        assert np.array_equal(data["arr_0"], images)
    assert not parts_dir(out).exists()
    refused(capsys, tmp_path, ("--npz", "already exists"), *args[1:], "--npz", out)
    assert run(capsys, *args, "--npz", out, "--overwrite")[0] == 0


def test_python_api_matches_the_cli(bundle: Path, tmp_path: Path, capsys) -> None:
    from generator.sample import image_grid, sample_images

    model = ARGenerator.from_pretrained(bundle / "generator")
    tokenizer = UniFlowTokenizer.from_pretrained(bundle / "tokenizer")
    images = sample_images(model, tokenizer, [2, 2], seeds=[7, 8], steps=2, cfg=1.0)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert run(capsys, "generate", "--generator", bundle / "generator", "--class-id", 2, "--num", 2, "--seed", 7,
               "--steps", 2, "--cfg", 1, "--out", tmp_path / "g.png", "--no-progress")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(image_grid(images, 2)))
    assert torch.is_tensor(model.sample(["c"], seeds=0, steps=1))
