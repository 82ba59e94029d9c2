"""The shipped demo dataset: its shape, its train/eval split, and that the generator reproduces it."""

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "lorakit" / "demo_data"
KEYS = ["query", "response", "intent", "facts"]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _rows(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def splits():
    return {"train": _rows("train.jsonl"), "eval": _rows("eval.jsonl")}


def test_rows_have_the_four_keys_in_order_and_non_empty_values(splits):
    for name, rows in splits.items():
        assert rows, name
        for row in rows:
            assert list(row) == KEYS, (name, row)
            assert all(isinstance(row[k], str) and row[k].strip() for k in ("query", "response", "intent"))
            assert isinstance(row["facts"], list) and row["facts"]
            assert all(isinstance(f, str) and f.strip() for f in row["facts"])


def test_every_fact_is_a_substring_of_its_response(splits):
    for rows in splits.values():
        for row in rows:
            for fact in row["facts"]:
                assert fact in row["response"], (row["intent"], fact)


def test_intents_queries_and_split_sizes(splits):
    queries = defaultdict(set)
    eval_count = defaultdict(int)
    for name, rows in splits.items():
        for row in rows:
            queries[row["intent"]].add(gen.normalize(row["query"]))
            eval_count[row["intent"]] += name == "eval"
    assert len(queries) >= 20
    for intent, qs in queries.items():
        assert len(qs) >= 35, intent
        assert eval_count[intent] >= 5, intent
    assert len(splits["train"]) == 35 * len(queries)  # the demo's training-time budget assumes this size
    assert len(splits["eval"]) == 5 * len(queries)


def test_every_intent_has_at_least_30_distinct_train_phrasings(splits):
    by_intent = {i.name: i for i in gen.INTENTS}
    bare = defaultdict(set)  # train queries that are a phrasing as written, not greeting-wrapped
    for row in splits["train"]:
        if row["query"] in by_intent[row["intent"]].phrasings:
            bare[row["intent"]].add(gen.normalize(row["query"]))
    assert set(bare) == set(by_intent)
    for intent, train_part in ((name, gen.build_splits()[name][0]) for name in by_intent):
        assert len(bare[intent]) >= 30, intent
        assert bare[intent] == {gen.normalize(p) for p in train_part}, intent  # each train phrasing used


def test_phrasings_are_distinct_within_and_across_intents():
    keys = [gen.normalize(p) for i in gen.INTENTS for p in i.phrasings]
    assert len(keys) == len(set(keys))
    assert all(len(i.phrasings) >= 36 for i in gen.INTENTS)


def test_no_eval_query_appears_in_train(splits):
    train = {gen.normalize(r["query"]) for r in splits["train"]}
    leaked = [r["query"] for r in splits["eval"] if gen.normalize(r["query"]) in train]
    assert leaked == []
    assert len(train) == len(splits["train"])  # and train itself has no duplicates


def test_eval_queries_are_distinct_held_out_phrasings_never_trained_on(splits):
    parts = gen.build_splits()
    train_phrasings = {gen.normalize(p) for train, _ in parts.values() for p in train}
    eval_phrasings = defaultdict(list)
    for row in splits["eval"]:
        _, held_out = parts[row["intent"]]
        q = gen.normalize(row["query"])
        matches = [p for p in held_out if gen.normalize(p) in q]
        assert matches, row["query"]  # built from one of this intent's held-out phrasings
        assert not any(gen.normalize(p) in train_phrasings for p in matches), row["query"]
        assert q not in train_phrasings, row["query"]
        eval_phrasings[row["intent"]].append(gen.normalize(matches[0]))
    for intent, used in eval_phrasings.items():
        assert len(used) == len(set(used)) >= 5, intent


def test_split_is_seeded_not_hand_picked():
    a, b = gen.build_splits(), gen.build_splits()
    assert a == b
    other = gen.build_splits(seed=gen.SEED + 1)
    assert any(set(a[n][1]) != set(other[n][1]) for n in a)  # a different seed holds out other phrasings
    for intent in gen.INTENTS:
        train, held_out = a[intent.name]
        assert len(held_out) == 6 and len(train) >= 30
        assert sorted(train + held_out) == sorted(intent.phrasings)


def test_normalize_ignores_case_spacing_and_punctuation():
    assert gen.normalize("  How do I  reset my PASSWORD? ") == gen.normalize("how do i reset my password")
    assert gen.normalize("reset password") != gen.normalize("reset passwords")


def test_regeneration_is_byte_identical_to_the_shipped_files():
    files = gen.render_files()
    assert files == {name: (DATA / name).read_bytes() for name in files}
    assert gen.render_files() == files  # and stable from one call to the next


def test_train_is_shuffled_not_grouped(splits):
    intents = [r["intent"] for r in splits["train"]]
    runs = sum(a != b for a, b in zip(intents, intents[1:]))
    assert runs > len(intents) // 2  # grouped rows would change intent only 25 times


def test_check_mode_detects_a_stale_file(tmp_path, capsys):
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    assert gen.main(["--out-dir", str(tmp_path), "--check"]) == 0
    path = tmp_path / "eval.jsonl"
    path.write_bytes(path.read_bytes().replace(b"Tidewren", b"Tidewran", 1))
    assert gen.main(["--out-dir", str(tmp_path), "--check"]) == 1
    assert "eval.jsonl is missing or out of date" in capsys.readouterr().err


def test_a_fact_missing_from_its_response_is_rejected():
    bad = gen.Intent("x", "Open Settings > Billing.", ("Settings > Plans", "Billing"), ("a?", "b?"))
    with pytest.raises(ValueError, match="'Settings > Plans' is not a substring"):
        gen.check_intent(bad)


def test_too_few_or_duplicate_phrasings_are_rejected():
    few = gen.Intent("x", "Open Settings > Billing.", ("Settings > Billing", "Open"), ("a?", "b?"))
    with pytest.raises(ValueError, match="x: has 2 phrasings, needs 36"):
        gen.check_intent(few)
    dup = gen.Intent("x", "Open Settings > Billing.", ("Settings > Billing", "Open"),
                     tuple(f"question {n}?" for n in range(40)) + ("Question 3",))
    with pytest.raises(ValueError, match="same after normalisation"):
        gen.check_intent(dup)
    first = gen.INTENTS[0]
    clash = gen.Intent("y", first.response, first.facts, (first.phrasings[5].upper(),))
    with pytest.raises(ValueError, match="duplicates one of opening_hours"):
        gen.check_phrasings_are_unique([first, clash])
