"""Decoding latency at batch 1: base model vs lorakit (adapter active, not merged) vs merged vs PEFT. JSON.

    python benchmarks/inference.py                    # SmolLM2-135M fp32, r=16 on q,k,v,o
    python benchmarks/inference.py --model tiny --tokens 16 --rounds 3

Each variant is a copy of the same base; lorakit and PEFT carry the same adapter weights (B random, so the
adapter changes the output). One round = for every variant in turn: prefill the prompt, then decode
--tokens tokens one at a time with the KV cache, timing each single-token forward. Variants alternate
token by token, in a fresh random order for every token, so that no variant always runs first or always
follows the same one. The JSON gives each variant's median per-token latency and its ratio to the base
model: the median, over tokens, of the variant's time over the base's for the same token (paired, so the
drifts of a shared machine cancel).

`--ablation` adds lorakit_wrapper_only: lorakit's model with the adapter's arithmetic (x A^T, then B) taken out
of its layers' forward, the wrapper and its Python kept; it computes the base model's outputs. Its ratio to the
base is what the wrapper costs; the rest of lorakit's is the arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F

from lorakit import LoraConfig, get_peft_model

# benchmarks/ is the script's directory
from train_step import ablation, add_random_weights_option, emit, load_base, randomize_b  # noqa: E402

VARIANTS = ("base", "lorakit", "lorakit_merged", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded default), 'tiny', or a local model dir")
    add_random_weights_option(p)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=32)
    # 10 x 48 timed tokens per variant: with 5 x 32, two runs of the same code differed by up to 1%.
    p.add_argument("--tokens", type=int, default=48, help="tokens decoded per round and variant")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ablation", action="store_true", help="also time lorakit_wrapper_only (see above)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.seq_len, args.variants = args.prompt_len, list(VARIANTS) + (["lorakit_wrapper_only"] if args.ablation else [])
    return args


def build(args):
    base = load_base(args)
    for param in base.parameters():
        param.requires_grad_(False)
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    randomize_b(ours)
    state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    merged = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    merged.load_state_dict(state, strict=False)
    merged = merged.merge_and_unload()
    import peft

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    theirs.load_state_dict(state, strict=False)
    # The base is a copy too, so every variant's weights are allocated alike. Weights left in transformers'
    # mapping of the safetensors file decoded 1-2.5% slower than a copy's, which flattered every ratio to an
    # uncopied base (lorakit's loader now copies them out; other loaders may not).
    models = {"base": copy.deepcopy(base), "lorakit": ours, "lorakit_merged": merged, "peft": theirs}
    if args.ablation:
        models["lorakit_wrapper_only"] = ours  # the same model; its Decoder runs it without the adapter's arithmetic
    return {k: m.eval() for k, m in models.items()}


def base_linear_only(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, fan_in_fan_out=False):
    """In place of lorakit.kernels.lora_linear: the base layer's output alone."""
    if fan_in_fan_out:
        return torch.matmul(x, weight) + (bias if bias is not None else 0)
    return F.linear(x, weight, bias)


class Decoder:
    """Greedy decoding with the KV cache, one token per call, so variants can alternate token by token."""

    def __init__(self, model, prompt: torch.Tensor, wrapper_only: bool = False):
        self.model, self.wrapper_only = model, wrapper_only
        with torch.no_grad(), ablation(base_linear_only if wrapper_only else None):
            out = model(input_ids=prompt, use_cache=True)
        self.cache_key = "cache" if "cache" in out.keys() else "past_key_values"
        self.cache = out[self.cache_key]
        self.next_id = out.logits[:, -1:].argmax(-1)
        self.ids = [self.next_id]

    @torch.no_grad()
    def step(self) -> None:
        with ablation(base_linear_only if self.wrapper_only else None):
            out = self.model(input_ids=self.next_id, use_cache=True, **{self.cache_key: self.cache})
        self.cache = out[self.cache_key]
        self.next_id = out.logits[:, -1:].argmax(-1)
        self.ids.append(self.next_id)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build(args)
    vocab = models["base"].config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(5)).to(args.device)
    times = {k: [] for k in models}
    generated = {}
    order = random.Random(0)
    for round_ in range(args.warmup + args.rounds):
        decoders = {name: Decoder(model, prompt, wrapper_only=name == "lorakit_wrapper_only")
                    for name, model in models.items()}
        names = list(decoders)
        for token in range(args.tokens):
            order.shuffle(names)  # a fresh order every token: no variant always runs first or after the same one
            for name in names:
                decoder = decoders[name]
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                decoder.step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        generated = {name: torch.cat(d.ids, 1) for name, d in decoders.items()}
    per_token = {k: statistics.median(t) for k, t in times.items()}
    # Paired: each variant's time over the base's for the same round and token, which ran within the same
    # fraction of a second, so the machine's slow drifts cancel; the median of those ratios is the figure.
    paired = {k: statistics.median(t / b for t, b in zip(times[k], times["base"])) for k in times if k != "base"}
    with torch.no_grad():  # the merged model computes what the unmerged adapter computes
        logits = {k: models[k](input_ids=prompt).logits for k in ("base", "lorakit", "lorakit_merged", "peft")}
    result = {
        "config": {"model": args.model, "random_weights": args.random_weights, "rank": args.rank,
                   "targets": args.targets, "dtype": args.dtype,
                   "device": args.device, "prompt_len": args.prompt_len, "tokens": args.tokens,
                   "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "per_token_ms_median": {k: round(1e3 * v, 3) for k, v in per_token.items()},
        "ratio_to_base": {k: round(v, 3) for k, v in paired.items()},
        "ratio_of_medians_to_base": {k: round(v / per_token["base"], 3) for k, v in per_token.items() if k != "base"},
        "ratio_lorakit_over_peft": round(statistics.median(a / b for a, b in zip(times["lorakit"], times["peft"])), 3),
        "checks": {
            "max_abs_logit_diff_lorakit_vs_peft": float(f"{(logits['lorakit'] - logits['peft']).abs().max():.3g}"),
            "max_abs_logit_diff_merged_vs_unmerged":
                float(f"{(logits['lorakit_merged'] - logits['lorakit']).abs().max():.3g}"),
            "max_abs_logit_diff_adapter_vs_base": float(f"{(logits['lorakit'] - logits['base']).abs().max():.3g}"),
            "same_greedy_tokens_lorakit_peft": bool(torch.equal(generated["lorakit"], generated["peft"])),
            "merged_model_type": type(models["lorakit_merged"]).__name__,
        },
    }
    if args.ablation:
        result["checks"]["same_greedy_tokens_wrapper_only_base"] = bool(
            torch.equal(generated["lorakit_wrapper_only"], generated["base"]))
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
