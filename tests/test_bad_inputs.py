"""The bad-input suite, Python API part: images, tensors, latents, checkpoints, paths and writers.

Each case is one test id `<class>-<name>`, class `clear_error` (refused with a one-line UniFlowError naming the
problem) or `handled` (the correct result). Cases that write check that nothing outside their intended output
changed by hashing the folder before and after. Run: `pytest -q tests/test_bad_inputs.py tests/test_bad_inputs_cli.py`
(`-k clear_error` or `-k handled` for one class). See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.helpers import Ctx
from uniflow import UniFlowTokenizer
from uniflow.checkpoint import check_destination, read_safetensors, save_folder
from uniflow.errors import CheckpointError, ConfigError, ImageInputError, OutputError, UniFlowError
from uniflow.fileio import atomic_write_dir, atomic_write_file, atomic_write_text
from uniflow.images import check_latents, open_image, to_batch, to_rgb
from uniflow.tokenizer import MODEL_KIND

# --------------------------------------------------------------------------------------------------- helpers


def snapshot(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones too) by relative path, minus the `exclude` prefixes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(exclude):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expect(error: type[Exception], fn: Callable[[], object], *needles: str) -> str:
    """`fn()` raises `error` with a one-line message containing every needle; returns the message."""
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, UniFlowError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (almost no data): decoding it would fail, so only a check made from
    the header can give the pixel-limit error."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def rgb_png(path: Path, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path




CASES: list = []


def case(kind: str, name: str, marks: tuple = ()) -> Callable:
    assert kind in ("clear_error", "handled")

    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CASES.append(pytest.param(fn, id=f"{kind}-{name}", marks=marks))
        return fn

    return register


def save_copy(ctx: Ctx, dest: Path) -> Path:
    return ctx.tok.save_pretrained(dest)


# --------------------------------------------------------------------------------------------------- image files


@case("clear_error", "open-missing-file")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: open_image(ctx.tmp / "nope.png"), "nope.png", "not found")


@case("clear_error", "open-a-folder")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: open_image(ctx.tmp), "folder")


@case("clear_error", "open-corrupt-jpeg")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "c.jpg").write_bytes(b"\xff\xd8\xff garbage")
    expect(ImageInputError, lambda: open_image(ctx.tmp / "c.jpg"), "c.jpg", "cannot read")


@case("clear_error", "open-truncated-png")
def _(ctx: Ctx) -> None:
    data = rgb_png(ctx.tmp / "t.png", 64, 64).read_bytes()
    (ctx.tmp / "t.png").write_bytes(data[: len(data) // 2])
    expect(ImageInputError, lambda: open_image(ctx.tmp / "t.png"), "t.png")


@case("clear_error", "open-text-file")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "notes.png").write_text("hello")
    expect(ImageInputError, lambda: open_image(ctx.tmp / "notes.png"), "notes.png", "cannot read")


@case("clear_error", "oversized-10000x10000-from-header")
def _(ctx: Ctx) -> None:
    path = png_header(ctx.tmp / "huge.png", 10000, 10000)
    expect(ImageInputError, lambda: open_image(path), "10000x10000", "UNIFLOW_MAX_PIXELS", "64 MP")


@case("clear_error", "pixel-limit-from-env")
def _(ctx: Ctx) -> None:
    path = rgb_png(ctx.tmp / "a.png", 40, 30)
    ctx.monkeypatch.setenv("UNIFLOW_MAX_PIXELS", "1000")
    expect(ImageInputError, lambda: open_image(path), "40x30", "0.001 MP")


@case("handled", "pixel-limit-raised-by-argument")
def _(ctx: Ctx) -> None:
    path = rgb_png(ctx.tmp / "a.png", 40, 30)
    ctx.monkeypatch.setenv("UNIFLOW_MAX_PIXELS", "1000")
    assert open_image(path, max_pixels=1200).size == (40, 30)


@case("clear_error", "pixel-limit-env-not-a-number")
def _(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("UNIFLOW_MAX_PIXELS", "lots")
    expect(ImageInputError, lambda: open_image(rgb_png(ctx.tmp / "a.png")), "UNIFLOW_MAX_PIXELS", "'lots'")


@case("clear_error", "decompression-bomb")
def _(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("UNIFLOW_MAX_PIXELS", str(10**12))  # past our limit: PIL's own bomb check fires
    path = png_header(ctx.tmp / "bomb.png", 100_000, 100_000)
    expect(ImageInputError, lambda: open_image(path), "bomb.png", "decompression bomb")


@case("handled", "16-bit-grey-png-scaled-by-65535")
def _(ctx: Ctx) -> None:
    arr = np.full((8, 8), 65535, np.uint16)
    arr[0] = 32768
    arr[1] = 0
    Image.fromarray(arr).save(ctx.tmp / "g16.png")
    out = np.asarray(open_image(ctx.tmp / "g16.png"))
    assert out[0, 0].tolist() == [128] * 3 and out[1, 0].tolist() == [0] * 3 and out[5, 5].tolist() == [255] * 3


@case("handled", "16-bit-big-endian-I;16B")
def _(ctx: Ctx) -> None:
    img = Image.frombytes("I;16B", (4, 2), np.full((2, 4), 16384, ">u2").tobytes())
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [64] * 3


@case("handled", "32-bit-mode-I-holding-16-bit-values")
def _(ctx: Ctx) -> None:
    img = Image.fromarray(np.full((4, 4), 65535, np.int32), mode="I")
    assert np.asarray(to_rgb(img)).min() == 255


@case("clear_error", "mode-I-negative-values")
def _(ctx: Ctx) -> None:
    img = Image.fromarray(np.full((4, 4), -5, np.int32), mode="I")
    expect(ImageInputError, lambda: to_rgb(img, "x.tif"), "x.tif", "[0, 65535]")


@case("handled", "float-F-image-in-0-1")
def _(ctx: Ctx) -> None:
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(ctx.tmp / "f.tif")
    assert np.asarray(open_image(ctx.tmp / "f.tif"))[0, 0].tolist() == [128] * 3


@case("clear_error", "float-F-image-out-of-range")
def _(ctx: Ctx) -> None:
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(ctx.tmp / "f.tif")
    expect(ImageInputError, lambda: open_image(ctx.tmp / "f.tif"), "f.tif", "[0, 1]")


@case("clear_error", "float-F-image-with-nan")
def _(ctx: Ctx) -> None:
    arr = np.full((8, 8), 0.5, np.float32)
    arr[2, 2] = np.nan
    Image.fromarray(arr).save(ctx.tmp / "f.tif")
    expect(ImageInputError, lambda: open_image(ctx.tmp / "f.tif"), "f.tif", "NaN")


@case("handled", "exif-orientation-applied")
def _(ctx: Ctx) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(ctx.tmp / "rot.jpg", exif=exif, quality=95)
    out = open_image(ctx.tmp / "rot.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[5, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


@case("handled", "animated-gif-first-frame-with-warning")
def _(ctx: Ctx) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(ctx.tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with pytest.warns(UserWarning, match="first"):
        out = open_image(ctx.tmp / "anim.gif")
    assert np.asarray(out)[0, 0, 0] > 200


@case("handled", "palette-with-transparency-on-white")
def _(ctx: Ctx) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    img.save(ctx.tmp / "p.png", transparency=0)
    assert np.asarray(open_image(ctx.tmp / "p.png")).min() == 255


@case("handled", "grey-alpha-LA")
def _(ctx: Ctx) -> None:
    Image.new("LA", (8, 8), (0, 0)).save(ctx.tmp / "la.png")
    assert np.asarray(open_image(ctx.tmp / "la.png")).min() == 255


@case("handled", "cmyk-jpeg")
def _(ctx: Ctx) -> None:
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(ctx.tmp / "c.jpg")
    assert np.asarray(open_image(ctx.tmp / "c.jpg")).min() > 240


@case("handled", "ycbcr-and-1-bit")
def _(ctx: Ctx) -> None:
    assert to_rgb(Image.new("YCbCr", (4, 4), (255, 128, 128))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


@case("handled", "training-folder-skips-and-counts-oversized-and-bomb-images")
def _(ctx: Ctx) -> None:
    from train.data import ImageFolderDataset

    (ctx.tmp / "data" / "cls").mkdir(parents=True)
    rgb_png(ctx.tmp / "data" / "cls" / "ok.png")
    png_header(ctx.tmp / "data" / "cls" / "huge.png", 10000, 10000)
    png_header(ctx.tmp / "data" / "cls" / "bomb.png", 100_000, 100_000)
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = ImageFolderDataset(ctx.tmp / "data", image_size=32)
    assert len(ds) == 1 and len(ds.skipped) == 2 and ds[0]["image"].shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------------- tensors, arrays


@case("clear_error", "nan-pixels-in-float-batch")
def _(ctx: Ctx) -> None:
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 4, 4] = float("nan")
    expect(ImageInputError, lambda: to_batch(x), "images[1]", "NaN")


@case("clear_error", "inf-pixels-in-float-batch")
def _(ctx: Ctx) -> None:
    x = torch.rand(2, 3, 32, 32)
    x[0, 2, 0, 0] = float("inf")
    expect(ImageInputError, lambda: ctx.tok.encode(x), "images[0]", "inf")


@case("clear_error", "nan-pixels-in-single-tensor")
def _(ctx: Ctx) -> None:
    x = torch.rand(3, 32, 32)
    x[0, 0, 0] = float("nan")
    expect(ImageInputError, lambda: ctx.tok.reconstruct(x), "image 0", "NaN")


@case("clear_error", "nan-pixels-in-numpy-array")
def _(ctx: Ctx) -> None:
    x = np.random.rand(32, 32, 3)
    x[3, 3, 1] = np.inf
    expect(ImageInputError, lambda: to_batch(x), "image 0", "inf")


@case("clear_error", "float-pixels-out-of-range")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(torch.full((1, 3, 8, 8), 2.0)), "[0, 1]")


@case("clear_error", "zero-size-batch")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: ctx.tok.encode(torch.zeros(0, 3, 32, 32)), "empty batch")


@case("clear_error", "empty-list")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: ctx.tok.encode([]), "no images")


@case("handled", "float16-batch-encodes")
def _(ctx: Ctx) -> None:
    x = torch.rand(2, 3, 32, 32)
    ref = ctx.tok.encode(x.half().float()).latents
    out = ctx.tok.encode(x.half()).latents
    assert out.dtype == torch.float32 and torch.allclose(out, ref)


@case("handled", "bfloat16-batch-encodes")
def _(ctx: Ctx) -> None:
    assert ctx.tok.encode(torch.rand(1, 3, 32, 32).bfloat16()).latents.dtype == torch.float32


@case("handled", "numpy-float64-hwc")
def _(ctx: Ctx) -> None:
    x = np.random.rand(32, 32, 3)
    assert torch.allclose(to_batch(x)[0], torch.from_numpy(x).permute(2, 0, 1).float())


@case("handled", "numpy-uint16-scaled")
def _(ctx: Ctx) -> None:
    assert to_batch(np.full((8, 8), 65535, np.uint16)).min() == 1.0


@case("handled", "numpy-batch-bhwc-uint8")
def _(ctx: Ctx) -> None:
    x = np.random.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert ctx.tok.encode(x).latents.shape == (2, 16, 16)


@case("clear_error", "int32-tensor")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(torch.zeros(3, 8, 8, dtype=torch.int32)), "torch.int32")


@case("clear_error", "bool-array")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(np.zeros((8, 8, 3), bool)), "bool")


@case("clear_error", "five-channels")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(torch.rand(5, 8, 8)), "channels", "(5, 8, 8)")


@case("clear_error", "five-dims")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(torch.rand(1, 1, 3, 8, 8)), "dims")


@case("clear_error", "one-pixel-image")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch(Image.new("RGB", (1, 1))), "1x1", "too small")


@case("clear_error", "mixed-sizes-without-resize")
def _(ctx: Ctx) -> None:
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (40, 32))]
    expect(ImageInputError, lambda: ctx.tok.encode(images), "32x32, 40x32", "resize=True")


@case("handled", "mixed-sizes-with-resize")
def _(ctx: Ctx) -> None:
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (45, 37))]
    assert ctx.tok.encode(images, resize=True).latents.shape == (2, 16, 16)


@case("clear_error", "not-divisible-advises-resize-in-wxh")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: ctx.tok.encode(Image.new("RGB", (45, 37))), "45x37", "--resize",
           "resize=True", "patch size 8")


@case("clear_error", "a-path-instead-of-an-image")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch("photo.png"), "photo.png", "open_image")


@case("clear_error", "unsupported-object")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: to_batch([1.5]), "float")


# --------------------------------------------------------------------------------------------------- latents


@case("clear_error", "nan-latents")
def _(ctx: Ctx) -> None:
    z = torch.zeros(1, 16, 16)
    z[0, 3, 3] = float("nan")
    expect(ImageInputError, lambda: check_latents(z, 16), "latents", "NaN")


@case("handled", "numpy-latents")
def _(ctx: Ctx) -> None:
    z = np.random.randn(2, 16, 16).astype(np.float32)
    assert torch.equal(check_latents(z, 16), torch.from_numpy(z))


@case("clear_error", "latents-wrong-channels")
def _(ctx: Ctx) -> None:
    expect(ImageInputError, lambda: check_latents(torch.zeros(1, 16, 8), 16), "(B, N, 16)", "(1, 16, 8)")


@case("clear_error", "decode-nan-latents")
def _(ctx: Ctx) -> None:
    z = torch.zeros(1, 16, 16)
    z[0, 0, 0] = float("inf")
    expect(ImageInputError, lambda: ctx.tok.decode(z), "latents", "inf")


@case("handled", "decode-numpy-latents")
def _(ctx: Ctx) -> None:
    z = ctx.tok.encode(torch.rand(1, 3, 32, 32)).latents
    out = ctx.tok.decode(z.numpy(), seed=0)
    assert torch.equal(out, ctx.tok.decode(z, seed=0))


@case("clear_error", "decode-steps-0")
def _(ctx: Ctx) -> None:
    expect(ConfigError, lambda: ctx.tok.decode(torch.zeros(1, 16, 16), steps=0), "steps")


@case("clear_error", "decode-empty-sampler")
def _(ctx: Ctx) -> None:
    expect(ConfigError, lambda: ctx.tok.decode(torch.zeros(1, 16, 16), sampler=""), "sampler")


# --------------------------------------------------------------------------------------------------- saving


@case("clear_error", "save-int8-dtype")
def _(ctx: Ctx) -> None:
    expect(ConfigError, lambda: ctx.tok.save_pretrained(ctx.tmp / "t", dtype=torch.int8), "torch.int8", "floating")
    assert not (ctx.tmp / "t").exists()


@case("clear_error", "save-string-dtype")
def _(ctx: Ctx) -> None:
    expect(ConfigError, lambda: ctx.tok.save_pretrained(ctx.tmp / "t", dtype="float16"), "'float16'")


@case("clear_error", "save-nan-weights-names-tensor")
def _(ctx: Ctx) -> None:
    state = {"a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, float("nan")])}
    expect(CheckpointError, lambda: save_folder(ctx.tmp / "t", {"model_kind": "x"}, state), "'b.weight'", "NaN")
    assert not (ctx.tmp / "t").exists() and not list(ctx.tmp.iterdir())


@case("clear_error", "save-fp16-overflow-to-inf")
def _(ctx: Ctx) -> None:
    state = {"w": torch.tensor([1e6])}
    expect(CheckpointError, lambda: save_folder(ctx.tmp / "t", {"model_kind": "x"}, state, dtype=torch.float16),
           "'w'", "torch.float16")


@case("clear_error", "save-pretrained-into-folder-with-other-files")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / "metrics.jsonl").write_text("{}\n")
    (ctx.tmp / "run" / "checkpoints").mkdir()
    (ctx.tmp / "run" / "checkpoints" / "step_1.pt").write_bytes(b"x")
    before = snapshot(ctx.tmp)
    expect(OutputError, lambda: ctx.tok.save_pretrained(ctx.tmp / "run"), "not empty", "not a checkpoint")
    assert snapshot(ctx.tmp) == before


@case("clear_error", "save-pretrained-onto-checkpoint-without-overwrite")
def _(ctx: Ctx) -> None:
    save_copy(ctx, ctx.tmp / "t")
    before = snapshot(ctx.tmp)
    expect(OutputError, lambda: ctx.tok.save_pretrained(ctx.tmp / "t"), "overwrite=True", "--overwrite")
    assert snapshot(ctx.tmp) == before


@case("handled", "save-pretrained-overwrite-keeps-other-files")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    (dest / "README.md").write_text("my notes")
    (dest / "model.safetensors").write_bytes(b"old")
    before = snapshot(ctx.tmp, exclude=("t/model.safetensors", "t/config.json"))
    ctx.tok.save_pretrained(dest, overwrite=True)
    assert snapshot(ctx.tmp, exclude=("t/model.safetensors", "t/config.json")) == before
    assert UniFlowTokenizer.from_pretrained(dest) is not None
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["t"]  # no temporaries left beside it


@case("clear_error", "save-onto-checkpoint-of-another-kind")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "g").mkdir()
    (ctx.tmp / "g" / "config.json").write_text(json.dumps({"model_kind": "uniflow-generator"}))
    before = snapshot(ctx.tmp)
    expect(OutputError, lambda: ctx.tok.save_pretrained(ctx.tmp / "g", overwrite=True), "'uniflow-generator'")
    assert snapshot(ctx.tmp) == before


@case("clear_error", "save-empty-path")
def _(ctx: Ctx) -> None:
    expect(OutputError, lambda: ctx.tok.save_pretrained(""), "empty path")


@case("clear_error", "save-to-filesystem-root")
def _(ctx: Ctx) -> None:
    expect(OutputError, lambda: ctx.tok.save_pretrained("/", overwrite=True), "root")


@case("clear_error", "save-to-a-file-path")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "f.bin").write_bytes(b"data")
    expect(OutputError, lambda: ctx.tok.save_pretrained(ctx.tmp / "f.bin"), "is a file")
    assert (ctx.tmp / "f.bin").read_bytes() == b"data"


@case("clear_error", "save-below-a-file")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "f.bin").write_bytes(b"data")
    expect(OutputError, lambda: ctx.tok.save_pretrained(ctx.tmp / "f.bin" / "sub"), "is a file")


@case("clear_error", "save-unwritable-parent")
def _(ctx: Ctx) -> None:
    if os.geteuid() == 0:  # root writes anywhere: a read-only mount is what stops it; check the message logic
        ctx.monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        (ctx.tmp / "ro").mkdir(mode=0o555)
    expect(OutputError, lambda: check_destination(ctx.tmp / "ro" / "t", MODEL_KIND), "not writable")


@case("handled", "save-into-empty-folder")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "t").mkdir()
    ctx.tok.save_pretrained(ctx.tmp / "t")
    assert sorted(p.name for p in (ctx.tmp / "t").iterdir()) == ["config.json", "model.safetensors"]


@case("handled", "stale-temp-folder-of-killed-run-cleaned")
def _(ctx: Ctx) -> None:
    stale = ctx.tmp / ".t.tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    (ctx.tmp / ".t.old-999999999").mkdir()
    ctx.tok.save_pretrained(ctx.tmp / "t")
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["t"]


@case("handled", "temp-folder-of-a-live-writer-kept")
def _(ctx: Ctx) -> None:
    live = ctx.tmp / f".t.tmp-{os.getppid()}-abc"
    live.mkdir()
    ctx.tok.save_pretrained(ctx.tmp / "t")
    assert live.is_dir()


@case("handled", "readers-ignore-stale-temps-inside-a-checkpoint")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    (dest / ".model.safetensors.tmp-999999999-x.safetensors").write_bytes(b"garbage")
    assert UniFlowTokenizer.from_pretrained(dest) is not None
    ctx.tok.save_pretrained(dest, overwrite=True)  # the next write cleans it
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------------------------------- reading


def _index(ctx: Ctx, weight_map: object) -> Path:
    folder = ctx.tmp / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "part1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@case("handled", "sharded-index-inside-folder")
def _(ctx: Ctx) -> None:
    assert torch.equal(read_safetensors(_index(ctx, {"a": "part1.safetensors"}))["a"], torch.ones(2))


@case("clear_error", "sharded-index-absolute-path")
def _(ctx: Ctx) -> None:
    save_file({"a": torch.ones(2)}, str(ctx.tmp / "outside.safetensors"))
    folder = _index(ctx, {"a": str(ctx.tmp / "outside.safetensors")})
    expect(CheckpointError, lambda: read_safetensors(folder), "outside the index's folder")


@case("clear_error", "sharded-index-dotdot")
def _(ctx: Ctx) -> None:
    folder = _index(ctx, {"a": "../outside.safetensors"})
    expect(CheckpointError, lambda: read_safetensors(folder), "'../outside.safetensors'")


@case("clear_error", "sharded-index-bad-json")
def _(ctx: Ctx) -> None:
    folder = _index(ctx, {})
    (folder / "model.safetensors.index.json").write_text("{not json")
    expect(CheckpointError, lambda: read_safetensors(folder), "index.json", "not valid JSON")


@case("clear_error", "sharded-index-without-weight-map")
def _(ctx: Ctx) -> None:
    expect(CheckpointError, lambda: read_safetensors(_index(ctx, [])), "weight_map")


@case("clear_error", "config-bad-json")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    (dest / "config.json").write_text("{")
    expect(CheckpointError, lambda: UniFlowTokenizer.from_pretrained(dest), "config.json", "not valid JSON")


@case("clear_error", "config-json-list")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    (dest / "config.json").write_text("[1, 2]")
    expect(CheckpointError, lambda: UniFlowTokenizer.from_pretrained(dest), "config.json", "JSON object")


@case("clear_error", "truncated-weights")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 3])
    expect(CheckpointError, lambda: UniFlowTokenizer.from_pretrained(dest), "model.safetensors", "truncated")


@case("clear_error", "missing-weights")
def _(ctx: Ctx) -> None:
    dest = save_copy(ctx, ctx.tmp / "t")
    (dest / "model.safetensors").unlink()
    expect(CheckpointError, lambda: UniFlowTokenizer.from_pretrained(dest), "missing model.safetensors")


# --------------------------------------------------------------------------------------------------- convert


def _release(ctx: Ctx, poison: bool = False) -> Path:
    from tests.test_convert import release_config, release_state_dict

    state = release_state_dict()
    if poison:
        key = sorted(state)[0]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    src = ctx.tmp / "release"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(release_config()))
    return src


@case("clear_error", "convert-release-with-nan-weights")
def _(ctx: Ctx) -> None:
    from uniflow.convert import convert_official_checkpoint

    src = _release(ctx, poison=True)
    expect(CheckpointError, lambda: convert_official_checkpoint(src, ctx.tmp / "out"), "non-finite", "release")
    assert not (ctx.tmp / "out").exists()


@case("clear_error", "convert-release-bad-json")
def _(ctx: Ctx) -> None:
    from uniflow.convert import convert_official_checkpoint

    src = _release(ctx)
    (src / "config.json").write_text("{'single': quotes}")
    expect(CheckpointError, lambda: convert_official_checkpoint(src, ctx.tmp / "out"), "config.json", "JSON")


@case("clear_error", "convert-into-folder-with-other-files")
def _(ctx: Ctx) -> None:
    from uniflow.convert import convert_official_checkpoint

    src = _release(ctx)
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "keep.txt").write_text("x")
    before = snapshot(ctx.tmp)
    expect(OutputError, lambda: convert_official_checkpoint(src, ctx.tmp / "out", overwrite=True), "not empty")
    assert snapshot(ctx.tmp) == before


@case("clear_error", "convert-int8-dtype")
def _(ctx: Ctx) -> None:
    from uniflow.convert import convert_official_checkpoint

    expect(ConfigError, lambda: convert_official_checkpoint(_release(ctx), ctx.tmp / "out", dtype="int8"), "int8")


# --------------------------------------------------------------------------------------------------- writers


@case("handled", "failed-folder-write-leaves-no-temporary")
def _(ctx: Ctx) -> None:
    def write(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_dir(ctx.tmp / "d", write)
    assert list(ctx.tmp.iterdir()) == []


@case("handled", "failed-file-write-keeps-the-old-file")
def _(ctx: Ctx) -> None:
    atomic_write_text(ctx.tmp / "a.json", "old")

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_file(ctx.tmp / "a.json", write)
    assert (ctx.tmp / "a.json").read_text() == "old" and [p.name for p in ctx.tmp.iterdir()] == ["a.json"]


@case("clear_error", "file-writer-onto-a-folder")
def _(ctx: Ctx) -> None:
    (ctx.tmp / "x").mkdir()
    expect(OutputError, lambda: atomic_write_text(ctx.tmp / "x", "data"), "is a folder")


@case("clear_error", "shapeworld-into-foreign-folder")
def _(ctx: Ctx) -> None:
    from uniflow.data.shapeworld import write_shapeworld

    (ctx.tmp / "photos").mkdir()
    (ctx.tmp / "photos" / "cat.jpg").write_bytes(b"x")
    before = snapshot(ctx.tmp)
    expect(OutputError, lambda: write_shapeworld(ctx.tmp / "photos", 2, progress=False), "not written by")
    assert snapshot(ctx.tmp) == before


@case("clear_error", "shapeworld-negative-count")
def _(ctx: Ctx) -> None:
    from uniflow.data.shapeworld import write_shapeworld

    expect(ConfigError, lambda: write_shapeworld(ctx.tmp / "sw", -1, progress=False), "num", "-1")


# --------------------------------------------------------------------------------------------------- the runner


def test_suite_is_large_enough() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("check", CASES)
def test_bad_input(check: Callable[[Ctx], None], ctx: Ctx) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check(ctx)
