"""Score a base model and a fine-tuned one on held-out pairs: answer accuracy and response perplexity.

An answer counts as correct when every key fact of the reference (its "facts" list, or facts
extracted from the reference: prices, numbers, times, menu paths, quoted strings, emails, URLs)
appears in the generated answer, ignoring case and whitespace; `exact_match` asks for the whole
reference instead.
"""

from __future__ import annotations

import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from lorakit.adapter_folder import is_full_model_dir, trained_settings
from lorakit.data import Example, load_examples, tokenize_examples
from lorakit.errors import LoraKitError
from lorakit.io_utils import atomic_save_json
from lorakit.models import DEFAULT_BASE, load_base_for_adapters, load_base_model, resolve_device
from lorakit.precision import autocast, slow_bf16_warning

_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "→": ">", "›": ">",
                         "–": "-", "—": "-"})
_UNITS = (r"%|percent|[kKMGT]B|ms|seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|business days?|weeks?|"
          r"months?|years?|users?|seats?|members?|projects?|requests?|calls?|GB/month|TB/month")
_WORD = r"[A-Z0-9][\w&'./+-]*"
_ITEM = rf"{_WORD}(?: {_WORD})*"
# Sentence-initial verbs that the capitalised-words rule would glue onto a menu path ("Open Settings > ...").
_LEAD_VERBS = {"open", "go", "click", "select", "choose", "tap", "navigate", "visit", "use", "press", "find", "head",
               "see", "under", "in", "from", "via", "then"}
_MENU = 2  # index of the menu-path pattern below
_FACT_PATTERNS = [
    re.compile(r"https?://[^\s)\"']+[^\s)\"'.,;:!?]"),  # URLs
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # email addresses
    re.compile(rf"{_ITEM}(?:\s*>\s*{_ITEM})+"),  # menu paths: Settings > Billing > Invoices
    re.compile(r"\"[^\"\n]{1,80}\"|'[^'\n]{1,80}'(?!\w)"),  # quoted strings (button labels, commands)
    re.compile(r"(?:[$€£]\s?\d+(?:,\d{3})*(?:\.\d+)?)"  # prices
               r"|(?:\d+(?:,\d{3})*(?:\.\d+)?\s?(?:USD|EUR|GBP|dollars|euros))"),
    re.compile(r"\b\d{1,2}(?::\d{2})?\s?(?:[ap]\.m\.|[ap]m)(?![a-z])|\b\d{1,2}:\d{2}\b", re.IGNORECASE),  # times
    re.compile(r"\+?\d[\d ()-]{7,}\d"),  # phone numbers
    re.compile(rf"\b\d+(?:,\d{{3}})*(?:\.\d+)?(?:\s?(?:{_UNITS})(?!\w))?"),  # numbers, with a unit if one follows
]


