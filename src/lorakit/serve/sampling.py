"""Choosing each sequence's next token: greedy or sampled (temperature, top-p/k, min-p), penalties, logit bias,
and the log probabilities the API reports.

A sequence here is anything with `params` (SamplingParams), `generator` (its own torch.Generator), `prompt_ids`
and `output_ids`: the engine's Sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger("lorakit.serve")

# Temperatures in (0, MIN_TEMPERATURE) sample at MIN_TEMPERATURE (as vLLM does): dividing logits by a tiny
# temperature overflows to inf and softmax turns that into NaN. At 0.01 a logit gap of 1 is already a
# factor e^100, so the result is as good as greedy, while 0 itself stays exact argmax.
MIN_TEMPERATURE = 1e-2


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_k: int = 0  # keep the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per time a token was generated
    repetition_penalty: float = 1.0  # vLLM/transformers: divides positive (multiplies negative) logits of
    #                                  tokens in the prompt or the output
    logprobs: Optional[int] = None  # None: none; k: each token's log probability and the k most likely ones
    prompt_logprobs: Optional[int] = None  # the same for the prompt's tokens (its first token gets none)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty) \
            or self.repetition_penalty != 1.0


def sample_each(logits: torch.Tensor, seqs: list) -> list[int | Exception]:
    """One token per row: argmax for temperature 0, else top-p sampling with the row's own generator.

    A row whose sampling fails gets its exception in place of a token, so only that sequence fails.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()  # one device sync for all the plain greedy rows
    tokens: list[int | Exception] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        try:
            if p.temperature <= 0 and not p.adjusts_logits:
                tokens.append(greedy[i])
                continue
            row = adjusted_logits(logits[i], seq) if p.adjusts_logits else logits[i]
            tokens.append(int(row.argmax()) if p.temperature <= 0 else sample_row(row, p, seq.generator))
        except Exception as exc:
            log.exception("sampling failed for one sequence; its batch-mates go on")
            tokens.append(exc)
    return tokens


# A sampled token, its log probability, and the k most likely (id, log probability) at that step.
ChosenLogprob = tuple[int, float, list[tuple[int, float]]]


def logprobs_each(logits: torch.Tensor, seqs: list,
                  tokens: list[int | Exception]) -> list[Optional[ChosenLogprob]]:
    """(token, its log probability, the k most likely (id, log probability)) for the rows that ask, else None.

    The probabilities are the model's own (log_softmax of its logits), before temperature, penalties and
    top-p/top-k, as vLLM reports them by default.
    """
    asks = [i for i, (seq, token) in enumerate(zip(seqs, tokens))
            if seq.params.logprobs is not None and not isinstance(token, Exception)]
    result: list[Optional[ChosenLogprob]] = [None] * len(seqs)
    if not asks:
        return result
    chosen, top_ids, top_lp = chosen_and_top(logits[asks], [tokens[i] for i in asks],
                                              max(seqs[i].params.logprobs for i in asks))
    for row, i in enumerate(asks):
        wanted = seqs[i].params.logprobs
        result[i] = (tokens[i], chosen[row], list(zip(top_ids[row][:wanted], top_lp[row][:wanted])))
    return result


def chosen_and_top(logits: torch.Tensor, targets: list[int], k: int):
    """Per row of `logits`: the log probability of its target, and the ids and log probabilities of its k
    most likely tokens, as Python lists."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return chosen, top_ids.tolist(), top_lp.tolist()


def adjusted_logits(row: torch.Tensor, seq) -> torch.Tensor:
    """One row's logits after logit_bias and the repetition, presence and frequency penalties."""
    p = seq.params
    row = row.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=row.device)
        row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=row.device, dtype=torch.long)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=row.device), minlength=row.shape[0])
        counts = counts[:row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


def sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    row = row / max(p.temperature, MIN_TEMPERATURE)
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
