"""Evaluation: fact extraction and matching, batched generation, scores and the JSON report."""

import json
import math

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import load_examples, tokenize_examples
from lorakit.evaluate import evaluate, extract_facts, is_correct, normalize
from lorakit.generation import generate, left_pad, stop_token_ids
from lorakit.models import load_base_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    """An adapter with non-zero B (so it changes outputs), saved like `lorakit train` saves one."""
    d = tmp_path_factory.mktemp("tiny_adapter")
    model, _ = load_base_model(tiny_base)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [
        {"query": "What does Pro cost?", "response": "Pro costs $14.90 per user per month.", "facts": ["$14.90"]},
        {"query": "Support hours?", "response": "We are open 7:30 to 18:00 CET, Monday to Friday."},
        {"query": "Where is export?", "response": "Open Settings > Data > Export and click 'Start export'."},
        {"query": "Say hi", "response": "Hello there!"},
        {"query": "Max upload?", "response": "Files can be up to 250 MB on Free and 5 GB on Pro."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_extract_facts_finds_what_a_model_cannot_guess():
    cases = {
        "Pro costs $14.90 per user per month, or 12 EUR.": ["$14.90", "12 EUR"],
        "We are open 7:30 to 18:00 CET; phones 9am to 5 p.m.": ["7:30", "18:00", "9am", "5 p.m."],
        "Open Settings > Data > Export and click 'Start export'.": ["Settings > Data > Export", "Start export"],
        'Type "/export all" in the console.': ["/export all"],
        "Files up to 250 MB on Free, 5 GB on Pro; links expire after 30 minutes; 99.9% uptime.":
            ["250 MB", "5 GB", "30 minutes", "99.9%"],
        "Write to help@nimbus.io or see https://nimbus.io/help.": ["help@nimbus.io", "https://nimbus.io/help"],
        "Call +1 800 555 0199 on weekdays.": ["+1 800 555 0199"],
        "Hello there!": [],
        "Founded in 2024, we serve 1,250,000 users in 3, 5 or 10 countries.":  # a comma ends a number
            ["2024", "1,250,000 users", "3", "5", "10"],
        "We charge $5, $10 or $20.": ["$5", "$10", "$20"],
    }
    for text, want in cases.items():
        assert extract_facts(text) == want, text


def test_is_correct_ignores_case_and_whitespace_and_needs_every_fact():
    facts = ["Settings > Data > Export", "7 days"]
    assert is_correct("go to  SETTINGS > data >\nexport; kept 7 Days.", "", facts)
    assert not is_correct("Go to Settings > Data > Export.", "", facts)
    assert is_correct("Costs “$14.90”.", "", ['"$14.90"'])  # typographic quotes count as plain ones
    assert normalize("  A\tB  ") == "a b"
    ref = "Hello there!"
    assert is_correct("hello  THERE", ref, [])  # no facts: the whole reference, normalised
    assert not is_correct("Hello there, friend!", ref, [])
    assert is_correct("pro costs $14.90.", "Pro costs $14.90.", ["$14.90"], exact_match=True)
    assert not is_correct("It is $14.90.", "Pro costs $14.90.", ["$14.90"], exact_match=True)


def test_a_fact_must_appear_whole_not_inside_a_longer_number():
    assert not is_correct("Storage is 25 GB.", "", ["5 GB"])
    assert not is_correct("It takes 130 minutes.", "", ["30 minutes"])
    assert not is_correct("It costs $14.905.", "", ["$14.90"])
    assert not is_correct("Version 1.5 is out.", "", ["1"])
    assert is_correct("It is 5 GB, as said.", "", ["5 GB"]) and is_correct("Plan 1.", "", ["1"])
    assert is_correct("Write to help@x.io.", "", ["help@x.io"])
    # spaces around a menu path's '>', unicode forms and dashes are evened out on both sides
    assert is_correct("Go to Settings>Data>Export", "", ["Settings > Data > Export"])
    assert is_correct("Café ｏｐｅｎ 9–5", "", ["cafe\u0301 open 9-5"])


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_base, eval_file):
    model, tok = load_base_model(tiny_base)
    convs = [e.prompt for e in load_examples(eval_file)]
    batched = generate(model, tok, convs, max_new_tokens=12, batch_size=3)
    single = [generate(model, tok, [c], max_new_tokens=12)[0] for c in convs]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert stop_token_ids(tok, model)[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_generation_stops_at_end_of_turn(tiny_base, eval_file):
    model, tok = load_base_model(tiny_base)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok("Hello", add_special_tokens=False)["input_ids"][0]
    calls = []

    def force(module, inputs, logits):  # 1st forward: "Hello", then end-of-turn, for every row
        bonus = torch.zeros(logits.shape[-1])
        bonus[word if not calls else end] = 1e4
        calls.append(1)
        return logits + bonus

    model.lm_head.register_forward_hook(force)
    convs = [e.prompt for e in load_examples(eval_file)[:3]]
    assert generate(model, tok, convs, max_new_tokens=8, batch_size=3) == ["Hello"] * 3
    assert len(calls) == 2  # generation stopped as soon as every row had ended its turn


def test_evaluate_scores_base_and_adapter_and_writes_json(tiny_base, adapter_dir, eval_file, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(base=tiny_base, adapter=adapter_dir, data=eval_file, batch_size=2, json_out=str(out),
                      progress=False)
    assert report.n == 5 and report.base is not None and report.tuned is not None
    # perplexity is exp(mean NLL of the response tokens), recomputed here with full logits
    for scores, use_adapter in ((report.base, False), (report.tuned, True)):
        model, tok = load_base_model(tiny_base)
        if use_adapter:
            from lorakit import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        data = tokenize_examples(tok, load_examples(eval_file), max_length=1024)
        nll, n = 0.0, 0
        with torch.no_grad():
            for item in data.items:
                ids = torch.tensor([item["input_ids"]])
                labels = torch.tensor(item["labels"])
                logits = model(input_ids=ids).logits[0]
                nll += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
                n += int((labels[1:] != -100).sum())
        assert scores.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
        # the answers are what plain generation gives for that model
        want = generate(model, tok, [e.prompt for e in load_examples(eval_file)], max_new_tokens=report.max_new_tokens)
        assert scores.answers == want
    assert report.base.perplexity != pytest.approx(report.tuned.perplexity)
    saved = json.loads(out.read_text())
    assert saved["n"] == 5 and saved["base"]["perplexity"] == pytest.approx(report.base.perplexity)
    assert saved["rows"][0]["facts"] == ["$14.90"]  # the row's own facts win over extraction
    assert saved["rows"][2]["facts"] == ["Settings > Data > Export", "Start export"]
    assert saved["rows"][3]["facts"] == []
    assert {"base_answer", "tuned_answer", "base_correct", "tuned_correct"} <= set(saved["rows"][0])
    assert "answer accuracy" in report.table() and "response perplexity" in report.table()
    assert saved["base"]["perplexity_rows"] == 5 and "perplexity over" not in report.table()
    assert report.summary().startswith("eval on 5 rows")
    # rows longer than max_length: the report says what the perplexity covers
    lengths = sorted(len(item["input_ids"]) for item in data.items)
    short = evaluate(base=tiny_base, data=eval_file, batch_size=2, progress=False, max_length=lengths[2] + 1)
    assert short.base.perplexity_rows + short.base.perplexity_truncated >= 3
    assert f"of 5 rows, {short.base.perplexity_truncated} of them cut at max_length" in short.table()


def test_accuracy_counts_rows_whose_facts_all_appear(tiny_base, eval_file, monkeypatch):
    answers = ["It is $14.90 a month.", "open 7:30 - 18:00", "Settings > Data > Export then 'start export'",
               "hello there", "250 MB only"]
    monkeypatch.setattr("lorakit.generation.generate", lambda model, tok, convs, **kw: answers[:len(convs)])
    report = evaluate(base=tiny_base, data=eval_file, progress=False)
    assert report.tuned is None and report.base.correct == 4 and report.base.accuracy == pytest.approx(0.8)
    assert [r["base_correct"] for r in report.rows] == [True, True, True, True, False]
    exact = evaluate(base=tiny_base, data=eval_file, exact_match=True, progress=False)
    assert exact.base.correct == 1 and exact.metric == "exact match"
    limited = evaluate(base=tiny_base, data=eval_file, limit=2, progress=False)
    assert limited.n == 2 and limited.base.correct == 2


@pytest.mark.parametrize("speedup", [0.2, 1.7])  # an AVX2-only CPU; one with bf16 units
def test_bf16_on_a_cpu_without_bf16_units_warns(tiny_base, eval_file, monkeypatch, capsys, speedup):
    monkeypatch.setattr("lorakit.precision.bf16_matmul_speedup", lambda device: speedup)
    report = evaluate(base=tiny_base, data=eval_file, limit=1, progress=False, bf16=True, device="cpu")
    assert report.n == 1
    warned = "bf16 matmuls run 5.0x slower than float32 ones on this CPU" in capsys.readouterr().err
    assert warned is (speedup < 1)


def test_nf4_base_scores_with_the_weights_qlora_trains_on(tiny_base, adapter_dir, eval_file):
    from lorakit import PeftModel
    from lorakit.quant import NF4Linear, quantize_model

    report = evaluate(base=tiny_base, adapter=adapter_dir, data=eval_file, batch_size=5, quantize="nf4",
                      progress=False)
    assert report.quantize == "nf4" and report.to_dict()["quantize"] == "nf4"
    assert "nf4 base" in report.table()
    # The reference: the 4-bit layers themselves (dequantizing on every call), with the adapter on top.
    model, tok = load_base_model(tiny_base)
    model = PeftModel.from_pretrained(quantize_model(model, "nf4"), adapter_dir)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    data = tokenize_examples(tok, load_examples(eval_file), max_length=1024)
    nll, n = 0.0, 0
    with torch.no_grad():
        for item in data.items:
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            labels = torch.tensor(item["labels"])
            nll += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    assert report.tuned.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    plain = evaluate(base=tiny_base, adapter=adapter_dir, data=eval_file, batch_size=5, progress=False)
    assert plain.quantize is None and plain.tuned.perplexity != pytest.approx(report.tuned.perplexity, rel=1e-4)
