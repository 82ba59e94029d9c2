"""Data loading, validation, response-only masking, collation and length-grouped batching."""

import csv
import json

import pytest
import torch

from lorakit.data import (IGNORE_INDEX, DataError, collate, padding_share, training_batches, load_examples,
                          tokenize_example, tokenize_examples)
from lorakit.generation import encode_prompt
from lorakit.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def targets_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_only_response_and_end_of_turn_are_unmasked(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "What does Pro cost?", "response": "Pro costs $14.90 per month."}])
    for system in (None, "You are the Nimbus support bot."):
        ex = load_examples(path, system_prompt=system)[0]
        ids, labels = tokenize_example(tok, ex.messages)
        assert len(ids) == len(labels)
        assert targets_text(tok, ids, labels) == "Pro costs $14.90 per month.<|im_end|>"
        # every unmasked label is the input token at that position (the shift happens in the loss)
        assert all(l == i for i, l in zip(ids, labels) if l != IGNORE_INDEX)
        # the masked prefix is exactly the prompt that generation feeds the model
        n_prompt = next(k for k, l in enumerate(labels) if l != IGNORE_INDEX)
        assert ids[:n_prompt] == encode_prompt(tok, ex.prompt)
        text = tok.decode(ids[:n_prompt])
        assert "What does Pro cost?" in text and text.endswith("<|im_start|>assistant\n")
        assert (system or "You are a helpful AI assistant named SmolLM") in text


def test_multi_turn_trains_on_every_assistant_turn(tok, tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Price of Pro?"}, {"role": "assistant", "content": "$14.90 a month."}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    ex = load_examples(path)[0]
    ids, labels = tokenize_example(tok, ex.messages)
    spans, current = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == ["Hello, how can I help?<|im_end|>", "$14.90 a month.<|im_end|>"]
    assert ex.reference == "$14.90 a month."
    assert [m["role"] for m in ex.prompt] == ["user", "assistant", "user"]


def test_tokenizer_without_chat_template_is_refused(tok):
    import copy

    plain = copy.copy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_example(plain, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert tok.chat_template  # the copy did not change the original


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"query": "a", "response": "b"}, {"query": "c", "response": "d"}, {"query": "e", "answer": "f"}])
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert f"{path}:3" in msg and "missing field 'response'" in msg and "'answer'" in msg
    assert "--response-field" in msg


def test_other_malformed_rows(tmp_path):
    cases = [
        (['{"query": "a", "response": "b"}', '{"query": "a", '], ":2: invalid JSON"),
        ([{"query": "", "response": "b"}], ":1: empty field 'query'"),
        ([{"query": 3, "response": "b"}], "field 'query' must be a string"),
        ([["a", "b"]], ":1: expected a JSON object"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "role 'bot'"),
        ([{"messages": [{"role": "user"}]}], "must be an object with 'role' and 'content'"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}], r"messages\[0\] is an assistant turn with no user"),
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}],
         r"messages\[1\] is an empty assistant turn"),
        ([{"query": "a", "response": "b", "facts": "oops"}], None),  # a string of facts is split, not an error
        ([{"query": "a", "response": "b", "facts": [1]}], "'facts' must be a list of strings"),
    ]
    for rows, expected in cases:
        path = write_jsonl(tmp_path / "x.jsonl", rows)
        if expected is None:
            assert load_examples(path)[0].facts == ["oops"]
            continue
        with pytest.raises(DataError, match=expected):
            load_examples(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_examples(tmp_path / "x.txt")


def test_csv_with_custom_fields_and_facts(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "facts"])
        w.writerow(["How long is the trial?", "The trial lasts 14 days.", '["14 days"]'])
        w.writerow(["Support email?", "Write to help@x.io, multi\nline.", "help@x.io|multi"])
        w.writerow(["Broken row", "", ""])
    with pytest.raises(DataError, match=r"d\.csv:2: missing field 'query'.*--query-field"):
        load_examples(path)
    with pytest.raises(DataError, match=r"d\.csv:5: empty field 'answer'"):  # line 5: row 2 spans two lines
        load_examples(path, query_field="question", response_field="answer")
    rows = path.read_text().splitlines()[:-1]
    path.write_text("\n".join(rows) + "\n")
    ex = load_examples(path, query_field="question", response_field="answer")
    assert [e.messages[0]["content"] for e in ex] == ["How long is the trial?", "Support email?"]
    assert ex[0].facts == ["14 days"] and ex[1].facts == ["help@x.io", "multi"]
    assert ex[1].reference == "Write to help@x.io, multi\nline."


def test_spreadsheet_csv_with_a_byte_order_mark_and_a_short_row(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffquery,response\nWhen are you open?,From 9 to 5.\n".encode())
    assert load_examples(path)[0].messages[0]["content"] == "When are you open?"
    path.write_text("query,response\nWhen are you open?,From 9 to 5.\nJust one value\n")
    with pytest.raises(DataError, match=r"excel\.csv:3: 1 values, but the header names 2 columns"):
        load_examples(path)
    path.write_text("query,response\nA row, with a comma, unquoted,x\n")
    with pytest.raises(DataError, match=r"excel\.csv:2: 4 values, but the header names 2 columns; quote"):
        load_examples(path)


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"query": "a", "response": "b"}, {"query": "c"}]))
    with pytest.raises(DataError, match=r"d\.json:2: missing field 'response'"):
        load_examples(path)


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"q": "a?", "r": "b."}, {"q": "c?", "r": "d."}]).save_to_disk(str(tmp_path / "ds"))
    ex = load_examples(tmp_path / "ds", query_field="q", response_field="r")
    assert [e.reference for e in ex] == ["b.", "d."]


