"""`uniflow demo`: a Gradio page with three tabs over one tokenizer, one generator and one MLLM.

    uniflow demo                                   # the bundled ShapeWorld models, http://127.0.0.1:7860
    uniflow demo --bundle DIR [--host 0.0.0.0 --port 8080 --device auto --dtype auto]
    uniflow demo --tokenizer DIR --generator DIR --mllm DIR

- Chat: an uploaded image (or a held-out ShapeWorld example), multi-turn questions, streamed answers
  (`mllm.UniFlowChat.chat(stream=True)`); a new image starts a new conversation.
- Generate: class, count, CFG, temperature, flow-head steps, seed -> the images, a zip of the PNGs (and the grid),
  and the ADM evaluator's npz (`generator.sample`).
- Reconstruct: the upload resized and centre-cropped to the tokenizer's native size, its reconstruction, PSNR/SSIM
  (`uniflow.metrics`), the latent grid, and a PCA colour map of the encoder's patch tokens (what the MLLM reads).

Every request is checked (`app/demo_checks.py`); a bad one gets a one-line message in the page (a `gr.Error`), never a
traceback, and the app keeps serving. Models load lazily per tab and stay in memory (`app/demo_models.py`); the queue
runs at most `--concurrency` requests at once. The page binds to 127.0.0.1 unless --host says otherwise, and is never
shared through Gradio's tunnel.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import demo_checks as checks
from app.options import int_range

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

NUM_EXAMPLES = 6
KEEP_REQUEST_DIRS = 64
CSS = (".pixelated img { image-rendering: pixelated; }\n"  # 64-px images shown large stay crisp
       "#chat-image img, #rec-image img, #rec-original img, #rec-recon img, #rec-tokens img "
       "{ width: 100%; height: 100%; object-fit: contain; }")


# ------------------------------------------------------------------------------------------------------ plumbing
def readable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors of a handler as one readable line in the page: a UniFlowError's own message, anything else a short
    'internal error' line (its traceback goes to the server log only). Works on plain and generator handlers."""
    import gradio as gr

    from uniflow.errors import UniFlowError, one_line

    def translate(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, UniFlowError):
            return gr.Error(one_line(str(exc)), print_exception=False)
        traceback.print_exc(file=sys.stderr)
        return gr.Error(f"internal error ({type(exc).__name__}: {one_line(str(exc))[:200]}); the demo keeps "
                        f"running, the server log has the details", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise translate(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise translate(exc) from None

    return wrapper


class Workdir:
    """The demo's own temporary folder: the example images, and one folder per Generate request (the newest
    KEEP_REQUEST_DIRS are kept; Gradio serves copies from its cache). Removed when the demo stops."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="uniflow-demo-"))
        self._lock = threading.Lock()
        self._count = 0

    def request_dir(self) -> Path:
        with self._lock:
            self._count += 1
            folder = self.root / "requests" / f"{self._count:08d}"
            folder.mkdir(parents=True)
            old = sorted((self.root / "requests").iterdir())[:-KEEP_REQUEST_DIRS]
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_examples(folder: Path, count: int = NUM_EXAMPLES) -> list[tuple[Path, str]]:
    """Held-out ShapeWorld images (never seen in training) as PNGs, each with its first question."""
    from uniflow.data import render_sample

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        sample = render_sample(0, "heldout", i)
        path = folder / f"heldout_{i}.png"
        sample.image.save(path)
        out.append((path, sample.qa[i % 2]["question"]))
    return out


def token_pca_map(tokens: Any, grid: tuple[int, int], patch: int) -> Any:
    """(N, D) patch tokens -> an RGB picture (grid * patch pixels): the first three principal components of the
    tokens as red, green and blue, each stretched to its 1st-99th percentile. Patches the encoder sees alike get
    alike colours."""
    import numpy as np
    import torch
    from PIL import Image

    x = tokens.detach().float().cpu()
    x = x - x.mean(0, keepdim=True)
    if x.shape[0] >= 2 and float(x.abs().max()) > 0:
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        comps = x @ v[:3].T
    else:
        comps = torch.zeros(x.shape[0], 0)
    if comps.shape[1] < 3:
        comps = torch.cat([comps, torch.zeros(x.shape[0], 3 - comps.shape[1])], 1)
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))  # a fixed sign per component
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    arr = (comps.reshape(grid[0], grid[1], 3).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((grid[1] * patch, grid[0] * patch), Image.NEAREST)


def _display_history(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    from mllm.prompting import IMAGE_PLACEHOLDER

    return [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, "").strip()} for m in messages]


class ImageUpload:
    """`gr.Image` that hands the handler the uploaded file's path untouched: Gradio's own preprocessing would open
    (and, for some modes, decode) the file before our checks, with its own unreadable errors. The instance's
    `preprocess` is replaced rather than subclassed: Gradio writes a `.pyi` stub beside any module that defines a
    component class."""

    @staticmethod
    def make(**kwargs: Any) -> Any:
        import gradio as gr

        component = gr.Image(type="filepath", **kwargs)
        original = component.preprocess

        def preprocess(payload: Any) -> Any:
            if payload is None:
                return None
            path = getattr(payload, "path", None)
            if path:
                return str(path)
            try:
                return original(payload)
            except Exception as exc:
                raise gr.Error(f"{kwargs.get('label', 'Image')}: the upload is not an image this demo can read "
                               f"({type(exc).__name__})", print_exception=False) from None

        component.preprocess = preprocess
        return component


class RawSlider:
    """`gr.Slider` whose value reaches the handler unchecked, so the handler's own check names the control (Gradio's
    would answer NaN with a traceback). Its instance's `preprocess` is replaced, as in `ImageUpload`."""

    @staticmethod
    def make(**kwargs: Any) -> Any:
        import gradio as gr

        component = gr.Slider(**kwargs)
        component.preprocess = lambda payload: payload
        return component


def _unavailable(model: Any) -> str:
    reason = model.reason
    return f"**This tab is unavailable:** {reason}" if reason else ""


# ------------------------------------------------------------------------------------------------------ the app
def build_demo(models: Any, workdir: Workdir, concurrency: int = 2) -> Any:
    """The Gradio Blocks app over `models` (`app.demo_models.DemoModels`); queue on, `concurrency` at once."""
    import gradio as gr

    examples = write_examples(workdir.root / "examples")
    with gr.Blocks(title="UniFlow demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# UniFlow\nOne tokenizer for understanding and generation: chat about an image, generate "
                    "images of a class, and watch the tokenizer reconstruct an image from its 64-d latents.")
        # -------------------------------------------------------------------------------------- Chat
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat_note = gr.Markdown(_unavailable(models.mllm))
            with gr.Row():
                with gr.Column(scale=1):
                    chat_image = ImageUpload.make(label="Image", height=256, elem_classes=["pixelated"],
                                                  elem_id="chat-image")
                    with gr.Accordion("Generation settings", open=False):
                        max_tokens = RawSlider.make(minimum=1, maximum=checks.MAX_NEW_TOKENS, value=64, step=1,
                                                    label="Max new tokens")
                        chat_temperature = RawSlider.make(minimum=0.0, maximum=2.0, value=0.0, step=0.05,
                                                          label="Temperature (0: greedy)")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
                    question = gr.Textbox(label="Question", placeholder="What shape is the largest object?",
                                          lines=1, max_lines=4, elem_id="chat-question")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                        clear = gr.Button("Clear", elem_id="chat-clear")
            gr.Examples([[str(p), q] for p, q in examples], inputs=[chat_image, question],
                        label="Held-out ShapeWorld images")
            conversation = gr.State(None)

            @readable
            def chat(image: Any, text: Any, state: Any, tokens: Any, temperature: Any) -> Any:
                from app.chat_cli import first_turn

                text = checks.question(text)
                tokens = checks.integer("Max new tokens", tokens, 1, checks.MAX_NEW_TOKENS)
                temperature = checks.number("Temperature", temperature, 0.0, 2.0)
                pil, _ = checks.image(image, "Image")
                model = models.mllm.get()
                key = checks.image_key(pil)
                earlier = state["messages"] if state and state.get("key") == key else []
                messages = [*earlier, {"role": "user", "content": first_turn(text, 1) if not earlier else text}]
                stream = model.chat([pil], messages, stream=True, max_new_tokens=tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else 1.0)
                shown = _display_history(messages)
                answer = ""
                yield [*shown, {"role": "assistant", "content": ""}], {"key": key, "messages": earlier}, ""
                for piece in stream:
                    answer += piece
                    yield [*shown, {"role": "assistant", "content": answer}], {"key": key, "messages": earlier}, ""
                answer = answer.strip() or "(no answer)"
                messages.append({"role": "assistant", "content": answer})
                yield _display_history(messages), {"key": key, "messages": messages}, ""

            chat_inputs = [chat_image, question, conversation, max_tokens, chat_temperature]
            chat_outputs = [chatbot, conversation, question]
            ask.click(chat, chat_inputs, chat_outputs, api_name="chat")
            question.submit(chat, chat_inputs, chat_outputs, api_name=False)
            clear.click(lambda: ([], None, ""), None, chat_outputs, api_name="clear", queue=False)
            chat_image.change(lambda: ([], None), None, [chatbot, conversation], api_name=False, queue=False)

        # -------------------------------------------------------------------------------------- Generate
        with gr.Tab("Generate", id="generate") as gen_tab:
            gen_note = gr.Markdown(_unavailable(models.generator))
            names = class_names(models)
            defaults = generator_defaults(models)
            with gr.Row():
                with gr.Column(scale=1):
                    gen_class = gr.Dropdown(choices=names, value=names[0] if names else None, label="Class",
                                            allow_custom_value=True)
                    count = RawSlider.make(minimum=1, maximum=checks.MAX_IMAGES, value=8, step=1,
                                           label="Number of images")
                    cfg = gr.Number(value=defaults["cfg"], label="CFG scale (1: no guidance)")
                    gen_temperature = RawSlider.make(minimum=0.05, maximum=checks.MAX_TEMPERATURE,
                                                     value=defaults["temperature"], step=0.05, label="Temperature")
                    head_steps = RawSlider.make(minimum=1, maximum=checks.MAX_HEAD_STEPS, value=defaults["steps"],
                                                step=1, label="Head steps")
                    seed = gr.Number(value=0, precision=None, label="Seed")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Samples", columns=8, height=420, elem_classes=["pixelated"],
                                         elem_id="gen-gallery")
                    gen_summary = gr.Markdown(elem_id="gen-summary")
                    with gr.Row():
                        png_zip = gr.File(label="PNGs (zip, with the grid)")
                        npz_file = gr.File(label="npz (ADM format: arr_0 uint8 images, arr_1 labels)")

            @readable
            def generate(name: Any, n: Any, scale: Any, temperature: Any, steps: Any, seed_value: Any) -> Any:
                return run_generate(models, workdir, name, n, scale, temperature, steps, seed_value)

            generate_button.click(generate, [gen_class, count, cfg, gen_temperature, head_steps, seed],
                                  [gallery, gen_summary, png_zip, npz_file], api_name="generate")

        # -------------------------------------------------------------------------------------- Reconstruct
        with gr.Tab("Reconstruct", id="reconstruct") as rec_tab:
            rec_note = gr.Markdown(_unavailable(models.tokenizer))
            with gr.Row():
                rec_image = ImageUpload.make(label="Upload", height=256, elem_classes=["pixelated"],
                                             elem_id="rec-image")
                with gr.Column():
                    decode_steps = RawSlider.make(minimum=1, maximum=checks.MAX_DECODE_STEPS, value=1, step=1,
                                                  label="Decoder steps (Euler)")
                    rec_button = gr.Button("Reconstruct", variant="primary", elem_id="rec-button")
            with gr.Row():
                original = gr.Image(label="Input (resized to the tokenizer's size)", height=256, format="png",
                                    elem_classes=["pixelated"], interactive=False, elem_id="rec-original")
                recon = gr.Image(label="Reconstruction", height=256, format="png", elem_classes=["pixelated"],
                                 interactive=False, elem_id="rec-recon")
                token_map = gr.Image(label="Semantic tokens (PCA of the encoder's patch tokens)", height=256,
                                     format="png", elem_classes=["pixelated"], interactive=False, elem_id="rec-tokens")
            rec_summary = gr.Markdown(elem_id="rec-summary")
            with gr.Accordion("Measurements (JSON)", open=False):
                rec_metrics = gr.JSON(label="Measurements")
            gr.Examples([[str(p)] for p, _ in examples], inputs=[rec_image], label="Held-out ShapeWorld images")

            @readable
            def reconstruct(image: Any, steps: Any) -> Any:
                return run_reconstruct(models, image, steps)

            rec_button.click(reconstruct, [rec_image, decode_steps],
                             [original, recon, token_map, rec_summary, rec_metrics], api_name="reconstruct")

        # Opening a tab loads its model (the Chat tab's when the page opens), so the first request is quick.
        for tab, model, note in ((chat_tab, models.mllm, chat_note), (gen_tab, models.generator, gen_note),
                                 (rec_tab, models.tokenizer, rec_note)):
            tab.select(functools.partial(warm_up, model), None, note, api_name=False, show_progress="hidden")
        demo.load(functools.partial(warm_up, models.mllm), None, chat_note, api_name=False, show_progress="hidden")
    demo.queue(default_concurrency_limit=concurrency, max_size=256)
    return demo


