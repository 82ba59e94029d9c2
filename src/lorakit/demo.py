"""`lorakit demo`: fine-tune the embedded SmolLM2 on the shipped support data, then score base vs adapter."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from lorakit import precision
from lorakit.adapter_folder import EVAL_NAME, LOSS_PLOT_NAME, RUN_FILES, TRAIN_RECORD_NAME
from lorakit.errors import TrainError
from lorakit.models import DEFAULT_BASE
from lorakit.train_config import TrainConfig, lora_recipe

DEMO_OUT = "runs/demo"


def demo_data_dir() -> Path:
    d = Path(__file__).parent / "demo_data"
    if not (d / "train.jsonl").is_file() or not (d / "eval.jsonl").is_file():
        raise TrainError(f"the demo dataset is missing from {d} (train.jsonl, eval.jsonl); reinstall lorakit")
    return d


def demo_config(out: str = DEMO_OUT, base: str = DEFAULT_BASE, bf16: bool = True) -> TrainConfig:
    """The demo run: LoRA r=16 on q, k, v, o of the embedded model, sized to finish fast on 2 CPU cores.

    `bf16`: train and score under bf16 autocast, for machines where bf16 matmuls are the faster ones
    (`precision.bf16_matmul_speedup`); otherwise float32 with SDPA attention, which beats eager attention
    in float32 on the CPU (eager beats SDPA's CPU kernels in bf16 on these short rows).
    """
    data = demo_data_dir()
    return TrainConfig(
        base=base, data=str(data / "train.jsonl"), eval_data=None, out=out,
        lora=lora_recipe(lora_dropout=0.0),  # dropout's random masks cost ~10% of a step, and no accuracy here
        # The demo's own schedule and batching: decaying lr, batches sorted by length (less padding, so faster
        # steps on a CPU). On the demo's validation split (benchmarks/quality.py's `demo` recipe), clipping at 1.0
        # scored higher than none and 3 epochs higher than 2, on every seed or tied.
        epochs=3, lr=3e-3, lr_scheduler="cosine", batch_size=4, warmup_ratio=0.05, max_grad_norm=1.0,
        group_by_length=True, length_tolerance=0.0, max_length=256, seed=0,
        system_prompt=None, bf16=bf16, attention="eager" if bf16 else "sdpa",
    )


def _is_demo_output(name: str) -> bool:
    # a leftover of an interrupted atomic write is named .<file>.<random>.tmp
    return name in RUN_FILES or (name.endswith(".tmp") and any(name.startswith(f".{o}.") for o in RUN_FILES))


def clear_earlier_demo_output(out: Path) -> None:
    """Delete what an earlier demo run left in `out`; refuse a directory that holds anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainError(f"--out {out} is a file; choose another --out")
    entries = list(out.iterdir())
    names = {entry.name for entry in entries}
    from_lorakit = TRAIN_RECORD_NAME in names or "checkpoints" in names
    if entries and not (from_lorakit and all(_is_demo_output(name) for name in names)):
        raise TrainError(f"--out {out} is not empty and is not the output of an earlier lorakit demo; choose another "
                         "--out or empty it")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_demo(out: str = DEMO_OUT, base: str = DEFAULT_BASE, epochs: Optional[int] = None,
             max_steps: Optional[int] = None, quantize: Optional[str] = None, eval_batch_size: int = 32,
             eval_limit: Optional[int] = None) -> None:
    """Train, score and print what a new user should see; the precision is the faster one here (measured)."""
    from lorakit.evaluate import evaluate
    from lorakit.models import resolve_device, smollm2_dir
    from lorakit.report import write_report
    from lorakit.train import train

    t0 = time.perf_counter()
    speedup = precision.bf16_matmul_speedup(resolve_device("auto"))
    config = demo_config(out, base, bf16=speedup >= precision.BF16_MIN_SPEEDUP)
    config.epochs = epochs or config.epochs
    config.max_steps, config.quantize = max_steps, quantize
    out_dir = Path(config.out)
    clear_earlier_demo_output(out_dir)  # the demo always starts fresh
    method = "QLoRA (NF4 base)" if config.quantize else "LoRA"
    print(f"lorakit demo: fine-tune {config.base} with {method} (r={config.lora.r} on "
          f"{','.join(config.target_names)}) on {config.data}, then score base vs adapter on "
          f"{demo_data_dir() / 'eval.jsonl'}", flush=True)
    print(f"precision: {'bf16 autocast' if config.bf16 else 'float32'} (bf16 matmuls run {speedup:.2f}x as fast as "
          "float32 ones here)", flush=True)
    if config.base == DEFAULT_BASE:
        smollm2_dir()  # converts the embedded model on the first run
    result = train(config)
    print(result.summary(), flush=True)
    eval_file = demo_data_dir() / "eval.jsonl"
    report = evaluate(base=config.base, adapter=config.out, data=str(eval_file), batch_size=eval_batch_size,
                      json_out=str(out_dir / EVAL_NAME), limit=eval_limit, bf16=config.bf16)
    print(f"\n{report.n} held-out questions ({eval_file.name}; none of them appears in the training data):")
    print(report.table())
    examples = [r for r in report.rows if r["tuned_correct"] and not r["base_correct"]][:2]
    for row in examples:
        print(f"\nQ: {row['query']}")
        print(f"  base:    {_clip(row['base_answer'])}")
        print(f"  adapter: {_clip(row['tuned_answer'])}")
    print(f"\nadapter saved to {out_dir.resolve()}")
    print(f"  scores and every answer: {out_dir / EVAL_NAME}; loss curve: {out_dir / LOSS_PLOT_NAME}")
    print(f"  the run on one page (open it in a browser): {write_report(out_dir)}")
    if examples:
        print(f"  try it: lorakit generate --adapter {out_dir} \"{examples[0]['query']}\"")
    print(f"{report.summary()}; demo total {time.perf_counter() - t0:.0f}s")


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
