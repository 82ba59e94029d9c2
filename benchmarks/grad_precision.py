"""How far bf16 autocast moves the LoRA gradients from float32's: lorakit's kernels next to PEFT's modules. Prints JSON.

    python benchmarks/grad_precision.py                       # SmolLM2-135M, 4 batches of the multiturn data
    python benchmarks/grad_precision.py --data my.jsonl --batches 8
    python benchmarks/grad_precision.py --adapter runs/demo --data src/lorakit/demo_data/train.jsonl   # trained

Both models get the same adapter (r=16, alpha 32 on q, k, v, o, no dropout) with the same random A and B (B not
zero, so both factors have a gradient), or with `--adapter` a trained adapter's A and B (the demo's is this shape;
late in training most tokens are predicted confidently, where bf16 rounding in the loss's gradient shows most),
see the same shuffled batches of 8, and take one forward and backward per batch, from scratch each time (no
optimizer step). The reference is PEFT on the float32 base without autocast.
Variants: lorakit on the float32 base (the same arithmetic up to summation order), and on a bf16 base under bf16
autocast as training runs (`TrainConfig.bf16`): PEFT, lorakit with its fused head + loss, and lorakit with
`fused_loss = False` (the model's own head and cross-entropy). For each: the loss, and the relative L2 error and
cosine of all LoRA gradients against the reference, per batch and their median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch
from train_step import emit  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VARIANTS = {  # name: (library, bf16, fused loss)
    "lorakit_fp32": ("lorakit", False, True),
    "peft_bf16": ("peft", True, None),
    "lorakit_bf16": ("lorakit", True, True),
    "lorakit_bf16_unfused_loss": ("lorakit", True, False),
}


def _batches(base: str, data: str, count: int, batch_size: int, seed: int) -> list[dict]:
    from lorakit.data import collate, training_batches
    from lorakit.models import load_tokenizer
    from lorakit.train import load_data
    from lorakit.train_config import TrainConfig

    tokenizer = load_tokenizer(base)
    tokenized = load_data(TrainConfig(data=data, base=base), tokenizer, data)
    order = training_batches(tokenized.lengths, batch_size, seed, 0, group_by_length=False)[:count]
    return [collate([tokenized.items[i] for i in idx], tokenizer.pad_token_id) for idx in order]


def _adapter_weights(adapter: str) -> dict[str, torch.Tensor]:
    """A trained adapter's tensors; it must be the shape compared here."""
    from lorakit.adapter_folder import read_config, read_weights

    config = read_config(adapter)
    shape = (config.get("r"), config.get("lora_alpha"), sorted(config.get("target_modules") or []))
    if shape != (16, 32, sorted(TARGETS)):
        raise SystemExit(f"--adapter {adapter} is r={shape[0]}, alpha {shape[1]} on {shape[2]}; this benchmark "
                         f"compares r=16, alpha 32 on {', '.join(TARGETS)} (the demo's adapter is)")
    return read_weights(adapter)  # keyed as on disk: adapter_folder.file_key(parameter name, "default")


def _adapted(library: str, base: str, bf16: bool, fused: bool | None, seed: int,
             trained: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    from lorakit.models import load_base_model

    model, _ = load_base_model(base, dtype=torch.bfloat16 if bf16 else torch.float32, device=torch.device("cpu"),
                               attention="eager")
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    else:
        from lorakit.model import get_peft_model
        from lorakit.train_config import lora_recipe

        model = get_peft_model(model, lora_recipe(lora_dropout=0.0, target_modules=TARGETS))
        model.fused_loss = fused
    from lorakit.adapter_folder import file_key

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the same A and B in both libraries (the names and shapes are PEFT's in both)
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(trained[file_key(name, "default")] if trained
                            else torch.randn(param.shape, generator=generator) * 0.02)
    return model.train()


def gradients(library: str, bf16: bool, fused: bool | None, base: str, batches: list[dict], seed: int,
              trained: dict[str, torch.Tensor] | None = None) -> list[tuple[float, torch.Tensor]]:
    """(loss, every LoRA gradient flattened in name order) per batch."""
    from lorakit.loss import batch_loss
    from lorakit.precision import autocast

    model = _adapted(library, base, bf16, fused, seed, trained)
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        with autocast(bf16, "cpu"):
            if library == "peft":
                loss = model(**batch).loss  # transformers' mean over response tokens
            else:
                loss_sum, n = batch_loss(model, batch)  # what lorakit's training step runs
                loss = loss_sum / n
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.float().flatten() for p in params])))
    return out


def compare(reference: list[tuple[float, torch.Tensor]], other: list[tuple[float, torch.Tensor]]) -> dict:
    rel = [float((g - r).norm() / r.norm()) for (_, r), (_, g) in zip(reference, other)]
    cos = [float(torch.nn.functional.cosine_similarity(g, r, dim=0)) for (_, r), (_, g) in zip(reference, other)]
    return {"loss": [round(loss, 6) for loss, _ in other], "grad_rel_error": [round(e, 6) for e in rel],
            "grad_cosine": [round(c, 6) for c in cos], "grad_rel_error_median": round(statistics.median(rel), 6)}


def main(argv: list[str] | None = None) -> dict:
    from lorakit.models import DEFAULT_BASE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "data" / "multiturn" / "train.jsonl"))
    p.add_argument("--adapter", default=None,
                   help="start from this trained adapter's weights (r=16, alpha 32 on q, k, v, o)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = _adapter_weights(args.adapter) if args.adapter else None
    batches = _batches(args.base, args.data, args.batches, args.batch_size, args.seed)
    reference = gradients("peft", False, None, args.base, batches, args.seed, trained)
    results = {name: compare(reference, gradients(*VARIANTS[name], args.base, batches, args.seed, trained))
               for name in variants}
    report = {"benchmark": "grad_precision",
              "setup": {"base": args.base, "data": args.data, "batches": len(batches), "batch_size": args.batch_size,
                        "seed": args.seed, "adapter": args.adapter or "random A and B",
                        "reference": "peft, float32 base, no autocast",
                        "reference_loss": [round(loss, 6) for loss, _ in reference],
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine()},
              "variants": results}
    if "lorakit_bf16" in results and "peft_bf16" in results:  # < 1: lorakit's bf16 gradients are the closer
        report["lorakit_vs_peft_bf16_error"] = round(results["lorakit_bf16"]["grad_rel_error_median"]
                                                     / results["peft_bf16"]["grad_rel_error_median"], 3)
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