def warm_up(model: Any) -> str:
    """Load a tab's model when the tab opens; the tab's note says why when it cannot."""
    from uniflow.errors import UniFlowError, one_line

    try:
        model.get()
    except UniFlowError as exc:
        return f"**This tab is unavailable:** {one_line(str(exc))}"
    return ""


def generator_defaults(models: Any) -> dict[str, float]:
    """The generator checkpoint's own sampling defaults (CFG, temperature, head steps) for the controls' initial
    values, from its config alone; the generic defaults when there is no generator."""
    from generator.model import GeneratorConfig
    from uniflow.checkpoint import read_config

    config = GeneratorConfig()
    if models.generator.missing is None:
        with contextlib.suppress(Exception):  # the tab reports a broken folder when it loads it
            config = GeneratorConfig.from_dict(read_config(models.paths.generator))
    return {"cfg": config.cfg_scale, "temperature": config.temperature, "steps": config.flow.sample_steps}


def class_names(models: Any) -> list[str]:
    """The generator's class names from its config (no weights loaded); "class K" for a generator without names."""
    from uniflow.checkpoint import read_config

    if models.generator.missing is not None:
        return []
    try:
        config = read_config(models.paths.generator)
    except Exception:
        return []
    names = config.get("class_names")
    return list(names) if names else [f"class {k}" for k in range(int(config.get("num_classes", 0)))]


