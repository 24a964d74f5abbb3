"""The `lorafx` command."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lorafx", description="Compiler-style LoRA/QLoRA for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fine-tune a built-in tiny model on a built-in text")
    demo.add_argument("--steps", type=_positive_int, default=200, help="training steps (default 200)")
    demo.add_argument("--out", default="out/demo", help="folder for the adapter (default out/demo)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as demo_module  # imports torch/transformers: keep --help fast

        result = demo_module.run(steps=args.steps, out=args.out)
        return 0 if result["losses"][-1] < result["losses"][0] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
