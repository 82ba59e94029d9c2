"""The batching engine without HTTP: greedy outputs equal offline generation (also in mixed-adapter
batches), continuous batching, per-adapter scheduling, seeds, stop strings, cancellation."""

from __future__ import annotations

import collections
import copy
import queue
import time

import pytest
import torch

from lorakit import PeftModel
from lorakit.serve.detokenize import held_back
from lorakit.serve.engine import Engine, EngineConfig, Sequence
from lorakit.serve.sampling import SamplingParams
from test_serve_helpers import byte_tokenizer, offline_ids, save_random_adapter, slowed, tiny_model, tiny_tokenizer

PROMPTS = ["The weather today", "Hello there, how", "Once upon a time", "abc def ghi", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    base = tiny_model(tok)
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["a", "b", "c"]):
        save_random_adapter(base, root / name, seed=i + 1)
    # Different rank and targets, and a DoRA adapter.
    save_random_adapter(base, root / "d", seed=4, r=4, targets=["q_proj", "v_proj"])
    save_random_adapter(base, root / "dora", seed=5, use_dora=True)
    return tok, base, root


def make_engine(setup, **overrides) -> Engine:
    tok, base, root = setup
    config = EngineConfig(**{"max_batch_size": 8, "max_model_len": 256, **overrides})
    return Engine(copy.deepcopy(base), tok, config, base_name="tiny", adapter_dirs=[str(root)]).start()


def record_batches(engine: Engine) -> list[list]:
    """Wrap the engine's prefill forward and decode step to log the adapter of every row of every model call
    (with the tokens per row: a decode step feeds 1)."""
    calls = []
    forward, decode = engine._forward, engine._decode

    def logged(names, **kwargs):
        calls.append((list(names), kwargs["input_ids"].shape[1]))
        return forward(names, **kwargs)

    def logged_decode(names, ids, positions):
        calls.append((list(names), 1))
        return decode(names, ids, positions)

    engine._forward, engine._decode = logged, logged_decode
    return calls


def collect(seqs_events) -> list[tuple[str, list[int], str]]:
    results = []
    for events in seqs_events:
        text, ids = [], []
        while True:
            out = events.get(timeout=60)
            assert out.error is None, out.error
            text.append(out.text)
            ids.extend(out.token_ids)
            if out.finish_reason:
                results.append(("".join(text), ids, out.finish_reason))
                break
    return results


def submit_together(engine, jobs, params_fn):
    """Submit all jobs in ONE call, so they are admitted in the same loop iteration (same batch)."""
    seqs, events = [], []
    for prompt_ids, adapter in jobs:
        q = queue.SimpleQueue()
        seqs.append(Sequence(prompt_ids, adapter, params_fn(), q.put))
        events.append(q)
    engine.submit(seqs).result(30)
    return seqs, events


@pytest.mark.parametrize("adapters", [
    ["a", "b", None, "c", "a", "d"],
    ["a", "b", None, "c", "dora", "d"],  # DoRA in the batch
])
def test_mixed_batch_greedy_equals_offline_generate(setup, adapters):
    tok, base, root = setup
    engine = make_engine(setup)
    calls = record_batches(engine)
    try:
        jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS + ["Zebra crossing"], adapters)]
        _, events = submit_together(engine, jobs, lambda: SamplingParams(max_tokens=20, temperature=0))
        results = collect(events)
    finally:
        engine.stop()
    for (prompt_ids, adapter), (text, ids, finish) in zip(jobs, results):
        expected = offline_ids(base, tok, prompt_ids, root / adapter if adapter else None, max_new_tokens=20)
        assert ids == expected, f"adapter {adapter}: server {ids} != offline {expected}"
        assert text == tok.decode(expected, skip_special_tokens=True)
        assert finish == ("stop" if expected[-1] == tok.eos_token_id else "length")
    # The adapters really shared forwards: decode steps ran with all four adapter choices in one batch.
    decode_steps = [names for names, q_len in calls if q_len == 1]
    assert any(set(names) == set(adapters) and len(names) == 6 for names in decode_steps)
    # The six prompts (different lengths) were prefilled together in one left-padded forward.
    assert [names for names, q_len in calls if q_len > 1] == [adapters]
    # And the adapters differ from each other and from the base (otherwise the check above is vacuous).
    assert len({tuple(r[1]) for r in results}) == len(results)