def run_generate(models: Any, workdir: Workdir, name: Any, n: Any, scale: Any, temperature: Any, steps: Any,
                 seed_value: Any) -> tuple[list[tuple[str, str]], str, str, str]:
    """The Generate tab: checked options -> (gallery items, summary, zip path, npz path)."""
    import numpy as np
    import torch
    from PIL import Image

    from generator.sample import image_grid, resolve_options, sample_images, to_uint8
    from uniflow.errors import ConfigError

    n = checks.integer("Number of images", n, 1, checks.MAX_IMAGES)
    cfg = None if scale is None else checks.number("CFG scale", scale, 0.0, checks.MAX_CFG)
    temperature = checks.number("Temperature", temperature, 0.0, checks.MAX_TEMPERATURE, lo_open=True)
    steps = checks.integer("Head steps", steps, 1, checks.MAX_HEAD_STEPS)
    seed = checks.integer("Seed", seed_value, 0, checks.SEED_BOUND - 1)
    names = class_names(models)
    model, tokenizer = models.generator.get()
    if not isinstance(name, str) or name not in names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ConfigError(f"Class: {name!r} is not a class of this generator; pick one of {shown}")
    label = names.index(name)
    opts = resolve_options(model.config, cfg, None, temperature, steps, None)
    start = time.perf_counter()
    chunks = []
    for lo in range(0, n, 16):
        hi = min(lo + 16, n)
        chunks.append(sample_images(model, tokenizer, [label] * (hi - lo), [seed + j for j in range(lo, hi)],
                                    check_tokenizer=False, **opts))
    images = torch.cat(chunks)
    seconds = time.perf_counter() - start
    folder = workdir.request_dir()
    safe = "".join(c if c.isalnum() else "_" for c in name)
    pngs = []
    for j, arr in enumerate(to_uint8(images)):
        path = folder / f"{safe}_seed{seed + j}.png"
        Image.fromarray(arr).save(path)
        pngs.append(path)
    grid = folder / f"{safe}_grid.png"
    image_grid(images, columns=min(n, 8)).save(grid)
    zip_path = folder / f"{safe}_{n}_samples.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in [*pngs, grid]:
            zf.write(path, path.name)
    npz_path = folder / f"{safe}_{n}_samples.npz"
    with open(npz_path, "wb") as fh:
        np.savez(fh, arr_0=to_uint8(images), arr_1=np.full(n, label, dtype=np.int64))
    h, w = images.shape[-2:]
    summary = (f"{n} x **{name}** ({w}x{h} px) in {seconds:.1f} s · CFG {opts['cfg']:g} ({opts['cfg_schedule']}), "
               f"temperature {opts['temperature']:g}, {opts['steps']} head step(s), seeds {seed}-{seed + n - 1}")
    return [(str(p), f"seed {seed + j}") for j, p in enumerate(pngs)], summary, str(zip_path), str(npz_path)


