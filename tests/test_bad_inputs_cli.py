"""The bad-input suite, command-line part: options, destinations, outputs, images, datasets and signals.

Cases run `app.cli.main([...])` in-process (fast) and check the exit code, that stderr has exactly one `error:` line
naming the problem and no traceback, and that nothing outside the intended output changed. Two subprocess checks
send SIGTERM and SIGINT during a save, one measures the memory of a 10000x10000 image with --resize. Ids are
`<class>-<name>` like tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from app.cli import main, output_names
from tests.helpers import Ctx
from tests.test_bad_inputs import png_header, rgb_png, snapshot


def run_cli(ctx: Ctx, *args: str) -> tuple[int, str, str]:
    ctx.capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = ctx.capsys.readouterr()
    return code, out, err


def one_error(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def refused(ctx: Ctx, needles: tuple[str, ...], *args: str) -> None:
    """The command exits 2 with one error line naming the problem and changes nothing under the test's folder."""
    before = snapshot(ctx.tmp)
    code, _, err = run_cli(ctx, *args)
    assert code == 2, err
    one_error(err, *needles)
    assert snapshot(ctx.tmp) == before


CASES: list = []


def case(kind: str, name: str) -> Callable:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CASES.append(pytest.param(fn, id=f"{kind}-{name}"))
        return fn

    return register


def _recon(ctx: Ctx, *extra: str) -> tuple[str, ...]:
    image = ctx.tmp / "in" / "a.png"
    if not image.exists():
        image.parent.mkdir(exist_ok=True)
        rgb_png(image)
    return ("reconstruct", str(image), "--tokenizer", str(ctx.tok_dir), "--out", str(ctx.tmp / "out"), *extra)


# --------------------------------------------------------------------------------------------------- options


@case("clear_error", "steps-0")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--steps", "[1, inf)", "got 0"), *_recon(ctx, "--steps", "0"))


@case("clear_error", "steps-negative")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--steps", "-3"), *_recon(ctx, "--steps", "-3"))


@case("clear_error", "steps-not-a-number")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--steps", "'two'"), *_recon(ctx, "--steps", "two"))


@case("clear_error", "steps-100000-unbounded")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--steps", "[1, 1001)", "100000"), *_recon(ctx, "--steps", "100000"))


@case("clear_error", "deblock-out-of-range")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--deblock", "[0, 1]", "1.5"), *_recon(ctx, "--deblock", "1.5"))


@case("clear_error", "deblock-nan")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--deblock", "nan"), *_recon(ctx, "--deblock", "nan"))


@case("clear_error", "empty-sampler")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--sampler", "''"), *_recon(ctx, "--sampler", ""))


@case("clear_error", "unknown-sampler")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--sampler", "'rk4'"), *_recon(ctx, "--sampler", "rk4"))


@case("clear_error", "seed-2**63")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--seed", str(2**63)), *_recon(ctx, "--seed", str(2**63)))


@case("clear_error", "seed-negative")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--seed", "-1"), *_recon(ctx, "--seed", "-1"))


@case("handled", "seed-largest")
def _(ctx: Ctx) -> None:
    code, _, err = run_cli(ctx, *_recon(ctx, "--seed", str(2**63 - 1)))
    assert code == 0, err


@case("handled", "heun-at-1-step-warns")
def _(ctx: Ctx) -> None:
    code, _, err = run_cli(ctx, *_recon(ctx, "--sampler", "heun"))
    assert code == 0 and "warning: --sampler heun at 1 step" in err and "euler" in err


@case("clear_error", "unknown-option")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--stepz",), *_recon(ctx, "--stepz", "2"))


# --------------------------------------------------------------------------------------------------- destinations


@case("clear_error", "out-is-a-file-checked-before-loading")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "out.txt").write_text("x")
    image = rgb_png(ctx.tmp / "a.png")
    # the tokenizer does not exist: the --out error proves the check runs before any loading
    refused(ctx, ("--out", "is a file"), "reconstruct", image, "--tokenizer", ctx.tmp / "missing", "--out",
            ctx.tmp / "out.txt")


