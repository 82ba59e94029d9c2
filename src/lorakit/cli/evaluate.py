"""`lorakit eval`: score the base and an adapter on held-out pairs (key-fact accuracy, response perplexity)."""

from __future__ import annotations

import argparse
from typing import Any

from lorakit.cli.options import CliError, check_output_file, merge_options, positive_int, read_config_options
from lorakit.models import DEFAULT_BASE, DEVICE_HELP

EVAL_FIELDS = ("base", "adapter", "data", "query_field", "response_field", "system_prompt", "batch_size",
               "max_new_tokens", "exact_match", "include_base", "limit", "json_out", "bf16", "quantize", "device",
               "max_length")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML/JSON file of options (field or flag names, e.g. json, no-base); "
                                    "flags override it")
    p.add_argument("--base", default=S, help=f"base model (default: the one the adapter records when it is here, else "
                                             f"{DEFAULT_BASE})")
    p.add_argument("--adapter", default=S, help="adapter directory (or a full fine-tuned model directory)")
    p.add_argument("--data", default=S, help="held-out pairs: .jsonl, .csv or a datasets directory")
    p.add_argument("--json", dest="json_out", default=S, help="write the scores and every answer to this JSON file")
    p.add_argument("--query-field", dest="query_field", default=S, help="default: what the adapter trained with, or query")
    p.add_argument("--response-field", dest="response_field", default=S, help="default: as trained, or response")
    p.add_argument("--system-prompt", dest="system_prompt", default=S, help="default: as the adapter was trained")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=S,
                   help="generation batch size (default 16)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, default=S,
                   help="default: longest reference answer + 8 tokens")
    p.add_argument("--exact-match", dest="exact_match", action="store_true", default=S,
                   help="score whole-answer equality instead of key facts")
    p.add_argument("--no-base", dest="include_base", action="store_false", default=S, help="skip the base model")
    p.add_argument("--limit", type=positive_int, default=S, help="score only the first N rows (default: all)")
    p.add_argument("--max-length", dest="max_length", type=positive_int, default=S,
                   help="tokens per row for the perplexity pass; longer rows are cut (default 1024)")
    p.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast for generation and perplexity")
    p.add_argument("--quantize", choices=["nf4"], default=S,
                   help="score on the NF4-rounded base (default: what the adapter was trained on)")
    p.add_argument("--device", default=S, help=DEVICE_HELP)


def eval_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """evaluate()'s keyword arguments from its defaults < --config file < flags, checked before any loading."""
    from lorakit.adapter_folder import required_base

    file_values = read_config_options(args.config, add_eval_options) if getattr(args, "config", None) else {}
    opts = merge_options({}, file_values, args, EVAL_FIELDS)
    opts["base"] = required_base(opts.get("base"), [opts["adapter"]] if opts.get("adapter") else [], DEFAULT_BASE)
    if not opts.get("data"):
        raise CliError("no eval data: pass --data FILE")
    if opts.get("include_base") is False and not opts.get("adapter"):
        raise CliError("--no-base without --adapter leaves nothing to score: pass --adapter DIR, "
                       "or drop --no-base to score the base model")
    if opts.get("json_out"):
        check_output_file(opts["json_out"], "--json")
    return opts


def run(args: argparse.Namespace) -> int:
    from lorakit.evaluate import evaluate

    opts = eval_options_from_args(args)
    report = evaluate(**opts)
    print(report.table())
    if opts.get("json_out"):
        print(f"answers and scores written to {opts['json_out']}")
    print(report.summary())
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="score base vs adapter on held-out pairs (accuracy, perplexity)",
                       description="Answer accuracy (key facts) and response perplexity, base vs adapter.")
    add_eval_options(p)
    p.set_defaults(func=run)
