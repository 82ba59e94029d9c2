"""The demo adapter in real llama.cpp vs in lorakit: held-out accuracy, equal greedy answers, decoding speed. Prints JSON.

    lorakit demo                                   # once: trains the demo adapter into runs/demo (~10-20 min)
    make llamacpp                                  # once: llama-cpp-python
    python benchmarks/llamacpp.py --adapter runs/demo --out llamacpp.json [--threads 1] [--speed-rows 20]

What it does: `lorakit export --format gguf` (f16, the default) of the adapter; then every held-out question of
the demo's eval.jsonl answered greedily by
  lorakit    `lorakit.evaluate` (what `lorakit eval` runs: float32, batches of 16) on the base converted from the
             embedded GGUF file, and
  llama.cpp  llama-cpp-python on that very GGUF file (Q4_1) with the exported adapter file,
from the same prompt tokens (lorakit's chat rendering), with the same stop tokens and token budget, scored by the
same key-facts rule. Speed: the first --speed-rows questions one at a time (batch 1, the same threads) in each,
generated tokens per second of wall time, prompt included; llama.cpp also without the adapter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import emit  # benchmarks/ is the script's directory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVAL_DATA = ROOT / "src" / "lorakit" / "demo_data" / "eval.jsonl"


def llama_answers(llm, prompts: list[list[int]], stops: list[int], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy replies (token ids, stop token excluded) and the seconds they took."""
    replies = []
    t0 = time.perf_counter()
    for ids in prompts:
        new = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if token in stops or len(new) >= max_new_tokens:
                break
            new.append(token)
        replies.append(new)
    return replies, time.perf_counter() - t0


def lorakit_speed(model, tokenizer, conversations, max_new_tokens: int) -> tuple[int, float]:
    """Tokens generated and seconds taken answering one question at a time with lorakit.generation.generate."""
    from lorakit.generation import generate

    tokens, t0 = 0, time.perf_counter()
    for conversation in conversations:
        reply = generate(model, tokenizer, [conversation], max_new_tokens=max_new_tokens, batch_size=1)[0]
        tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1  # + the stop token
    return tokens, time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="runs/demo", help="the demo's run folder (default runs/demo)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for both (default: torch's)")
    parser.add_argument("--speed-rows", type=int, default=20, help="questions for the speed runs (default 20)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    parser.add_argument("--merged", choices=["f16", "q8_0"], default=None,
                        help="also answer with `--format merged-gguf --outtype` this, in llama.cpp")
    args = parser.parse_args(argv)
    if not Path(args.adapter, "adapter_config.json").is_file():
        sys.exit(f"{args.adapter} holds no adapter: run `lorakit demo` (writes runs/demo) or pass --adapter")
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama_cpp is not importable: run `make llamacpp`")
    from lorakit import PeftModel
    from lorakit.adapter_folder import trained_settings
    from lorakit.data import load_examples
    from lorakit.evaluate import evaluate, is_correct, reference_facts
    from lorakit.export.gguf import export_adapter_gguf
    from lorakit.generation import encode_prompt, stop_token_ids
    from lorakit.models import load_base_model, smollm2_gguf_path

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-bench-"))
    adapter_gguf = tmp / "adapter.gguf"
    t0 = time.perf_counter()
    export = export_adapter_gguf(args.adapter, adapter_gguf)
    export_s = time.perf_counter() - t0

    report = evaluate(base="smollm2", adapter=args.adapter, data=str(EVAL_DATA), include_base=False,
                      limit=args.limit, progress=False)
    info = trained_settings(args.adapter)  # the fields and system prompt evaluate used
    examples = load_examples(EVAL_DATA, info.get("query_field") or "query", info.get("response_field") or "response",
                             system_prompt=info.get("system_prompt"))[: report.n]
    base, tokenizer = load_base_model("smollm2")
    model = PeftModel.from_pretrained(base, args.adapter)
    stops = stop_token_ids(tokenizer, model)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), lora_path=str(adapter_gguf), n_ctx=1024,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    replies, llama_s = llama_answers(llm, prompts, stops, report.max_new_tokens)
    answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    ours = report.tuned.answers
    llama_correct = sum(is_correct(a, e.reference, reference_facts(e)) for a, e in zip(answers, examples))
    equal = sum(a == b for a, b in zip(answers, ours))
    differing = [{"query": row["query"], "lorakit": b, "llama.cpp": a}
                 for row, a, b in zip(report.rows, answers, ours) if a != b]

    n = min(args.speed_rows, len(prompts))
    speed_prompts = prompts[:n]
    lora_replies, lora_s = llama_answers(llm, speed_prompts, stops, report.max_new_tokens)
    del llm
    plain = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=1024, n_threads=args.threads,
                            n_threads_batch=args.threads, verbose=False)
    base_replies, base_s = llama_answers(plain, speed_prompts, stops, report.max_new_tokens)
    if args.merged:
        from lorakit.export.merged_gguf import export_merged_gguf

        merged_path = tmp / f"merged-{args.merged}.gguf"
        export_merged_gguf(args.adapter, merged_path, outtype=args.merged)
        merged = llama_cpp.Llama(model_path=str(merged_path), n_ctx=1024, n_threads=args.threads,
                                 n_threads_batch=args.threads, verbose=False)
        merged_replies, _ = llama_answers(merged, prompts, stops, report.max_new_tokens)
        merged_answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in merged_replies]
        merged_result = {"outtype": args.merged, "bytes": merged_path.stat().st_size,
                         "accuracy": round(100 * sum(is_correct(a, e.reference, reference_facts(e))
                                                     for a, e in zip(merged_answers, examples)) / report.n, 2),
                         "equal_greedy_answers_to_lorakit": sum(a == b for a, b in zip(merged_answers, ours))}
        del merged
    lk_tokens, lk_s = lorakit_speed(model, tokenizer, [e.prompt for e in examples[:n]], report.max_new_tokens)

    def tps(replies, seconds):
        return round(sum(len(r) + 1 for r in replies) / seconds, 1)  # + the stop token each generated

    result = {
        "adapter": str(args.adapter), "gguf_file": str(smollm2_gguf_path().name), "adapter_gguf_bytes":
            adapter_gguf.stat().st_size, "export_seconds": round(export_s, 2), "threads": args.threads,
        "questions": report.n, "max_new_tokens": report.max_new_tokens,
        "accuracy": {"lorakit_eval": round(100 * report.tuned.accuracy, 2),
                     "llama_cpp": round(100 * llama_correct / report.n, 2)},
        "correct": {"lorakit_eval": report.tuned.correct, "llama_cpp": llama_correct},
        "equal_greedy_answers": equal,
        "seconds": {"lorakit_eval_batched": round(report.seconds, 1), "llama_cpp_all": round(llama_s, 1)},
        "tokens_per_second_batch1": {"speed_rows": n, "llama_cpp_with_adapter": tps(lora_replies, lora_s),
                                     "llama_cpp_base_only": tps(base_replies, base_s),
                                     "lorakit_generate_with_adapter": round(lk_tokens / lk_s, 1)},
        "exported": {"tensors": export.tensors, "alpha": export.alpha, "ranks": list(export.ranks)},
        "merged_gguf_in_llama_cpp": merged_result if args.merged else None,
        "differing_answers": differing,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
