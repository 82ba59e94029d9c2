"""`lorakit serve`'s engine next to llama.cpp on the same CPU and base weights: batch-1 decode, time to first token,
8 adapters for 8 clients, and the greedy agreement of the quantized decode. Prints JSON.

    make llamacpp                                  # once: llama-cpp-python (a benchmark reference only)
    python benchmarks/decode_vs_llamacpp.py [--precisions auto,fp32] [--runs 3] [--adapter runs/demo] [--out F]

Both run SmolLM2-135M-Instruct from the embedded GGUF file: llama.cpp on the file itself (Q4_1, its head Q8_0),
lorakit on the float32 base converted from it, with each --precisions entry as `lorakit serve --decode-precision`
would apply it. Same threads (--threads, default torch's), greedy, the same prompt tokens (lorakit's chat rendering
of a demo question).

  decode    one request, --max-tokens new tokens (end token ignored), tokens after the first per second, with an
            unmerged random adapter (r=16 on q,k,v,o) in both: lorakit's engine and llama.cpp with that adapter
            exported by `lorakit export --format gguf`; llama.cpp also without it.
  ttft      a --prompt-tokens prompt (demo questions concatenated), seconds to the first new token; lorakit's
            prefix cache is off, llama.cpp's context reset.
  aggregate --clients requests at once, request i for adapter i mod --adapters, --max-tokens each: lorakit's
            engine batches them all (mixed adapters in one forward); llama.cpp applies one LoRA configuration per
            batch, and llama-cpp-python decodes one sequence at a time, so it runs them adapter by adapter (one
            model per adapter), one request after another.
  agreement with --adapter (the demo's, `lorakit demo`), every held-out question of the demo answered greedily
            by the engine at each precision (float32 too: the fast decode step itself) and by transformers'
            generate on the float32 base (what `lorakit eval` runs): equal answers.
  profile   one decode step under torch.profiler: operations and milliseconds per step, the fast step and the
            model's own forward (the path before it), per precision.
Rounds alternate between lorakit and llama.cpp (lorakit's precisions in turn, their order reversed every round);
medians over --runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve import make_random_adapters  # benchmarks/ is the script's directory
from train_step import emit

ROOT = Path(__file__).resolve().parent.parent
EVAL_DATA = ROOT / "src" / "lorakit" / "demo_data" / "eval.jsonl"


def questions() -> list[str]:
    return [json.loads(line)["query"] for line in EVAL_DATA.read_text().splitlines() if line.strip()]


def random_adapters(directory: Path, count: int):
    """(tokenizer, names) of `count` random adapters saved in `directory` (benchmarks/serve.py's)."""
    from lorakit.models import load_base_model

    base, tokenizer = load_base_model("smollm2")
    return tokenizer, make_random_adapters(base, count, directory)


def lorakit_engine(precision: str, adapter_root: Path, names: list[str], max_batch: int):
    """The engine `lorakit serve --decode-precision PRECISION` would build, with the adapters loaded."""
    from lorakit.models import load_base_model
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.server import on_short_lived_thread
    from lorakit.weight_only import prepare_for_decode

    def build():
        model, tokenizer = load_base_model("smollm2")
        chosen = prepare_for_decode(model, precision)
        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch, prefix_cache_tokens=0))
        engine.configure_adapters({name: str(adapter_root / name) for name in names})
        return engine, chosen

    engine, chosen = on_short_lived_thread(build)
    return engine.start(), chosen


def lorakit_decode(engine, prompt: list[int], adapter: str, max_tokens: int) -> tuple[float, float]:
    """(decode tokens/s after the first token, seconds to the first token) of one request."""
    import queue

    from lorakit.serve.sampling import SamplingParams
    from lorakit.serve.sequence import Sequence

    events: queue.SimpleQueue = queue.SimpleQueue()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.submit([Sequence(prompt, adapter, params, events.put)]).result(60)
    first = last = None
    count = 0
    while True:
        out = events.get(timeout=120)
        if out.error is not None:
            raise out.error
        count += len(out.token_ids)
        now = time.perf_counter()
        first = first or now
        last = now
        if out.finish_reason is not None:
            break
    return (count - 1) / (last - first), first - start


def lorakit_aggregate(engine, prompts: list[list[int]], adapters: list[str], max_tokens: int) -> float:
    """Generated tokens/s of all (prompt, adapter) requests submitted at once."""
    import queue

    from lorakit.serve.sampling import SamplingParams
    from lorakit.serve.sequence import Sequence

    events: queue.SimpleQueue = queue.SimpleQueue()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [Sequence(p, a, params, events.put) for p, a in zip(prompts, adapters)]
    start = time.perf_counter()
    engine.submit(seqs).result(60)
    done = tokens = 0
    while done < len(seqs):
        out = events.get(timeout=300)
        if out.error is not None:
            raise out.error
        tokens += len(out.token_ids)
        done += out.finish_reason is not None
    return tokens / (time.perf_counter() - start)


