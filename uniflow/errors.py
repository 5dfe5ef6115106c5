"""Errors users see. Each names the file, field or input at fault instead of surfacing a deep torch traceback."""

import sys
from collections.abc import Callable
from typing import Any


class UniFlowError(ValueError):
    """Base class for every error this project raises on bad input."""


class ConfigError(UniFlowError):
    """A config file or dict has an unknown field, a missing field or a value of the wrong kind."""


class CheckpointError(UniFlowError):
    """A checkpoint folder is missing files, is truncated, or does not match the model."""


class ImageInputError(UniFlowError):
    """An image cannot be used: unreadable file, wrong shape or dtype, size not divisible by the patch size."""


def run_command(func: Callable[[Any], Any], args: Any) -> int:
    """Run a CLI handler: a UniFlowError becomes one `error: ...` line on stderr and exit code 2, not a traceback."""
    try:
        return int(func(args) or 0)
    except UniFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
