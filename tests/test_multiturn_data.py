"""The multi-turn benchmark dataset (scripts/make_multiturn_data.py): its shape, its split, and its regeneration."""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "multiturn"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("make_multiturn_data")


@pytest.fixture(scope="module")
def splits():
    return {name: [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "eval")}


def test_regeneration_is_byte_identical_and_check_mode_detects_a_stale_file(tmp_path, capsys):
    files = gen.render_files()
    for name, data in files.items():
        assert (DATA / name).read_bytes() == data, name
    assert gen.main(["--check"]) == 0
    (tmp_path / "train.jsonl").write_bytes(files["train.jsonl"])
    (tmp_path / "eval.jsonl").write_bytes(files["eval.jsonl"][:-10])
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "eval.jsonl is missing or out of date" in capsys.readouterr().err


def test_conversations_alternate_and_answer_each_question_canonically(splits):
    responses = {i.name: i.response for i in gen.demo.INTENTS}
    facts = {i.name: list(i.facts) for i in gen.demo.INTENTS}
    for name, rows in splits.items():
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert len(roles) in (4, 6) and roles == ["user", "assistant"] * (len(roles) // 2), name
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert all(a in responses.values() for a in answers)
            assert len(set(answers)) == len(answers)  # each question about another intent
            assert answers[-1] == responses[row["intent"]] and row["facts"] == facts[row["intent"]]
            assert all(f in answers[-1] for f in row["facts"])
    assert (len(splits["train"]), len(splits["eval"])) == (312, 78)
    for name, per_intent in (("train", 12), ("eval", 3)):
        assert set(Counter(r["intent"] for r in splits[name]).values()) == {per_intent}


def test_every_last_eval_question_is_a_held_out_phrasing_never_trained_on(splits):
    norm = gen.demo.normalize
    held_out = {norm(p) for _, held in gen.demo.build_splits().values() for p in held}
    trained = {norm(m["content"]) for r in splits["train"] for m in r["messages"] if m["role"] == "user"}
    demo_train = {norm(json.loads(line)["query"])
                  for line in (ROOT / "src" / "lorakit" / "demo_data" / "train.jsonl").read_text().splitlines()}
    for row in splits["eval"]:
        last = row["messages"][-2]["content"]
        assert any(norm(last).endswith(p) for p in held_out), last  # after its follow-up lead-in
        assert not any(norm(last).endswith(t) for t in demo_train | trained if len(t) > 12), last
