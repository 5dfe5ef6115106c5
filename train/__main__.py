"""`python -m train {encoder,tokenizer} ...`: the entry point launchers call (torchrun -m train, deepspeed --module)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from train.cli import add_kind_parsers


def main(argv: Sequence[str] | None = None) -> int:
    from uniflow.errors import UniFlowError

    parser = argparse.ArgumentParser(prog="python -m train", description="Train UniFlow models on DeepSpeed.")
    add_kind_parsers(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UniFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
