"""`uniflow chat`: talk about images with an MLLM folder (default: the bundled ShapeWorld MLLM).

    uniflow chat --image shape.png --prompt "What shape is the largest object?"   # one answer, streamed
    uniflow chat --image shape.png                                                # interactive, multi-turn

The images go with the first user turn: one `<image>` placeholder per image is put before the text, unless the text
already holds as many placeholders as there are images. Options, image files and the folder are checked before the
model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.options import int_range

DEFAULT_MLLM = "checkpoints/shapeworld/mllm"
EXIT_WORDS = ("/exit", "/quit")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _top_p(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a value in (0, 1], got {text!r}")
    return value


def first_turn(prompt: str, num_images: int) -> str:
    """The first user message: one placeholder per image before the text, unless the text already has them all."""
    from mllm.prompting import IMAGE_PLACEHOLDER

    if num_images and prompt.count(IMAGE_PLACEHOLDER) == num_images:
        return prompt
    return IMAGE_PLACEHOLDER * num_images + ("\n" if num_images else "") + prompt


def _check(args: argparse.Namespace) -> None:
    from uniflow.checkpoint import CONFIG_NAME
    from uniflow.errors import CheckpointError, ConfigError
    from uniflow.images import probe_image

    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt: empty prompt; ask something, or leave --prompt out for an interactive session")
    for image in args.image:
        path = Path(image)
        if not path.is_file():
            raise ConfigError(f"--image: {image}: image file not found" + (" (it is a folder)" if path.is_dir()
                                                                           else ""))
        probe_image(path)
    folder = Path(args.mllm)
    if not (folder / CONFIG_NAME).is_file():
        hint = " (train it: see docs/mllm.md, `make checkpoints`)" if args.mllm == DEFAULT_MLLM else ""
        raise CheckpointError(f"--mllm: {folder} is not an MLLM folder (no {CONFIG_NAME}){hint}")


def _reply(model: Any, images: list[str], messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature is not None,
               "temperature": args.temperature or 1.0, "top_p": args.top_p, "seed": args.seed}
    if args.no_stream:
        text = model.chat(images, messages, **options)
        print(text, flush=True)
        return text
    pieces = []
    for piece in model.chat(images, messages, stream=True, **options):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces).strip()


def _cmd_chat(args: argparse.Namespace) -> int:
    _check(args)
    from mllm.model import UniFlowChat

    model = UniFlowChat.from_pretrained(args.mllm)
    images = list(args.image)
    if args.prompt is not None:
        _reply(model, images, [{"role": "user", "content": first_turn(args.prompt, len(images))}], args)
        return 0
    print(f"chatting about {len(images)} image(s); an empty line does nothing, {' or '.join(EXIT_WORDS)} or "
          f"Ctrl-D ends", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        content = first_turn(text, len(images)) if not messages else text
        messages.append({"role": "user", "content": content})
        print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": _reply(model, images, messages, args) or "..."})


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `chat` on an argparse subparsers object (wired as `uniflow chat`)."""
    p = subparsers.add_parser(
        "chat", help="chat about images with an MLLM (streams the answer; interactive without --prompt)",
        description="Ask an MLLM about images. With --prompt: one answer, streamed to the terminal. Without: an "
        "interactive multi-turn session on stdin (/exit, /quit or Ctrl-D to end). The images go with the first "
        "turn (one <image> placeholder each, added before the text). Greedy decoding unless --temperature is given.")
    p.add_argument("--image", action="append", default=[], metavar="IMG", help="an image file (repeat for several)")
    p.add_argument("--prompt", default=None, help="the question; leave out for an interactive session")
    p.add_argument("--mllm", default=DEFAULT_MLLM, metavar="DIR",
                   help=f"MLLM folder (default: {DEFAULT_MLLM}, the bundled ShapeWorld model)")
    p.add_argument("--max-new-tokens", type=int_range(1, 4097), default=128, metavar="N",
                   help="answer length limit in tokens, 1 to 4096 (default 128)")
    p.add_argument("--temperature", type=_positive_float, default=None, metavar="T",
                   help="sample at this temperature (default: greedy decoding)")
    p.add_argument("--top-p", type=_top_p, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int_range(0, 2**63), default=None, metavar="S", help="seed of the sampling")
    p.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    p.set_defaults(func=_cmd_chat)
    return p