def test_a_batch_of_few_adapters_among_many_resident_equals_offline_generate(setup, tmp_path):
    tok, base, _ = setup
    names = [f"m{i}" for i in range(6)]
    for i, name in enumerate(names):
        save_random_adapter(base, tmp_path / name, seed=10 + i, r=2 + 2 * (i % 3))
    engine = Engine(copy.deepcopy(base), tok, EngineConfig(max_batch_size=8, max_model_len=256), base_name="tiny",
                    adapter_dirs=[str(tmp_path)]).start()
    try:
        greedy = lambda: SamplingParams(max_tokens=12, temperature=0)
        collect(submit_together(engine, [(tok(PROMPTS[0])["input_ids"], n) for n in names], greedy)[1])
        jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS, ["m1", "m4", None, "m4", "m1"])]
        # six resident, two in the batch: the decode step stacks those two only
        assert engine.call(lambda: engine.served.fast_step.stacked_adapters([a for _, a in jobs])).result(30) == \
            ("m1", "m4")
        results = collect(submit_together(engine, jobs, greedy)[1])
    finally:
        engine.stop()
    for (prompt_ids, adapter), (_, ids, _) in zip(jobs, results):
        assert ids == offline_ids(base, tok, prompt_ids, tmp_path / adapter if adapter else None, 12), adapter


def test_continuous_batching_join_and_leave(setup):
    tok, base, root = setup
    engine = make_engine(setup, max_batch_size=3)
    calls = record_batches(engine)
    try:
        long_q, short_q, late_q = queue.SimpleQueue(), queue.SimpleQueue(), queue.SimpleQueue()
        p = tok(PROMPTS[0])["input_ids"]
        long = Sequence(p, "a", SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), long_q.put)
        short = Sequence(p, "b", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), short_q.put)
        engine.submit([long, short]).result(30)
        for _ in range(8):  # wait until the long one is well under way
            long_q.get(timeout=30)
        late = Sequence(tok(PROMPTS[1])["input_ids"], "c", SamplingParams(max_tokens=10, temperature=0),
                        late_q.put)
        engine.submit([late]).result(30)
        (late_text, late_ids, _), = collect([late_q])
        (_, short_ids, short_finish), = collect([short_q])
        (_, long_ids, _) = collect([long_q])[0]
    finally:
        engine.stop()
    assert short_finish == "length" and len(short_ids) == 5
    assert len(long_ids) == 60 - 8
    sizes = [len(names) for names, q_len in calls if q_len == 1]
    assert max(sizes) <= 3
    assert 1 in sizes  # the short one left while the long one kept going...
    # ...and the late one joined the running batch (a step with both 'a' and 'c').
    assert any(set(names) == {"a", "c"} for names, q_len in calls if q_len == 1)
    assert late_ids == offline_ids(base, tok, tok(PROMPTS[1])["input_ids"], root / "c", max_new_tokens=10)


def test_max_batch_size_is_respected(setup):
    tok, base, root = setup
    engine = make_engine(setup, max_batch_size=2)
    calls = record_batches(engine)
    try:
        jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS, ["a", "b", "c", None, "b"])]
        _, events = submit_together(engine, jobs, lambda: SamplingParams(max_tokens=8, temperature=0))
        results = collect(events)
    finally:
        engine.stop()
    assert max(len(names) for names, _ in calls) == 2
    for (prompt_ids, adapter), (_, ids, _) in zip(jobs, results):
        assert ids == offline_ids(base, tok, prompt_ids, root / adapter if adapter else None, max_new_tokens=8)


