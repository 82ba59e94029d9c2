"""Held-out quality of lorakit's training recipe vs a plain PEFT loop, over datasets and seeds. Prints JSON.

    python benchmarks/quality.py                                   # the README's table (long: see below)
    python benchmarks/quality.py --datasets demo100 --seeds 0 --recipes lorakit,plain
    python benchmarks/quality.py --split validation --recipes "lorakit[lr_scheduler=linear],plain" --out tune.json
    python benchmarks/quality.py --pick tune.json                  # the best lorakit recipe of a validation run

Datasets (each trained from scratch on SmolLM2-135M, then scored by `lorakit.evaluate`: key-facts accuracy of
greedy answers to held-out questions, the adapter alone):
  demo       the demo's train.jsonl (910 rows), scored on its eval.jsonl (130 held-out phrasings); default epochs
  demo100    a 100-row random subsample (seed 0) of train.jsonl, 5 epochs, scored on eval.jsonl
  multiturn  benchmarks/data/multiturn (scripts/make_multiturn_data.py): 312 two- or three-question conversations,
             scored on the last answer of 78 conversations whose last question is a held-out phrasing
`--split validation` never touches those eval sets: it carves a validation set out of each training file (130
rows of the demo's train.jsonl, seed 1, the 780 others to train on, demo100 drawn from those; 52 of the 312
conversations) and scores on it. Defaults are chosen there (`--pick`), and reported on the held-out sets.

Recipes: `lorakit` (TrainConfig's defaults), `lorakit_nf4` (the same with QLoRA), `before` (the defaults up to
this benchmark: lr 2e-4, cosine, warmup 5%, clipping at 1.0, exact length sorting), `demo` (`lorakit demo`'s run,
its epochs winning over a dataset's), and `plain`: a plain loop over PEFT's get_peft_model (the real `peft`
package) with shuffled batches, a constant lr, no clipping, AdamW; the same r, alpha, targets, dropout, epochs,
batch size, lr, weight decay and tokenized data as the lorakit recipe it is compared with. The comparison is
paired: with one seed both start from the same LoRA weights (PEFT and lorakit draw A the same way after
torch.manual_seed) and see the same shuffled batches (lorakit.data's training_batches without grouping), so what
differs between them is the recipe, not the luck of the draw.
`NAME[key=value,...]` changes TrainConfig fields of one recipe; `--set key=value,...` changes them for every recipe,
the plain loop too.
Precision: bf16 autocast where bf16 matmuls are faster (precision.bf16_matmul_speedup, as the demo), else fp32.
`--jobs N` runs N trainings at once in separate processes (for a GPU; tokens/s are then shared-device figures).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from train_step import emit  # benchmarks/ is the script's directory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "src" / "lorakit" / "demo_data"
MULTITURN_DIR = ROOT / "benchmarks" / "data" / "multiturn"
DATASETS = ("demo", "demo100", "multiturn")
NAMED = {
    "lorakit": {},
    "lorakit_nf4": {"quantize": "nf4"},
    "before": {"lr": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.05, "warmup_steps": 0, "max_grad_norm": 1.0,
               "group_by_length": True, "length_tolerance": 0.0},
    "plain": {},
    "demo": {},  # `lorakit demo`'s own run, read from lorakit.demo (demo_recipe)
}
SHARED_KEYS = ("lr", "epochs", "batch_size", "weight_decay")  # settings the plain loop shares with the recipe


# -- datasets ----------------------------------------------------------------------------------------------

def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dataset_rows(name: str, split: str) -> tuple[list[dict], list[dict], int | None]:
    """(train rows, scoring rows, epochs or None for the default) of a dataset; split 'test' or 'validation'."""
    if name in ("demo", "demo100"):
        train, scored = _read(DEMO_DIR / "train.jsonl"), _read(DEMO_DIR / "eval.jsonl")
        n_val = len(scored)
    elif name == "multiturn":
        train, scored = _read(MULTITURN_DIR / "train.jsonl"), _read(MULTITURN_DIR / "eval.jsonl")
        n_val = len(train) // 6
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split == "validation":  # carved out of the training rows; the eval files stay unseen
        shuffled = train[:]
        random.Random(1).shuffle(shuffled)
        scored, train = shuffled[:n_val], shuffled[n_val:]
    if name == "demo100":
        return random.Random(0).sample(train, 100), scored, 5
    return train, scored, None


# -- recipes -----------------------------------------------------------------------------------------------

def _value(key: str, text: str):
    from lorakit.train_config import TrainConfig

    declared = {f.name: f.type for f in dataclasses.fields(TrainConfig)}.get(key)
    if declared is None:
        raise SystemExit(f"{key!r} is not a TrainConfig field")
    declared = declared.removeprefix("Optional[").removesuffix("]")
    if text == "None":
        return None
    if declared == "bool":
        return text.lower() in ("1", "true", "yes", "on")
    return {"int": int, "float": float}.get(declared, str)(text)


def parse_settings(text: str) -> dict:
    """'lr=1e-3,max_grad_norm=0' -> {'lr': 0.001, 'max_grad_norm': 0.0}."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"settings must be key=value pairs, got {text!r}")
    return {k.strip(): _value(k.strip(), v.strip()) for k, v in pairs}


