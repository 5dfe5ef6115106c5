"""`python -m train KIND ...`: the entry point launchers call (torchrun -m train, deepspeed --module)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from train.cli import add_kind_parsers


def main(argv: Sequence[str] | None = None) -> int:
    from uniflow.errors import run_command

    parser = argparse.ArgumentParser(prog="python -m train", description="Train UniFlow models on DeepSpeed.")
    add_kind_parsers(parser)
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
