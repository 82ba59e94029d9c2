"""`lorakit compress`: an adapter truncated to a lower rank by SVD, saved as a PEFT-compatible adapter."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.options import positive_float, positive_int


def run(args: argparse.Namespace) -> int:
    from lorakit.compress import compare_accuracy, compress_adapter

    result = compress_adapter(args.run_dir, args.out, args.rank, args.energy, args.force)
    if args.eval_data:
        result = compare_accuracy(result, args.run_dir, args.eval_data, args.base, args.eval_batch_size,
                                  args.eval_limit, args.bf16)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0


def register(sub) -> None:
    p = sub.add_parser("compress", help="SVD-truncate an adapter to a lower rank (a smaller PEFT-compatible adapter)")
    p.add_argument("run_dir", help="the adapter folder (a run's --out)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, help="keep this many singular values in every layer")
    size.add_argument("--energy", type=positive_float,
                      help="keep, per layer, the fewest singular values holding this share of the energy (e.g. 0.99)")
    p.add_argument("--out", required=True, help="where to write the compressed adapter")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an adapter")
    p.add_argument("--eval-data", dest="eval_data", help="held-out pairs: score the original and the compressed adapter")
    p.add_argument("--base", default=None, help="base model for --eval-data (default: the one the adapter records)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=positive_int, default=16)
    p.add_argument("--eval-limit", dest="eval_limit", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help="score under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