def test_per_adapter_scheduling_serves_one_adapter_per_batch(setup):
    tok, base, root = setup
    engine = make_engine(setup, scheduling="per-adapter")
    calls = record_batches(engine)
    try:
        adapters = ["a", "b", "a", "c", "b"]
        jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS, adapters)]
        _, events = submit_together(engine, jobs, lambda: SamplingParams(max_tokens=10, temperature=0))
        results = collect(events)
    finally:
        engine.stop()
    for names, _ in calls:
        assert len(set(names)) == 1
    # Same-adapter requests were still batched together.
    assert any(names == ["a", "a"] for names, q_len in calls if q_len == 1)
    for (prompt_ids, adapter), (_, ids, _) in zip(jobs, results):
        assert ids == offline_ids(base, tok, prompt_ids, root / adapter, max_new_tokens=10)


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(setup):
    tok, _, _ = setup
    engine = make_engine(setup)
    p = tok(PROMPTS[2])["input_ids"]
    try:
        alone = engine.generate(p, "a", SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True))
        other_seed = engine.generate(p, "a", SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))
        # The same request again, now sharing the batch with other sampled requests.
        jobs = [(p, "a"), (p, "b"), (tok(PROMPTS[3])["input_ids"], None), (p, "a")]
        seqs, events = [], []
        for i, (ids, adapter) in enumerate(jobs):
            q = queue.SimpleQueue()
            seed = 1234 if i == 0 else 7 + i
            seqs.append(Sequence(ids, adapter, SamplingParams(max_tokens=24, temperature=1.0, seed=seed,
                                                              ignore_eos=True), q.put))
            events.append(q)
        engine.submit(seqs).result(30)
        batched = collect(events)
    finally:
        engine.stop()
    assert batched[0][1] == alone[1]
    assert other_seed[1] != alone[1]
    assert batched[3][1] != alone[1]  # same prompt and adapter, different seed


def test_top_p_keeps_only_the_nucleus(setup):
    from lorakit.serve.sampling import sample_each

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    seq = Sequence([1], None, SamplingParams(temperature=1.0, top_p=0.5, seed=0), lambda out: None)
    assert {sample_each(logits, [seq])[0] for _ in range(50)} == {0}  # p(0) = 0.70 >= 0.5
    seq.params.top_p = 0.9
    assert {sample_each(logits, [seq])[0] for _ in range(200)} == {0, 1}  # 0.70 + 0.26 covers 0.9


def test_logprobs_each_only_for_the_rows_that_ask():
    from lorakit.serve.sampling import logprobs_each

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    seqs = [Sequence([1], None, SamplingParams(logprobs=k), lambda out: None) for k in (2, None, 0)]
    rows = logprobs_each(logits, seqs, [1, 1, RuntimeError("sampling failed")])
    expected = torch.log_softmax(logits[0], dim=-1)
    token, logprob, top = rows[0]
    assert token == 1 and logprob == pytest.approx(float(expected[1]))
    assert [i for i, _ in top] == [0, 1] and [lp for _, lp in top] == pytest.approx(expected[:2].tolist())
    assert rows[1] is None and rows[2] is None  # did not ask; failed


def test_token_bytes_join_up_into_the_characters():
    from lorakit.models import smollm2_dir
    from lorakit.serve.detokenize import token_text_and_bytes
    from transformers import AutoTokenizer

    text = "Grüße, naïve café 🐱!"
    for tok in (byte_tokenizer(), AutoTokenizer.from_pretrained(smollm2_dir())):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [token_text_and_bytes(tok, i) for i in ids]
        assert b"".join(raw for _, raw in pieces) == text.encode("utf-8")
        assert any(piece == "\ufffd" for piece, _ in pieces)  # some token is a piece of a character
    tok = tiny_tokenizer()
    assert token_text_and_bytes(tok, tok.eos_token_id) == ("<|im_end|>", b"<|im_end|>")
    assert token_text_and_bytes(tok, tok(" ")["input_ids"][0]) == (" ", b" ")