def run_reconstruct(models: Any, image: Any, steps: Any) -> tuple[Any, Any, Any, str, dict[str, Any]]:
    """The Reconstruct tab: an upload -> (input at the native size, reconstruction, token map, summary, metrics)."""
    import torch

    from uniflow.images import to_batch, to_pil
    from uniflow.metrics import psnr, ssim

    steps = checks.integer("Decoder steps", steps, 1, checks.MAX_DECODE_STEPS)
    tokenizer = models.tokenizer.get()
    size = tokenizer.config.encoder.image_size
    pil, note = checks.image(image, "Upload", size=size)
    batch = to_batch(pil, size=size)
    start = time.perf_counter()
    with torch.no_grad():
        encoded = tokenizer.encode(batch)
        out = tokenizer.decode(encoded.latents, encoded.grid, steps=steps, sampler="euler", seed=0).float().cpu()
    seconds = time.perf_counter() - start
    p = float(psnr(out, batch)[0])
    s = float(ssim(out, batch)[0]) if min(batch.shape[-2:]) >= 11 else None
    grid = tuple(encoded.grid)
    channels = int(encoded.latents.shape[-1])
    patch = tokenizer.encoder.patch_size
    pca = token_pca_map(encoded.semantic_tokens[0], grid, patch)
    ssim_text = f"{s:.4f}" if s is not None else "n/a (image under 11 px)"
    summary = (f"**PSNR {p:.2f} dB**, SSIM {ssim_text} · latent grid {grid[0]}x{grid[1]} tokens x {channels} "
               f"channels for a {size}x{size} image · {steps} decoder step(s), {seconds * 1000:.0f} ms"
               + (f" · input: {note}" if note else ""))
    metrics = {"psnr_db": round(p, 3), "ssim": None if s is None else round(s, 4), "latent_grid": list(grid),
               "latent_channels": channels, "image_size": size, "decoder_steps": steps,
               "semantic_token_width": int(encoded.semantic_tokens.shape[-1]), "input_note": note}
    return to_pil(batch)[0], to_pil(out)[0], pca, summary, metrics


