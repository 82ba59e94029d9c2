"""`lorakit demo`: the whole path on the embedded model, from a fresh clone."""

from __future__ import annotations

import argparse

from lorakit.cli.options import positive_int
from lorakit.models import DEFAULT_BASE


def run(args: argparse.Namespace) -> int:
    from lorakit.demo import run_demo

    run_demo(args.out, args.base, args.epochs, args.max_steps, args.quantize, args.eval_batch_size, args.eval_limit)
    return 0


def register(sub) -> None:
    from lorakit.demo import DEMO_OUT, demo_config

    p = sub.add_parser("demo", help="fine-tune SmolLM2 on the demo support data, then show base vs adapter accuracy")
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default {DEMO_OUT}); an earlier demo's output "
                                                   "there is replaced, any other non-empty directory refused")
    p.add_argument("--base", default=DEFAULT_BASE, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=positive_int, default=None, help=f"override the demo's number of epochs (default {demo_config().epochs})")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=positive_int, default=32,
                   help="generation batch size (default %(default)s)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: train on a 4-bit NF4 base")
    # quick checks
    p.add_argument("--max-steps", dest="max_steps", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-limit", dest="eval_limit", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
