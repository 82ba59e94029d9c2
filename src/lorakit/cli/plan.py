"""`lorakit plan`: parameter counts, adapter size and training memory, from the model's config alone."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.options import positive_int
from lorakit.cli.train import (QUANTIZE_HELP, add_batch_options, add_lora_options, merged_train_options,
                               train_config_from_options)
from lorakit.models import DEFAULT_BASE


def plan_settings(args: argparse.Namespace):
    """A TrainConfig of the run to plan: defaults < --config file < flags (the training data is not read)."""
    merged = merged_train_options(args)
    merged.pop("device", None)  # where the planned run trains is --device here, not this machine's
    merged["data"] = merged.get("data") or "-"
    return train_config_from_options(merged)


def run(args: argparse.Namespace) -> int:
    from lorakit.plan import make_plan, memory_limit, render

    plan = make_plan(plan_settings(args), memory_limit(args.memory), args.plan_device)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0


def register(sub) -> None:
    from lorakit.plan import shipped_configs
    from lorakit.train_config import TrainConfig

    run_ = TrainConfig(data="-")
    S = argparse.SUPPRESS
    p = sub.add_parser("plan", help="before training: trainable parameters, adapter size, and whether it fits in memory",
                       description="Builds the model on the meta device from its config (no weights are read), "
                                   "injects the adapter and estimates the memory of a training step.")
    p.add_argument("--config", help="a `lorakit train` YAML/JSON config: plan that run (flags override it)")
    p.add_argument("--base", default=S, help=f"a shipped config ({', '.join(shipped_configs())}; "
                                             f"default {DEFAULT_BASE}), a config.json, a model directory or a hub id")
    add_lora_options(p)
    p.add_argument("--quantize", choices=["nf4"], default=S, help=QUANTIZE_HELP)
    add_batch_options(p)  # the hint keeps batch x accumulation
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