@case("clear_error", "out-below-a-file")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "f").write_text("x")
    refused(ctx, ("--out", "is a file"), "reconstruct", rgb_png(ctx.tmp / "a.png"), "--tokenizer", ctx.tok_dir,
            "--out", ctx.tmp / "f" / "out")


@case("clear_error", "out-filesystem-root")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--out", "root"), "reconstruct", rgb_png(ctx.tmp / "a.png"), "--tokenizer", ctx.tok_dir,
            "--out", "/")


@case("clear_error", "out-empty-string")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--out", "empty path"), "reconstruct", rgb_png(ctx.tmp / "a.png"), "--tokenizer", ctx.tok_dir,
            "--out", "")


@case("clear_error", "out-unwritable")
def _(ctx: Ctx) -> None:
    if os.geteuid() == 0:
        ctx.monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        (ctx.tmp / "ro").mkdir(mode=0o555)
    refused(ctx, ("--out", "not writable"), "reconstruct", rgb_png(ctx.tmp / "a.png"), "--tokenizer", ctx.tok_dir,
            "--out", ctx.tmp / "ro" / "out")


@case("handled", "same-stem-inputs-get-distinct-outputs")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "a").mkdir()
    (ctx.tmp / "b").mkdir()
    rgb_png(ctx.tmp / "a" / "x.png", seed=1)
    rgb_png(ctx.tmp / "b" / "x.png", seed=2)
    Image.open(ctx.tmp / "b" / "x.png").save(ctx.tmp / "b" / "x.jpg")
    inputs = [ctx.tmp / "a" / "x.png", ctx.tmp / "b" / "x.jpg", ctx.tmp / "b" / "x.png"]
    code, out, err = run_cli(ctx, "reconstruct", *inputs, "--tokenizer", ctx.tok_dir, "--out", ctx.tmp / "out")
    assert code == 0, err
    names = sorted(p.name for p in (ctx.tmp / "out").iterdir())
    assert names == ["x-2_recon.png", "x-3_recon.png", "x_recon.png"]
    assert all(name in out for name in names)  # the table reports where each input went


@case("handled", "output-names-unique-case-insensitively")
def _(ctx: Ctx) -> None:
    names = [p.name for p in output_names(["a/X.png", "b/x.png", "c/x.png"], Path("o"))]
    assert len({n.lower() for n in names}) == 3


@case("clear_error", "existing-output-needs-overwrite")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "a_recon.png").write_bytes(b"precious")
    refused(ctx, ("a_recon.png", "--overwrite"), *_recon(ctx))


@case("handled", "existing-output-replaced-with-overwrite")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "a_recon.png").write_bytes(b"old")
    (ctx.tmp / "out" / "other.txt").write_text("untouched")
    code, _, err = run_cli(ctx, *_recon(ctx, "--overwrite"))
    assert code == 0, err
    assert Image.open(ctx.tmp / "out" / "a_recon.png").size == (32, 32)
    assert (ctx.tmp / "out" / "other.txt").read_text() == "untouched"
    assert sorted(p.name for p in (ctx.tmp / "out").iterdir()) == ["a_recon.png", "other.txt"]


@case("clear_error", "missing-tokenizer")
def _(ctx: Ctx) -> None:
    refused(ctx, ("missing", "not found"), "reconstruct", rgb_png(ctx.tmp / "a.png"), "--tokenizer",
            ctx.tmp / "missing", "--out", ctx.tmp / "out")


# --------------------------------------------------------------------------------------------------- images


