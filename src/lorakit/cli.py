"""The `lorakit` command: a thin layer over lorakit.train, lorakit.evaluate and friends."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lorakit.io_utils import nearest_existing
from lorakit.models import DEFAULT_BASE
from lorakit.options import (CliError, check_output_file, comma_list, merge_options, non_negative_int, positive_int,
                             read_config_options)

DEMO_OUT = "runs/demo"


# -- train -----------------------------------------------------------------------------------------------

def _add_train_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # an option not given stays absent, so a config file value can show through
    p.add_argument("--config", help="YAML/JSON file of options (field names or flag names as below, e.g. lr, "
                                    "lora-r, no-progress); flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--base", default=S, help=f"base model: '{DEFAULT_BASE}' (embedded default), a local dir or a hub id")
    g.add_argument("--data", default=S, help="training pairs: .jsonl, .csv or a datasets directory")
    g.add_argument("--eval-data", dest="eval_data", default=S, help="held-out pairs for the eval loss")
    g.add_argument("--out", default=S, help="output directory: adapter, metrics.jsonl, loss_curve.png, checkpoints/")
    g.add_argument("--query-field", dest="query_field", default=S, help="field holding the query (default: query)")
    g.add_argument("--response-field", dest="response_field", default=S,
                   help="field holding the response (default: response)")
    g.add_argument("--system-prompt", dest="system_prompt", default=S, help="system message put before each query")
    g.add_argument("--max-length", dest="max_length", type=positive_int, default=S,
                   help="max tokens per example (default 512)")
    g.add_argument("--too-long", dest="too_long", choices=["truncate", "skip"], default=S,
                   help="what to do with longer examples (default truncate)")
    g = p.add_argument_group("LoRA")
    # --lora-r: torchrun's own parser takes a bare --r for an abbreviation of its options and stops.
    g.add_argument("--r", "--lora-r", dest="r", type=positive_int, default=S, help="rank (default 16)")
    g.add_argument("--alpha", type=float, default=S, help="lora_alpha (default 32)")
    g.add_argument("--targets", type=comma_list, default=S, help="comma-separated module names (default q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--dropout", type=float, default=S, help="LoRA dropout (default 0.05)")
    g.add_argument("--dora", action="store_true", default=S, help="DoRA: learn a magnitude per output feature too")
    g.add_argument("--rslora", action="store_true", default=S, help="rank-stabilised scaling alpha / sqrt(r)")
    g.add_argument("--full", action="store_true", default=S, help="full fine-tuning baseline instead of LoRA")
    g.add_argument("--quantize", choices=["nf4"], default=S, help="QLoRA: keep the frozen base in 4-bit NF4")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="passes over the data (default 3)")
    g.add_argument("--max-steps", dest="max_steps", type=positive_int, default=S,
                   help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 2e-4)")
    g.add_argument("--batch-size", dest="batch_size", type=positive_int, default=S,
                   help="examples per micro-batch (default 8)")
    g.add_argument("--grad-accum", dest="grad_accum", type=positive_int, default=S,
                   help="micro-batches per step (default 1)")
    g.add_argument("--warmup-ratio", dest="warmup_ratio", type=float, default=S,
                   help="warmup share of steps (default 0.05)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S,
                   help="AdamW weight decay (default 0.0)")
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=S,
                   help="gradient clipping norm (default 1.0)")
    g.add_argument("--loraplus-lr-ratio", dest="loraplus_lr_ratio", type=float, default=S,
                   help="LoRA+: lr of the B matrices = lr * ratio")
    g.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    g.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast")
    g.add_argument("--device", default=S, help="auto (default: the GPU if there is one), cpu, cuda or cuda:N")
    g.add_argument("--attention", choices=["eager", "sdpa"], default=S,
                   help="attention kernel (default: transformers' choice, sdpa); eager is faster for short rows on CPU")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=S,
                   help="recompute activations in backward to save memory")
    g.add_argument("--fsdp", action="store_true", default=S,
                   help="under torchrun: shard the model across the processes (FSDP) instead of a copy in each (DDP)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--eval-every", dest="eval_every", type=non_negative_int, default=S,
                   help="steps between eval-loss runs (default 0: only at the end)")
    g.add_argument("--save-every", dest="save_every", type=non_negative_int, default=S,
                   help="steps between checkpoints (default 0: none, except on Ctrl-C)")
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=positive_int, default=S,
                   help="checkpoints kept (default 2)")
    g.add_argument("--log-every", dest="log_every", type=positive_int, default=S,
                   help="steps between metrics.jsonl rows (default 1)")
    g.add_argument("--resume", action="store_true", default=S, help="continue from the last checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def train_config_from_args(args: argparse.Namespace):
    """TrainConfig from dataclass defaults < --config file < flags."""
    from lorakit.train import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    file_values = read_config_options(args.config, _add_train_options) if getattr(args, "config", None) else {}
    merged = merge_options({}, file_values, args, fields)
    if not merged.get("data"):
        raise CliError("no training data: pass --data FILE (or 'data:' in the --config file)")
    return TrainConfig(**merged)


def cmd_train(args: argparse.Namespace) -> int:
    from lorakit.distributed import world_from_env
    from lorakit.train import train

    config = train_config_from_args(args)
    result = train(config)
    if world_from_env().is_main:  # under torchrun, one summary
        print(result.summary())
    return 130 if result.interrupted else 0


# -- eval ------------------------------------------------------------------------------------------------

EVAL_FIELDS = ("base", "adapter", "data", "query_field", "response_field", "system_prompt", "batch_size",
               "max_new_tokens", "exact_match", "include_base", "limit", "json_out", "bf16", "quantize", "device",
               "max_length")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--device", default=S, help="auto (default: the GPU if there is one), cpu, cuda or cuda:N")


def eval_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """evaluate()'s keyword arguments from its defaults < --config file < flags, checked before any loading."""
    file_values = read_config_options(args.config, _add_eval_options) if getattr(args, "config", None) else {}
    opts = merge_options({}, file_values, args, EVAL_FIELDS)
    opts["base"] = base_for(opts.get("base"), [opts["adapter"]] if opts.get("adapter") else [])
    if not opts.get("data"):
        raise CliError("no eval data: pass --data FILE")
    if opts.get("include_base") is False and not opts.get("adapter"):
        raise CliError("--no-base without --adapter leaves nothing to score: pass --adapter DIR, "
                       "or drop --no-base to score the base model")
    if opts.get("json_out"):
        check_output_file(opts["json_out"], "--json")
    return opts


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.evaluate import evaluate

    opts = eval_options_from_args(args)
    report = evaluate(**opts)
    print(report.table())
    if opts.get("json_out"):
        print(f"answers and scores written to {opts['json_out']}")
    print(report.summary())
    return 0


