"""End to end on the embedded SmolLM2-135M (the one serve test with the real model, ~30 s): two adapters
and the base answered in one batch over HTTP, each equal to lorakit's offline greedy generation."""

from __future__ import annotations

import argparse
import concurrent.futures
import copy

import openai
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
    args = parser.parse_args(["--adapter-dir", str(tmp_path / "adapters"), "--max-model-len", "512"])
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
