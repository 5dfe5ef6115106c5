"""Errors users see. Each names the file, field or input at fault instead of surfacing a deep torch traceback."""

import sys
from collections.abc import Callable
from typing import Any


class UniFlowError(ValueError):
    """Base class for every error this project raises on bad input."""


class ConfigError(UniFlowError):
    """A config file or dict, a command-line option or a function argument has an unknown, missing or out-of-range
    value."""


class CheckpointError(UniFlowError):
    """A checkpoint folder is missing files, is truncated, holds non-finite weights, or does not match the model."""


class ImageInputError(UniFlowError):
    """An image cannot be used: unreadable file, too many pixels, wrong shape or dtype, non-finite values, size not
    divisible by the patch size."""


class OutputError(UniFlowError):
    """A destination cannot be written without losing something: it is a file, not writable, or holds data this
    writer did not produce (or did, and replacing it needs `overwrite`)."""


def one_line(text: str) -> str:
    """Messages are one line: embedded newlines (from library errors quoted in ours) become '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def run_command(func: Callable[[Any], Any], args: Any) -> int:
    """Run a CLI handler: a UniFlowError becomes one `error: ...` line on stderr and exit code 2, not a traceback;
    Ctrl-C becomes one line and exit code 130, SIGTERM exit code 143 (temporary files are removed either way)."""
    from uniflow.fileio import signals_as_exceptions

    try:
        with signals_as_exceptions():
            return int(func(args) or 0)
    except UniFlowError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (partial outputs were removed)", file=sys.stderr)
        return 130
