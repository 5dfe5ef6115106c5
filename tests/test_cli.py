"""The `uniflow` command line, run as a user runs it (a subprocess), on a checkpoint the test writes."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("reconstruct", "convert", "data"):
        assert command in proc.stdout


def test_reconstruct_prints_psnr_ssim(tmp_path):
    torch.manual_seed(0)
    UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path / "tok")
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        arr = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).convert(mode)
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    odd = tmp_path / "odd.png"
    Image.new("RGB", (45, 37), (10, 200, 30)).save(odd)

    proc = run("reconstruct", *map(str, paths), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"),
               "--steps", "2", "--sampler", "heun")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3
    for line in lines:
        psnr, ssim = map(float, line.split()[1:3])
        assert 0 < psnr < 60 and -1 <= ssim <= 1
    assert "mean" in proc.stdout
    assert len(list((tmp_path / "out").glob("*_recon.png"))) == 3

    bad = run("reconstruct", str(odd), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "not divisible by the patch size 8" in bad.stderr and "Traceback" not in bad.stderr
    assert "--resize" in bad.stderr and "45x37" in bad.stderr
    assert [line.startswith("error:") for line in bad.stderr.splitlines()].count(True) == 1
    resized = run("reconstruct", str(odd), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"),
                  "--resize")
    assert resized.returncode == 0, resized.stderr

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    proc = run("reconstruct", str(corrupt), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "corrupt.jpg" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("reconstruct", str(paths[0]), "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "out2"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_data_shapes_writes_dataset(tmp_path):
    proc = run("data", "shapes", "--out", str(tmp_path / "sw"), "--num", "8", "--split", "train", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "sw" / "train").rglob("*.png"))) == 8
    assert (tmp_path / "sw" / "train_llava.json").is_file()
