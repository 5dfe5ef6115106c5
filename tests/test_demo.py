"""`uniflow demo` (issue 13): the real Gradio app on a free local port, driven tab by tab through `gradio_client` on
tiny models built here; the bad inputs of acceptance 4 (each a readable message, then the app still serves); a tab
whose model is missing; eight simultaneous clients; the command line. The tests on the real bundle run when its
folders exist (checkpoints/shapeworld/{tokenizer,generator,mllm})."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.cli import main
from app.demo import launch
from app.demo_models import DEFAULT_BUNDLE, DemoModels, resolve_paths
from tests.helpers import ROOT, build_tiny_bundle, launch_env
from uniflow.data import render_sample
from uniflow.metrics import psnr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """A launched demo: its URL, models and a client (one session: the chat's conversation lives in it)."""

    def __init__(self, bundle: Path) -> None:
        self.models = DemoModels(resolve_paths(bundle=str(bundle)), torch.device("cpu"), torch.float32)
        self.demo, self.workdir, self.url = launch(self.models, port=free_port())
        self.client = Client(self.url, verbose=False)

    def new_client(self) -> Client:
        return Client(self.url, verbose=False)

    def close(self) -> None:
        self.demo.close()
        self.workdir.cleanup()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    bundle = build_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    running = App(bundle)
    yield running
    running.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uploads: held-out ShapeWorld images, a grey, an RGBA and a 16-bit one, a 10000x10000 one, a text file."""
    root = tmp_path_factory.mktemp("uploads")
    out = {}
    for i in range(3):
        out[f"heldout{i}"] = root / f"heldout{i}.png"
        render_sample(0, "heldout", i).image.save(out[f"heldout{i}"])
    rgb = np.asarray(render_sample(0, "heldout", 5).image)
    out["grey"] = root / "grey.png"
    Image.fromarray(rgb.mean(-1).astype(np.uint8), "L").save(out["grey"])
    out["rgba"] = root / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(out["rgba"])
    out["16bit"] = root / "16bit.png"
    Image.fromarray((rgb.mean(-1) * 257).astype(np.uint16)).save(out["16bit"])
    assert Image.open(out["16bit"]).mode.startswith("I;16")
    out["huge"] = root / "huge.png"
    Image.new("L", (10000, 10000), 200).save(out["huge"])
    out["text"] = root / "notes.txt"
    out["text"].write_text("not an image\n")
    return out


def last_answer(history: list[dict[str, Any]]) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content)
    return str(content)


# ------------------------------------------------------------------------------------------------------ each tab
def test_chat_streams_a_multi_turn_answer_and_clears(app: App, images: dict[str, Path]) -> None:
    from app.demo_checks import image as check_image

    client = app.new_client()
    job = client.submit(handle_file(images["heldout0"]), "What shape?", 6, 0.0, api_name="/chat")
    history, box = job.result(timeout=120)
    assert len(job.outputs()) >= 2  # the empty answer first, then the pieces: streamed
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
    answer = last_answer(history)
    model = app.models.mllm.get()
    pil, _ = check_image(images["heldout0"])
    expected = model.chat([pil], "<image>\nWhat shape?", max_new_tokens=6)
    assert answer and answer == expected  # the app's answer is the model's greedy answer to that image

    history, _ = client.predict(handle_file(images["heldout0"]), "And the colour?", 6, 0.0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2  # the same image: the conversation goes on
    follow_up = model.chat([pil], [{"role": "user", "content": "<image>\nWhat shape?"},
                                   {"role": "assistant", "content": expected},
                                   {"role": "user", "content": "And the colour?"}], max_new_tokens=6)
    assert last_answer(history) == (follow_up or "(no answer)")

    history, _ = client.predict(handle_file(images["heldout1"]), "What shape?", 6, 0.0, api_name="/chat")
    assert len(history) == 2  # another image starts a new conversation
    client.predict(api_name="/clear")
    history, _ = client.predict(handle_file(images["heldout1"]), "What shape?", 6, 0.7, api_name="/chat")
    assert len(history) == 2 and last_answer(history)  # sampled at temperature 0.7


def test_generate_returns_the_requested_images_zip_and_npz(app: App) -> None:
    from generator.sample import sample_images, to_uint8

    gallery, summary, zip_path, npz_path = app.client.predict("b", 3, 2.0, 1.0, 2, 5, api_name="/generate")
    assert len(gallery) == 3 and "3 x **b** (32x32 px)" in summary
    pixels = np.stack([np.asarray(Image.open(item["image"]["path"] if isinstance(item["image"], dict)
                                             else item["image"]).convert("RGB")) for item in gallery])
    assert pixels.shape == (3, 32, 32, 3)
    model, tokenizer = app.models.generator.get()
    expected = to_uint8(sample_images(model, tokenizer, [1, 1, 1], [5, 6, 7], cfg=2.0, temperature=1.0, steps=2))
    assert np.array_equal(pixels, expected)  # class "b" is id 1; sample j has seed 5 + j
    with np.load(npz_path) as data:
        assert np.array_equal(data["arr_0"], expected) and data["arr_1"].tolist() == [1, 1, 1]
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        assert names == ["b_grid.png", "b_seed5.png", "b_seed6.png", "b_seed7.png"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(zf.read("b_seed6.png")))), expected[1])
        assert Image.open(io.BytesIO(zf.read("b_grid.png"))).size == (3 * 34 + 2, 34 + 2)
    gallery, summary, _, _ = app.client.predict("e", 1, None, 0.5, 1, 0, api_name="/generate")
    assert len(gallery) == 1 and "CFG" in summary  # empty CFG: the checkpoint's default


def test_reconstruct_returns_input_reconstruction_psnr_and_token_map(app: App, images: dict[str, Path]) -> None:
    original, recon, token_map, summary, metrics = app.client.predict(handle_file(images["heldout2"]), 2,
                                                                      api_name="/reconstruct")
    a, b = np.asarray(Image.open(original).convert("RGB")), np.asarray(Image.open(recon).convert("RGB"))
    assert a.shape == b.shape == (32, 32, 3)  # resized and centre-cropped to the tiny tokenizer's 32 px
    tokenizer = app.models.tokenizer.get()
    batch = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
    expected = tokenizer.decode(tokenizer.encode(batch).latents, (4, 4), steps=2, sampler="euler", seed=0)
    assert metrics["psnr_db"] == pytest.approx(float(psnr(expected, batch)[0]), abs=0.05)
    assert metrics["latent_grid"] == [4, 4] and metrics["latent_channels"] == 16 and metrics["decoder_steps"] == 2
    assert f"PSNR {metrics['psnr_db']:.2f} dB" in summary and "4x4 tokens x 16 channels" in summary
    pca = np.asarray(Image.open(token_map).convert("RGB"))
    assert pca.shape == (32, 32, 3)
    cells = pca[::8, ::8].reshape(-1, 3)
    assert len({tuple(c) for c in cells}) > 4  # one colour per patch, and the patches differ
    assert (pca[:8, :8] == pca[0, 0]).all()  # a patch is one flat colour


def test_bfloat16_models_keep_the_generator_tokenizer_check(app: App, tmp_path: Path, images: dict[str, Path]) -> None:
    """--dtype bfloat16 (the default on a GPU): the generator still accepts its own tokenizer (whose fingerprint a
    bfloat16 copy would not match), and every tab answers."""
    from app.demo import Workdir, run_generate, run_reconstruct

    models = DemoModels(app.models.paths, torch.device("cpu"), torch.bfloat16)
    workdir = Workdir()
    try:
        gallery, summary, _, _ = run_generate(models, workdir, "c", 2, 2.0, 1.0, 2, 0)
        assert len(gallery) == 2 and "(32x32 px)" in summary
        assert models.tokenizer.get() is models.generator.get()[1]  # one copy serves both tabs
        assert next(models.tokenizer.get().parameters()).dtype == torch.bfloat16
        assert run_reconstruct(models, str(images["heldout0"]), 1)[-1]["latent_grid"] == [4, 4]
    finally:
        workdir.cleanup()


# ------------------------------------------------------------------------------------------------------ bad input
BAD = [
    ("/reconstruct", lambda im: (None, 1), r"^Upload: no image"),
    ("/reconstruct", lambda im: (handle_file(im["text"]), 1), r"notes\.txt is not an image this demo can read"),
    ("/reconstruct", lambda im: (handle_file(im["huge"]), 1), r"10000x10000 pixels .* over the demo's limit of 4096"),
    ("/reconstruct", lambda im: (handle_file(im["heldout0"]), 0), r"^Decoder steps: expected an integer from 1"),
    ("/reconstruct", lambda im: (handle_file(im["heldout0"]), "nan"), r"^Decoder steps: .*nan"),
    ("/generate", lambda im: ("b", 0, 2.0, 1.0, 2, 0), r"^Number of images: expected an integer from 1 to 64, got 0"),
    ("/generate", lambda im: ("b", 1000, 2.0, 1.0, 2, 0), r"^Number of images: .* got 1000"),
    ("/generate", lambda im: ("b", 2.5, 2.0, 1.0, 2, 0), r"^Number of images: .* got 2.5"),
    ("/generate", lambda im: ("b", 2, "nan", 1.0, 2, 0), r"^CFG scale: expected a finite number, got nan"),
    ("/generate", lambda im: ("b", 2, "inf", 1.0, 2, 0), r"^CFG scale: expected a finite number, got inf"),
    ("/generate", lambda im: ("b", 2, -1.0, 1.0, 2, 0), r"^CFG scale: expected a value in \[0, 20\], got -1"),
    ("/generate", lambda im: ("b", 2, 2.0, 0.0, 2, 0), r"^Temperature: expected a value in \(0, 5\]"),
    ("/generate", lambda im: ("b", 2, 2.0, 1.0, 0, 0), r"^Head steps: expected an integer"),
    ("/generate", lambda im: ("b", 2, 2.0, 1.0, 2, -3), r"^Seed: expected an integer"),
    ("/generate", lambda im: ("zebra", 2, 2.0, 1.0, 2, 0), r"^Class: 'zebra' is not a class of this generator"),
    ("/chat", lambda im: (handle_file(im["heldout0"]), "", 8, 0.0), r"^Question: empty"),
    ("/chat", lambda im: (handle_file(im["heldout0"]), "   \n ", 8, 0.0), r"^Question: empty"),
    ("/chat", lambda im: (handle_file(im["heldout0"]), "why? " * 1000, 8, 0.0),
     r"^Question: 4999 characters is over the limit of 1000"),
    ("/chat", lambda im: (None, "What shape?", 8, 0.0), r"^Image: no image"),
    ("/chat", lambda im: (handle_file(im["text"]), "What shape?", 8, 0.0), r"notes\.txt is not an image"),
    ("/chat", lambda im: (handle_file(im["heldout0"]), "What shape?", 0, 0.0), r"^Max new tokens: expected"),
    ("/chat", lambda im: (handle_file(im["heldout0"]), "What shape?", 8, "NaN"), r"^Temperature: .*nan"),
]


@pytest.mark.parametrize("endpoint,args,pattern", BAD, ids=[f"{e[1:]}-{i}" for i, (e, _, _) in enumerate(BAD)])
def test_bad_input_is_one_readable_message_and_the_app_keeps_serving(app: App, images: dict[str, Path],
                                                                      endpoint: str, args: Any, pattern: str) -> None:
    with pytest.raises(AppError) as err:
        app.client.predict(*args(images), api_name=endpoint)
    message = str(err.value)
    assert re.search(pattern, message), message
    assert "\n" not in message.strip() and "Traceback" not in message and len(message) < 400, message
    metrics = app.client.predict(handle_file(images["heldout0"]), 1, api_name="/reconstruct")[-1]
    assert metrics["latent_grid"] == [4, 4]  # still serving


@pytest.mark.parametrize("kind,note", [("grey", "L image converted to RGB"),
                                       ("rgba", "RGBA with transparency composited over white"),
                                       ("16bit", "16-bit grey (I;16) converted to 8-bit RGB")])
def test_grey_rgba_and_16_bit_uploads_are_converted(app: App, images: dict[str, Path], kind: str, note: str) -> None:
    original, _, _, summary, metrics = app.client.predict(handle_file(images[kind]), 1, api_name="/reconstruct")
    assert metrics["input_note"] == note and note in summary
    arr = np.asarray(Image.open(original))
    assert arr.shape == (32, 32, 3) and arr.std() > 5
    if kind != "rgba":  # grey in, grey out: the three channels agree
        assert np.abs(arr[..., 0].astype(int) - arr[..., 2]).max() <= 1
    history, _ = app.new_client().predict(handle_file(images[kind]), "What shape?", 4, 0.0, api_name="/chat")
    assert len(history) == 2


def test_a_missing_model_disables_its_tab_only(tmp_path: Path, images: dict[str, Path]) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle", parts=("generator",))  # no mllm/
    partial = App(bundle)
    try:
        with pytest.raises(AppError, match=r"no mllm model: .*mllm has no config\.json"):
            partial.client.predict(handle_file(images["heldout0"]), "What shape?", 4, 0.0, api_name="/chat")
        assert partial.client.predict(handle_file(images["heldout0"]), 1, api_name="/reconstruct")[-1]["psnr_db"]
        assert len(partial.client.predict("a", 1, None, 1.0, 1, 0, api_name="/generate")[0]) == 1
        assert not partial.models.mllm.available and partial.models.tokenizer.loaded
    finally:
        partial.close()


def test_eight_simultaneous_clients_on_mixed_tabs(app: App, images: dict[str, Path]) -> None:
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def one(i: int) -> None:
        try:
            client = app.new_client()
            if i % 3 == 0:
                results[i] = client.predict(handle_file(images["heldout1"]), "What shape?", 6, 0.0, api_name="/chat")
            elif i % 3 == 1:
                results[i] = client.predict("c", 2, 1.5, 1.0, 2, i, api_name="/generate")
            else:
                results[i] = client.predict(handle_file(images[f"heldout{i % 3}"]), 1, api_name="/reconstruct")
        except BaseException as exc:  # reported below
            errors[i] = exc

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    seconds = time.perf_counter() - start
    assert not errors, errors
    answers = {last_answer(results[i][0]) for i in (0, 3, 6)}
    assert len(answers) == 1 and answers.pop()  # the same greedy answer for every client
    assert all(len(results[i][0]) == 2 for i in (1, 4, 7))
    assert all(results[i][-1]["latent_grid"] == [4, 4] for i in (2, 5))
    print(f"8 simultaneous clients served in {seconds:.1f} s")


# ------------------------------------------------------------------------------------------------------ command line
def _one_error_line(capsys: pytest.CaptureFixture[str], code: int, pattern: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("args,pattern", [
    (["--tokenizer", "/no/such/folder"], r"--tokenizer: /no/such/folder is not a folder"),
    (["--bundle", "/no/such/bundle"], r"--bundle: /no/such/bundle is not a folder"),
    (["--bundle", "."], r"--bundle: \. holds none of tokenizer/, generator/, mllm/"),
    (["--port", "0"], r"--port"),
    (["--port", "70000"], r"--port"),
    (["--dtype", "int8"], r"--dtype"),
    (["--device", "tpu"], r"--device: .*expected auto, cpu, cuda"),
    (["--concurrency", "0"], r"--concurrency"),
])
def test_bad_options_are_one_line_before_anything_starts(capsys: pytest.CaptureFixture[str], args: list[str],
                                                         pattern: str) -> None:
    try:
        code = main(["demo", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    _one_error_line(capsys, code, pattern)


def test_a_port_in_use_is_one_line(app: App, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = int(app.url.rsplit(":", 1)[1])
    bundle = build_tiny_bundle(tmp_path / "b", parts=())
    code = main(["demo", "--bundle", str(bundle), "--port", str(port)])
    _one_error_line(capsys, code, rf"--port: cannot serve on 127\.0\.0\.1:{port}")


@pytest.mark.slow
def test_the_command_prints_its_url_and_serves(tmp_path: Path, images: dict[str, Path]) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle", parts=())
    port = free_port()
    env = launch_env(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "demo", "--bundle", str(bundle), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Running on"):
                break
        assert lines and lines[-1].strip() == f"Running on http://127.0.0.1:{port}", (lines, proc.poll())
        assert re.match(r"UniFlow demo on cpu \(float32\), started in \d+\.\d s", lines[-2]), lines
        metrics = Client(f"http://127.0.0.1:{port}", verbose=False).predict(
            handle_file(images["heldout0"]), 1, api_name="/reconstruct")[-1]
        assert metrics["latent_grid"] == [4, 4]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------------ the real bundle
@pytest.fixture(scope="module")
def bundle_app() -> Any:
    running = App(DEFAULT_BUNDLE)
    yield running
    running.close()


def test_real_bundle_reconstructs_a_heldout_image_at_29_db(bundle_app: App, images: dict[str, Path]) -> None:
    psnrs = []
    for i in range(3):
        metrics = bundle_app.client.predict(handle_file(images[f"heldout{i}"]), 1, api_name="/reconstruct")[-1]
        assert metrics["latent_grid"] == [8, 8] and metrics["image_size"] == 64
        psnrs.append(metrics["psnr_db"])
    assert min(psnrs) >= 29.0, psnrs


def test_real_bundle_chat_names_the_colour_and_shape(bundle_app: App, images: dict[str, Path]) -> None:
    for i in range(3):
        sample = render_sample(0, "heldout", i)
        client = bundle_app.new_client()
        job = client.submit(handle_file(images[f"heldout{i}"]), "What shape is the largest object?", 16, 0.0,
                            api_name="/chat")
        history, _ = job.result(timeout=300)
        assert sample.shape in last_answer(history).lower(), (i, sample.shape, history)
        history, _ = client.predict(handle_file(images[f"heldout{i}"]), "What colour is the largest object?", 16,
                                    0.0, api_name="/chat")
        assert len(history) == 4 and sample.colour in last_answer(history).lower(), (i, sample.colour, history)


def test_real_bundle_generates_images_of_a_named_class(bundle_app: App) -> None:
    from app.demo import class_names

    names = class_names(bundle_app.models)
    assert "red circle" in names
    gallery, summary, _, npz_path = bundle_app.client.predict("red circle", 4, None, 1.0, 8, 0, api_name="/generate")
    assert len(gallery) == 4 and "(64x64 px)" in summary
    with np.load(npz_path) as data:
        assert data["arr_0"].shape == (4, 64, 64, 3) and data["arr_1"].tolist() == [names.index("red circle")] * 4