def demo_recipe() -> dict:
    """The TrainConfig settings of `lorakit demo` (its adapter, epochs, schedule, batching, clipping), without what
    names the run (data, base, output, seed, precision)."""
    from lorakit.demo import demo_config

    run_keys = ("data", "base", "eval_data", "out", "seed", "bf16", "attention", "device", "progress")
    return {k: v for k, v in dataclasses.asdict(demo_config()).items() if k not in run_keys}


def parse_recipe(spec: str) -> tuple[str, dict]:
    """'lorakit[lr=1e-3]' -> ('lorakit', {'lr': 0.001}), the named recipe's changes included."""
    name, _, rest = spec.partition("[")
    if name not in NAMED:
        raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(NAMED)}")
    named = demo_recipe() if name == "demo" else NAMED[name]
    return name, {**named, **parse_settings(rest.rstrip("]"))}


def split_recipes(text: str) -> list[str]:
    """Recipes are comma-separated, and commas inside [...] belong to a recipe."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    return [r for r in out + [current.strip()] if r]


# -- one run -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    dataset: str
    recipe: str
    seed: int
    split: str
    base: str
    device: str
    bf16: bool
    shared: dict
    workdir: str
    eval_batch_size: int = 32
    eval_limit: int | None = None


def job_config(job: Job, work: Path, epochs: int | None):
    """(the recipe's name, its TrainConfig) for a job whose train.jsonl is in `work`; the adapter goes to work/out."""
    from lorakit.train_config import TrainConfig

    name, changes = parse_recipe(job.recipe)
    settings = {**({"epochs": epochs} if epochs else {}), **job.shared, **changes}
    return name, TrainConfig(data=str(work / "train.jsonl"), base=job.base, out=str(work / "out"), seed=job.seed,
                             bf16=job.bf16, device=job.device, progress=False,
                             attention="eager" if job.bf16 else "sdpa", **settings)


def run_job(job: Job) -> dict:
    """Train one recipe on one dataset with one seed, score it; the result row."""
    import torch

    from lorakit.data import padding_share, training_batches
    from lorakit.evaluate import evaluate

    train_rows, scored_rows, epochs = dataset_rows(job.dataset, job.split)
    work = Path(tempfile.mkdtemp(prefix=f"{job.dataset}-", dir=job.workdir))
    try:
        for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", scored_rows[:job.eval_limit])):
            (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        name, config = job_config(job, work, epochs)
        common = {"data": str(work / "eval.jsonl"), "include_base": False, "batch_size": job.eval_batch_size,
                  "progress": False, "bf16": job.bf16, "device": job.device}
        t0 = time.perf_counter()
        if name == "plain":
            trained, lengths, batches = plain_peft_loop(config)
            report = evaluate(model=trained["model"], tokenizer=trained["tokenizer"], **common)
        else:
            from lorakit.train import train

            result = train(config)
            trained = {"tokens_per_s": result.tokens_per_s, "train_seconds": result.train_seconds,
                       "steps": result.steps, "final_loss": result.final_loss}
            lengths = _lengths(config)
            batches = [b for e in range(math.ceil(result.epochs))
                       for b in training_batches(lengths, config.batch_size, config.seed, e, config.group_by_length,
                                                 tolerance=config.length_tolerance)][:result.steps * config.grad_accum]
            report = evaluate(base=config.base, adapter=config.out, **common)
        tuned = report.tuned
        return {"dataset": job.dataset, "recipe": job.recipe, "seed": job.seed, "split": job.split,
                "accuracy": tuned.accuracy, "correct": tuned.correct, "n": tuned.n,
                "perplexity": round(tuned.perplexity, 4), "tokens_per_s": round(trained["tokens_per_s"], 1),
                "train_seconds": round(trained["train_seconds"], 2), "steps": trained["steps"],
                "final_loss": round(trained["final_loss"], 5), "padding_share": round(padding_share(lengths, batches), 4),
                "seconds": round(time.perf_counter() - t0, 1), "device": str(job.device), "bf16": job.bf16,
                "settings": {k: v for k, v in dataclasses.asdict(config).items()
                             if k in ("lr", "lr_scheduler", "warmup_ratio", "warmup_steps", "max_grad_norm", "epochs",
                                      "batch_size", "group_by_length", "length_tolerance", "weight_decay",
                                      "quantize")}
                | {"r": config.lora.r, "alpha": config.lora.lora_alpha,
                   "dropout": config.lora.lora_dropout}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if "torch" in sys.modules and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _lengths(config) -> list[int]:
    from lorakit.models import load_tokenizer
    from lorakit.train import load_data

    return load_data(config, load_tokenizer(config.base), config.data).lengths


def plain_peft_loop(config) -> tuple[dict, list[int], list[list[int]]]:
    """The plain loop: PEFT's get_peft_model, AdamW at a constant lr, shuffled batches, no clipping."""
    import peft
    import torch

    from lorakit.data import collate, training_batches
    from lorakit.models import load_base_model, resolve_device
    from lorakit.precision import autocast
    from lorakit.train import load_data

    device = resolve_device(config.device)
    model, tokenizer = load_base_model(config.base, dtype=torch.bfloat16 if config.bf16 else torch.float32,
                                       device=device, attention=config.attention)
    data = load_data(config, tokenizer, config.data)
    torch.manual_seed(config.seed)
    lora = config.lora
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules, lora_dropout=lora.lora_dropout,
        task_type="CAUSAL_LM"))  # adapter weights in float32 (PEFT's autocast_adapter_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    batches, losses, tokens, seconds = [], [], 0, 0.0
    model.train()
    epochs = config.epochs if not config.max_steps else math.ceil(config.max_steps * config.batch_size / len(data))
    for epoch in range(epochs):
        for idx in training_batches(data.lengths, config.batch_size, config.seed, epoch, group_by_length=False):
            if config.max_steps and len(losses) == config.max_steps:
                break
            batch = {k: v.to(device) for k, v in collate([data.items[i] for i in idx], tokenizer.pad_token_id).items()}
            t0 = time.perf_counter()
            with autocast(config.bf16, device.type):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # waits for the device: the step's time is all in `seconds`
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            batches.append(idx)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return ({"model": model, "tokenizer": tokenizer, "tokens_per_s": tokens / seconds, "train_seconds": seconds,
             "steps": len(losses), "final_loss": sum(tail) / len(tail)}, data.lengths, batches)


# -- many runs ---------------------------------------------------------------------------------------------

def _init_worker(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], n_workers: int, threads: int, log_path: str | None, deadline: float | None) -> list[dict]:
    """Every job (in parallel processes with n_workers > 1); rows appended to log_path as they finish. Jobs not
    started by `deadline` (time.time()) are dropped."""
    rows = []

    def done(row: dict) -> None:
        rows.append(row)
        print(f"  {row['dataset']:<9} {row['recipe']:<48} seed {row['seed']}: {row['accuracy']:.3f} "
              f"({row['tokens_per_s']:.0f} tok/s, {row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    if n_workers <= 1:
        _init_worker(threads)
        for job in jobs:
            if deadline and time.time() > deadline:
                break
            done(run_job(job))
        return rows
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker,
                                     initargs=(threads,)) as pool:
        pending = {pool.submit(run_job, job): job for job in jobs}
        while pending:
            finished, _ = futures.wait(pending, timeout=5, return_when=futures.FIRST_COMPLETED)
            for f in finished:
                job = pending.pop(f)
                if f.cancelled():
                    continue
                try:
                    done(f.result())
                except Exception as e:  # one failed run must not lose the others
                    print(f"  {job.dataset} {job.recipe} seed {job.seed}: FAILED {e!r}", file=sys.stderr, flush=True)
            if deadline and time.time() > deadline:
                for f in list(pending):
                    if f.cancel():
                        pending.pop(f)
    return rows