def test_too_long_rows_truncated_or_skipped_and_counted(tok, tmp_path):
    long = "word " * 200
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"query": "short?", "response": "Yes."}, {"query": "long?", "response": long},
        {"query": long, "response": "No."}])
    ex = load_examples(path)
    lengths = [len(tokenize_example(tok, e.messages)[0]) for e in ex]
    assert lengths[0] < 64 < lengths[1] and lengths[2] > 64
    data = tokenize_examples(tok, ex, max_length=64, too_long="truncate")
    # row 2 keeps its first response tokens; row 3 loses its whole response, so it is skipped
    assert (len(data), data.truncated, data.skipped) == (2, 1, 1)
    assert data.skipped_where == [f"{path}:3"]
    assert max(data.lengths) == 64
    assert "1 truncated, 1 skipped" in data.summary()
    data = tokenize_examples(tok, ex, max_length=64, too_long="skip")
    assert (len(data), data.truncated, data.skipped) == (1, 0, 2)
    with pytest.raises(DataError, match="raise --max-length"):
        tokenize_examples(tok, ex[1:], max_length=8)


def test_collate_right_pads():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(items, pad_token_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["input_ids"].dtype == torch.long


def test_training_batches_are_a_seeded_partition_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (300,), generator=g).tolist()
    a = training_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a == training_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a != training_batches(lengths, 8, seed=1, epoch=1, group_by_length=True)
    assert a != training_batches(lengths, 8, seed=2, epoch=0, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(300))
    assert all(len(b) == 8 for b in a[:-1] if len(b) != 300 % 8) and len(a) == 38

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(i, min(i + 8, 300))) for i in range(0, 300, 8)]
    assert padded(a) < 0.8 * padded(random_batches)
    # consecutive batches are not simply sorted by length (the batch order is shuffled)
    maxes = [max(lengths[i] for i in b) for b in a]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)


def _intent_lengths(intents=25, rows_each=4, seed=0):
    """A small support set: rows of one intent share a response, so their lengths differ by a few tokens."""
    rng = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 120, (intents,), generator=rng).tolist()
    noise = torch.randint(0, 4, (intents * rows_each,), generator=rng).tolist()
    return [base[i // rows_each] + noise[i] for i in range(intents * rows_each)], \
        [i // rows_each for i in range(intents * rows_each)]


def _as_sets(batches):
    return {frozenset(b) for b in batches}


@pytest.mark.parametrize("group", [False, True])
def test_batches_differ_between_epochs_on_a_set_smaller_than_one_mega_batch(group):
    lengths, _ = _intent_lengths()  # 100 rows < 16 x 8: the whole set is one mega-batch
    epochs = [_as_sets(training_batches(lengths, 8, seed=0, epoch=e, group_by_length=group)) for e in range(5)]
    for e in range(1, 5):
        assert len(epochs[0] & epochs[e]) <= 1, e  # hardly a batch repeats: each epoch brings new ones
    # exact sorting (the old behaviour, tolerance 0) repeated most batches: the problem this fixes
    exact = [_as_sets(training_batches(lengths, 8, seed=0, epoch=e, tolerance=0)) for e in range(2)]
    assert len(exact[0] & exact[1]) >= 5


def test_grouping_packs_rows_of_one_response_together_and_shuffling_does_not():
    """Why grouping is off by default: rows sharing a response have about the same length, so grouped batches hold
    few different answers (benchmarks/quality.py measured the accuracy this costs); buckets only soften it."""
    lengths, intent = _intent_lengths()

    def same_intent_pairs(batches):
        return sum(intent[i] == intent[j] for b in batches for i in b for j in b if i < j)

    def mean_over_epochs(**options):
        return sum(same_intent_pairs(training_batches(lengths, 8, seed=0, epoch=e, **options)) for e in range(20)) / 20

    shuffled = mean_over_epochs(group_by_length=False)
    assert shuffled < 12  # chance level: 100 rows, 4 per intent, batches of 8
    bucketed = mean_over_epochs(group_by_length=True)
    exact = mean_over_epochs(group_by_length=True, tolerance=0)
    assert 3 * shuffled < bucketed < 0.75 * exact


def test_plain_shuffled_batches_and_padding_share():
    lengths = list(range(10, 110))
    batches = training_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert [len(b) for b in batches] == [8] * 12 + [4]
    assert batches != training_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    grouped = training_batches(lengths, 8, seed=3, epoch=0, group_by_length=True)
    assert padding_share(lengths, grouped) < 0.5 * padding_share(lengths, batches)
    assert padding_share([4, 2], [[0, 1]]) == pytest.approx(1 - 6 / 8)
    assert padding_share([5, 5], [[0], [1]]) == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        training_batches(lengths, 0, seed=0)
