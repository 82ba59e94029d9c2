"""Diagnostic: the same adapter weights scored through different inference paths (multiturn, test split)."""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
torch.set_num_threads(2)
import quality
from lorakit.train_config import TrainConfig
from lorakit.evaluate import evaluate
from lorakit.models import load_base_model
from lorakit.train import train

seed = int(sys.argv[1]); out = Path(sys.argv[2])
train_rows, scored, _ = quality.dataset_rows("multiturn", "test")
work = Path(tempfile.mkdtemp(prefix="xeval-"))
for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", scored)):
    (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
def cfg(o): return TrainConfig(data=str(work/"train.jsonl"), base="smollm2", out=str(work/o), seed=seed, bf16=True,
                               device="cpu", progress=False, attention="eager")
common = dict(data=str(work/"eval.jsonl"), include_base=False, batch_size=32, progress=False, bf16=True, device="cpu")
res = {}
def log(k, rep):
    res[k] = (rep.tuned.correct, round(rep.tuned.perplexity, 4), [r["tuned_correct"] for r in rep.rows])
    print(k, res[k][:2], flush=True)
    out.write_text(json.dumps(res))
def lorakit_on(attn, adapter):
    from lorakit import PeftModel
    m, tok = load_base_model("smollm2", dtype=torch.bfloat16, device="cpu", attention=attn)
    return PeftModel.from_pretrained(m, adapter), tok
def peft_on(attn, adapter):
    import peft
    m, tok = load_base_model("smollm2", dtype=torch.bfloat16, device="cpu", attention=attn)
    return peft.PeftModel.from_pretrained(m, adapter).eval(), tok

c = cfg("plain"); trained, _, _ = quality.plain_peft_loop(c)
log("plain/in-memory-peft-eager", evaluate(model=trained["model"], tokenizer=trained["tokenizer"], **common))
trained["model"].save_pretrained(str(work/"plain"))
del trained
log("plain/lorakit-default(sdpa)", evaluate(base="smollm2", adapter=str(work/"plain"), **common))
m, t = lorakit_on("eager", str(work/"plain")); log("plain/lorakit-eager", evaluate(model=m, tokenizer=t, **common))
m, t = peft_on("sdpa", str(work/"plain")); log("plain/peft-sdpa", evaluate(model=m, tokenizer=t, **common))
c = cfg("lk"); train(c)
log("lorakit/lorakit-default(sdpa)", evaluate(base="smollm2", adapter=str(work/"lk"), **common))
m, t = lorakit_on("eager", str(work/"lk")); log("lorakit/lorakit-eager", evaluate(model=m, tokenizer=t, **common))
m, t = peft_on("eager", str(work/"lk")); log("lorakit/peft-eager", evaluate(model=m, tokenizer=t, **common))
m, t = peft_on("sdpa", str(work/"lk")); log("lorakit/peft-sdpa", evaluate(model=m, tokenizer=t, **common))
