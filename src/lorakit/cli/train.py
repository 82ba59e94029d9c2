"""`lorakit train`: fine-tune on (query, response) pairs; the flags map onto TrainConfig (and its LoraConfig)."""

from __future__ import annotations

import argparse
import dataclasses

from lorakit.cli.options import (CliError, comma_list, fraction, merge_options, non_negative_float, non_negative_int,
                                 positive_float, positive_int, read_config_options)
from lorakit.models import DEFAULT_BASE, DEVICE_HELP

# Flags that set the adapter (TrainConfig.lora) and the LoraConfig field each one sets.
LORA_FLAGS = {"r": "r", "alpha": "lora_alpha", "targets": "target_modules", "dropout": "lora_dropout",
              "dora": "use_dora", "rslora": "use_rslora"}


QUANTIZE_HELP = "QLoRA: keep the frozen base in 4-bit NF4"


def add_lora_options(g) -> None:
    """The adapter's flags, shared by `lorakit train` and `lorakit plan` (an absent flag stays absent)."""
    from lorakit.train_config import lora_recipe

    lora, S = lora_recipe(), argparse.SUPPRESS
    # --lora-r: torchrun's own parser takes a bare --r for an abbreviation of its options and stops.
    g.add_argument("--r", "--lora-r", dest="r", type=positive_int, default=S, help=f"rank (default {lora.r})")
    g.add_argument("--alpha", type=positive_float, default=S, help=f"lora_alpha (default {lora.lora_alpha:g})")
    g.add_argument("--targets", type=comma_list, default=S,
                   help=f"comma-separated module names, or all-linear (default {','.join(lora.target_modules)})")
    g.add_argument("--dropout", type=fraction, default=S, help=f"LoRA dropout (default {lora.lora_dropout})")


def add_batch_options(g) -> None:
    """--batch-size and --grad-accum, shared by `lorakit train` and `lorakit plan`."""
    from lorakit.train_config import TrainConfig

    run, S = TrainConfig(data="-"), argparse.SUPPRESS
    g.add_argument("--batch-size", dest="batch_size", type=positive_int, default=S,
                   help=f"examples per micro-batch (default {run.batch_size})")
    g.add_argument("--grad-accum", dest="grad_accum", type=positive_int, default=S,
                   help=f"micro-batches per step (default {run.grad_accum})")


