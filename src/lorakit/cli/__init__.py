"""The `lorakit` command. One module per group of subcommands, each a thin layer: its options, then one call
into the library (lorakit.train, lorakit.evaluate, lorakit.serve, ...)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lorakit.cli import adapters, compress, demo, doctor, evaluate, export, infer, plan, report, serve, train
from lorakit.cli.options import CliError

# In the order `lorakit --help` lists them.
COMMAND_MODULES = (plan, doctor, train, evaluate, infer, adapters, compress, export, serve, demo, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, evaluation and serving for open LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lorakit.errors import LoraKitError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (CliError, LoraKitError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
