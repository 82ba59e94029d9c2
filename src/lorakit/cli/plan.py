"""`lorakit plan`: parameter counts, adapter size and training memory, from the model's config alone."""

from __future__ import annotations

import argparse
import dataclasses
import json

from lorakit.cli.options import (comma_list, fraction, merge_options, positive_float, positive_int,
                                 read_config_options)
from lorakit.cli.train import LORA_FLAGS, add_train_options
from lorakit.models import DEFAULT_BASE


def plan_settings(args: argparse.Namespace):
    """A TrainConfig of the run to plan: defaults < --config file < flags (the training data is not read)."""
    from lorakit.train_config import TrainConfig, lora_recipe, targets_from_names

    fields = [f.name for f in dataclasses.fields(TrainConfig)] + list(LORA_FLAGS)
    file_values = read_config_options(args.config, add_train_options) if getattr(args, "config", None) else {}
    merged = merge_options({}, file_values, args, fields)
    merged.pop("device", None)  # where the planned run trains is --device here, not this machine's
    merged["data"] = merged.get("data") or "-"
    lora = {LORA_FLAGS[flag]: merged.pop(flag) for flag in list(merged) if flag in LORA_FLAGS}
    if "target_modules" in lora:
        lora["target_modules"] = targets_from_names(lora["target_modules"])
    return TrainConfig(lora=lora_recipe(**lora), **merged)


def run(args: argparse.Namespace) -> int:
    from lorakit.plan import make_plan, memory_limit, render

    plan = make_plan(plan_settings(args), memory_limit(args.memory), args.plan_device)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0


def register(sub) -> None:
    from lorakit.plan import shipped_configs
    from lorakit.train_config import TrainConfig, lora_recipe

    run_, lora = TrainConfig(data="-"), lora_recipe()
    S = argparse.SUPPRESS
    p = sub.add_parser("plan", help="before training: trainable parameters, adapter size, and whether it fits in memory",
                       description="Builds the model on the meta device from its config (no weights are read), "
                                   "injects the adapter and estimates the memory of a training step.")
    p.add_argument("--config", help="a `lorakit train` YAML/JSON config: plan that run (flags override it)")
    p.add_argument("--base", default=S, help=f"a shipped config ({', '.join(shipped_configs())}; "
                                             f"default {DEFAULT_BASE}), a config.json, a model directory or a hub id")
    p.add_argument("--r", "--lora-r", dest="r", type=positive_int, default=S, help=f"rank (default {lora.r})")
    p.add_argument("--alpha", type=positive_float, default=S, help=f"lora_alpha (default {lora.lora_alpha:g})")
    p.add_argument("--targets", type=comma_list, default=S,
                   help=f"module names, or all-linear (default {','.join(lora.target_modules)})")
    p.add_argument("--dropout", type=fraction, default=S, help=f"LoRA dropout (default {lora.lora_dropout})")
    p.add_argument("--quantize", choices=["nf4"], default=S, help="QLoRA: the frozen base in 4-bit NF4")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=S,
                   help=f"examples per micro-batch (default {run_.batch_size})")
    p.add_argument("--grad-accum", dest="grad_accum", type=positive_int, default=S,
                   help=f"micro-batches per step (default {run_.grad_accum}; the hint keeps batch x accumulation)")
    p.add_argument("--max-length", dest="max_length", type=positive_int, default=S,
                   help=f"tokens per example; the estimate assumes full rows (default {run_.max_length})")
    p.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast (a bf16 frozen base)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=S,
                   help="recompute activations in the backward")
    p.add_argument("--attention", choices=["eager", "sdpa"], default=S, help="attention kernel (default sdpa)")
    p.add_argument("--device", dest="plan_device", choices=["cuda", "cpu"], default="cuda",
                   help="where the run will train (default cuda; cpu adds this process's runtime memory)")
    p.add_argument("--memory", help="the device's memory, e.g. 24GB or 80GiB (G, GB and GiB all mean 2^30 bytes): "
                                    "says whether the run fits, and the smallest change that makes it fit")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=run)