def test_stop_strings_are_trimmed_and_end_the_sequence(setup):
    tok, base, root = setup
    engine = make_engine(setup)
    p = tok(PROMPTS[0])["input_ids"]
    full = tok.decode(offline_ids(base, tok, p, root / "c", max_new_tokens=30), skip_special_tokens=True)
    stop = full[6:9]
    assert full.find(stop) == 6
    try:
        text, ids, finish = engine.generate(p, "c", SamplingParams(max_tokens=30, temperature=0,
                                                                   stop=("not-in-output", stop)))
        # The stream never emits text that later turns out to be part of a stop string.
        events = queue.SimpleQueue()
        engine.submit([Sequence(p, "c", SamplingParams(max_tokens=30, temperature=0, stop=(stop,)),
                                events.put)]).result(30)
        pieces = collect([events])[0][0]
    finally:
        engine.stop()
    assert text == full[:6] and finish == "stop"
    assert pieces == full[:6]
    assert len(ids) < 30


def test_held_back_suffix():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("ab", ("abc", "b!")) == 2


def test_cancel_frees_the_row(setup):
    tok, _, _ = setup
    engine = make_engine(setup)
    engine._decode = slowed(engine._decode)  # 200 steps take at least 2 s: the cancel lands mid-run
    try:
        q = queue.SimpleQueue()
        seq = Sequence(tok(PROMPTS[0])["input_ids"], "a",
                       SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), q.put)
        engine.submit([seq]).result(30)
        q.get(timeout=30)
        seq.cancel()
        engine.wake()
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
        assert seq.finish_reason == "cancelled" and len(seq.output_ids) < 200
        # The adapter is no longer pinned, and the engine keeps serving.
        assert engine.registry.get("a").refcount == 0
        text, ids, finish = engine.generate(tok(PROMPTS[1])["input_ids"], "b", SamplingParams(max_tokens=4,
                                                                                            temperature=0))
        assert len(ids) >= 1
    finally:
        engine.stop()


def test_unknown_adapter_and_too_long_prompt_fail_at_submit(setup):
    tok, _, _ = setup
    engine = make_engine(setup, max_model_len=16)
    try:
        from lorakit.serve.registry import UnknownAdapterError

        with pytest.raises(UnknownAdapterError, match="'nope' does not exist"):
            engine.generate([5, 6], "nope")
        with pytest.raises(ValueError, match="1 to 15 tokens"):
            engine.generate(list(range(3, 20)), "a")
        assert engine.stats()["waiting"] == 0
        # A sequence reaching --max-model-len stops with "length".
        _, ids, finish = engine.generate([5, 6, 7, 8], "a", SamplingParams(max_tokens=100, temperature=0,
                                                                            ignore_eos=True))
        assert finish == "length" and len(ids) == 12
    finally:
        engine.stop()


def test_lru_eviction_reloads_adapters_with_the_same_outputs(setup):
    tok, base, root = setup
    engine = make_engine(setup, max_adapters=2)
    p = tok(PROMPTS[4])["input_ids"]
    try:
        first = {a: engine.generate(p, a, SamplingParams(max_tokens=10, temperature=0))[1] for a in "abc"}
        assert sorted(engine.registry.resident()) == ["b", "c"]  # a was least recently used
        again = engine.generate(p, "a", SamplingParams(max_tokens=10, temperature=0))[1]
        assert sorted(engine.registry.resident()) == ["a", "c"]
        assert engine.registry.evictions == 2
    finally:
        engine.stop()
    assert again == first["a"] == offline_ids(base, tok, p, root / "a", max_new_tokens=10)