def add_train_options(p: argparse.ArgumentParser) -> None:
    from lorakit.train_config import LR_SCHEDULERS, TrainConfig

    run = TrainConfig(data="-")  # the defaults the help states
    S = argparse.SUPPRESS  # an option not given stays absent, so a config file value can show through
    p.add_argument("--config", help="YAML/JSON file of options (field names or flag names as below, e.g. lr, "
                                    "lora-r, no-progress); flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--base", default=S, help=f"base model: '{DEFAULT_BASE}' (embedded default), a local dir or a hub id")
    g.add_argument("--data", default=S, help="training pairs: .jsonl, .csv or a datasets directory")
    g.add_argument("--eval-data", dest="eval_data", default=S,
                   help="held-out pairs for the eval loss (with --keep-best: to pick the adapter kept)")
    g.add_argument("--out", default=S, help="output directory: adapter, metrics.jsonl, loss_curve.png, checkpoints/")
    g.add_argument("--query-field", dest="query_field", default=S,
                   help=f"field holding the query (default: {run.query_field})")
    g.add_argument("--response-field", dest="response_field", default=S,
                   help=f"field holding the response (default: {run.response_field})")
    g.add_argument("--system-prompt", dest="system_prompt", default=S, help="system message put before each query")
    g.add_argument("--max-length", dest="max_length", type=positive_int, default=S,
                   help=f"max tokens per example (default {run.max_length})")
    g.add_argument("--too-long", dest="too_long", choices=["truncate", "skip"], default=S,
                   help=f"what to do with longer examples (default {run.too_long})")
    g = p.add_argument_group("LoRA")
    add_lora_options(g)
    g.add_argument("--dora", action="store_true", default=S, help="DoRA: learn a magnitude per output feature too")
    g.add_argument("--rslora", action="store_true", default=S, help="rank-stabilised scaling alpha / sqrt(r)")
    g.add_argument("--full", action="store_true", default=S, help="full fine-tuning baseline instead of LoRA")
    g.add_argument("--quantize", choices=["nf4"], default=S, help=QUANTIZE_HELP)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=S, help=f"passes over the data (default {run.epochs})")
    g.add_argument("--max-steps", dest="max_steps", type=positive_int, default=S,
                   help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=positive_float, default=S, help=f"peak learning rate (default {run.lr:g})")
    g.add_argument("--lr-scheduler", dest="lr_scheduler", choices=LR_SCHEDULERS, default=S,
                   help=f"after the warmup: decay to 0 at the last step, or constant (default {run.lr_scheduler})")
    add_batch_options(g)
    g.add_argument("--warmup-ratio", dest="warmup_ratio", type=fraction, default=S,
                   help=f"share of the steps with the lr rising linearly from 0 (default {run.warmup_ratio})")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=non_negative_int, default=S,
                   help="the warmup in steps instead of a share (with --warmup-ratio 0, the default)")
    g.add_argument("--weight-decay", dest="weight_decay", type=non_negative_float, default=S,
                   help=f"AdamW weight decay (default {run.weight_decay})")
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=non_negative_float, default=S,
                   help=f"gradient clipping norm, 0 for none (default {run.max_grad_norm})")
    g.add_argument("--loraplus-lr-ratio", dest="loraplus_lr_ratio", type=positive_float, default=S,
                   help="LoRA+: lr of the B matrices = lr * ratio")
    g.add_argument("--neftune-alpha", dest="neftune_alpha", type=non_negative_float, default=S,
                   help=f"NEFTune: uniform noise of scale alpha / sqrt(length * hidden size) on the input embeddings "
                        f"while training, 0 for none (default {run.neftune_alpha:g})")
    g.add_argument("--seed", type=non_negative_int, default=S, help=f"random seed (default {run.seed})")
    grouping = "on" if run.group_by_length else "off"
    g.add_argument("--group-by-length", dest="group_by_length", action=argparse.BooleanOptionalAction, default=S,
                   help=f"batches of rows of similar length: less padding, but fewer different answers per batch "
                        f"(default {grouping})")
    g.add_argument("--length-tolerance", dest="length_tolerance", type=non_negative_float, default=S,
                   help=f"with --group-by-length: lengths within this share of each other count as equal, so their "
                        f"rows mix (default {run.length_tolerance}; 0: sort by exact length)")
    g.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast")
    g.add_argument("--device", default=S, help=DEVICE_HELP)
    g.add_argument("--attention", choices=["eager", "sdpa"], default=S,
                   help="attention kernel (default: transformers' choice, sdpa); eager is faster for short rows on CPU")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=S,
                   help="recompute activations in backward to save memory")
    g.add_argument("--fsdp", action="store_true", default=S,
                   help="under torchrun: shard the model across the processes (FSDP) instead of a copy in each (DDP)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--eval-every", dest="eval_every", type=non_negative_int, default=S,
                   help=f"steps between eval-loss runs (default {run.eval_every}: only at the end, or each epoch "
                        "with --keep-best)")
    g.add_argument("--keep-best", dest="keep_best", action="store_true", default=S,
                   help="with --eval-data: --out holds the adapter of the lowest eval loss (the last step's, when "
                        "another is kept, goes to --out/last)")
    g.add_argument("--save-every", dest="save_every", type=non_negative_int, default=S,
                   help=f"steps between checkpoints (default {run.save_every}: none, except on Ctrl-C)")
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=positive_int, default=S,
                   help=f"checkpoints kept (default {run.keep_checkpoints})")
    g.add_argument("--log-every", dest="log_every", type=positive_int, default=S,
                   help=f"steps between metrics.jsonl rows (default {run.log_every})")
    g.add_argument("--resume", action="store_true", default=S, help="continue from the last checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def merged_train_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields and LoRA flags that were set: --config file < flags."""
    from lorakit.train_config import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)] + list(LORA_FLAGS)
    file_values = read_config_options(args.config, add_train_options) if getattr(args, "config", None) else {}
    return merge_options({}, file_values, args, fields)


def train_config_from_options(merged: dict):
    """TrainConfig from its defaults and `merged` (merged_train_options); the LoRA flags change the recipe's adapter."""
    from lorakit.train_config import TrainConfig, lora_recipe, targets_from_names

    lora = {LORA_FLAGS[flag]: merged.pop(flag) for flag in list(merged) if flag in LORA_FLAGS}
    if "target_modules" in lora:
        lora["target_modules"] = targets_from_names(lora["target_modules"])
    return TrainConfig(lora=lora_recipe(**lora), **merged)


def train_config_from_args(args: argparse.Namespace):
    """TrainConfig from its defaults < --config file < flags."""
    merged = merged_train_options(args)
    if not merged.get("data"):
        raise CliError("no training data: pass --data FILE (or 'data:' in the --config file)")
    return train_config_from_options(merged)


def run(args: argparse.Namespace) -> int:
    from lorakit.distributed import world_from_env
    from lorakit.train import train

    result = train(train_config_from_args(args))
    if world_from_env().is_main:  # under torchrun, one summary
        print(result.summary())
    return 130 if result.interrupted else 0


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a base model on (query, response) pairs",
                       description="Fine-tune with LoRA (or --full); writes the adapter to --out.")
    add_train_options(p)
    p.set_defaults(func=run)
