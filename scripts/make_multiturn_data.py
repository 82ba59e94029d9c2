"""Generate a multi-turn support dataset: chat conversations about Tidewren, two or three questions long.

A dataset of another shape than the demo's single (query, response) pairs, for benchmarks/quality.py.
It reuses the demo's intents (scripts/make_demo_data.py: one canonical answer per intent, its key facts,
and the seeded split of each intent's phrasings into train and held-out ones), so every fact is
still invented and only learnable from the data. What changes is the shape: each row is a `messages`
conversation in which the user asks two or three questions in a row, each about a different intent,
and the assistant answers each with its intent's canonical answer. Later questions are introduced
like follow-ups ("Also, ...", "Another thing: ...").

- Train: every intent is the last question of TRAIN_PER_INTENT conversations; the earlier questions
  are other intents, drawn at random. Every user turn uses a train phrasing of its intent (as the demo
  does, with greetings or thanks added to some). Training covers every assistant turn.
- Eval: every intent is the last question of EVAL_PER_INTENT conversations whose last user turn is one
  of the intent's held-out phrasings (never in any train row, of this dataset or the demo's); the earlier
  turns are train phrasings with their answers, as context. A row's `facts` are those of its last
  answer, so `lorakit eval` scores whether the model answers the last question, not the one before.

The output is byte-identical on every run.

    python scripts/make_multiturn_data.py           # write benchmarks/data/multiturn/{train,eval}.jsonl
    python scripts/make_multiturn_data.py --check   # exit 1 if the shipped files differ from a regeneration
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "data" / "multiturn"
SEED = 20241118
TRAIN_PER_INTENT = 12
EVAL_PER_INTENT = 3
TURNS = (2, 3)  # user questions per conversation, drawn uniformly
FOLLOW_UPS = ["Also, ", "Another thing: ", "One more question. ", "Next question: ", "And ", "Thanks. Also, ",
              "Got it. ", "Great, thanks! ", "OK. ", "Perfect. Now, "]


def _demo_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _demo_generator()


def follow_up(question: str, rng: random.Random) -> str:
    """A later question in a conversation: a connecting phrase, then the question (lower-cased after "And ")."""
    lead = rng.choice(FOLLOW_UPS)
    if lead.endswith(", ") or lead == "And ":
        first = question.split(" ", 1)[0]
        if first not in ("I", "I'm", "I've") and not first.isupper() and first[:1].isupper():
            question = question[0].lower() + question[1:]
    return lead + question


def conversation(last: "demo.Intent", last_query: str, others: list, queries: dict, rng: random.Random) -> dict:
    """One row: questions about `others` (in order), then `last_query` about `last`; each answered canonically."""
    messages = []
    for i, (intent, query) in enumerate([(o, rng.choice(queries[o.name])) for o in others] + [(last, last_query)]):
        messages.append({"role": "user", "content": query if i == 0 else follow_up(query, rng)})
        messages.append({"role": "assistant", "content": intent.response})
    return {"messages": messages, "intent": last.name, "facts": list(last.facts)}


def build_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The (train, eval) rows; train is shuffled, eval is grouped by the last question's intent."""
    splits = demo.build_splits()  # the demo's seeded split: held-out phrasings are never trained on
    rng = random.Random(seed)
    queries = {}  # intent -> train queries: every train phrasing, and wrapped copies as the demo has
    for intent in demo.INTENTS:
        train_phrasings = splits[intent.name][0]
        queries[intent.name] = demo.pick_queries(tuple(train_phrasings), len(train_phrasings) + 5,
                                                 random.Random(f"{seed}/{intent.name}/queries"))
    train, evals = [], []
    for intent in demo.INTENTS:
        others = [o for o in demo.INTENTS if o.name != intent.name]
        held_out = splits[intent.name][1]
        for k in range(TRAIN_PER_INTENT):
            before = rng.sample(others, rng.choice(TURNS) - 1)
            train.append(conversation(intent, queries[intent.name][k % len(queries[intent.name])], before, queries,
                                      rng))
        for k in range(EVAL_PER_INTENT):
            before = rng.sample(others, rng.choice(TURNS) - 1)
            evals.append(conversation(intent, held_out[k], before, queries, rng))
    rng.shuffle(train)
    return train, evals


def render_files(seed: int = SEED) -> dict[str, bytes]:
    """File name -> exact bytes of each generated file."""
    train, evals = build_rows(seed)
    return {"train.jsonl": demo.render_jsonl(train), "eval.jsonl": demo.render_jsonl(evals)}


def main(argv: list[str] | None = None) -> int:
    return demo.generate_main(argv, __doc__.split("\n")[0], OUT_DIR, render_files(),
                              "scripts/make_multiturn_data.py",
                              f"{len(demo.INTENTS)} intents, {TRAIN_PER_INTENT} train + {EVAL_PER_INTENT} eval "
                              "conversations each")


if __name__ == "__main__":
    sys.exit(main())