def summarize(rows: list[dict]) -> dict:
    """dataset -> recipe -> mean and sd of the accuracy over seeds, and the speed."""
    table: dict = {}
    for row in rows:
        table.setdefault(row["dataset"], {}).setdefault(row["recipe"], []).append(row)
    out = {}
    for dataset, recipes in table.items():
        out[dataset] = {}
        for recipe, runs in recipes.items():
            acc = [r["accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
            out[dataset][recipe] = {
                "accuracy_mean": round(statistics.mean(acc), 4),
                "accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
                "accuracy_by_seed": acc, "seeds": sorted(r["seed"] for r in runs),
                "tokens_per_s_mean": round(statistics.mean(r["tokens_per_s"] for r in runs), 1),
                "padding_share_mean": round(statistics.mean(r["padding_share"] for r in runs), 4),
                "final_loss_mean": round(statistics.mean(r["final_loss"] for r in runs), 5),
                "perplexity_mean": round(statistics.mean(r["perplexity"] for r in runs), 4),
                "settings": runs[0]["settings"]}
    return out


def pick(summary: dict, exclude: tuple[str, ...] = ("plain", "before", "demo")) -> tuple[str | None, dict]:
    """The recipe with the best accuracy averaged over datasets (each dataset weighing the same), among those
    run on every dataset with the most seeds; its score and every candidate's."""
    datasets = list(summary)
    candidates = {}
    for recipe in {r for d in datasets for r in summary[d]}:
        if recipe.split("[")[0] in exclude or any(recipe not in summary[d] for d in datasets):
            continue
        seeds = min(len(summary[d][recipe]["seeds"]) for d in datasets)
        candidates[recipe] = (seeds, round(statistics.mean(summary[d][recipe]["accuracy_mean"] for d in datasets), 4))
    if not candidates:
        return None, {}
    most = max(seeds for seeds, _ in candidates.values())
    scores = {r: score for r, (seeds, score) in candidates.items() if seeds == most}
    return max(sorted(scores), key=lambda r: scores[r]), dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--recipes", default="lorakit,plain,lorakit_nf4", help="comma list of recipes (see above)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--set", dest="shared", default="", help="TrainConfig changes for every recipe: key=value,...")
    p.add_argument("--base", default="smollm2")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N rows (quick checks)")
    p.add_argument("--order", choices=("recipe", "seed"), default="recipe",
                   help="recipe: each recipe's runs together; seed: per dataset, every recipe of a seed together")
    p.add_argument("--time-limit", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--log", help="append each run's row here as it finishes (JSON lines)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--pick", metavar="JSON", help="print the best lorakit recipe of an earlier (validation) run")
    args = p.parse_args(argv)
    if args.pick:
        best, scores = pick(json.loads(Path(args.pick).read_text())["summary"])
        result = {"best": best, "scores": scores}
        if best:  # what --set and the recipe's [...] take to compare it with the plain loop at the same settings
            changes = parse_settings(best.partition("[")[2].rstrip("]"))
            result["shared"] = ",".join(f"{k}={v}" for k, v in changes.items() if k in SHARED_KEYS)
            result["recipe"] = ",".join(f"{k}={v}" for k, v in changes.items() if k not in SHARED_KEYS)
        print(json.dumps(result, indent=2))
        return result

    from lorakit import precision
    from lorakit.models import resolve_device

    device = resolve_device(args.device)
    speedup = precision.bf16_matmul_speedup(device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and speedup >= precision.BF16_MIN_SPEEDUP)
    shared = parse_settings(args.shared)
    recipes = split_recipes(args.recipes)
    for recipe in recipes:
        parse_recipe(recipe)  # a typo fails before any training
    workdir = tempfile.mkdtemp(prefix="lorakit-quality-")
    seeds = [int(s) for s in args.seeds.split(",")]
    # recipe-major: a time limit leaves the first recipes complete; seed-major: whole comparisons, seed by seed
    def job(d, r, s):
        return Job(d, r, s, args.split, args.base, str(device), bf16, shared, workdir, args.eval_batch_size,
                   args.eval_limit)

    datasets = args.datasets.split(",")
    jobs = [job(d, r, s) for r in recipes for s in seeds for d in datasets] if args.order == "recipe" else \
        [job(d, r, s) for d in datasets for s in seeds for r in recipes]
    t0 = time.time()
    try:
        rows = run_jobs(jobs, args.jobs, args.threads, args.log, t0 + args.time_limit if args.time_limit else None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(rows)
    result = {"split": args.split, "base": args.base, "device": str(device), "bf16": bf16,
              "bf16_matmul_speedup": round(speedup, 2), "jobs": args.jobs, "shared_settings": shared,
              "seeds": seeds, "seconds": round(time.time() - t0, 1), "runs_planned": len(jobs), "runs": rows,
              "summary": summary}
    if args.split == "validation":
        result["pick"], result["pick_scores"] = pick(summary)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