def llama_decode(llm, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        count += 1
        first = first or time.perf_counter()
        if count >= max_tokens:
            break
    return (count - 1) / (time.perf_counter() - first), first - start


def served_answers(engine, prompts: list[list[int]], adapter: str, max_tokens: int) -> list[str]:
    """The engine's greedy answers to every prompt (submitted at once; it batches them)."""
    import queue

    from lorakit.serve.sampling import SamplingParams
    from lorakit.serve.sequence import Sequence

    queues = [queue.SimpleQueue() for _ in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.submit([Sequence(p, adapter, params, q.put) for p, q in zip(prompts, queues)]).result(60)
    answers = []
    for q in queues:
        text = []
        while True:
            out = q.get(timeout=600)
            if out.error is not None:
                raise out.error
            text.append(out.text)
            if out.finish_reason is not None:
                break
        answers.append("".join(text).strip())
    return answers


def agreement(adapter: str, precisions: list[str], max_batch: int) -> dict:
    """Greedy answers of the served engine at each precision against the float32 base's through transformers'
    generate (what `lorakit eval` runs) on every held-out demo question."""
    from lorakit import PeftModel
    from lorakit.generation import encode_prompt, generate
    from lorakit.models import load_base_model
    from lorakit.serve.server import on_short_lived_thread

    conversations = [[{"role": "user", "content": q}] for q in questions()]

    def reference():
        base, tokenizer = load_base_model("smollm2")
        model = PeftModel.from_pretrained(base, adapter).eval()
        return tokenizer, generate(model, tokenizer, conversations, max_new_tokens=128, batch_size=16)

    tokenizer, expected = on_short_lived_thread(reference)
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    path = Path(adapter).resolve()
    result = {}
    for precision in ["fp32"] + [p for p in precisions if p != "fp32"]:
        engine, chosen = lorakit_engine(precision, path.parent, [path.name], max_batch)
        try:
            answers = served_answers(engine, prompts, path.name, 128)
        finally:
            engine.stop()
        result[precision] = {"precision": chosen, "equal_answers": sum(a == b for a, b in zip(answers, expected)),
                             "questions": len(prompts)}
    return result


def step_profile(precision: str, adapter_root: Path, name: str, steps: int = 20) -> dict:
    """One decode step (one row, an unmerged adapter, 100 tokens in the cache) under torch.profiler: milliseconds,
    PyTorch operations called from Python and aten calls in all (theirs included) per step, and the five that take
    longest, for the fast decode step
    (`lorakit serve`'s) and for the model's own forward (what it ran before)."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.models import load_base_model
    from lorakit.serve.kv_cache import SlotCache
    from lorakit.serve.served_model import ServedModel
    from lorakit.weight_only import prepare_for_decode

    model, tokenizer = load_base_model("smollm2")
    prepare_for_decode(model, precision)
    served = ServedModel(model, tokenizer, 2048)
    served.load_adapter(name, adapter_root / name)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    fast_step = served.fast_step
    result = {}
    torch.set_grad_enabled(False)
    for label, step in (("fast_step", fast_step), ("model_forward", None)):
        served.fast_step = step
        cache = SlotCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, 1, 2048, torch.float32,
                          torch.device("cpu"))
        ids, positions = torch.tensor([100]), torch.tensor([100])
        for _ in range(5):
            served.decode([name], ids, positions, cache)
        start = time.perf_counter()
        for _ in range(steps):
            served.decode([name], ids, positions, cache)
        ms = (time.perf_counter() - start) / steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                served.decode([name], ids, positions, cache)
        events = prof.key_averages()
        calls = sum(e.count for e in events if e.key.startswith("aten::")) / steps
        # the operations called from Python (an aten call not made by another one)
        outer = sum(1 for e in prof.events() if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))) / steps
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
        result[label] = {"ms_per_step": round(ms, 2), "operations_per_step": round(outer),
                         "aten_calls_per_step": round(calls),
                         "top_self_cpu": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                                           "self_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 2)}
                                          for e in top]}
    served.fast_step = fast_step
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="auto,fp32", help="lorakit decode precisions, comma list")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests in the aggregate run")
    parser.add_argument("--adapter", default=None, help="a trained adapter for the agreement run (runs/demo)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama_cpp is not importable: run `make llamacpp`")
    from lorakit.export.gguf import export_adapter_gguf
    from lorakit.generation import encode_prompt
    from lorakit.models import smollm2_gguf_path
    from lorakit.serve.server import on_short_lived_thread

    # Threads started from now on use args.threads; set from the main thread it would give that thread an OpenMP
    # team of its own (see on_short_lived_thread).
    on_short_lived_thread(torch.set_num_threads, args.threads)
    precisions = args.precisions.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    # Every PyTorch and llama.cpp call runs on a thread that ends with it: a thread that has run OpenMP work
    # keeps its team of threads, and with two teams in the process neither spins (see on_short_lived_thread).
    tokenizer, names = on_short_lived_thread(random_adapters, tmp, args.adapters)
    qs = questions()
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": qs[0]}])
    long_ids = tokenizer(" ".join(qs), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    long_prompt = encode_prompt(tokenizer, [{"role": "user", "content": tokenizer.decode(long_ids)}])
    requests = [(encode_prompt(tokenizer, [{"role": "user", "content": qs[i % len(qs)]}]), names[i % len(names)])
                for i in range(args.clients)]

    gguf = str(smollm2_gguf_path())
    llama_kw = {"n_ctx": 2048, "n_threads": args.threads, "n_threads_batch": args.threads, "verbose": False}

    def load_llama_cpp():  # llama.cpp's loading runs OpenMP work too: off the main thread, like the rest
        for name in names:
            export_adapter_gguf(tmp / name, tmp / f"{name}.gguf")
        return llama_cpp.Llama(model_path=gguf, **llama_kw), {
            name: llama_cpp.Llama(model_path=gguf, lora_path=str(tmp / f"{name}.gguf"), **llama_kw) for name in names}

    llm_plain, llms = on_short_lived_thread(load_llama_cpp)

    samples: dict[str, list] = {}
    chosen: dict[str, str] = {}

    def add(key, value):
        samples.setdefault(key, []).append(value)

    def llama_aggregate() -> float:
        start = time.perf_counter()
        for name in names:  # adapter by adapter, one request after another
            for p, a in requests:
                if a == name:
                    llama_decode(llms[name], p, args.max_tokens)
        return len(requests) * args.max_tokens / (time.perf_counter() - start)

    for run in range(args.runs):
        # one engine alive at a time (one engine thread, one OpenMP team), the precisions' order reversed every run
        for precision in precisions if run % 2 == 0 else precisions[::-1]:
            engine, chosen[precision] = lorakit_engine(precision, tmp, names, max_batch=args.clients)
            try:
                lorakit_decode(engine, prompt, names[0], 8)  # warm up
                add(f"lorakit_{precision}_decode", lorakit_decode(engine, prompt, names[0], args.max_tokens)[0])
                add(f"lorakit_{precision}_ttft", lorakit_decode(engine, long_prompt, names[0], 2)[1])
                add(f"lorakit_{precision}_aggregate", lorakit_aggregate(engine, [p for p, _ in requests],
                                                                        [a for _, a in requests], args.max_tokens))
            finally:
                engine.stop()
        llama = llms[names[0]]
        add("llama_cpp_decode", on_short_lived_thread(llama_decode, llama, prompt, args.max_tokens)[0])
        add("llama_cpp_base_only_decode", on_short_lived_thread(llama_decode, llm_plain, prompt, args.max_tokens)[0])
        add("llama_cpp_ttft", on_short_lived_thread(llama_decode, llama, long_prompt, 2)[1])
        add("llama_cpp_aggregate", on_short_lived_thread(llama_aggregate))
    medians = {k: round(statistics.median(v), 4 if "ttft" in k else 1) for k, v in samples.items()}
    ratios = {}
    for precision in precisions:
        ratios[precision] = {
            "decode_vs_llama_cpp": round(medians[f"lorakit_{precision}_decode"] / medians["llama_cpp_decode"], 3),
            "ttft_vs_llama_cpp": round(medians[f"lorakit_{precision}_ttft"] / medians["llama_cpp_ttft"], 3),
            "aggregate_vs_llama_cpp": round(medians[f"lorakit_{precision}_aggregate"]
                                            / medians["llama_cpp_aggregate"], 3)}
    result = {"threads": args.threads, "runs": args.runs, "max_tokens": args.max_tokens,
              "prompt_tokens": {"decode": len(prompt), "ttft": len(long_prompt)},
              "aggregate_requests": len(requests), "adapters": args.adapters, "torch": torch.__version__,
              "llama_cpp_python": llama_cpp.__version__,
              "precision_chosen": chosen,
              "medians": medians, "ratios": ratios, "samples": samples,
              "profile": {p: on_short_lived_thread(step_profile, p, tmp, names[0]) for p in precisions},
              "agreement": agreement(args.adapter, precisions, args.clients) if args.adapter else None}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