@case("handled", "one-bad-image-does-not-lose-the-others")
def _(ctx: Ctx) -> None:
    good = rgb_png(ctx.tmp / "good.png")
    (ctx.tmp / "bad.png").write_text("not an image")
    odd = ctx.tmp / "odd.png"
    Image.new("RGB", (45, 37)).save(odd)
    code, out, err = run_cli(ctx, "reconstruct", good, ctx.tmp / "bad.png", odd, "--tokenizer", ctx.tok_dir,
                             "--out", ctx.tmp / "out")
    assert code == 2
    one_error(err, "2 of 3 image(s) failed", "bad.png")
    assert [p.name for p in (ctx.tmp / "out").iterdir()] == ["good_recon.png"]
    table = out.splitlines()
    assert sum("failed" in line for line in table) == 2 and any(line.startswith(str(good)) for line in table)
    assert any("45x37" in line and "--resize" in line for line in table)


@case("clear_error", "10000x10000-without-resize-refused-from-header")
def _(ctx: Ctx) -> None:
    huge = png_header(ctx.tmp / "huge.png", 10000, 10000)
    code, _, err = run_cli(ctx, "reconstruct", huge, "--tokenizer", ctx.tok_dir, "--out", ctx.tmp / "out")
    assert code == 2
    one_error(err, "huge.png", "10000x10000", "UNIFLOW_MAX_PIXELS")
    assert not (ctx.tmp / "out").exists()


@case("clear_error", "decompression-bomb")
def _(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("UNIFLOW_MAX_PIXELS", str(10**12))
    bomb = png_header(ctx.tmp / "bomb.png", 100_000, 100_000)
    code, _, err = run_cli(ctx, "reconstruct", bomb, "--tokenizer", ctx.tok_dir, "--out", ctx.tmp / "out")
    assert code == 2
    one_error(err, "bomb.png", "decompression bomb")


@case("handled", "16-bit-grey-png-reconstructs")
def _(ctx: Ctx) -> None:
    import numpy as np

    Image.fromarray(np.full((32, 32), 60000, np.uint16)).save(ctx.tmp / "g16.png")
    code, out, err = run_cli(ctx, "reconstruct", ctx.tmp / "g16.png", "--tokenizer", ctx.tok_dir, "--out",
                             ctx.tmp / "out")
    assert code == 0, err
    assert "g16_recon.png" in out


@case("handled", "resize-accepts-odd-sizes")
def _(ctx: Ctx) -> None:
    Image.new("RGB", (45, 37), (9, 99, 199)).save(ctx.tmp / "odd.png")
    code, _, err = run_cli(ctx, "reconstruct", ctx.tmp / "odd.png", "--tokenizer", ctx.tok_dir, "--out",
                           ctx.tmp / "out", "--resize")
    assert code == 0, err
    assert Image.open(ctx.tmp / "out" / "odd_recon.png").size == (32, 32)


# ------------------------------------------------------------------------------------------ convert, data, eval


@case("clear_error", "convert-into-existing-checkpoint-needs-overwrite")
def _(ctx: Ctx) -> None:
    from tests.test_bad_inputs import _release

    src = _release(ctx)
    code, _, err = run_cli(ctx, "convert", src, ctx.tmp / "conv")
    assert code == 0, err
    refused(ctx, ("--overwrite",), "convert", src, ctx.tmp / "conv")
    code, _, err = run_cli(ctx, "convert", src, ctx.tmp / "conv", "--overwrite", "--dtype", "float16")
    assert code == 0, err
    assert sorted(p.name for p in (ctx.tmp / "conv").iterdir()) == ["config.json", "model.safetensors"]


@case("clear_error", "convert-int8-dtype-flag")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--dtype", "'int8'"), "convert", ctx.tmp / "src", ctx.tmp / "dst", "--dtype", "int8")


@case("clear_error", "convert-missing-source")
def _(ctx: Ctx) -> None:
    refused(ctx, ("nowhere",), "convert", ctx.tmp / "nowhere", ctx.tmp / "dst")


@case("clear_error", "data-shapes-into-foreign-folder")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "mine").mkdir()
    (ctx.tmp / "mine" / "thesis.tex").write_text("x")
    refused(ctx, ("--out", "not written by"), "data", "shapes", "--out", ctx.tmp / "mine", "--num", "2",
            "--no-progress")