# -- generate / chat ---------------------------------------------------------------------------------------

def check_adapter_dir(path: str) -> None:
    """Refuse a full model directory given as --adapter, pointing to --base (loading it would fail obscurely)."""
    p = Path(path)
    if p.is_dir() and not (p / "adapter_config.json").is_file() and (p / "config.json").is_file():
        raise CliError(f"--adapter {path} is a full model directory (config.json, no adapter_config.json), as "
                       f"`lorakit train --full` and `lorakit merge` write; pass it as --base {path} instead")


def parse_adapter_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) per --adapter DIR or NAME=DIR: an unnamed first one is 'default', later ones their folder name."""
    adapters: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or (Path(path).name if i else "default")
        same_name = [other for other_name, other in adapters if other_name == name]
        if same_name:
            raise CliError(f"two adapters are named {name!r} ({same_name[0]} and {path}); name them with "
                           f"--adapter NAME=PATH, e.g. --adapter {name}2={path}")
        check_adapter_dir(path)
        adapters.append((name, path))
    return adapters


def base_for(base: Optional[str], adapter_paths: Sequence[str]) -> str:
    """--base when given; else the base the first adapter records, if that is here (the embedded model or an
    existing directory: never an unasked hub download); else the embedded default."""
    if base:
        return base
    for path in adapter_paths:
        try:
            recorded = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            continue
        if isinstance(recorded, str) and (recorded == DEFAULT_BASE or Path(recorded).is_dir()):
            return recorded
    return DEFAULT_BASE


def _load_for_inference(base: Optional[str], adapters: Sequence[str]):
    """Base model plus adapters given as DIR or NAME=DIR; returns (model, tokenizer, adapter names, base)."""
    from lorakit import PeftModel
    from lorakit.evaluate import load_base_for_adapters

    named = parse_adapter_specs(adapters)  # before the slow model load
    base = base_for(base, [path for _, path in named])
    model, tokenizer = load_base_for_adapters(base, [path for _, path in named])
    for i, (name, path) in enumerate(named):
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    return model, tokenizer, [name for name, _ in named], base


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lorakit.generation import generate

    # `echo "q" | lorakit generate` adds a newline the user did not type, and the model would answer it differently
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n")
    if not prompt.strip():
        raise CliError("empty prompt: pass it as an argument or on stdin")
    model, tokenizer, _, _ = _load_for_inference(args.base, [args.adapter] if args.adapter else [])
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    torch.manual_seed(args.seed)
    reply = generate(model, tokenizer, [messages], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p)[0]
    print(reply)
    return 0


CHAT_HELP = "commands: /adapter NAME (switch), /base (no adapter), /adapters (list), /reset (forget history), /quit"


def cmd_chat(args: argparse.Namespace) -> int:
    import contextlib

    from lorakit.generation import generate

    model, tokenizer, names, base = _load_for_inference(args.base, args.adapter)
    current: Optional[str] = names[0] if names else None
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    print(f"lorakit chat on {base}; adapters: {', '.join(names) or 'none'}; {CHAT_HELP}")
    while True:
        try:
            line = input(f"[{current or 'base'}] you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/base":
                current = None
                print("using the base model")
            elif cmd == "/adapter":
                if arg not in names:
                    print(f"no adapter {arg!r}; loaded: {', '.join(names) or 'none'} (load more with --adapter NAME=DIR)")
                else:
                    current = arg
                    model.set_adapter(arg)
                    print(f"using adapter {arg}")
            elif cmd == "/adapters":
                print(", ".join(names) or "none loaded")
            elif cmd == "/reset":
                history.clear()
                print("history cleared")
            else:
                print(CHAT_HELP)
            continue
        history.append({"role": "user", "content": text})
        ctx = model.disable_adapter() if (current is None and names) else contextlib.nullcontext()
        with ctx:
            reply = generate(model, tokenizer, [system + history], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"[{current or 'base'}] assistant> {reply}")


# -- merge / inspect -------------------------------------------------------------------------------------

def check_merge_out(adapter: str, out: str, force: bool) -> None:
    """Fail before loading anything when --out could not be written, or replacing it would destroy something."""
    adapter_dir, out_dir = Path(adapter).resolve(), Path(out).resolve()
    if out_dir == adapter_dir or out_dir in adapter_dir.parents or adapter_dir in out_dir.parents:
        where = ("is" if out_dir == adapter_dir else "contains" if out_dir in adapter_dir.parents else "is inside")
        raise CliError(f"--out {out} {where} the adapter directory {adapter}; the merged model would replace or mix "
                       "with the adapter and its checkpoints. Choose an --out outside it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {out} is a file; merge writes a model directory there. Choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise CliError(f"{out} exists and is not empty; pass --force to replace it")
        if not (out_dir / "config.json").is_file():
            raise CliError(f"--out {out} is not empty and holds no model (no config.json); --force replaces only "
                           "an earlier merged model. Choose another --out or empty it.")
    existing = nearest_existing(out_dir.parent)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: {existing} is not writable by this user. Choose another --out, "
                       "or fix its permissions.")


def cmd_merge(args: argparse.Namespace) -> int:
    import tempfile

    from lorakit import PeftModel
    from lorakit.evaluate import load_base_for_adapters
    from lorakit.io_utils import private_dir_made_ordinary

    check_adapter_dir(args.adapter)
    check_merge_out(args.adapter, args.out, args.force)
    out = Path(args.out)
    base = base_for(args.base, [args.adapter])
    model, tokenizer = load_base_for_adapters(base, [args.adapter])  # a QLoRA adapter: the NF4-rounded base
    model = PeftModel.from_pretrained(model, args.adapter)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        private_dir_made_ordinary(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {args.adapter} into {base}: standalone model saved to {out} "
          f"(load it with AutoModelForCausalLM.from_pretrained('{out}') or --base {out})")
    return 0


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{path} is not valid JSON ({e}); the file is damaged: re-save or re-copy it") from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a JSON object, not {type(data).__name__}; re-save or re-copy it")
    return data


def inspect_adapter(path: str) -> dict[str, Any]:
    """What an adapter directory holds: config, targets, ranks, parameter count, weights and directory size."""
    from safetensors import SafetensorError, safe_open

    from lorakit.train import TRAIN_INFO

    root = Path(path)
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise CliError(f"{root} has no adapter_config.json; pass a directory written by `lorakit train` or PEFT")
    config = _read_json_file(config_path)
    weights = root / "adapter_model.safetensors"
    params, modules, tensors = 0, set(), 0
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    params += n
                    tensors += 1
                    if ".lora_A" in key or ".lora_embedding_A" in key:
                        modules.add(key.split(".lora_")[0])
        except (SafetensorError, OSError, ValueError) as e:
            raise CliError(f"{weights} cannot be read ({e}); it is truncated or corrupt: re-save or re-copy "
                           "the adapter") from None
    weights_file = next((root / name for name in ("adapter_model.safetensors", "adapter_model.bin")
                         if (root / name).is_file()), None)
    info = {
        "path": str(root),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": config.get("target_modules"),
        "use_rslora": config.get("use_rslora"),
        "use_dora": config.get("use_dora"),
        "rank_pattern": config.get("rank_pattern") or {},
        "adapted_modules": len(modules),
        "tensors": tensors,
        "parameters": params,
        "weights_file": weights_file.name if weights_file else None,
        "weights_bytes": weights_file.stat().st_size if weights_file else 0,
        # metrics, the loss curve and checkpoints too: what deleting the directory would free
        "directory_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }
    trained = _read_json_file(root / TRAIN_INFO) if (root / TRAIN_INFO).is_file() else None
    if trained:
        result = trained.get("result", {})
        info["training"] = {k: result.get(k) for k in ("steps", "epochs", "first_loss", "final_loss", "eval_loss")}
        info["training"]["data"] = trained.get("config", {}).get("data")
        info["training"]["quantize"] = trained.get("config", {}).get("quantize")
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
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
        ("weights size", f"{_human_bytes(info['weights_bytes'])} ({info['weights_file'] or 'no weights file'})"),
        ("directory size", f"{_human_bytes(info['directory_bytes'])} (all files, checkpoints included)"),
    ]
    if info["rank_pattern"]:
        lines.append(("rank pattern", info["rank_pattern"]))
    if "training" in info:
        t = info["training"]
        lines.append(("trained", f"{_count(t['steps'], 'step')} on {t['data']}, loss {t['first_loss']:.3f} -> "
                                 f"{t['final_loss']:.3f}" + (f", eval loss {t['eval_loss']:.3f}"
                                                              if t.get("eval_loss") is not None else "")))
        if t.get("quantize"):
            lines.append(("QLoRA", f"trained on the {t['quantize']}-rounded base; eval, generate, chat and merge "
                                   "use that base too"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


# -- demo ------------------------------------------------------------------------------------------------

def demo_config(out: str = DEMO_OUT, base: str = DEFAULT_BASE, data: Optional[Path] = None, bf16: bool = True):
    """The demo run: LoRA r=16 on q, k, v, o of the embedded model, sized to finish fast on 2 CPU cores.

    `bf16`: train and score under bf16 autocast, for machines where bf16 matmuls are the faster ones
    (`models.bf16_matmul_speedup`); otherwise float32 with SDPA attention.
    """
    from lorakit.train import TrainConfig

    data = Path(data) if data else demo_data_dir()
    return TrainConfig(
        base=base, data=str(data / "train.jsonl"), eval_data=None, out=out,
        r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=0.0,
        # 2 epochs at a high LoRA learning rate fit the 15-minute budget on 2 CPU cores with bf16 units (float32
        # on an AVX2-only CPU: 24 minutes); batches of 4 (456 steps) held out 91.5% (in bf16 and in float32)
        # where batches of 8 (228 steps) gave 81-88% for 10% less time. On a CPU with bf16 units, bf16
        # (autocast over a bf16 frozen base; the adapter stays fp32) was ~1.7x faster than fp32 and eager
        # attention beat SDPA's CPU kernels on these ~80-token rows by ~13%; in float32 on an AVX2-only CPU,
        # SDPA beat eager by ~30%. Dropout's random masks alone cost ~10% of a step (held-out accuracy
        # without them: 87.7%, with them: 86.2%).
        epochs=2, lr=3e-3, batch_size=4, warmup_ratio=0.05, max_length=256, seed=0,
        system_prompt=None, bf16=bf16, attention="eager" if bf16 else "sdpa",
    )


def demo_data_dir() -> Path:
    d = Path(__file__).parent / "demo_data"
    if not (d / "train.jsonl").is_file() or not (d / "eval.jsonl").is_file():
        raise CliError(f"the demo dataset is missing from {d} (train.jsonl, eval.jsonl); reinstall lorakit")
    return d


# What a demo run writes into --out; only a directory holding nothing else is cleared for a new run.
DEMO_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "lorakit_train.json", "metrics.jsonl",
                "loss_curve.png", "eval.json", "checkpoints")


def _is_demo_output(name: str) -> bool:
    # a leftover of an interrupted atomic write is named .<file>.<random>.tmp
    return name in DEMO_OUTPUTS or (name.endswith(".tmp") and any(name.startswith(f".{o}.") for o in DEMO_OUTPUTS))


def clear_earlier_demo_output(out: Path) -> None:
    """Delete what an earlier demo run left in `out`; refuse a directory that holds anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CliError(f"--out {out} is a file; choose another --out")
    entries = list(out.iterdir())
    names = {entry.name for entry in entries}
    from_lorakit = "lorakit_train.json" in names or "checkpoints" in names
    if entries and not (from_lorakit and all(_is_demo_output(name) for name in names)):
        raise CliError(f"--out {out} is not empty and is not the output of an earlier lorakit demo; choose another "
                       "--out or empty it")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.evaluate import evaluate
    from lorakit.models import BF16_MIN_SPEEDUP, bf16_matmul_speedup, resolve_device, smollm2_dir
    from lorakit.train import train

    t0 = time.perf_counter()
    speedup = bf16_matmul_speedup(resolve_device("auto"))
    config = demo_config(args.out, args.base, bf16=speedup >= BF16_MIN_SPEEDUP)
    if args.epochs:
        config.epochs = args.epochs
    config.max_steps = args.max_steps
    config.quantize = args.quantize
    out = Path(config.out)
    clear_earlier_demo_output(out)  # the demo always starts fresh
    method = "QLoRA (NF4 base)" if config.quantize else "LoRA"
    print(f"lorakit demo: fine-tune {config.base} with {method} (r={config.r} on {','.join(config.targets)}) on "
          f"{config.data}, then score base vs adapter on {demo_data_dir() / 'eval.jsonl'}", flush=True)
    print(f"precision: {'bf16 autocast' if config.bf16 else 'float32'} (bf16 matmuls run {speedup:.2f}x as fast as "
          "float32 ones here)", flush=True)
    if config.base == DEFAULT_BASE:
        smollm2_dir()  # converts the embedded model on the first run
    result = train(config)
    print(result.summary(), flush=True)
    eval_file = demo_data_dir() / "eval.jsonl"
    report = evaluate(base=config.base, adapter=config.out, data=str(eval_file),
                      batch_size=args.eval_batch_size, json_out=str(out / "eval.json"), limit=args.eval_limit,
                      bf16=config.bf16)
    print(f"\n{report.n} held-out questions ({eval_file.name}; none of them appears in the training data):")
    print(report.table())
    examples = [r for r in report.rows if r["tuned_correct"] and not r["base_correct"]][:2]
    for row in examples:
        print(f"\nQ: {row['query']}")
        print(f"  base:    {_clip(row['base_answer'])}")
        print(f"  adapter: {_clip(row['tuned_answer'])}")
    print(f"\nadapter saved to {out.resolve()}")
    print(f"  scores and every answer: {out / 'eval.json'}; loss curve: {out / 'loss_curve.png'}")
    if examples:
        print(f"  try it: lorakit generate --adapter {out} \"{examples[0]['query']}\"")
    print(f"{report.summary()}; demo total {time.perf_counter() - t0:.0f}s")
    return 0


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# -- wiring ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, evaluation and serving for open LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="fine-tune a base model on (query, response) pairs",
                       description="Fine-tune with LoRA (or --full); writes the adapter to --out.")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score base vs adapter on held-out pairs (accuracy, perplexity)",
                       description="Answer accuracy (key facts) and response perplexity, base vs adapter.")
    _add_eval_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="answer one prompt with the base model or an adapter")
    p.add_argument("prompt", nargs="?", help="the user message (read from stdin if omitted)")
    p.add_argument("--base", default=None, help=f"base model (default: the one the adapter records when it is here, else {DEFAULT_BASE})")
    p.add_argument("--adapter", help="adapter directory (omit for the base model)")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat; switch adapters with /adapter NAME, /base")
    p.add_argument("--base", default=None, help=f"base model (default: the one the adapter records when it is here, else {DEFAULT_BASE})")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="load an adapter (repeatable); the first one is active")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge an adapter into its base: a standalone transformers model directory")
    p.add_argument("--base", default=None, help=f"base model (default: the one the adapter records when it is here, else {DEFAULT_BASE})")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show an adapter's config, targets, rank, parameter count and size")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="OpenAI-compatible server for many adapters on one base model")
    try:
        from lorakit.serve import add_serve_arguments
    except ImportError as e:
        p.set_defaults(func=lambda a, e=e: _missing_serve(e))
    else:
        add_serve_arguments(p)
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="fine-tune SmolLM2 on the demo support data, then show base vs adapter accuracy")
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default {DEMO_OUT}); an earlier demo's output "
                                                   "there is replaced, any other non-empty directory refused")
    p.add_argument("--base", default=DEFAULT_BASE, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=positive_int, default=None, help="override the demo's number of epochs (default 2)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=positive_int, default=32,
                   help="generation batch size (default %(default)s)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: train on a 4-bit NF4 base")
    # quick checks
    p.add_argument("--max-steps", dest="max_steps", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-limit", dest="eval_limit", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-prompt", dest="system_prompt", default=None, help="system message")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, default=256,
                   help="reply length cap (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.serve import run_server

    run_server(args)
    return 0


def _missing_serve(error: Exception) -> int:
    raise CliError(f"the serving module lorakit.serve is not available in this installation ({error})")


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


if __name__ == "__main__":
    sys.exit(main())
