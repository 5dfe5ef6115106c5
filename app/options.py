"""Argument types and the parser class shared by the `uniflow` commands: every numeric option is range-checked once,
here, and a usage error is one line (`error: ...`, exit code 2) like every other error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from uniflow.configs import check_int, check_number
from uniflow.errors import ConfigError


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse `type` accepting integers in [lo, hi)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int("value", value, lo, hi)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` accepting finite numbers in [lo, hi] ((lo, ...] with lo_open; hi None: unbounded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            check_number("value", value, lo, hi, lo_open=lo_open)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None
        return value

    parse.__name__ = "number"
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error prints one `error:` line naming the command and flag, then exits 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
