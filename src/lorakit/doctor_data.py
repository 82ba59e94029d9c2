"""`lorakit doctor`'s data checks: malformed rows, empty responses, duplicates, held-out questions seen in training,
rows cut at --max-length, and a dataset too small for the run's steps."""

from __future__ import annotations

import math
import re
from typing import Optional

from lorakit.data import DataError, Example, example_from_row, read_rows, tokenize_example
from lorakit.doctor import Finding, Report, check_settings, total_steps
from lorakit.evaluate import normalize
from lorakit.train_config import TrainConfig

NEAR_DUPLICATE_JACCARD = 0.8  # word-set overlap from which two questions count as the same question reworded
NEAR_DUPLICATE_MIN_WORDS = 4  # shorter questions ("hi", "price?") are too short to call near-duplicates
MAX_PASSES = 10  # more passes over the data than this and a model memorises its rows
SHOWN = 5  # lines quoted per finding


def _lines(wheres: list[str]) -> str:
    more = f" and {len(wheres) - SHOWN} more" if len(wheres) > SHOWN else ""
    return ", ".join(wheres[:SHOWN]) + more


def read_examples(path: str, config: TrainConfig) -> tuple[list[Example], list[Finding]]:
    """Every well-formed row of `path` as an Example, and a finding for the malformed and empty ones."""
    examples, malformed, empty = [], [], []
    findings = []
    try:
        for lineno, row in read_rows(path):
            where = f"{path}:{lineno}"
            response = row.get(config.response_field) if isinstance(row, dict) and not row.get("messages") else None
            if isinstance(response, str) and not response.strip():
                empty.append(where)
                continue
            try:
                examples.append(example_from_row(row, where, config.query_field, config.response_field,
                                                 system_prompt=config.system_prompt))
            except DataError as e:
                malformed.append((where, str(e)))
    except DataError as e:  # the file itself cannot be read past this point
        findings.append(Finding("error", "unreadable-data", str(e), "training stops at this row",
                                f"fix {path} at the line named (each line one JSON object)"))
    if malformed:
        findings.append(Finding(
            "error", "malformed-rows", f"{len(malformed)} malformed row(s) in {path}: {_lines([w for w, _ in malformed])}",
            f"training refuses the file at the first one; the first: {malformed[0][1]}",
            f"fix or delete those lines (or name the fields with --query-field / --response-field)"))
    if empty:
        findings.append(Finding(
            "error", "empty-responses", f"{len(empty)} row(s) with an empty response in {path}: {_lines(empty)}",
            "a row without a response has nothing to learn, and training refuses it",
            "write the responses, or delete those lines"))
    return examples, findings


def _question(example: Example) -> str:
    return normalize(" ".join(m["content"] for m in example.prompt if m["role"] == "user"))


def check_duplicates(examples: list[Example], path: str) -> list[Finding]:
    seen: dict[tuple[str, str], str] = {}
    copies = []
    for ex in examples:
        key = (_question(ex), normalize(ex.reference))
        if key in seen:
            copies.append(f"{ex.where} (= {seen[key].rsplit(':', 1)[-1]})")
        else:
            seen[key] = ex.where
    if not copies:
        return []
    return [Finding("warning", "duplicate-pairs", f"{len(copies)} duplicate (query, response) pair(s) in {path}: "
                                                  f"{_lines(copies)}",
                    "a repeated pair is trained on more often than the others and pushes the model to memorise it",
                    "delete the repeated lines")]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text))


def check_leakage(train: list[Example], held_out: list[Example], path: str) -> list[Finding]:
    """Held-out questions that also appear in training: exactly (after normalising) or reworded (word overlap)."""
    exact_index = {_question(ex): ex.where for ex in train}
    train_words = [(_words(_question(ex)), ex.where) for ex in train]
    by_word: dict[str, list[int]] = {}
    for i, (words, _) in enumerate(train_words):
        for w in words:
            by_word.setdefault(w, []).append(i)
    exact, near = [], []
    for ex in held_out:
        q = _question(ex)
        if q in exact_index:
            exact.append(f"{ex.where} (= {exact_index[q]})")
            continue
        words = _words(q)
        if len(words) < NEAR_DUPLICATE_MIN_WORDS:
            continue
        candidates = {i for w in words for i in by_word.get(w, ())}
        for i in candidates:
            other = train_words[i][0]
            if len(words & other) / len(words | other) >= NEAR_DUPLICATE_JACCARD:
                near.append(f"{ex.where} (~ {train_words[i][1]})")
                break
    findings = []
    why = "a held-out question the model was trained on measures memory, not generalisation: the score is inflated"
    if exact:
        findings.append(Finding("error", "eval-in-train", f"{len(exact)} held-out question(s) of {path} appear in the "
                                                          f"training data: {_lines(exact)}", why,
                                "delete them from one of the two files"))
    if near:
        findings.append(Finding("warning", "eval-near-train", f"{len(near)} held-out question(s) of {path} are "
                                                              f"rewordings of training questions: {_lines(near)}", why,
                                "delete them from one of the two files, or reword them further"))
    return findings


def check_lengths(examples: list[Example], config: TrainConfig, tokenizer) -> list[Finding]:
    lengths = sorted(len(tokenize_example(tokenizer, ex.messages)[0]) for ex in examples)
    over = sum(n > config.max_length for n in lengths)
    if not over:
        return []
    keep99 = lengths[max(0, math.ceil(0.99 * len(lengths)) - 1)]
    action = "skipped" if config.too_long == "skip" else "truncated (their ends, often the answer, are not learned)"
    return [Finding("warning", "rows-truncated",
                    f"{over} of {len(lengths)} rows are longer than --max-length {config.max_length} tokens "
                    f"(longest {lengths[-1]})", f"they will be {action}",
                    f"--max-length {keep99} (keeps 99% of the rows whole)")]


def check_size(n_examples: int, config: TrainConfig) -> list[Finding]:
    steps = total_steps(config, n_examples)
    passes = steps * config.batch_size * config.grad_accum / n_examples
    if passes <= MAX_PASSES:
        return []
    fitting_steps = math.ceil(3 * n_examples / (config.batch_size * config.grad_accum))
    return [Finding("warning", "too-small-for-steps",
                    f"{n_examples} examples for {steps} steps of {config.batch_size * config.grad_accum}: "
                    f"{passes:.0f} passes over the data",
                    f"more than {MAX_PASSES} passes and the model memorises the rows instead of learning the task",
                    f"--max-steps {fitting_steps} (3 passes), --epochs 3, or more data")]


def check_data(config: TrainConfig) -> tuple[list[Finding], Optional[int]]:
    """Findings about the training (and held-out) data; and the number of usable training examples."""
    from lorakit.models import load_tokenizer

    train, findings = read_examples(config.data, config)
    if not train:
        return findings, None
    findings += check_duplicates(train, config.data)
    if config.eval_data:
        held_out, eval_findings = read_examples(config.eval_data, config)
        findings += eval_findings + check_leakage(train, held_out, config.eval_data)
    findings += check_lengths(train, config, load_tokenizer(config.base))
    findings += check_size(len(train), config)
    return findings, len(train)


def doctor_before(config: TrainConfig) -> Report:
    """Settings and data, before training."""
    data_findings, n_examples = check_data(config)
    checked = ["settings", config.data] + ([config.eval_data] if config.eval_data else [])
    return Report(check_settings(config, n_examples) + data_findings, checked)
