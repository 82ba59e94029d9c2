"""One-off: where lorakit's bf16 path departs from float32 more than PEFT's, at a trained multiturn adapter.
Per decoder layer: relative error of the hidden states (forward, eval mode, no labels) against PEFT float32.
Per LoRA parameter group (q/k/v/o x A/B): relative gradient error against PEFT float32 (lorakit unfused loss).
Variants of lorakit's general path (a no-op hook on every base layer), monkeypatched here only: _peftsum sums the
update as PEFT does (x A^T B^T rounded to bf16, times s, added and rounded again), _fp32update computes the update in
the adapter's dtype (float32) under autocast and rounds the sum once. A third argument picks the compared variants
(default: peft_bf16,lorakit_bf16,lorakit_bf16_general). Measures the library as of commit 35aa7cc."""
import json, sys, statistics
from collections import defaultdict
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for grad_precision
import grad_precision as gp
from lorakit.precision import autocast
from lorakit.loss import batch_loss

torch.set_num_threads(2)
adapter, out_path = sys.argv[1], sys.argv[2]
base = "smollm2"
data = str(Path(__file__).resolve().parents[2] / "data" / "multiturn" / "train.jsonl")
batches = gp._batches(base, data, 2, 8, 0)
trained = gp._adapter_weights(adapter)
compared = (sys.argv[3] if len(sys.argv) > 3 else "peft_bf16,lorakit_bf16,lorakit_bf16_general").split(",")
variants = {"ref": ("peft", False, None), "peft_bf16": ("peft", True, None), "lorakit_bf16": ("lorakit", True, False),
            "lorakit_bf16_general": ("lorakit", True, False), "lorakit_bf16_general_peftsum": ("lorakit", True, False),
            "lorakit_bf16_general_fp32update": ("lorakit", True, False)}
variants = {k: v for k, v in variants.items() if k == "ref" or k in compared}
import lorakit.kernels as K
_orig = K._plus_update_in
_orig_update = K._plus_update
def _fp32_update(out, x, lora, training, in_place, dora=None):  # the update in the adapter's dtype even under autocast
    with torch.autocast(x.device.type, enabled=False):
        return _orig(out, x, lora, lora.a.dtype, training, in_place, dora)
def _peft_sum(out, x, lora, dtype, training, in_place, dora):
    a, b, x_lora, dropped = K._in_dtype(x, lora, dtype, training)
    return out + (x_lora @ a.t() @ b.t()) * lora.scaling
hidden, grads = {}, {}
for name, (lib, bf16, fused) in variants.items():
    model = gp._adapted(lib, base, bf16, fused, 0, trained)
    K._plus_update_in = _peft_sum if name.endswith("_peftsum") else _orig
    K._plus_update = _fp32_update if name.endswith("_fp32update") else _orig_update
    if "_general" in name:  # a hook on each base layer turns the fast LoRA node off: kernels.add_lora instead
        for n, m in model.named_modules():
            if n.endswith("base_layer"):
                m.register_forward_hook(lambda mod, i, o: None)
    layers = [m for n, m in model.named_modules() if n.endswith(tuple(f"layers.{i}" for i in range(100)))]
    layers = [m for m in layers if type(m).__name__.endswith("DecoderLayer")]
    store = []
    hooks = [l.register_forward_hook(lambda m, i, o: store.append((o[0] if isinstance(o, tuple) else o).detach().float().clone())) for l in layers]
    model.eval()
    with torch.no_grad(), autocast(bf16, "cpu"):
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks: h.remove()
    hidden[name] = store
    model.train()
    per = defaultdict(list)
    for b in batches:
        model.zero_grad(set_to_none=True)
        with autocast(bf16, "cpu"):
            if lib == "peft":
                loss = model(**b).loss
            else:
                s, n = batch_loss(model, b); loss = s / n
        loss.backward()
        g = {}
        for pn, p in model.named_parameters():
            if p.requires_grad:
                mod = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in pn][0]
                ab = "A" if "lora_A" in pn else "B"
                g.setdefault(f"{mod}.{ab}", []).append(p.grad.float().flatten())
        for k, v in g.items():
            per[k].append(torch.cat(v))
    grads[name] = per
    del model
res = {"hidden_rel_error_by_layer": {}, "grad_rel_error_by_group": {}}
n_layers = len(hidden["ref"]) // len(batches)
for name in compared:
    errs = []
    for li in range(n_layers):
        e = []
        for bi in range(len(batches)):
            r = hidden["ref"][bi * n_layers + li]; o = hidden[name][bi * n_layers + li]
            mask = batches[bi]["attention_mask"].bool()
            e.append(float((o[mask] - r[mask]).norm() / r[mask].norm()))
        errs.append(round(statistics.mean(e), 5))
    res["hidden_rel_error_by_layer"][name] = errs
    res["grad_rel_error_by_group"][name] = {k: [round(float((o - r).norm() / r.norm()), 5)
                                               for o, r in zip(grads[name][k], grads["ref"][k])]
                                           for k in sorted(grads["ref"])}
print(json.dumps(res, indent=1))
Path(out_path).write_text(json.dumps(res, indent=1))