@case("handled", "data-shapes-regenerate-removes-stale-files")
def _(ctx: Ctx) -> None:
    out = ctx.tmp / "sw"
    args = ("data", "shapes", "--out", out, "--split", "train", "--no-progress")
    assert run_cli(ctx, *args, "--num", "5")[0] == 0
    refused(ctx, ("--overwrite",), *args, "--num", "2")
    assert run_cli(ctx, *args, "--num", "2", "--overwrite")[0] == 0
    assert len(list((out / "train").rglob("*.png"))) == 2
    assert json.loads((out / ".uniflow-shapeworld.json").read_text())["splits"]["train"]["num"] == 2


@case("clear_error", "data-shapes-negative-count")
def _(ctx: Ctx) -> None:
    refused(ctx, ("--num", "-4"), "data", "shapes", "--out", ctx.tmp / "sw", "--num", "-4")


@case("clear_error", "data-shapes-out-is-a-file")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "f").write_text("x")
    refused(ctx, ("--out", "is a file"), "data", "shapes", "--out", ctx.tmp / "f", "--num", "1", "--no-progress")


def _eval(ctx: Ctx, *args: str) -> tuple[int, str]:
    from eval.shapeworld_tokenizer import main as eval_main

    ctx.capsys.readouterr()
    code = eval_main(["--bundle", str(ctx.tmp / "no-bundle"), *args])
    return code, ctx.capsys.readouterr().err


@case("clear_error", "eval-steps-0")
def _(ctx: Ctx) -> None:
    code, err = _eval(ctx, "--steps", "0")
    assert code == 2
    one_error(err, "--steps", "got 0")


@case("clear_error", "eval-negative-heldout")
def _(ctx: Ctx) -> None:
    code, err = _eval(ctx, "--heldout", "-5")
    assert code == 2
    one_error(err, "--heldout", "-5")


@case("clear_error", "eval-out-is-a-folder")
def _(ctx: Ctx) -> None:
    code, err = _eval(ctx, "--out", str(ctx.tmp))
    assert code == 2
    one_error(err, "--out", "is a folder")


@case("handled", "keyboard-interrupt-is-one-line-exit-130")
def _(ctx: Ctx) -> None:
    from uniflow.errors import run_command

    def handler(args: object) -> int:
        raise KeyboardInterrupt

    ctx.capsys.readouterr()
    assert run_command(handler, None) == 130
    one_error(ctx.capsys.readouterr().err, "interrupted")


@pytest.mark.parametrize("check", CASES)
def test_bad_cli_input(check: Callable[[Ctx], None], ctx: Ctx) -> None:
    check(ctx)


# --------------------------------------------------------------------------------------------------- subprocesses

_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from uniflow.errors import run_command
    from uniflow.fileio import atomic_write_dir

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"w" * 100_000)
        print("writing", flush=True)
        time.sleep(60)

    sys.exit(run_command(lambda args: atomic_write_dir(Path(sys.argv[1]), write), None))
""")


@pytest.mark.parametrize("sig,code", [pytest.param(signal.SIGTERM, 143, id="handled-sigterm-during-save"),
                                      pytest.param(signal.SIGINT, 130, id="handled-sigint-during-save")])
def test_signal_during_save_removes_temporaries(tmp_path: Path, sig: int, code: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_handled_10000x10000_jpeg_with_resize_stays_under_2gb(tmp_path: Path, shared_tokenizer) -> None:
    Image.new("L", (10000, 10000), 128).save(tmp_path / "big.jpg", quality=50)
    script = textwrap.dedent(f"""
        import resource, sys
        from app.cli import main
        code = main(["reconstruct", {str(tmp_path / 'big.jpg')!r}, "--tokenizer", {str(shared_tokenizer[1])!r},
                     "--out", {str(tmp_path / 'out')!r}, "--resize"])
        print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    rss_gb = int(proc.stdout.split("maxrss_kb")[-1]) / 2**20
    assert rss_gb < 2.0, rss_gb
    assert Image.open(tmp_path / "out" / "big_recon.png").size == (32, 32)