def test_prefix_cache_reuses_shared_prompt_prefixes(setup):
    tok, base, root = setup
    engine = make_engine(setup)
    calls = record_batches(engine)
    system = "System: you are a careful assistant for Tidewren customers.\nUser: "
    prompts = [system + q for q in ("Where is my parcel?", "Cancel my order", "Hi")]
    try:
        first = engine.generate(tok(prompts[0])["input_ids"], "a", SamplingParams(max_tokens=12, temperature=0))
        assert engine.prefix.hits == 0
        # Two new prompts with the same system prefix for adapter a (hits, different reuse lengths), one for
        # adapter b (no hit: K/V depend on the adapter), prefilled together.
        jobs = [(tok(prompts[1])["input_ids"], "a"), (tok(prompts[2])["input_ids"], "b"),
                (tok(prompts[2])["input_ids"], "a"), (tok(prompts[0])["input_ids"], "a")]
        _, events = submit_together(engine, jobs, lambda: SamplingParams(max_tokens=12, temperature=0))
        results = collect(events)
        assert engine.prefix.hits == 3
        # One prefill forward; its width is b's whole prompt (the rows of a only feed their new suffixes).
        assert [q_len for names, q_len in calls if q_len > 1][1:] == [len(tok(prompts[2])["input_ids"])]
        engine.call(lambda: engine.registry.remove("a")).result(30)
        assert all(key[0] != "a" for key in engine.prefix.entries)
    finally:
        engine.stop()
    assert results[3][1] == first[1]
    for (prompt_ids, adapter), (_, ids, _) in zip(jobs, results):
        assert ids == offline_ids(base, tok, prompt_ids, root / adapter, max_new_tokens=12)


def test_bfloat16_base_serves_mixed_batches(setup):
    tok, base, root = setup
    engine = Engine(copy.deepcopy(base).to(torch.bfloat16), tok, EngineConfig(max_batch_size=4, max_model_len=128),
                    base_name="tiny", adapter_dirs=[str(root)]).start()
    try:
        jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS, ["a", "b", None, "d"])]
        _, events = submit_together(engine, jobs, lambda: SamplingParams(max_tokens=6, temperature=0,
                                                                         ignore_eos=True))
        results = collect(events)
        assert engine.slots.k[0].dtype == torch.bfloat16
    finally:
        engine.stop()
    assert [len(ids) for _, ids, _ in results] == [6, 6, 6, 6]
    # bf16 rounding differs from fp32, but the greedy tokens of this tiny model mostly survive it.
    fp32 = [offline_ids(base, tok, ids, root / a if a else None, max_new_tokens=6) for ids, a in jobs]
    same = sum(x == y for (_, ids, _), ref in zip(results, fp32) for x, y in zip(ids, ref))
    assert same >= 20, same  # 24 here; a few bf16 flips are tolerated


def test_prompt_logprobs_are_computed_whole_and_alone(setup):
    tok, base, root = setup
    engine = make_engine(setup)
    system = "System: you are a careful assistant for Tidewren customers.\nUser: "
    scored_ids = tok(system + "Where is my parcel?")["input_ids"]
    try:
        engine.generate(tok(system + "Hi")["input_ids"], "a", SamplingParams(max_tokens=2, temperature=0))
        # Job 0 reuses the cached system prompt; job 1 wants its prompt scored, so it is prefilled alone and
        # whole although the cache holds its prefix too; max_tokens 0: nothing generated.
        calls = record_batches(engine)
        jobs = [(tok(system + "Cancel my order")["input_ids"], "a"), (scored_ids, "a")]
        params = iter([SamplingParams(max_tokens=4, temperature=0),
                       SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2)])
        _, events = submit_together(engine, jobs, lambda: next(params))
        outs = [events[1].get(timeout=60)]
        collect(events[:1])
    finally:
        engine.stop()
    assert engine.prefix.hits == 1 and outs[0].finish_reason == "length" and outs[0].completion_tokens == 0
    prefills = [(names, width) for names, width in calls if width > 1]
    assert [len(names) for names, _ in prefills] == [1, 1] and prefills[1][1] == len(scored_ids)
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "a").eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([scored_ids])).logits[0, :-1].float(), dim=-1)
    entries = outs[0].prompt_logprobs
    assert [e.token_id for e in entries] == scored_ids and entries[0].logprob is None
    assert [e.logprob for e in entries[1:]] == pytest.approx(
        expected[torch.arange(len(scored_ids) - 1), scored_ids[1:]].tolist(), abs=1e-4)
    assert [[t.token_id for t in e.top] for e in entries[1:]] == expected.topk(2).indices.tolist()
    with torch.no_grad():  # in blocks of rows (bounded memory for long prompts): the same entries
        logits = model(input_ids=torch.tensor([scored_ids])).logits[0]
    from lorakit.serve.detokenize import prompt_logprobs

    assert prompt_logprobs(tok, scored_ids, logits, 2, rows_at_once=7) == prompt_logprobs(tok, scored_ids, logits, 2)


