"""Input checks of `uniflow demo`: every value a page (or an API client) sends is checked here before a model sees it,
and a bad one is a `UniFlowError` whose one line names the control as the page labels it, expected vs got.

No Gradio in this module: the app turns these errors into `gr.Error` messages (app/demo.py), and the same checks are
usable from plain Python.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from uniflow.configs import check_number
from uniflow.errors import ConfigError, ImageInputError

MAX_SIDE = 4096
DEMO_MAX_PIXELS = MAX_SIDE * MAX_SIDE  # far below the library's 64 MP: a shared page decodes uploads in memory
MAX_QUESTION_CHARS = 1000
MAX_IMAGES = 64
MAX_NEW_TOKENS = 512
MAX_DECODE_STEPS = 50
MAX_HEAD_STEPS = 100
MAX_CFG = 20.0
MAX_TEMPERATURE = 5.0
SEED_BOUND = 2**31  # what a page's number box carries exactly (JavaScript numbers are exact below 2**53)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _parse(value: Any) -> Any:
    """API clients may send numbers as text ("3", "nan"): parse it, so the range checks below judge the number."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def integer(label: str, value: Any, lo: int, hi: int) -> int:
    """`value` (an int, or a float with no fraction: what number widgets send) as an int in [lo, hi]."""
    value = _parse(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if value is None:
        raise ConfigError(f"{label}: no value; expected an integer from {lo} to {hi}")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{label}: expected an integer from {lo} to {hi}, got {value!r}")
    return value


def number(label: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] ((lo, hi] with lo_open); NaN, inf and None are refused naming `label`."""
    if value is None:
        raise ConfigError(f"{label}: no value; expected a number from {lo:g} to {hi:g}")
    value = _parse(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    check_number(label, value, lo, hi, lo_open=lo_open)
    return float(value)


def question(text: Any, limit: int = MAX_QUESTION_CHARS) -> str:
    """The user's question, stripped: empty and over-long questions are refused."""
    if text is None or not isinstance(text, str) or not text.strip():
        raise ConfigError("Question: empty; type a question about the image")
    text = text.strip()
    if len(text) > limit:
        raise ConfigError(f"Question: {len(text)} characters is over the limit of {limit}; ask something shorter")
    return text


def describe_mode(mode: str) -> str | None:
    """A note for the page when an upload's mode was converted to 8-bit RGB, None when it was RGB already."""
    if mode == "RGB":
        return None
    if mode in HIGH_BIT_MODES:
        return f"{'float' if mode == 'F' else '16-bit'} grey ({mode}) converted to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return f"{mode} with transparency composited over white"
    return f"{mode} image converted to RGB"


def image(path: Any, label: str = "Image", max_pixels: int = DEMO_MAX_PIXELS, size: int | None = None
          ) -> tuple[Image.Image, str | None]:
    """(RGB image, conversion note or None) of an uploaded file: missing uploads, files that are not images and
    images over `max_pixels` (from the header, before decoding) are refused; grey, palette, RGBA, 16-bit and float
    images are converted by `uniflow.images.open_image`. `size`: the side it will be resized to (bounds decoding)."""
    from uniflow.images import open_image

    if path is None or (isinstance(path, str) and not path.strip()):
        raise ImageInputError(f"{label}: no image; upload one or pick an example")
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ImageInputError(f"{label}: {name} was not received; upload it again")
    readable = "PNG, JPEG, WebP, BMP, GIF or TIFF"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            probe = Image.open(path)
        with probe:
            width, height = probe.size
            mode = probe.mode
    except Exception as exc:  # PIL raises many kinds for foreign files
        raise ImageInputError(f"{label}: {name} is not an image this demo can read ({readable}; "
                              f"{type(exc).__name__})") from None
    if width * height > max_pixels:
        side = int(math.isqrt(max_pixels))
        raise ImageInputError(f"{label}: {name} is {width}x{height} pixels ({width * height / 1e6:.1f} MP), over "
                              f"the demo's limit of {side}x{side} ({max_pixels / 1e6:.1f} MP); use a smaller image")
    try:
        rgb = open_image(path, max_pixels=max_pixels, size=size, name=f"{label} ({name})")
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError(f"{label}: {name} could not be decoded ({type(exc).__name__})") from None
    return rgb, describe_mode(mode)


def image_key(img: Image.Image) -> str:
    """A digest of an image's pixels: a chat follows one image, and a new image starts a new conversation."""
    return hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest()
