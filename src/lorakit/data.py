"""Training data: (query, response) pairs or chat `messages` rows -> token ids with response-only labels.

Rows come from JSONL, CSV or a `datasets.save_to_disk` directory. Every row is checked before any
token is produced, so a bad row stops the run with its file and line before training starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from lorakit.errors import LoraKitError
from lorakit.fused_loss import IGNORE_INDEX  # label value that cross-entropy skips: prompt tokens and padding
ROLES = ("system", "user", "assistant")


class DataError(LoraKitError, ValueError):
    """A data file or row is malformed; the message names the file, the line and what is wrong."""


@dataclass
class Example:
    """One conversation to train or evaluate on."""

    messages: list[dict[str, str]]
    facts: Optional[list[str]] = None  # key facts of the reference answer, for answer accuracy
    where: str = ""  # "file:line", for error messages

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the last assistant turn."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str:
        """The last assistant turn: what the model should answer."""
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


# -- reading rows -------------------------------------------------------------------------------------

def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row dict) from a .jsonl/.json, .csv file or a datasets directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # utf-8-sig: spreadsheet programs start their CSV exports with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row or None in row.values():
                    values = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                    raise DataError(f"{path}:{reader.line_num}: {values} values, but the header names "
                                    f"{len(reader.fieldnames)} columns; quote values that contain commas or line "
                                    "breaks")
                yield reader.line_num, row
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl (one JSON object per "
                        f"line), .csv (with a header row) or a datasets.save_to_disk directory")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, row in enumerate(rows, 1):
            yield i, row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                            f"one JSON object") from None


def _read_datasets_dir(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a directory; reading a datasets.save_to_disk directory needs the optional "
                        f"'datasets' package (pip install datasets), or export the data to .jsonl/.csv") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds, 1):
        yield i, row


def load_examples(
    path: str | Path,
    query_field: str = "query",
    response_field: str = "response",
    messages_field: str = "messages",
    system_prompt: Optional[str] = None,
    facts_field: str = "facts",
) -> list[Example]:
    """Read and validate every row of a data file; raise DataError naming the first bad row."""
    examples = [example_from_row(row, f"{path}:{lineno}", query_field, response_field, messages_field, system_prompt,
                                 facts_field) for lineno, row in read_rows(path)]
    if not examples:
        raise DataError(f"{path} holds no rows")
    return examples


def example_from_row(row: Any, where: str, query_field: str = "query", response_field: str = "response",
                     messages_field: str = "messages", system_prompt: Optional[str] = None,
                     facts_field: str = "facts") -> Example:
    """One row as an Example; DataError naming `where` (file:line) and what is wrong when it is malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {query_field!r} and "
                        f"{response_field!r}, got {type(row).__name__}")
    if row.get(messages_field) is not None:
        messages = _check_messages(row[messages_field], where, messages_field)
    else:
        for name, flag in ((query_field, "--query-field"), (response_field, "--response-field")):
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                present = ", ".join(map(repr, row)) or "none"
                problem = "missing field" if value is None else "empty field"
                raise DataError(f"{where}: {problem} {name!r} (fields present: {present}); name the right "
                                f"column with {flag}, or give a {messages_field!r} list of chat turns")
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        messages = [{"role": "user", "content": row[query_field]},
                    {"role": "assistant", "content": row[response_field]}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return Example(messages, _facts(row.get(facts_field), where, facts_field), where)


def _check_messages(messages: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {name}[{i}] must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {name}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {name}[{i}] content must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {name}[{i}] is an empty assistant turn; give the reply, or drop the turn")
        if m["role"] == "assistant" and not any(o["role"] == "user" for o in out):
            raise DataError(f"{where}: {name}[{i}] is an assistant turn with no user turn before it; a "
                            "conversation starts with the user (after an optional system message)")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: {name} has no assistant turn, so there is nothing to train on")
    return out


def _facts(value: Any, where: str, name: str) -> Optional[list[str]]:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # CSV cell: a JSON list, or facts separated by "|"
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v.strip() for v in value.split("|") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {name!r} must be a list of strings")
    return list(value)


# -- tokenizing -----------------------------------------------------------------------------------------

def render_segments(tokenizer, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the chat-template text into (text, is_target) pieces; targets are assistant replies.

    A target is the reply text plus the end-of-turn marker (e.g. `<|im_end|>`): the model must learn
    to stop. Whitespace the template puts after that marker belongs to the prompt side.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so (query, response) pairs cannot be rendered as a "
                        "conversation; use an instruct/chat model as --base, or set tokenizer.chat_template")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render conversations as growing prefixes, "
                            "so prompt tokens cannot be masked; use a model with a standard chat template")
        reply = through[len(prompt):].rstrip()
        segments.append((prompt[len(done):], False))
        segments.append((reply, True))
        done = prompt + reply
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if full[len(done):].strip():  # turns after the last reply; a lone trailing newline teaches nothing
        segments.append((full[len(done):], False))
    return [(text, target) for text, target in segments if text]


def tokenize_example(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE_INDEX on every non-target token) for one conversation."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, target in render_segments(tokenizer, messages):
        # Each piece is tokenized on its own, like a prompt followed by generated tokens at inference.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if target else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


@dataclass
class TokenizedData:
    """Tokenized examples plus what happened to the rows that did not fit."""

    items: list[dict[str, list[int]]]
    examples: list[Example]
    truncated: int = 0
    skipped: int = 0
    max_length: int = 0
    skipped_where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]

    def fingerprint(self) -> str:
        """A hash of every example's tokens and labels: equal exactly when the training data is the same."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(repr((item["input_ids"], item["labels"])).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        n_tokens = sum(self.lengths)
        n_targets = sum(sum(1 for t in item["labels"] if t != IGNORE_INDEX) for item in self.items)
        text = f"{len(self)} examples, {n_tokens} tokens ({n_targets} response tokens)"
        if self.truncated or self.skipped:
            text += (f"; longer than max_length={self.max_length}: {self.truncated} truncated, "
                     f"{self.skipped} skipped")
        return text


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_length: int = 512, too_long: str = "truncate"
) -> TokenizedData:
    """Tokenize all examples; rows over max_length are truncated or skipped (`too_long`)."""
    if too_long not in ("truncate", "skip"):
        raise ValueError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
    data = TokenizedData([], [], max_length=max_length)
    for ex in examples:
        ids, labels = tokenize_example(tokenizer, ex.messages)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            if too_long == "skip" or all(t == IGNORE_INDEX for t in labels):
                data.skipped += 1  # a truncated row without response tokens teaches nothing
                data.skipped_where.append(ex.where)
                continue
            data.truncated += 1
        data.items.append({"input_ids": ids, "labels": labels})
        data.examples.append(ex)
    if not data.items:
        raise DataError(f"every row is longer than max_length={max_length} and was skipped; raise --max-length")
    return data


# -- batching ----------------------------------------------------------------------------------------------

def collate(items: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_token_id, labels with IGNORE_INDEX, attention_mask 0."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0, group_by_length: bool = True,
    mega_batch: int = 16, tolerance: float = 0.125,
) -> list[list[int]]:
    """One epoch's batches of row indices: shuffled, and with `group_by_length` holding rows of similar length.

    Without grouping: the rows shuffled, cut into batches. Grouping: the shuffled rows are cut into mega-batches of
    `mega_batch * batch_size` rows; inside each, rows are ordered by length bucket (lengths within `tolerance`,
    relative, of each other share one) and cut into batches; the batch order is then shuffled. Rows of one bucket
    keep their shuffled order, so the batches change from epoch to epoch even when the whole dataset fits in one
    mega-batch (exact sorting, `tolerance=0`, repeated them). A batch pads little (about `tolerance` of its tokens,
    plus the spill between buckets), but rows that share a response share a length too, so a grouped batch holds
    fewer different answers: benchmarks/quality.py measured that to cost held-out accuracy, hence off by default.
    The result depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """
    if batch_size < 1 or mega_batch < 1 or tolerance < 0:
        raise ValueError(f"batch_size and mega_batch must be >= 1 and tolerance >= 0, got {batch_size}, "
                         f"{mega_batch}, {tolerance}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    step = math.log1p(tolerance) if tolerance > 0 else 0.0

    def bucket(i: int) -> float:
        n = max(1, lengths[i])
        return math.floor(math.log(n) / step) if step else n

    span = mega_batch * batch_size
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start:start + span], key=lambda i: -bucket(i))  # stable: ties stay shuffled
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of a padded batch's tokens that are padding, over all `batches`."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0