def test_prefix_cache_limits():
    from lorakit.serve.kv_cache import PrefixCache

    cache = PrefixCache(max_tokens=100)
    kv = lambda n: ([torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)])
    cache.store("rare", list(range(10)), *kv(10))
    for i in range(PrefixCache.PER_ADAPTER + 3):  # a busy adapter only ever replaces its own entries
        cache.store("busy", [i] + list(range(1, 9)), *kv(9))
    assert sum(k[0] == "busy" for k in cache.entries) == PrefixCache.PER_ADAPTER
    length, (keys, _) = cache.lookup("rare", list(range(6)) + [99, 98])
    assert length == 6 and keys[0].shape == (2, 6, 4)
    assert cache.lookup("busy", [0, 1, 2])[0] == 0  # its oldest entries were replaced
    assert cache.lookup("busy", [5, 1, 2, 3, 4, 5])[0] == 5  # at most len - 1: one token is always computed
    assert cache.lookup("other", list(range(10)))[0] == 0  # K/V are per adapter
    cache.store("x", list(range(50, 95)), *kv(45))  # over the token budget: least recently used go first
    assert cache.tokens <= 100 and ("x", tuple(range(50, 95))) in cache.entries
    cache.drop("x")
    assert all(k[0] != "x" for k in cache.entries)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-3])
def test_tiny_temperatures_sample_without_overflow(temperature):
    from lorakit.serve.sampling import sample_each

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]])
    seqs = [Sequence([1], None, SamplingParams(temperature=temperature, top_p=top_p, seed=0), lambda out: None)
            for top_p in (1.0, 0.9)]
    # Divided by the floor (0.01), a logit gap of 1 leaves the runner-up a probability of e^-100: greedy.
    assert {tuple(sample_each(logits, seqs)) for _ in range(20)} == {(0, 1)}


def test_penalties_top_k_and_min_p():
    from lorakit.serve.sampling import adjusted_logits, sample_each

    logits = torch.tensor([2.0, -1.0, 1.0, 0.5])

    def adjusted(prompt, output, **params):
        seq = Sequence(prompt, None, SamplingParams(**params), lambda out: None)
        seq.output_ids = list(output)
        return adjusted_logits(logits, seq).tolist()

    # repetition_penalty (vLLM, transformers): tokens of the prompt or output, positive / p, negative * p
    assert adjusted([0], [1], repetition_penalty=2.0) == [1.0, -2.0, 1.0, 0.5]
    # frequency: minus 0.5 per time generated; presence: minus 0.25 once; the prompt does not count
    assert adjusted([3], [2, 2, 0], frequency_penalty=0.5, presence_penalty=0.25) == [1.25, -1.0, -0.25, 0.5]
    assert adjusted([3], [], logit_bias={1: 5.0}) == [2.0, 4.0, 1.0, 0.5]
    # greedy follows the adjusted logits
    seq = Sequence([0], None, SamplingParams(temperature=0, repetition_penalty=4.0), lambda out: None)
    assert sample_each(logits[None], [seq]) == [2]
    # top_k=1 and min_p=1 leave only the most likely token, however hot the temperature
    for params in ({"top_k": 1}, {"min_p": 1.0}):
        hot = [Sequence([0], None, SamplingParams(temperature=2.0, seed=s, **params), lambda out: None)
               for s in range(8)]
        assert sample_each(logits[None].repeat(8, 1), hot) == [0] * 8
    # top_k=2: only the two most likely tokens are ever drawn
    two = [Sequence([0], None, SamplingParams(temperature=2.0, seed=s, top_k=2), lambda out: None) for s in range(40)]
    assert set(sample_each(logits[None].repeat(40, 1), two)) == {0, 2}


