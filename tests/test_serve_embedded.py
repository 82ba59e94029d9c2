"""End to end on the embedded SmolLM2-135M (the one serve test with the real model, ~30 s): two adapters
and the base answered in one batch over HTTP, each equal to lorakit's offline greedy generation."""

from __future__ import annotations

import argparse
import concurrent.futures
import copy

import openai
import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.models import load_base_model
from lorakit.serve import ServerThread, add_serve_arguments, build_server

QUESTION = "How do I reset my password?"


def test_embedded_model_mixed_batch_matches_offline(tmp_path):
    base, tok = load_base_model("smollm2")
    config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="support")
    model.add_adapter("billing", config)
    with torch.no_grad():  # random A and B (init_lora_weights=False), B doubled: each adapter changes the answer
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(2.0)
    model.save_pretrained(tmp_path / "adapters")
    del model

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--adapter-dir", str(tmp_path / "adapters"), "--max-model-len", "512",
                              "--decode-precision", "fp32"])  # the offline answers' weights
    server = ServerThread(build_server(args)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert {"smollm2", "support", "billing"} <= {m.id for m in client.models.list().data}

        def ask(model_name: str) -> str:
            r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=12, temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = dict(zip(["smollm2", "support", "billing"], pool.map(ask, ["smollm2", "support", "billing"])))
    finally:
        server.stop()

    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                   tokenize=False)
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    offline = {}
    peft = PeftModel.from_pretrained(base, tmp_path / "adapters" / "support", adapter_name="support").eval()
    peft.load_adapter(tmp_path / "adapters" / "billing", adapter_name="billing")
    with torch.no_grad():
        for name in ["smollm2", "support", "billing"]:
            rows = [None if name == "smollm2" else name]
            out = peft.generate(**inputs, adapter_names=rows, max_new_tokens=12, do_sample=False)
            offline[name] = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answers == offline
    assert len(set(answers.values())) == 3  # the adapters really change the answer
    assert "password" in answers["smollm2"].lower() or len(answers["smollm2"].split()) >= 5


def _server_answer(args: list[str], model_name: str, question: str, max_tokens: int) -> str:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    server = ServerThread(build_server(parser.parse_args(args))).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                               max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["bf16 base", "qlora adapter"])
def test_server_greedy_answer_equals_lorakit_generate(tmp_path, capsys, kind):
    """The same adapter and prompt give the same greedy tokens through `lorakit serve` as through `lorakit generate`:
    on a bf16 base, and for a QLoRA adapter, which both run on the NF4-rounded base it was trained on."""
    from lorakit.adapter_folder import write_train_record
    from lorakit.cli import main

    base, _ = load_base_model("smollm2")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(tmp_path / "support")
    if kind == "qlora adapter":  # what `lorakit train --quantize nf4` records next to its adapter
        write_train_record(tmp_path / "support", {"quantize": "nf4"}, {"steps": 1})
    dtype = ["--dtype", "bfloat16"] if kind == "bf16 base" else []
    question, max_tokens = "Which plan includes priority support?", 16
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path / "support"), "--max-new-tokens", str(max_tokens),
                 *dtype, question]) == 0
    printed = capsys.readouterr().out.splitlines()
    generated = "\n".join(line for line in printed if not line.startswith("lorakit: ")).strip()
    served = _server_answer(["--adapter", f"support={tmp_path / 'support'}", "--max-model-len", "256", *dtype],
                            "support", question, max_tokens)
    assert served.strip() == generated
    assert len(generated.split()) >= 3
