"""Real llama.cpp (llama-cpp-python, `make llamacpp`) on the embedded SmolLM2 GGUF with lorakit's exports: the
adapter file changes llama.cpp's logits exactly as the adapter changes lorakit's, and the merged GGUF model gives
the merged model's logits. Skips, saying why, when llama_cpp is not importable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.export.gguf import export_adapter_gguf
from lorakit.export.gguf_format import GGUFArchitecture
from lorakit.export.merged_gguf import export_merged_gguf, write_model_gguf
from lorakit.models import load_base_model, smollm2_gguf_path

try:
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"llama_cpp is not importable ({exc}); `make llamacpp` installs llama-cpp-python",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("all_threads")
# One llama.cpp thread: with two on a shared 2-core machine, the adapter's extra graph nodes (a thread barrier
# each) made decoding ~100x slower whenever another process held a core; one thread has no barriers.
THREADS = 1
PROMPT = "<|im_start|>user\nHow do I reset my password?<|im_end|>\n<|im_start|>assistant\n"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The embedded base, a random adapter on every linear layer (big enough to move the logits by ~2), and an
    f32 GGUF copy of the base: llama.cpp's Q4_1 matmuls round the activations to 8 bits (logits off by ~1),
    float32 ones do not, so the copy shows the adapter's own effect to 1e-2."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    model, tokenizer = load_base_model("smollm2")
    base_f32 = tmp / "base-f32.gguf"
    write_model_gguf(model, tokenizer, base_f32, "f32", smollm2_gguf_path(), "SmolLM2 f32")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    peft.save_pretrained(tmp / "adapter")
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        tuned = peft(input_ids=torch.tensor([ids])).logits[0].numpy()
        with peft.disable_adapter():
            base = peft(input_ids=torch.tensor([ids])).logits[0].numpy()
    return dict(tmp=tmp, peft=peft, tokenizer=tokenizer, ids=ids, tuned=tuned, base=base, base_f32=base_f32)


def llama_logits(model_path, ids, lora_path=None) -> np.ndarray:
    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=THREADS, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_llama_cpp_applies_the_exported_adapter_as_lorakit_does(setup, monkeypatch):
    adapter = setup["tmp"] / "adapter.gguf"
    export_adapter_gguf(setup["tmp"] / "adapter", adapter, outtype="f32")
    effect = np.abs(setup["tuned"] - setup["base"]).max()
    assert effect > 1.0  # the adapter visibly changes the logits
    tuned = llama_logits(setup["base_f32"], setup["ids"], adapter)
    assert np.abs(tuned - setup["tuned"]).max() < 0.05
    assert (tuned.argmax(-1) == setup["tuned"].argmax(-1)).all()

    # without llama.cpp's row order for q and k, the same adapter lands on the wrong rotary pairs
    monkeypatch.setattr(GGUFArchitecture, "rows_to_llama_cpp", lambda self, name, rows: rows)
    unordered = setup["tmp"] / "unordered.gguf"
    export_adapter_gguf(setup["tmp"] / "adapter", unordered, outtype="f32")
    assert np.abs(llama_logits(setup["base_f32"], setup["ids"], unordered) - setup["tuned"]).max() > 0.5


def test_the_adapter_on_the_shipped_q4_gguf_gives_lorakits_greedy_answer(setup):
    """The user's case: the f16 adapter file on the very GGUF file lorakit's base was converted from."""
    adapter = setup["tmp"] / "adapter-f16.gguf"
    export_adapter_gguf(setup["tmp"] / "adapter", adapter)  # f16, the default
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), lora_path=str(adapter), n_ctx=256, verbose=False,
                          n_threads=THREADS)
    steps = 12
    theirs = [token for token, _ in zip(llm.generate(setup["ids"], temp=0.0, top_k=1), range(steps))]
    with torch.no_grad():
        ours = setup["peft"].generate(torch.tensor([setup["ids"]]), max_new_tokens=steps, do_sample=False,
                                      eos_token_id=None)[0, len(setup["ids"]):].tolist()
    assert theirs == ours, (setup["tokenizer"].decode(theirs), setup["tokenizer"].decode(ours))


def test_llama_cpp_runs_the_merged_gguf_as_the_merged_model(setup):
    out = setup["tmp"] / "merged.gguf"
    export_merged_gguf(setup["tmp"] / "adapter", out, outtype="f32")
    assert out.with_suffix(".Modelfile").read_text().count("FROM ./merged.gguf") == 1
    merged = llama_logits(out, setup["ids"])
    assert np.abs(merged - setup["tuned"]).max() < 0.05
