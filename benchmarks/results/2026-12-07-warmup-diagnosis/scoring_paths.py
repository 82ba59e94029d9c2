"""One-off: train multiturn adapters as benchmarks/quality.py does (bf16 autocast, eager attention), keep them, and
score each the ways the two loops are scored: lorakit's loader (transformers' default attention, sdpa) as quality.py
scores lorakit; PEFT's loader on an eager base, as quality.py scores the plain loop (its trained model); and the
cross pairs. Usage: scoring_paths.py OUTDIR RECIPE SEED [SEED ...]  (RECIPE as quality.py: lorakit[...] or plain)."""
import json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
torch.set_num_threads(2)
import quality
from lorakit.evaluate import evaluate
from lorakit.models import load_base_model

out_dir, recipe, seeds = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
out_dir.mkdir(parents=True, exist_ok=True)
SCORING = dict(data=str(out_dir / "eval.jsonl"), include_base=False, batch_size=32, progress=False, bf16=True,
               device="cpu")  # quality.py's evaluate settings
train_rows, scored_rows, epochs = quality.dataset_rows("multiturn", "test")
for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", scored_rows)):
    (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def score_ways(adapter: Path) -> dict:
    import peft
    from lorakit import PeftModel as LkPeft
    res = {}
    r = evaluate(base="smollm2", adapter=str(adapter), **SCORING).tuned  # quality.py's lorakit scoring
    res["lorakit_default_attn"] = (r.correct, round(r.perplexity, 4))
    for attn in ("eager", "sdpa"):
        for loader in ("lorakit", "peft"):
            model, tok = load_base_model("smollm2", dtype=torch.bfloat16, device="cpu", attention=attn)
            m = (LkPeft if loader == "lorakit" else peft.PeftModel).from_pretrained(model, str(adapter))
            m.eval()
            r = evaluate(model=m, tokenizer=tok, **SCORING).tuned
            res[f"{loader}_{attn}"] = (r.correct, round(r.perplexity, 4))
    return res


for seed in seeds:
    t0 = time.time()
    job = quality.Job("multiturn", recipe, seed, "test", base="smollm2", device="cpu", bf16=True, shared={},
                      workdir=str(out_dir))
    name, config = quality.job_config(job, out_dir, epochs)
    adapter = out_dir / f"{name}-s{seed}"
    config.out = str(adapter)
    if name == "plain":
        trained, _, _ = quality.plain_peft_loop(config)
        trained["model"].save_pretrained(str(adapter))
        final = trained["final_loss"]
        r = evaluate(model=trained["model"], tokenizer=trained["tokenizer"], **SCORING).tuned
        inmem = (r.correct, round(r.perplexity, 4))
        del trained
    else:
        from lorakit.train import train
        final = train(config).final_loss
        inmem = None
    row = {"recipe": recipe, "seed": seed, "final_loss": round(final, 5), "in_memory": inmem, **score_ways(adapter),
           "seconds": round(time.time() - t0)}
    print(json.dumps(row), flush=True)
    with open(out_dir / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
