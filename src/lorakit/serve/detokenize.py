"""From token ids to text: each token's own text and bytes (for log probabilities), and how much of a growing
output may be sent yet (a cut multi-byte character or the start of a stop string is held back)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

@dataclass
class TokenLogprob:
    """A generated token's log probability under the model, and the most likely tokens at that step."""

    token: str  # the token's own text (a lone piece of a multi-byte character decodes as U+FFFD)
    bytes: bytes  # the token's own bytes: pieces of one character join up into its UTF-8
    token_id: int
    logprob: Optional[float]  # None for a prompt's first token: nothing comes before it
    top: list["TokenLogprob"] = field(default_factory=list)  # the most likely tokens first (no `top` of their own)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2, Llama 3, Qwen, SmolLM2) character for each byte, reversed: char -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    for shift, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + shift)
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def token_text_and_bytes(tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token's text and its bytes. Its text alone cannot give the bytes of a piece of a character (it
    decodes as U+FFFD), so byte-level pieces and SentencePiece byte tokens (<0xE2>) are read as bytes."""
    text = tokenizer.decode([token_id])
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            with contextlib.suppress(ValueError):
                return text, bytes([int(piece[3:5], 16)])
        if piece and all(c in _BYTE_OF_CHAR for c in piece):
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
            if raw.decode("utf-8", errors="replace") == text:  # it really is byte-level (not a look-alike)
                return text, raw
    return text, text.encode("utf-8")


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: Sequence[str], sent: int) -> Optional[int]:
    """Where the first of `stops` begins in `text`, looking only where one may overlap the unsent part (from
    `sent` on); None when there is none."""
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def sendable_end(text: str, sent: int, finished: bool, ends_at_last_token: bool, stops: Sequence[str]) -> int:
    """How much of `text` (the output so far, `sent` characters of it already sent) may be sent now.

    A multi-byte character whose last bytes are not generated yet decodes as U+FFFD: it is held back while the
    sequence runs (the next token may complete it) and dropped when it ends there. A U+FFFD followed by more text
    was real and is kept. Text alone cannot tell a cut character from a U+FFFD completed by the very last token;
    like vLLM, that rare one is dropped too. While running, a tail that could begin a stop string waits too.
    """
    end = len(text)
    if ends_at_last_token:
        while end > sent and text[end - 1] == "\ufffd":
            end -= 1
    if not finished:
        end -= held_back(text[:end], stops)
    return end


def token_logprob(tokenizer, token: int, logprob: Optional[float], top: list[tuple[int, float]]) -> TokenLogprob:
    """A token's log probability with its text and bytes, and those of the most likely alternatives."""
    alternatives = [TokenLogprob(*token_text_and_bytes(tokenizer, i), i, lp) for i, lp in top]
    return TokenLogprob(*token_text_and_bytes(tokenizer, token), token, logprob, alternatives)


def prompt_logprobs(tokenizer, ids: list[int], logits, k: int, rows_at_once: int = 256) -> list[TokenLogprob]:
    """Each prompt token's log probability given the tokens before it (`logits`: the prompt's rows; the first
    token gets none), with its k most likely alternatives."""
    from .sampling import chosen_and_top

    entries = [token_logprob(tokenizer, ids[0], None, [])]
    for start in range(0, len(ids) - 1, rows_at_once):  # row j predicts token j + 1
        targets = ids[start + 1: start + 1 + rows_at_once]
        chosen, top_ids, top_lp = chosen_and_top(logits[start: start + len(targets)], targets, k)
        for token, value, best, best_lp in zip(targets, chosen, top_ids, top_lp):
            entries.append(token_logprob(tokenizer, token, value, list(zip(best, best_lp))))
    return entries
