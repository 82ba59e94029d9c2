"""`lorakit generate` (one answer) and `lorakit chat` (a conversation), with the base model or adapters."""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.options import CliError, positive_int
from lorakit.models import DEFAULT_BASE
from lorakit.precision import DTYPES
from lorakit.weight_only import DECODE_PRECISION_HELP, DECODE_PRECISIONS

BASE_HELP = f"base model (default: the one the adapter records when it is here, else {DEFAULT_BASE})"


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-prompt", dest="system_prompt", default=None, help="system message")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, default=256,
                   help="reply length cap (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the base weights, as `lorakit serve --dtype` (default %(default)s)")
    p.add_argument("--decode-precision", dest="decode_precision", choices=DECODE_PRECISIONS, default="auto",
                   help=DECODE_PRECISION_HELP)


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from lorakit import generation
    from lorakit.models import load_with_adapters
    from lorakit.weight_only import prepare_for_decode

    # `echo "q" | lorakit generate` adds a newline the user did not type, and the model would answer it differently
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n")
    if not prompt.strip():
        raise CliError("empty prompt: pass it as an argument or on stdin")
    model, tokenizer, _, _ = load_with_adapters(args.base, [args.adapter] if args.adapter else [],
                                                dtype=getattr(torch, args.dtype))
    prepare_for_decode(model, args.decode_precision)
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    torch.manual_seed(args.seed)
    print(generation.generate(model, tokenizer, [messages], **_sampling(args))[0])
    return 0


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from lorakit.chat import chat_loop
    from lorakit.models import load_with_adapters
    from lorakit.weight_only import prepare_for_decode

    model, tokenizer, names, base = load_with_adapters(args.base, args.adapter, dtype=getattr(torch, args.dtype))
    prepare_for_decode(model, args.decode_precision)
    torch.manual_seed(args.seed)
    chat_loop(model, tokenizer, names, base, args.system_prompt, **_sampling(args))
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt with the base model or an adapter")
    p.add_argument("prompt", nargs="?", help="the user message (read from stdin if omitted)")
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument("--adapter", help="adapter directory (omit for the base model)")
    add_sampling_options(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="interactive chat; switch adapters with /adapter NAME, /base")
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="load an adapter (repeatable; unnamed, it takes its folder's name); the first one is active")
    add_sampling_options(p)
    p.set_defaults(func=run_chat)