def test_sampling_failure_ends_only_its_own_sequence(setup, monkeypatch):
    from lorakit.serve import sampling as sampling_module

    tok, base, root = setup
    real = sampling_module.sample_row
    calls = collections.Counter()

    def flaky(row, params, generator):  # seed 666 fails at once (prefill), seed 777 at its 3rd token (decode)
        calls[params.seed] += 1
        if params.seed == 666 or (params.seed == 777 and calls[777] == 3):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(row, params, generator)

    monkeypatch.setattr(sampling_module, "sample_row", flaky)
    engine = make_engine(setup)
    p, q = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"]
    specs = [(p, "a", 0.0, None), (q, "b", 1.0, 666), (q, None, 0.0, None), (p, "c", 1.0, 777)]
    seqs, events = [], []
    try:
        for ids, adapter, temperature, seed in specs:
            events.append(queue.SimpleQueue())
            seqs.append(Sequence(ids, adapter, SamplingParams(max_tokens=12, temperature=temperature, seed=seed,
                                                              ignore_eos=True), events[-1].put))
        engine.submit(seqs).result(30)  # one submit: all four share the prefill and the decode steps
        finals = []
        for q_events in events:
            out = q_events.get(timeout=60)
            while out.finish_reason is None:
                out = q_events.get(timeout=60)
            finals.append(out)
    finally:
        engine.stop()
    assert [o.finish_reason for o in finals] == ["length", "error", "length", "error"]
    assert "probability tensor" in str(finals[1].error) and finals[3].completion_tokens == 2  # in a decode step
    for i in (0, 2):  # the batch-mates carried on, unharmed (ignore_eos: compare up to the first EOS)
        ids, adapter = specs[i][0], specs[i][1]
        expected = offline_ids(base, tok, ids, root / adapter if adapter else None, max_new_tokens=12)
        assert len(seqs[i].output_ids) == 12 and seqs[i].output_ids[:len(expected)] == expected


def _byte_engine() -> Engine:
    tok = byte_tokenizer()
    return Engine(tiny_model(tok), tok, EngineConfig(max_batch_size=2, max_model_len=64), base_name="bytes")


def _advance_all(engine: Engine, token_ids: list[int], max_tokens: int, stop=()) -> tuple[list[str], str]:
    """Feed forced tokens through the engine's bookkeeping; the text pieces it emits and the finish reason."""
    pieces = []
    seq = Sequence([1], None, SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop),
                   lambda out: pieces.append(out))
    for token in token_ids:
        if engine._advance(seq, token):
            break
    return [out.text for out in pieces], pieces[-1].finish_reason


def test_length_cut_inside_a_character_drops_the_half_character():
    engine = _byte_engine()
    cats = engine.tokenizer("🐱🐱🐱")["input_ids"]  # 3 characters of 4 bytes, one token per byte
    for cut, expected in [(10, "🐱🐱"), (9, "🐱🐱"), (8, "🐱🐱"), (12, "🐱🐱🐱")]:
        pieces, finish = _advance_all(engine, cats, max_tokens=cut)
        assert "".join(pieces) == expected and finish == "length"
        assert all("\ufffd" not in piece for piece in pieces)
    # An end-of-sequence token right after half a character ends the text before it, too.
    pieces, finish = _advance_all(engine, cats[:6] + [engine.tokenizer.eos_token_id], max_tokens=20)
    assert "".join(pieces) == "🐱" and finish == "stop"
    # A U+FFFD the model really produced (the complete bytes EF BF BD) followed by more text stays.
    real = engine.tokenizer("a\ufffdb")["input_ids"]
    assert "".join(_advance_all(engine, real, max_tokens=len(real))[0]) == "a\ufffdb"
    # So does one right before a stop string: more bytes followed it.
    pieces, finish = _advance_all(engine, real + engine.tokenizer("!!")["input_ids"], max_tokens=20, stop=("b!",))
    assert "".join(pieces) == "a\ufffd" and finish == "stop"