# ------------------------------------------------------------------------------------------------------ launching
def launch(models: Any, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 2
           ) -> tuple[Any, Workdir, str]:
    """Build and start the app in the background; returns (the Blocks app, its workdir, its URL). The caller waits
    (`demo.block_thread()`, as the command does) or not (tests), then closes the app and cleans the workdir."""
    from uniflow.errors import ConfigError

    workdir = Workdir()
    try:
        demo = build_demo(models, workdir, concurrency)
        try:
            demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                        show_error=True, allowed_paths=[str(workdir.root)], max_file_size="64mb", css=CSS)
        except OSError as exc:
            raise ConfigError(f"--port: cannot serve on {host}:{port} ({exc}); pick another --port") from None
    except BaseException:
        workdir.cleanup()
        raise
    url = f"http://{host}:{demo.server_port}"
    return demo, workdir, url


def _cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from app.demo_models import DemoModels, resolve_dtype, resolve_paths
    from uniflow.devices import resolve_device
    from uniflow.errors import ConfigError

    paths = resolve_paths(args.bundle, args.tokenizer, args.generator, args.mllm)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("the demo needs Gradio: pip install 'gradio>=6' (or `make demo`, which installs it)") \
            from None
    models = DemoModels(paths, device, dtype)
    for part, state in models.status().items():
        if state != "not loaded yet":
            print(f"note: {part}: {state}", file=sys.stderr)
    demo, workdir, url = launch(models, args.host, args.port, args.concurrency)
    try:
        print(f"UniFlow demo on {device} ({str(dtype).removeprefix('torch.')}), started in "
              f"{time.perf_counter() - start:.1f} s; models load when their tab is first used", flush=True)
        print(f"Running on {url}", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {args.host} serves the demo to other machines", file=sys.stderr)
        demo.block_thread()
    finally:
        demo.close()
        workdir.cleanup()
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `demo` on the `uniflow` subparsers object."""
    p = subparsers.add_parser(
        "demo", help="a local web page: chat about images, generate images, watch the tokenizer reconstruct",
        description="Start the Gradio demo (Chat, Generate, Reconstruct tabs) on 127.0.0.1. With no folder flag it "
        "serves the bundled ShapeWorld models (checkpoints/shapeworld); --tokenizer/--generator/--mllm replace single "
        "parts. A missing part disables its tab only. Models load when their tab is first used.")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="a bundle folder with tokenizer/, generator/, mllm/ (default: checkpoints/shapeworld)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (Reconstruct)")
    p.add_argument("--generator", default=None, metavar="DIR",
                   help="generator folder (Generate; decodes with tokenizer/ beside it when present)")
    p.add_argument("--mllm", default=None, metavar="DIR", help="MLLM folder (Chat)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(1, 65536), default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--concurrency", type=int_range(1, 65), default=2, metavar="N",
                   help="requests served at once; the rest wait in the queue (default 2)")
    p.set_defaults(func=_cmd_demo)
    return p
