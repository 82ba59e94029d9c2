"""`lorakit merge` (an adapter merged into its base) and `lorakit inspect` (what an adapter folder holds)."""

from __future__ import annotations

import argparse
import json

from lorakit.models import DEFAULT_BASE


def run_merge(args: argparse.Namespace) -> int:
    from lorakit.export.merged import merge_to_directory

    base = merge_to_directory(args.adapter, args.out, args.base, args.force)
    print(f"merged {args.adapter} into {base}: standalone model saved to {args.out} "
          f"(load it with AutoModelForCausalLM.from_pretrained('{args.out}') or --base {args.out})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from lorakit.adapter_folder import human_bytes, inspect_adapter

    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = info["target_modules"]
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    variants = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA (alpha / sqrt(r))")) if info[key]]
    lines = [
        ("adapter", info["path"]),
        ("base model", info["base_model_name_or_path"]),
        ("type", f"{info['peft_type']} ({info['task_type']})"),
        ("rank r", info["r"]),
        ("lora_alpha", info["lora_alpha"]),
        *([("variants", ", ".join(variants))] if variants else []),
        ("dropout", info["lora_dropout"]),
        ("target modules", targets),
        ("adapted layers", info["adapted_modules"]),
        ("parameters", f"{info['parameters']:,d} in {info['tensors']} tensors"),
        ("weights size", f"{human_bytes(info['weights_bytes'])} ({info['weights_file'] or 'no weights file'})"),
        ("directory size", f"{human_bytes(info['directory_bytes'])} (all files, checkpoints included)"),
    ]
    if info["rank_pattern"]:
        lines.append(("rank pattern", info["rank_pattern"]))
    if "training" in info:
        t = info["training"]
        lines.append(("trained", f"{_count(t['steps'], 'step')} on {t['data']}, loss {t['first_loss']:.3f} -> "
                                 f"{t['final_loss']:.3f}" + (f", eval loss {t['eval_loss']:.3f}"
                                                              if t.get("eval_loss") is not None else "")))
        if t.get("quantize"):
            lines.append(("QLoRA", f"trained on the {t['quantize']}-rounded base; eval, generate, chat, merge and "
                                   "serve use that base too"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base: a standalone transformers model directory")
    p.add_argument("--base", default=None,
                   help=f"base model (default: the one the adapter records when it is here, else {DEFAULT_BASE})")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_merge)

    p = sub.add_parser("inspect", help="show an adapter's config, targets, rank, parameter count and size")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_inspect)