def normalize(text: str) -> str:
    """NFKC, case-folded, single-spaced, with typographic quotes, dashes and arrows made plain, and one space
    on each side of a menu path's '>'."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return " ".join(re.sub(r"\s*>\s*", " > ", text).split())


def _contains(answer: str, fact: str) -> bool:
    """`fact` occurs in `answer` as a whole: not inside a longer word or number ("5 GB" is not in "25 GB",
    "$14.90" not in "$14.905", "1" not in "1.5")."""
    before = r"(?<!\w)(?<!\d[.,])" if fact[:1].isalnum() else ""
    after = r"(?!\w)(?![.,]\d)" if fact[-1:].isalnum() else ""
    return re.search(before + re.escape(fact) + after, answer) is not None


def extract_facts(reference: str) -> list[str]:
    """Key facts of an answer that a model cannot guess: prices, numbers, times, menu paths, quotes..."""
    found: list[tuple[int, str]] = []
    taken = [False] * len(reference)  # a span used by an earlier (more specific) pattern is not reused
    for pattern in _FACT_PATTERNS:
        for m in pattern.finditer(reference):
            if any(taken[m.start():m.end()]):
                continue
            fact = m.group(0).strip()
            first, _, rest = fact.partition(" ")
            if pattern is _FACT_PATTERNS[_MENU]:
                if first.lower() in _LEAD_VERBS and ">" in rest.split(" ", 1)[-1]:
                    fact = rest
                fact = fact.rstrip(".,;:!?")
            if fact.startswith(("'", '"')) and fact.endswith(("'", '"')):
                fact = fact[1:-1].strip()
            if fact:
                found.append((m.start(), fact))
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
    return [fact for _, fact in sorted(found)]  # in reading order


def reference_facts(example: Example) -> list[str]:
    return example.facts if example.facts else extract_facts(example.reference)


def fact_found(answer: str, fact: str) -> bool:
    """Whether key fact `fact` occurs in `answer` (normalized both, as a whole: see _contains)."""
    return _contains(normalize(answer), normalize(fact))


def is_correct(answer: str, reference: str, facts: Sequence[str], exact_match: bool = False) -> bool:
    """All facts present in the answer (or, with exact_match / no facts, the answer equals the reference)."""
    if exact_match or not facts:
        return normalize(answer).rstrip(".!") == normalize(reference).rstrip(".!")
    return all(fact_found(answer, f) for f in facts)


@dataclass
class Scores:
    accuracy: float
    correct: int
    n: int
    perplexity: float
    answers: list[str] = field(default_factory=list, repr=False)
    perplexity_rows: int = 0  # rows whose response fits max_length (at least in part)
    perplexity_truncated: int = 0  # of those, rows cut at max_length


@dataclass
class EvalReport:
    data: str
    n: int
    base: Optional[Scores]
    tuned: Optional[Scores]
    tuned_name: Optional[str]
    metric: str
    max_new_tokens: int
    seconds: float
    rows: list[dict] = field(default_factory=list, repr=False)
    quantize: Optional[str] = None  # the base's weights were NF4-rounded (QLoRA)

    def table(self) -> str:
        base_name = f"{self.quantize} base" if self.quantize else "base"
        cols = [(base_name, self.base), ("adapter" if self.tuned_name else "", self.tuned)]
        cols = [(name, s) for name, s in cols if s is not None]
        label = f"answer accuracy ({self.metric})"
        width = max(len(label), 20)
        lines = [f"{'':<{width}}" + "".join(f"{name:>14}" for name, _ in cols)]
        lines.append(f"{label:<{width}}" + "".join(f"{s.accuracy:>13.1%} " for _, s in cols))
        lines.append(f"{'correct / rows':<{width}}" + "".join(f"{f'{s.correct}/{s.n}':>14}" for _, s in cols))
        lines.append(f"{'response perplexity':<{width}}" + "".join(f"{s.perplexity:>14.3f}" for _, s in cols))
        first = cols[0][1] if cols else None
        if first is not None and (first.perplexity_rows < first.n or first.perplexity_truncated):
            lines.append(f"(perplexity over {first.perplexity_rows} of {first.n} rows, {first.perplexity_truncated} "
                         "of them cut at max_length: rows longer than --max-length lose their end)")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = []
        if self.base is not None:
            parts.append(f"base {self.base.accuracy:.1%} (ppl {self.base.perplexity:.2f})")
        if self.tuned is not None:
            parts.append(f"adapter {self.tuned.accuracy:.1%} (ppl {self.tuned.perplexity:.2f})")
        return f"eval on {self.n} rows of {self.data}: accuracy " + " vs ".join(parts) + f" in {self.seconds:.0f}s"

    def to_dict(self) -> dict:
        def scores(s):
            return None if s is None else {"accuracy": s.accuracy, "correct": s.correct, "n": s.n,
                                           "perplexity": s.perplexity, "perplexity_rows": s.perplexity_rows,
                                           "perplexity_truncated": s.perplexity_truncated}

        return {"data": self.data, "n": self.n, "metric": self.metric, "adapter": self.tuned_name,
                "max_new_tokens": self.max_new_tokens, "seconds": round(self.seconds, 2),
                "quantize": self.quantize, "base": scores(self.base), "tuned": scores(self.tuned), "rows": self.rows}


def _score(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
           exact_match: bool, max_length: int, progress: bool, bf16: bool = False) -> Scores:
    from lorakit.generation import generate
    from lorakit.loss import eval_loss, model_device

    with autocast(bf16, model_device(model).type):
        answers = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    correct = sum(is_correct(a, e.reference, reference_facts(e), exact_match) for a, e in zip(answers, examples))
    tokenized = tokenize_examples(tokenizer, examples, max_length=max_length)
    loss = eval_loss(model, tokenized, tokenizer.pad_token_id, batch_size, bf16=bf16)
    return Scores(correct / len(examples), correct, len(examples), math.exp(min(loss, 50.0)), answers,
                  len(tokenized), tokenized.truncated)


def evaluate(
    base: str = DEFAULT_BASE,
    adapter: Optional[str] = None,
    data: str = "",
    query_field: Optional[str] = None,
    response_field: Optional[str] = None,
    system_prompt: Optional[str] = None,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    exact_match: bool = False,
    include_base: bool = True,
    limit: Optional[int] = None,
    json_out: Optional[str] = None,
    max_length: int = 1024,
    progress: bool = True,
    bf16: bool = False,
    quantize: Optional[str] = None,
    device: str = "auto",
    model=None,
    tokenizer=None,
) -> EvalReport:
    """Score the base model and the adapter (or a full fine-tuned model directory) on held-out pairs.

    Field names and the system prompt default to what the adapter was trained with (lorakit_train.json).
    A loaded model (PeftModel or plain) and tokenizer can be passed in instead of `base`/`adapter`.
    `bf16` runs generation and the perplexity pass under bfloat16 autocast (faster on CPUs with bf16 units).
    `quantize="nf4"` scores on the NF4-rounded base that QLoRA trains on (the default for a QLoRA adapter).
    """
    t0 = time.perf_counter()
    if adapter and not Path(adapter).is_dir():  # fail before any loading
        raise LoraKitError(f"--adapter {adapter} is not a directory; pass the output directory of `lorakit train`")
    full_model = bool(adapter) and is_full_model_dir(adapter)
    info = trained_settings(adapter)
    query_field = query_field or info.get("query_field") or "query"
    response_field = response_field or info.get("response_field") or "response"
    if system_prompt is None:
        system_prompt = info.get("system_prompt")
    quantize = quantize or info.get("quantize")
    examples = load_examples(data, query_field, response_field, system_prompt=system_prompt)
    if limit:
        examples = examples[:limit]
    if max_new_tokens is None:
        tok_for_len = tokenizer
        if tok_for_len is None:
            from lorakit.models import load_tokenizer

            tok_for_len = load_tokenizer(base)
        # Room for the longest reference plus its end-of-turn token and a little slack.
        longest = max(len(tok_for_len(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = longest + 8

    def score(m, tok):
        return _score(m, tok, examples, max_new_tokens, batch_size, exact_match, max_length, progress, bf16)

    base_scores = tuned_scores = None
    tuned_name = adapter
    if model is None:
        dtype = torch.bfloat16 if bf16 else torch.float32  # under bf16 autocast the matmuls run in bf16 anyway
        device = resolve_device(device)
        warning = slow_bf16_warning(device) if bf16 else None
        if warning:
            print(warning, file=sys.stderr, flush=True)
        model, tokenizer, _ = load_base_for_adapters(base, dtype=dtype, device=device, quantize=quantize)
        if full_model:
            if include_base:
                base_scores = score(model, tokenizer)
            del model
            model, tokenizer = load_base_model(adapter, dtype=dtype, device=device)
            tuned_scores = score(model, tokenizer)
        elif adapter:
            from lorakit import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
    if tuned_scores is None:
        if adapter is None and not hasattr(model, "disable_adapter"):
            base_scores = score(model, tokenizer)
        else:
            if include_base:
                with model.disable_adapter():
                    base_scores = score(model, tokenizer)
            tuned_scores = score(model, tokenizer)
            tuned_name = tuned_name or "adapter"
    rows = []
    for i, e in enumerate(examples):
        row = {"where": e.where, "query": e.prompt[-1]["content"], "reference": e.reference,
               "facts": reference_facts(e)}
        for key, s in (("base", base_scores), ("tuned", tuned_scores)):
            if s is not None:
                row[f"{key}_answer"] = s.answers[i]
                row[f"{key}_correct"] = is_correct(s.answers[i], e.reference, row["facts"], exact_match)
        rows.append(row)
    report = EvalReport(data=str(data), n=len(examples), base=base_scores, tuned=tuned_scores,
                        tuned_name=tuned_name, metric="exact match" if exact_match else "key facts",
                        max_new_tokens=max_new_tokens, seconds=time.perf_counter() - t0, rows=rows,
                        quantize=quantize)
    if json_out:
        atomic_save_json(report.to_dict(), json_out)
    return report
